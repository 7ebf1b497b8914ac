"""Multi-label metrics: average precision per class and its macro mean (mAP), as tagging is reported.

A class's average precision ranks the items by their score for it and averages the precision at each
threshold, weighted by the recall it adds: AP = sum_n (R_n - R_{n-1}) P_n over the distinct scores, so items
with equal scores enter together (scikit-learn's `average_precision_score`, without interpolation).

AP needs a positive example: a class no item has is an error that names it, unless `skip_empty=True`, which
leaves it out (NaN in `average_precision`, out of the mean in `mean_average_precision`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmfm.errors import InputError
from mmfm.eval.checks import matrix


def average_precision(
    scores: Tensor, targets: Tensor, class_names: Sequence[str] | None = None, skip_empty: bool = False
) -> Tensor:
    """(C,) average precision of every class (column).

    Args:
        scores: (N, C) scores; higher means more likely (logits, probabilities: only their order counts).
        targets: (N, C) 1 where the item has the class, else 0 (bools or numbers).
        class_names: the C class names, for errors; None calls classes by their column.
        skip_empty: give NaN for a class without positive items instead of raising.

    Raises:
        InputError: shapes that differ or are not 2-D, non-finite scores, targets other than 0/1, or (unless
            `skip_empty`) a class with no positive item.
    """
    scores = matrix("scores", scores)
    targets = _targets(targets, scores.shape, class_names)
    positives = targets.sum(dim=0)  # (C,)
    if not bool(positives.any()):
        raise InputError("targets has no positive item at all: average precision needs one per class")
    if not skip_empty and not bool(positives.all()):
        c = int((positives == 0).nonzero()[0])
        raise InputError(
            f"{_class(c, class_names)} has no positive item in targets: its average precision is undefined "
            "(pass skip_empty=True to leave such classes out)"
        )
    order = scores.argsort(dim=0, descending=True, stable=True)
    ranked, hits = scores.gather(0, order), targets.gather(0, order)  # (N, C), best first
    n = len(scores)
    # the last row of each group of equal scores, for every row: items that tie are counted together
    last = torch.ones_like(ranked, dtype=torch.bool)
    last[:-1] = ranked[:-1] != ranked[1:]
    index = torch.arange(n, device=scores.device)[:, None].expand_as(ranked)
    end = torch.where(last, index, n).flip(0).cummin(dim=0).values.flip(0)
    precision = hits.cumsum(dim=0) / (index + 1)  # precision after each row
    # each positive adds 1/P recall at the precision of its tie group's end
    ap = (hits * precision.gather(0, end)).sum(dim=0) / positives
    return torch.where(positives > 0, ap, float("nan"))


def mean_average_precision(
    scores: Tensor, targets: Tensor, class_names: Sequence[str] | None = None, skip_empty: bool = False
) -> float:
    """mAP: the mean over classes (macro) of their average precision; see `average_precision`."""
    return float(average_precision(scores, targets, class_names, skip_empty).nanmean())


def multilabel_metrics(
    scores: Tensor, targets: Tensor, class_names: Sequence[str], skip_empty: bool = False
) -> dict[str, float]:
    """{"map": mAP, "ap/<class>": its AP} (classes without positives are left out with `skip_empty`)."""
    scores = matrix("scores", scores, columns=len(class_names))
    per_class = average_precision(scores, targets, class_names, skip_empty)
    kept = {f"ap/{name}": float(ap) for name, ap in zip(class_names, per_class) if not ap.isnan()}
    return {"map": float(per_class.nanmean())} | kept


def _targets(targets: Tensor, shape: torch.Size, class_names: Sequence[str] | None) -> Tensor:
    targets = torch.as_tensor(targets)
    if targets.shape != shape:
        raise InputError(f"targets must have the shape of scores {tuple(shape)}, got {tuple(targets.shape)}")
    if class_names is not None and len(class_names) != shape[1]:
        raise InputError(f"class_names names {len(class_names)} classes, but scores have {shape[1]} columns")
    bad = ((targets != 0) & (targets != 1)).nonzero()
    if len(bad):
        row, c = bad[0].tolist()
        raise InputError(
            f"targets[{row}, {c}] ({_class(c, class_names)}) is {targets[row, c].item()}: targets are 0 or 1"
        )
    return targets.to(torch.float64)


def _class(column: int, class_names: Sequence[str] | None) -> str:
    return f"class {column}" if class_names is None else f"class {column} ({class_names[column]!r})"
