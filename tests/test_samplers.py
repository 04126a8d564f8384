"""Numpy DPM-Solver++(2M) (`runtime/samplers.py`) against diffusers' DPMSolverMultistepScheduler as the torch
reference configures it (`train/stage2/img2img.py dpm_solver`), and guidance_stop's rule in both loops.

Tolerances, on float32 latents at the scale of real ones (|x| < 5), relative to max |x| of diffusers' latents
("scale"; measured worst over the step counts 5/10/20/37, strengths 0.5/0.75/1.0 and 3 seeds below):
- timesteps and the begin index exact; sigmas 1e-6 relative (2.6e-7: DDIM's float32 alphas_cumprod, and torch's
  pow(x, 0.5) rounding the last bit otherwise than numpy's sqrt);
- add_noise against diffusers' and against DDIM's sqrt(a) x0 + sqrt(1 - a) noise (the same quantities from the
  sigmas), 1e-6 absolute (4.8e-7 and 2.4e-7);
- each step fed diffusers' input and previous data prediction, 1e-6 of scale (3.9e-7; 1.4e-6 absolute);
- two chains run independently to the end, after every step, 1e-5 of scale (2.8e-6; 1.1e-5 absolute): the data
  prediction divides by alpha ~ 0.07 at t ~ 950, so a last-bit difference grows;
- a guided loop (fake UNet) of `train.stage2.denoise` vs the numpy loop, final latents, 1e-5 of scale (5.4e-7).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from brainrecon.errors import ConfigError, InputError
from brainrecon.runtime.ddim import DDIMConfig, DDIMScheduler
from brainrecon.runtime.samplers import DPMSolverScheduler, chain, schedulers
from brainrecon.sampling import SamplingConfig
from brainrecon.train.stage2.img2img import denoise, denoising_timesteps, dpm_solver, vd_scheduler
from tests.test_ddim import FakeUNet, fake_unet_np

# diffusers' set_timesteps calls np.array(tensor ** 0.5), which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 4, 8, 8)  # (B, C, h, w)
STEPS = (5, 10, 20, 37)
STRENGTHS = (0.5, 0.75, 1.0)


def reference(steps: int, strength: float):
    """diffusers' DPM-Solver++ set up as img2img sets it up: (scheduler, timesteps)."""
    ref = dpm_solver(vd_scheduler())
    return ref, denoising_timesteps(ref, steps, strength)


def test_reference_is_configured_as_this_module_implements():
    ref = dpm_solver(vd_scheduler()).config
    assert (ref.algorithm_type, ref.solver_order, ref.solver_type) == ("dpmsolver++", 2, "midpoint")
    assert (ref.lower_order_final, ref.final_sigmas_type, ref.euler_at_final) == (True, "zero", False)
    assert not (
        ref.use_karras_sigmas or ref.use_exponential_sigmas or ref.use_beta_sigmas or ref.use_lu_lambdas
    )
    assert not (ref.thresholding or ref.rescale_betas_zero_snr or ref.use_flow_sigmas)
    assert ref.lambda_min_clipped == -float("inf") and ref.variance_type is None
    ddim = DDIMConfig()
    assert (ref.beta_start, ref.beta_end, ref.beta_schedule) == (
        ddim.beta_start,
        ddim.beta_end,
        ddim.beta_schedule,
    )
    assert (ref.num_train_timesteps, ref.steps_offset) == (ddim.num_train_timesteps, ddim.steps_offset)
    assert (ref.timestep_spacing, ref.prediction_type) == ("leading", "epsilon")


@pytest.mark.parametrize("steps", [1, 2, *STEPS, 50, 998])
@pytest.mark.parametrize("strength", [0.0, 0.01, 0.3, *STRENGTHS])
def test_tables_match_diffusers(steps, strength):
    ref, timesteps = reference(steps, strength)
    tables = DPMSolverScheduler().tables(steps, strength)
    assert tables["timesteps"].dtype == np.int64
    np.testing.assert_array_equal(tables["timesteps"], timesteps.numpy())
    assert tables["begin"] == ref.begin_index
    sigmas = ref.sigmas.numpy()
    assert tables["sigmas"].dtype == np.float32 and tables["sigmas"][-1] == 0.0
    np.testing.assert_allclose(tables["sigmas"], sigmas, rtol=1e-6, atol=0)
    if len(timesteps):
        assert tables["order"][0] == 1 and tables["order"][-1] == 1 and set(tables["order"][1:-1]) <= {2}


def test_schedule_of_50_steps_and_the_brain_diffuser_strength():
    """diffusers' "leading" spacing for this class divides by steps + 1: not DDIM's timesteps."""
    dpm = DPMSolverScheduler()
    assert dpm.timesteps(50)[[0, 1, -1]].tolist() == [951, 932, 20]
    timesteps = dpm.timesteps(50, 0.75)
    assert (len(timesteps), timesteps[0], timesteps[-1]) == (37, 704, 20)
    assert len(timesteps) == len(DDIMScheduler().timesteps(50, 0.75))  # the same number of UNet calls


def test_add_noise_matches_diffusers_and_ddim():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    dpm, ddim = DPMSolverScheduler(), DDIMScheduler()
    for steps, strength in ((50, 0.75), (10, 0.5), (20, 1.0)):
        ref, timesteps = reference(steps, strength)
        t = int(timesteps[0])
        expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1]).numpy()
        x = dpm.add_noise(x0, noise, t)
        assert x.dtype == np.float32 and x.shape == SHAPE
        assert np.abs(x - expected).max() < 1e-6
        assert np.abs(x - ddim.add_noise(x0, noise, t)).max() < 1e-6  # alpha = sqrt(a), s = sqrt(1 - a)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("strength", STRENGTHS)
def test_every_step_and_the_chain_match_diffusers(steps, strength):
    dpm = DPMSolverScheduler()
    for seed in range(3):
        rng = np.random.default_rng(seed)
        x0 = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        ref, timesteps = reference(steps, strength)
        # A roughly right noise prediction keeps the latents at the scale of real ones (test_ddim.py).
        eps_seq = (noise + 0.1 * rng.standard_normal((len(timesteps), *SHAPE))).astype(np.float32)
        x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
        x = dpm.add_noise(x0, noise, int(timesteps[0]))
        whole, single = dpm.chain(steps, strength), dpm.chain(steps, strength)
        for t, eps in zip(timesteps.tolist(), eps_seq, strict=True):
            x_in = x_ref.numpy()
            if single.prev is not None:  # diffusers' previous data prediction, not ours
                single.prev = (ref.model_outputs[-1].numpy(), single.prev[1])
            x_ref = ref.step(torch.from_numpy(eps), t, x_ref).prev_sample
            expected = x_ref.numpy()
            scale = np.abs(expected).max()
            assert np.abs(single.step(eps, t, x_in) - expected).max() <= 1e-6 * scale, f"one step, t={t}"
            x = whole.step(eps, t, x)
            assert x.dtype == np.float32
            assert np.abs(x - expected).max() <= 1e-5 * scale, f"chain, t={t}"


def numpy_loop(scheduler, config: SamplingConfig, init, noise, cond, uncond) -> tuple[np.ndarray, list[int]]:
    """runtime/stage2.py's `_denoise_chunk` with the fake UNet: guided steps, then the conditional pass alone;
    returns the latents and the rows of every UNet call."""
    timesteps = scheduler.timesteps(config.num_inference_steps, config.strength)
    guided = config.guided_steps(len(timesteps))
    step = chain(scheduler, config.num_inference_steps, config.strength)
    context = np.concatenate([np.repeat(uncond, len(init), axis=0), cond])  # (2B, N, D): [uncond; cond]
    x, rows = scheduler.add_noise(init, noise, int(timesteps[0])), []
    for i, t in enumerate(timesteps.tolist()):
        if i < guided:
            uncond_pred, cond_pred = np.split(fake_unet_np(np.concatenate([x, x]), t, context), 2)
            eps = uncond_pred + config.guidance_scale * (cond_pred - uncond_pred)
        else:
            eps = fake_unet_np(x, t, cond)
        rows.append(2 * len(x) if i < guided else len(x))
        x = step(eps, t, x)
    return x, rows


@pytest.mark.parametrize(
    ("sampler", "steps", "guidance_stop", "rows"),
    [
        ("dpmpp_2m", 50, 1.0, [4] * 37),
        ("dpmpp_2m", 10, 1.0, [4] * 7),
        ("dpmpp_2m", 20, 0.6, [4] * 9 + [2] * 6),  # 15 steps: ceil(9.0) = 9 guided
        ("ddim", 50, 0.6, [4] * 23 + [2] * 14),  # 37 steps: ceil(22.2) = 23 guided
        ("ddim", 10, 0.0, [2] * 7),
    ],
)
def test_guided_loop_matches_stage2_denoise(sampler, steps, guidance_stop, rows):
    """`train.stage2.denoise` (the torch reference) and the numpy loop, same sampler and guidance_stop rule."""
    rng = np.random.default_rng(1)
    init = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    cond = (0.3 * rng.standard_normal((2, 5, 3))).astype(np.float32)  # (B, N, D)
    uncond = (0.3 * rng.standard_normal((1, 5, 3))).astype(np.float32)  # (1, N, D)
    config = SamplingConfig(num_inference_steps=steps, sampler=sampler, guidance_stop=guidance_stop)
    unet_rows = []

    def counting_unet(latents, t, encoder_hidden_states):
        unet_rows.append(len(latents))
        return FakeUNet()(latents, t, encoder_hidden_states)

    with torch.no_grad():
        ref = denoise(
            counting_unet, vd_scheduler(), torch.from_numpy(init), torch.from_numpy(cond), torch.from_numpy(uncond),
            config, noise=torch.from_numpy(noise),
        ).numpy()  # fmt: skip
    x, numpy_rows = numpy_loop(schedulers(DDIMScheduler())[sampler], config, init, noise, cond, uncond)
    assert unet_rows == numpy_rows == rows
    assert np.abs(ref).max() > 1 and np.abs(x - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize(
    ("guidance_stop", "steps", "guided"),
    [(1.0, 37, 37), (0.0, 37, 0), (0.6, 37, 23), (0.6, 6, 4), (0.5, 6, 3), (0.7, 10, 7), (0.3, 10, 3), (0.1, 10, 1),
     (0.01, 37, 1), (0.99, 37, 37), (0.5, 0, 0)],
)  # fmt: skip
def test_guided_steps_is_the_ceiling_of_the_decimal_product(guidance_stop, steps, guided):
    assert SamplingConfig(guidance_stop=guidance_stop).guided_steps(steps) == guided


def test_schedulers_share_the_ddim_noise_schedule():
    ddim = DDIMScheduler(DDIMConfig(beta_schedule="linear", steps_offset=0))
    samplers = schedulers(ddim)
    assert samplers["ddim"] is ddim and samplers["dpmpp_2m"].config == ddim.config
    np.testing.assert_array_equal(samplers["dpmpp_2m"].alphas_cumprod, ddim.alphas_cumprod)
    assert DPMSolverScheduler().config == DDIMConfig()  # DDIM_SCHEDULER's


def test_bad_inputs_raise():
    dpm = DPMSolverScheduler()
    x = np.zeros(SHAPE, np.float32)
    for steps in (0, 1.5, True, 999, 1000):  # 999 steps: ratio 1, largest timestep 999 + offset 1 = 1000
        with pytest.raises(ConfigError, match="DPM-Solver.*num_inference_steps"):
            dpm.timesteps(steps)
    for strength in (-0.1, 1.1, float("nan"), "1", True):
        with pytest.raises(ConfigError, match="strength"):
            dpm.timesteps(50, strength)
    steps = dpm.chain(10, 0.5)  # 223, 167, 112, 56, 1... : 5 steps from 279
    first = int(dpm.timesteps(10, 0.5)[0])
    with pytest.raises(InputError, match=f"the chain's next \\(timestep {first}\\)"):
        steps.step(x, first - 1, x)
    with pytest.raises(InputError, match="shape"):
        steps.step(x[:1], first, x)
    for t in dpm.timesteps(10, 0.5).tolist():
        steps.step(x, t, x)
    with pytest.raises(InputError, match="no further step"):
        steps.step(x, 1, x)
    with pytest.raises(InputError, match="add_noise t"):
        dpm.add_noise(x, x, 1000)
    with pytest.raises(InputError, match="float"):
        dpm.add_noise(x.astype(np.int32), x, 500)
    with pytest.raises(ConfigError, match="DDIMConfig"):
        DPMSolverScheduler({"beta_start": 0.1})


def test_imports_without_torch():
    code = """
import sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None  # any import of them now raises ImportError
import numpy as np
from brainrecon.runtime.samplers import DPMSolverScheduler
s = DPMSolverScheduler()
x = np.ones((1, 4, 2, 2), np.float32)
step = s.chain(50, 0.75).step
print(step(x, 704, s.add_noise(x, x, 704)).dtype)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "float32", proc.stderr[-1500:]
