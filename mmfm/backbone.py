"""The one decoder transformer: RMSNorm, RoPE, SwiGLU, SDPA, grouped-query attention and a KV cache."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmfm.config import BackboneConfig, RopeScalingConfig
from mmfm.linear import Linear

if TYPE_CHECKING:
    from mmfm.sequence import TokenSequence


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    Attributes:
        k: (depth, B, kv_heads, max_len, head_dim) keys.
        v: (depth, B, kv_heads, max_len, head_dim) values.
        length: positions filled so far.
    """

    def __init__(self, config: BackboneConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (config.depth, batch, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes (B, kv_heads, T, head_dim) keys/values after the filled part; returns all of them so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keeps batch rows `index` (in that order), as beam search does when it picks survivors."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables, rotating the two halves of each head (GPT-NeoX layout, as Llama)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: RopeScalingConfig | None = None):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        if scaling is not None:
            inv_freq = llama3_scaled(inv_freq, scaling)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (max_seq_len, hd/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) positions -> cos, sin of shape (B, 1, L, head_dim / 2)."""
        return self.cos[positions][:, None], self.sin[positions][:, None]


def llama3_scaled(inv_freq: Tensor, scaling: RopeScalingConfig) -> Tensor:
    """Llama 3.1's frequency scaling: wavelengths beyond the pretraining context / low_freq_factor are divided by
    `factor`, those under context / high_freq_factor are kept, and the band between blends the two linearly in
    context / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    context = scaling.original_max_seq_len
    blend = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blend = blend.clamp(0.0, 1.0)  # 0: fully scaled (long wavelengths), 1: kept (short ones)
    return (1 - blend) * inv_freq / scaling.factor + blend * inv_freq


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates (B, H, L, hd) queries or keys by their positions' angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        self.qkv = Linear(config.dim, (config.num_heads + 2 * config.kv_heads) * config.head_dim, bias=config.qkv_bias)
        self.proj = Linear(config.dim, config.dim, bias=False)
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        attn_mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        B, L, D = x.shape
        heads = self.qkv(x).view(B, L, self.num_heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        # one rotation for the query and key heads together (fewer small ops per decoding step)
        q, k = apply_rotary(heads[:, : self.num_heads + self.kv_heads], *rope).split(
            [self.num_heads, self.kv_heads], dim=1
        )  # (B, nh, L, hd), (B, nkv, L, hd)
        v = heads[:, self.num_heads + self.kv_heads :]  # (B, nkv, L, hd)
        # causal by SDPA itself when there are no earlier keys; with some, the caller's mask says what is visible
        causal = attn_mask is None and L > 1 and (cache is None or cache.length == 0)
        if cache is not None:
            past = cache.length
            cached = cache.update(layer, k, v)  # (B, nkv, past + L, hd)
            if past:  # a prefill attends over its own (contiguous) keys and values, which the cache now holds too
                k, v = cached
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.kv_heads != self.num_heads,
        )  # (B, nh, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and scaled in the input's dtype (as Llama's reference does).

    Written out in four tensor ops: on CPU that is several times quicker per decoding step than `nn.RMSNorm`, whose
    fused op there dispatches more ops for a row of a few hundred values.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_up = Linear(dim, 2 * hidden_dim, bias=False)
        self.down = Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.mlp_hidden_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope, attn_mask: Tensor | None, cache: KVCache | None, layer: int) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, attn_mask, cache, layer))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Backbone(nn.Module):
    """A pre-norm decoder transformer over (B, L, dim) token embeddings.

    The caller supplies positions and the attention mask (see `TokenSequence`), so the backbone knows
    nothing about modalities. With `attn_mask=None` and no cache, attention is plain causal.
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.grad_checkpointing = config.grad_checkpointing
        if not self.norm.weight.is_meta:  # parameters on the meta device (to be loaded) hold no values to draw
            self.apply(self._init_weights)
            for block in self.blocks:  # scale residual projections by depth, as GPT-2 does
                for lin in (block.attn.proj, block.mlp.down):
                    nn.init.normal_(lin.weight, std=0.02 / (2 * config.depth) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Runs every block and the final norm.

        Args:
            x: (B, L, dim) token embeddings.
            positions: (B, L) RoPE positions.
            attn_mask: (B, 1, L, cached + L) bool, True where attention is allowed; None for plain causal (with an
                empty cache; one new position attends to every cached one).
            cache: keys/values of earlier positions; this call appends its L positions and advances it.

        Returns:
            (B, L, dim) hidden states.
        """
        length = x.shape[1] + (cache.length if cache is not None else 0)
        if length > self.config.max_seq_len:  # checked on shapes: no device sync per decoding step
            raise ValueError(f"sequence of {length} tokens exceeds backbone.max_seq_len ({self.config.max_seq_len})")
        rope = self.rope(positions)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, attn_mask, None, i, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)

    def read(self, seq: TokenSequence) -> Tensor:
        """(B, L, dim) states of a whole token sequence under its attention policy (plain causal where it can)."""
        attn_mask = None if seq.is_plain_causal else seq.attention_mask()
        return self(seq.embeds, seq.positions(), attn_mask)
