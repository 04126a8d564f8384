"""The one random draw of stage 2, shared by the torch reference and the torch-free runtime.

img2img noises the init latents once; everything after is deterministic (DDIM, eta 0). Drawing that noise with
numpy's PCG64 from the seed, rather than torch.randn, lets the runtime reproduce the reference exactly without
torch. The whole batch is drawn at once, so image i gets the same noise however the batch is later split.

A server batches requests that arrive independently, so there each row draws from its own seed
(`img2img_noise_per_row`): row i gets `default_rng(seeds[i])`'s first draw of one image's shape, which for a
single image is exactly `img2img_noise` with that seed.
"""

from __future__ import annotations

import numpy as np

from brainrecon.errors import InputError


def img2img_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Standard normal float32 noise of `shape` (N, C, h, w) from `np.random.default_rng(seed)`."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def img2img_noise_per_row(shape: tuple[int, ...], seeds) -> np.ndarray:
    """(N, C, h, w) float32 noise whose row i is `img2img_noise((1, C, h, w), seeds[i])`."""
    seeds = np.asarray(seeds)
    if seeds.shape != (shape[0],) or seeds.dtype.kind not in "iu" or (seeds < 0).any():
        raise InputError(
            "seeds", f"{shape[0]} non-negative integer seeds (one per row)", f"{seeds.dtype} {seeds.shape}"
        )
    return np.concatenate([img2img_noise((1, *shape[1:]), int(s)) for s in seeds])
