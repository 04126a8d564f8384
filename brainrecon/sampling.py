"""Stage-2 sampling settings: one config for the torch reference (`train/stage2/img2img.py`) and the runtime.

Brain-Diffuser's Versatile Diffusion img2img (repo ozcelikfu/brain-diffuser, `scripts/versatilediffusion_reconstruct_
images.py`): DDIM, 50 steps, eta 0, strength 0.75 (37 denoising steps), guidance 7.5, dual cross-attention mix 0.6
vision / 0.4 text. Fitted values are saved in `stage2/stage2.json` ("sampling"); `mix_ratio` and
`vae_scale_factor` are baked into the exported graphs, the others may be overridden per run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from brainrecon.errors import ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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

    def __post_init__(self) -> None:
        if not _is_int(self.num_inference_steps) or self.num_inference_steps < 1:
            raise ConfigError(
                f"sampling: expected num_inference_steps >= 1, found {self.num_inference_steps!r}"
            )
        if not 0.0 <= self.strength <= 1.0:
            raise ConfigError(f"sampling: expected strength in [0, 1], found {self.strength!r}")
        if not math.isfinite(self.guidance_scale):
            raise ConfigError(f"sampling: expected a finite guidance_scale, found {self.guidance_scale!r}")
        if self.eta != 0.0:
            raise ConfigError(f"sampling: expected eta 0.0 (deterministic DDIM), found {self.eta!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"sampling: expected a seed >= 0, found {self.seed!r}")
        if not self.vae_scale_factor > 0:
            raise ConfigError(f"sampling: expected vae_scale_factor > 0, found {self.vae_scale_factor!r}")
        if not 0.0 <= self.mix_ratio <= 1.0:
            raise ConfigError(f"sampling: expected mix_ratio in [0, 1], found {self.mix_ratio!r}")

    def with_overrides(self, **overrides: Any) -> SamplingConfig:
        """A copy with the given fields replaced; None values are ignored (an option the user did not set)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
