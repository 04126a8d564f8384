"""Stage-1 runtime (numpy): z-scored betas (N, V) → regressor → latents → re-normalisation → VDVAE decoder → uint8.

The torch reference is `brainrecon.train.stage1.Stage1Model.reconstruct`; this pipeline runs the exported ONNX
files (ONNX Runtime) or TensorRT engines listed in `model_dir/manifest.json`, after re-hashing every file it reads.
No torch, diffusers or transformers import, here or below (a test enforces it).

    betas (N, V) float ──check──► regressor, in batches ≤ profile max ──► latents (N, D) float32
      ──renormalize (optional, over the whole input set)──► decoder, in batches ≤ profile max
      ──► images (N, S, S, 3) float [0, 255] ──rint, clip──► uint8
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon import model_dir as layout
from brainrecon.errors import InputError
from brainrecon.io import load_npy, read_json
from brainrecon.manifest import Manifest, load_manifest
from brainrecon.normalize import renormalize_predictions
from brainrecon.runtime.artifacts import check_engine, load_model, verify_files
from brainrecon.runtime.backends.base import Backend, ModelIO

DECODER = layout.VDVAE_DECODER

Progress = Callable[[str, int, int], None]  # (step, done, total)


def check_betas(betas: Any, n_voxels: int, source: str = "betas") -> np.ndarray:
    """(N, V) float32/float64 z-scored betas, finite as float32 → float32; anything else is a one-line InputError."""
    if not isinstance(betas, np.ndarray):
        raise InputError(source, "a numpy array of z-scored betas", type(betas).__name__)
    if betas.ndim != 2:
        raise InputError(source, f"(N, {n_voxels}) z-scored betas (rank 2)", f"shape {betas.shape}")
    if betas.dtype.kind != "f":
        raise InputError(source, "float32 or float64 z-scored betas", f"dtype {betas.dtype}")
    if betas.shape[1] != n_voxels:
        raise InputError(source, f"{n_voxels} voxels per row (the model's mask)", f"{betas.shape[1]}")
    if betas.shape[0] < 1:
        raise InputError(source, "at least one row of betas", "none")
    # cast, then check: a float64 beyond float32's range (1e300) is finite before the cast and inf after it
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.ascontiguousarray(betas, dtype=np.float32)  # (N, V)
    bad = ~np.isfinite(cast)
    if bad.any():
        row, voxel = np.argwhere(bad)[0]
        value = float(betas[row, voxel])
        overflow = f": {value!r}, beyond float32's range" if np.isfinite(value) else ""
        raise InputError(
            source,
            "finite betas",
            f"{int(bad.sum())} NaN/Inf values (first at row {row}, voxel {voxel}{overflow})",
        )
    return cast


@dataclass(frozen=True)
class Stage1Result:
    images: np.ndarray  # (N, S, S, 3) uint8
    latents: np.ndarray  # (N, D) float32, as decoded (after re-normalisation when applied)
    timings: dict[str, float]  # seconds per step
    providers: dict[str, list[str]]  # model -> providers actually used
    renormalized: bool
    batch_sizes: dict[str, int]
    fallback: dict[str, str]  # model -> GPU provider fallback, when allowed and it happened


class Stage1Pipeline:
    def __init__(
        self,
        regressor: Backend,
        decoder: Backend,
        regressor_io: ModelIO,
        decoder_io: ModelIO,
        latent_mean: np.ndarray,
        latent_std: np.ndarray,
        renormalize: bool = True,
        info: dict[str, Any] | None = None,
    ):
        self.regressor, self.decoder = regressor, decoder
        self.regressor_io, self.decoder_io = regressor_io, decoder_io
        self.latent_mean = np.asarray(latent_mean, np.float32)  # (D,)
        self.latent_std = np.asarray(latent_std, np.float32)  # (D,)
        self.renormalize = renormalize
        self.info = info or {}
        self.n_voxels = int(regressor_io.inputs[0][1][1])
        self.latent_dims = int(decoder_io.inputs[0][1][1])
        if self.latent_mean.shape != (self.latent_dims,) or self.latent_std.shape != (self.latent_dims,):
            raise InputError(
                "latent statistics",
                f"shape ({self.latent_dims},)",
                f"{self.latent_mean.shape}, {self.latent_std.shape}",
            )

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        engine: str = "ort",
        precision: str = "fp32",
        device: str = "cpu",
        allow_cpu_fallback: bool = False,
        threads: int | None = None,
        manifest: Manifest | None = None,
    ) -> Stage1Pipeline:
        """Load the regressor and decoder of `model_dir` after verifying the hashes of every file read (against
        `manifest` when the caller has parsed it already)."""
        model_dir = Path(model_dir)
        check_engine(engine, precision)
        manifest = manifest or load_manifest(model_dir)
        verify_files(manifest, model_dir, layout.STAGE1_FILES)
        summary = read_json(model_dir / layout.STAGE1_SUMMARY, "stage-1 summary")
        regressor_name = summary["config"]["regressor"]
        backends: dict[str, Backend] = {}
        ios: dict[str, ModelIO] = {}
        files: dict[str, str] = {}
        for name in (regressor_name, DECODER):
            backends[name], ios[name], files[name], _ = load_model(
                manifest, model_dir, name, engine, precision, device, allow_cpu_fallback, threads
            )
        return cls(
            backends[regressor_name],
            backends[DECODER],
            ios[regressor_name],
            ios[DECODER],
            load_npy(model_dir / layout.LATENT_MEAN, "training-latent mean"),
            load_npy(model_dir / layout.LATENT_STD, "training-latent std"),
            renormalize=bool(summary["config"].get("renormalize", True)),
            info={
                "model_dir": str(model_dir),
                "regressor": regressor_name,
                "engine": engine,
                "precision": precision,
                "device": device,
                "files": files,
            },
        )

    def max_batch(self) -> int:
        return min(self.regressor_io.max_batch, self.decoder_io.max_batch)

    def check_inputs(
        self,
        betas: Any,
        batch_size: int | None = None,
        renormalize: bool | None = None,
        source: str = "betas",
    ) -> tuple[np.ndarray, int, bool]:
        """Validate before any work: betas, batch size against both profiles, set size for re-normalisation."""
        betas = check_betas(betas, self.n_voxels, source)
        limit = self.max_batch()
        batch = limit if batch_size is None else int(batch_size)
        lo = max(self.regressor_io.min_batch, self.decoder_io.min_batch)
        if not lo <= batch <= limit:
            raise InputError("batch size", f"{lo}..{limit} (the engines' shape profiles)", f"{batch}")
        renorm = self.renormalize if renormalize is None else renormalize
        if renorm and len(betas) < 2:
            raise InputError(
                source,
                "at least 2 trials (re-normalisation takes statistics over the set; or disable it)",
                f"{len(betas)}",
            )
        return betas, batch, renorm

    def run(
        self,
        betas: np.ndarray,
        batch_size: int | None = None,
        renormalize: bool | None = None,
        progress: Progress | None = None,
    ) -> Stage1Result:
        return self.run_checked(*self.check_inputs(betas, batch_size, renormalize), progress)

    def run_checked(
        self, betas: np.ndarray, batch: int, renorm: bool, progress: Progress | None = None
    ) -> Stage1Result:
        """`run` on what `check_inputs` returned (the inputs are not scanned again)."""
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
        return Stage1Result(
            images=images,
            latents=latents,
            timings={k: round(v, 6) for k, v in timings.items()},
            providers={
                self.regressor_io.model: list(self.regressor.providers),
                DECODER: list(self.decoder.providers),
            },
            renormalized=renorm,
            batch_sizes={"regressor": batch, "decoder": batch},
            fallback={
                name: fb
                for name, backend in ((self.regressor_io.model, self.regressor), (DECODER, self.decoder))
                if (fb := getattr(backend, "fallback", None))
            },
        )
