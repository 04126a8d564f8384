"""Stage-2 sampling settings: one config for the torch reference (`train/stage2/img2img.py`) and the runtime.

Brain-Diffuser's Versatile Diffusion img2img (repo ozcelikfu/brain-diffuser, `scripts/versatilediffusion_reconstruct_
images.py`): DDIM, 50 steps, eta 0, strength 0.75 (37 denoising steps), guidance 7.5, dual cross-attention mix 0.6
vision / 0.4 text. Fitted values are saved in `stage2/stage2.json` ("sampling"); `mix_ratio` and
`vae_scale_factor` are baked into the exported graphs, the others may be overridden per run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from brainrecon.choices import PRESET_NAMES, SAMPLERS, Preset, Sampler
from brainrecon.errors import ConfigError, InputError

# seeds travel as int64: Triton's `seed` input, recon-batch's `--seed + row`
SEED_MAX = int(np.iinfo(np.int64).max)

# Versatile Diffusion's DDIM noise schedule, as diffusers' `DDIMScheduler` keyword arguments: LDM's
# linear_start/linear_end on a scaled-linear schedule (betas linear in sqrt space), timesteps offset by 1 ("leading":
# 50 steps -> 981, 961, ..., 1), alpha_prev of the last step = alphas_cumprod[0], epsilon prediction, no clipping.
# The one table: the torch reference builds its scheduler from it (train/stage2/img2img.py), recon-export records
# it in stage2/scheduler.json, the numpy DDIM takes its defaults from it (runtime/ddim.py), and a Versatile
# Diffusion folder's scheduler config is checked against it (train/foundations/loaders.py).
DDIM_SCHEDULER: Mapping[str, Any] = MappingProxyType(
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
    }
)


# Named overrides of a model's fitted sampling. "paper": Brain-Diffuser's recipe as fitted (DDIM, 50 steps at
# strength 0.75 = 37 UNet steps, guidance at every step). "fast": DPM-Solver++ 2M at 10 steps (7 run at strength
# 0.75), guidance at every step: on the demo subject's quality map at four img2img seeds (docs/speed.md) it changed
# PixCorr by +0.002, SSIM by +0.002 and CLIP 2-way by +0.001 on average and stayed within the bounds at every seed;
# stopping guidance at 70% saved a further 10% at real size but fell outside at 2 of the 4 seeds.
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "paper": MappingProxyType({}),
        "fast": MappingProxyType({"sampler": "dpmpp_2m", "num_inference_steps": 10}),
    }
)
assert tuple(PRESETS) == PRESET_NAMES


def preset_overrides(preset: Preset = "paper", **explicit: Any) -> dict[str, Any]:
    """The sampling overrides of a named preset, with the explicitly given ones (not None) on top: what recon-infer,
    recon-serve and recon-batch pass for `--preset NAME --steps N ...`."""
    if preset not in PRESETS:
        raise ConfigError(f"sampling: expected a preset from {PRESET_NAMES}, found {preset!r}")
    return {**PRESETS[preset], **{k: v for k, v in explicit.items() if v is not None}}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_finite_real(value: Any) -> bool:
    """A finite int or float (not a bool, a string or NaN/Inf): the precondition of every range check below,
    written as `not (lo <= x <= hi)` so that a value no comparison holds for is refused, never let through."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def check_seeds(seeds: Any, n: int) -> np.ndarray:
    """Per-row img2img seeds: `n` integers in [0, SEED_MAX] (one per row) → (n,) int64; else a one-line
    InputError, so that a bad seed is refused before any model runs (numpy's generator takes any non-negative
    integer; the bound is the int64 every other path carries seeds in)."""
    expected = f"{n} integers in [0, {SEED_MAX}] (one per row)"
    try:
        array = np.asarray(seeds)
    except (ValueError, TypeError):  # ragged nested sequences
        raise InputError("seeds", expected, f"a ragged {type(seeds).__name__}") from None
    if array.shape != (n,) or array.dtype.kind not in "iu":
        raise InputError("seeds", expected, f"{array.dtype} of shape {array.shape}")
    bad = (array < 0) | (array > SEED_MAX)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError("seeds", expected, f"{array[row]} at row {row}")
    return array.astype(np.int64)


@dataclass(frozen=True)
class SamplingConfig:
    num_inference_steps: int = 50
    strength: float = 0.75  # fraction of the schedule re-noised: 50 x 0.75 -> 37 denoising steps
    guidance_scale: float = 7.5
    # deterministic DDIM, the only value supported: eta > 0 draws fresh noise inside every step from a global RNG
    # that a runtime cannot reproduce
    eta: float = 0.0
    seed: int = 0
    vae_scale_factor: float = 0.18215
    mix_ratio: float = 0.6  # vision weight of the dual cross-attention (text weight 1 - mix_ratio)
    sampler: Sampler = "ddim"  # brainrecon.choices.SAMPLERS; the noise schedule is DDIM_SCHEDULER's for both
    # Fraction of the denoising steps run with classifier-free guidance; the steps after it run the conditional pass
    # alone (half the UNet rows). 1.0, Brain-Diffuser's: guidance at every step.
    guidance_stop: float = 1.0
    # DeepCache step reuse (train/stage2/deepcache.py): the whole UNet every cache_interval-th step (the first
    # always), the steps between on its shallow branch around the last full step's deep feature. 1: every step full.
    cache_interval: int = 1

    def __post_init__(self) -> None:
        if not (_is_int(self.num_inference_steps) and self.num_inference_steps >= 1):
            raise ConfigError(
                f"sampling: expected num_inference_steps >= 1, found {self.num_inference_steps!r}"
            )
        if not (_is_finite_real(self.strength) and 0.0 <= self.strength <= 1.0):
            raise ConfigError(f"sampling: expected strength in [0, 1], found {self.strength!r}")
        if not _is_finite_real(self.guidance_scale):
            raise ConfigError(f"sampling: expected a finite guidance_scale, found {self.guidance_scale!r}")
        if not (_is_finite_real(self.eta) and self.eta == 0.0):
            raise ConfigError(f"sampling: expected eta 0.0 (deterministic DDIM), found {self.eta!r}")
        if not (_is_int(self.seed) and 0 <= self.seed <= SEED_MAX):
            raise ConfigError(f"sampling: expected a seed in [0, {SEED_MAX}], found {self.seed!r}")
        if not (_is_finite_real(self.vae_scale_factor) and self.vae_scale_factor > 0):
            raise ConfigError(
                f"sampling: expected a finite vae_scale_factor > 0, found {self.vae_scale_factor!r}"
            )
        if not (_is_finite_real(self.mix_ratio) and 0.0 <= self.mix_ratio <= 1.0):
            raise ConfigError(f"sampling: expected mix_ratio in [0, 1], found {self.mix_ratio!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampling: expected sampler one of {SAMPLERS}, found {self.sampler!r}")
        if not (_is_finite_real(self.guidance_stop) and 0.0 <= self.guidance_stop <= 1.0):
            raise ConfigError(f"sampling: expected guidance_stop in [0, 1], found {self.guidance_stop!r}")
        if not (_is_int(self.cache_interval) and self.cache_interval >= 1):
            raise ConfigError(f"sampling: expected cache_interval >= 1, found {self.cache_interval!r}")

    def guided_steps(self, steps: int) -> int:
        """How many of the `steps` denoising steps a run takes (int(num_inference_steps × strength)) use
        classifier-free guidance, the first ones: ceil(guidance_stop × steps), the product rounded to 6 decimals
        first so that a decimal fraction counts as written (0.7 × 10 is 7.000000000000001 in binary: 7 steps, not
        8). 1.0 guides every step, 0.0 none. The one rule of the runtime and the torch reference."""
        return math.ceil(round(self.guidance_stop * steps, 6))

    def with_overrides(self, **overrides: Any) -> SamplingConfig:
        """A copy with the given fields replaced; None values are ignored (an option the user did not set)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
