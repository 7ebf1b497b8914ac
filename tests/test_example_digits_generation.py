"""examples/digits_generation.py judges a saved image_gen model's text and sound samples and writes the grid."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmfm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_generation.py"


@pytest.fixture()
def example():
    spec = importlib.util.spec_from_file_location("digits_generation", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reports_judged_accuracy_and_diversity_and_writes_one_grid_row_per_digit(example, tiny_digits, tmp_path):
    torch.manual_seed(0)
    small = {"block_out_channels": [4, 8], "attention_head_dim": 4, "norm_num_groups": 2}
    mmfm.create_model("mmfm-test", image_gen={"channels": 1, "image_size": 8, **small}).save_pretrained(tmp_path / "m")
    data = tmp_path / "digits"  # held out = the training examples, so every digit has two
    shutil.copytree(tiny_digits, data)
    shutil.copy(data / "train.jsonl", data / "val.jsonl")
    argv = ["--model", str(tmp_path / "m"), "--data", str(data), "--out", str(tmp_path / "out")]
    report = example.main([*argv, "--per-digit", "2", "--columns", "2", "--steps", "3"])

    for key in ("text_to_image", "sound_to_image", "real_images"):
        assert 0.0 <= report[key]["accuracy"] <= 1.0 and report[key]["diversity"] >= 0.0
    assert report["real_images"]["diversity"] > 0.05  # real digits differ from each other
    assert json.loads((tmp_path / "out" / "generation.json").read_text()) == report
    grid = Image.open(tmp_path / "out" / "generated.png")
    # ten rows; two text samples, a gap and two sound samples per row; 8-px images with a 1-px margin, enlarged 4x
    assert grid.size == (5 * 40, 10 * 40) and grid.mode == "L"


def test_too_few_held_out_examples_of_a_digit_is_named(example, tiny_digits, tmp_path):
    mmfm.create_model("mmfm-test", image_gen={"channels": 1, "image_size": 8}).save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match=r"fewer than 50 examples of digit\(s\) \[0, 1, 2"):
        example.main(["--model", str(tmp_path / "m"), "--data", str(tiny_digits), "--per-digit", "50"])
