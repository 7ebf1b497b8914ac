"""`mmfm train` and `mmfm eval` from the command line."""

from __future__ import annotations

import json
import os
import re

import yaml

from mmfm.cli import main
from mmfm.train import TrainConfig


def test_train_then_eval_prints_metrics_and_samples(make_recipe, tiny_digits, tmp_path, capsys):
    assert main(["train", str(make_recipe(steps=3)), "optim.lr=0.002", "log_every=1"]) == 0
    out = capsys.readouterr().out
    final = tmp_path / "run" / "final"
    assert f"model: {final}" in out
    assert (tmp_path / "run" / "train_config.yaml").read_text().count("lr: 0.002") == 1

    metrics_file = tmp_path / "metrics.json"
    code = main(
        [
            "eval",
            "--model",
            str(final),
            "--data",
            str(tiny_digits / "val.jsonl"),
            "--samples",
            "2",
            "--out",
            str(metrics_file),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    metrics = json.loads(metrics_file.read_text())["metrics"]  # a path ending in .json gets eval.json alone
    # the tasks come from the run's own recipe
    assert {"val/image_caption/exact_match", "val/audio_caption/token_accuracy", "val/digit/top1"} <= set(metrics)
    assert {"val/image_text/r1_image_to_text", "val/image_text/r1_text_to_image"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if not k.endswith("/loss") and "median_rank" not in k)
    assert re.search(rf"^digit +loss .*\n +top1 +{metrics['val/digit/top1']:.4f}$", out, re.M)  # the table
    assert out.count("image_caption: ") == 2 and out.count("audio_caption: ") == 2 and ".wav -> '" in out


def test_eval_without_a_recipe_infers_tasks_from_heads_and_fields(make_recipe, tiny_digits, tmp_path, capsys):
    main(["train", str(make_recipe(steps=1))])
    model_dir = tmp_path / "moved"
    (tmp_path / "run" / "final").rename(model_dir)  # no train_config.yaml nearby any more
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--data", str(tiny_digits / "val.jsonl")]) == 0
    out = capsys.readouterr().out
    for name in ("image_caption", "audio_caption", "image_classify", "image_text", "audio_text"):
        assert re.search(rf"^{name} ", out, re.M)


def test_train_errors_name_the_key_and_the_manifest_line(make_recipe, tiny_digits, tmp_path, capsys):
    assert main(["train", str(make_recipe()), "optim.l=1"]) == 2
    assert "unknown config key 'optim.l'" in capsys.readouterr().err
    assert main(["train", str(make_recipe()), "steps"]) == 2
    assert "not KEY=VALUE" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    lines = (tiny_digits / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace(".png", "-missing.png")
    bad.write_text(
        "\n".join(
            line.replace('"images/', f'"{tiny_digits}/images/').replace('"audio/', f'"{tiny_digits}/audio/')
            for line in lines
        )
    )
    assert main(["train", str(make_recipe("strict", data={"train": str(bad)}))]) == 2
    assert "bad.jsonl:3:" in capsys.readouterr().err
    recipe = make_recipe("lenient", data={"train": str(bad), "on_error": "skip"}, steps=1)
    assert main(["train", str(recipe)]) == 0


def _relative_recipe(tmp_path, tiny_digits):
    """tmp_path/project/recipes/r.yaml naming its model YAML, data and run folder relative to its own folder."""
    recipes = tmp_path / "project" / "recipes"
    (tmp_path / "project" / "models").mkdir(parents=True)
    (tmp_path / "project" / "models" / "m.yaml").write_text("preset: mmfm-test\n")
    recipes.mkdir()
    recipe = {
        "model": "../models/m.yaml",
        "data": {"train": os.path.relpath(tiny_digits / "train.jsonl", recipes)},
        "tasks": [{"name": "image_caption", "objective": "caption", "inputs": ["image"]}],
        "steps": 1,
        "batch_size": 4,
        "out_dir": "../runs/r",
        "progress": False,
    }
    (recipes / "r.yaml").write_text(yaml.safe_dump(recipe))
    return recipes / "r.yaml"


def test_paths_in_a_recipe_are_relative_to_its_folder_from_any_working_directory(
    tiny_digits, tmp_path, monkeypatch, capsys
):
    recipe = _relative_recipe(tmp_path, tiny_digits)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", os.path.relpath(recipe, elsewhere)]) == 0
    run = tmp_path / "project" / "runs" / "r"
    assert f"model: {run / 'final'}" in capsys.readouterr().out
    written = yaml.safe_load((run / "train_config.yaml").read_text())
    assert written["model"] == str(tmp_path / "project" / "models" / "m.yaml")
    assert written["data"]["train"] == str(tiny_digits / "train.jsonl")
    assert not any(elsewhere.iterdir())


def test_paths_given_on_the_command_line_stay_relative_to_the_working_directory(
    tiny_digits, tmp_path, monkeypatch, capsys
):
    recipe = _relative_recipe(tmp_path, tiny_digits)
    monkeypatch.chdir(tiny_digits.parent)  # the recipe's folder has no digits/ and no out/
    assert main(["train", str(recipe), "data.train=digits/train.jsonl", "out_dir=out", "model=mmfm-test"]) == 0
    assert f"model: {os.path.join('out', 'final')}" in capsys.readouterr().out
    assert (tiny_digits.parent / "out" / "final").is_dir()
    config = TrainConfig.from_file(recipe, {"data.train": "digits/train.jsonl", "out_dir": "out"})
    assert (config.data.train, config.out_dir) == ("digits/train.jsonl", "out")


def test_eval_takes_a_preset_as_any_model_argument_and_warns_of_random_weights(tiny_digits, tmp_path, capsys):
    # A preset has random weights: the metrics mean nothing, but the command runs as on a checkpoint.
    assert main(["eval", "--model", "mmfm-test", "--data", str(tiny_digits / "val.jsonl")]) == 0
    out, err = capsys.readouterr()
    assert "random weights" in err
    assert re.search(r"^image_caption ", out, re.M) and not re.search(r"^digit ", out, re.M)
