"""`mmfm generate-image`: writes what `model.generate_image` returns, one image or a grid, and names bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import mmfm
from mmfm.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    mmfm.create_model("mmfm-test").save_pretrained(root / "ckpt")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "a.png")
    soundfile.write(root / "a.wav", np.sin(np.linspace(0, 400, 8000)).astype(np.float32), 16000)
    return {"root": str(root), "ckpt": str(root / "ckpt"), "png": str(root / "a.png"), "wav": str(root / "a.wav")}


def test_one_image_is_written_as_the_api_makes_it(capsys, files):
    out = f"{files['root']}/one.png"
    code = main(
        [
            "generate-image",
            "--model",
            files["ckpt"],
            "--text",
            "a cat",
            "--out",
            out,
            "--num-inference-steps",
            "3",
            "--seed",
            "2",
        ]
    )
    assert code == 0 and "wrote 1 image" in capsys.readouterr().err
    expected = mmfm.load(files["ckpt"]).generate_image(text=["a cat"], num_inference_steps=3, seed=2)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_several_conditions_make_a_grid_with_a_row_each(capsys, files):
    out = f"{files['root']}/grid.png"
    argv = ["generate-image", "--model", files["ckpt"], "--text", "a", "--text", "b", "--num-images", "3", "--out", out]
    code = main([*argv, "--num-inference-steps", "2", "--scheduler", "ddim", "--guidance-scale", "2", "--seed", "0"])
    assert code == 0 and "grid of 6 images" in capsys.readouterr().err
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 16, 3 * 16, 3)
    model = mmfm.load(files["ckpt"])
    images = model.generate_image(
        text=["a", "b"], num_images=3, num_inference_steps=2, scheduler="ddim", guidance_scale=2.0, seed=0
    )
    assert np.array_equal(grid[16:32, 32:48], np.asarray(images[5]))  # row "b", third image


@pytest.mark.parametrize("option", ["--audio", "--image"])
def test_audio_and_image_conditions(capsys, files, option):
    out = f"{files['root']}/media{option}.png"
    path = files["wav"] if option == "--audio" else files["png"]
    argv = ["generate-image", "--model", files["ckpt"], option, path, "--num-images", "4", "--out", out]
    code = main([*argv, "--num-inference-steps", "2"])
    assert code == 0
    assert Image.open(out).size == (2 * 16, 2 * 16)  # one condition's four images: a 2x2 grid


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--guidance-scale", "-1"], "mmfm: error: guidance_scale must be a finite number >= 0"),
        (["--num-inference-steps", "0"], "mmfm: error: num_inference_steps must be a whole number in [1, 1000], got 0"),
        (["--out", "x.unknown"], "mmfm: error: --out x.unknown: unknown image extension '.unknown'"),
        (["--out", "/no/such/dir/x.png"], "mmfm: error: --out /no/such/dir/x.png: cannot write the image"),
    ],
)
def test_bad_input_is_one_error_line(capsys, files, extra, message):
    argv = ["generate-image", "--model", files["ckpt"], "--text", "a", "--num-inference-steps", "1"]
    argv += ["--out", f"{files['root']}/x.png"]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_conditions_of_two_kinds_or_an_unknown_scheduler_are_usage_errors(capsys, files):
    base = ["generate-image", "--model", files["ckpt"], "--out", f"{files['root']}/x.png"]
    with pytest.raises(SystemExit) as e:
        main([*base, "--text", "a", "--image", files["png"]])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--text", "a", "--scheduler", "plms"])
    assert "invalid choice: 'plms'" in capsys.readouterr().err


def test_generate_and_its_old_option_names_still_work_and_say_they_are_deprecated(capsys, files):
    out = f"{files['root']}/old.png"
    argv = ["generate", "--model", files["ckpt"], "--text", "a cat", "--out", out, "--seed", "2"]
    assert main([*argv, "--steps", "2", "--guidance", "3"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "mmfm: warning: `mmfm generate` is deprecated; use `mmfm generate-image`" in err
    assert "mmfm: warning: --steps is deprecated; use --num-inference-steps" in err
    assert "mmfm: warning: --guidance is deprecated; use --guidance-scale" in err
    model = mmfm.load(files["ckpt"])
    expected = model.generate_image(text=["a cat"], num_inference_steps=2, guidance_scale=3.0, seed=2)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_generate_is_not_listed_in_the_help_but_generate_image_is(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "generate-image" in out and "    generate " not in out


def test_json_says_where_each_conditions_images_are_in_the_grid(capsys, files):
    out = f"{files['root']}/cells.png"
    argv = ["generate-image", "--model", files["ckpt"], "--text", "a", "--text", "b", "--num-images", "2"]
    assert main([*argv, "--out", out, "--num-inference-steps", "1", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records == [
        {"input": "a", "out": out, "cells": [[0, 0], [0, 1]], "cell_size": [16, 16]},
        {"input": "b", "out": out, "cells": [[1, 0], [1, 1]], "cell_size": [16, 16]},
    ]
