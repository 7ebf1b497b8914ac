"""Classification metrics: top-k accuracy, per-class accuracy, the confusion matrix, zero-shot classifiers.

Every function takes plain tensors (logits, integer labels), so it scores any classifier, not only mmfm's:

```python
metrics = classification_metrics(logits, labels, ["cat", "dog", "bird"])  # {"top1": ..., "accuracy/cat": ...}
weights = zero_shot_weights(lambda texts: model.embed(text=texts), ["cat", "dog"], ["a photo of a {}."])
```

Ties count against the true class: it is in the top k when fewer than k other classes score at least as high,
so constant logits score 0 rather than 1 in top-1 (with untied scores this is the usual "label among the k
largest logits").

`zero_shot_weights` lives in `mmfm.zero_shot`, which `model.classify(labels=...)`
builds its classifier with; it is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmfm.eval.checks import class_indices, cutoffs, matrix
from mmfm.text_generation import whole_number
from mmfm.zero_shot import zero_shot_weights

__all__ = [
    "classification_metrics",
    "confusion_matrix",
    "per_class_accuracy",
    "top_k_accuracy",
    "zero_shot_weights",
]


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
