"""Stage-1 runtime (numpy): z-scored betas (N, V) → regressor → latents → re-normalisation → VDVAE decoder → uint8.

The torch reference is `brainrecon.train.stage1.Stage1Model.reconstruct`; this pipeline runs the exported ONNX
files (ONNX Runtime) or TensorRT engines listed in `model_dir/manifest.json`, after re-hashing every file it reads.
No torch, diffusers or transformers import, here or below (a test enforces it).

    betas (N, V) float32, checked ──► regressor, in batches ≤ profile max ──► latents (N, D) float32
      ──renormalize (optional, over the whole input set)──► decoder, in batches ≤ profile max
      ──► images (N, S, S, 3) float [0, 255] ──rint, clip──► uint8
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from brainrecon import model_dir as layout
from brainrecon.errors import InputError
from brainrecon.normalize import renormalize_predictions
from brainrecon.runtime.artifacts import load_model
from brainrecon.runtime.backends.base import Backend
from brainrecon.runtime.model_folder import ModelFolder
from brainrecon.runtime.types import CheckedInputs, Progress, Reconstruction

if TYPE_CHECKING:
    from brainrecon.runtime.types import RuntimeOptions

DECODER = layout.VDVAE_DECODER


class Stage1Pipeline:
    """The fitted regressor and the VDVAE decoder of a model folder. Build with `open`; `run(checked)` →
    `Reconstruction` (its `final_images` None)."""

    def __init__(self, folder: ModelFolder, regressor: Backend, decoder: Backend):
        self.regressor, self.decoder = regressor, decoder
        self.regressor_io, self.decoder_io = regressor.io, decoder.io
        self.latent_mean = np.asarray(folder.stage1.latent_mean, np.float32)  # (D,)
        self.latent_std = np.asarray(folder.stage1.latent_std, np.float32)  # (D,)
        self.n_voxels = int(self.regressor_io.inputs[0][1][1])
        self.latent_dims = int(self.decoder_io.inputs[0][1][1])
        if self.latent_mean.shape != (self.latent_dims,) or self.latent_std.shape != (self.latent_dims,):
            raise InputError(
                "latent statistics",
                f"shape ({self.latent_dims},)",
                f"{self.latent_mean.shape}, {self.latent_std.shape}",
            )

    @classmethod
    def open(cls, folder: ModelFolder, options: RuntimeOptions) -> Stage1Pipeline:
        """Load the regressor and the decoder (each file hash-verified first) as `options` say."""
        return cls(
            folder,
            load_model(folder, folder.stage1.regressor, options),
            load_model(folder, DECODER, options),
        )

    def batch_limits(self) -> tuple[int, int]:
        """Images per call that both models' shape profiles allow, [lo, hi]."""
        return (
            max(self.regressor_io.min_batch, self.decoder_io.min_batch),
            min(self.regressor_io.max_batch, self.decoder_io.max_batch),
        )

    def batch_sizes(self, batch_size: int | None) -> dict[str, int]:
        """{"stage1": images per call} (default: the profiles' max); outside the profiles a one-line InputError."""
        lo, hi = self.batch_limits()
        batch = hi if batch_size is None else int(batch_size)
        if not lo <= batch <= hi:
            raise InputError("batch size", f"{lo}..{hi} (the engines' shape profiles)", f"{batch}")
        return {"stage1": batch}

    def run(self, checked: CheckedInputs, progress: Progress | None = None) -> Reconstruction:
        """Stage 1 on what `Reconstructor.check` accepted (nothing is checked again); `progress(step, done, total)`
        after every regressor and decoder call."""
        betas, batch, renorm = checked.betas, checked.batch_sizes["stage1"], checked.renormalize["stage1"]
        n = len(betas)
        timings: dict[str, float] = {}
        t_all = time.perf_counter()

        t0 = time.perf_counter()
        latents = np.empty((n, self.latent_dims), dtype=np.float32)  # (N, D)
        key_in, key_out = self.regressor_io.input_name, self.regressor_io.output_name
        for i in range(0, n, batch):
            latents[i : i + batch] = self.regressor.run({key_in: betas[i : i + batch]})[key_out]
            if progress:
                progress("regressor", min(i + batch, n), n)
        timings["regressor_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if renorm:
            latents = renormalize_predictions(latents, self.latent_mean, self.latent_std)
        timings["renormalize_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        key_in, key_out = self.decoder_io.input_name, self.decoder_io.output_name
        chunks = []
        for i in range(0, n, batch):
            # (b, S, S, 3) float in [0, 255]
            pixels = self.decoder.run({key_in: latents[i : i + batch]})[key_out]
            chunks.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
            if progress:
                progress("decoder", min(i + batch, n), n)
        images = np.concatenate(chunks)
        timings["decoder_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_all
        timings["per_image_ms"] = 1000.0 * timings["total_s"] / n
        models = {self.regressor_io.model: self.regressor, DECODER: self.decoder}
        return Reconstruction(
            stage1_images=images,
            final_images=None,
            latents=latents,
            timings={k: round(v, 6) for k, v in timings.items()},
            providers={name: list(backend.providers) for name, backend in models.items()},
            sampling=None,
            timesteps=None,
            renormalized={"stage1": renorm},
            batch_sizes={"regressor": batch, "decoder": batch},
            fallback={name: fb for name, b in models.items() if (fb := getattr(b, "fallback", None))},
        )
