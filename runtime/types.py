"""The runtime's three value types, one per side of a call: `RuntimeOptions` (how to run the exported models),
`CheckedInputs` (what `Reconstructor.check` accepted) and `Reconstruction` (what a run returns). Frozen dataclasses;
the public names are re-exported by `brainrecon.runtime` and `brainrecon.runtime.api`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from brainrecon.choices import (
    DEVICES,
    ENGINE_PRECISIONS,
    ENGINES,
    PRECISIONS,
    UNET_GRAPHS,
    Device,
    Engine,
    Precision,
    UnetGraph,
    check_choice,
)
from brainrecon.errors import InputError
from brainrecon.sampling import SamplingConfig

Progress = Callable[[str, int, int], None]  # (step, done, total), called after every model call


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run the exported models; validated when made (the only place these choices are checked).

    engine: "ort" (ONNX Runtime), "openvino" (OpenVINO on the CPU, the same ONNX files) or "trt" (TensorRT engines
    built by recon-export on this machine).
    precision: "fp32" or "fp16" files; "bf16" is OpenVINO's bf16 inference on the fp32 files (AMX CPUs).
    device: ONNX Runtime's "cpu", "cuda" or "tensorrt" execution provider.
    threads: intra-op threads per session (default: ONNX Runtime's choice; on the CPU the UNet runs one 1-thread
    session per core instead, at most as many as `memory_budget_bytes` holds, default half the machine's memory).
    allow_cpu_fallback: run on the CPU, with a warning, when the GPU provider asked for is not active.
    unet_graph: "auto" (the K/V-once UNet pair when exported, else the plain UNet), "kv" (require it) or "plain".
    """

    engine: Engine = "ort"
    precision: Precision = "fp32"
    device: Device = "cpu"
    threads: int | None = None
    allow_cpu_fallback: bool = False
    memory_budget_bytes: int | None = None
    unet_graph: UnetGraph = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("engine", ENGINES),
            ("precision", PRECISIONS),
            ("device", DEVICES),
            ("unet_graph", UNET_GRAPHS),
        ):
            check_choice(name, getattr(self, name), allowed)
        for name in ("threads", "memory_budget_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InputError(name, "a positive integer or None", repr(value))
        if self.precision not in ENGINE_PRECISIONS[self.engine]:
            raise InputError(
                "precision",
                f"one of {ENGINE_PRECISIONS[self.engine]} for engine {self.engine!r}",
                repr(self.precision),
            )
        if self.engine == "openvino" and self.device != "cpu":
            raise InputError("device", "'cpu' for engine 'openvino' (its CPU plugin)", repr(self.device))
        if self.engine == "trt" and self.device != "cpu":
            raise InputError(
                "device", "the default for engine 'trt' (engines run on their GPU)", repr(self.device)
            )


@dataclass(frozen=True)
class CheckedInputs:
    """One call's inputs as `Reconstructor.check` accepted them; `run_checked` runs them without checking again."""

    betas: np.ndarray  # (N, V) float32, finite
    # images per model call: "stage1" (regressor and decoder); stage 2 adds "clip_text", "clip_vision",
    # "vae_encoder", "vae_decoder" and "unet" (which runs twice that many rows)
    batch_sizes: dict[str, int]
    renormalize: dict[str, bool]  # "stage1" [, "clip"]: whether the re-normalisation over the set runs
    sampling: SamplingConfig | None  # stage 2: the sampling the run uses; None for stage 1
    seeds: np.ndarray | None  # (N,) int64: row i's noise from seeds[i]; None: one draw from sampling.seed

    @classmethod
    def concat(cls, parts: list[CheckedInputs]) -> CheckedInputs:
        """The rows of several checks run as one call (a server's batch of requests), in order. The parts must
        share batch sizes and sampling, carry per-row seeds or none, and not re-normalise (statistics over the
        batch would mix the requests)."""
        first = parts[0]
        for part in parts:
            if (part.batch_sizes, part.renormalize, part.sampling, part.seeds is None) != (
                first.batch_sizes,
                first.renormalize,
                first.sampling,
                first.seeds is None,
            ) or any(part.renormalize.values()):
                raise InputError(
                    "checked inputs",
                    "parts with the same settings and renormalize=False",
                    "parts that differ",
                )
        return cls(
            betas=np.concatenate([p.betas for p in parts]),  # (N, V)
            batch_sizes=first.batch_sizes,
            renormalize=first.renormalize,
            sampling=first.sampling,
            seeds=None if first.seeds is None else np.concatenate([p.seeds for p in parts]),
        )


@dataclass(frozen=True)
class Reconstruction:
    """One run's result, built by the stage pipeline that ran last."""

    stage1_images: np.ndarray  # (N, s, s, 3) uint8, the VDVAE reconstructions
    final_images: np.ndarray | None  # (N, S, S, 3) uint8 after the diffusion refinement; None for stage 1
    # what the last decoder decoded: stage 1's (N, D) VDVAE latents (after any re-normalisation), or stage 2's
    # (N, 4, h, w) float32 scaled VAE latents (the init latents at strength 0)
    latents: np.ndarray
    timings: dict[str, Any]  # seconds per step; "stage1_split" holds the stage-1 steps of a stage-2 run
    providers: dict[str, list[str]]  # model -> execution providers actually used
    sampling: SamplingConfig | None  # as run (stage 2)
    timesteps: np.ndarray | None  # (T,) int64, the UNet timesteps (stage 2; empty at strength 0)
    renormalized: dict[str, bool]  # "stage1" [, "clip"]: whether the transductive re-normalisation ran
    batch_sizes: dict[str, int]  # images per model call; the UNet sees twice its value
    fallback: dict[str, str]  # model -> GPU provider fallback, when allowed and it happened

    @property
    def images(self) -> np.ndarray:
        """The reconstructions: final images for a stage-2 run, else the stage-1 images."""
        return self.final_images if self.final_images is not None else self.stage1_images
