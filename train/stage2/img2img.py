"""Stage 2 of Brain-Diffuser: Versatile Diffusion img2img refinement of the stage-1 (VDVAE) image, torch reference.

Mirrors `versatilediffusion_reconstruct_images.py` of Brain-Diffuser (Ozcelik & VanRullen 2023,
ozcelikfu/brain-diffuser): the stage-1 image is VAE-encoded, noised to 75% of a 50-step DDIM schedule (37 denoising
steps, eta 0), then denoised by the dual-guided Versatile Diffusion UNet (`train/foundations/dual_unet.py`) conditioned on the
predicted CLIP-vision (257 tokens) and CLIP-text (77 tokens) embeddings, mixed 0.6 vision / 0.4 text, with
classifier-free guidance 7.5 against CLIP-text of "" and CLIP-vision of a black image.

The schedule follows diffusers' img2img pipelines (`get_timesteps`, `prepare_latents`) so the numpy runtime can be
checked against this file step by step. Beyond the paper's recipe (`SamplingConfig` defaults: DDIM, guidance at
every step), `config.sampler` "dpmpp_2m" runs diffusers' DPM-Solver++(2M) on the same noise schedule (`dpm_solver`),
`config.guidance_stop` < 1 runs the last steps on the conditional pass alone (`SamplingConfig.guided_steps`), and
`config.cache_interval` > 1 reuses the UNet's deep features between full steps (DeepCache, `deepcache.py`).
Two deliberate differences from diffusers:
- the init latents are the VAE posterior *mean*, not a sample, so encoding is deterministic and reproducible by a
  runtime that only exports the encoder;
- the noise is drawn once for the whole latent batch by numpy from the seed (`brainrecon.noise`; or passed in as
  `noise`), so the torch-free runtime draws exactly the same noise.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from rich.progress import Progress

from brainrecon.errors import ConfigError, InputError
from brainrecon.noise import img2img_noise
from brainrecon.sampling import DDIM_SCHEDULER, SamplingConfig
from brainrecon.train.foundations.dual_unet import (
    DualUNetConfig,
    dual_context,
    set_mix_ratio,
)
from brainrecon.train.stage2.deepcache import unet_step

# DPM-Solver++(2M) as diffusers recommends it for guided sampling (multistep, data prediction, second order), its
# final step to sigma 0; runtime/samplers.py implements exactly these settings in numpy.
DPM_SOLVER = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "use_karras_sigmas": False,
}
DDIM_ONLY = ("clip_sample", "set_alpha_to_one")  # DDIM_SCHEDULER keys that DPMSolverMultistepScheduler lacks

Scheduler = DDIMScheduler | DPMSolverMultistepScheduler


def vd_scheduler() -> DDIMScheduler:
    """Versatile Diffusion's DDIM (brainrecon.sampling.DDIM_SCHEDULER, the one table of its constants)."""
    return DDIMScheduler(**DDIM_SCHEDULER)


def dpm_solver(scheduler: Scheduler) -> DPMSolverMultistepScheduler:
    """A fresh DPM-Solver++(2M) on `scheduler`'s noise schedule (its DDIM_SCHEDULER keys but the DDIM-only ones,
    + DPM_SOLVER). Fresh: it keeps the previous step's data prediction, so every chain needs its own."""
    schedule = {key: scheduler.config[key] for key in DDIM_SCHEDULER if key not in DDIM_ONLY}
    return DPMSolverMultistepScheduler(**schedule, **DPM_SOLVER)


def denoising_timesteps(scheduler: Scheduler, steps: int, strength: float) -> torch.Tensor:
    """The timesteps img2img denoises, as diffusers' `get_timesteps`: 50 steps, strength 0.75 -> 37 (721 ... 1
    for DDIM; 704 ... 20 for DPM-Solver++, whose "leading" spacing divides by steps + 1).

    Sets the scheduler's timesteps and, where it has one (DPM-Solver++), its begin index, like the pipelines do;
    empty for strength 0.
    """
    scheduler.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order :]


def vae_downsampling(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_inputs(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    init_images: np.ndarray,
    vision_ctx: torch.Tensor,
    text_ctx: torch.Tensor,
    uncond_vision: torch.Tensor,
    uncond_text: torch.Tensor,
    config: SamplingConfig,
    noise: torch.Tensor | None = None,
) -> None:
    """One-line InputError/ConfigError before any network runs. Token shapes are checked by `dual_context`."""
    if not isinstance(config, SamplingConfig):
        raise ConfigError(f"img2img: expected an SamplingConfig, found {type(config).__name__}")
    images = np.asarray(init_images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InputError("init_images", "uint8 (B, H, W, 3)", f"{images.dtype} {images.shape}")
    # Latents must survive the UNet's down/up sampling too, else the skip connections do not line up.
    unet_down = 2 ** (len(unet.config.block_out_channels) - 1)
    multiple = vae_downsampling(vae) * unet_down
    if images.shape[1] % multiple or images.shape[2] % multiple:
        raise InputError(
            "init_images",
            f"H and W divisible by {multiple} (VAE x UNet downsampling)",
            f"{images.shape[1]}x{images.shape[2]}",
        )
    batch = images.shape[0]
    for name, ctx, want in (
        ("vision_ctx", vision_ctx, batch),
        ("text_ctx", text_ctx, batch),
        ("uncond_vision", uncond_vision, 1),
        ("uncond_text", uncond_text, 1),
    ):
        if ctx.ndim != 3 or ctx.shape[0] != want:
            raise InputError(name, f"(batch {want}, tokens, dim)", str(tuple(ctx.shape)))
        if not torch.isfinite(ctx).all():
            raise InputError(name, "finite values", "NaN or Inf")
    if noise is not None:
        latent = vae_downsampling(vae)
        expected = (batch, vae.config.latent_channels, images.shape[1] // latent, images.shape[2] // latent)
        if tuple(noise.shape) != expected or not torch.isfinite(noise).all():
            raise InputError("noise", f"finite {expected}", str(tuple(noise.shape)))


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: np.ndarray, scale: float) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> scaled latents (B, 4, H/f, W/f), posterior mean (diffusers samples; see module doc)."""
    param = next(vae.parameters())
    x = torch.from_numpy(np.ascontiguousarray(images)).to(param.device, param.dtype)  # (B, H, W, 3)
    x = x.permute(0, 3, 1, 2) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
    return vae.encode(x).latent_dist.mean * scale  # (B, 4, h, w)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, scale: float) -> np.ndarray:
    """Scaled latents (B, 4, h, w) -> uint8 (B, H, W, 3), rounded and clipped."""
    x = vae.decode(latents / scale).sample  # (B, 3, H, W) in ~[-1, 1]
    x = ((x + 1.0) * 127.5).round().clamp(0, 255)
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()  # (B, H, W, 3)


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The img2img noise as a tensor: `brainrecon.noise.img2img_noise` (numpy, so the runtime draws the same)."""
    return torch.from_numpy(img2img_noise(shape, seed))


@torch.no_grad()
def denoise(
    unet: UNet2DConditionModel,
    scheduler: Scheduler,  # the noise schedule: VD's DDIM (`vd_scheduler`)
    init_latents: torch.Tensor,  # (B, 4, h, w), scaled
    cond_ctx: torch.Tensor,  # (B, Nv + Nt, D)
    uncond_ctx: torch.Tensor,  # (1, Nv + Nt, D)
    config: SamplingConfig,
    noise: torch.Tensor | None = None,  # (B, 4, h, w)
) -> torch.Tensor:
    """Noise the init latents to the start of the truncated schedule, then denoise with guidance: DDIM on
    `scheduler`, or for `config.sampler` "dpmpp_2m" a fresh DPM-Solver++(2M) on its noise schedule (`dpm_solver`).

    Classifier-free guidance runs both branches in one UNet batch laid out `[uncond; cond]`:
    `torch.cat([uncond_ctx.expand(B), cond_ctx])` -> (2B, Nv + Nt, D); the UNet output is split in that order and
    `noise_pred = uncond + guidance_scale * (cond - uncond)`. Only the first `config.guided_steps(T)` of the T steps
    do; the rest run the conditional branch alone (B rows) and take its prediction.

    `config.cache_interval` k > 1 (DeepCache, `deepcache.py`): the whole UNet on every k-th step, the first always,
    its shallow branch on the others around the last full step's deep feature (2B rows while guided; the cond half
    once guidance stops).
    """
    if config.sampler == "dpmpp_2m":
        scheduler = dpm_solver(scheduler)
    timesteps = denoising_timesteps(scheduler, config.num_inference_steps, config.strength)
    latents = init_latents
    if len(timesteps) == 0:  # strength 0: nothing is re-noised, the VAE round trip comes back
        return latents
    if noise is None:
        noise = seeded_noise(tuple(latents.shape), config.seed)
    noise = noise.to(latents.device, latents.dtype)
    latents = scheduler.add_noise(latents, noise, timesteps[:1])  # (B, 4, h, w)

    batch = latents.shape[0]
    context = torch.cat([uncond_ctx.expand(batch, -1, -1), cond_ctx])  # (2B, Nv + Nt, D)
    guided = config.guided_steps(len(timesteps))
    step_options = {"eta": config.eta} if isinstance(scheduler, DDIMScheduler) else {}  # DPM-Solver++: no eta
    feature = None  # DeepCache (cache_interval > 1): the last full step's deep feature, (2B or B, C_f, h, w)
    for i, t in enumerate(timesteps):
        if i < guided:
            latent_in = torch.cat([latents, latents])  # (2B, 4, h, w)
            # (2B, 4, h, w)
            out, feature = unet_step(unet, latent_in, t, context, i, config.cache_interval, feature)
            uncond_pred, cond_pred = out.chunk(2)  # each (B, 4, h, w)
            noise_pred = uncond_pred + config.guidance_scale * (cond_pred - uncond_pred)
        else:  # guidance stopped: the conditional branch alone
            if i == guided and feature is not None:
                feature = feature[batch:]  # the cond rows of the guided steps' feature
            noise_pred, feature = unet_step(unet, latents, t, cond_ctx, i, config.cache_interval, feature)
        latents = scheduler.step(noise_pred, t, latents, **step_options).prev_sample
    return latents


@torch.no_grad()
def img2img(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler: Scheduler,  # the noise schedule: VD's DDIM (`vd_scheduler`); see `denoise`
    init_images: np.ndarray,  # uint8 (B, H, W, 3), the stage-1 reconstructions
    vision_ctx: torch.Tensor,  # (B, Nv, D) predicted CLIP-vision tokens
    text_ctx: torch.Tensor,  # (B, Nt, D) predicted CLIP-text tokens
    uncond_vision: torch.Tensor,  # (1, Nv, D) CLIP-vision of a black image
    uncond_text: torch.Tensor,  # (1, Nt, D) CLIP-text of ""
    config: SamplingConfig,
    *,
    dual_config: DualUNetConfig,
    noise: torch.Tensor | None = None,  # (B, 4, H/f, W/f); default: seeded_noise(shape, config.seed)
    batch_size: int | None = None,
    timings: dict[str, float] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Brain-Diffuser stage 2: Versatile Diffusion dual-guided img2img. Returns uint8 (B, H, W, 3).

    The one torch img2img loop: the reference (train/reference.py `Stage2Model.reconstruct`) runs it. Sets
    every dual block's mix ratio to `config.mix_ratio` (as VD's pipeline does per call). The guidance batch is
    `[uncond; cond]`, see `denoise`. strength 0 returns the VAE round trip of `init_images`.

    `batch_size` images per VAE and UNet call (None: all B at once; the UNet gets twice as many rows). The noise of
    all B images is drawn at once, so the result does not depend on `batch_size`. Phase by phase, as the runtime
    runs: every chunk is encoded, then denoised, then decoded; `timings`, when given, gets the seconds of each
    phase (vae_encode_s, unet_s, vae_decode_s: the runtime's names).
    """
    check_inputs(unet, vae, init_images, vision_ctx, text_ctx, uncond_vision, uncond_text, config, noise)
    if batch_size is not None and batch_size < 1:
        raise InputError("batch_size", "at least 1 image per call", str(batch_size))
    set_mix_ratio(unet, config.mix_ratio)
    dtype = next(unet.parameters()).dtype
    device = next(unet.parameters()).device
    cond_ctx = dual_context(vision_ctx, text_ctx, dual_config).to(device, dtype)  # (B, Nv + Nt, D)
    uncond_ctx = dual_context(uncond_vision, uncond_text, dual_config).to(device, dtype)  # (1, Nv + Nt, D)
    step = batch_size or max(len(init_images), 1)
    chunks = [slice(i, i + step) for i in range(0, len(init_images), step)]
    scale = config.vae_scale_factor
    t0 = time.perf_counter()
    init_latents = torch.cat([encode_images(vae, init_images[c], scale) for c in chunks])  # (B, 4, h, w)
    t1 = time.perf_counter()
    if noise is None:
        noise = seeded_noise(tuple(init_latents.shape), config.seed)
    latents = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("stage 2 img2img", total=len(init_images))
        for c in chunks:
            latents.append(
                denoise(unet, scheduler, init_latents[c], cond_ctx[c], uncond_ctx, config, noise[c])
            )
            bar.advance(task, len(latents[-1]))
    t2 = time.perf_counter()
    images = np.concatenate([decode_latents(vae, chunk, scale) for chunk in latents])  # (B, H, W, 3)
    if timings is not None:
        timings.update(vae_encode_s=t1 - t0, unet_s=t2 - t1, vae_decode_s=time.perf_counter() - t2)
    return images
