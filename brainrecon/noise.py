"""The one random draw of stage 2, shared by the torch reference and the torch-free runtime.

img2img noises the init latents once; everything after is deterministic (DDIM, eta 0). Drawing that noise with
numpy's PCG64 from the seed, rather than torch.randn, lets the runtime reproduce the reference exactly without
torch. The whole batch is drawn at once, so image i gets the same noise however the batch is later split.
"""

from __future__ import annotations

import numpy as np


def img2img_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Standard normal float32 noise of `shape` (N, C, h, w) from `np.random.default_rng(seed)`."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
