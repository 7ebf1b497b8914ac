"""timm -> mmfm image encoder: parity with timm on tiny random models saved in timm's formats, and the errors."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import load_checkpoint
from timm.models._hub import save_for_hf
from timm.models.vision_transformer import checkpoint_filter_fn

import mmfm
from mmfm.convert import convert
from mmfm.errors import CheckpointError, ConfigError
from mmfm.loader import from_converted
from mmfm.pretrained import PretrainedEntry, register_pretrained, unregister_pretrained

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _reference(name="vit_tiny_patch16_224", **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**TINY, **kwargs}).eval()
    with torch.no_grad():  # timm zero-initialises some tensors; random values make the comparison mean something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _features(model, pixels):
    encoder = model.encoders["image"]
    with torch.no_grad():
        return encoder.vit.forward_features(pixels), encoder.forward_pooled(pixels), encoder(pixels)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vit_tiny_patch16_224", {}),
        ("vit_tiny_patch16_224", {"reg_tokens": 2}),
        ("vit_base_patch16_clip_224", {}),  # pre-norm, bias-free patch embedding
        ("deit_tiny_distilled_patch16_224", {}),
    ],
)
def test_hub_directory_matches_timm_features_and_pooled(tmp_path, name, kwargs):
    reference = _reference(name, num_classes=10, **kwargs)
    save_for_hf(reference, tmp_path, safe_serialization=True)  # timm's hub layout: config.json + model.safetensors

    model, _ = from_converted(convert("timm", tmp_path), "mmfm-test", str(tmp_path))
    pixels = torch.randn(2, 3, 32, 32)
    features, pooled, tokens = _features(model, pixels)

    with torch.no_grad():
        expected = reference.forward_features(pixels)
        torch.testing.assert_close(features, expected)
        torch.testing.assert_close(pooled, reference.forward_head(expected, pre_logits=True))
        torch.testing.assert_close(tokens, expected[:, reference.num_prefix_tokens :])
    assert "head.weight" not in {k.removeprefix("encoders.image.vit.") for k in model.state_dict()}


def test_torch_file_with_model_name_and_kept_head(tmp_path):
    reference = _reference(num_classes=7)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)  # a training script's container

    converted = convert("timm", path, model_name="vit_tiny_patch16_224", keep_head=True, **TINY)
    model, _ = from_converted(converted, "mmfm-test", str(path))

    assert converted.config["image"].head_dim == 7
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoders["image"].forward_pooled(pixels), reference(pixels))


def test_other_image_size_resamples_the_position_embedding_as_timm_does(tmp_path):
    reference = _reference()
    path = tmp_path / "model.safetensors"
    save_for_hf(reference, tmp_path, safe_serialization=True)

    converted = convert("timm", tmp_path, img_size=48)
    model, _ = from_converted(converted, "mmfm-test", str(path))

    resized = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, "img_size": 48}).eval()
    resized.load_state_dict(checkpoint_filter_fn(reference.state_dict(), resized))
    pixels = torch.randn(2, 3, 48, 48)
    assert converted.config["image"].img_size == 48
    assert model.processors["image"].data_config["input_size"] == (3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encoders["image"].vit.forward_features(pixels), resized.forward_features(pixels)
        )


def test_preprocessing_comes_from_the_pretrained_config_of_the_tag(tmp_path):
    reference = _reference("deit_tiny_patch16_224")
    path = tmp_path / "deit.pth"
    torch.save(reference.state_dict(), path)

    config = convert("timm", path, model_name="deit_tiny_patch16_224.fb_in1k", **TINY).config["image"]
    model, _ = from_converted(convert("timm", path, model_name="deit_tiny_patch16_224.fb_in1k", **TINY), "mmfm-test")

    pretrained = timm.models.get_pretrained_cfg("deit_tiny_patch16_224.fb_in1k")
    assert (config.mean, config.std) == (pretrained.mean, pretrained.std) != ((0.5,) * 3, (0.5,) * 3)
    assert (config.crop_pct, config.interpolation) == (pretrained.crop_pct, pretrained.interpolation)
    expected = resolve_data_config(args={"input_size": (3, 32, 32)}, model=reference)
    data_config = model.processors["image"].data_config
    keys = ("mean", "std", "crop_pct", "interpolation", "input_size")
    assert {k: data_config[k] for k in keys} == {k: expected[k] for k in keys}


def test_mmfm_load_of_a_timm_pretrained_tag(tmp_path):
    reference = _reference()
    save_for_hf(reference, tmp_path, safe_serialization=True)
    register_pretrained(PretrainedEntry(tag="test-timm-tiny", source="timm", path=str(tmp_path), base="mmfm-test"))
    try:
        with pytest.warns(UserWarning, match="freshly initialised"):
            model = mmfm.load("test-timm-tiny")
    finally:
        unregister_pretrained("test-timm-tiny")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encoders["image"].vit.forward_features(pixels), reference.forward_features(pixels)
        )


def test_a_name_of_another_architecture_lists_every_bad_key(tmp_path):
    path = tmp_path / "tiny.safetensors"
    reference = _reference(reg_tokens=1)
    from safetensors.torch import save_file

    save_file(reference.state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        convert("timm", path, model_name="vit_small_patch16_224")
    message = str(info.value)
    assert "vit_small_patch16_224" in message and str(path) in message
    assert "mis-shaped keys" in message and "blocks.0.attn.qkv.weight: file (96, 32) vs (1152, 384)" in message
    assert "missing keys (120)" in message and "blocks.11.norm1.weight" in message
    assert "unexpected keys" in message and "reg_token" in message


def test_wrong_names_and_missing_arguments_are_clear(tmp_path):
    reference = _reference()
    save_for_hf(reference, tmp_path, safe_serialization=True)
    with pytest.raises(CheckpointError, match="is timm 'vit_tiny_patch16_224', not 'vit_small_patch16_224'"):
        convert("timm", tmp_path, model_name="vit_small_patch16_224")
    with pytest.raises(ConfigError, match="'resnet50' is not a timm ViT-family model"):
        convert("timm", tmp_path / "model.safetensors", model_name="resnet50")
    with pytest.raises(ConfigError, match="needs model_name"):
        convert("timm", tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="cannot express: qkv_norm"):
        convert("timm", tmp_path / "model.safetensors", model_name="vit_tiny_patch16_224", qkv_norm=True)
    headless = tmp_path / "headless.pth"
    torch.save(_reference(num_classes=0).state_dict(), headless)
    with pytest.raises(CheckpointError, match="no classifier head"):
        convert("timm", headless, model_name="vit_tiny_patch16_224", keep_head=True, **TINY)


def test_timm_can_read_what_it_saved(tmp_path):
    # Guards the fixture: the directory really is in timm's format, as timm itself loads it.
    reference = _reference()
    save_for_hf(reference, tmp_path, safe_serialization=True)
    again = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    load_checkpoint(again, str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(again.pos_embed, reference.pos_embed)
