"""Held-out metrics per task: caption exact match and token accuracy, classification accuracy, retrieval R@1.

- caption exact match: the greedy caption equals one of the example's reference captions (after stripping
  surrounding spaces; a task over `[audio]` compares with the audio captions where an example has them, as it
  trains on them); token accuracy: teacher-forced argmax predictions that equal the next caption token.
- classification accuracy: the trained head's top class is the example's label.
- retrieval R@1, both directions: the nearest neighbour (by embedding dot product) among the held-out
  examples is a match - the same example, or, when examples carry labels, any example with the same label
  (digits has ten captions shared by many images, so "the same label" is what a correct retrieval means).
- chat: the greedy reply to each held-out conversation is right (`mmfm.train.chat_eval`), overall and per
  question family.
- every task also reports its held-out loss.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mmfm.chat_format import chat_format_of
from mmfm.config import MEDIA_MODALITIES, build_dataclass, quote, read_yaml_mapping
from mmfm.data import Batch, Collator, EpochSampler, ManifestDataset
from mmfm.errors import ConfigError, InputError
from mmfm.heads.caption import CaptionObjective, ChatObjective
from mmfm.heads.classify import ClassifyObjective
from mmfm.heads.contrastive import ContrastiveObjective
from mmfm.objective import Objective, media_of
from mmfm.pipelines import caption_tensors
from mmfm.train.chat_eval import reply_metrics
from mmfm.train.config import TaskConfig
from mmfm.train.objectives import build_objective

RECIPE_NAME = "train_config.yaml"  # what `mmfm train` writes into the run folder


def evaluate(
    model, objectives: dict[str, Objective], loader: DataLoader, max_new_tokens: int = 32, seed: int | None = 0
) -> dict[str, float]:
    """Runs every objective's metrics over the loader's batches; returns {"val/<task>/<metric>": value}.

    Objectives that draw random numbers (the diffusion noise and timesteps of image_gen) draw them from torch's
    RNG seeded with `seed`, inside `torch.random.fork_rng`: the same model and data give the same metrics every
    time, and the caller's RNG stream (a training run's) is left as it was. `seed=None` uses the RNG as it is.
    """
    if seed is None:
        return _evaluate(model, objectives, loader, max_new_tokens)
    device = torch.device(model.device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        return _evaluate(model, objectives, loader, max_new_tokens)


@torch.no_grad()
def _evaluate(model, objectives: dict[str, Objective], loader: DataLoader, max_new_tokens: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    retrieval: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    conversations: dict[str, list[int]] = defaultdict(list)  # chat task -> dataset indices of its conversations
    for batch in loader:
        batch = batch.to(model.device)
        for name, objective in objectives.items():
            rows = objective.rows(batch)
            if not rows.any():
                continue
            units = objective.units(batch)
            sums[f"{name}/loss"] += float(objective.loss_sum(model, batch))
            counts[f"{name}/loss"] += float(units)
            if isinstance(objective, CaptionObjective):
                _caption_metrics(model, objective, batch, rows, name, sums, counts, max_new_tokens)
            elif isinstance(objective, ClassifyObjective):
                logits = model.classify_logits(media_of(batch, objective.inputs, rows))
                sums[f"{name}/accuracy"] += float((logits.argmax(-1) == batch.label[rows]).sum())
                counts[f"{name}/accuracy"] += float(rows.sum())
            elif isinstance(objective, ContrastiveObjective):
                for m in objective.inputs:
                    retrieval[name][m].append(objective.embeddings(model, batch, m, rows).float().cpu())
                retrieval[name]["key"].append(_match_keys(batch, rows).cpu())
            elif isinstance(objective, ChatObjective):
                conversations[name] += batch.index[rows].tolist()
    metrics = {f"val/{k}": sums[k] / counts[k] for k in sums if counts[k]}
    for name, indices in conversations.items():
        replies, _ = reply_metrics(model, [loader.dataset[i] for i in indices], loader.batch_size, max_new_tokens)
        metrics.update({f"val/{name}/{k}": v for k, v in replies.items()})
    for name, parts in retrieval.items():
        a_name, b_name = objectives[name].inputs
        metrics.update(_recall_at_1(name, a_name, b_name, parts))
    model.train(was_training)
    return metrics


def _caption_metrics(model, objective, batch: Batch, rows, name, sums, counts, max_new_tokens: int) -> None:
    ids, mask = objective.target(batch, rows)
    media = media_of(batch, objective.inputs, rows)
    predicted = model.caption_logits(media, ids, mask)[:, :-1].argmax(-1)
    real = mask[:, 1:]
    sums[f"{name}/token_accuracy"] += float(((predicted == ids[:, 1:]) & real).sum())
    counts[f"{name}/token_accuracy"] += float(real.sum())
    if not objective.inputs:  # a text-only LM has nothing to caption
        return
    generated = caption_tensors(model, media, max_new_tokens=max_new_tokens)
    references = objective.references(batch, rows)
    sums[f"{name}/exact_match"] += sum(g.strip() in [r.strip() for r in refs] for g, refs in zip(generated, references))
    counts[f"{name}/exact_match"] += len(generated)


def _match_keys(batch: Batch, rows) -> torch.Tensor:
    """Labels where every row has one (a retrieval is right if the labels agree), else the example index."""
    labels = batch.label[rows]
    return labels if bool((labels >= 0).all()) else -1 - batch.index[rows]


def _recall_at_1(name: str, a_name: str, b_name: str, parts: dict[str, list]) -> dict[str, float]:
    a, b, keys = torch.cat(parts[a_name]), torch.cat(parts[b_name]), torch.cat(parts["key"])
    sims = a @ b.T
    a_to_b = (keys[sims.argmax(dim=1)] == keys).float().mean()
    b_to_a = (keys[sims.argmax(dim=0)] == keys).float().mean()
    return {f"val/{name}/r1_{a_name}_to_{b_name}": float(a_to_b), f"val/{name}/r1_{b_name}_to_{a_name}": float(b_to_a)}


def evaluate_manifest(
    model_dir: str | Path,
    manifest: str | Path,
    recipe: str | Path | None = None,
    batch_size: int = 64,
    samples: int = 0,
    *,
    model: torch.nn.Module | None = None,
    out: str | Path | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], list[str]]:
    """`mmfm eval`: computes every task's metrics of a model on a manifest.

    Tasks come from `recipe`, else from the run folder's `train_config.yaml` (found beside `RUN/final` or a
    checkpoint), else from the model's heads and the fields the manifest has. Returns the metrics and up
    to `samples` example outputs per caption and classification task, as printable lines.

    Args:
        model_dir: the saved model (`mmfm.load`), and where its run's recipe is looked for.
        model: the model itself when the caller opened it already (a preset, a tag, ...); `model_dir` then
            only names it, and a recipe is looked for beside it only when it is a path that exists.
        out: also write the metrics there as JSON. Checked before anything is computed (its folder is
            created; a folder in its place or an unwritable folder is an error), then written atomically, so
            metrics are never lost to a bad path and an earlier file is never left half-written.
        seed: seeds the random draws of the objectives that make them (`evaluate`): the same model and
            manifest give the same metrics every time.

    Raises:
        InputError: `out` cannot be written.
    """
    from mmfm.loader import load

    out_path = prepare_output(out) if out is not None else None
    model = load(model_dir) if model is None else model
    dataset = ManifestDataset(manifest, chat_format=chat_format_of(model))
    tasks = _tasks_for(model, dataset, Path(model_dir), recipe)
    objectives = {t.name: build_objective(t, model) for t in tasks}
    collate = Collator.from_model(model)
    sampler = EpochSampler(len(dataset), seed=0, shuffle=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    metrics = evaluate(model, objectives, loader, seed=seed)
    if out_path is not None:
        write_json_atomically(out_path, metrics)
    return metrics, _samples(model, objectives, dataset, collate, samples) if samples else []


def prepare_output(out: str | Path, name: str = "out") -> Path:
    """The path `out` as a file that can be written: its folder is created, what stands in its way refused.

    Args:
        out: the file the metrics go to.
        name: what errors call it (the CLI says "--out").

    Raises:
        InputError: `out` is a folder (or not a regular file), a file stands where a folder of its path
            should be, or the folder cannot be written; the message names `out` and the reason.
    """
    path = Path(out)
    where = f"{name} {out}: cannot write the metrics"
    try:
        if path.is_dir() or (path.exists() and not path.is_file()):
            raise InputError(f"{where} ({'it is a folder; name a file' if path.is_dir() else 'not a regular file'})")
        path.parent.mkdir(parents=True, exist_ok=True)
    except InputError:
        raise
    except (OSError, ValueError) as e:  # a file in place of a folder, no permission, a name too long, a NUL
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else getattr(e, "strerror", None) or e
        raise InputError(f"{where} ({reason})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{where} (the folder {path.parent} is not writable)")
    return path


def write_json_atomically(path: Path, data: dict) -> None:
    """Writes `data` as JSON to a temporary file beside `path`, then renames it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"out {path}: cannot write the metrics ({e.strerror or e})") from None


def _tasks_for(model, dataset: ManifestDataset, model_dir: Path, recipe) -> list[TaskConfig]:
    beside = [model_dir.parent / RECIPE_NAME, model_dir.parent.parent / RECIPE_NAME] if model_dir.exists() else []
    for candidate in [Path(recipe)] if recipe else beside:
        if candidate.exists():
            tasks = read_yaml_mapping(candidate, "training recipe").get("tasks", [])
            if not isinstance(tasks, list):
                raise ConfigError(f"{candidate}: 'tasks' must be a list of tasks, got {quote(tasks)}")
            return [build_dataclass(TaskConfig, t, str(candidate), f"tasks[{i}].") for i, t in enumerate(tasks)]
        if recipe:
            raise ConfigError(f"{candidate}: training recipe not found")
    fields = {key for i in range(len(dataset)) for key in dataset[i]}
    media = [m for m in MEDIA_MODALITIES if m in fields and m in model.encoders]
    tasks = []
    if "caption" in model.heads and "messages" in fields:
        tasks.append(TaskConfig("chat", "chat", []))
    if "caption" in model.heads:
        tasks += [
            TaskConfig(f"{m}_caption", "caption", [m])
            for m in media
            if "caption" in fields or (m == "audio" and "audio_caption" in fields)  # see CaptionObjective
        ]
    if "classify" in model.heads and "label" in fields and media:
        tasks.append(TaskConfig(f"{media[0]}_classify", "classify", [media[0]]))
    if "contrastive" in model.heads and "caption" in fields:
        tasks += [TaskConfig(f"{m}_text", "contrastive", [m, "text"]) for m in media]
    if not tasks:
        raise ConfigError(f"{dataset.path}: nothing to evaluate: no manifest field matches a head of the model")
    return tasks


@torch.no_grad()
def _samples(model, objectives, dataset, collate, count: int) -> list[str]:
    model.eval()
    batch = collate([dataset[i] for i in range(min(count, len(dataset)))]).to(model.device)
    lines = []
    for name, objective in objectives.items():
        rows = objective.rows(batch)
        if isinstance(objective, ChatObjective):
            items = [dataset[int(i)] for i in batch.index[rows]]
            _, records = reply_metrics(model, items) if items else ({}, [])
            lines += [
                f"{name} [{r['family']}]: {r['question']!r} -> {r['reply']!r} "
                f"({'right' if r['correct'] else 'wrong; expected ' + repr(r['reference'])})"
                for r in records
            ]
        if isinstance(objective, CaptionObjective) and objective.inputs:
            (m,) = objective.inputs[:1]
            texts = caption_tensors(model, media_of(batch, objective.inputs, rows))
            sources = [dataset[int(i)][m] for i in batch.index[rows]]
            lines += [f"{name}: {Path(src).name} -> {text!r}" for src, text in zip(sources, texts)]
        elif isinstance(objective, ClassifyObjective):
            probs = model.heads["classify"].probabilities(
                model.classify_logits(media_of(batch, objective.inputs, rows))
            )
            labels = model.heads["classify"].labels
            sources = [dataset[int(i)][objective.inputs[0]] for i in batch.index[rows]]
            lines += [
                f"{name}: {Path(s).name} -> {labels[int(p.argmax())]} ({float(p.max()):.2f})"
                for s, p in zip(sources, probs)
            ]
    return lines
