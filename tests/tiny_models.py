"""Tiny seeded models that only the tests build (CPU, seconds): 16x16 images <-> 8x8x4 latents."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from brainrecon.errors import ConfigError
from brainrecon.train.foundations.dual_unet import DualUNetConfig, build_dual_unet
from brainrecon.train.stage2.img2img import vae_downsampling, vd_scheduler


def tiny_vae_config() -> dict[str, Any]:
    """Tests: 16x16 images -> 8x8x4 latents (one downsampling), as `tiny_components`."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 16,
    }


def tiny_components(
    seed: int = 0,
) -> tuple[UNet2DConditionModel, AutoencoderKL, DDIMScheduler, DualUNetConfig]:
    """Tiny seeded random UNet/VAE/scheduler for CPU tests: 16x16 images -> 8x8x4 latents (VAE downsampling 2)."""
    dual_config = DualUNetConfig.tiny()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=2 * dual_config.sample_size,
    ).eval()
    unet = build_dual_unet(dual_config).eval()
    if vae.config.latent_channels != unet.config.in_channels:
        raise ConfigError(
            f"tiny_components: expected VAE latent channels {unet.config.in_channels}, "
            f"found {vae.config.latent_channels}"
        )
    if vae.config.sample_size // vae_downsampling(vae) != dual_config.sample_size:
        raise ConfigError(
            f"tiny_components: expected latent side {dual_config.sample_size}, "
            f"found {vae.config.sample_size // vae_downsampling(vae)}"
        )
    return unet, vae, vd_scheduler(), dual_config
