"""The text tower: a text transformer that embeds a text on its own, as CLIP's text encoder or BERT does.

mmfm's backbone reads text as tokens among media tokens; a dual-tower model (CLIP, a sentence encoder) instead
embeds text with its own transformer. `TextTower` is that transformer, in the two layouts pretrained towers
use, so their weights load by a key remap (`mmfm.convert`):

```
kind     embeddings                          blocks                                 attention       out
"clip"   token + position                    pre-norm:  x + attn(ln(x)), x + mlp(ln(x))   causal     final LN
"bert"   LN(token + position + type 0)       post-norm: ln(x + attn(x)), ln(x + mlp(x))   padding    -
```

followed by pooling ("eot", "cls" or "mean" over real tokens) and an optional bias-free projection.

```python
tower = TextTower(TextTowerConfig(kind="bert", vocab_size=30522, width=384, depth=6, num_heads=12,
                                  norm_eps=1e-12, pooling="mean", embed_dim=None))
ids, mask = tokenizer(["a cat"], 256)
emb = tower(ids, mask)  # (1, 384), not normalised
```
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.config import TextTowerConfig
from mmfm.errors import InputError
from mmfm.pooling import last_token, masked_mean


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
}


class TowerAttention(nn.Module):
    """Multi-head self-attention with one packed qkv projection (open_clip's and timm's layout).

    Args:
        width: token width.
        num_heads: heads; must divide width.
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        """(B, L, W) tokens -> (B, L, W); `attn_mask` is a (B, 1, 1, L) bool mask, True where keys may be read."""
        B, L, W = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, W // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, nh, L, hs) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(B, L, W))


class TowerMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = _ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TowerBlock(nn.Module):
    """A transformer block, pre-norm (CLIP) or post-norm (BERT); `norm1` belongs to attention, `norm2` to the MLP.

    Args:
        config: the tower config (width, heads, MLP width, activation, epsilon).
        pre_norm: normalise each branch's input (CLIP) instead of each residual sum (BERT).
    """

    def __init__(self, config: TextTowerConfig, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = TowerAttention(config.width, config.num_heads)
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = TowerMLP(config.width, config.mlp_dim or 4 * config.width, config.act)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), attn_mask, is_causal)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, attn_mask, is_causal))
        return self.norm2(x + self.mlp(x))


class TextTower(nn.Module):
    """Token ids -> one embedding per text, through a text transformer of CLIP's or BERT's layout.

    State dict keys: `token_embed.weight`, `pos_embed` (context_length, width), `type_embed` and
    `norm_embed.*` ("bert"), `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*` ("clip"),
    `proj.weight` (when `embed_dim` is set).

    Args:
        config: the tower's shape, layout, pooling and projection.

    Attributes:
        config: the config it was built from.
        out_dim: width of `forward`'s output.
    """

    def __init__(self, config: TextTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.out_dim = config.out_dim
        clip = config.kind == "clip"
        W = config.width
        self.token_embed = nn.Embedding(config.vocab_size, W)
        self.pos_embed = nn.Parameter(torch.empty(config.context_length, W))
        self.type_embed = None if clip else nn.Parameter(torch.zeros(config.type_vocab_size, W))
        self.norm_embed = None if clip else nn.LayerNorm(W, eps=config.norm_eps)
        self.blocks = nn.ModuleList(TowerBlock(config, pre_norm=clip) for _ in range(config.depth))
        self.norm = nn.LayerNorm(W, eps=config.norm_eps) if clip else None
        self.proj = None if config.embed_dim is None else nn.Linear(W, config.embed_dim, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Every token's final state.

        Args:
            ids: (B, L) right-padded token ids.
            mask: (B, L) bool, True on real tokens.

        Returns:
            (B, L, width) states (after the final LayerNorm for "clip"); padding positions hold no meaning.

        Raises:
            InputError: the texts are longer than `context_length` or hold ids outside the vocabulary.
        """
        B, L = ids.shape
        if L > self.config.context_length:
            raise InputError(
                f"text tower takes at most {self.config.context_length} tokens (text.tower.context_length), got {L}"
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise InputError(
                f"token ids must be in [0, {self.config.vocab_size}) for the text tower, got min {ids.min().item()} "
                f"and max {ids.max().item()} (was the text tokenized with a different tokenizer?)"
            )
        x = self.token_embed(ids) + self.pos_embed[:L]  # (B, L, W)
        if self.config.kind == "clip":
            # Causal attention: a real token never reads the right padding, so no padding mask is needed.
            attn_mask, is_causal = None, True
        else:
            x = self.norm_embed(x + self.type_embed[0])
            attn_mask, is_causal = mask[:, None, None, :], False  # (B, 1, 1, L): keys that may be read
        for block in self.blocks:
            x = block(x, attn_mask, is_causal)
        return x if self.norm is None else self.norm(x)

    def pool(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, L, width) states and their (B, L) mask -> (B, width), as `config.pooling` says."""
        if self.config.pooling == "eot":
            return last_token(x, mask)
        if self.config.pooling == "cls":
            return x[:, 0]
        return masked_mean(x, mask)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, L) right-padded ids and their mask -> (B, out_dim) pooled, projected embeddings (not normalised)."""
        pooled = self.pool(self.forward_features(ids, mask), mask)
        return pooled if self.proj is None else self.proj(pooled)
