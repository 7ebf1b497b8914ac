"""The training loop: one plain PyTorch loop that reads top to bottom.

Each optimizer step the mixer picks a task (or takes all of them); `grad_accum` micro-batches are fetched, each
task's summed loss is divided by its units over the whole step (all micro-batches on all ranks), weighted,
back-propagated, clipped and applied with AdamW under warmup + cosine. Every `eval_every` steps the held-out
metrics are computed, every `checkpoint_every` steps a checkpoint is written, and a SIGINT/SIGTERM ends the
run after the current step with a checkpoint. Resuming restores model, optimizer, scheduler, mixer, RNG and
data position, so on CPU a resumed run reproduces the uninterrupted run's losses exactly; a resume that could not
(fewer `steps` than the run already did, another `batch_size`, a manifest of another size) is refused before
anything is built, as is an out_dir that cannot hold a run folder.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mmfm.chat_format import chat_format_of
from mmfm.checkpoint import load_weights, read_weights
from mmfm.data import Collator, EpochSampler, ManifestDataset, cache_media
from mmfm.errors import CheckpointError, ConfigError, MMFMError
from mmfm.loader import create_model, for_finetuning, upgrade_keys
from mmfm.model import MultimodalModel
from mmfm.train import distributed as D
from mmfm.train.checkpointing import STATE_NAME, list_checkpoints, load_trainer_state, save_checkpoint
from mmfm.train.config import TrainConfig
from mmfm.train.evaluate import evaluate
from mmfm.train.finetune import apply_lora, freeze, merge_lora, save_adapter
from mmfm.train.mixer import TaskMixer
from mmfm.train.objectives import Objective, build_objective
from mmfm.train.optim import build_optimizer, warmup_cosine
from mmfm.train.run_log import CURVES_NAME, METRICS_NAME, RunLog

FINAL_NAME = "final"
CURVES_EVERY_S = 60.0  # checkpoints redraw curves.png at most this often; the end of a run always does


class TaskLosses(nn.Module):
    """The module DDP/FSDP wrap: `forward(scales, batch)` computes the step's tasks on the model."""

    def __init__(self, model: MultimodalModel, objectives: dict[str, Objective]):
        super().__init__()
        self.model = model
        self.objectives = objectives

    def forward(self, scales: dict[str, float], batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaled sum of the named tasks' summed losses (to back-propagate), and each summed loss (detached).

        Tasks that read the same inputs share their encoder and backbone passes (`model.reusing_passes`).
        """
        with self.model.reusing_passes():
            sums = [self.objectives[name].loss_sum(self.model, batch, across_ranks=True) for name in scales]
        loss = sum(scale * value for scale, value in zip(scales.values(), sums))
        return loss, torch.stack([value.detach() for value in sums])


def model_for_training(config: TrainConfig) -> tuple[MultimodalModel, list[str]]:
    """The model to train and notes on how its weights were initialised.

    A saved directory is fine-tuned (`mmfm.loader.for_finetuning`: its config with `model_overrides`, its
    weights, fresh heads where the overrides change their labels or shapes); anything else is built fresh.
    """
    if Path(config.model).is_dir():
        return for_finetuning(config.model, config.model_overrides)
    return create_model(config.model, **config.model_overrides), []


class Trainer:
    """Runs one `TrainConfig`: `Trainer(config).fit()` returns the final model directory."""

    def __init__(self, config: TrainConfig, env: D.DistEnv | None = None):
        self.config = config
        self.env = env or D.DistEnv()
        self.run_dir = Path(config.out_dir)
        check_run_dir(self.run_dir)
        checkpoints = list_checkpoints(self.run_dir)
        if checkpoints and not config.resume:
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints of a run; pass resume=true to continue it, "
                "or choose another out_dir"
            )
        world, accum = self.env.world_size, config.grad_accum
        if config.batch_size % (accum * world):
            raise ConfigError(
                f"batch_size ({config.batch_size}) must be divisible by grad_accum ({accum}) x ranks ({world})"
            )
        self.micro_batch = config.batch_size // (accum * world)
        # Read and checked before anything is built, so that a run that cannot resume fails in a second.
        resume_from = checkpoints[-1] if config.resume and checkpoints else None
        state = load_trainer_state(resume_from) if resume_from is not None else None
        if state is not None and state["step"] > config.steps:
            raise ConfigError(
                f"cannot resume {self.run_dir} with steps={config.steps}: its latest checkpoint ({resume_from.name}) "
                f"is already at step {state['step']}. Pass steps={state['step']} or more to continue the run, or "
                f"train a new run from that checkpoint's weights (model={resume_from}) in another out_dir"
            )

        torch.manual_seed(config.seed)
        self.model, self.init_notes = model_for_training(config)
        if config.grad_checkpointing:
            self.model.backbone.grad_checkpointing = True
        self.objectives = {t.name: build_objective(t, self.model) for t in config.tasks}
        self.train_set, self.val_set = self._datasets()
        if config.finetune.freeze:
            freeze(self.model, config.finetune.freeze)
        if config.finetune.lora.rank:
            apply_lora(self.model, config.finetune.lora)
        self.model.to(self.env.device).train()
        if config.compile:
            for module in (self.model.backbone, *self.model.encoders.values()):
                module.compile()

        self.start_step, self.epoch, self.epoch_batches = 0, 0, 0
        if state is not None:
            self._check_resumable(state, resume_from)
            load_weights(self.model, upgrade_keys(read_weights(resume_from)), str(resume_from))
        self.losses = D.wrap(
            TaskLosses(self.model, self.objectives), self.model.backbone.blocks, config.distributed, self.env
        )
        self.optimizer = build_optimizer(self.losses, config.optim)
        self.scheduler = warmup_cosine(self.optimizer, config.optim, config.steps)
        self.mixer = TaskMixer(config.tasks, config.seed, config.mixing)
        torch.manual_seed(config.seed + 1 + self.env.rank)  # dropout and diffusion noise: one stream per rank
        if state is not None:
            self._restore(state, resume_from)

        self.sampler = EpochSampler(
            len(self.train_set), seed=config.seed, shuffle=True, rank=self.env.rank, world_size=self.env.world_size
        )
        collate = Collator.from_model(self.model)
        self.loader = DataLoader(
            self.train_set,
            batch_size=self.micro_batch,
            sampler=self.sampler,
            collate_fn=collate,
            num_workers=config.data.num_workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
        )
        if len(self.sampler) // self.micro_batch == 0 and resume_from is None:
            raise ConfigError(
                f"{config.data.train}: {len(self.train_set)} examples make no full batch of {self.micro_batch} "
                f"per rank; lower batch_size"
            )
        self.val_loader = None
        if self.val_set is not None:
            self.val_loader = DataLoader(
                self.val_set,
                batch_size=max(self.micro_batch, 64),
                # the first eval_max_items examples (all when 0), in manifest order
                sampler=EpochSampler(min(len(self.val_set), config.eval_max_items or len(self.val_set)), shuffle=False),
                collate_fn=collate,
                num_workers=config.data.num_workers,
            )
        self.batches = None
        self.stop_signal: int | None = None
        self._paused = 0.0
        self._plotted = -math.inf  # time.monotonic() of the last curves.png
        self.log = (
            RunLog(self.run_dir, config.tensorboard, resume_step=self.start_step if resume_from else None)
            if self.env.is_main
            else None
        )

    # ---- setup helpers ----

    def _datasets(self):
        data, model = self.config.data, self.model
        chat_format = chat_format_of(model)
        train = ManifestDataset(data.train, on_error=data.on_error, chat_format=chat_format)
        val = ManifestDataset(data.val, on_error=data.on_error, chat_format=chat_format) if data.val else None
        if data.cache_media:
            train = cache_media(train, model.processors)
            val = cache_media(val, model.processors) if val is not None else None
        return train, val

    def _check_resumable(self, state: dict, checkpoint: Path) -> None:
        """Refuses a resume whose data would not continue where the checkpoint stopped; converts the position.

        The checkpoint records the global batch size and the number of training examples: another batch size
        changes what a step is (and the schedule counted in steps), another manifest size makes the epoch's
        order and position mean nothing. Another grad_accum or number of ranks with the same batch size is
        fine when the examples already consumed this epoch fill whole micro-batches of the new layout.
        """
        config, world = self.config, self.env.world_size
        restart = (
            f"Resume with the recipe the run was started with, or train a new run from the checkpoint's weights "
            f"(model={checkpoint}) in another out_dir"
        )
        saved = state.get("data")
        if isinstance(saved, dict):
            if saved.get("batch_size") != config.batch_size:
                raise ConfigError(
                    f"cannot resume {self.run_dir}: it was trained with batch_size={saved.get('batch_size')}, "
                    f"this run asks for batch_size={config.batch_size}. {restart}"
                )
            if saved.get("train_examples") != len(self.train_set):
                raise ConfigError(
                    f"cannot resume {self.run_dir}: it was trained on {saved.get('train_examples')} examples, "
                    f"data.train ({config.data.train}) now has {len(self.train_set)}; the epoch it stopped in "
                    f"cannot be continued on other data. {restart}"
                )
            consumed = state["epoch_batches"] * saved["micro_batch"] * saved["world_size"]
            batches, rest = divmod(consumed, self.micro_batch * world)
            if rest:
                raise ConfigError(
                    f"cannot resume {self.run_dir} with grad_accum={config.grad_accum} on {world} rank(s): the "
                    f"{consumed} examples its epoch consumed do not fill whole micro-batches of "
                    f"{self.micro_batch} per rank; resume with grad_accum={saved.get('grad_accum')} on "
                    f"{saved['world_size']} rank(s)"
                )
            state["epoch_batches"] = batches
        if state["epoch_batches"] * self.micro_batch > len(self.train_set) // world:
            raise ConfigError(
                f"cannot resume {self.run_dir}: its checkpoint stopped {state['epoch_batches']} micro-batches of "
                f"{self.micro_batch} into an epoch of data.train ({config.data.train}), which has only "
                f"{len(self.train_set)} examples; was the manifest or the batch size changed? {restart}"
            )

    def _restore(self, state: dict, checkpoint: Path) -> None:
        self.start_step, self.epoch, self.epoch_batches = state["step"], state["epoch"], state["epoch_batches"]
        try:
            if self.env.enabled and self.config.distributed == "fsdp":
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                options = StateDictOptions(full_state_dict=True)
                set_optimizer_state_dict(self.losses, self.optimizer, state["optimizer"], options=options)
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.mixer.load_state_dict(state["mixer"])
            rng = state["rng"]
            if len(rng) == self.env.world_size:
                torch.set_rng_state(rng[self.env.rank])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"{checkpoint / STATE_NAME}: the trainer state does not fit this run ({type(e).__name__}: {e}); "
                "were the tasks, frozen groups or LoRA settings changed since it was written?"
            ) from None

    # ---- the loop ----

    def next_batch(self):
        """The next micro-batch; epochs roll over, and the position is what a checkpoint records."""
        while True:
            if self.batches is None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.epoch_batches * self.micro_batch)
                self.batches = iter(self.loader)
            try:
                batch = next(self.batches)
            except StopIteration:
                self.epoch, self.epoch_batches, self.batches = self.epoch + 1, 0, None
                continue
            self.epoch_batches += 1
            return batch.to(self.env.device)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the mixer's task(s); returns each task's (unweighted) loss."""
        tasks = self.mixer.sample()
        micro = [self.next_batch() for _ in range(self.config.grad_accum)]
        counts = torch.stack([sum(self.objectives[t.name].units(b) for b in micro) for t in tasks]).double()
        units = D.sum_across_ranks(counts, self.env)
        # DDP/FSDP average gradients over ranks, hence the world size; a task without examples is skipped.
        scales = {t.name: t.weight * self.env.world_size / float(n) for t, n in zip(tasks, units) if n > 0}
        totals = torch.zeros(len(scales), dtype=torch.float64, device=self.env.device)
        if scales:
            for i, batch in enumerate(micro):
                with self._sync_gradients(i == len(micro) - 1), self._autocast():
                    loss, sums = self.losses(scales, batch)
                loss.backward()
                totals += sums.double()
            if self.config.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.losses.parameters(), self.config.optim.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        totals = D.sum_across_ranks(totals, self.env)
        used = units[units > 0]
        return {name: float(total / n) for name, total, n in zip(scales, totals, used)}

    def fit(self) -> Path:
        """Trains to `config.steps`; returns the directory of the final model (`RUN/final`)."""
        config, env = self.config, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            for note in self.init_notes:
                print(f"mmfm train: {note}")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(
            total=config.steps, initial=self.start_step, disable=not (config.progress and env.is_main), unit="step"
        )
        window: dict[str, list[float]] = {}
        tick, step = time.perf_counter(), self.start_step
        try:
            for step in range(self.start_step + 1, config.steps + 1):
                step_losses = self.train_step()
                for name, loss in step_losses.items():
                    window.setdefault(name, []).append(loss)
                bar.update(1)
                bar.set_postfix({name: f"{loss:.3f}" for name, loss in step_losses.items()}, refresh=False)
                if step % config.log_every == 0 or step == config.steps:
                    elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                    steps_done = config.log_every if step % config.log_every == 0 else step % config.log_every
                    values = {f"train/{k}/loss": sum(v) / len(v) for k, v in window.items()}
                    values["train/lr"] = self.scheduler.get_last_lr()[0]
                    values["train/samples_per_s"] = steps_done * config.batch_size / elapsed
                    self._log(step, values)
                    window = {}
                if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                    self._log(step, self.evaluate())
                stopping = self._should_stop()
                if stopping or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    self.save(step, curves=True if stopping else None)  # a stopped run's curves are up to date
                if self.stop_signal is not None:
                    bar.close()
                    raise Interrupted(self.stop_signal, step, self.run_dir)
                tick += self._paused  # evaluation and checkpoints do not count against samples/s
                self._paused = 0.0
            bar.close()
            self.save(config.steps, curves=False)  # `finish` draws them, with the final metrics
            metrics = self.evaluate()
            self._log(config.steps, metrics)
            return self.finish(metrics)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.log is not None:
                self.log.close()

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, computed on rank 0 with the full weights while the other ranks wait."""
        if self.val_loader is None:
            return {}
        start = time.perf_counter()
        model = self.plain_model()
        metrics = evaluate(model, self.objectives, self.val_loader) if self.env.is_main else {}
        D.barrier(self.env)
        self._paused += time.perf_counter() - start
        return metrics

    def save(self, step: int, curves: bool | None = None) -> None:
        """A checkpoint of everything resume needs; every rank takes part, rank 0 writes.

        `curves`: redraw curves.png (True), not (False), or if `CURVES_EVERY_S` have passed since it last was (None).
        """
        start = time.perf_counter()
        model = self.plain_model()
        state = {
            "step": step,
            "epoch": self.epoch,
            "epoch_batches": self.epoch_batches,
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "mixer": self.mixer.state_dict(),
            "rng": D.gather_objects(torch.get_rng_state(), self.env),
            # what a resume checks its data against (Trainer._check_resumable)
            "data": {
                "batch_size": self.config.batch_size,
                "grad_accum": self.config.grad_accum,
                "micro_batch": self.micro_batch,
                "world_size": self.env.world_size,
                "train_examples": len(self.train_set),
            },
        }
        if self.env.is_main:
            save_checkpoint(self.run_dir, step, model, state, self.config.keep_last)
            due = time.monotonic() - self._plotted >= CURVES_EVERY_S  # a matplotlib figure takes about a second
            if self.log is not None and (curves or (curves is None and due)):
                self.log.plot()
                self._plotted = time.monotonic()
        D.barrier(self.env)
        self._paused += time.perf_counter() - start

    def finish(self, metrics: dict[str, float]) -> Path:
        """Writes RUN/final (LoRA merged in; the adapters alone in RUN/final/adapter) and the curves."""
        final = self.run_dir / FINAL_NAME
        model = self.plain_model()
        if self.env.is_main:
            if self.config.finetune.lora.rank:
                save_adapter(model, final / "adapter", self.config.finetune.lora)
                model = merge_lora(model)
            model.save_pretrained(final)
            self.log.plot()
            for name, value in metrics.items():
                print(f"{name}: {value:.4f}")
        D.barrier(self.env)
        return final

    def plain_model(self) -> MultimodalModel:
        """The model with full weights on this process (an unsharded copy under FSDP; rank 0 uses it)."""
        if not self.env.enabled or self.config.distributed == "ddp":
            return self.model
        state = D.full_state_dict(self.losses, self.env)
        copy = MultimodalModel(self.model.config)
        if self.config.finetune.lora.rank:
            apply_lora(copy, self.config.finetune.lora)
        copy.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
        return copy.train(self.model.training)

    # ---- small helpers ----

    def _optimizer_state(self) -> dict:
        if self.env.enabled and self.config.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.losses, self.optimizer, options=options)
        return self.optimizer.state_dict()

    def _sync_gradients(self, sync: bool):
        """Gradients are reduced across ranks only on the last micro-batch of a step."""
        if isinstance(self.losses, nn.parallel.DistributedDataParallel) and not sync:
            return self.losses.no_sync()
        if self.env.enabled and self.config.distributed == "fsdp":
            self.losses.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def _should_stop(self) -> bool:
        """Whether any rank was signalled (every rank must agree, since saving is collective)."""
        flag = torch.tensor(0.0 if self.stop_signal is None else float(self.stop_signal))
        flag = D.sum_across_ranks(flag, self.env)
        if flag > 0 and self.stop_signal is None:
            self.stop_signal = int(signal.SIGTERM)
        return self.stop_signal is not None

    def _log(self, step: int, values: dict[str, float]) -> None:
        if self.log is not None and values:
            self.log.log(step, values)


class Interrupted(MMFMError):
    """A run stopped by SIGINT/SIGTERM after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        super().__init__(
            f"stopped by signal {signum} after step {step}; checkpoint saved in {run_dir / 'checkpoints'} "
            "(continue with resume=true)"
        )
        self.exit_code = 128 + signum


def check_run_dir(run_dir: Path) -> None:
    """Refuses an out_dir training could not write, before anything is built or trained.

    Raises:
        ConfigError: out_dir (or a folder above it) is a file, a folder above it cannot be written, or one of
            the run's own entries has the wrong kind (a file named `checkpoints`, a folder named `metrics.csv`).
    """
    where = f"out_dir {run_dir}"
    kind = _kind(run_dir, where)
    if kind == "file":
        raise ConfigError(f"{where}: is a file, not a folder; choose another out_dir")
    ancestor = run_dir.absolute()
    while kind == "missing":
        ancestor = ancestor.parent
        kind = _kind(ancestor, where)
    if kind == "file":
        raise ConfigError(f"{where}: {ancestor} is a file, so the run folder cannot be created there")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: cannot write in {ancestor} (permission denied)")
    for name, wanted in (
        ("checkpoints", "folder"),
        (FINAL_NAME, "folder"),
        (METRICS_NAME, "file"),
        (CURVES_NAME, "file"),
    ):
        found = _kind(run_dir / name, where)
        if found not in ("missing", wanted):
            raise ConfigError(f"{where}: {run_dir / name} is a {found}; the run writes its {name} there as a {wanted}")


def _kind(path: Path, where: str) -> str:
    """The kind of `path`: "missing", "folder" or "file" (anything else that exists); a bad name is a ConfigError."""
    try:
        return "folder" if path.is_dir() else "file" if path.exists() else "missing"
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte, a loop of links
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ConfigError(f"{where}: not a usable folder name ({reason})") from None


def train(config: TrainConfig) -> Path:
    """Runs a training recipe in this process, or as one rank of a torchrun job; returns RUN/final."""
    env = D.init_distributed()
    try:
        return Trainer(config, env).fit()
    finally:
        D.shutdown(env)
