"""diffusers -> the image_gen head: tiny random UNets, VAEs and schedulers saved by diffusers, parity and errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch.testing import assert_close

import mmfm
from mmfm.cli import main
from mmfm.convert import build_config, convert, list_sources
from mmfm.errors import CheckpointError, ConfigError
from mmfm.loader import from_converted

DIM = 64  # mmfm-test's backbone.dim: what the UNet cross-attends to
# Two levels of 8 and 16 channels with 2 and 4 heads: 4 channels per head at both, as mmfm's head needs.
UNET = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=DIM,
    attention_head_dim=(2, 4),  # diffusers' name for heads per level
)
# Not ImageGenHeadConfig's defaults, so the test sees each one carried over.
SCHEDULE = dict(
    num_train_timesteps=500,
    beta_schedule="scaled_linear",
    beta_start=0.001,
    beta_end=0.015,
    prediction_type="v_prediction",
    timestep_spacing="leading",
)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values for every weight (diffusers zero-initialises some), so the test sees each one carried."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def _unet(seed: int = 0, **fields) -> UNet2DConditionModel:
    return _randomise(UNet2DConditionModel(**{**UNET, **fields}), seed)


@pytest.fixture(scope="module")
def pixel_pipeline(tmp_path_factory):
    """A pipeline directory: unet/ (3-channel pixels, 16 px) and scheduler/."""
    directory = tmp_path_factory.mktemp("pixel_pipeline")
    unet = _unet(sample_size=16, in_channels=3, out_channels=3)
    unet.save_pretrained(directory / "unet")
    scheduler = DDPMScheduler(**SCHEDULE)
    scheduler.save_pretrained(directory / "scheduler")
    return directory, unet, scheduler


@pytest.fixture(scope="module")
def latent_pipeline(tmp_path_factory, tiny_vae):
    """A pipeline directory: unet/ (4 latent channels, 8 latent px), vae/ (factor 2, RGB) and scheduler/."""
    directory = tmp_path_factory.mktemp("latent_pipeline")
    unet = _unet(seed=1, sample_size=8, in_channels=4, out_channels=4)
    unet.save_pretrained(directory / "unet")
    vae = _randomise(tiny_vae(), seed=2)
    vae.save_pretrained(directory / "vae")
    DDPMScheduler(**SCHEDULE).save_pretrained(directory / "scheduler")
    return directory, unet, vae


def _inputs(channels: int, size: int, seed: int = 0):
    """Noisy inputs, timesteps, conditions and a mask with padding in the second row."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, size, size, generator=generator)
    cond = torch.randn(2, 5, DIM, generator=generator)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    return x, torch.tensor([17, 480]), cond, mask


def _assert_denoiser_matches(head, unet, channels: int, size: int) -> None:
    x, t, cond, mask = _inputs(channels, size)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=cond, encoder_attention_mask=mask).sample
        got = head.predict(x, t, cond, mask)
    assert got.shape == (2, channels, size, size) and expected.abs().max() > 0.1
    assert_close(got, expected)  # fp32 defaults


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **fields):
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **fields}))


def test_diffusers_is_a_registered_source():
    assert "diffusers" in list_sources()


@pytest.mark.parametrize("layout", ["pipeline", "bare unet"])
def test_denoiser_output_equals_the_diffusers_unet(pixel_pipeline, layout):
    directory, unet, _ = pixel_pipeline
    converted = convert("diffusers", directory if layout == "pipeline" else directory / "unet")
    model, fresh = from_converted(converted, "mmfm-test", str(directory))
    gen = model.config.image_gen

    assert "heads.image_gen" not in fresh and "backbone" in fresh
    assert (gen.space, gen.vae_path, gen.image_size, gen.channels) == ("pixel", None, 16, 3)
    assert (gen.block_out_channels, gen.layers_per_block, gen.norm_num_groups) == ([8, 16], 1, 4)
    assert gen.attention_head_dim == 4  # channels per head, from 8 / 2 and 16 / 4 heads
    assert torch.equal(model.heads["image_gen"].null_cond, torch.zeros(DIM))
    _assert_denoiser_matches(model.heads["image_gen"], unet, 3, 16)


def test_the_unet_reads_the_models_backbone_states(pixel_pipeline):
    directory, unet, _ = pixel_pipeline
    model, _ = from_converted(convert("diffusers", directory), "mmfm-test")
    ids, mask = model.tokenizer(["a red square", "two"], model.config.text.max_length)
    x, t, _, _ = _inputs(3, 16, seed=1)
    with torch.no_grad():
        cond, cond_mask = model.image_gen_condition(ids=ids, mask=mask)  # (2, L, 64)
        expected = unet(x, t, encoder_hidden_states=cond, encoder_attention_mask=cond_mask).sample
        got = model.heads["image_gen"].predict(x, t, cond, cond_mask)
    assert_close(got, expected)


def test_the_pipelines_noise_schedule_arrives_in_the_config(pixel_pipeline):
    directory, _, scheduler = pixel_pipeline
    model, _ = from_converted(convert("diffusers", directory), "mmfm-test")
    gen = model.config.image_gen

    assert {key: getattr(gen, key) for key in SCHEDULE} == SCHEDULE
    assert_close(model.heads["image_gen"].noise_schedule.alphas_cumprod, scheduler.alphas_cumprod)
    defaults = mmfm.config.ImageGenHeadConfig()
    bare = convert("diffusers", directory / "unet").config["image_gen"]  # no scheduler/: the head's defaults
    assert {key: getattr(bare, key) for key in SCHEDULE} == {key: getattr(defaults, key) for key in SCHEDULE}


def test_latent_pipeline_points_vae_path_at_its_vae_and_decodes_like_it(latent_pipeline):
    directory, unet, vae = latent_pipeline
    model, _ = from_converted(convert("diffusers", directory), "mmfm-test")
    gen, head = model.config.image_gen, model.heads["image_gen"]

    assert (gen.space, gen.vae_path) == ("latent", str((directory / "vae").absolute()))
    assert (gen.image_size, gen.channels) == (16, 3)  # 8 latent pixels x the VAE's factor 2; the VAE's RGB
    _assert_denoiser_matches(head, unet, 4, 8)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = (vae.decode(latents / 0.5).sample / 2 + 0.5).clamp(0, 1)  # scaling_factor 0.5
        got = head.decode(latents)
    assert_close(got, expected)

    bare = convert("diffusers", directory / "unet", vae_path=directory / "vae").config["image_gen"]
    assert (bare.space, bare.vae_path, bare.image_size) == ("latent", gen.vae_path, 16)


def test_cli_convert_writes_a_self_contained_model_with_its_vae(latent_pipeline, tmp_path, capsys):
    directory, unet, vae = latent_pipeline
    pipeline, out = _copy(directory, tmp_path / "pipeline"), tmp_path / "out"

    assert main(["convert", str(pipeline), str(out), "--from", "diffusers", "--base", "mmfm-test"]) == 0
    assert "freshly initialised from mmfm-test: backbone" in capsys.readouterr().err
    shutil.rmtree(pipeline)  # the checkpoint needs nothing from the pipeline any more
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    model = mmfm.load(moved)
    assert model.config.image_gen.vae_path == str((moved / "vae").absolute())
    _assert_denoiser_matches(model.heads["image_gen"], unet, 4, 8)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(model.heads["image_gen"].decode(latents), (vae.decode(latents / 0.5).sample / 2 + 0.5).clamp(0, 1))


def test_backbone_dim_is_the_unets_cross_attention_dim_merged_over_the_base(pixel_pipeline):
    converted = convert("diffusers", pixel_pipeline[0])
    tiny = mmfm.registry.get_preset("mmfm-tiny")  # backbone.dim 256

    config = build_config(converted.config, tiny)
    assert config.backbone.dim == DIM and config.backbone.depth == tiny.backbone.depth
    with pytest.raises(ConfigError, match=r"backbone.num_heads \(12\) must divide backbone.dim \(64\)"):
        build_config(converted.config, "mmfm-base")


def test_weights_files_bin_and_variants(pixel_pipeline, tmp_path):
    directory, unet, _ = pixel_pipeline
    reference = convert("diffusers", directory / "unet").state_dict
    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    unet.save_pretrained(tmp_path / "fp16", variant="fp16")

    for state in (
        convert("diffusers", tmp_path / "bin").state_dict,
        convert("diffusers", tmp_path / "fp16", variant="fp16").state_dict,
    ):
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    with pytest.raises(CheckpointError, match=r"found diffusion_pytorch_model.fp16.safetensors \(another variant=\?\)"):
        convert("diffusers", tmp_path / "fp16")


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        (
            {"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]},
            r"down_block_types \['CrossAttnDownBlock2D', 'DownBlock2D'\] \(mmfm's head has a CrossAttnDownBlock2D",
        ),
        (
            {"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
            r"up_block_types \['UpBlock2D', 'CrossAttnUpBlock2D'\]",
        ),
        ({"mid_block_type": None}, r"mid_block_type None"),
        ({"out_channels": 1}, r"in_channels 3 != out_channels 1"),
        (
            {"class_embed_type": "timestep"},
            r"class_embed_type 'timestep' \(mmfm's head builds diffusers' default, None\)",
        ),
        ({"addition_embed_type": "text"}, r"addition_embed_type 'text'"),
        ({"attention_head_dim": 2}, r"attention_head_dim 2 \(heads per level.*gives \[4.0, 8.0\] channels per head"),
        ({"attention_head_dim": [3, 4]}, r"gives \[2.667, 4.0\] channels per head"),
        ({"transformer_layers_per_block": 2}, r"transformer_layers_per_block 2 "),
        ({"use_linear_projection": True}, r"use_linear_projection True"),
        ({"layers_per_block": [1, 2]}, r"layers_per_block \[1, 2\]"),
        ({"cross_attention_dim": [64, 32]}, r"cross_attention_dim \[64, 32\]"),
        (
            {"in_channels": 4, "out_channels": 4},
            r"in_channels 4 cannot be pixels .* vae/ folder beside unet/, or vae_path=",
        ),
    ],
)
def test_unet_settings_the_head_cannot_represent_are_named(pixel_pipeline, tmp_path, fields, pattern):
    unet_dir = _copy(pixel_pipeline[0] / "unet", tmp_path / "unet")
    _edit_config(unet_dir / "config.json", **fields)
    with pytest.raises(ConfigError, match=r"unet/config.json: .*" + pattern):
        convert("diffusers", unet_dir)


def test_every_problem_is_listed_at_once_and_equivalent_spellings_pass(pixel_pipeline, tmp_path):
    unet_dir = _copy(pixel_pipeline[0] / "unet", tmp_path / "unet")
    _edit_config(unet_dir / "config.json", dropout=0.1, upcast_attention=True, time_embedding_type="fourier")
    with pytest.raises(ConfigError) as e:
        convert("diffusers", unet_dir)
    assert all(f in str(e.value) for f in ("dropout 0.1", "upcast_attention True", "time_embedding_type 'fourier'"))

    same = dict(
        transformer_layers_per_block=[1, 1],
        only_cross_attention=[False, False],
        mid_block_only_cross_attention=False,
        layers_per_block=[1, 1],
        sample_size=[16, 16],
        attention_head_dim=[2, 4],
    )
    _edit_config(
        unet_dir / "config.json", dropout=0.0, upcast_attention=False, time_embedding_type="positional", **same
    )
    gen = convert("diffusers", unet_dir).config["image_gen"]
    assert (gen.layers_per_block, gen.image_size, gen.attention_head_dim) == (1, 16, 4)


def test_another_diffusers_class_is_named(pixel_pipeline, tmp_path):
    unet_dir = _copy(pixel_pipeline[0] / "unet", tmp_path / "unet")
    _edit_config(unet_dir / "config.json", _class_name="UNet2DModel")
    with pytest.raises(CheckpointError, match=r"_class_name is 'UNet2DModel', not 'UNet2DConditionModel'"):
        convert("diffusers", unet_dir)


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"beta_schedule": "sigmoid"}, r"beta_schedule 'sigmoid' \(mmfm's head takes 'linear', 'scaled_linear'"),
        ({"prediction_type": "sample"}, r"prediction_type 'sample'"),
        ({"rescale_betas_zero_snr": True}, r"rescale_betas_zero_snr true"),
        ({"trained_betas": [0.1] * 500}, r"trained_betas"),
    ],
)
def test_noise_schedules_the_head_cannot_use_are_named(pixel_pipeline, tmp_path, fields, pattern):
    directory = _copy(pixel_pipeline[0], tmp_path / "pipeline")
    _edit_config(directory / "scheduler" / "scheduler_config.json", **fields)
    with pytest.raises(ConfigError, match=r"scheduler/scheduler_config.json: .*" + pattern):
        convert("diffusers", directory)


def test_a_flow_matching_scheduler_is_refused(pixel_pipeline, tmp_path):
    directory = _copy(pixel_pipeline[0], tmp_path / "pipeline")
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(flow))
    with pytest.raises(ConfigError, match=r"FlowMatchEulerDiscreteScheduler has no beta_schedule"):
        convert("diffusers", directory)


def test_a_vae_whose_latents_are_not_the_unets_is_named(latent_pipeline, tmp_path):
    directory = _copy(latent_pipeline[0], tmp_path / "pipeline")
    _edit_config(directory / "vae" / "config.json", latent_channels=8)
    with pytest.raises(ConfigError, match=r"vae/config.json: latent_channels 8 != the UNet's in_channels 4"):
        convert("diffusers", directory)


def test_missing_config_files_are_named(pixel_pipeline, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no config.json .* and no unet/ folder"):
        convert("diffusers", tmp_path / "empty")
    directory = _copy(pixel_pipeline[0], tmp_path / "pipeline")
    (directory / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"unet/config.json: missing"):
        convert("diffusers", directory)


def test_truncated_and_missing_weights_are_named(pixel_pipeline, tmp_path):
    unet_dir = _copy(pixel_pipeline[0] / "unet", tmp_path / "unet")
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: cannot be read .* truncated"):
        convert("diffusers", unet_dir)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"unet: no weights file .*diffusion_pytorch_model.safetensors"):
        convert("diffusers", unet_dir)


def test_weights_of_another_shape_list_their_keys(pixel_pipeline, tmp_path):
    deeper = tmp_path / "deeper"
    _unet(sample_size=16, in_channels=3, out_channels=3, layers_per_block=2).save_pretrained(deeper)
    _edit_config(deeper / "config.json", layers_per_block=1)  # config.json and weights disagree
    with pytest.raises(CheckpointError) as e:
        convert("diffusers", deeper)
    message = str(e.value)
    assert "diffusion_pytorch_model.safetensors: the weights are not those of the UNet2DConditionModel" in message
    assert "unexpected keys" in message and "down_blocks.0.resnets.1.conv1.weight" in message
