"""The checks every metric makes on its inputs, so that bad input fails the same clear way everywhere."""

from __future__ import annotations

from collections.abc import Sequence

from mmfm.errors import InputError


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
