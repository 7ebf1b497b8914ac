"""AST-style audio encoder: a timm VisionTransformer over the log-mel spectrogram with overlapping patches.

AST (Gong et al., 2021) reads a (mel bins, frames) spectrogram as a one-channel image and cuts it into 16x16
patches every 10 bins/frames. Here the same layout is a plain timm `VisionTransformer` whose patch embedding has a
stride below its patch size, so timm's own blocks, position embedding and checkpoint tooling carry over.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.layers import LayerNorm, PatchEmbed, to_2tuple
from torch import Tensor, nn

from mmfm.config import AudioEncoderConfig
from mmfm.encoders.timm_vit import create_vit, num_vit_tokens, vit_tokens
from mmfm.errors import InputError


class StridedPatchEmbed(PatchEmbed):
    """timm's `PatchEmbed` with a patch stride that may be smaller than the patch, giving overlapping patches.

    The grid has `(size - patch) // stride + 1` patches along each axis, so a timm ViT built with this as its
    `embed_layer` sizes its position embedding for the overlapping grid. Changing the patch size later through
    `set_input_size` is not supported (it would rebuild the projection with stride = patch size).

    Args:
        *args: `PatchEmbed`'s positional arguments (img_size, patch_size, in_chans, embed_dim, ...).
        stride: step between patches, per axis or for both.
        **kwargs: `PatchEmbed`'s keyword arguments.
    """

    def __init__(self, *args: Any, stride: int | tuple[int, int], **kwargs: Any) -> None:
        # set before PatchEmbed.__init__, which sizes the grid through _init_img_size
        self.stride = to_2tuple(stride)
        super().__init__(*args, **kwargs)
        conv = self.proj
        self.proj = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            kernel_size=self.patch_size,
            stride=self.stride,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )

    def _init_img_size(
        self, img_size: int | tuple[int, int] | None
    ) -> tuple[tuple[int, int] | None, tuple[int, int] | None, int | None]:
        if img_size is None:
            return None, None, None
        img_size = to_2tuple(img_size)
        grid_size = tuple((s - p) // t + 1 for s, p, t in zip(img_size, self.patch_size, self.stride))
        return img_size, grid_size, grid_size[0] * grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> tuple[int, int] | int:
        return max(self.stride) if as_scalar else self.stride

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return tuple((s - p) // t + 1 for s, p, t in zip(img_size, self.patch_size, self.stride))


class AudioEncoder(nn.Module):
    """Encodes normalised log-mel spectrograms into patch tokens with a timm ViT (AST's architecture).

    The ViT is `timm.create_model(config.model_name, ...)` with one input channel, an image size of
    (num_mel_bins, target_frames) and a `StridedPatchEmbed`; `width`, `depth` and `num_heads` override the named
    model's when set. It is kept as `self.vit`, so state_dict keys are `vit.<timm key>`.

    Args:
        config: the audio encoder config.

    Attributes:
        vit: the timm `VisionTransformer`.
        width: token width.
        num_tokens: tokens per clip that `forward` returns (patches, plus prefix tokens when kept).

    Raises:
        ConfigError: `config.model_name` is not a timm ViT-family model (a distilled DeiT's class + distillation
            tokens are AST's own layout).
    """

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = create_vit(
            "audio",
            config.model_name,
            in_chans=1,
            img_size=(config.num_mel_bins, config.target_frames),
            patch_size=config.patch_size,
            class_token=config.class_token,
            reg_tokens=config.reg_tokens,
            embed_layer=partial(StridedPatchEmbed, stride=config.patch_stride),
            embed_dim=config.width,
            depth=config.depth,
            num_heads=config.num_heads,
            norm_layer=None if config.norm_eps is None else partial(LayerNorm, eps=config.norm_eps),
        )
        self.width = self.vit.embed_dim
        self.num_tokens = num_vit_tokens(self.vit, config.keep_prefix_tokens)

    def forward(self, fbank: Tensor) -> Tensor:
        """Encodes a batch of spectrograms.

        Args:
            fbank: normalised log-mel features, shape (B, target_frames, num_mel_bins), as `AudioProcessor` makes.

        Returns:
            Tokens, shape (B, num_tokens, width): the patch grid in row-major (mel, frame) order, preceded by the
            class and register tokens when `config.keep_prefix_tokens` is set.

        Raises:
            InputError: `fbank` does not have the expected shape.
        """
        frames, mel = self.config.target_frames, self.config.num_mel_bins
        if fbank.dim() != 3 or tuple(fbank.shape[1:]) != (frames, mel):
            raise InputError(
                f"audio encoder expects features of shape (B, {frames}, {mel}) (batch, frames, mel bins), "
                f"got {tuple(fbank.shape)}"
            )
        x = fbank.transpose(1, 2).unsqueeze(1)  # (B, frames, mel) -> (B, 1, mel, frames), as AST
        return vit_tokens(self.vit, x, self.config.keep_prefix_tokens)
