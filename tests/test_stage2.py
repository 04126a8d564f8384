"""Stage-2 Versatile Diffusion img2img torch reference (train/stage2/img2img.py): tiny seeded components on the CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from brainrecon.errors import ConfigError, InputError
from brainrecon.sampling import SamplingConfig
from brainrecon.train.stage2.img2img import (
    decode_latents,
    denoise,
    denoising_timesteps,
    encode_images,
    img2img,
    seeded_noise,
    vd_scheduler,
)
from tests.fixtures import tiny_components

ATOL_LATENT = 1e-5  # guidance 1 vs the conditional branch alone: same ops, (u + (c - u)) rounding only
FAST = SamplingConfig(num_inference_steps=8)  # strength 0.75 -> 6 UNet calls; keeps the file at a few seconds


@pytest.fixture(scope="module")
def parts():
    unet, vae, scheduler, dual = tiny_components(0)
    g = torch.Generator().manual_seed(1)
    side = 2 * dual.sample_size
    images = torch.randint(0, 256, (2, side, side, 3), generator=g, dtype=torch.uint8).numpy()
    d = dual.cross_attention_dim
    ctx = {
        "vision_ctx": torch.randn(2, dual.vision_tokens, d, generator=g),
        "text_ctx": torch.randn(2, dual.text_tokens, d, generator=g),
        "uncond_vision": torch.randn(1, dual.vision_tokens, d, generator=g),
        "uncond_text": torch.randn(1, dual.text_tokens, d, generator=g),
    }
    return {"unet": unet, "vae": vae, "scheduler": scheduler, "dual": dual, "images": images, "ctx": ctx}


def _run(parts, config: SamplingConfig = FAST, **overrides) -> np.ndarray:
    kw = {"init_images": parts["images"], **parts["ctx"], **overrides}
    return img2img(
        parts["unet"], parts["vae"], parts["scheduler"], config=config, dual_config=parts["dual"], **kw
    )


def test_denoising_timesteps_match_brain_diffuser() -> None:
    ts = denoising_timesteps(vd_scheduler(), 50, 0.75)
    assert len(ts) == 37
    assert ts[0].item() == 721 and ts[-1].item() == 1  # steps_offset 1, stride 20
    assert len(denoising_timesteps(vd_scheduler(), 8, 0.75)) == 6
    assert len(denoising_timesteps(vd_scheduler(), 50, 0.0)) == 0
    assert len(denoising_timesteps(vd_scheduler(), 50, 1.0)) == 50


def test_shape_dtype_and_seed_determinism(parts) -> None:
    a = _run(parts)
    b = _run(parts)
    assert a.shape == parts["images"].shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    c = _run(parts, dataclasses.replace(FAST, seed=1))
    assert not np.array_equal(a, c)


def test_explicit_noise_equals_seeded_path(parts) -> None:
    side = parts["dual"].sample_size
    noise = seeded_noise((2, 4, side, side), FAST.seed)
    np.testing.assert_array_equal(_run(parts, noise=noise), _run(parts))
    assert not np.array_equal(_run(parts, noise=torch.zeros_like(noise)), _run(parts))


def test_strength_zero_is_vae_round_trip(parts) -> None:
    out = _run(parts, dataclasses.replace(FAST, strength=0.0))
    scale = FAST.vae_scale_factor
    round_trip = decode_latents(parts["vae"], encode_images(parts["vae"], parts["images"], scale), scale)
    np.testing.assert_array_equal(out, round_trip)


def test_unet_call_count(parts) -> None:
    calls = []
    handle = parts["unet"].register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        _run(parts)
    finally:
        handle.remove()
    assert len(calls) == 6  # 8 steps x 0.75
    assert calls == [4] * 6  # one guided batch [uncond; cond] of 2B per step


def test_guidance_one_equals_conditional_branch(parts) -> None:
    unet, vae, scheduler, dual = parts["unet"], parts["vae"], parts["scheduler"], parts["dual"]
    config = dataclasses.replace(FAST, guidance_scale=1.0)
    ctx = parts["ctx"]
    cond = torch.cat([ctx["vision_ctx"], ctx["text_ctx"]], dim=1)
    uncond = torch.cat([ctx["uncond_vision"], ctx["uncond_text"]], dim=1)
    init = encode_images(vae, parts["images"], config.vae_scale_factor)
    guided = denoise(unet, scheduler, init, cond, uncond, config)

    # Reference: the conditional branch alone, no guidance batch.
    timesteps = denoising_timesteps(scheduler, config.num_inference_steps, config.strength)
    latents = scheduler.add_noise(init, seeded_noise(tuple(init.shape), config.seed), timesteps[:1])
    with torch.no_grad():
        for t in timesteps:
            pred = unet(latents, t, encoder_hidden_states=cond).sample
            latents = scheduler.step(pred, t, latents, eta=0.0).prev_sample
    torch.testing.assert_close(guided, latents, atol=ATOL_LATENT, rtol=0)
    assert dual.context_tokens == cond.shape[1]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"init_images": np.zeros((2, 16, 16, 3), np.float32)}, "init_images: expected uint8"),
        ({"init_images": np.zeros((2, 14, 14, 3), np.uint8)}, "divisible by 4"),
        ({"init_images": np.zeros((3, 16, 16, 3), np.uint8)}, "vision_ctx: expected"),
        ({"uncond_text": torch.zeros(2, 5, 32)}, "uncond_text: expected"),
        ({"text_ctx": torch.full((2, 5, 32), float("nan"))}, "text_ctx: expected finite"),
        ({"text_ctx": torch.zeros(2, 6, 32)}, "dual context"),
        ({"noise": torch.zeros(2, 4, 4, 4)}, "noise: expected"),
    ],
)
def test_bad_inputs_raise_one_line(parts, override, match) -> None:
    with pytest.raises(InputError, match=match) as info:
        _run(parts, **override)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"strength": 1.5}, {"strength": -0.1}, {"num_inference_steps": 0}, {"eta": 0.5}, {"mix_ratio": 2.0}],
)
def test_bad_config_raises(kwargs) -> None:
    with pytest.raises(ConfigError) as info:
        SamplingConfig(**kwargs)
    assert "\n" not in str(info.value)
