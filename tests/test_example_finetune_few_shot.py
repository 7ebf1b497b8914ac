"""examples/finetune_few_shot.py runs end to end on a small saved model and reports both accuracies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mmfm.train import TrainConfig, train

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_few_shot.py"


def test_few_shot_example_trains_from_the_saved_model_and_from_scratch(make_recipe, tiny_digits, tmp_path, capsys):
    base = train(TrainConfig.from_file(make_recipe("base", steps=2)))
    spec = importlib.util.spec_from_file_location("finetune_few_shot", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = [
        "--model",
        str(base),
        "--data",
        str(tiny_digits),
        "--shots",
        "2",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "fs"),
    ]
    accuracy = example.main(argv)
    assert set(accuracy) == {"pretrained", "scratch"} and all(0.0 <= a <= 1.0 for a in accuracy.values())
    out = capsys.readouterr().out
    assert "2 labelled images per class" in out and "held-out accuracy from pretrained" in out
    # the few-shot manifest holds exactly 2 examples of each new class
    lines = (tmp_path / "fs" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 4 and sum('"odd"' in line for line in lines) == 2
