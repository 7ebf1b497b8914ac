"""STUB on branch w12-gguf, replaced at merge by the lead's Hugging Face Llama converter (issue 12).

Only the two functions `mmfm.convert.gguf` calls, with the contract's signatures (/work/plan/issue12.md); they
raise until the real module lands, and tests that need them skip while `STUB` is true.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

STUB = True


def config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Partial ModelConfig {"name", "text", "backbone", "caption"} of a Hugging Face Llama-family config."""
    raise NotImplementedError(f"{source}: mmfm.convert.hf_llama is a stub on this branch")


def state_from_hf(state: dict[str, Tensor], hf: dict[str, Any], source: str) -> dict[str, Tensor]:
    """Hugging Face Llama-family weights (model.layers.N.self_attn.q_proj.weight, ...) under mmfm names."""
    raise NotImplementedError(f"{source}: mmfm.convert.hf_llama is a stub on this branch")
