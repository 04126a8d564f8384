"""Deterministic DDIM (eta 0) in numpy: the stage-2 noise schedule of the runtime.

Mirrors diffusers' `DDIMScheduler` (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) configured by
`brainrecon.sampling.DDIM_SCHEDULER`: epsilon prediction, no sample clipping, "leading" timestep spacing (DDIM_FIXED,
what this module implements), and the img2img truncation of diffusers' `get_timesteps`. Only what stage 2 uses is implemented.
No torch, diffusers or transformers import (a test enforces it).

    x0 (B, C, h, w) ──add_noise(t0)──► x_t0 ──[eps = unet(x_t, t); x = step(eps, t, x)] for t in timesteps──► x

Precision: diffusers builds its table in float32 torch (betas rounded to float32, cumulative product accumulated in
float64 on the CPU, rounded back to float32). Plain float64 maths drifts from that table by up to 4.7e-7, so
`alphas_cumprod` repeats the float32 path and lands within 6e-8 of it (it is not bit-exact: torch.linspace's
vectorised kernel rounds a few betas one ulp differently, depending on the CPU's vector width). The table is kept
as float64; `add_noise`/`step` combine it in float64 and return the dtype of their input (float32).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any

import numpy as np

from brainrecon.config import config_from_dict
from brainrecon.errors import ConfigError, InputError
from brainrecon.sampling import DDIM_SCHEDULER

BETA_SCHEDULES = ("linear", "scaled_linear")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class DDIMConfig:
    """The scheduler constants this DDIM can vary (defaults: Versatile Diffusion's, `DDIM_SCHEDULER`)."""

    num_train_timesteps: int = DDIM_SCHEDULER["num_train_timesteps"]
    beta_start: float = DDIM_SCHEDULER["beta_start"]
    beta_end: float = DDIM_SCHEDULER["beta_end"]
    beta_schedule: str = DDIM_SCHEDULER["beta_schedule"]  # "scaled_linear" (LDM): betas linear in sqrt space
    steps_offset: int = DDIM_SCHEDULER["steps_offset"]  # added to every inference timestep ("leading")
    # False: the last step's alpha_prev is alphas_cumprod[0], not 1
    set_alpha_to_one: bool = DDIM_SCHEDULER["set_alpha_to_one"]

    def __post_init__(self) -> None:
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 2:
            raise ConfigError(
                f"DDIMConfig: expected num_train_timesteps >= 2, found {self.num_train_timesteps}"
            )
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ConfigError(
                f"DDIMConfig: expected 0 < beta_start < beta_end < 1, found {self.beta_start}, {self.beta_end}"
            )
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(
                f"DDIMConfig: expected beta_schedule in {BETA_SCHEDULES}, found {self.beta_schedule!r}"
            )
        if not _is_int(self.steps_offset) or not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ConfigError(
                f"DDIMConfig: expected steps_offset in [0, {self.num_train_timesteps}), found {self.steps_offset}"
            )
        if not isinstance(self.set_alpha_to_one, bool):
            raise ConfigError(
                f"DDIMConfig: expected set_alpha_to_one a bool, found {self.set_alpha_to_one!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "ddim config") -> DDIMConfig:
        return config_from_dict(cls, data, source=source)  # unknown keys -> ConfigError


# The scheduler settings this module implements and cannot vary (clip_sample False, prediction_type "epsilon",
# timestep_spacing "leading"): the rest of DDIM_SCHEDULER; a recorded scheduler must have these values.
DDIM_FIXED = {k: v for k, v in DDIM_SCHEDULER.items() if k not in DDIMConfig.__dataclass_fields__}


class DDIMScheduler:
    """`timesteps` gives the img2img schedule; `add_noise` starts it; `step` is one eta-0 DDIM update."""

    def __init__(self, config: DDIMConfig = DDIMConfig()):
        if not isinstance(config, DDIMConfig):
            raise ConfigError(f"DDIMScheduler: expected a DDIMConfig, found {type(config).__name__}")
        self.config = config
        n = config.num_train_timesteps
        if config.beta_schedule == "scaled_linear":
            betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32) ** 2
        else:
            betas = np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
        alphas = np.float32(1.0) - betas  # (n,) float32
        # float32 values, kept as float64 (see the module docstring)
        self.alphas_cumprod = np.cumprod(alphas, dtype=np.float64).astype(np.float32).astype(np.float64)
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])

    def timesteps(self, num_inference_steps: int, strength: float = 1.0) -> np.ndarray:
        """(S,) int64, descending: the last S of the `num_inference_steps` schedule, as diffusers' img2img
        `get_timesteps`: 50 steps at strength 0.75 -> 37 steps (721, 701, ..., 1); strength 0 -> empty."""
        step_ratio = self._check_steps(num_inference_steps)
        if isinstance(strength, bool) or not isinstance(strength, Real) or not 0.0 <= strength <= 1.0:
            raise ConfigError(f"DDIM: expected strength in [0, 1], found {strength!r}")
        full = np.arange(num_inference_steps, dtype=np.int64)[::-1] * step_ratio + self.config.steps_offset
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        return full[t_start:].copy()

    def tables(self, num_inference_steps: int, strength: float = 1.0) -> dict[str, np.ndarray]:
        """The per-step constants of a run, for a runtime to store or inspect; step i maps x_{t_i} to x_{t_i - k}:

        timesteps   (S,) int64    t_i, what the UNet is called with
        alpha_t     (S,) float64  alphas_cumprod[t_i]; alpha_t[0] is also what `add_noise` uses
        alpha_prev  (S,) float64  alphas_cumprod[t_i - k] (k = num_train_timesteps // num_inference_steps), or
                                  final_alpha_cumprod where t_i - k < 0
        """
        timesteps = self.timesteps(num_inference_steps, strength)
        prev = timesteps - self.config.num_train_timesteps // num_inference_steps
        alpha_prev = np.where(prev >= 0, self.alphas_cumprod[np.maximum(prev, 0)], self.final_alpha_cumprod)
        return {"timesteps": timesteps, "alpha_t": self.alphas_cumprod[timesteps], "alpha_prev": alpha_prev}

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
        """Forward diffusion to timestep t: sqrt(a_t) x0 + sqrt(1 - a_t) noise, (B, C, h, w) in x0's dtype."""
        _check_pair(x0, noise, "x0", "noise")
        if not _is_int(t) or not 0 <= t < self.config.num_train_timesteps:
            raise InputError("DDIM add_noise t", f"an int in [0, {self.config.num_train_timesteps})", str(t))
        alpha_t = self.alphas_cumprod[int(t)]
        x0_64, noise64 = x0.astype(np.float64), noise.astype(np.float64)
        return (math.sqrt(alpha_t) * x0_64 + math.sqrt(1.0 - alpha_t) * noise64).astype(x0.dtype)

    def step(self, eps: np.ndarray, t: int, x: np.ndarray, num_inference_steps: int) -> np.ndarray:
        """One eta-0 DDIM update x_t -> x_{t-k} (k = num_train_timesteps // num_inference_steps), eq. 12:
        x0_pred = (x - sqrt(1 - a_t) eps) / sqrt(a_t);  x_prev = sqrt(a_prev) x0_pred + sqrt(1 - a_prev) eps."""
        step_ratio = self._check_steps(num_inference_steps)
        _check_pair(x, eps, "x", "eps")
        offset = self.config.steps_offset
        index, rest = divmod(int(t) - offset, step_ratio) if _is_int(t) else (-1, 0)
        if rest or not 0 <= index < num_inference_steps:
            raise InputError(
                "DDIM step t",
                f"a timestep of the {num_inference_steps}-step schedule ({offset}, {offset + step_ratio}, ...)",
                str(t),
            )
        prev_t = int(t) - step_ratio
        alpha_t = self.alphas_cumprod[int(t)]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        x64, eps64 = x.astype(np.float64), eps.astype(np.float64)
        x0_pred = (x64 - math.sqrt(1.0 - alpha_t) * eps64) / math.sqrt(alpha_t)
        return (math.sqrt(alpha_prev) * x0_pred + math.sqrt(1.0 - alpha_prev) * eps64).astype(x.dtype)

    def _check_steps(self, num_inference_steps: int) -> int:
        """The step ratio k; the largest timestep (S - 1) k + steps_offset must index the table."""
        n = self.config.num_train_timesteps
        if not _is_int(num_inference_steps) or not 1 <= num_inference_steps <= n:
            raise ConfigError(
                f"DDIM: expected num_inference_steps an int in [1, {n}], found {num_inference_steps!r}"
            )
        step_ratio = n // num_inference_steps
        if (num_inference_steps - 1) * step_ratio + self.config.steps_offset >= n:
            raise ConfigError(
                f"DDIM: expected num_inference_steps whose largest timestep is < {n} with steps_offset "
                f"{self.config.steps_offset}, found {num_inference_steps}"
            )
        return step_ratio


def _check_pair(a: Any, b: Any, name_a: str, name_b: str) -> None:
    for name, arr in ((name_a, a), (name_b, b)):
        if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
            found = f"dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise InputError(f"DDIM {name}", "a float numpy array (B, C, h, w)", found)
    if a.shape != b.shape:
        raise InputError(f"DDIM {name_b}", f"the shape of {name_a} {a.shape}", f"shape {b.shape}")
