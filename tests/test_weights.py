"""The shipped demo weights load through the same code paths users call, and stay small."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import brainrecon

WEIGHTS = Path(brainrecon.__file__).parent / "weights"


def test_shipped_weights_total_under_40_mb():
    total = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert 0 < total < 40 * 2**20


def test_shipped_vdvae_loads_and_decodes():
    from brainrecon.train.foundations.loaders import resolve_vdvae
    from brainrecon.train.reference import decode_images

    model, info = resolve_vdvae("builtin:small64")
    assert info["config"]["name"] == "small64"
    images = decode_images(model, np.zeros((2, 800), dtype=np.float32), num_layers=5)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8


def test_shipped_clip_loads_in_the_extractor():
    from brainrecon.train.foundations.clip_features import CLIPFeatureExtractor

    extractor = CLIPFeatureExtractor.from_pretrained(WEIGHTS / "clip-small")
    vision = extractor.vision_embeddings(np.zeros((1, 64, 64, 3), dtype=np.uint8))
    text = extractor.text_embeddings([["a red circle on a plain background"]])
    assert vision.shape == (1, 65, 128) and text.shape == (1, 77, 128)


def test_shipped_vae_round_trips_latent_shape():
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(WEIGHTS / "vae-small", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert tuple(z.shape) == (1, 4, 8, 8)


def test_shipped_unet_matches_the_shipped_clip_and_vae():
    """The dual UNet predicts noise for the VAE's latents, conditioned on the CLIP's token layout."""
    import torch

    from brainrecon.train.foundations.loaders import load_clip, load_unet, load_vae

    unet, config, _ = load_unet("builtin:small")
    extractor, _ = load_clip("builtin:small")
    vae, _ = load_vae("builtin:small")
    shapes = extractor.shapes
    assert (config.vision_tokens, config.text_tokens) == (shapes.vision_tokens, shapes.text_tokens)
    assert config.cross_attention_dim == shapes.dim
    side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    assert config.sample_size == side and unet.dtype == torch.float32
    with torch.no_grad():
        eps = unet(
            torch.zeros(1, 4, side, side), 500, torch.zeros(1, config.context_tokens, shapes.dim)
        ).sample
    assert eps.shape == (1, 4, side, side) and torch.isfinite(eps).all()
