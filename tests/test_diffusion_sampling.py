"""The image_gen head's sampler: exactly a plain diffusers loop, every named scheduler, seeds, and bad arguments."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from benchmarks.bench_diffusion_sampling import diffusers_loop
from mmfm.config import SCHEDULERS, ImageGenHeadConfig
from mmfm.errors import InputError
from mmfm.heads.image_gen import ImageGenHead
from mmfm.heads.image_gen_schedulers import make_scheduler

DIM = 32
UNET = {"block_out_channels": [8, 16], "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 4}
DIT = {"architecture": "dit", "dit_width": 32, "dit_depth": 2, "attention_head_dim": 8, "patch_size": 2}
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def _head(**fields) -> ImageGenHead:
    torch.manual_seed(0)
    head = ImageGenHead(DIM, ImageGenHeadConfig(image_size=16, **{**UNET, **fields})).eval()
    with torch.no_grad():
        head.null_cond.normal_()  # a trained-looking null condition, so guidance mixes two different branches
    return head


def _conditions() -> tuple[torch.Tensor, torch.Tensor]:
    """Two (L=5, D) conditions, the second padded after three tokens."""
    cond = torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    return cond, mask


@pytest.mark.parametrize(
    ("name", "scheduler", "fields", "guidance"),
    [
        ("ddim", DDIMScheduler(**SCHEDULE, timestep_spacing="trailing", clip_sample=False), {}, 3.0),
        (
            "dpmsolver++",
            DPMSolverMultistepScheduler(**SCHEDULE, timestep_spacing="trailing", algorithm_type="dpmsolver++"),
            {},
            5.0,
        ),
        ("ddpm", DDPMScheduler(**SCHEDULE, timestep_spacing="trailing", clip_sample=False), {}, 2.0),
        ("euler", EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="trailing"), {}, 4.0),
        (
            "dpmsolver++",
            DPMSolverMultistepScheduler(**SCHEDULE, timestep_spacing="trailing", prediction_type="v_prediction"),
            {"prediction_type": "v_prediction"},
            3.0,
        ),
        ("ddim", DDIMScheduler(**SCHEDULE, timestep_spacing="trailing", clip_sample=False), DIT, 3.0),
    ],
    ids=["ddim", "dpmsolver++", "ddpm", "euler", "dpmsolver++-v", "ddim-dit"],
)
def test_sampling_equals_a_plain_diffusers_loop(name, scheduler, fields, guidance):
    head = _head(**fields)
    cond, mask = _conditions()
    null, null_mask = head.null_condition(2, 5, cond)
    generator = torch.Generator().manual_seed(3)
    expected = diffusers_loop(head.denoiser, scheduler, cond, mask, null, null_mask, 6, guidance, generator, 16)
    got = head.sample(
        cond, mask, name, num_inference_steps=6, guidance_scale=guidance, generator=torch.Generator().manual_seed(3)
    )
    assert got.shape == (2, 3, 16, 16)
    assert torch.equal(got, expected)


def test_guidance_one_runs_the_conditional_branch_alone():
    head = _head()
    cond, mask = _conditions()
    scheduler = make_scheduler("ddim", head.config)
    generator = torch.Generator().manual_seed(0)
    scheduler.set_timesteps(4)
    x = randn_tensor((2, 3, 16, 16), generator=generator)
    for t in scheduler.timesteps:
        out = head.denoiser(x, t, encoder_hidden_states=cond, encoder_attention_mask=mask, return_dict=False)[0]
        x = scheduler.step(out, t, x, return_dict=False)[0]
    got = head.sample(cond, mask, "ddim", 4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, (x / 2 + 0.5).clamp(0, 1))


def test_null_condition_reads_as_one_token_whatever_its_length():
    head = _head()
    short, short_mask = head.null_condition(1, 1, head.null_cond)
    long, long_mask = head.null_condition(1, 7, head.null_cond)
    assert long_mask.tolist() == [[True] + [False] * 6]
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(head.predict(x, t, short, short_mask), head.predict(x, t, long, long_mask))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_name_samples_in_range_and_repeats_with_its_seed(name):
    head = _head()
    cond, mask = _conditions()
    runs = [head.sample(cond, mask, name, 3, 2.0, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert runs[0].shape == (2, 3, 16, 16) and 0 <= runs[0].min() and runs[0].max() <= 1
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert type(make_scheduler(name, head.config)).__name__ == SCHEDULERS[name][0]


def test_scheduler_follows_the_training_noise_schedule():
    head = _head(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", num_train_timesteps=500)
    for name in SCHEDULERS:
        config = make_scheduler(name, head.config).config
        assert (config.beta_schedule, config.prediction_type, config.num_train_timesteps) == (
            "squaredcos_cap_v2",
            "v_prediction",
            500,
        )
    torch.testing.assert_close(make_scheduler("ddim", head.config).alphas_cumprod, head.noise_schedule.alphas_cumprod)


def test_num_images_and_batch_size_shape_the_output():
    head = _head()
    cond, mask = _conditions()
    whole = head.sample(cond, mask, "ddim", 2, 2.0, generator=torch.Generator().manual_seed(0), num_images=3)
    assert whole.shape == (6, 3, 16, 16)
    chunked = head.sample(
        cond, mask, "ddim", 2, 2.0, generator=torch.Generator().manual_seed(0), num_images=3, batch_size=4
    )
    torch.testing.assert_close(chunked, whole)  # DDIM adds no noise while stepping: batching changes nothing
    bigger = head.sample(cond, mask, "ddim", 2, 2.0, generator=torch.Generator().manual_seed(0), image_size=32)
    assert bigger.shape == (2, 3, 32, 32)


def test_a_scheduler_instance_is_used_as_given():
    head = _head()
    cond, mask = _conditions()
    custom = DPMSolverMultistepScheduler(**SCHEDULE, timestep_spacing="trailing", use_karras_sigmas=True)
    by_instance = head.sample(cond, mask, custom, 4, 2.0, generator=torch.Generator().manual_seed(0))
    by_name = head.sample(cond, mask, "dpmsolver++", 4, 2.0, generator=torch.Generator().manual_seed(0))
    assert by_instance.shape == by_name.shape and not torch.equal(by_instance, by_name)
    again = head.sample(cond, mask, custom, 4, 2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(by_instance, again)  # a reused instance starts afresh


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"scheduler": "heun"}, r"unknown scheduler 'heun'; valid names: ddpm, ddim, dpmsolver\+\+, euler"),
        ({"num_inference_steps": 0}, r"num_inference_steps must be a whole number in \[1, 1000\], got 0"),
        ({"num_inference_steps": 1001}, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"num_images": 0}, "num_images"),
        ({"batch_size": 0}, "batch_size"),
        ({"image_size": 17}, r"image_size: 17 is not a multiple of the UNet's downsampling factor 2"),
        ({"image_size": 0}, "image_size must be a whole number >= 1, got 0"),
    ],
)
def test_bad_sampling_arguments_are_input_errors_naming_them(kwargs, pattern):
    head = _head()
    cond, mask = _conditions()
    with pytest.raises(InputError, match=pattern):
        head.sample(cond, mask, **{"num_inference_steps": 2, **kwargs})
