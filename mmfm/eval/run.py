"""`mmfm eval`: a model's standard metrics on a manifest or a class folder, batched, seeded, with progress.

- A manifest (`mmfm.data.ManifestDataset`): the tasks come from a recipe, the run's own recipe or the model's heads
  and the manifest's fields (`mmfm.train.evaluate.tasks_for`), and each gets its held-out metrics
  (`mmfm.train.evaluate.evaluate_tasks`). An image_gen task whose examples carry labels also generates
  `images_per_class` images per label from the examples' own conditions (their first caption, their sound or
  their image) and scores them: judged accuracy (a judge reads each image; the digits judge is built in),
  diversity within a label, and CLIPScore of the prompt and its image where the model has a contrastive head.
- A class folder (`mmfm.eval.datasets.ClassFolder`): zero-shot classification of every file among the class
  names through the contrastive head's prompt templates (`model.classify(..., labels=...)`): top-1, top-5,
  per-class accuracy and the confusion matrix, as the task `zero_shot`.

`evaluate_data` returns an `EvalRun`: the numbers, the confusion matrices, sample lines, generated images with the
judge's verdicts, and the fingerprints of the model and the data; `mmfm.eval.report` writes it out.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

import mmfm
from mmfm.chat_format import chat_format_of
from mmfm.data import Collator, EpochSampler, ManifestDataset
from mmfm.errors import InputError
from mmfm.eval.classification import classification_metrics, confusion_matrix
from mmfm.eval.datasets import ClassFolder
from mmfm.eval.generation import clip_score, generation_metrics
from mmfm.eval.report import metric_name, parse_metrics
from mmfm.heads.image_gen import ImageGenObjective
from mmfm.pretrained import file_sha256
from mmfm.train.evaluate import Evaluation, evaluate_tasks, sample_lines, tasks_for
from mmfm.train.objectives import build_objective

JUDGES = ("auto", "digits", "none")  # what `judge=` takes by name
GENERATION_METRICS = frozenset({"judged_accuracy", "diversity", "clip_score"})
ZERO_SHOT_TASK = "zero_shot"


@dataclass
class Generated:
    """An image_gen task's generated images, label by label, with the judge's verdict on each.

    Attributes:
        images: the images, up to `images_per_class` per label, labels in sorted order.
        labels: the label each image should show.
        verdicts: whether the judge read each image as its label (None without a judge).
    """

    images: list[Image.Image]
    labels: list[str]
    verdicts: list[bool] | None


@dataclass
class EvalRun:
    """One `mmfm eval`: what was evaluated, how, and every number.

    Attributes:
        model: the model as named (a folder, a file, a preset or a tag).
        data: the manifest or class folder.
        config: the settings: tasks, metrics, batch size, seed, ...
        fingerprints: sha256 of the model's weights and of the data (see `model_fingerprint`, `data_fingerprint`).
        metrics: {"val/<task>/<key>": value}.
        confusion: per classify or zero-shot task, (class names, (C, C) matrix with the true class as rows).
        samples: printable sample outputs.
        generated: per image_gen task, the generated images and the judge's verdicts.
        date: when the evaluation ran (UTC, ISO 8601).
        version: the mmfm version.
    """

    model: str
    data: str
    config: dict[str, Any]
    fingerprints: dict[str, Any]
    metrics: dict[str, float]
    confusion: dict[str, tuple[list[str], Tensor]] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    generated: dict[str, Generated] = field(default_factory=dict)
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    version: str = mmfm.__version__


def evaluate_data(
    model: nn.Module | str | Path,
    data: str | Path,
    *,
    model_name: str | None = None,
    recipe: str | Path | None = None,
    labels: Sequence[str] | None = None,
    metrics: str | Iterable[str] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    samples: int = 0,
    judge: str | Callable[[list[Image.Image]], list] = "auto",
    images_per_class: int = 10,
    progress: bool = False,
) -> EvalRun:
    """Evaluates a model on a manifest or a class folder (see the module docstring).

    Args:
        model: the model, or what `mmfm.load` opens.
        data: a JSONL manifest, or a folder with one folder of images or audio files per class.
        model_name: what the report calls a model passed as a module; a path that exists is also where the run's
            recipe is looked for and what the model's fingerprint hashes (default: the model's config name).
        recipe: take the tasks from this training recipe (manifests only).
        labels: the classes of a class folder, each a folder name (default: every folder with media files).
        metrics: the `mmfm.eval.report.METRICS` names to compute (a comma-separated string or names); None
            for all of them.
        batch_size: examples per forward pass.
        seed: seeds every random draw (diffusion noise, generation): the same model and data give the same
            numbers.
        samples: also collect this many printable sample outputs per task.
        judge: what reads generated images: "digits" (`mmfm.data.judge.DigitsJudge`, fitted on every real
            handwritten digit), "none", "auto" (the digits judge when every label is a digit 0-9), or a callable
            from a list of PIL images to one reading per image, compared with the labels as strings.
        images_per_class: images generated per label for each image_gen task (0: no generation metrics).
        progress: show progress bars on stderr.

    Raises:
        InputError: the data is neither a manifest nor a class folder, `labels` are given for a manifest, a metric
            name is unknown, `judge` is not one of `JUDGES`, or the class folder is unusable
            (`ClassFolder`).
    """
    wanted = parse_metrics(metrics)
    if isinstance(judge, str) and judge not in JUDGES:
        raise InputError(f"judge: unknown judge {judge!r}; choose from {', '.join(JUDGES)}")
    if isinstance(model, str | Path):
        model_name = str(model) if model_name is None else model_name
        model = mmfm.load(model)
    model_name = model.config.name if model_name is None else model_name
    config = {
        "metrics": None if wanted is None else sorted(wanted),
        "batch_size": batch_size,
        "seed": seed,
        "samples": samples,
    }
    model.eval()
    if Path(data).is_dir():
        folder = ClassFolder(data, labels)
        evaluation = _zero_shot(model, folder, wanted, batch_size, progress)
        config["tasks"] = [{"name": ZERO_SHOT_TASK, "objective": "zero_shot", "inputs": [folder.modality]}]
        config["classes"] = folder.classes
        return EvalRun(
            model_name,
            str(data),
            config,
            {**model_fingerprint(model, model_name), **data_fingerprint(Path(data), map(Path, folder.paths()))},
            evaluation.metrics,
            evaluation.confusion,
        )
    if labels is not None:
        raise InputError(f"--labels: {data} is a manifest; labels name the classes of a class folder (DIR/<class>/)")
    dataset = ManifestDataset(data, chat_format=chat_format_of(model))
    tasks = tasks_for(model, dataset, Path(model_name) if Path(model_name).exists() else None, recipe)
    objectives = {t.name: build_objective(t, model) for t in tasks}
    collate = Collator.from_model(model)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed=0, shuffle=False),
        collate_fn=collate,
    )
    evaluation = evaluate_tasks(model, objectives, loader, seed=seed, metrics=wanted, progress=progress)
    config["tasks"] = [{"name": t.name, "objective": t.objective, "inputs": list(t.inputs)} for t in tasks]
    run = EvalRun(
        model_name,
        str(data),
        config,
        {**model_fingerprint(model, model_name), **data_fingerprint(Path(data), _media_of(dataset))},
        evaluation.metrics,
        evaluation.confusion,
        sample_lines(model, objectives, dataset, collate, samples) if samples else [],
    )
    generating = [t for t in tasks if isinstance(objectives[t.name], ImageGenObjective)]
    if generating and images_per_class and (wanted is None or wanted & GENERATION_METRICS):
        by_label = _by_label(dataset)
        reader = _judge(judge, by_label)
        config |= {"judge": _judge_name(judge, reader), "images_per_class": images_per_class}
        for task in generating:
            numbers, generated = _generation(
                model, task.inputs[0], by_label, reader, images_per_class, seed, batch_size, progress
            )
            run.metrics |= {f"val/{task.name}/{k}": v for k, v in numbers.items() if wanted is None or k in wanted}
            if generated is not None:
                run.generated[task.name] = generated
    return run


def _zero_shot(model, folder: ClassFolder, wanted, batch_size: int, progress: bool) -> Evaluation:
    """Top-1/top-5, per-class accuracy and the confusion matrix of zero-shot classification of a class folder."""
    result = model.classify(
        **{"images" if folder.modality == "image" else "audio": folder.paths()},
        labels=folder.classes,
        batch_size=batch_size,
        progress=progress,
    )
    targets = torch.tensor(folder.targets())
    numbers = classification_metrics(result.probs, targets, folder.classes)  # probabilities rank as the logits do
    metrics = {f"val/{ZERO_SHOT_TASK}/{k}": v for k, v in numbers.items() if wanted is None or metric_name(k) in wanted}
    confusion = {}
    if wanted is None or "per_class" in wanted:
        matrix = confusion_matrix(result.probs.argmax(-1), targets, len(folder.classes))
        confusion[ZERO_SHOT_TASK] = (folder.classes, matrix)
    return Evaluation(metrics, confusion)


def _by_label(dataset: ManifestDataset) -> dict[str, list[dict]]:
    """The examples that carry a label, grouped by label (labels sorted, examples in manifest order)."""
    groups: dict[str, list[dict]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        if "label" in item:
            groups.setdefault(item["label"], []).append(item)
    return dict(sorted(groups.items()))


def _judge(judge, by_label: dict[str, list[dict]]) -> Callable[[list[Image.Image]], list] | None:
    if callable(judge):
        return judge
    digits = bool(by_label) and all(label in {str(d) for d in range(10)} for label in by_label)
    if judge == "digits" or (judge == "auto" and digits):
        from mmfm.data.judge import DigitsJudge

        return DigitsJudge()
    return None


def _judge_name(judge, reader) -> str:
    if reader is None:
        return "none"
    return "digits" if isinstance(judge, str) else getattr(judge, "__name__", type(judge).__name__)


def _generation(
    model,
    source: str,
    by_label: dict[str, list[dict]],
    judge,
    per_class: int,
    seed: int,
    batch_size: int,
    progress: bool,
) -> tuple[dict[str, float], Generated | None]:
    """Generates `per_class` images per label from the first examples' conditions and scores them.

    Returns:
        {metric: value} (judged_accuracy with a judge, diversity where a label has two images or more, clip_score
        for text prompts and a model with a contrastive head), and the images (None when no labelled example has
        the condition).
    """
    key = {"text": "captions", "audio": "audio", "image": "image"}[source]
    chosen = {label: [item for item in items if key in item][:per_class] for label, items in by_label.items()}
    chosen = {label: items for label, items in chosen.items() if items}
    if not chosen:
        return {}, None
    labels = [label for label, items in chosen.items() for _ in items]
    conditions = [item[key][0] if key == "captions" else item[key] for items in chosen.values() for item in items]
    argument = {"text": "text", "audio": "audio", "image": "images"}[source]
    images = model.generate_image(
        **{argument: conditions}, seed=seed, batch_size=batch_size, progress=progress
    )  # one image per condition
    metrics, verdicts = generation_metrics(images, labels, judge)
    if source == "text" and "contrastive" in model.heads:
        image_embeddings = model.embed(images=images, batch_size=batch_size)
        text_embeddings = model.embed(text=conditions, batch_size=batch_size)
        metrics["clip_score"] = clip_score(image_embeddings.float(), text_embeddings.float())
    return metrics, Generated(images, labels, verdicts)


def _media_of(dataset: ManifestDataset) -> list[Path]:
    """Every media file the manifest names, in order of appearance, each once."""
    paths: dict[str, None] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        for m in ("image", "audio"):
            if m in item:
                paths[item[m]] = None
        for values in item.get("media", {}).values():
            paths.update(dict.fromkeys(values))
    return [Path(p) for p in paths]


def model_fingerprint(model: nn.Module, source: str | Path | None = None) -> dict[str, Any]:
    """sha256 of a model's weight files when `source` is a folder or file that exists, else of its state dict.

    Returns:
        {"model_sha256": hex digest, "model_hashed": "files" or "state_dict", "model_files": count of files}.
    """
    path = Path(source) if source is not None else None
    if path is not None and path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        weights = [p for p in files if p.suffix in (".safetensors", ".gguf", ".bin", ".pt", ".pth")] or files
        root = path if path.is_dir() else path.parent
        return {"model_sha256": _hash_files(weights, root), "model_hashed": "files", "model_files": len(weights)}
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"model_sha256": digest.hexdigest(), "model_hashed": "state_dict", "model_files": 0}


def data_fingerprint(data: Path, media: Iterable[Path]) -> dict[str, Any]:
    """sha256 over the manifest (if `data` is a file) and every media file, each named relative to its folder.

    The digest covers names and contents, so renaming, editing, adding or dropping a file changes it, while the
    same data in another place hashes the same.
    """
    root = data if data.is_dir() else data.parent
    files = ([] if data.is_dir() else [data]) + list(media)
    return {"data_sha256": _hash_files(files, root), "data_files": len(files)}


def _hash_files(files: Sequence[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{os.path.relpath(path, root)} {file_sha256(path)}\n".encode())
    return digest.hexdigest()
