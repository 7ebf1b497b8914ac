"""The trainer against a minimal hand-written loop, the data loader against the trainer, and 2-rank DDP vs 1 rank.

1. Trainer overhead: `Trainer.train_step` (mixer, global loss normalisation, clipping, schedule) vs a plain
   loop doing the same work by hand - same model config and seed, same batches from the same loader, the same
   task sequence, and like the trainer sharing the passes of tasks that read the same inputs
   (`model.reusing_passes()`) - as samples/s, interleaved rounds. Target >= 0.95. A third side, the hand loop
   with every task making its own passes, shows what sharing saves (reported).
2. Data loader: batches/s the demo's loader delivers alone vs batches/s the trainer consumes. Target >= 5.
3. DDP: samples/s of `torchrun --nproc_per_node=2 -m mmfm train` vs one process on the same recipe (reported;
   not in the quick run).

The recipe is configs/train/demo.yaml on the digits data (written to a temporary folder).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.harness import THREADS, Ratio, Result, compare, setup
from mmfm.data import write_digits
from mmfm.train import TrainConfig
from mmfm.train.mixer import TaskMixer
from mmfm.train.optim import build_optimizer, warmup_cosine
from mmfm.train.run_log import read_metrics
from mmfm.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "train" / "demo.yaml"
TRAINER_TARGET, LOADER_TARGET = 0.95, 5.0


def demo_config(data: Path, out_dir: Path, **overrides) -> TrainConfig:
    fields = {
        "data.train": str(data / "train.jsonl"),
        "data.val": None,
        "out_dir": str(out_dir),
        "progress": False,
        "eval_every": 0,
        "checkpoint_every": 0,
        **overrides,
    }
    return TrainConfig.from_file(RECIPE, fields)


class HandLoop:
    """The same training a reader would write by hand: pick the task, compute its loss, step."""

    def __init__(self, config: TrainConfig, trainer: Trainer, share_passes: bool):
        torch.manual_seed(config.seed)
        from mmfm.train.trainer import model_for_training

        self.model, _ = model_for_training(config)
        self.model.train()
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = warmup_cosine(self.optimizer, config.optim, config.steps)
        self.tasks = TaskMixer(config.tasks, config.seed, config.mixing)
        self.loader = trainer.loader  # same dataset, collate and sampler settings
        self.batches = iter(self.loader)
        self.clip = config.optim.grad_clip
        self.share_passes = share_passes

    def batch(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> float:
        b, model = self.batch(), self.model
        with model.reusing_passes() if self.share_passes else contextlib.nullcontext():
            loss = sum(task.weight * self.task_loss(task, b) for task in self.tasks.sample())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def task_loss(self, task, b) -> torch.Tensor:
        """One task's mean loss over the batch (the demo's batches hold every field)."""
        model = self.model
        media = {m: getattr(b, m) for m in task.inputs if m != "text"}
        if task.objective == "caption":
            return model.caption_loss(media, b.caption_ids, b.caption_mask)
        if task.objective == "classify":
            return model.heads["classify"].loss(model.classify_logits(media), b.label)
        if task.objective == "image_gen":
            target = model.image_gen_targets(b.image)
            if "text" in task.inputs:
                return model.image_gen_loss(None, b.caption_ids, b.caption_mask, target)
            return model.image_gen_loss(media, None, None, target)
        image = model.embed_tensors("image", b.image)
        text = model.embed_tensors("text", b.caption_ids, b.caption_mask)
        return model.heads["contrastive"].loss(image, text)


def run_steps(step, n: int):
    return lambda: [step() for _ in range(n)][-1]


def loader_rate(loader, batches: int) -> float:
    """Batches per second the loader yields on its own."""
    it, start = iter(loader), time.perf_counter()
    for _ in range(batches):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
    return batches / (time.perf_counter() - start)


def ddp_samples_per_s(data: Path, root: Path, steps: int, nproc: int) -> float:
    """samples/s over the last `steps // 2` steps of a `mmfm train` run with `nproc` ranks."""
    out = root / f"ddp{nproc}"
    recipe = root / f"ddp{nproc}.yaml"
    config = TrainConfig.from_file(RECIPE).to_dict()  # its relative paths resolved against configs/train/
    config.update(
        data={"train": str(data / "train.jsonl")},
        out_dir=str(out),
        steps=steps,
        log_every=steps // 2,
        eval_every=0,
        checkpoint_every=0,
        progress=False,
        distributed="ddp",
    )
    recipe.write_text(yaml.safe_dump(config))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, THREADS // nproc))}
    subprocess.run(
        [sys.executable, *launcher, "-m", "mmfm", "train", str(recipe)], env=env, check=True, capture_output=True
    )
    return read_metrics(out / "metrics.csv")["train/samples_per_s"][-1][1]


def main(quick: bool = False) -> list[Result]:
    setup()
    steps_per_round, rounds = (2, 2) if quick else (10, 5)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_digits(root / "digits", limit=200 if quick else None)
        config = demo_config(data, root / "run", steps=1000, **({"batch_size": 16} if quick else {}))
        trainer = Trainer(config)
        hand = HandLoop(config, trainer, share_passes=True)
        plain = HandLoop(config, trainer, share_passes=False)
        batch = config.batch_size
        print(f"\ntrainer vs hand loop: demo recipe, batch {batch}, {steps_per_round} steps/round, {THREADS} threads")
        result = compare(
            {
                "trainer": run_steps(trainer.train_step, steps_per_round),
                "hand": run_steps(hand.step, steps_per_round),
                "hand_unshared": run_steps(plain.step, steps_per_round),
            },
            rounds=rounds,
        )
        print(result.format("training steps"))
        samples = steps_per_round * batch
        rates = {side: samples / result.median(side) for side in ("trainer", "hand", "hand_unshared")}
        print(
            f"samples/s: trainer {rates['trainer']:.1f}, hand loop {rates['hand']:.1f}, "
            f"hand loop without shared passes {rates['hand_unshared']:.1f}"
        )

        consumed = steps_per_round / result.median("trainer")  # batches per second the trainer uses
        speedups = [loader_rate(trainer.loader, 20 if quick else 100) / consumed for _ in range(3)]
        loader = Ratio(statistics.median(speedups), min(speedups), max(speedups))
        print(f"data loader: {loader} x what the trainer consumes ({consumed:.2f} batches/s)")

        if quick:  # two torchrun launches are most of a quick run; test_train_distributed covers DDP itself
            print("torchrun DDP: skipped in the quick run")
        else:
            ddp = {n: ddp_samples_per_s(data, root, 40, n) for n in (1, 2)}
            print(f"torchrun DDP on {THREADS} cores: 1 rank {ddp[1]:.1f} samples/s, 2 ranks {ddp[2]:.1f} samples/s")
    return [
        Result(
            "trainer_vs_hand_loop", result.ratio("trainer", "hand"), TRAINER_TARGET, "samples/s trainer / hand loop"
        ),
        Result("loader_vs_trainer", loader, LOADER_TARGET, "batches/s loader / trainer"),
    ]


if __name__ == "__main__":
    main()
