"""The interface every text tokenizer implements: framing as `[BOS, tokens..., EOS]`, truncation, padding, decoding.

Subclasses (`mmfm.encoders.tokenizers`, `mmfm.encoders.hf_tokenizer`) only map text to ids and back.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mmfm.errors import InputError


def check_unicode(text: str, what: str) -> None:
    """Raises InputError naming `what` when `text` holds a lone surrogate: such a str is not Unicode text, cannot
    be written as UTF-8, and would crash tokenizing (it comes from bytes decoded with errors="surrogateescape" or
    from JSON's "\\ud800")."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{what} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), which is not "
            "Unicode text; decode its bytes with errors='replace'"
        ) from None


class Tokenizer:
    """Shared framing, truncation, padding and decoding; subclasses only map text to ids and back.

    Attributes:
        vocab_size: number of ids, special ids included; the text embedding has this many rows.
        pad_id: id that fills padding positions.
        bos_id: id that starts every text.
        eos_id: id that ends every text (unless `add_eos=False`).
    """

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    # True when pad_id is also an ordinary token (CLIP pads with 0, which is "!"), so decode can only
    # recognise padding by where it sits, not by its id.
    pad_is_token: bool = False

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """The ids of `text`, without BOS or EOS.

        Args:
            text: the text.
            max_tokens: return only the first this many ids; the work done is then bounded by what is kept, not by
                the length of `text` (beyond a linear pass over it), which is how `__call__` truncates.

        Raises:
            InputError: `text` holds a lone surrogate (`check_unicode`).
        """
        raise NotImplementedError

    def _decode_tokens(self, ids: list[int]) -> str:
        """The text of ordinary (non-special) ids."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Turns ids back into text.

        Decoding stops at the first EOS, so generated ids and right-padded rows need no trimming. BOS is
        skipped, and so is PAD; where PAD is also an ordinary token (`pad_is_token`), only the left padding
        before BOS is skipped, and a right-padded row without EOS decodes its padding as text (use the mask).

        Args:
            ids: a list of ids or a 1-D tensor, e.g. one row of `__call__`'s output or of generated ids.

        Returns:
            The decoded text.

        Raises:
            InputError: `ids` is a tensor that is not 1-D, or holds something other than ids in
                [0, vocab_size).
        """
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise InputError(f"decode takes one sequence of ids (a 1-D tensor), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < self.vocab_size:
                raise InputError(f"decode: token ids must be whole numbers in [0, {self.vocab_size}), got {i!r}")
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        if self.pad_is_token:
            if self.bos_id in ids:
                ids = ids[ids.index(self.bos_id) :]
            skipped = {self.bos_id}
        else:
            skipped = {self.bos_id, self.pad_id}
        return self._decode_tokens([i for i in ids if i not in skipped])

    def __call__(
        self,
        texts: str | list[str],
        max_length: int,
        add_eos: bool = True,
        padding_side: Literal["right", "left"] = "right",
    ) -> tuple[Tensor, Tensor]:
        """Tokenizes a batch of texts into padded ids and a mask.

        Each text becomes `[BOS, tokens..., EOS]`. The batch is padded with `pad_id` to its longest item
        (not to `max_length`). Truncation: a text with more than `max_length - 2` tokens keeps BOS, its first
        `max_length - 2` tokens and EOS (`max_length - 1` tokens and no EOS when `add_eos=False`), so every row
        has at most `max_length` ids and a kept EOS still marks where the text ends.

        Args:
            texts: one text or a list of texts.
            max_length: most ids per text, BOS and EOS included.
            add_eos: end each text with EOS; False leaves it open, for generation prompts.
            padding_side: "right" for training and encoding; "left" lines the last tokens up, for batched
                generation.

        Returns:
            ids: (B, L) long tensor, L the longest framed text in the batch.
            mask: (B, L) bool tensor, True on real tokens (BOS and EOS included), False on padding.

        Raises:
            InputError: `texts` is empty, an item is not a str, or holds a lone surrogate (not Unicode text).
            ValueError: `max_length` leaves no room for BOS (and EOS), or `padding_side` is unknown.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise InputError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        if not texts:
            raise InputError("texts is empty; expected at least one text")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"texts[{i}] must be a str, got {type(text).__name__}")
            check_unicode(text, f"texts[{i}]")
        num_specials = 2 if add_eos else 1
        if max_length < num_specials:
            raise ValueError(f"max_length must be at least {num_specials} to fit the special ids, got {max_length}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")

        rows = []
        for text in texts:
            tokens = self.encode(text, max_tokens=max_length - num_specials)
            rows.append([self.bos_id, *tokens, self.eos_id] if add_eos else [self.bos_id, *tokens])
        L = max(len(row) for row in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.bool)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if padding_side == "right" else slice(L - len(row), L)
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = True
        return ids, mask
