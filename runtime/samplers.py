"""Stage-2 samplers beside DDIM (`ddim.py`): DPM-Solver++(2M) in numpy, and the step function a denoising loop
calls for either (`chain`). No torch, diffusers or transformers import (a test enforces it).

`DPMSolverScheduler` mirrors diffusers' `DPMSolverMultistepScheduler` (Lu et al. 2022, "DPM-Solver++: Fast Solver
for Guided Sampling of Diffusion Probabilistic Models": multistep, second order, data prediction) configured with
`algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
final_sigmas_type="zero"` (karras, exponential, beta and lu sigmas off, no thresholding) on the noise schedule of the
DDIM (`DDIMConfig`, i.e. `brainrecon.sampling.DDIM_SCHEDULER`: scaled-linear betas, epsilon prediction, "leading"
spacing, steps_offset). The torch reference builds that diffusers scheduler (train/stage2/img2img.py `dpm_solver`).

    x0 ──add_noise(t0)──► x ──[eps = unet(x, t); x = step(eps, t, x)] for t in timesteps──► x

Schedule: diffusers' "leading" spacing is not DDIM's for this class: S steps over n training steps have the ratio
n // (S + 1) (DDIM: n // S), timesteps (S, S − 1, ..., 1) × ratio + steps_offset (50 steps: 951, 932, ..., 20; DDIM
981, ..., 1), then a final sigma 0. img2img: the last int(S × strength) of them, diffusers' `get_timesteps` (this
scheduler's order is 1) with `set_begin_index(t_start)`: the same rule as DDIM's (`DDIMScheduler.timesteps`, the
torch reference's `denoising_timesteps`).

Per schedule index i (σ_i = sqrt((1 − ᾱ_{t_i}) / ᾱ_{t_i}), σ_S = 0; from σ: α = 1 / sqrt(σ² + 1), s = σ α,
λ = log α − log s; the step goes from s0 = i to t = i + 1, h = λ_t − λ_s0):
    x0_i = (x − s_s0 eps) / α_s0                                   data prediction (convert_model_output)
    first order (= DDIM), at the chain's first step and at its last (final sigma 0: x_t = x0_i):
        x_t = (s_t / s_s0) x − α_t (e^−h − 1) x0_i
    second order, midpoint, elsewhere; r = (λ_s0 − λ_s1) / h, D1 = (1 / r) (x0_i − x0_{i−1}):
        x_t = (s_t / s_s0) x − α_t (e^−h − 1) x0_i − ½ α_t (e^−h − 1) D1
(lower_order_final also asks the second-to-last step of a short schedule for order ≤ 2: no change at order 2.)
`add_noise` at t0 is α x0 + s noise from σ_{t0}: the same quantities as DDIM's sqrt(ᾱ) x0 + sqrt(1 − ᾱ) noise,
rounded otherwise (within 2.4e-7 at |x| < 5, tests/test_samplers.py).

Precision: ᾱ is DDIM's float32 table (ddim.py: within 6e-8 of diffusers'); the sigmas are float32 as diffusers
keeps them (within 3e-7 relative of its own); every coefficient and the update are float32 operations in diffusers'
order (its α, s, λ, h are 0-d float32 tensors). Not bit-exact: torch's pow(x, 0.5), log and exp round the last bit
otherwise than numpy's sqrt, log and exp. One step fed diffusers' inputs lands within 4e-7 of max |x| (1.4e-6 at
|x| < 5), a whole chain within 3e-6 of max |x| (tests/test_samplers.py); float64 coefficients, as ddim.py's step uses, measured
no closer, so the float32 path of diffusers is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any

import numpy as np

from brainrecon.choices import Sampler
from brainrecon.errors import ConfigError, InputError
from brainrecon.runtime.ddim import DDIMConfig, DDIMScheduler, _check_pair, _is_int

# x_next = step(eps, t, x): one denoising chain's update, (B, C, h, w) float arrays
StepFunction = Callable[[np.ndarray, int, np.ndarray], np.ndarray]


class DPMSolverScheduler:
    """`timesteps` gives the img2img schedule; `add_noise` starts it; `chain` steps one chain (it keeps the
    previous data prediction, so every chain, e.g. every image chunk, needs its own)."""

    order = 1  # timesteps per step, diffusers' `scheduler.order` (img2img's t_start × order)

    def __init__(self, config: DDIMConfig | None = None):
        """On the noise schedule of `config` (default: DDIMConfig(), i.e. DDIM_SCHEDULER's)."""
        config = DDIMConfig() if config is None else config
        if not isinstance(config, DDIMConfig):
            raise ConfigError(f"DPMSolverScheduler: expected a DDIMConfig, found {type(config).__name__}")
        self.config = config
        self.alphas_cumprod = DDIMScheduler(config).alphas_cumprod  # (n,) float64 holding float32 values
        alphas = self.alphas_cumprod.astype(np.float32)
        self.train_sigmas = np.sqrt((np.float32(1.0) - alphas) / alphas)  # (n,) float32, diffusers' `sigmas`

    def timesteps(self, num_inference_steps: int, strength: float = 1.0) -> np.ndarray:
        """(T,) int64, descending: the last T = int(S × strength) of the S-step schedule (empty for strength 0)."""
        return self.tables(num_inference_steps, strength)["timesteps"]

    def tables(self, num_inference_steps: int, strength: float = 1.0) -> dict[str, Any]:
        """The constants of a run:

        timesteps   (T,) int64      what the UNet is called with, schedule indices begin ... S − 1
        sigmas      (S + 1,) float32  the whole schedule's sigmas, the last 0 (diffusers' `sigmas` after
                                      `set_timesteps`)
        begin       int             the schedule index of timesteps[0] (diffusers' `begin_index`: S − T)
        order       (T,) int64      each step's solver order: 1 at the chain's first and last step, else 2
        """
        schedule = self._schedule(num_inference_steps)
        if isinstance(strength, bool) or not isinstance(strength, Real) or not 0.0 <= strength <= 1.0:
            raise ConfigError(f"DPM-Solver++: expected strength in [0, 1], found {strength!r}")
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        begin = max(num_inference_steps - init_timestep, 0)
        timesteps = schedule[begin:].copy()
        sigmas = np.append(self.train_sigmas[schedule], np.float32(0.0))  # final_sigmas_type "zero"
        order = np.full(len(timesteps), 2, np.int64)
        order[:1] = 1  # no previous data prediction yet
        order[-1:] = 1  # final sigma 0: the last step returns the data prediction
        return {"timesteps": timesteps, "sigmas": sigmas, "begin": begin, "order": order}

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
        """Forward diffusion to timestep t: α x0 + s noise from σ_t (float32, as diffusers' `add_noise`)."""
        _check_pair(x0, noise, "x0", "noise")
        if not _is_int(t) or not 0 <= t < self.config.num_train_timesteps:
            raise InputError(
                "DPM-Solver++ add_noise t", f"an int in [0, {self.config.num_train_timesteps})", str(t)
            )
        alpha, sigma = _alpha_sigma(self.train_sigmas[int(t)])
        return (alpha * x0 + sigma * noise).astype(x0.dtype)

    def chain(self, num_inference_steps: int, strength: float = 1.0) -> DPMSolverChain:
        return DPMSolverChain(self.tables(num_inference_steps, strength))

    def _schedule(self, num_inference_steps: int) -> np.ndarray:
        """(S,) int64: the whole S-step schedule, diffusers' `set_timesteps` with "leading" spacing (the clipped
        lambda_min is -inf, so its last timestep is num_train_timesteps)."""
        n = self.config.num_train_timesteps
        offset = self.config.steps_offset
        if not _is_int(num_inference_steps) or not 1 <= num_inference_steps < n:
            raise ConfigError(
                f"DPM-Solver++: expected num_inference_steps an int in [1, {n - 1}], found {num_inference_steps!r}"
            )
        step_ratio = n // (num_inference_steps + 1)
        if num_inference_steps * step_ratio + offset >= n:
            raise ConfigError(
                f"DPM-Solver++: expected num_inference_steps whose largest timestep is < {n} with steps_offset "
                f"{offset}, found {num_inference_steps}"
            )
        return np.arange(num_inference_steps, 0, -1, dtype=np.int64) * step_ratio + offset


class DPMSolverChain:
    """One chain of DPM-Solver++(2M) steps over `DPMSolverScheduler.tables`: the schedule index and the previous
    step's data prediction and lambda, as diffusers' `step_index`, `model_outputs` and `lower_order_nums`."""

    def __init__(self, tables: dict[str, Any]):
        self.timesteps = tables["timesteps"]
        self.sigmas = tables["sigmas"]
        self.begin = tables["begin"]
        self.order = tables["order"]
        self.done = 0  # steps taken
        self.prev: tuple[np.ndarray, np.float32] | None = None  # (x0 prediction, lambda) of the previous step

    def step(self, eps: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        """x at schedule index i → i + 1, (B, C, h, w) in x's dtype; `t` must be the chain's next timestep."""
        _check_pair(x, eps, "x", "eps")
        k = self.done
        if k >= len(self.timesteps) or not _is_int(t) or int(t) != self.timesteps[k]:
            expected = f"timestep {self.timesteps[k]}" if k < len(self.timesteps) else "no further step"
            raise InputError(f"DPM-Solver++ step {k} t", f"the chain's next ({expected})", str(t))
        i = self.begin + k
        alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        sample = x.astype(np.float32)
        x0 = (sample - sigma_s0 * eps.astype(np.float32)) / alpha_s0  # data prediction
        with np.errstate(divide="ignore"):  # the final sigma 0: log 0 = -inf, h = inf, e^-h = 0
            lambda_t = np.log(alpha_t) - np.log(sigma_t)
        lambda_s0 = np.log(alpha_s0) - np.log(sigma_s0)
        h = lambda_t - lambda_s0
        decay = alpha_t * (np.exp(-h) - np.float32(1.0))  # α_t (e^-h − 1), a float32 scalar
        if self.order[k] == 1:  # first order
            x_next = (sigma_t / sigma_s0) * sample - decay * x0
        else:  # second order, midpoint
            assert self.prev is not None  # order 2 only after the first step
            x0_prev, lambda_s1 = self.prev
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = (np.float32(1.0) / r0) * (x0 - x0_prev)
            x_next = (sigma_t / sigma_s0) * sample - decay * x0 - (np.float32(0.5) * decay) * d1
        self.prev = (x0, lambda_s0)
        self.done += 1
        return x_next.astype(x.dtype)


def _alpha_sigma(sigma: np.floating) -> tuple[np.float32, np.float32]:
    """(α, s) = (1 / sqrt(σ² + 1), σ α) in float32, diffusers' `_sigma_to_alpha_sigma_t`."""
    sigma = np.float32(sigma)
    alpha = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
    return alpha, sigma * alpha


def schedulers(ddim: DDIMScheduler) -> dict[Sampler, DDIMScheduler | DPMSolverScheduler]:
    """Every sampler on one noise schedule: `ddim` itself, and DPM-Solver++ built from its config (a model
    folder's stage2/scheduler.json records DDIM only; DPM-Solver++'s tables derive from the same ᾱ)."""
    return {"ddim": ddim, "dpmpp_2m": DPMSolverScheduler(ddim.config)}


def chain(
    scheduler: DDIMScheduler | DPMSolverScheduler, num_inference_steps: int, strength: float
) -> StepFunction:
    """The step function of one denoising chain over `scheduler.timesteps(num_inference_steps, strength)`: DDIM's
    own stateless `step`; DPM-Solver++'s remembers the chain's previous step, so make one per chain."""
    if isinstance(scheduler, DPMSolverScheduler):
        return scheduler.chain(num_inference_steps, strength).step

    def ddim_step(eps: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        return scheduler.step(eps, t, x, num_inference_steps)

    return ddim_step
