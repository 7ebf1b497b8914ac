"""The image encoder: a timm ViT-family model that turns pixels into a sequence of patch tokens.

```python
encoder = ImageEncoder(ImageEncoderConfig(model_name="vit_base_patch16_224"))
processor = ImageProcessor(encoder.data_config, encoder.config.in_chans)
tokens = encoder(processor(["cat.jpg"]))  # (1, 196, 768)
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from mmfm.config import ImageEncoderConfig
from mmfm.encoders.timm_vit import create_vit, num_vit_tokens, vit_tokens
from mmfm.errors import ConfigError, InputError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


class ImageEncoder(nn.Module):
    """A timm ViT-family model that encodes images into tokens, with the preprocessing that suits it.

    The timm model is kept as `self.vit`, so state_dict keys are `vit.` + timm's own keys. `forward` returns the
    tokens after timm's final norm. By default it is built without pooling or head; with `config.global_pool` (and
    `config.head_dim`) it also embeds each image on its own (`forward_pooled`: timm's `forward_head`), as the image
    tower of a CLIP-style model does.

    Attributes:
        config: the config the encoder was built from.
        vit: the timm VisionTransformer.
        width: token width.
        pooled_dim: width of `forward_pooled`'s output.
        num_tokens: tokens per image that `forward` returns at the configured image size.
        data_config: preprocessing in timm's `resolve_data_config` form (input_size, interpolation, mean, std,
            crop_pct, crop_mode): the model's pretrained config, overridden by the config's non-None fields.
    """

    def __init__(self, config: ImageEncoderConfig) -> None:
        """Builds the timm model named by `config.model_name` with the config's overrides.

        Args:
            config: the image encoder config.

        Raises:
            ConfigError: the name is not a timm model, not a ViT-family one, or timm cannot build it as configured.
        """
        super().__init__()
        self.config = config
        self.vit: VisionTransformer = create_vit(
            "image",
            config.model_name,
            in_chans=config.in_chans,
            class_token=config.class_token,
            reg_tokens=config.reg_tokens,
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.width,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            pre_norm=config.pre_norm,
            global_pool=config.global_pool,
            num_classes=config.head_dim,
        )
        if config.head_dim and not config.head_bias:
            # timm's head always has a bias; CLIP's visual projection has none.
            self.vit.head = nn.Linear(self.vit.embed_dim, config.head_dim, bias=False)
        self.width: int = self.vit.embed_dim
        self.pooled_dim: int = config.head_dim or self.width
        self.num_tokens: int = num_vit_tokens(self.vit, config.keep_prefix_tokens)
        self.data_config: dict[str, Any] = _data_config(self.vit, config)

    def forward(self, pixels: Tensor) -> Tensor:
        """Encodes a batch of preprocessed images.

        Args:
            pixels: (B, in_chans, H, W) normalised images, H and W as in `data_config["input_size"]`.

        Returns:
            (B, num_tokens, width) tokens: the patch tokens in raster order, preceded by the class and register
            tokens when `config.keep_prefix_tokens` is set.

        Raises:
            InputError: `pixels` does not have the shape the model takes.
        """
        self._check_shape(pixels)
        return vit_tokens(self.vit, pixels, self.config.keep_prefix_tokens)

    def forward_pooled(self, pixels: Tensor) -> Tensor:
        """One vector per image: timm's features, pooled as `config.global_pool` says, through the head if any.

        Args:
            pixels: (B, in_chans, H, W) normalised images.

        Returns:
            (B, head_dim) with a head, else (B, width).

        Raises:
            InputError: `pixels` has the wrong shape, or the encoder was built without pooling.
        """
        if self.config.global_pool is None:
            raise InputError("this image encoder has no pooled output; set image.global_pool (e.g. 'token')")
        self._check_shape(pixels)
        return self.vit.forward_head(self.vit.forward_features(pixels))  # (B, head_dim or width)

    def _check_shape(self, pixels: Tensor) -> None:
        embed = self.vit.patch_embed
        channels = self.config.in_chans
        shape = tuple(pixels.shape)
        if embed.strict_img_size:
            expected = f"(B, {channels}, {embed.img_size[0]}, {embed.img_size[1]})"
            fits = shape[-2:] == embed.img_size
        elif embed.dynamic_img_pad:
            expected = f"(B, {channels}, H, W)"
            fits = True
        else:
            step_h, step_w = embed.feat_ratio(as_scalar=False)
            expected = f"(B, {channels}, H, W) with H a multiple of {step_h} and W a multiple of {step_w}"
            fits = len(shape) == 4 and shape[2] % step_h == 0 and shape[3] % step_w == 0
        if len(shape) != 4 or shape[1] != channels or not fits:
            raise InputError(f"image encoder expects pixels of shape {expected}, got {shape}")


def _data_config(vit: VisionTransformer, config: ImageEncoderConfig) -> dict[str, Any]:
    """The model's preprocessing as timm resolves it, with the config's non-None fields taking precedence."""
    from timm.data import resolve_data_config
    from timm.data.transforms import str_to_interp_mode

    channels = config.in_chans
    for key in ("mean", "std"):
        value = getattr(config, key)
        if value is not None and len(value) not in (1, channels):
            raise ConfigError(f"image.{key} needs 1 or image.in_chans={channels} values, got {list(value)}")
    if config.crop_pct is not None and config.crop_pct <= 0:
        raise ConfigError(f"image.crop_pct must be positive, got {config.crop_pct}")
    if config.interpolation is not None:
        try:
            str_to_interp_mode(config.interpolation)
        except KeyError:
            raise ConfigError(
                f"image.interpolation: {config.interpolation!r} is not a timm interpolation "
                "(nearest, bilinear, bicubic, box, hamming, lanczos)"
            ) from None
    # The pretrained config's input_size is the named model's, not the one built here, so pass the real one.
    args = {
        "input_size": (channels, *vit.patch_embed.img_size),
        "mean": config.mean,
        "std": config.std,
        "crop_pct": config.crop_pct,
        "interpolation": config.interpolation,
    }
    data_config = resolve_data_config(args=args, model=vit)
    for key in ("mean", "std"):
        stats = data_config[key]
        if len(stats) == channels:
            continue
        # Pretrained statistics are per RGB channel; a greyscale model takes their average.
        if channels != 1:
            raise ConfigError(
                f"image.{key}: {config.model_name!r} has {len(stats)}-channel defaults but image.in_chans is "
                f"{channels}; set image.mean and image.std"
            )
        data_config[key] = (sum(stats) / len(stats),)
    return data_config
