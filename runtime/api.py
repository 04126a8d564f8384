"""The public runtime API: open an exported model folder once, reconstruct many times. numpy + ONNX Runtime (or
TensorRT); never torch, diffusers or transformers.

    from brainrecon.runtime import Reconstructor, RuntimeOptions

    with Reconstructor.open("engines/subj01", RuntimeOptions(precision="fp32")) as rec:
        out = rec.reconstruct(betas)               # (N, V) z-scored float32 betas
        out.images                                 # (N, S, S, 3) uint8: the final images (stage 1's for a
                                                   # stage-1 model); out.stage1_images, out.timings, out.providers

`Reconstructor.open` reads and verifies the manifest once and loads every model once; `reconstruct` checks its
inputs once (one-line `InputError`s) before any model runs. `recon-infer`, `recon-bench`, the Triton server and
the Ray batch runner all go through this class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon import model_dir as layout
from brainrecon.errors import ConfigError, InputError
from brainrecon.manifest import Manifest, load_manifest
from brainrecon.runtime.artifacts import ENGINES, PRECISIONS, check_engine
from brainrecon.runtime.backends.ort import DEVICES
from brainrecon.runtime.inputs import load_betas
from brainrecon.runtime.stage1 import Progress, Stage1Pipeline
from brainrecon.runtime.stage2 import UNET_GRAPHS, Stage2Pipeline
from brainrecon.sampling import SamplingConfig, check_seeds

STAGES = (1, 2)


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run the exported models; validated when made.

    engine: "ort" (ONNX Runtime), "openvino" (OpenVINO on the CPU, the same ONNX files) or "trt" (TensorRT engines
    built by recon-export on this machine).
    precision: "fp32" or "fp16" files; "bf16" is OpenVINO's bf16 inference on the fp32 files (AMX CPUs). device: ONNX Runtime's "cpu", "cuda" or "tensorrt" execution provider.
    threads: intra-op threads per session (default: ONNX Runtime's choice; on the CPU the UNet runs one 1-thread
    session per core instead, at most as many as `memory_budget_bytes` holds, default half the machine's memory).
    allow_cpu_fallback: run on the CPU, with a warning, when the GPU provider asked for is not active.
    unet_graph: "auto" (the K/V-once UNet pair when exported, else the plain UNet), "kv" (require it) or "plain".
    """

    engine: str = "ort"
    precision: str = "fp32"
    device: str = "cpu"
    threads: int | None = None
    allow_cpu_fallback: bool = False
    memory_budget_bytes: int | None = None
    unet_graph: str = "auto"

    def __post_init__(self) -> None:
        choices = {"engine": ENGINES, "precision": PRECISIONS, "device": DEVICES, "unet_graph": UNET_GRAPHS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(name, f"one of {allowed}", repr(getattr(self, name)))
        for name in ("threads", "memory_budget_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InputError(name, "a positive integer or None", repr(value))
        check_engine(self.engine, self.precision)
        if self.engine == "openvino" and self.device != "cpu":
            raise InputError("device", "'cpu' for engine 'openvino' (its CPU plugin)", repr(self.device))
        if self.engine == "trt" and self.device != "cpu":
            raise InputError(
                "device", "the default for engine 'trt' (engines run on their GPU)", repr(self.device)
            )


@dataclass(frozen=True)
class Reconstruction:
    stage1_images: np.ndarray  # (N, s, s, 3) uint8, the VDVAE reconstructions
    final_images: np.ndarray | None  # (N, S, S, 3) uint8 after the diffusion refinement; None for stage 1
    timings: dict[str, Any]  # seconds per step; "stage1_split" holds the stage-1 steps of a stage-2 run
    providers: dict[str, list[str]]  # model -> execution providers actually used
    sampling: SamplingConfig | None  # as run (stage 2)
    timesteps: np.ndarray | None  # (T,) the UNet timesteps (stage 2)
    renormalized: dict[str, bool]  # "stage1", "clip": whether the transductive re-normalisation ran
    batch_sizes: dict[str, int]  # images per model call; the UNet sees twice its value
    fallback: dict[str, str]  # model -> GPU provider fallback, when allowed and it happened

    @property
    def images(self) -> np.ndarray:
        """The reconstructions: final images for a stage-2 run, else the stage-1 images."""
        return self.final_images if self.final_images is not None else self.stage1_images


def default_stage(model_dir: str | Path) -> int:
    """2 when the model folder has a fitted stage 2 (then it must be exported too), else 1."""
    return 2 if (Path(model_dir) / layout.STAGE2_SUMMARY).is_file() else 1


class Reconstructor:
    """An exported subject model folder, loaded once. Build with `Reconstructor.open`; use as a context manager
    (or call `close`) to release the sessions and engines."""

    def __init__(
        self,
        pipeline: Stage1Pipeline | Stage2Pipeline,
        model_dir: Path,
        options: RuntimeOptions,
        manifest: Manifest | None = None,
    ):
        self.pipeline = pipeline
        self.model_dir = model_dir
        self.options = options
        self.stage = 2 if isinstance(pipeline, Stage2Pipeline) else 1
        self._stage1 = pipeline.stage1 if isinstance(pipeline, Stage2Pipeline) else pipeline
        self._manifest = manifest  # raw betas (NIfTI/HDF5) are preprocessed against the same parsed manifest

    @classmethod
    def open(
        cls, model_dir: str | Path, options: RuntimeOptions | None = None, stage: int | None = None
    ) -> Reconstructor:
        """Load the exported models of `model_dir` (`stage` 1 or 2; default 2 when stage 2 is fitted)."""
        model_dir = Path(model_dir)
        options = options or RuntimeOptions()
        stage = default_stage(model_dir) if stage is None else stage
        if stage not in STAGES:
            raise InputError("stage", f"one of {STAGES}", repr(stage))
        manifest = load_manifest(model_dir)
        common = (
            options.engine,
            options.precision,
            options.device,
            options.allow_cpu_fallback,
            options.threads,
        )
        pipeline: Stage1Pipeline | Stage2Pipeline
        if stage == 1:
            pipeline = Stage1Pipeline.from_model_dir(model_dir, *common, manifest=manifest)
        else:
            pipeline = Stage2Pipeline.from_model_dir(
                model_dir,
                *common,
                manifest=manifest,
                memory_budget_bytes=options.memory_budget_bytes,
                unet_graph=options.unet_graph,
            )
        return cls(pipeline, model_dir, options, manifest)

    # ----------------------------------------------------------------------------------------- facts

    @property
    def n_voxels(self) -> int:
        return self._stage1.n_voxels

    @property
    def sampling(self) -> SamplingConfig | None:
        """The fitted stage-2 sampling (`stage2/stage2.json`); None for a stage-1 reconstructor."""
        return self.pipeline.sampling if isinstance(self.pipeline, Stage2Pipeline) else None

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.pipeline.info)

    def load_betas(self, path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
        """A betas file (.npy z-scored rows, or a NIfTI / NSD HDF5 session preprocessed as recon-prepare recorded)
        → (N, V) float32 and a description of what was done."""
        return load_betas(path, self.model_dir, self._manifest)

    # ----------------------------------------------------------------------------------------- run

    def check(
        self,
        betas: Any,
        sampling: SamplingConfig | None = None,
        seeds: Any = None,
        renormalize: bool | None = None,
        batch_size: int | None = None,
        source: str = "betas",
    ) -> tuple[Any, ...]:
        """Everything `reconstruct` checks, before any model runs; returns the checked arguments for `run_checked`.
        Exposed so that callers with their own slow set-up (reading ground truth, creating an output folder) can
        fail first."""
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
            return self.pipeline.check_inputs(betas, batch_size, renormalize, source)
        assert isinstance(self.pipeline, Stage2Pipeline)
        if sampling is not None and not isinstance(sampling, SamplingConfig):
            raise InputError("sampling", "a brainrecon.sampling.SamplingConfig", type(sampling).__name__)
        fitted = self.pipeline.sampling
        if sampling is not None and not math.isclose(sampling.vae_scale_factor, fitted.vae_scale_factor):
            raise ConfigError(
                f"sampling: expected vae_scale_factor {fitted.vae_scale_factor} (baked into the exported VAE "
                f"graphs), found {sampling.vae_scale_factor}"
            )
        sampling = self.pipeline.sampling_for(**_overrides(sampling or fitted))
        betas, batches, renorm = self.pipeline.check_inputs(betas, batch_size, renormalize, source)
        if seeds is not None:
            seeds = check_seeds(seeds, len(betas))
        return betas, batches, renorm, sampling, seeds

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
        and refuses both `sampling` and `seeds`. renormalize: None applies what was fitted (the
        transductive re-normalisation over the set; skipped for a single row), False turns it off.
        progress(step, done, total) is called per model call."""
        return self.run_checked(self.check(betas, sampling, seeds, renormalize, batch_size), progress)

    def run_checked(self, checked: tuple[Any, ...], progress: Progress | None = None) -> Reconstruction:
        """`reconstruct` on what `check` returned."""
        if self.stage == 1:
            r1 = self._stage1.run_checked(*checked, progress=progress)
            return Reconstruction(
                stage1_images=r1.images,
                final_images=None,
                timings=dict(r1.timings),
                providers=r1.providers,
                sampling=None,
                timesteps=None,
                renormalized={"stage1": r1.renormalized},
                batch_sizes=r1.batch_sizes,
                fallback=r1.fallback,
            )
        betas, batches, renorm, sampling, seeds = checked
        r2 = self.pipeline.run_checked(betas, batches, renorm, sampling, seeds, progress)
        return Reconstruction(
            stage1_images=r2.stage1.images,
            final_images=r2.images,
            timings={**r2.timings, "stage1_split": r2.stage1.timings},
            providers=r2.providers,
            sampling=r2.sampling,
            timesteps=r2.timesteps,
            renormalized=r2.renormalized,
            batch_sizes=r2.batch_sizes,
            fallback=r2.fallback,
        )

    # ----------------------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Release every session and engine (TensorRT device buffers and streams). Idempotent."""
        backends = [self._stage1.regressor, self._stage1.decoder]
        if isinstance(self.pipeline, Stage2Pipeline):
            backends += [*self.pipeline.backends.values(), *self.pipeline.unet_workers]
        seen: set[int] = set()
        for backend in backends:
            if id(backend) not in seen and hasattr(backend, "close"):
                seen.add(id(backend))
                backend.close()

    def __enter__(self) -> Reconstructor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _overrides(sampling: SamplingConfig) -> dict[str, Any]:
    return {
        "seed": sampling.seed,
        "num_inference_steps": sampling.num_inference_steps,
        "strength": sampling.strength,
        "guidance_scale": sampling.guidance_scale,
        "mix_ratio": sampling.mix_ratio,
    }
