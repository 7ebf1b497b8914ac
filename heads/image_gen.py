"""Image generation head: a diffusers denoiser cross-attending to backbone states, and mmfm's sampling loop.

The denoiser is a diffusers `UNet2DConditionModel` or a DiT-style `PixArtTransformer2DModel`; its
cross-attention reads the backbone's hidden states of the conditioning sequence (a text, an image, a clip).
Classifier-free guidance uses a learned null condition that training swaps in for a random `cond_dropout`
fraction of the examples. Schedulers come from diffusers (`mmfm.heads.image_gen_schedulers`); the loop that
drives them is written out in `ImageGenHead.sample`.

In latent space a frozen diffusers `AutoencoderKL` is read from `config.vae_path` whenever the head is built.
Its weights are *not* part of the head's state dict (the trainer's checkpoints stay the size of what is
trained); `save_pretrained` writes the VAE as it is into the checkpoint's `vae/` folder (diffusers' layout) and
the saved config says `vae_path: vae`, which loading resolves against the checkpoint folder, so a saved
latent-space model is self-contained.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmfm.config import ImageGenHeadConfig
from mmfm.errors import ConfigError, InputError
from mmfm.heads.image_gen_schedulers import make_scheduler
from mmfm.objective import Objective, media_of
from mmfm.text_generation import whole_number

# The largest classifier-free guidance scale `sample` takes. Useful scales lie between 1 and about 20; far larger
# ones push every pixel to black or white (1e30 made blank images), so they are refused as a mistake. Raise it by
# assigning `mmfm.heads.image_gen.MAX_GUIDANCE_SCALE` if a model really needs more.
MAX_GUIDANCE_SCALE = 100.0

if TYPE_CHECKING:
    from mmfm.data import Batch
    from mmfm.model import MultimodalModel


class ImageGenHead(nn.Module):
    """A conditional denoiser (+ a frozen VAE in latent space), its training loss and its sampler.

    Args:
        dim: backbone width, the width of the condition the denoiser cross-attends to.
        config: space, architecture, sizes, noise schedule and sampling defaults.

    Attributes:
        denoiser: the diffusers UNet or DiT; called as `denoiser(x, timestep=, encoder_hidden_states=,
            encoder_attention_mask=)`.
        vae: the frozen `AutoencoderKL` in latent space, else None.
        null_cond: (dim,) the learned null condition of classifier-free guidance.
        noise_schedule: the diffusers DDPM scheduler whose `add_noise` / `get_velocity` make training targets.
    """

    @classmethod
    def build(cls, model: MultimodalModel, config: ImageGenHeadConfig) -> ImageGenHead:
        return cls(model.config.backbone.dim, config)

    def __init__(self, dim: int, config: ImageGenHeadConfig):
        super().__init__()
        self.config = config
        self.vae: AutoencoderKL | None = None
        self.vae_factor = 1
        channels = config.channels
        if config.space == "latent":
            self.vae = _load_vae(config)
            self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            channels = self.vae.config.latent_channels
            # The VAE comes from vae_path, never from a checkpoint (see the module docstring).
            self.register_state_dict_post_hook(_drop_vae_weights)
            self.register_load_state_dict_pre_hook(_keep_vae_weights)
        self.latent_channels = channels
        problem = self.size_problem(config.image_size)
        if problem:
            raise ConfigError(f"image_gen.image_size: {problem}")
        self.denoiser = build_denoiser(config, dim, channels, config.image_size // self.vae_factor)
        self.null_cond = nn.Parameter(torch.zeros(dim))
        self.noise_schedule = make_scheduler("ddpm", config)

    # ---- conditioning ----

    def null_condition(self, batch: int, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The null condition as a (batch, length, D) sequence and its (batch, length) mask.

        Every position holds `null_cond`, and only the first is unmasked, so it reads as one token whatever
        the length; the length matches the real conditions' so both can share one batch.
        """
        hidden = self.null_cond.to(like.dtype).expand(batch, length, -1)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=like.device)
        mask[:, 0] = True
        return hidden, mask

    def drop_condition(self, cond: Tensor, cond_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Replaces each row of a (B, L, D) condition by the null condition with probability `cond_dropout`.

        The draw comes from torch's global RNG (one `torch.rand(B)`), so a resumed training run repeats it.
        """
        if self.config.cond_dropout == 0:
            return cond, cond_mask
        B, L, _ = cond.shape
        drop = torch.rand(B, device=cond.device) < self.config.cond_dropout  # (B,)
        null, null_mask = self.null_condition(B, L, cond)
        return torch.where(drop[:, None, None], null, cond), torch.where(drop[:, None], null_mask, cond_mask)

    # ---- training ----

    def loss(self, cond: Tensor, cond_mask: Tensor, target_images: Tensor, reduction: str = "mean") -> Tensor:
        """The denoising loss: MSE between the denoiser's output and the noise (or velocity) at a random level.

        Timesteps, noise, condition dropout (in training mode only) and the VAE's latent sample all come from
        torch's global RNG, so a resumed run that restores it repeats the same draws.

        Args:
            cond: (B, L, D) backbone states of the conditioning sequence.
            cond_mask: (B, L) True on real tokens.
            target_images: (B, channels, image_size, image_size) images scaled to [-1, 1].
            reduction: "mean" over images of each image's mean squared error, or their "sum" (the trainer
                normalises over a larger batch).
        """
        if reduction not in ("mean", "sum"):
            raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        expected = (self.config.channels, self.config.image_size, self.config.image_size)
        if target_images.dim() != 4 or tuple(target_images.shape[1:]) != expected:
            raise InputError(
                f"target images must be (B, {', '.join(map(str, expected))}) in [-1, 1], "
                f"got {tuple(target_images.shape)}"
            )
        x0 = self.encode(target_images)  # (B, C, s, s)
        B = x0.shape[0]
        timesteps = torch.randint(0, self.config.num_train_timesteps, (B,), device=x0.device)
        noise = torch.randn_like(x0)
        if self.training:
            cond, cond_mask = self.drop_condition(cond, cond_mask)
        noisy = self.noise_schedule.add_noise(x0, noise, timesteps)
        if self.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_schedule.get_velocity(x0, noise, timesteps)
        prediction = self.predict(noisy, timesteps, cond, cond_mask)
        per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)  # (B,)
        return per_image.mean() if reduction == "mean" else per_image.sum()

    def predict(self, x: Tensor, timesteps: Tensor, cond: Tensor, cond_mask: Tensor) -> Tensor:
        """The denoiser's output for (B, C, s, s) noisy inputs at (B,) timesteps under (B, L, D) conditions."""
        return self.denoiser(
            x, timestep=timesteps, encoder_hidden_states=cond, encoder_attention_mask=cond_mask, return_dict=False
        )[0]

    # ---- pixels and latents ----

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> what the denoiser works on: the images themselves, or scaled VAE latents."""
        if self.vae is None:
            return images
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample()
        return (latents - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor

    def decode(self, x: Tensor) -> Tensor:
        """What the denoiser made (pixels in [-1, 1] or scaled latents) -> (N, channels, S, S) images in [0, 1]."""
        if self.vae is not None:
            latents = x / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
            x = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def size_problem(self, image_size: int) -> str | None:
        """Why the denoiser (and VAE) cannot make square images of this side, or None if it can."""
        if image_size <= 0:
            return f"must be positive, got {image_size}"
        if image_size % self.vae_factor:
            return f"{image_size} is not a multiple of the VAE's downsampling factor {self.vae_factor}"
        factor = self.config.downsampling_factor
        if (image_size // self.vae_factor) % factor:
            what = "DiT patch size" if self.config.architecture == "dit" else "UNet's downsampling factor"
            where = f" in latent space ({image_size // self.vae_factor} latent pixels)" if self.vae is not None else ""
            return f"{image_size}{where} is not a multiple of the {what} {factor}"
        return None

    # ---- sampling ----

    def check_sampling(
        self,
        scheduler: str | SchedulerMixin | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images: int = 1,
        image_size: int | None = None,
        batch_size: int | None = None,
    ) -> tuple[int, float, int, int, int | None, SchedulerMixin]:
        """`sample`'s options checked and resolved against the config's defaults, before any work is done.

        Returns:
            (num_inference_steps, guidance_scale, num_images, image_size, batch_size, scheduler instance), as
            plain Python numbers (numpy scalars are accepted).

        Raises:
            InputError: a value of the wrong type or out of range, or an unknown scheduler name, naming the option.
        """
        config = self.config
        steps = config.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = config.guidance_scale if guidance_scale is None else guidance_scale
        size = config.image_size if image_size is None else image_size
        steps = whole_number("num_inference_steps", steps, 1, config.num_train_timesteps)
        num_images = whole_number("num_images", num_images, 1)
        size = whole_number("image_size", size, 1)
        if batch_size is not None:
            batch_size = whole_number("batch_size", batch_size, 1)
        if (
            isinstance(guidance, bool)
            or not isinstance(guidance, numbers.Real)
            or not 0 <= guidance <= MAX_GUIDANCE_SCALE
        ):
            raise InputError(
                f"guidance_scale must be a finite number >= 0 and at most {MAX_GUIDANCE_SCALE:g} (1: no guidance; "
                f"useful scales lie between 1 and about 20), got {guidance!r}"
            )
        problem = self.size_problem(size)
        if problem:
            raise InputError(f"image_size: {problem}")
        if isinstance(scheduler, SchedulerMixin):
            schedule = scheduler
        else:
            schedule = make_scheduler(config.scheduler if scheduler is None else scheduler, config)
        return steps, float(guidance), num_images, size, batch_size, schedule

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        cond_mask: Tensor,
        scheduler: str | SchedulerMixin | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        num_images: int = 1,
        image_size: int | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Generates images from noise, guided by the conditions.

        Each denoising step runs the denoiser on the conditional and (for classifier-free guidance) the null
        condition in one batch and mixes them as `uncond + guidance_scale * (cond - uncond)`.

        Args:
            cond: (B, L, D) backbone states of B conditions.
            cond_mask: (B, L) True on their real tokens.
            scheduler: a name ("ddpm", "ddim", "dpmsolver++", "euler"; default `config.scheduler`), or a
                diffusers scheduler instance to use as it is (its timesteps are reset for every batch).
            num_inference_steps: denoising steps, 1 to `num_train_timesteps` (default `config.num_inference_steps`).
            guidance_scale: classifier-free guidance scale in [0, MAX_GUIDANCE_SCALE]; 1 runs the conditional
                branch only (default `config.guidance_scale`).
            generator: draws the initial noise and any noise a scheduler adds; None uses torch's global RNG.
            num_images: images per condition, adjacent in the output.
            image_size: side of the images (default `config.image_size`); it must suit the denoiser (and VAE).
            batch_size: most images denoised at once (default: all); the output then depends on it, through the
                order noise is drawn in, only for schedulers that add noise while stepping (DDPM).
            progress: show a tqdm bar over the denoising steps.

        Returns:
            (B * num_images, channels, image_size, image_size) images in [0, 1].

        Raises:
            InputError: a value out of range or an unknown scheduler name, naming the argument.
        """
        steps, guidance, num_images, size, batch_size, schedule = self.check_sampling(
            scheduler, num_inference_steps, guidance_scale, num_images, image_size, batch_size
        )
        if cond.dim() != 3 or cond_mask.shape != cond.shape[:2]:
            raise InputError(
                f"cond must be (B, L, D) with a (B, L) mask, got {tuple(cond.shape)} and {tuple(cond_mask.shape)}"
            )

        cond = cond.repeat_interleave(num_images, dim=0)  # (N, L, D)
        cond_mask = cond_mask.repeat_interleave(num_images, dim=0)  # (N, L)
        N, L, _ = cond.shape
        s = size // self.vae_factor
        noise = randn_tensor((N, self.latent_channels, s, s), generator=generator, device=cond.device, dtype=cond.dtype)
        batch_size = batch_size or N
        guided = guidance != 1
        images = []
        with tqdm(total=math.ceil(N / batch_size) * steps, desc="denoising", disable=not progress) as bar:
            for start in range(0, N, batch_size):
                c, m = cond[start : start + batch_size], cond_mask[start : start + batch_size]
                if guided:  # one batch: null conditions first, then the real ones
                    null, null_mask = self.null_condition(c.shape[0], L, c)
                    c, m = torch.cat([null, c]), torch.cat([null_mask, m])
                schedule.set_timesteps(steps, device=cond.device)
                x = noise[start : start + batch_size] * schedule.init_noise_sigma  # (n, C, s, s)
                for t in schedule.timesteps:
                    x_in = torch.cat([x, x]) if guided else x
                    x_in = schedule.scale_model_input(x_in, t)
                    out = self.predict(x_in, t.expand(x_in.shape[0]), c, m)
                    if guided:
                        uncond, conditional = out.chunk(2)
                        out = uncond + guidance * (conditional - uncond)
                    x = schedule.step(out, t, x, generator=generator, return_dict=False)[0]
                    bar.update()
                images.append(self.decode(x))
        return torch.cat(images)


def _load_vae(config: ImageGenHeadConfig) -> AutoencoderKL:
    """The frozen AutoencoderKL of `config.vae_path`, checked against the config's channels."""
    path = Path(config.vae_path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"image_gen.vae_path: {str(path)!r} is not a diffusers AutoencoderKL directory (no config.json; "
            "write one with AutoencoderKL.save_pretrained)"
        )
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"image_gen.vae_path: {str(path)!r} cannot be loaded as an AutoencoderKL ({e})") from None
    if vae.config.in_channels != config.channels or vae.config.out_channels != config.channels:
        raise ConfigError(
            f"image_gen.channels ({config.channels}) does not match the VAE in image_gen.vae_path "
            f"({vae.config.in_channels} channels in, {vae.config.out_channels} out)"
        )
    return vae.requires_grad_(False).eval()


def build_denoiser(config: ImageGenHeadConfig, dim: int, channels: int, sample_size: int) -> nn.Module:
    """The diffusers UNet or DiT over `channels`-channel inputs of side `sample_size`, cross-attending to width dim."""
    if config.architecture == "dit":
        return PixArtTransformer2DModel(
            num_attention_heads=config.dit_width // config.attention_head_dim,
            attention_head_dim=config.attention_head_dim,
            in_channels=channels,
            out_channels=channels,
            num_layers=config.dit_depth,
            cross_attention_dim=config.dit_width,
            caption_channels=dim,  # PixArt's caption projection maps the condition to the token width
            sample_size=sample_size,
            patch_size=config.patch_size,
            use_additional_conditions=False,
        )
    levels = len(config.block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=dim,
        # diffusers' UNet reads `attention_head_dim` as the number of heads (a naming slip it keeps for
        # compatibility), so heads per level are computed from mmfm's channels-per-head.
        attention_head_dim=tuple(c // config.attention_head_dim for c in config.block_out_channels),
    )


def _drop_vae_weights(module: ImageGenHead, state_dict: dict[str, Tensor], prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "vae.")]:
        del state_dict[key]


def _keep_vae_weights(module: ImageGenHead, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
    # A state dict without the VAE (what save_pretrained writes) loads the VAE's own weights onto itself.
    for key, value in module.vae.state_dict(prefix=prefix + "vae.").items():
        state_dict.setdefault(key, value)


class ImageGenObjective(Objective):
    """The image_gen head's denoising loss on the example's image, conditioned on the `inputs` modality."""

    @classmethod
    def check_inputs(cls, inputs: Sequence[str], fail: Callable[[str], None]) -> None:
        if len(inputs) != 1:
            fail(f"an image_gen task reads one input modality, got {list(inputs)}")

    def needs(self) -> list[str]:
        return ["image", *[("caption" if m == "text" else m) for m in self.inputs]]

    def loss_sum(self, model, batch: Batch, across_ranks: bool = False) -> Tensor:
        rows = self.rows(batch)
        (source,) = self.inputs
        if source == "text":
            media, ids, mask = {}, batch.caption_ids[rows], batch.caption_mask[rows]
        else:
            media, ids, mask = media_of(batch, [source], rows), None, None
        target = model.image_gen_targets(batch.image[rows])
        return model.image_gen_loss(media, ids, mask, target, reduction="sum")
