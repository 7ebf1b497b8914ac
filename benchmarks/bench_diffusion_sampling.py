"""Image sampling: mmfm's `ImageGenHead.sample` against a plain diffusers loop with the same UNet and scheduler.

The diffusers side is the loop a diffusers text-to-image pipeline runs, written out (a pipeline cannot take
mmfm's backbone states and their attention mask as they are): the null and real conditions in one batch,
`scale_model_input`, the UNet, the classifier-free guidance mix and `scheduler.step`, then the same mapping of
pixels to [0, 1]. Both sides get the same UNet (one module), the same conditions, the same DPM-Solver++
scheduler settings and the same seed, and their images are checked to be identical, so the ratio measures only
what mmfm's loop adds around the UNet calls. Both run under `torch.inference_mode`.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from benchmarks.harness import Result, compare, setup
from mmfm.config import ImageGenHeadConfig
from mmfm.heads.image_gen import ImageGenHead
from mmfm.heads.image_gen_schedulers import noise_schedule

TARGET = 0.95  # mmfm may take at most ~1.05x the plain loop's time


def diffusers_loop(denoiser, scheduler, cond, mask, null, null_mask, steps, guidance, generator, size):
    """Denoises one batch of conditions the way a diffusers text-to-image pipeline does; images in [0, 1].

    The null embeddings come first, then the conditions'; the timestep is expanded to one per row, as PixArt's
    pipeline does (the UNet takes either). The parity tests compare mmfm's sampler with this loop too.
    """
    embeds, masks = torch.cat([null, cond]), torch.cat([null_mask, mask])
    scheduler.set_timesteps(steps)
    shape = (cond.shape[0], denoiser.config.in_channels, size, size)
    latents = randn_tensor(shape, generator=generator, dtype=cond.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = denoiser(
            model_input,
            timestep=t.expand(model_input.shape[0]),
            encoder_hidden_states=embeds,
            encoder_attention_mask=masks,
            return_dict=False,
        )[0]
        uncond, text = noise_pred.chunk(2)
        noise_pred = uncond + guidance * (text - uncond)
        latents = scheduler.step(noise_pred, t, latents, generator=generator, return_dict=False)[0]
    return (latents / 2 + 0.5).clamp(0, 1)


def main(quick: bool = False) -> list[Result]:
    """Prints the timing table and returns the headline ratio, t_diffusers / t_mmfm."""
    setup()
    if quick:
        config = ImageGenHeadConfig(
            image_size=16, block_out_channels=[8, 16], layers_per_block=1, attention_head_dim=8, norm_num_groups=4
        )
        dim, batch, length, steps, rounds = 32, 2, 8, 4, 3
    else:
        config = ImageGenHeadConfig(
            image_size=32, block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=32, norm_num_groups=8
        )
        dim, batch, length, steps, rounds = 256, 2, 24, 20, 15
    guidance = 3.0
    head = ImageGenHead(dim, config).eval()
    with torch.no_grad():
        head.null_cond.normal_()
    cond = torch.randn(batch, length, dim)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1:, length // 2 :] = False  # padded conditions, as texts of different lengths give
    null, null_mask = head.null_condition(batch, length, cond)
    scheduler = DPMSolverMultistepScheduler(**noise_schedule(config), algorithm_type="dpmsolver++", solver_order=2)

    def mmfm_sample():
        generator = torch.Generator().manual_seed(0)
        return head.sample(cond, mask, "dpmsolver++", steps, guidance, generator=generator)

    def diffusers_sample():
        generator = torch.Generator().manual_seed(0)
        return diffusers_loop(
            head.denoiser, scheduler, cond, mask, null, null_mask, steps, guidance, generator, config.image_size
        )

    with torch.inference_mode():
        result = compare({"mmfm": mmfm_sample, "diffusers": diffusers_sample}, rounds=rounds)
    if not torch.equal(result.outputs["mmfm"], result.outputs["diffusers"]):
        raise AssertionError("mmfm and the plain diffusers loop sampled different images")

    params = sum(p.numel() for p in head.denoiser.parameters())
    print(
        f"\nimage sampling: UNet {config.block_out_channels} x {config.layers_per_block} layers "
        f"({params / 1e6:.2f}M parameters), {config.image_size}x{config.image_size} px, {batch} conditions of "
        f"{length} tokens (width {dim}), guidance {guidance}, DPM-Solver++ {steps} steps, fp32, "
        f"{torch.get_num_threads()} threads"
    )
    print(result.format("sampling"))
    return [Result("image_gen_sampling", result.ratio("mmfm", "diffusers"), TARGET, "t_diffusers / t_mmfm")]


if __name__ == "__main__":
    main()
