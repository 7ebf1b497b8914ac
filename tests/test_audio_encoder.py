"""AudioEncoder: AST's overlapping-patch geometry, parity with a plain timm ViT, prefix tokens, and errors."""

from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mmfm.config import AudioEncoderConfig
from mmfm.encoders.audio import AudioEncoder, StridedPatchEmbed
from mmfm.errors import ConfigError, InputError


def tiny(**overrides) -> AudioEncoderConfig:
    fields = dict(
        model_name="vit_tiny_patch16_224",
        num_mel_bins=32,
        target_frames=64,
        patch_size=16,
        patch_stride=16,
        width=32,
        depth=1,
        num_heads=2,
    )
    return AudioEncoderConfig(**(fields | overrides))


def test_ast_geometry_gives_12_by_101_patches():
    encoder = AudioEncoder(AudioEncoderConfig(width=32, depth=1, num_heads=2)).eval()  # 128 mel x 1024 frames

    assert encoder.vit.patch_embed.grid_size == (12, 101)
    assert encoder.num_tokens == 1212
    assert encoder.vit.pos_embed.shape == (1, 1212 + 1, 32)
    with torch.no_grad():
        assert encoder(torch.randn(1, 1024, 128)).shape == (1, 1212, 32)


def test_tiny_overlapping_config():
    encoder = AudioEncoder(tiny(patch_stride=8)).eval()  # (32 - 16) // 8 + 1 = 3 by (64 - 16) // 8 + 1 = 7

    assert encoder.vit.patch_embed.grid_size == (3, 7)
    assert encoder.num_tokens == 21 and encoder.width == 32
    assert encoder.vit.pos_embed.shape == (1, 22, 32)
    assert encoder(torch.randn(2, 64, 32)).shape == (2, 21, 32)


def test_strided_patch_embed_equals_patches_cut_by_hand():
    embed = StridedPatchEmbed(img_size=(32, 64), patch_size=16, in_chans=1, embed_dim=8, stride=(8, 12))
    x = torch.randn(2, 1, 32, 64)
    weight, bias = embed.proj.weight.reshape(8, -1), embed.proj.bias  # (D, 16 * 16)

    rows, cols = embed.grid_size
    assert (rows, cols) == (3, 5)  # (32 - 16) // 8 + 1, (64 - 16) // 12 + 1
    expected = torch.stack(
        [x[:, :, 8 * i : 8 * i + 16, 12 * j : 12 * j + 16].flatten(1) for i in range(rows) for j in range(cols)],
        dim=1,
    )  # (B, patches, 16 * 16), row-major over (mel, frames)

    assert_close(embed(x), F.linear(expected, weight, bias))


def test_output_equals_a_timm_vit_with_the_same_weights():
    config = tiny(patch_stride=10, reg_tokens=1)
    encoder = AudioEncoder(config).eval()
    reference = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        global_pool="",
        in_chans=1,
        img_size=(32, 64),
        patch_size=16,
        embed_dim=32,
        depth=1,
        num_heads=2,
        reg_tokens=1,
        embed_layer=partial(StridedPatchEmbed, stride=10),
    ).eval()
    state = encoder.state_dict()
    assert all(key.startswith("vit.") for key in state)
    reference.load_state_dict({key.removeprefix("vit."): value for key, value in state.items()})
    fbank = torch.randn(2, 64, 32)  # (B, frames, mel)

    with torch.no_grad():
        expected = reference.forward_features(fbank.transpose(1, 2).unsqueeze(1))[:, 2:]  # drop class + register
        out = encoder(fbank)

    assert out.shape == (2, 2 * 5, 32)
    assert_close(out, expected)


def test_prefix_tokens_kept_or_dropped():
    dropped = AudioEncoder(tiny(reg_tokens=2)).eval()
    kept = AudioEncoder(tiny(reg_tokens=2, keep_prefix_tokens=True)).eval()
    kept.load_state_dict(dropped.state_dict())
    fbank = torch.randn(1, 64, 32)

    with torch.no_grad():
        out_kept, out_dropped = kept(fbank), dropped(fbank)

    assert dropped.num_tokens == 8 and kept.num_tokens == 8 + 3
    assert out_kept.shape == (1, 11, 32) and out_dropped.shape == (1, 8, 32)
    assert_close(out_kept[:, 3:], out_dropped)
    assert AudioEncoder(tiny(class_token=False, keep_prefix_tokens=True)).num_tokens == 8


def test_distilled_deit_gives_ast_class_and_distillation_tokens():
    encoder = AudioEncoder(tiny(model_name="deit_tiny_distilled_patch16_224", keep_prefix_tokens=True))
    assert encoder.vit.num_prefix_tokens == 2 and encoder.num_tokens == 8 + 2
    assert encoder(torch.randn(1, 64, 32)).shape == (1, 10, 32)


@pytest.mark.parametrize("name", ["resnet18", "not_a_model"])
def test_non_vit_model_names_are_config_errors(name):
    with pytest.raises(ConfigError, match=rf"audio\.model_name: '{name}'"):
        AudioEncoder(tiny(model_name=name))


def test_misspelled_model_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'vit_tiny_patch16_224'"):
        AudioEncoder(tiny(model_name="vit_tiny_patch16_22"))


@pytest.mark.parametrize("shape", [(2, 32, 64), (64, 32), (2, 1, 64, 32)])
def test_wrong_input_shape_is_an_input_error(shape):
    encoder = AudioEncoder(tiny())

    with pytest.raises(InputError, match=r"expects features of shape \(B, 64, 32\)"):
        encoder(torch.randn(shape))
