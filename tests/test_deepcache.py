"""DeepCache step reuse (issue 23): the full and shallow UNet steps in torch (train/stage2/deepcache.py), the
torch reference loop with `cache_interval` (train/stage2/img2img.py denoise), the exported `unet_deep` and
`unet_shallow` graphs (export/stage2.py) and the runtime loop on them (runtime/stage2.py).

Tolerances:
- torch full step vs `unet(...).sample`: bit-identical (the same operations in the same order);
- torch shallow step fed the feature of its own (sample, timestep, context) vs the full step: bit-identical (the
  shallow branch recomputes conv_in and down_blocks[0] with the same operations);
- denoise at cache_interval 1: bit-identical to the loop before DeepCache (written out below).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from brainrecon.errors import ConfigError
from brainrecon.sampling import SamplingConfig
from brainrecon.train.foundations.dual_unet import DualUNetConfig, build_dual_unet
from brainrecon.train.stage2 import deepcache
from brainrecon.train.stage2.deepcache import is_full_step, unet_shallow, unet_with_feature
from brainrecon.train.stage2.img2img import denoise, denoising_timesteps, vd_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    """The tiny dual UNet with every parameter perturbed (zero-initialised output layers would hide a wrong head)."""
    torch.manual_seed(0)
    unet = build_dual_unet(DualUNetConfig.tiny()).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def _inputs(batch: int, side: int = 32, seed: int = 0):
    cfg = DualUNetConfig.tiny()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    t = torch.randint(1, 1000, (batch,), generator=g).float()
    context = torch.randn(batch, cfg.context_tokens, cfg.cross_attention_dim, generator=g)
    return x, t, context


# side 30 is no multiple of the tiny UNet's 2^2 upsampling: forward's upsample_size path
@pytest.mark.parametrize("side", [32, 30])
@torch.no_grad()
def test_full_step_is_the_unet_forward_bit_for_bit(unet, side):
    x, t, context = _inputs(3, side)
    noise_pred, feature = unet_with_feature(unet, x, t, context)
    assert torch.equal(noise_pred, unet(x, t, encoder_hidden_states=context).sample)
    # the hidden state entering the last up block: the second up block's channels, at the latent side
    assert tuple(feature.shape) == (3, unet.config.block_out_channels[1], side, side)


@pytest.mark.parametrize("side", [32, 30])
@torch.no_grad()
def test_shallow_step_with_its_own_feature_is_the_full_step(unet, side):
    x, t, context = _inputs(2, side)
    noise_pred, feature = unet_with_feature(unet, x, t, context)
    assert torch.equal(unet_shallow(unet, x, t, context, feature), noise_pred)
    # a feature of another step gives another prediction: the feature is used
    _, other = unet_with_feature(unet, *_inputs(2, side, seed=1)[:2], context)
    assert not torch.allclose(unet_shallow(unet, x, t, context, other), noise_pred, atol=1e-3)


def test_unsupported_unet_options_are_refused(unet):
    odd = UNet2DConditionModel(**{**DualUNetConfig.tiny().unet_kwargs(), "center_input_sample": True})
    with pytest.raises(ConfigError, match="center_input_sample"):
        unet_with_feature(odd, *_inputs(1))


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", None])
def test_cache_interval_is_checked(value):
    with pytest.raises(ConfigError, match="^sampling: expected cache_interval >= 1, found "):
        SamplingConfig(cache_interval=value)


def test_full_steps_are_every_kth_from_the_first():
    for k in (1, 2, 3, 5):
        for steps in (1, 6, 7, 37):
            full = [i for i in range(steps) if is_full_step(i, k)]
            assert full[0] == 0 and len(full) == math.ceil(steps / k)


# ----------------------------------------------------------------------------------------- the torch loop


def _denoise_inputs(batch: int = 2):
    cfg = DualUNetConfig.tiny()
    g = torch.Generator().manual_seed(3)
    init = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    cond = torch.randn(batch, cfg.context_tokens, cfg.cross_attention_dim, generator=g)
    uncond = torch.randn(1, cfg.context_tokens, cfg.cross_attention_dim, generator=g)
    noise = torch.randn(init.shape, generator=g)
    return init, cond, uncond, noise


@torch.no_grad()
def _loop_before_deepcache(unet, init, cond_ctx, uncond_ctx, config, noise):
    """train/stage2/img2img.py denoise as it was before cache_interval (DDIM), written out."""
    scheduler = vd_scheduler()
    timesteps = denoising_timesteps(scheduler, config.num_inference_steps, config.strength)
    latents = scheduler.add_noise(init, noise, timesteps[:1])
    batch = latents.shape[0]
    context = torch.cat([uncond_ctx.expand(batch, -1, -1), cond_ctx])
    guided = config.guided_steps(len(timesteps))
    for i, t in enumerate(timesteps):
        if i < guided:
            out = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample
            uncond_pred, cond_pred = out.chunk(2)
            noise_pred = uncond_pred + config.guidance_scale * (cond_pred - uncond_pred)
        else:
            noise_pred = unet(latents, t, encoder_hidden_states=cond_ctx).sample
        latents = scheduler.step(noise_pred, t, latents, eta=config.eta).prev_sample
    return latents


@pytest.mark.parametrize("guidance_stop", [1.0, 0.6])
def test_denoise_at_cache_interval_1_is_unchanged(unet, guidance_stop):
    init, cond, uncond, noise = _denoise_inputs()
    config = SamplingConfig(num_inference_steps=10, guidance_stop=guidance_stop)
    latents = denoise(unet, vd_scheduler(), init, cond, uncond, config, noise)
    assert torch.equal(latents, _loop_before_deepcache(unet, init, cond, uncond, config, noise))


@pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)  # diffusers' DPM set_timesteps
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("cache_interval", [2, 3])
def test_denoise_with_cache_interval_runs_full_steps_every_kth(unet, monkeypatch, sampler, cache_interval):
    """10 steps at strength 0.75 = 7 UNet steps, guidance on the first ceil(0.6 × 7) = 5: ceil(7 / k) full steps
    (2B rows while guided, B after), the others shallow on the rows of their step; the result differs from the
    uncached loop's but stays near it (the tiny random UNet's deep features change fast, so 'near' is loose)."""
    rows: dict[str, list[int]] = {"full": [], "shallow": []}
    full, shallow = deepcache.unet_with_feature, deepcache.unet_shallow

    def counted_full(unet, sample, *args):
        rows["full"].append(len(sample))
        return full(unet, sample, *args)

    def counted_shallow(unet, sample, t, context, feature):
        assert len(feature) == len(sample) == len(context)
        rows["shallow"].append(len(sample))
        return shallow(unet, sample, t, context, feature)

    monkeypatch.setattr(deepcache, "unet_with_feature", counted_full)
    monkeypatch.setattr(deepcache, "unet_shallow", counted_shallow)
    init, cond, uncond, noise = _denoise_inputs()
    config = SamplingConfig(num_inference_steps=10, sampler=sampler, guidance_stop=0.6)
    cached = denoise(
        unet, vd_scheduler(), init, cond, uncond, config.with_overrides(cache_interval=cache_interval), noise
    )
    plain = denoise(unet, vd_scheduler(), init, cond, uncond, config, noise)
    steps, guided = 7, 5
    expected = ["full" if is_full_step(i, cache_interval) else "shallow" for i in range(steps)]
    for kind in ("full", "shallow"):
        assert rows[kind] == [4 if i < guided else 2 for i, k in enumerate(expected) if k == kind]
    assert len(rows["full"]) == math.ceil(steps / cache_interval)
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    assert (cached - plain).abs().max() < 0.5 * plain.abs().max()
