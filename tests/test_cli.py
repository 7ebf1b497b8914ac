"""The `mmfm` command line: what it prints is what the Python API returns, and bad input is one clear error line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from PIL import Image

import mmfm
from mmfm.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two PNGs, two WAVs and a saved mmfm-test checkpoint, by name."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / name)
        paths[name] = str(root / name)
    for name, seconds in (("a.wav", 0.5), ("b.wav", 0.8)):
        soundfile.write(root / name, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        paths[name] = str(root / name)
    mmfm.create_model("mmfm-test").save_pretrained(root / "ckpt")
    paths["ckpt"] = str(root / "ckpt")
    return paths


@pytest.fixture(scope="module")
def model(files: dict[str, str]) -> mmfm.MultimodalModel:
    """The saved checkpoint, loaded through the API, to compare the CLI's output with."""
    return mmfm.load(files["ckpt"])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    """Runs the CLI in-process; returns the exit code, stdout lines and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.split("\n")[:-1], err


def one_line(caption: str) -> str:
    """A caption as the CLI prints it: tabs and line breaks escaped."""
    return caption.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# ---- info ----


@pytest.mark.parametrize("source", ["preset", "checkpoint"])
def test_info_prints_the_config_and_every_components_parameter_count(capsys, files, model, source):
    code, lines, _ = run(capsys, "info", "mmfm-test" if source == "preset" else files["ckpt"])
    assert code == 0
    split = lines.index("# parameters")
    assert yaml.safe_load("\n".join(lines[:split])) == model.config.to_dict()
    rows = {line.split()[0]: line.split() for line in lines[split + 2 :]}
    counts = model.parameter_counts()
    assert set(rows) == {*counts, "total"}
    for name, count in counts.items():
        assert int(rows[name][2].replace(",", "")) == count
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    assert int(rows["total"][2].replace(",", "")) == total
    rounded = rows["total"][1]  # e.g. 188.4K
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}[rounded[-1]]
    assert float(rounded[:-1]) == pytest.approx(total / scale, abs=0.05)


@pytest.mark.parametrize("argv", [["info"], ["info", "--list"]])
def test_info_without_a_model_lists_the_presets(capsys, argv):
    code, lines, _ = run(capsys, *argv)
    assert code == 0
    assert lines == mmfm.list_models()


# ---- caption ----


@pytest.mark.parametrize(
    "options, api",
    [
        (["--prompt", "a", "--max-new-tokens", "5"], {"prompt": "a", "max_new_tokens": 5}),
        (
            ["--do-sample", "--seed", "3", "--top-k", "40", "--max-new-tokens", "6"],
            {"do_sample": True, "seed": 3, "top_k": 40, "max_new_tokens": 6},
        ),
    ],
    ids=["greedy", "sampled"],
)
def test_caption_prints_one_line_per_file_in_order_equal_to_the_api(capsys, files, model, options, api):
    order = ["a.png", "a.wav", "b.png", "b.wav"]
    code, lines, _ = run(capsys, "caption", "--model", files["ckpt"], *[files[n] for n in order], *options)
    assert code == 0
    images = model.caption(images=[files["a.png"], files["b.png"]], **api)
    audio = model.caption(audio=[files["a.wav"], files["b.wav"]], **api)
    expected = dict(zip(["a.png", "b.png", "a.wav", "b.wav"], images + audio))
    assert lines == [f"{files[n]}\t{one_line(expected[n])}" for n in order]


def test_a_preset_name_warns_that_its_weights_are_random(capsys, files):
    code, lines, err = run(capsys, "caption", "--model", "mmfm-test", files["a.png"], "--max-new-tokens", "2")
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith(files["a.png"] + "\t")
    assert "random weights" in err and err.count("\n") == 1


# ---- classify ----


def parse_top(line: str) -> tuple[str, list[tuple[str, float]]]:
    path, *pairs = line.split("\t")
    matches = [re.fullmatch(r"(.*) \(([0-9.]+)\)", pair) for pair in pairs]
    return path, [(m.group(1), float(m.group(2))) for m in matches]


@pytest.mark.parametrize("labels", [None, ["cat", "dog", "a red bird"]], ids=["trained head", "zero-shot"])
def test_classify_prints_the_top_k_probabilities_of_the_api(capsys, files, model, labels, tmp_path):
    label_args = []
    if labels is not None:
        (tmp_path / "labels.txt").write_text("cat\n\ndog\na red bird\n")
        label_args = ["--labels-file", str(tmp_path / "labels.txt")]
    argv = ["classify", "--model", files["ckpt"], files["b.wav"], files["a.png"], "--top-k", "3", *label_args]
    code, lines, _ = run(capsys, *argv)
    assert code == 0
    expected = {
        files["b.wav"]: model.classify(audio=[files["b.wav"]], labels=labels).top(3)[0],
        files["a.png"]: model.classify(images=[files["a.png"]], labels=labels).top(3)[0],
    }
    assert [parse_top(line)[0] for line in lines] == [files["b.wav"], files["a.png"]]
    for line in lines:
        path, top = parse_top(line)
        assert [label for label, _ in top] == [label for label, _ in expected[path]]
        assert [p for _, p in top] == pytest.approx([p for _, p in expected[path]], abs=1e-4)


def test_classify_labels_option_splits_on_commas(capsys, files, model):
    code, lines, _ = run(capsys, "classify", "--model", files["ckpt"], files["a.png"], "--labels", "cat, dog")
    assert code == 0
    probs = model.classify(images=[files["a.png"]], labels=["cat", "dog"]).probs[0].tolist()
    assert dict(parse_top(lines[0])[1]) == pytest.approx({"cat": probs[0], "dog": probs[1]}, abs=1e-4)


# ---- embed ----


def test_embed_out_writes_the_api_embeddings_in_input_order(capsys, files, model, tmp_path):
    out = tmp_path / "emb.npy"
    argv = ["embed", "--model", files["ckpt"], files["b.wav"], files["a.png"], files["a.wav"], "--out", str(out)]
    code, lines, _ = run(capsys, *argv)
    assert code == 0 and lines == []
    array = np.load(out)
    assert array.dtype == np.float32 and array.shape == (3, model.config.contrastive.embed_dim)
    images = model.embed(images=[files["a.png"]])
    audio = model.embed(audio=[files["b.wav"], files["a.wav"]])
    torch.testing.assert_close(torch.from_numpy(array), torch.stack([audio[0], images[0], audio[1]]))
    np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, rtol=1e-5)


def test_embed_text_prints_one_json_line_per_text(capsys, files, model):
    texts = ["a cat", "a dog on a mat"]
    code, lines, _ = run(capsys, "embed", "--model", files["ckpt"], "--text", texts[0], "--text", texts[1])
    assert code == 0
    records = [json.loads(line) for line in lines]
    assert [r["input"] for r in records] == texts
    torch.testing.assert_close(torch.tensor([r["embedding"] for r in records]), model.embed(text=texts))


# ---- errors ----


@pytest.mark.parametrize("case", ["missing file", "corrupt image", "unknown extension", "unknown model"])
def test_bad_input_is_one_error_line_naming_it_with_exit_code_2(capsys, files, tmp_path, case):
    model, named = files["ckpt"], str(tmp_path / "missing.png")
    if case == "corrupt image":
        Path(named).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif case == "unknown extension":
        named = str(tmp_path / "notes.txt")
        Path(named).write_text("hello")
    elif case == "unknown model":
        model, named = "mmfm-nonexistent", "mmfm-nonexistent"
    code, lines, err = run(capsys, "caption", "--model", model, files["a.png"] if case == "unknown model" else named)
    assert code == 2
    assert lines == []
    assert err.startswith("mmfm: error: ") and err.count("\n") == 1
    assert named in err
    if case == "unknown extension":
        assert ".png" in err and ".wav" in err


def test_embed_needs_texts_or_files_but_not_both(capsys, files):
    code, _, err = run(capsys, "embed", "--model", files["ckpt"], "--text", "a cat", files["a.png"])
    assert code == 2 and err.startswith("mmfm: error: ")


@pytest.mark.parametrize("command", [[], ["info"], ["caption"], ["classify"], ["embed"]])
def test_every_help_exits_0_with_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"  mmfm {command[0] if command else 'info'} " in out


def test_python_dash_m_mmfm_runs_the_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mmfm", "info", "mmfm-test"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "name: mmfm-test" in result.stdout and "\ntotal " in result.stdout
