"""The models the benchmarks race: an mmfm text decoder of a given size and its Hugging Face GPT-2 twin.

The twin has mmfm's width, depth, heads and vocabulary. The blocks still differ as the architectures do:
GPT-2 has LayerNorm, GELU with a 4x MLP, biases and learned positions; mmfm has RMSNorm, SwiGLU with an
8/3x MLP (about the same parameter count), no biases and RoPE. Both tie the LM head to the token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import transformers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from mmfm import ModelConfig, MultimodalModel
from mmfm.config import BackboneConfig, CaptionHeadConfig, ImageEncoderConfig, TextConfig

transformers.logging.set_verbosity_error()  # keep the benchmark tables readable


@dataclass
class DecoderSize:
    """Backbone size and the longest sequence it must cover; the vocabulary is the byte tokenizer's."""

    dim: int
    depth: int
    num_heads: int
    max_seq_len: int

    def __str__(self) -> str:
        return f"dim {self.dim}, depth {self.depth}, heads {self.num_heads}"


def mmfm_decoder(size: DecoderSize, image: ImageEncoderConfig | None = None) -> MultimodalModel:
    """An mmfm model with the caption head only (plus an image encoder when `image` is given), in eval mode.

    Key/value heads equal query heads, as in GPT-2, so neither side gets grouped-query attention's saving.
    """
    config = ModelConfig(
        name="bench",
        image=image,
        audio=None,
        text=TextConfig(tokenizer="byte", max_length=32),
        backbone=BackboneConfig(dim=size.dim, depth=size.depth, num_heads=size.num_heads, max_seq_len=size.max_seq_len),
        caption=CaptionHeadConfig(),
        contrastive=None,
    )
    return MultimodalModel(config).eval()


def gpt2_twin(model: MultimodalModel) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 with `model`'s width, depth, heads, vocabulary and sequence room, in eval mode."""
    bb, tok = model.config.backbone, model.tokenizer
    config = GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=bb.max_seq_len,
        n_embd=bb.dim,
        n_layer=bb.depth,
        n_head=bb.num_heads,
        resid_pdrop=0.0,  # mmfm's backbone dropout is 0 too
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config).eval()


def count_parameters(module: nn.Module) -> int:
    """Parameters, a tied weight counted once (`parameters()` already deduplicates)."""
    return sum(p.numel() for p in module.parameters())
