"""The training recipe: one dataclass per concern, nested in `TrainConfig`, read from YAML like model configs.

```yaml
model: mmfm-tiny                  # a preset, a shipped config, a model YAML or a saved directory
data:                             # relative paths in a recipe are relative to its folder
  train: data/train.jsonl
  val: data/val.jsonl
tasks:
  - {name: image_caption, objective: caption, inputs: [image], ratio: 2}
  - {name: digit, objective: classify, inputs: [image]}
  - {name: image_text, objective: contrastive, inputs: [image, text]}
steps: 1000
batch_size: 64
optim: {lr: 1.0e-3, warmup_steps: 100}
```

`mmfm train CONFIG key=value ...` overrides any field with dotted keys (`optim.lr=3e-4`); paths given there
are relative to the working directory. Unknown keys are errors naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmfm.config import (
    MAX_CONFIG_BYTES,
    MODALITIES,
    OBJECTIVE_HEADS,
    build_dataclass,
    check_config_size,
    load_yaml,
    merge,
    nest_dotted,
    objective_class,
    quote,
    read_yaml_mapping,
    to_plain,
)
from mmfm.errors import ConfigError

ObjectiveName = Literal[tuple(OBJECTIVE_HEADS)]
# Seeds are integers within +-SEED_LIMIT: every rank's seed (seed + 1 + rank) still fits torch's 64-bit seeds.
SEED_LIMIT = 2**62
# `optim.component_lr` keys: the parameter groups that can have learning rates of their own (`mmfm.train.optim`).
LR_COMPONENTS = ("encoders", "projectors", "backbone", "heads", "lora")

# Objective names of earlier releases -> today's; a recipe using one still runs, with a warning.
RENAMED_OBJECTIVES = {"denoise": "image_gen"}


@dataclass
class DataConfig:
    """Where the examples come from.

    Attributes:
        train: a JSONL manifest.
        val: a held-out JSONL manifest; None evaluates nothing.
        on_error: a manifest line with a missing file or a bad field is fatal ("raise") or dropped ("skip");
            either way it is reported with its line number.
        num_workers: DataLoader worker processes.
        cache_media: decode and preprocess every image and clip once, up front, and keep the tensors in memory.
    """

    train: str = ""
    val: str | None = None
    on_error: Literal["raise", "skip"] = "raise"
    num_workers: int = 0
    cache_media: bool = True


@dataclass
class TaskConfig:
    """One training objective over the batch.

    Attributes:
        name: the task's name in logs and metrics.
        objective: "caption" (next-token loss of the caption given `inputs`, for `[audio]` the audio caption
            where an example has one; no inputs is a text-only LM),
            "classify" (the trained head over `inputs`), "contrastive" (InfoNCE between the two `inputs`) or
            "image_gen" (the image_gen head learns to generate the example's image conditioned on `inputs`;
            formerly "denoise"). Each is served by a head: `mmfm.config.HEADS`.
        inputs: modalities the objective reads ("image", "audio", "text").
        weight: multiplies the task's loss.
        ratio: relative share of optimizer steps spent on this task.
    """

    name: str = ""
    objective: ObjectiveName = "caption"
    inputs: list[str] = field(default_factory=list)
    weight: float = 1.0
    ratio: float = 1.0


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay.

    Attributes:
        lr: peak learning rate.
        min_lr_ratio: the cosine ends at lr * min_lr_ratio.
        warmup_steps: linear warmup from 0.
        weight_decay: decoupled weight decay; never applied to norms, biases, embeddings or tokens.
        betas: Adam betas.
        eps: Adam epsilon.
        grad_clip: clip the global gradient norm to this; 0 disables.
        component_lr: peak learning rates of named components, overriding `lr` for their parameters: "encoders"
            (media encoders and text towers), "projectors", "backbone" (with the token embedding), "heads" and
            "lora" (adapter weights, wherever they sit); e.g. {projectors: 1.0e-3, lora: 2.0e-4}.
    """

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    component_lr: dict[str, float] = field(default_factory=dict)


@dataclass
class LoraConfig:
    """Low-rank adapters through `peft` on attention and MLP projections.

    Attributes:
        rank: adapter rank; 0 disables LoRA.
        alpha: scaling numerator (the update is scaled by alpha / rank).
        dropout: dropout on the adapter input.
        encoders: also adapt the image and audio encoders' attention and MLP layers.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    encoders: bool = False


@dataclass
class FinetuneConfig:
    """Transfer from a saved model.

    The model to start from is `TrainConfig.model`: naming a directory written by `save_pretrained` (or a
    run's checkpoint) fine-tunes it.

    Attributes:
        freeze: parameter groups kept fixed, by name prefix: "encoders", "encoders.image", "projectors",
            "backbone", "heads", "heads.caption", ...
        lora: adapters on the backbone (and optionally encoders); with rank > 0 the backbone's own weights
            are frozen and only adapters (plus heads that are not frozen) train.
    """

    freeze: list[str] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TrainConfig:
    """A whole training run.

    Attributes:
        model: a preset name, a shipped config name (`mmfm.list_configs()`), a model YAML path, or a saved model
            directory to fine-tune: its weights are loaded; heads whose shape the overrides change (new labels)
            start fresh.
        model_overrides: model config fields to change, nested or dotted ({"backbone.depth": 2}).
        data: the datasets.
        tasks: the objectives and how they are mixed.
        mixing: "sample" trains one task per optimizer step, drawn by `ratio`; "all" sums every task's weighted
            loss on each batch (`ratio` is then unused).
        optim: optimizer and schedule.
        finetune: initialisation, frozen groups and LoRA.
        steps: optimizer steps.
        batch_size: examples per optimizer step, over all ranks and accumulation steps.
        grad_accum: micro-batches per optimizer step.
        precision: "fp32", or "bf16" autocast (for GPUs).
        compile: run the model through `torch.compile`.
        grad_checkpointing: recompute backbone activations in backward.
        distributed: "ddp" or "fsdp" (FSDP2 `fully_shard`) under torchrun; ignored in a single process.
        seed: seeds the model init, data order and task sampling.
        out_dir: the run folder: checkpoints, logs, curves.
        resume: continue from the run folder's latest checkpoint.
        eval_every: evaluate every N steps (and at the end); 0 only at the end.
        eval_max_items: evaluate on at most this many held-out examples; 0 means all.
        log_every: write a CSV row every N steps.
        checkpoint_every: save every N steps (and at the end); 0 only at the end.
        keep_last: checkpoints kept in the run folder.
        tensorboard: also write TensorBoard events (needs the `tensorboard` package).
        progress: show a tqdm progress bar.
    """

    model: str = "mmfm-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    mixing: Literal["sample", "all"] = "sample"
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    grad_checkpointing: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"
    seed: int = 0
    out_dir: str = "runs/default"
    resume: bool = False
    eval_every: int = 0
    eval_max_items: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_last: int = 2
    tensorboard: bool = False
    progress: bool = True

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Reads a recipe and applies dotted overrides.

        Relative paths written in the recipe (`data.train`, `data.val`, `out_dir`, a `model` YAML or folder) are
        relative to the recipe file's folder, so it runs the same from any working directory; paths in
        `overrides` (the command line's `key=value`) stay relative to the working directory.
        """
        path = Path(path)
        data = recipe_paths_beside(read_yaml_mapping(path, "training config"), path.parent)
        return cls.from_dict(data, str(path), overrides)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], source: str = "<dict>", overrides: dict[str, Any] | None = None
    ) -> TrainConfig:
        """Builds and validates a recipe from a mapping; errors name `source` and the offending key."""
        if overrides:
            data = merge(data, nest_dotted(overrides, source))
            source = f"{source} with overrides {quote(overrides, 200)}"
        check_config_size(data, source)
        config = build_dataclass(cls, _rename_objectives(data, source), source)
        validate_train(config, source)
        return config

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


def _rename_objectives(data: dict[str, Any], source: str) -> dict[str, Any]:
    """`data` with objective names of earlier releases replaced by today's, each with a warning."""
    tasks = data.get("tasks")
    if not isinstance(tasks, list):
        return data
    renamed = []
    for task in tasks:
        old = task.get("objective") if isinstance(task, dict) else None
        if isinstance(old, str) and old in RENAMED_OBJECTIVES:
            new = RENAMED_OBJECTIVES[old]
            warnings.warn(f"{source}: objective '{old}' is now called '{new}'", FutureWarning, stacklevel=4)
            task = {**task, "objective": new}
        renamed.append(task)
    return {**data, "tasks": renamed}


def recipe_paths_beside(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The recipe mapping `data` with its relative paths made absolute against `folder`.

    `model` counts as a path when it ends in .yaml/.yml, holds a path separator (and no `hf-hub:` prefix) or
    names something in `folder`; otherwise it is a preset, shipped config or pretrained tag name.
    """

    def beside(value: Any) -> Any:
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            return value  # not a path (a type error is reported by validation), or nothing to resolve
        return str((folder / value).resolve())

    out = dict(data)
    if isinstance(out.get("data"), dict):
        out["data"] = {k: beside(v) if k in ("train", "val") else v for k, v in out["data"].items()}
    if "out_dir" in out:
        out["out_dir"] = beside(out["out_dir"])
    model = out.get("model")
    if isinstance(model, str) and not model.startswith("hf-hub:"):
        if model.endswith((".yaml", ".yml")) or "/" in model or os.sep in model or _exists(folder / model):
            out["model"] = beside(model)
    return out


def _exists(path: Path) -> bool:
    """Whether `path` exists; a name the system cannot take (too long, a NUL in it) does not."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


# A dotted key of an override: names joined by dots (`optim.lr`, `model_overrides.backbone.depth`).
_OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["optim.lr=3e-4", "steps=10"]` -> {"optim.lr": "3e-4", "steps": 10}: values are read as YAML.

    Numbers YAML 1.1 reads as text ("3e-4") become numbers where the recipe field is a number
    (`mmfm.config.build_dataclass`).

    Raises:
        ConfigError: naming the override, when it is not KEY=VALUE with a dotted KEY, or VALUE is not valid YAML or
            too large (`mmfm.config.load_yaml`).
    """
    out = {}
    for pair in pairs:
        if not isinstance(pair, str):
            raise ConfigError(f"override {quote(pair)} must be text of the form KEY=VALUE (e.g. optim.lr=3e-4)")
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {quote(pair)} is not KEY=VALUE (e.g. optim.lr=3e-4)")
        if not _OVERRIDE_KEY.fullmatch(key):
            raise ConfigError(
                f"override {quote(pair)}: {quote(key)} is not a dotted config key (names joined by dots, e.g. optim.lr)"
            )
        if len(value) > MAX_CONFIG_BYTES:
            raise ConfigError(f"override '{key}': the value is over {MAX_CONFIG_BYTES} bytes")
        out[key] = load_yaml(value, f"override '{key}'") if value.strip() else ""
    return out


def validate_train(config: TrainConfig, source: str) -> None:
    """Rejects recipes that cannot run, naming the keys involved."""

    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    if not config.data.train:
        fail("data.train must name a training manifest")
    if not config.tasks:
        fail("tasks must list at least one objective")
    names = [t.name for t in config.tasks]
    if len(set(names)) != len(names) or not all(names):
        fail(f"tasks need unique, non-empty names, got {names}")
    for i, task in enumerate(config.tasks):
        where = f"tasks[{i}] ({task.name})"
        unknown = [m for m in task.inputs if m not in MODALITIES]
        if unknown:
            fail(f"{where}.inputs: unknown modality {unknown} (known: {', '.join(MODALITIES)})")
        objective_class(task.objective).check_inputs(task.inputs, lambda msg, where=where: fail(f"{where}: {msg}"))
        if task.weight < 0 or task.ratio <= 0:
            fail(f"{where}: weight must be >= 0 and ratio > 0, got weight={task.weight}, ratio={task.ratio}")
    for key in ("steps", "batch_size", "grad_accum", "keep_last", "log_every"):
        if getattr(config, key) <= 0:
            fail(f"{key} must be positive, got {getattr(config, key)}")
    for key in ("eval_every", "checkpoint_every", "eval_max_items"):
        if getattr(config, key) < 0:
            fail(f"{key} must be >= 0, got {getattr(config, key)}")
    if config.batch_size % config.grad_accum:
        fail(f"grad_accum ({config.grad_accum}) must divide batch_size ({config.batch_size})")
    o = config.optim
    for component, lr in o.component_lr.items():
        if component not in LR_COMPONENTS:
            fail(f"optim.component_lr: unknown component {component!r} (known: {', '.join(LR_COMPONENTS)})")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            fail(f"optim.component_lr.{component} must be a learning rate > 0, got {lr!r}")
    if o.lr <= 0 or not 0 <= o.min_lr_ratio <= 1 or o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
        fail(
            f"optim needs lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0, grad_clip >= 0, weight_decay >= 0; got {o}"
        )
    if not all(0 <= beta < 1 for beta in o.betas) or o.eps < 0:
        fail(f"optim.betas must be in [0, 1) and optim.eps >= 0, got betas={list(o.betas)}, eps={o.eps}")
    if not -SEED_LIMIT <= config.seed <= SEED_LIMIT:
        fail(f"seed must be an integer within +-2**62, got {config.seed}")
    if config.data.num_workers < 0:
        fail(f"data.num_workers must be >= 0, got {config.data.num_workers}")
    lora = config.finetune.lora
    if lora.rank < 0:
        fail(f"finetune.lora.rank must be >= 0, got {lora.rank}")
    if lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        fail(f"finetune.lora needs alpha > 0 and 0 <= dropout < 1, got alpha={lora.alpha}, dropout={lora.dropout}")
