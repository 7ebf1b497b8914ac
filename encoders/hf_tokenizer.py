"""STUB on branch w12-gguf, replaced at merge by the Hugging Face `tokenizers` tokenizer (issue 12, helper "tok").

Only what `mmfm.convert.gguf` calls, with the contract's signature (/work/plan/issue12.md); it raises until the real
module lands, and tests that need it skip while `STUB` is true.
"""

from __future__ import annotations

from typing import Any

STUB = True


class HFTokenizer:
    """A Hugging Face tokenizer.json tokenizer (stub)."""

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> HFTokenizer:
        """The tokenizer a GGUF file's tokenizer.* metadata describes."""
        raise NotImplementedError("mmfm.encoders.hf_tokenizer is a stub on this branch")
