"""The image_gen head: training targets and loss, condition dropout, latent space, checkpoints and config errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import mmfm
from mmfm.config import ImageGenHeadConfig
from mmfm.errors import ConfigError, InputError
from mmfm.heads.image_gen import ImageGenHead
from mmfm.pipelines import image_grid, to_pil

DIM = 32
UNET = {"block_out_channels": [8, 16], "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 4}


def _head(**fields) -> ImageGenHead:
    torch.manual_seed(0)
    return ImageGenHead(DIM, ImageGenHeadConfig(image_size=16, **{**UNET, **fields}))


def _alphas_cumprod(num_steps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02) -> torch.Tensor:
    """The linear schedule's cumulative alphas, by hand (DDPM: beta_t evenly spaced, alpha_bar_t = prod(1 - beta))."""
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1 - betas))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_regresses_the_noise_or_the_velocity(prediction_type):
    head = _head(prediction_type=prediction_type, cond_dropout=0.5).eval()  # eval: no condition dropout
    cond, mask = torch.randn(4, 3, DIM), torch.ones(4, 3, dtype=torch.bool)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.manual_seed(7)
    loss = head.loss(cond, mask, x0)

    torch.manual_seed(7)  # replay the draws the loss makes from the global RNG: timesteps, then noise
    t = torch.randint(0, 1000, (4,))
    noise = torch.randn_like(x0)
    a = _alphas_cumprod()[t].float().view(4, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    velocity = a.sqrt() * noise - (1 - a).sqrt() * x0
    with torch.no_grad():
        prediction = head.predict(noisy, t, cond, mask)
    right, wrong = (noise, velocity) if prediction_type == "epsilon" else (velocity, noise)
    torch.testing.assert_close(loss, F.mse_loss(prediction, right), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(loss, F.mse_loss(prediction, wrong), rtol=1e-2)
    torch.manual_seed(7)
    torch.testing.assert_close(head.loss(cond, mask, x0, reduction="sum"), 4 * loss)  # per-image MSEs summed
    with pytest.raises(InputError, match="reduction must be 'mean' or 'sum'"):
        head.loss(cond, mask, x0, reduction="none")


def test_loss_repeats_under_the_same_global_seed_and_trains_the_denoiser_and_condition():
    head = _head(cond_dropout=0.3).train()
    cond = torch.randn(6, 3, DIM, requires_grad=True)
    mask = torch.ones(6, 3, dtype=torch.bool)
    x0 = torch.rand(6, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    first = head.loss(cond, mask, x0)
    torch.manual_seed(1)
    assert torch.equal(head.loss(cond, mask, x0), first)
    first.backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.denoiser.parameters() if p.requires_grad)


def test_condition_dropout_replaces_exactly_the_dropped_rows_with_the_null_condition():
    head = _head(cond_dropout=0.3)
    with torch.no_grad():
        head.null_cond.normal_()
    B, L = 2000, 4
    cond = torch.randn(B, L, DIM)
    mask = torch.rand(B, L) < 0.8
    mask[:, 0] = True
    out, out_mask = head.drop_condition(cond, mask)
    null_row = head.null_cond.expand(L, DIM)
    dropped = torch.tensor([torch.equal(out[i], null_row) for i in range(B)])
    kept = ~dropped
    assert torch.equal(out[kept], cond[kept]) and torch.equal(out_mask[kept], mask[kept])
    assert out_mask[dropped].tolist() == [[True, False, False, False]] * int(dropped.sum())
    assert 0.25 < dropped.float().mean() < 0.35
    assert head.drop_condition(cond, mask)[0] is not out  # a fresh draw each call
    no_dropout = _head(cond_dropout=0.0)
    assert no_dropout.drop_condition(cond, mask)[0] is cond


def test_loss_refuses_targets_of_the_wrong_shape():
    head = _head()
    with pytest.raises(InputError, match=r"target images must be \(B, 3, 16, 16\) in \[-1, 1\], got \(2, 1, 16, 16\)"):
        head.loss(torch.randn(2, 3, DIM), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 1, 16, 16))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory, tiny_vae):
    """A tiny random AutoencoderKL (downsampling factor 2, 4 latent channels) saved with save_pretrained."""
    torch.manual_seed(0)
    vae = tiny_vae()
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def _latent_model(vae_dir, **fields):
    image_gen = {"space": "latent", "vae_path": str(vae_dir), "image_size": 16, **fields}
    return mmfm.create_model("mmfm-test", image_gen=image_gen).eval()


def test_latent_space_denoises_vae_latents_and_decodes_them(vae_dir):
    model = _latent_model(vae_dir)
    head = model.heads["image_gen"]
    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert head.vae_factor == 2 and head.denoiser.config.in_channels == 4
    assert not any(p.requires_grad for p in head.vae.parameters())
    for a, b in zip(head.vae.state_dict().values(), vae.state_dict().values()):
        assert torch.equal(a, b)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    latents = head.encode(images)
    torch.manual_seed(0)
    expected = vae.encode(images).latent_dist.sample() * 0.5
    torch.testing.assert_close(latents, expected)
    assert latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(head.decode(latents), (vae.decode(expected / 0.5).sample / 2 + 0.5).clamp(0, 1))
    out = model.generate_image(text=["a", "b"], num_inference_steps=2, seed=0)
    assert [im.size for im in out] == [(16, 16)] * 2
    ids, mask = model.tokenizer(["a", "b"], 32)
    model.train()
    loss = model.image_gen_loss(None, ids, mask, images)
    loss.backward()
    assert all(p.grad is None for p in head.vae.parameters())


def _images(model) -> list[np.ndarray]:
    return [np.asarray(im) for im in model.generate_image(text=["x", "y"], num_inference_steps=3, seed=4)]


def test_latent_checkpoint_holds_its_vae_and_loads_after_moving_without_the_source_vae(tiny_vae, tmp_path):
    torch.manual_seed(1)
    tiny_vae().save_pretrained(tmp_path / "source_vae")
    model = _latent_model(tmp_path / "source_vae")
    with torch.no_grad():
        for p in model.heads["image_gen"].denoiser.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights that only the checkpoint has
    reference = {k: v.clone() for k, v in model.heads["image_gen"].vae.state_dict().items()}
    model.save_pretrained(tmp_path / "ckpt")

    keys = load_file(tmp_path / "ckpt" / "model.safetensors").keys()
    assert not any(".vae." in k for k in keys) and any(k.startswith("heads.image_gen.denoiser.") for k in keys)
    assert sorted(f.name for f in (tmp_path / "ckpt" / "vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())["image_gen"]["vae_path"] == "vae"
    assert model.config.image_gen.vae_path == str(tmp_path / "source_vae")  # the model's own config is unchanged

    shutil.rmtree(tmp_path / "source_vae")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(tmp_path / "ckpt", moved)
    loaded = mmfm.load(moved)
    assert loaded.config.image_gen.vae_path == str((moved / "vae").absolute())
    for key, value in loaded.heads["image_gen"].vae.state_dict().items():
        assert torch.equal(value, reference[key]), key
    expected = _images(model)
    assert all(np.array_equal(a, b) for a, b in zip(expected, _images(loaded)))

    loaded.save_pretrained(moved)  # saving into the folder the VAE was read from keeps it
    again = mmfm.load(moved)
    assert all(np.array_equal(a, b) for a, b in zip(expected, _images(again)))
    state = model.state_dict()  # the trainer's own checkpoints: a strict load still works without the VAE
    assert not any(".vae." in k for k in state)
    again.load_state_dict(state, strict=True)


def test_a_pixel_model_saved_over_a_latent_checkpoint_removes_only_the_vae_mmfm_wrote(vae_dir, tmp_path):
    latent, pixel = _latent_model(vae_dir), mmfm.create_model("mmfm-test").eval()
    latent.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    pixel.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "vae").exists()
    assert (tmp_path / "ckpt" / "notes.txt").exists()
    assert mmfm.load(tmp_path / "ckpt").config.image_gen.space == "pixel"

    pipeline = tmp_path / "pipeline"  # a folder whose vae/ no mmfm save wrote (a diffusers pipeline, say)
    AutoencoderKL.from_pretrained(vae_dir).save_pretrained(pipeline / "vae")
    pixel.save_pretrained(pipeline)
    assert (pipeline / "vae" / "config.json").is_file()


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"image_size": 15}, r"image_gen.image_size: 15 is not a multiple of the VAE's downsampling factor 2"),
        ({"image_size": 18}, r"image_gen.image_size: 18 in latent space \(9 latent pixels\) is not a multiple"),
        ({"channels": 1}, r"image_gen.channels \(1\) does not match the VAE in image_gen.vae_path"),
    ],
)
def test_latent_sizes_and_channels_the_vae_cannot_make_are_config_errors(vae_dir, fields, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _latent_model(vae_dir, **fields)


def test_latent_image_size_at_call_time_is_an_input_error(vae_dir):
    model = _latent_model(vae_dir)
    with pytest.raises(InputError, match=r"image_size: 15 is not a multiple of the VAE's downsampling factor 2"):
        model.generate_image(text=["a"], image_size=15)
    with pytest.raises(InputError, match=r"image_size: 22 in latent space \(11 latent pixels\)"):
        model.generate_image(text=["a"], image_size=22)


def test_missing_or_unreadable_vae_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="image_gen.vae_path: .*absent.* is not a diffusers AutoencoderKL directory"):
        _latent_model(tmp_path / "absent")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="image_gen.vae_path: .*broken.* cannot be loaded as an AutoencoderKL"):
        _latent_model(tmp_path / "broken")


def test_dit_denoiser_trains_and_samples():
    dit = {"architecture": "dit", "dit_width": 32, "dit_depth": 1, "attention_head_dim": 8, "patch_size": 4}
    model = mmfm.create_model("mmfm-test", image_gen={"image_size": 16, **dit})
    head = model.heads["image_gen"]
    assert type(head.denoiser).__name__ == "PixArtTransformer2DModel"
    ids, mask = model.tokenizer(["a", "bb"], 32)
    model.image_gen_loss(None, ids, mask, torch.zeros(2, 3, 16, 16)).backward()
    assert head.denoiser.caption_projection.linear_1.weight.grad is not None
    out = model.eval().generate_image(text="a", num_images=2, num_inference_steps=2, seed=0)
    assert len(out) == 2 and out[0].size == (16, 16)
    with pytest.raises(InputError, match="image_size: 18 is not a multiple of the DiT patch size 4"):
        model.generate_image(text="a", image_size=18)


def test_save_pretrained_then_load_gives_identical_samples(tmp_path):
    torch.manual_seed(0)
    model = mmfm.create_model("mmfm-test").eval()
    with torch.no_grad():
        model.heads["image_gen"].null_cond.normal_()
    model.save_pretrained(tmp_path)
    loaded = mmfm.load(tmp_path)
    kwargs = {"num_images": 2, "num_inference_steps": 4, "seed": 11}
    for a, b in zip(
        model.generate_image(text=["red", "blue"], **kwargs), loaded.generate_image(text=["red", "blue"], **kwargs)
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_generate_image_conditions_on_text_audio_and_images():
    torch.manual_seed(0)
    model = mmfm.create_model("mmfm-test").eval()
    clip = (np.sin(np.linspace(0, 300, 8000)).astype(np.float32), 16000)
    picture = np.zeros((20, 20, 3), np.float32)
    for out in (
        model.generate_image(text=["a", "b"], num_images=3, num_inference_steps=2, seed=0),
        model.generate_image(audio=[clip, clip], num_images=3, num_inference_steps=2, seed=0),
        model.generate_image(images=[picture, picture], num_images=3, num_inference_steps=2, seed=0),
        model.generate_image(text=["a", "b"], images=[picture, picture], num_images=3, num_inference_steps=2, seed=0),
    ):
        assert len(out) == 6 and {(im.mode, im.size) for im in out} == {("RGB", (16, 16))}
    by_seed = [model.generate_image(text="a", num_inference_steps=2, seed=s)[0] for s in (5, 5, 6)]
    assert np.array_equal(np.asarray(by_seed[0]), np.asarray(by_seed[1]))
    assert not np.array_equal(np.asarray(by_seed[0]), np.asarray(by_seed[2]))
    generator = torch.Generator().manual_seed(5)
    assert np.array_equal(
        np.asarray(model.generate_image(text="a", num_inference_steps=2, generator=generator)[0]),
        np.asarray(by_seed[0]),
    )


def test_generate_image_bad_input_is_named():
    model = mmfm.create_model("mmfm-test", audio=None).eval()
    clip = (np.zeros(1600, np.float32), 16000)
    with pytest.raises(InputError, match="no 'audio' encoder"):
        model.generate_image(audio=[clip])
    with pytest.raises(InputError, match="generate_image needs text=, images= or audio="):
        model.generate_image()
    with pytest.raises(InputError, match="pass seed= or generator=, not both"):
        model.generate_image(text="a", seed=1, generator=torch.Generator())
    with pytest.raises(InputError, match="got 2 texts for 1 media items"):
        model.generate_image(text=["a", "b"], images=[np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(InputError, match="guidance_scale"):
        model.generate_image(text="a", guidance_scale=-2)
    with pytest.raises(InputError, match="num_inference_steps"):
        model.generate_image(text="a", num_inference_steps=0)
    with pytest.raises(InputError, match="image_size: 17 is not a multiple of the UNet's downsampling factor 2"):
        model.generate_image(text="a", image_size=17)
    with pytest.raises(InputError, match="unknown scheduler 'plms'"):
        model.generate_image(text="a", scheduler="plms")
    without = mmfm.create_model("mmfm-test", image_gen=None)
    with pytest.raises(InputError, match="no 'image_gen' head.*config.image_gen"):
        without.generate_image(text="a")


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"image_gen.image_size": 17}, r"image_gen.image_size \(17\) must be a multiple of the UNet's downsampling"),
        ({"image_gen.image_size": 0}, "image_gen.image_size must be positive"),
        (
            {"image_gen.architecture": "dit", "image_gen.patch_size": 3},
            r"image_gen.image_size \(16\) .*image_gen.patch_size \(3\)",
        ),
        ({"image_gen.space": "latent"}, "image_gen.vae_path must name a diffusers AutoencoderKL directory"),
        ({"image_gen.vae_path": "vae/"}, "image_gen.vae_path is only read in latent space"),
        ({"image_gen.channels": 2}, "image_gen.channels must be 1 .* or 3"),
        ({"image_gen.norm_num_groups": 3}, "image_gen.norm_num_groups .* must divide every"),
        ({"image_gen.cond_dropout": 1.0}, r"image_gen.cond_dropout must be in \[0, 1\)"),
        ({"image_gen.guidance_scale": -1.0}, "image_gen.guidance_scale must be a finite number >= 0"),
        ({"image_gen.num_inference_steps": 0}, "image_gen.num_inference_steps must be in"),
        ({"image_gen.num_inference_steps": 2000}, "image_gen.num_inference_steps must be in"),
        ({"image_gen.beta_end": 0.00001}, "image_gen.beta_start .* and beta_end"),
        ({"image_gen.scheduler": "heun"}, r"'image_gen.scheduler' must be one of \['ddpm', 'ddim', 'dpmsolver\+\+'"),
        ({"image_gen.prediction_type": "sample"}, "'image_gen.prediction_type' must be one of"),
    ],
)
def test_impossible_image_gen_configs_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        mmfm.create_model("mmfm-test", **override)


def test_image_gen_targets_undo_the_processor_and_match_the_head():
    model = mmfm.create_model("mmfm-test")
    colour = np.zeros((40, 40, 3), np.float32)
    colour[:] = (0.2, 0.6, 1.0)
    halves = np.zeros((40, 40, 3), np.float32)
    halves[:, 20:] = 1.0  # black left half, white right half
    targets = model.image_gen_targets(model.processors["image"]([colour, halves]))
    assert targets.shape == (2, 3, 16, 16) and targets.min() >= -1 and targets.max() <= 1
    expected = torch.tensor([0.2, 0.6, 1.0]).view(3, 1, 1) * 2 - 1
    torch.testing.assert_close(targets[0], expected.expand(3, 16, 16), atol=2 / 255, rtol=0)
    assert (targets[1, :, :, :6] < -0.99).all() and (targets[1, :, :, 10:] > 0.99).all()

    grey = mmfm.create_model("mmfm-test", image_gen={"channels": 1})
    luma = grey.image_gen_targets(grey.processors["image"]([colour]))
    assert luma.shape == (1, 1, 16, 16)
    torch.testing.assert_close(
        luma, torch.full_like(luma, (0.299 * 0.2 + 0.587 * 0.6 + 0.114) * 2 - 1), atol=2e-2, rtol=0
    )
    with pytest.raises(InputError, match=r"pixels must be \(B, 3, H, W\)"):
        model.image_gen_targets(torch.zeros(1, 1, 32, 32))


def test_to_pil_and_image_grid():
    images = torch.stack([torch.full((1, 4, 6), v) for v in (0.0, 0.5, 1.0)])
    pil = to_pil(images)
    assert [im.mode for im in pil] == ["L"] * 3 and pil[0].size == (6, 4)
    assert [np.asarray(im)[0, 0] for im in pil] == [0, 128, 255]
    grid = image_grid(pil, columns=2)
    assert grid.size == (12, 8)
    array = np.asarray(grid)
    assert array[0, 0] == 0 and array[0, 6] == 128 and array[4, 0] == 255 and array[4, 6] == 0
