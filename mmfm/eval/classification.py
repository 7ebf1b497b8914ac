"""Classification metrics: top-k accuracy, per-class accuracy, the confusion matrix, zero-shot classifiers.

Every function takes plain tensors (logits, integer labels), so it scores any classifier, not only mmfm's:

```python
metrics = classification_metrics(logits, labels, ["cat", "dog", "bird"])  # {"top1": ..., "accuracy/cat": ...}
weights = zero_shot_weights(lambda texts: model.embed(text=texts), ["cat", "dog"], ["a photo of a {}."])
```

Ties count against the true class: it is in the top k when fewer than k other classes score at least as high,
so constant logits score 0 rather than 1 in top-1 (with untied scores this is the usual "label among the k
largest logits").

The tensor checks here (`matrix`, `class_indices`, `cutoffs`) are shared by the other metric modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mmfm.errors import InputError
from mmfm.text_generation import whole_number


def matrix(name: str, values: Tensor, rows: int | None = None, columns: int | None = None) -> Tensor:
    """`values` as a (rows, columns) float tensor with finite entries; else InputError naming `name`.

    Args:
        name: what errors call it.
        values: a 2-D tensor (or anything `torch.as_tensor` takes).
        rows: the number of rows it must have; None takes any number but 0.
        columns: the number of columns it must have; None takes any number but 0.
    """
    values = torch.as_tensor(values)
    if values.dim() != 2:
        raise InputError(f"{name} must be a 2-D (rows, columns) tensor, got shape {tuple(values.shape)}")
    wanted = (rows, columns)
    if any(n == 0 for n in values.shape) or any(w is not None and w != n for w, n in zip(wanted, values.shape)):
        shown = tuple("any" if w is None else w for w in wanted)
        raise InputError(f"{name} must have shape {shown} (nothing empty), got {tuple(values.shape)}")
    if values.is_complex() or values.dtype == torch.bool:
        raise InputError(f"{name} must hold real numbers, got dtype {values.dtype}")
    values = values.detach().float() if not values.is_floating_point() else values.detach()
    if not bool(values.isfinite().all()):
        raise InputError(f"{name} holds non-finite values (NaN or inf) in row {_first_bad_row(values)}")
    return values


def _first_bad_row(values: Tensor) -> int:
    return int((~values.isfinite()).any(dim=1).nonzero()[0])


def class_indices(
    name: str, values: Tensor | Sequence[int], num_classes: int, length: int | None = None, what: str = "classes"
) -> Tensor:
    """`values` as a 1-D LongTensor of class indices in [0, num_classes); else InputError naming `name`.

    Args:
        name: what errors call it.
        values: integer class indices.
        num_classes: how many classes there are.
        length: how many indices there must be; None takes any number but 0.
        what: what errors call the things indexed.
    """
    values = torch.as_tensor(values)
    if values.dim() != 1 or not len(values):
        raise InputError(f"{name} must be a non-empty 1-D tensor of indices, got shape {tuple(values.shape)}")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise InputError(f"{name} must hold integer indices, got dtype {values.dtype}")
    if length is not None and len(values) != length:
        raise InputError(f"{name} holds {len(values)} indices, but {length} items are scored: one each is needed")
    outside = ((values < 0) | (values >= num_classes)).nonzero()
    if len(outside):
        i = int(outside[0])
        raise InputError(f"{name}[{i}] is {int(values[i])}, outside the {num_classes} {what} [0, {num_classes - 1}]")
    return values.long()


def cutoffs(ks: Sequence[int], name: str = "ks") -> tuple[int, ...]:
    """The distinct cut-offs k of "top k" / "recall at k", ascending; each a whole number >= 1, else InputError."""
    if isinstance(ks, int) or not len(ks):
        raise InputError(f"{name} must be a non-empty list of whole numbers >= 1, got {ks!r}")
    return tuple(sorted({whole_number(f"{name}[{i}]", k, 1) for i, k in enumerate(ks)}))


def top_k_accuracy(logits: Tensor, labels: Tensor | Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """The fraction of items whose true class is among the k best-scored, for each k that does not exceed C.

    Args:
        logits: (N, C) scores (logits, probabilities, similarities: only their order counts).
        labels: (N,) the true class of each item.
        ks: the cut-offs; a k above the number of classes is left out (it would always be 1).

    Returns:
        {"top1": ..., "top5": ...}.
    """
    logits = matrix("logits", logits)
    labels = class_indices("labels", labels, logits.shape[1], len(logits))
    ks = cutoffs(ks)
    true = logits.gather(1, labels[:, None])  # (N, 1)
    ahead = (logits >= true).sum(dim=1) - 1  # other classes at least as high: ties count against the label
    return {f"top{k}": float((ahead < k).float().mean()) for k in ks if k <= logits.shape[1]}


def confusion_matrix(predicted: Tensor | Sequence[int], labels: Tensor | Sequence[int], num_classes: int) -> Tensor:
    """(C, C) counts: entry [i, j] is how many items of true class i were predicted as class j.

    Args:
        predicted: (N,) predicted class indices (e.g. `logits.argmax(-1)`).
        labels: (N,) true class indices.
        num_classes: C.
    """
    num_classes = whole_number("num_classes", num_classes, 1)
    labels = class_indices("labels", labels, num_classes)
    predicted = class_indices("predicted", predicted, num_classes, len(labels))
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_accuracy(
    predicted: Tensor | Sequence[int], labels: Tensor | Sequence[int], class_names: Sequence[str]
) -> dict[str, float]:
    """The accuracy over each class's items, {class name: accuracy}, for the classes that have items.

    Args:
        predicted: (N,) predicted class indices.
        labels: (N,) true class indices.
        class_names: the name of every class, in index order.
    """
    counts = confusion_matrix(predicted, labels, len(class_names))
    totals = counts.sum(dim=1)
    return {name: float(counts[i, i] / totals[i]) for i, name in enumerate(class_names) if totals[i]}


def classification_metrics(
    logits: Tensor, labels: Tensor | Sequence[int], class_names: Sequence[str], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracies and per-class accuracy of the best-scored class: {"top1", "top5", "accuracy/<class>"}.

    Args:
        logits: (N, C) scores.
        labels: (N,) the true class of each item.
        class_names: the C class names, in column order.
        ks: the top-k cut-offs (those above C are left out).
    """
    logits = matrix("logits", logits, columns=len(class_names))
    metrics = top_k_accuracy(logits, labels, ks)
    per_class = per_class_accuracy(logits.argmax(dim=1), labels, class_names)
    return metrics | {f"accuracy/{name}": value for name, value in per_class.items()}


def zero_shot_weights(
    embed_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
) -> Tensor:
    """(C, E) zero-shot classifier weights by template ensembling, as open_clip builds them.

    Every class name is written into every template; each prompt's text embedding is normalised, the
    embeddings of one class are averaged, and the average is normalised again. Scores of an item are then
    the dot products of its unit embedding with these rows.

    Args:
        embed_text: texts -> (len(texts), E) embeddings, e.g. `lambda texts: model.embed(text=texts)`.
        class_names: the C classes.
        templates: prompts with a "{}" where the class name goes (e.g. "a photo of a {}."), or functions
            from a class name to a prompt.

    Raises:
        InputError: no classes, no templates, a string template without "{}", or embeddings of the wrong shape.
    """
    if not len(class_names):
        raise InputError("class_names is empty: zero-shot classification needs at least one class")
    if not len(templates):
        raise InputError("templates is empty: zero-shot classification needs at least one prompt template")
    for i, template in enumerate(templates):
        if isinstance(template, str) and "{}" not in template:
            raise InputError(f'templates[{i}] {template!r} has no "{{}}" for the class name')
        if not isinstance(template, str) and not callable(template):
            raise InputError(f"templates[{i}] must be a string or a function, got {type(template).__name__}")
    prompts = [t.format(c) if isinstance(t, str) else t(c) for c in class_names for t in templates]
    embeddings = matrix("the text embeddings", embed_text(prompts), rows=len(prompts))  # (C * T, E)
    embeddings = torch.nn.functional.normalize(embeddings, dim=-1).view(len(class_names), len(templates), -1)
    return torch.nn.functional.normalize(embeddings.mean(dim=1), dim=-1)
