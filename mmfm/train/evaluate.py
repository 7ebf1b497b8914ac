"""Held-out metrics per task, with the standard metrics of `mmfm.eval`; used by training and by `mmfm eval`.

Every metric is reported as `val/<task>/<key>`; `mmfm.eval.report.METRICS` names the metrics and their keys:

- caption: BLEU-1..4, CIDEr-D and ROUGE-L of the greedy caption against all of the example's references (COCO's
  PTB tokenisation, as pycocoevalcap scores them), exact match (the greedy caption equals one of the references
  after stripping surrounding spaces), and token accuracy (teacher-forced argmax predictions that equal the next
  caption token). A task over `[audio]` compares with the audio captions where an example has them, as it trains
  on them.
- classify: top-1 and top-5 accuracy of the trained head, accuracy per class (`accuracy/<class>`) and the
  confusion matrix (kept in `Evaluation.confusion`, for the report's figure).
- contrastive: R@1/5/10 and median rank in both directions over the held-out examples, where a hit is the paired
  item: every reference caption of an example is a text of that example's media item (an image with five
  captions has five texts; a text's only right answer is its own image). `label_r1_...` etc. count a hit when the
  neighbour has the same label instead (digits shares each caption among many images of a digit), on examples that
  all carry labels.
- chat: the greedy reply to each held-out conversation is right (`mmfm.train.chat_eval`), overall and per
  question family.
- every task also reports its held-out loss.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmfm.config import MEDIA_MODALITIES, build_dataclass, quote, read_yaml_mapping
from mmfm.data import Batch, ManifestDataset
from mmfm.errors import ConfigError
from mmfm.eval.captions import caption_metrics
from mmfm.eval.classification import classification_metrics, confusion_matrix
from mmfm.eval.report import CAPTION_GENERATED, METRICS, metric_name
from mmfm.eval.retrieval import label_recall, retrieval_metrics
from mmfm.heads.caption import CaptionObjective, ChatObjective
from mmfm.heads.classify import ClassifyObjective
from mmfm.heads.contrastive import ContrastiveObjective
from mmfm.objective import Objective, media_of
from mmfm.pipelines import caption_tensors, embed
from mmfm.train.chat_eval import reply_metrics
from mmfm.train.config import TaskConfig

RECIPE_NAME = "train_config.yaml"  # what `mmfm train` writes into the run folder


@dataclass
class Evaluation:
    """What `evaluate_tasks` measured.

    Attributes:
        metrics: {"val/<task>/<key>": value}.
        confusion: per classify task, (class names, (C, C) long matrix with the true class as rows).
    """

    metrics: dict[str, float]
    confusion: dict[str, tuple[list[str], Tensor]] = field(default_factory=dict)


def evaluate(
    model, objectives: dict[str, Objective], loader: DataLoader, max_new_tokens: int = 32, seed: int | None = 0
) -> dict[str, float]:
    """Every objective's held-out metrics over the loader's batches: {"val/<task>/<metric>": value}.

    See `evaluate_tasks`, which this calls with every metric and no progress bar.
    """
    return evaluate_tasks(model, objectives, loader, max_new_tokens, seed).metrics


def evaluate_tasks(
    model,
    objectives: dict[str, Objective],
    loader: DataLoader,
    max_new_tokens: int = 32,
    seed: int | None = 0,
    metrics: frozenset[str] | None = None,
    progress: bool = False,
) -> Evaluation:
    """Runs every objective's metrics over the loader's batches (see the module docstring).

    Objectives that draw random numbers (the diffusion noise and timesteps of image_gen) draw them from torch's
    RNG seeded with `seed`, inside `torch.random.fork_rng`: the same model and data give the same metrics every
    time, and the caller's RNG stream (a training run's) is left as it was. `seed=None` uses the RNG as it is.

    Args:
        model: the model, evaluated in eval mode (its mode is restored afterwards).
        objectives: {task name: objective}.
        loader: held-out batches (`mmfm.data.Collator` batches of a `ManifestDataset`).
        max_new_tokens: the longest generated caption or reply.
        seed: see above.
        metrics: the `mmfm.eval.report.METRICS` names to compute and report; None for all. Work that only
            unselected metrics need (generating captions, embedding every reference, the losses) is skipped.
        progress: show a progress bar over the batches.
    """
    wanted = frozenset(METRICS) if metrics is None else metrics
    if seed is None:
        return _evaluate(model, objectives, loader, max_new_tokens, wanted, progress)
    device = torch.device(model.device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        return _evaluate(model, objectives, loader, max_new_tokens, wanted, progress)


class _Collected:
    """What the batches leave for the metrics computed over the whole split."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.captions: dict[str, tuple[list[str], list[list[str]]]] = defaultdict(lambda: ([], []))
        self.logits: dict[str, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
        self.retrieval: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.conversations: dict[str, list[int]] = defaultdict(list)  # chat task -> its conversations' indices

    def add(self, key: str, total: float, count: float) -> None:
        self.sums[key] += total
        self.counts[key] += count


@torch.no_grad()
def _evaluate(model, objectives, loader: DataLoader, max_new_tokens: int, wanted, progress: bool) -> Evaluation:
    was_training = model.training
    model.eval()
    seen = _Collected()
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress):
        batch = batch.to(model.device)
        for name, objective in objectives.items():
            rows = objective.rows(batch)
            if rows.any():
                _collect(model, name, objective, batch, rows, seen, wanted, max_new_tokens)
    out = Evaluation({k: seen.sums[k] / seen.counts[k] for k in seen.sums if seen.counts[k]})
    for name, (predictions, references) in seen.captions.items():
        out.metrics.update({f"{name}/{k}": v for k, v in caption_metrics(predictions, references).items()})
    for name, (logits, labels) in seen.logits.items():
        logits, labels = torch.cat(logits), torch.cat(labels)
        classes = list(model.heads["classify"].labels)
        out.metrics.update({f"{name}/{k}": v for k, v in classification_metrics(logits, labels, classes).items()})
        out.confusion[name] = (classes, confusion_matrix(logits.argmax(-1), labels, len(classes)))
    for name, indices in seen.conversations.items():
        replies, _ = reply_metrics(model, [loader.dataset[i] for i in indices], loader.batch_size, max_new_tokens)
        out.metrics.update({f"{name}/{k}": v for k, v in replies.items()})
    for name, parts in seen.retrieval.items():
        out.metrics.update(_retrieval(model, name, objectives[name].inputs, parts, wanted, loader.batch_size))
    out.metrics = {f"val/{k}": v for k, v in out.metrics.items() if metric_name(k.partition("/")[2]) in wanted}
    model.train(was_training)
    return out


def _collect(model, name: str, objective: Objective, batch: Batch, rows: Tensor, seen, wanted, max_new_tokens):
    if "loss" in wanted:
        seen.add(f"{name}/loss", float(objective.loss_sum(model, batch)), float(objective.units(batch)))
    if isinstance(objective, CaptionObjective):
        media = media_of(batch, objective.inputs, rows)
        if "token_accuracy" in wanted:
            ids, mask = objective.target(batch, rows)
            predicted = model.caption_logits(media, ids, mask)[:, :-1].argmax(-1)
            real = mask[:, 1:]
            seen.add(f"{name}/token_accuracy", float(((predicted == ids[:, 1:]) & real).sum()), float(real.sum()))
        if objective.inputs and wanted & CAPTION_GENERATED:  # a text-only LM has nothing to caption
            predictions, references = seen.captions[name]
            predictions += caption_tensors(model, media, max_new_tokens=max_new_tokens)
            references += objective.references(batch, rows)
    elif isinstance(objective, ClassifyObjective) and wanted & {"top1", "top5", "per_class"}:
        logits, labels = seen.logits[name]
        logits.append(model.classify_logits(media_of(batch, objective.inputs, rows)).float().cpu())
        labels.append(batch.label[rows].cpu())
    elif isinstance(objective, ContrastiveObjective) and wanted & {"recall", "median_rank", "label_recall"}:
        parts = seen.retrieval[name]
        for m in objective.inputs:
            if m == "text":  # every reference caption, embedded once the split is read (see _retrieval)
                parts["captions"] += [refs for refs, keep in zip(batch.captions, rows.tolist()) if keep]
            else:
                parts[m].append(objective.embeddings(model, batch, m, rows).float().cpu())
        parts["label"].append(batch.label[rows].cpu())
    elif isinstance(objective, ChatObjective) and "reply_accuracy" in wanted:
        seen.conversations[name] += batch.index[rows].tolist()


def _retrieval(model, name: str, inputs: list[str], parts: dict[str, list], wanted, batch_size: int) -> dict:
    """Recall@k and median rank where a hit is the paired item, and recall@k where a hit shares the label."""
    labels = torch.cat(parts["label"])
    if "text" in inputs:
        media_name = next(m for m in inputs if m != "text")
        names = (media_name, "text")
        media = torch.cat(parts[media_name])
        texts = [text for refs in parts["captions"] for text in refs]
        owner = torch.tensor([i for i, refs in enumerate(parts["captions"]) for _ in refs])  # (T,)
        unique = sorted(set(texts))  # digits' 1,795 references hold 50 distinct texts: embed each once
        embedded = embed(model, text=unique, batch_size=batch_size).float()
        where = {text: i for i, text in enumerate(unique)}
        text_embeddings = embedded[torch.tensor([where[t] for t in texts])]  # (T, E)
    else:
        names = tuple(inputs)
        media, text_embeddings = (torch.cat(parts[m]) for m in inputs)
        owner = torch.arange(len(media))
    out = {}
    if wanted & {"recall", "median_rank"}:
        out.update(retrieval_metrics(media, text_embeddings, owner, names=names))
    if "label_recall" in wanted and bool((labels >= 0).all()):
        out.update(label_recall(media, text_embeddings, labels, labels[owner], names=names))
    return {f"{name}/{k}": v for k, v in out.items()}


def tasks_for(model, dataset: ManifestDataset, model_dir: Path | None, recipe: str | Path | None) -> list[TaskConfig]:
    """The tasks `mmfm eval` evaluates: from `recipe`, else from the run's recipe beside `model_dir`, else guessed.

    The run's recipe (`train_config.yaml`) is looked for beside `RUN/final` or a checkpoint folder. Without one,
    the tasks follow the model's heads and the fields the manifest has.

    Raises:
        ConfigError: `recipe` is missing or its tasks are not a list of tasks, or nothing in the manifest matches
            a head of the model.
    """
    beside = [model_dir.parent / RECIPE_NAME, model_dir.parent.parent / RECIPE_NAME] if model_dir else []
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
def sample_lines(model, objectives: dict[str, Objective], dataset, collate, count: int) -> list[str]:
    """Printable outputs of the first `count` examples, per caption, classify and chat task."""
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
