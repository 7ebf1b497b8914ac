"""A memo of forward passes, so that tasks reading the same inputs within one training step share one pass.

In one step the image classifier and the image side of InfoNCE encode the same images through the same backbone;
the audio classifier and audio-to-image generation read the same audio states; InfoNCE's text side and
text-to-image generation read the same caption states. `MultimodalModel.reusing_passes()` turns the memo on for a
block: a pass whose inputs equal (in value, shape and dtype) those of a pass already made in the block returns
that pass's output, graph included, so the summed loss back-propagates through it once with every task's
gradient. Inputs are compared by value, so any two calls that build the same tensors hit, however they were built.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import Tensor


class PassCache:
    """Outputs of earlier passes, looked up by what kind of pass it was and its input tensors."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, list[tuple[tuple[Tensor, ...], Tensor]]] = {}
        self.hits = 0

    def get_or_compute(self, kind: Hashable, inputs: tuple[Tensor, ...], compute: Callable[[], Tensor]) -> Tensor:
        """The output of an earlier `kind` pass over equal `inputs`, else `compute()` (remembered for later)."""
        entries = self._entries.setdefault(kind, [])
        for seen, output in entries:
            if all(_same(a, b) for a, b in zip(seen, inputs, strict=True)):
                self.hits += 1
                return output
        output = compute()
        entries.append((inputs, output))
        return output


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
