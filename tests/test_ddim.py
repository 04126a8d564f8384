"""Numpy DDIM (`runtime/ddim.py`) against diffusers' DDIMScheduler and `train.stage2.denoise`, the torch reference.

Tolerances, absolute, on float32 latents at the scale of real ones (|x| < 5; measured worst over 10 seeds):
- alphas_cumprod 1e-6 (6e-8: diffusers' float32 table, see runtime/ddim.py);
- add_noise, and each step fed the same input as diffusers, 1e-6 (4.8e-7: a float32 ulp at |x| ~ 4);
- two chains run independently through the 37 steps of 50 / strength 0.75, after every step, 1e-5 (4.1e-6): diffusers
  rounds its coefficients to float32 and the DDIM chain amplifies early errors by sqrt(a_end / a_start) ~ 3.8;
- a guided `train.stage2.denoise` run with a fake UNet vs the numpy loop, final latents, 1e-5 (3.3e-6).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as TorchDDIM

from brainrecon.errors import ConfigError, InputError
from brainrecon.runtime.ddim import DDIM_FIXED, DDIMConfig, DDIMScheduler
from brainrecon.sampling import DDIM_SCHEDULER, SamplingConfig
from brainrecon.train.stage2.img2img import denoise, denoising_timesteps

SHAPE = (2, 4, 8, 8)  # (B, C, h, w)


def torch_ddim() -> TorchDDIM:
    return TorchDDIM(**DDIM_SCHEDULER)


def test_defaults_are_the_stage2_schedule():
    """DDIMConfig's defaults and DDIM_FIXED split the one table of the schedule, nothing left out or added; the
    fixed part is what this DDIM implements (no clipping, epsilon prediction, "leading" spacing)."""
    assert {**DDIMConfig().to_dict(), **DDIM_FIXED} == dict(DDIM_SCHEDULER)
    assert DDIM_FIXED == {"clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "leading"}


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_diffusers(schedule):
    config = DDIMConfig(beta_schedule=schedule)
    ref = TorchDDIM(**{**DDIM_SCHEDULER, "beta_schedule": schedule})
    ours = DDIMScheduler(config)
    assert ours.alphas_cumprod.dtype == np.float64 and ours.alphas_cumprod.shape == (1000,)
    assert np.abs(ours.alphas_cumprod - ref.alphas_cumprod.double().numpy()).max() < 1e-6
    assert abs(ours.final_alpha_cumprod - float(ref.final_alpha_cumprod)) < 1e-6
    assert DDIMScheduler(DDIMConfig(set_alpha_to_one=True)).final_alpha_cumprod == 1.0


@pytest.mark.parametrize(
    ("steps", "strength"),
    [(50, 0.75), (50, 1.0), (50, 0.0), (50, 0.01), (50, 0.5), (1, 1.0), (7, 0.3), (999, 0.8)],
)
def test_timesteps_match_get_timesteps(steps, strength):
    ref = denoising_timesteps(torch_ddim(), steps, strength).numpy()
    ours = DDIMScheduler().timesteps(steps, strength)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref)


def test_brain_diffuser_schedule_is_37_steps_from_721_to_1():
    timesteps = DDIMScheduler().timesteps(50, 0.75)
    assert (len(timesteps), timesteps[0], timesteps[-1]) == (37, 721, 1)
    assert DDIMScheduler().timesteps(50, 0.0).shape == (0,)


def test_tables():
    ours = DDIMScheduler()
    tables = ours.tables(50, 0.75)
    np.testing.assert_array_equal(tables["timesteps"], ours.timesteps(50, 0.75))
    np.testing.assert_array_equal(tables["alpha_t"], ours.alphas_cumprod[tables["timesteps"]])
    np.testing.assert_array_equal(tables["alpha_prev"][:-1], tables["alpha_t"][1:])
    assert tables["alpha_prev"][-1] == ours.final_alpha_cumprod  # t = 1: 1 - 20 < 0


def test_add_noise_and_every_step_match_diffusers():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    ref, ours = torch_ddim(), DDIMScheduler()
    timesteps = ours.timesteps(50, 0.75)
    # A roughly right noise prediction keeps the latents at the scale of real ones (pure noise would grow them ~3x,
    # and the float32 ulp with them).
    eps_seq = (noise + 0.1 * rng.standard_normal((len(timesteps), *SHAPE))).astype(np.float32)

    ref.set_timesteps(50)
    x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([int(timesteps[0])]))
    x = ours.add_noise(x0, noise, timesteps[0])
    assert x.dtype == np.float32 and x.shape == SHAPE
    assert np.abs(x - x_ref.numpy()).max() < 1e-6
    for t, eps in zip(timesteps, eps_seq, strict=True):  # two independent chains, compared after every step
        x_in = x_ref.numpy()
        x_ref = ref.step(torch.from_numpy(eps), int(t), x_ref, eta=0.0).prev_sample
        assert np.abs(ours.step(eps, t, x_in, 50) - x_ref.numpy()).max() < 1e-6, f"one step, t={t}"
        x = ours.step(eps, t, x, 50)
        assert x.dtype == np.float32
        assert np.abs(x - x_ref.numpy()).max() < 1e-5, f"chain, t={t}"


class FakeUNet:
    """A deterministic stand-in for the dual UNet: depends on the latents, t and the context (so guidance acts).
    It predicts noise ~ latents, as a denoiser does at high noise, which keeps the latents at a realistic scale."""

    def __call__(self, latents, t, encoder_hidden_states):
        ctx = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]  # (2B, 1, 1, 1)
        return type("Out", (), {"sample": 0.9 * latents + t / 1000 + ctx})()


def fake_unet_np(latents: np.ndarray, t: int, context: np.ndarray) -> np.ndarray:
    return 0.9 * latents + np.float32(t / 1000) + context.mean(axis=(1, 2))[:, None, None, None]


def test_guided_loop_matches_stage2_denoise():
    rng = np.random.default_rng(1)
    init = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    cond = (0.3 * rng.standard_normal((2, 5, 3))).astype(np.float32)  # (B, N, D)
    uncond = (0.3 * rng.standard_normal((1, 5, 3))).astype(np.float32)  # (1, N, D)
    config = SamplingConfig()  # 50 steps, strength 0.75, guidance 7.5
    with torch.no_grad():
        ref = denoise(
            FakeUNet(), torch_ddim(), torch.from_numpy(init), torch.from_numpy(cond), torch.from_numpy(uncond),
            config, noise=torch.from_numpy(noise),
        ).numpy()  # fmt: skip

    sched = DDIMScheduler()
    context = np.concatenate([np.repeat(uncond, 2, axis=0), cond])  # (2B, N, D): [uncond; cond]
    timesteps = sched.timesteps(config.num_inference_steps, config.strength)
    x = sched.add_noise(init, noise, timesteps[0])
    for t in timesteps:
        uncond_pred, cond_pred = np.split(fake_unet_np(np.concatenate([x, x]), t, context), 2)
        eps = uncond_pred + config.guidance_scale * (cond_pred - uncond_pred)
        x = sched.step(eps, t, x, config.num_inference_steps)
    assert np.abs(ref).max() > 1 and np.abs(x - ref).max() < 1e-5


def test_config_round_trips_through_json():
    config = DDIMConfig(beta_schedule="linear", steps_offset=0)
    assert DDIMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_bad_inputs_raise():
    sched = DDIMScheduler()
    x = np.zeros(SHAPE, np.float32)
    for steps in (0, 1.5, True, 1001, 1000):  # 1000 steps + offset 1 would index timestep 1000
        with pytest.raises(ConfigError, match="num_inference_steps"):
            sched.timesteps(steps)
    for strength in (-0.1, 1.1, float("nan"), "1"):
        with pytest.raises(ConfigError, match="strength"):
            sched.timesteps(50, strength)
    for t in (722, 0, 1001, 981.0, -19):  # 50 steps: 1, 21, ..., 981
        with pytest.raises(InputError, match="timestep"):
            sched.step(x, t, x, 50)
    with pytest.raises(InputError, match="shape"):
        sched.step(x[:1], 721, x, 50)
    with pytest.raises(InputError, match="float"):
        sched.step(x.astype(np.int32), 721, x, 50)
    with pytest.raises(InputError, match="float"):
        sched.add_noise(x.tolist(), x, 721)
    with pytest.raises(InputError, match="add_noise t"):
        sched.add_noise(x, x, 1000)
    with pytest.raises(ConfigError, match="unknown keys"):
        DDIMConfig.from_dict({"clip_sample": False})
    with pytest.raises(ConfigError, match="beta_schedule"):
        DDIMConfig(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ConfigError, match="beta_start"):
        DDIMConfig(beta_start=0.02)


def test_imports_without_torch():
    code = """
import sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None  # any import of them now raises ImportError
import numpy as np
from brainrecon.runtime.ddim import DDIMScheduler
s = DDIMScheduler()
x = np.ones((1, 4, 2, 2), np.float32)
print(s.step(x, 721, s.add_noise(x, x, 721), 50).dtype)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "float32", proc.stderr[-1500:]
