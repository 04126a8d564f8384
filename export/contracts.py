"""Export contracts: what each exportable model promises its runtime. Torch-free (numpy only).

Pattern of NVIDIA TensorRT demo/Diffusion (`models.py`: one class per model with input/output names, dynamic axes,
min/opt/max shape profile and a sample input) and huggingface/optimum exporters (`OnnxConfig`: validation against
the source framework with per-model tolerances). One contract per model; `export.onnx_export.export_contract` is the
one routine that exports, converts, checks and validates them all.

Exporter and opset (pinned per model, the reasons in `ExportContract.why`):
- "torchscript" = `torch.onnx.export(..., dynamo=False)`. The dynamo exporter is the default in recent torch but
  needs onnxscript (not a dependency here), and facts §5 records a GRU export bug (wrong `linear_before_reset`)
  that gave silently wrong results. The TorchScript exporter at opset 17 is known-good for both models: it emits
  `GRU(linear_before_reset=1)` (PyTorch's GRU semantics; checked structurally and numerically at every export),
  `LayerNormalization` as one op (opset ≥ 17), and a batch-dynamic graph.
- "onnx_helper" = the ridge graph built directly (MatMul + Add). A real ridge has 15,724 × 91,168 = 1.43 B weights
  (5.7 GB fp32): building the graph ourselves streams the weights into the external-data file without ever holding
  a torch copy or a > 2 GB protobuf; the fp16 variant is built the same way (see `onnx_export.build_ridge_onnx`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "fp16")
BATCH = "batch"  # the symbolic name of every dynamic batch axis
# Input distributions for validation. "random": uniform(-1, 1), small and featureless. "realistic": the scale of
# real inputs (z-scored betas are unit-variance and heavy-tailed: Student t with 5 dof; latents follow the
# training-latent mean/std recorded in the model dir when given).
INPUT_KINDS = ("random", "realistic")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` holds ints and the string "batch" for the dynamic axis."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if isinstance(d, str) else d for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ShapeProfile:
    """TensorRT optimization profile over the batch axis (the only dynamic one); the runtime refuses batches
    outside [min_batch, max_batch] for every backend, so ORT and TensorRT accept the same inputs."""

    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"ShapeProfile: expected 1 <= min <= opt <= max, found {self}")

    def shapes(self, spec: TensorSpec) -> dict[str, list[int]]:
        return {
            "min": list(spec.concrete(self.min_batch)),
            "opt": list(spec.concrete(self.opt_batch)),
            "max": list(spec.concrete(self.max_batch)),
        }


@dataclass(frozen=True)
class Tolerance:
    """ONNX Runtime vs reference, per output, with scale = max |reference|:

    - max:    the largest |diff| after dropping the worst `outlier_fraction` of elements must be ≤ atol + rtol·scale;
    - median: when `median_rtol` is set, median |diff| must be ≤ median_rtol·scale.

    fp32 uses a tight max (no outliers, except the decoder's DmoL argmax near-ties); fp16 a median bound plus a
    loose max, because rounding 11-bit mantissas shifts every value a little and a few a lot.
    """

    atol: float
    rtol: float = 0.0
    median_rtol: float | None = None
    outlier_fraction: float = 0.0

    def check(self, reference: np.ndarray, found: np.ndarray) -> tuple[bool, dict[str, float]]:
        diff = np.abs(found.astype(np.float64) - reference.astype(np.float64)).ravel()
        scale = float(np.abs(reference).max()) if reference.size else 0.0
        kept_max = (
            float(np.quantile(diff, 1.0 - self.outlier_fraction))
            if self.outlier_fraction
            else float(diff.max())
        )
        stats = {
            "max_abs": float(diff.max()),
            "median_abs": float(np.median(diff)),
            "max_abs_kept": kept_max,
            "scale": scale,
            "max_bound": self.atol + self.rtol * scale,
        }
        ok = kept_max <= stats["max_bound"]
        if self.median_rtol is not None:
            stats["median_bound"] = self.median_rtol * scale
            ok = ok and stats["median_abs"] <= stats["median_bound"]
        return ok, stats

    def describe(self) -> str:
        parts = [f"max ≤ {self.atol:g} + {self.rtol:g}·scale"]
        if self.outlier_fraction:
            parts[0] += f" over all but {self.outlier_fraction:g} of elements"
        if self.median_rtol is not None:
            parts.append(f"median ≤ {self.median_rtol:g}·scale")
        return ", ".join(parts)


@dataclass(frozen=True)
class ExportContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: ShapeProfile
    exporter: str  # "torchscript" | "onnx_helper"
    opset: int
    fp32: Tolerance
    fp16: Tolerance
    why: str  # the reason for the exporter/opset choice, recorded in the manifest
    input_kinds: tuple[str, ...] = ("random",)  # distributions validated (INPUT_KINDS)
    validate_batches: tuple[int, ...] = (1, 2, 5)
    # Structural checks on the exported graph (validate.STRUCTURAL_CHECKS), e.g. GRU semantics.
    structural_checks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.exporter not in ("torchscript", "onnx_helper"):
            raise ValueError(f"contract {self.name}: unknown exporter {self.exporter!r}")
        if not set(self.input_kinds) <= set(INPUT_KINDS):
            raise ValueError(
                f"contract {self.name}: input kinds must be in {INPUT_KINDS}, found {self.input_kinds}"
            )

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {s.name: s.dynamic_axes() for s in (*self.inputs, *self.outputs) if s.dynamic_axes()}

    def tolerance(self, precision: str) -> Tolerance:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, found {precision!r}")
        return self.fp32 if precision == "fp32" else self.fp16

    def trt_profile(self) -> dict[str, dict[str, list[int]]]:
        """{input name: {"min", "opt", "max"}} for `IOptimizationProfile.set_shape`."""
        return {s.name: self.profile.shapes(s) for s in self.inputs}

    def sample_input(
        self,
        batch: int,
        kind: str = "random",
        seed: int = 0,
        stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Seeded float32 inputs of the contract's shapes at `batch`. `stats` gives a (mean, std) per input
        name for "realistic" draws (the decoder's training-latent statistics)."""
        rng = np.random.default_rng(seed)
        out = {}
        for spec in self.inputs:
            shape = spec.concrete(batch)
            if kind == "random":
                x = rng.uniform(-1.0, 1.0, size=shape)
            elif kind == "realistic" and stats and spec.name in stats:
                mean, std = stats[spec.name]
                x = mean + std * rng.standard_normal(size=shape)
            elif kind == "realistic":
                x = rng.standard_t(5, size=shape)  # z-scored betas: unit variance, heavy tails
            else:
                raise ValueError(f"input kind must be one of {INPUT_KINDS}, found {kind!r}")
            out[spec.name] = x.astype(spec.dtype)
        return out

    def io_spec(self) -> dict[str, Any]:
        """What the runtime needs from the contract, stored in the manifest beside each artifact."""
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "profile": self.trt_profile(),
            "min_batch": self.profile.min_batch,
            "max_batch": self.profile.max_batch,
            "tolerances": {"fp32": self.fp32.describe(), "fp16": self.fp16.describe()},
        }


# ----------------------------------------------------------------------------------------- contracts

_TORCHSCRIPT_WHY = (
    "torch.onnx.export(dynamo=False), opset 17: the dynamo exporter needs onnxscript and a dynamo GRU export once "
    "produced wrong linear_before_reset silently (facts §5); TorchScript at opset 17 emits GRU(linear_before_reset=1) "
    "and fused LayerNormalization, verified by the structural and parity checks at every export"
)
# Betas → latents regressors: batches are cheap; a whole test set (982 images) goes in four calls at most.
REGRESSOR_PROFILE = ShapeProfile(min_batch=1, opt_batch=64, max_batch=256)
# The decoder's activations grow with the batch (imagenet64: ~10 MB per image at 64x64 in fp32); 64 fits any GPU.
DECODER_PROFILE = ShapeProfile(min_batch=1, opt_batch=16, max_batch=64)


def gru_contract(n_voxels: int, latent_dims: int) -> ExportContract:
    """The seed paper's bi-GRU mapper (train/gru.py GRUMapper): betas (B, V) → vdvae_latents (B, D)."""
    return ExportContract(
        name="gru",
        inputs=(TensorSpec("betas", (BATCH, n_voxels)),),
        outputs=(TensorSpec("vdvae_latents", (BATCH, latent_dims)),),
        profile=REGRESSOR_PROFILE,
        exporter="torchscript",
        opset=17,
        # measured on the tiny model: fp32 max 6e-7 at scale ~1; fp16 max 7e-4, median 1e-4 at scale ~1
        fp32=Tolerance(atol=1e-5, rtol=1e-4),
        fp16=Tolerance(atol=1e-3, rtol=2e-2, median_rtol=2e-3),
        why=_TORCHSCRIPT_WHY,
        input_kinds=("random", "realistic"),
        validate_batches=(1, 2, 5, 17),
        structural_checks=("gru_linear_before_reset",),
    )


def ridge_contract(n_voxels: int, latent_dims: int) -> ExportContract:
    """Brain-Diffuser's ridge (train/ridge.py RidgeRegressor.predict): betas (B, V) @ coef (V, D) + intercept."""
    return ExportContract(
        name="ridge",
        inputs=(TensorSpec("betas", (BATCH, n_voxels)),),
        outputs=(TensorSpec("vdvae_latents", (BATCH, latent_dims)),),
        profile=REGRESSOR_PROFILE,
        exporter="onnx_helper",
        opset=17,
        # fp32: a different summation order than numpy's BLAS over V terms; fp16: weights rounded to 11 bits
        fp32=Tolerance(atol=1e-5, rtol=1e-4),
        fp16=Tolerance(atol=1e-3, rtol=2e-2, median_rtol=2e-3),
        why=(
            "graph built with onnx.helper (MatMul + Add), opset 17: the weights stream into external data without a "
            "torch copy or a > 2 GB protobuf (real size 1.43 B weights); fp16 built the same way with fp32 I/O casts"
        ),
        input_kinds=("random", "realistic"),
    )


def vdvae_decoder_contract(latent_dims: int, image_size: int) -> ExportContract:
    """Deterministic VDVAE decode (train/vdvae.py VDVAEDecoder): vdvae_latents (B, D) → images (B, S, S, 3) float
    in [0, 255] (prior means after layer K, DmoL mode)."""
    return ExportContract(
        name="vdvae_decoder",
        inputs=(TensorSpec("vdvae_latents", (BATCH, latent_dims)),),
        outputs=(TensorSpec("images", (BATCH, image_size, image_size, 3)),),
        profile=DECODER_PROFILE,
        exporter="torchscript",
        opset=17,
        # Pixels in [0, 255]. The DmoL mode takes an argmax over mixture logits: a near-tie can pick another
        # component after any change of summation order, moving one pixel by up to 255. fp32 allows 0.1% such
        # pixels and 0.05 px elsewhere (measured 4e-5 px, no flips); fp16 (measured median 0.02 px, 0.05% flips)
        # allows 1% flips, 8 px elsewhere and a median of 0.5 px.
        fp32=Tolerance(atol=0.05, outlier_fraction=1e-3),
        fp16=Tolerance(atol=8.0, median_rtol=0.5 / 255, outlier_fraction=1e-2),
        why=_TORCHSCRIPT_WHY,
        input_kinds=("random", "realistic"),
    )
