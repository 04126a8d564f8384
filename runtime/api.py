"""The public runtime API: open an exported model folder once, reconstruct many times. numpy + ONNX Runtime (or
TensorRT); never torch, diffusers or transformers.

    from brainrecon.runtime import Reconstructor, RuntimeOptions

    with Reconstructor.open("engines/subj01", RuntimeOptions(precision="fp32")) as rec:
        out = rec.reconstruct(betas)               # (N, V) z-scored float32 betas
        out.images                                 # (N, S, S, 3) uint8: the final images (stage 1's for a
                                                   # stage-1 model); out.stage1_images, out.timings, out.providers

One call, one path: `reconstruct(betas, ...)` = `run_checked(check(betas, ...))`.

    Reconstructor.open   read_model_folder (manifest parsed once, data files verified once, baked-in constants
                         checked once) → Stage1Pipeline.open / Stage2Pipeline.open (each model file verified, loaded)
    check                betas scanned once (inputs.check_betas), batch against the profiles, re-normalisation,
                         sampling, seeds → CheckedInputs; nothing has run yet
    run_checked          the stage's pipeline `run(checked)` → Reconstruction; nothing is checked again

`recon-infer`, `recon-bench`, the Triton server and the Ray batch runner all go through this class.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.choices import Stage
from brainrecon.errors import ConfigError, InputError
from brainrecon.runtime.inputs import check_betas, load_betas
from brainrecon.runtime.model_folder import BAKED_IN, ModelFolder, read_model_folder
from brainrecon.runtime.stage1 import Stage1Pipeline
from brainrecon.runtime.stage2 import Stage2Pipeline
from brainrecon.runtime.types import CheckedInputs, Progress, Reconstruction, RuntimeOptions
from brainrecon.sampling import SamplingConfig, check_seeds

__all__ = ["CheckedInputs", "Reconstruction", "Reconstructor", "RuntimeOptions"]


class Reconstructor:
    """An exported subject model folder, loaded once. Build with `Reconstructor.open`; use as a context manager
    (or call `close`) to release the sessions and engines."""

    def __init__(
        self, folder: ModelFolder, pipeline: Stage1Pipeline | Stage2Pipeline, options: RuntimeOptions
    ):
        self.folder = folder
        self.pipeline = pipeline
        self.options = options
        self.model_dir = folder.path
        self.stage: Stage = 2 if isinstance(pipeline, Stage2Pipeline) else 1
        self.stage1 = pipeline.stage1 if isinstance(pipeline, Stage2Pipeline) else pipeline

    @classmethod
    def open(
        cls, model_dir: str | Path, options: RuntimeOptions | None = None, stage: Stage | None = None
    ) -> Reconstructor:
        """Load the exported models of `model_dir` (`stage` 1 or 2; default 2 when stage 2 is fitted)."""
        options = options or RuntimeOptions()
        folder = read_model_folder(model_dir, stage, options.precision, options.unet_graph)
        if folder.stage == 1:
            return cls(folder, Stage1Pipeline.open(folder, options), options)
        return cls(folder, Stage2Pipeline.open(folder, options), options)

    # ----------------------------------------------------------------------------------------- facts

    @property
    def n_voxels(self) -> int:
        return self.stage1.n_voxels

    @property
    def sampling(self) -> SamplingConfig | None:
        """The fitted stage-2 sampling (`stage2/stage2.json`); None for a stage-1 reconstructor."""
        return self.folder.stage2.sampling if self.folder.stage2 is not None else None

    @property
    def image_sizes(self) -> dict[str, int]:
        """Side in pixels of the images a run returns: "stage1" (the VDVAE's) and "final" (stage 2's, or stage 1's
        for a stage-1 reconstructor)."""
        side = int(self.stage1.decoder_io.outputs[0][1][1])  # decoder images (batch, s, s, 3)
        final = self.pipeline.image_size if isinstance(self.pipeline, Stage2Pipeline) else side
        return {"stage1": side, "final": final}

    @property
    def info(self) -> dict[str, Any]:
        o = self.options
        return {
            "model_dir": str(self.model_dir),
            "stage": self.stage,
            "regressor": self.folder.stage1.regressor,
            "engine": o.engine,
            "precision": o.precision,
            "device": o.device,
            "unet_graph": self.folder.stage2.unet_graph if self.folder.stage2 is not None else None,
        }

    def load_betas(self, path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
        """A betas file (.npy z-scored rows, or a NIfTI / NSD HDF5 session preprocessed as recon-prepare recorded)
        → (N, V) float32 and a description of what was done."""
        return load_betas(path, self.model_dir, self.folder.manifest)

    # ----------------------------------------------------------------------------------------- run

    def check(
        self,
        betas: Any,
        sampling: SamplingConfig | None = None,
        seeds: Any = None,
        renormalize: bool | None = None,
        batch_size: int | None = None,
        source: str = "betas",
    ) -> CheckedInputs:
        """Everything `reconstruct` checks, before any model runs (one-line InputError or ConfigError); returns what
        `run_checked` takes. Exposed so that callers with their own slow set-up (reading ground truth, creating an
        output folder) can fail first, and a server can check each request once before batching them."""
        if self.stage == 1:
            # Stage 1 draws no noise (the exported VDVAE decoder takes the prior means after layer K), so seeds
            # would change nothing: refused rather than silently ignored, like the stage-2 sampling.
            if seeds is not None:
                raise InputError(
                    "seeds", "None for a stage-1 model (deterministic: it draws no noise)", "per-row seeds"
                )
            if sampling is not None:
                raise InputError(
                    "sampling", "None for a stage-1 model (it sets stage 2's img2img sampling)", "a sampling"
                )
        else:
            sampling = self._check_sampling(sampling)
        betas = check_betas(betas, self.n_voxels, source)
        batch_sizes = self.pipeline.batch_sizes(batch_size)
        fitted = {"stage1": self.folder.stage1.renormalize}
        if self.folder.stage2 is not None:
            fitted["clip"] = self.folder.stage2.renormalize
        # one rule for both stages: with one trial there are no statistics over the set
        if renormalize and len(betas) < 2:
            raise InputError(
                source,
                "at least 2 trials (re-normalisation takes statistics over the set; or disable it)",
                f"{len(betas)}",
            )
        renorm = {
            key: bool(value if renormalize is None else renormalize) and len(betas) > 1
            for key, value in fitted.items()
        }
        if seeds is not None:
            seeds = check_seeds(seeds, len(betas))
        return CheckedInputs(betas, batch_sizes, renorm, sampling, seeds)

    def _check_sampling(self, sampling: SamplingConfig | None) -> SamplingConfig:
        """The sampling a stage-2 run uses: the fitted one, or `sampling` when its baked-in fields agree with it
        and the scheduler can build its schedule."""
        fitted = self.sampling
        assert fitted is not None
        if sampling is None:
            return fitted
        if not isinstance(sampling, SamplingConfig):
            raise InputError("sampling", "a brainrecon.sampling.SamplingConfig", type(sampling).__name__)
        for key, graphs in BAKED_IN.items():
            if not math.isclose(getattr(sampling, key), getattr(fitted, key), abs_tol=1e-9):
                raise ConfigError(
                    f"sampling: expected {key} {getattr(fitted, key)} (baked into {graphs}; another value needs "
                    f"a re-export), found {getattr(sampling, key)}"
                )
        # a schedule the scheduler cannot build (too many steps for the offset, ...) fails here, before any work
        self.folder.stage2.schedulers[sampling.sampler].timesteps(
            sampling.num_inference_steps, sampling.strength
        )
        self.folder.stage2.check_cache_interval(sampling.cache_interval, self.model_dir)  # DeepCache's graphs
        return sampling

    def reconstruct(
        self,
        betas: np.ndarray,
        sampling: SamplingConfig | None = None,
        seeds: Any = None,
        renormalize: bool | None = None,
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> Reconstruction:
        """(N, V) z-scored betas → images.

        sampling: stage 2's settings (default `self.sampling`, the fitted ones; `mix_ratio` and
        `vae_scale_factor` are baked into the graphs and cannot change). seeds: None draws the img2img noise for
        the whole set from `sampling.seed`; N integers in [0, 2**63 - 1] give row i its own noise from seeds[i],
        so a row's image does not depend on the other rows (as a server needs). A stage-1 model draws no noise
        and refuses both `sampling` and `seeds`. renormalize (both stages, the same rule): None applies what was
        fitted (the transductive re-normalisation over the set), skipped for a single trial, where the set has no
        statistics (recorded in `renormalized`); True requires at least 2 trials; False turns it off.
        progress(step, done, total) is called per model call."""
        return self.run_checked(self.check(betas, sampling, seeds, renormalize, batch_size), progress)

    def run_checked(self, checked: CheckedInputs, progress: Progress | None = None) -> Reconstruction:
        """`reconstruct` on what `check` returned; nothing is checked again."""
        if not isinstance(checked, CheckedInputs):
            raise InputError(
                "checked", "what Reconstructor.check returned (CheckedInputs)", type(checked).__name__
            )
        return self.pipeline.run(checked, progress)

    # ----------------------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Release every session and engine (TensorRT device buffers and streams). Idempotent."""
        backends = [self.stage1.regressor, self.stage1.decoder]
        if isinstance(self.pipeline, Stage2Pipeline):
            backends += self.pipeline.loaded_backends()
        seen: set[int] = set()
        for backend in backends:
            if id(backend) not in seen and hasattr(backend, "close"):
                seen.add(id(backend))
                backend.close()

    def __enter__(self) -> Reconstructor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
