"""ImageEncoder: timm parity, token counts, preprocessing config and the errors a wrong config or input gives."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from mmfm.config import ImageEncoderConfig
from mmfm.encoders.image_processor import ImageProcessor
from mmfm.encoders.vision import ImageEncoder
from mmfm.errors import ConfigError, InputError

TINY = ImageEncoderConfig(
    model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, width=32, depth=1, num_heads=2, reg_tokens=2
)
NUM_PATCHES = (32 // 8) ** 2


def tiny(**overrides) -> ImageEncoderConfig:
    return dataclasses.replace(TINY, **overrides)


@pytest.mark.parametrize(("keep_prefix_tokens", "num_tokens"), [(False, NUM_PATCHES), (True, 1 + 2 + NUM_PATCHES)])
def test_output_shape(keep_prefix_tokens, num_tokens):
    encoder = ImageEncoder(tiny(keep_prefix_tokens=keep_prefix_tokens))

    out = encoder(torch.randn(2, 3, 32, 32))

    assert (encoder.width, encoder.num_tokens) == (32, num_tokens)
    assert out.shape == (2, num_tokens, 32)


@pytest.mark.parametrize("keep_prefix_tokens", [False, True])
def test_parity_with_timm_forward_features(keep_prefix_tokens):
    torch.manual_seed(0)
    encoder = ImageEncoder(tiny(keep_prefix_tokens=keep_prefix_tokens)).eval()
    reference = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        global_pool="",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        reg_tokens=2,
    ).eval()
    reference.load_state_dict(encoder.vit.state_dict())
    pixels = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        expected = reference.forward_features(pixels)  # (2, 3 + 16, 32)
        out = encoder(pixels)

    torch.testing.assert_close(out, expected if keep_prefix_tokens else expected[:, 3:])


def test_state_dict_keys_are_timm_keys_under_vit():
    encoder = ImageEncoder(TINY)

    keys = set(encoder.state_dict())

    assert keys == {f"vit.{k}" for k in encoder.vit.state_dict()}
    assert {"vit.cls_token", "vit.reg_token", "vit.pos_embed", "vit.patch_embed.proj.weight", "vit.norm.weight"} <= keys


def test_without_class_token():
    encoder = ImageEncoder(tiny(class_token=False, reg_tokens=0, keep_prefix_tokens=True))

    assert encoder(torch.randn(1, 3, 32, 32)).shape == (1, NUM_PATCHES, 32)


def test_vit_subclass_is_accepted():
    # DeiT distilled adds a distillation token after the class token.
    encoder = ImageEncoder(tiny(model_name="deit_tiny_distilled_patch16_224", reg_tokens=0, keep_prefix_tokens=True))

    assert encoder.num_tokens == 2 + NUM_PATCHES
    assert encoder(torch.randn(1, 3, 32, 32)).shape == (1, encoder.num_tokens, 32)


def test_data_config_from_timm_pretrained_config():
    encoder = ImageEncoder(TINY)

    assert encoder.data_config == {
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.9,
        "crop_mode": "center",
    }


def test_data_config_overrides():
    config = tiny(mean=(0.1, 0.2, 0.3), std=(0.4,), crop_pct=1.0, interpolation="bilinear")

    data_config = ImageEncoder(config).data_config

    assert data_config["mean"] == (0.1, 0.2, 0.3)
    assert data_config["std"] == (0.4, 0.4, 0.4)
    assert (data_config["crop_pct"], data_config["interpolation"]) == (1.0, "bilinear")


def test_one_channel_encoder_runs_on_processed_images():
    encoder = ImageEncoder(tiny(in_chans=1))
    processor = ImageProcessor(encoder.data_config, in_chans=1)

    pixels = processor([torch.rand(3, 40, 50)])

    assert encoder.data_config["input_size"] == (1, 32, 32)
    assert encoder.data_config["mean"] == pytest.approx((0.5,))
    assert encoder(pixels).shape == (1, NUM_PATCHES, 32)


@pytest.mark.parametrize(
    "shape",
    [(32,), (3, 32, 32), (2, 1, 32, 32), (2, 3, 64, 64), (2, 3, 32, 40)],
    ids=["1d", "3d", "channels", "size", "non-square"],
)
def test_wrong_input_shape(shape):
    encoder = ImageEncoder(TINY)

    with pytest.raises(InputError, match=r"expects pixels of shape \(B, 3, 32, 32\)") as info:
        encoder(torch.randn(*shape))

    assert str(shape) in str(info.value)


def test_dynamic_size_model_takes_patch_multiples():
    # timm's test_vit is built with dynamic_img_size=True: any size that is a whole number of patches.
    encoder = ImageEncoder(tiny(model_name="test_vit"))

    assert encoder(torch.randn(1, 3, 48, 24)).shape == (1, 6 * 3, 32)
    with pytest.raises(InputError, match="H a multiple of 8 and W a multiple of 8"):
        encoder(torch.randn(1, 3, 48, 20))


def test_non_vit_model_is_rejected():
    with pytest.raises(ConfigError, match="image.model_name") as info:
        ImageEncoder(ImageEncoderConfig(model_name="resnet18"))

    assert "'resnet18'" in str(info.value) and "ViT" in str(info.value)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConfigError, match="image.model_name") as info:
        ImageEncoder(tiny(model_name="vit_tiny_patch16_22"))

    assert "'vit_tiny_patch16_22'" in str(info.value) and "'vit_tiny_patch16_224'" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"width": 30, "num_heads": 4}, "image.num_heads=4"),
        ({"mean": (0.1, 0.2)}, "image.mean"),
        ({"crop_pct": 0.0}, "image.crop_pct"),
        ({"interpolation": "cubic"}, "image.interpolation"),
        ({"model_name": "deit_tiny_distilled_patch16_224"}, "image.reg_tokens"),
        ({"model_name": "deit_tiny_distilled_patch16_224", "reg_tokens": 0, "class_token": False}, "class_token=False"),
    ],
)
def test_impossible_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        ImageEncoder(tiny(**overrides))

    assert key in str(info.value)
