"""The checks every metric makes on its inputs (lists of texts, score matrices, class indices, cut-offs k), so that
bad input fails the same clear way everywhere."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmfm.errors import InputError
from mmfm.text_generation import whole_number


def check_lengths(predictions: Sequence, references: Sequence, names: tuple[str, str] = ("predictions", "references")):
    """Raises InputError unless both are non-empty and of one length (each prediction needs its reference)."""
    first, second = names
    if len(predictions) != len(references):
        raise InputError(
            f"{first} and {second} differ in length: {len(predictions)} {first}, {len(references)} {second} "
            f"(each of the {first} needs its {second})"
        )
    if not len(predictions):
        raise InputError(f"no {first}: nothing to score")


def reference_lists(references: Sequence[str | Sequence[str]], name: str = "references") -> list[list[str]]:
    """Each item's references as a list of strings (a lone string is one reference).

    Raises:
        InputError: an item has no references, or one that is not a string; the message names its index.
    """
    lists = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise InputError(f"{name}[{i}] is empty: every item needs at least one reference")
        for ref in refs:
            if not isinstance(ref, str):
                raise InputError(f"{name}[{i}] holds {type(ref).__name__} {ref!r}: references are strings")
        lists.append(refs)
    return lists


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
