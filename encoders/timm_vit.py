"""Building timm ViT-family models for the image and audio encoders, with errors that name the config key.

timm is imported by the functions that need it, not here: importing timm takes over a second (it imports
torchvision), and `import mmfm` must not pay for it.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mmfm.errors import ConfigError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

# timm modules whose models are VisionTransformer or a subclass.
VIT_MODULES = ("vision_transformer", "deit", "vision_transformer_hybrid")
# timm's argument names that mmfm's encoder configs spell differently.
_CONFIG_KEYS = {"embed_dim": "width"}


def check_vit_name(section: str, model_name: str) -> None:
    """Raises ConfigError, naming `section.model_name` and close matches, unless timm has this ViT-family model."""
    import timm
    from timm.models import get_arch_name, is_model_in_modules

    if not timm.is_model(model_name) or not is_model_in_modules(model_name, VIT_MODULES):
        known = timm.list_models(module=list(VIT_MODULES))
        close = difflib.get_close_matches(get_arch_name(model_name), known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        what = "a timm ViT-family model" if timm.is_model(model_name) else "a timm model"
        raise ConfigError(
            f"{section}.model_name: {model_name!r} is not {what} (timm's VisionTransformer or a subclass, "
            f"e.g. 'vit_base_patch16_224' or 'deit_small_patch16_224'){hint}"
        )


def create_vit(section: str, model_name: str, **kwargs: Any) -> VisionTransformer:
    """A randomly initialised timm ViT-family model without classifier or pooling.

    Args:
        section: the config section ("image" or "audio"), named in errors.
        model_name: a timm model name, with or without a pretrained tag.
        **kwargs: `timm.create_model` arguments; those set to None keep the named model's value, except
            `global_pool` (None means "", no pooling) and `num_classes` (None means 0, no head).

    Raises:
        ConfigError: the name is not a timm ViT-family model, or timm cannot build it with these arguments.
    """
    import timm
    from timm.models import get_arch_name

    check_vit_name(section, model_name)
    global_pool = kwargs.pop("global_pool", None) or ""
    num_classes = kwargs.pop("num_classes", None) or 0
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if "distilled" in get_arch_name(model_name):
        # DeiT's distilled ViT builds only with token pooling (which never runs without a head), and its
        # class + distillation prefix leaves no place for register tokens.
        if kwargs.get("reg_tokens"):
            raise ConfigError(
                f"{section}.reg_tokens: {model_name!r} takes no register tokens (its prefix tokens are the class "
                f"and distillation tokens), got {kwargs['reg_tokens']}"
            )
        global_pool = "token"
    try:
        return timm.create_model(
            model_name, pretrained=False, num_classes=num_classes, global_pool=global_pool, **kwargs
        )
    except (AssertionError, TypeError, ValueError, RuntimeError) as e:
        settings = ", ".join(
            f"{section}.{_CONFIG_KEYS.get(key, key)}={value!r}" for key, value in kwargs.items() if key != "embed_layer"
        )
        raise ConfigError(f"{section}: timm cannot build {model_name!r} with {settings}: {e}") from e


def vit_tokens(vit: VisionTransformer, x: Tensor, keep_prefix_tokens: bool) -> Tensor:
    """(B, C, H, W) input -> (B, N, width) tokens after timm's final norm, prefix tokens dropped unless kept."""
    x = vit.forward_features(x)  # (B, num_prefix_tokens + num_patches, width)
    return x if keep_prefix_tokens else x[:, vit.num_prefix_tokens :]


def num_vit_tokens(vit: VisionTransformer, keep_prefix_tokens: bool) -> int:
    """How many tokens `vit_tokens` returns per input."""
    return vit.patch_embed.num_patches + (vit.num_prefix_tokens if keep_prefix_tokens else 0)
