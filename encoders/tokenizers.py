"""Text to token ids and back: a UTF-8 byte tokenizer and open_clip's CLIP BPE, behind one interface.

Every tokenizer frames a text as `[BOS, tokens..., EOS]`, pads a batch to its longest item and returns a
mask that is True on real tokens, so the sequence builder and the heads never look at pad ids.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from mmfm.config import TextConfig
from mmfm.errors import ConfigError, InputError

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer


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

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, without BOS or EOS."""
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
            InputError: `ids` is a tensor that is not 1-D.
        """
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise InputError(f"decode takes one sequence of ids (a 1-D tensor), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
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
            InputError: `texts` is empty or an item is not a str.
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
        num_specials = 2 if add_eos else 1
        if max_length < num_specials:
            raise ValueError(f"max_length must be at least {num_specials} to fit the special ids, got {max_length}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")

        rows = []
        for text in texts:
            tokens = self.encode(text)[: max_length - num_specials]
            rows.append([self.bos_id, *tokens, self.eos_id] if add_eos else [self.bos_id, *tokens])
        L = max(len(row) for row in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.bool)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if padding_side == "right" else slice(L - len(row), L)
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = True
        return ids, mask


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: 0 is PAD, 1 BOS, 2 EOS, and byte b is id b + 3 (259 ids). Needs no vocabulary file."""

    vocab_size = 259
    pad_id = 0
    bos_id = 1
    eos_id = 2
    _offset = 3

    def encode(self, text: str) -> list[int]:
        return [b + self._offset for b in text.encode("utf-8")]

    def _decode_tokens(self, ids: list[int]) -> str:
        # A model can emit byte sequences that are not valid UTF-8; they decode to U+FFFD, never raise.
        return bytes(i - self._offset for i in ids).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> SimpleTokenizer:
    # Imported here: importing open_clip takes seconds, and byte-tokenizer users never need it.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class ClipTokenizer(Tokenizer):
    """OpenAI CLIP's BPE (49408 ids) through open_clip's `SimpleTokenizer`, whose vocabulary ships with open_clip.

    Texts are cleaned as open_clip cleans them (ftfy, HTML unescaping, whitespace collapsed, lowercased), so
    the ids match `open_clip.tokenize` and decoding returns the cleaned text with words separated by spaces.
    BOS and EOS are CLIP's start/end-of-text tokens and PAD is 0, as in open_clip; 0 is also the token "!",
    which is why `pad_is_token` is set. The BPE tables are built once per process, on first use.
    """

    pad_id = 0
    pad_is_token = True

    def __init__(self) -> None:
        self._bpe = _clip_bpe()
        self.vocab_size = self._bpe.vocab_size
        self.bos_id = self._bpe.sot_token_id
        self.eos_id = self._bpe.eot_token_id

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text)

    def _decode_tokens(self, ids: list[int]) -> str:
        # SimpleTokenizer ends every word with a space, the last one included.
        return self._bpe.decode(ids).strip()


def build_tokenizer(config: TextConfig) -> Tokenizer:
    """The tokenizer `config.tokenizer` names.

    Raises:
        ConfigError: `config.tokenizer` is neither "clip" nor "byte".
    """
    if config.tokenizer == "clip":
        return ClipTokenizer()
    if config.tokenizer == "byte":
        return ByteTokenizer()
    raise ConfigError(f"unknown text.tokenizer {config.tokenizer!r}; expected 'clip' or 'byte'")
