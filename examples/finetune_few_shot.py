"""Few-shot transfer: learn a new digits task from 10 labelled images per class, from the demo model and from scratch.

The new task is "odd or even" (or "greater than four" with --task gt4). Both runs use the same recipe and the
same 20 training images; only the starting weights differ. Run `make demo` first for the demo checkpoint:

    python examples/finetune_few_shot.py --model runs/demo/final --data data/digits
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from mmfm.data import ManifestDataset
from mmfm.eval.run import evaluate_data
from mmfm.train import TrainConfig, train

TASKS = {
    "parity": (["even", "odd"], lambda digit: "odd" if digit % 2 else "even"),
    "gt4": (["at most four", "greater than four"], lambda digit: "greater than four" if digit > 4 else "at most four"),
}


def relabelled_manifest(source: Path, out: Path, relabel, per_class: int | None, seed: int) -> Path:
    """Writes `out` with the images of `source` and their new labels; `per_class` keeps that many of each."""
    items = ManifestDataset(source)
    rows = [{"image": items[i]["image"], "label": relabel(int(items[i]["label"]))} for i in range(len(items))]
    if per_class is not None:
        random.Random(seed).shuffle(rows)
        by_label: dict[str, list[dict]] = {}
        for row in rows:
            by_label.setdefault(row["label"], []).append(row)
        rows = [row for group in by_label.values() for row in group[:per_class]]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def recipe(
    model: str, labels: list[str], train_manifest: Path, out_dir: Path, steps: int, shots: int, seed: int
) -> TrainConfig:
    """The recipe both runs share: a fresh classifier head with the new labels, every step on all the few shots."""
    return TrainConfig.from_dict(
        {
            "model": model,
            "model_overrides": {"classify": {"labels": labels}},
            "data": {"train": str(train_manifest)},
            "tasks": [{"name": "new_task", "objective": "classify", "inputs": ["image"]}],
            "steps": steps,
            "batch_size": shots * len(labels),
            "optim": {"lr": 1e-3, "warmup_steps": 10, "weight_decay": 0.05},
            "seed": seed,
            "out_dir": str(out_dir),
            "log_every": 10,
            "progress": False,
        },
        source="finetune_few_shot",
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/final", help="the pretrained model directory (make demo)")
    parser.add_argument("--data", default="data/digits", help="the digits data (mmfm data digits DIR)")
    parser.add_argument("--task", choices=sorted(TASKS), default="parity")
    parser.add_argument("--shots", type=int, default=10, help="labelled images per class")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/few_shot", help="run folders are written here (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    labels, relabel = TASKS[args.task]
    out, data = Path(args.out), Path(args.data)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    few = relabelled_manifest(data / "train.jsonl", out / "train.jsonl", relabel, args.shots, args.seed)
    held_out = relabelled_manifest(data / "val.jsonl", out / "val.jsonl", relabel, None, args.seed)
    accuracy = {}
    # "scratch" builds the pretrained model's architecture (its config.yaml) with random weights
    for name, start in (("pretrained", args.model), ("scratch", str(Path(args.model) / "config.yaml"))):
        final = train(recipe(start, labels, few, out / name, args.steps, args.shots, args.seed))
        metrics = evaluate_data(final, held_out, batch_size=128).metrics
        accuracy[name] = metrics["val/new_task/top1"]
    print(f"task: {args.task}, {args.shots} labelled images per class, {len(ManifestDataset(held_out))} held out")
    for name, value in accuracy.items():
        print(f"held-out accuracy from {name:>10}: {value:.1%}")
    return accuracy


if __name__ == "__main__":
    main()
