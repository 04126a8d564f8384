"""Export contracts: what each exportable model promises its runtime. Torch-free (numpy only).

Pattern of NVIDIA TensorRT demo/Diffusion (`models.py`: one class per model with input/output names, dynamic axes,
min/opt/max shape profile and a sample input) and huggingface/optimum exporters (`OnnxConfig`: validation against
the source framework with per-model tolerances). One contract per model; `export.onnx_export.export_contract` is the
one routine that exports, converts, checks and validates them all.

Exporter and opset (pinned per model, the reasons in `ExportContract.why`):
- "torchscript" = `torch.onnx.export(..., dynamo=False)`. The dynamo exporter is the default in recent torch but
  needs onnxscript (not a dependency here), and pytorch/pytorch issues record a dynamo GRU export bug (wrong `linear_before_reset`)
  that gave silently wrong results. The TorchScript exporter at opset 17 is known-good for both models: it emits
  `GRU(linear_before_reset=1)` (PyTorch's GRU semantics; checked structurally and numerically at every export),
  `LayerNormalization` as one op (opset ≥ 17), and a batch-dynamic graph.
- "onnx_helper" = the ridge graph built directly (MatMul + Add). A real ridge has 15,724 × 91,168 = 1.43 B weights
  (5.7 GB fp32): building the graph ourselves streams the weights into the external-data file without ever holding
  a torch copy or a > 2 GB protobuf; the fp16 variant is built the same way (see `stage1.build_ridge_onnx`).
  The stage-2 CLIP ridges are built the same way, as two MatMuls (reduced rank, `export/stage2.py`).

Contracts:
    stage 1   gru | ridge       betas (B, V)                    → vdvae_latents (B, D)
              vdvae_decoder     vdvae_latents (B, D)            → images (B, S, S, 3) in [0, 255]
    stage 2   clip_text         betas (B, V)                    → clip_text (B, Nt, D)     (no re-normalisation)
              clip_vision       betas (B, V)                    → clip_vision (B, Nv, D)   (no re-normalisation)
              vae_encoder       images (B, 3, S, S) in [-1, 1]  → latents (B, 4, h, w)     (posterior mean × scale)
              vae_decoder       latents (B, 4, h, w)            → images (B, 3, S, S)      (unclipped, ~[-1, 1])
              unet              sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, Nv + Nt, D)
                                                                → noise_pred (B, 4, h, w)
              unet_deep         unet's inputs                   → noise_pred, feature (B, C_f, h, w)   (DeepCache)
              unet_shallow      unet's inputs, feature          → noise_pred                           (DeepCache)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from brainrecon.choices import FILE_PRECISIONS
from brainrecon.errors import ConfigError
from brainrecon.sampling import DDIM_SCHEDULER

BATCH = "batch"  # the symbolic name of every dynamic batch axis
# Input distributions for validation. "random": uniform(-1, 1), small and featureless. "realistic": the scale of
# real inputs (z-scored betas are unit-variance and heavy-tailed: Student t with 5 dof; latents follow the
# training-latent mean/std recorded in the model dir when given).
INPUT_KINDS = ("random", "realistic")
# What each input holds, which decides how validation draws it (`ExportContract.draws`; "betas" by default):
#   betas      random: uniform(-1, 1); realistic: Student t (5 dof), or mean + std·N(0, 1) when `stats` has it
#   latents    random: uniform(-1, 1); realistic: mean + std·N(0, 1) from `stats`, else N(0, 1) (scaled VAE latents
#              and DDIM's noised latents are ~unit variance)
#   images     random: uniform(-1, 1) pixels; realistic: smooth images in [-1, 1] (a few low spatial frequencies
#              plus fine noise), the structure of real photographs that uniform noise lacks
#   timesteps  both kinds: integer-valued floats uniform in [1, TRAIN_TIMESTEPS), the values DDIM sends
#   contexts   both kinds: rows drawn from `pools` (the unconditional contexts and predicted CLIP contexts); a
#              UNet conditioned on uniform noise would be validated far from where it runs
INPUT_DRAWS = ("betas", "latents", "images", "timesteps", "contexts")
TRAIN_TIMESTEPS = DDIM_SCHEDULER["num_train_timesteps"]  # the timesteps the UNet was trained on


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
            raise ConfigError(f"ShapeProfile: expected 1 <= min <= opt <= max, found {self}")

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
    draws: tuple[tuple[str, str], ...] = ()  # (input name, INPUT_DRAWS entry); unnamed inputs draw "betas"
    # Inputs whose own subgraph (every node computed from them and weights only) stays fp32 in the fp16 model:
    # the UNet's timestep embedding (sin/cos of t·frequency; fp16 would move t·f by up to 0.5 rad at t = 981).
    fp32_inputs: tuple[str, ...] = ()
    # Values baked into the graph at export (e.g. the dual-attention mix ratio), recorded in the manifest's io spec.
    constants: tuple[tuple[str, float | int | str], ...] = ()

    def __post_init__(self) -> None:
        if self.exporter not in ("torchscript", "onnx_helper"):
            raise ConfigError(f"contract {self.name}: unknown exporter {self.exporter!r}")
        if not set(self.input_kinds) <= set(INPUT_KINDS):
            raise ConfigError(
                f"contract {self.name}: input kinds must be in {INPUT_KINDS}, found {self.input_kinds}"
            )
        names = set(self.input_names)
        for name, draw in self.draws:
            if name not in names or draw not in INPUT_DRAWS:
                raise ConfigError(
                    f"contract {self.name}: draws must pair an input of {sorted(names)} with one of "
                    f"{INPUT_DRAWS}, found ({name!r}, {draw!r})"
                )
        if not set(self.fp32_inputs) <= names:
            raise ConfigError(
                f"contract {self.name}: fp32_inputs must be inputs {sorted(names)}, found {self.fp32_inputs}"
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
        if precision not in FILE_PRECISIONS:
            raise ConfigError(f"precision must be one of {FILE_PRECISIONS}, found {precision!r}")
        return self.fp32 if precision == "fp32" else self.fp16

    def trt_profile(self) -> dict[str, dict[str, list[int]]]:
        """{input name: {"min", "opt", "max"}} for `IOptimizationProfile.set_shape`."""
        return {s.name: self.profile.shapes(s) for s in self.inputs}

    def draw(self, input_name: str) -> str:
        return dict(self.draws).get(input_name, "betas")

    def sample_input(
        self,
        batch: int,
        kind: str = "random",
        seed: int = 0,
        stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        pools: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Seeded float32 inputs of the contract's shapes at `batch`, each drawn as its INPUT_DRAWS entry says.
        `stats` gives a (mean, std) per input name for "realistic" draws (the decoder's training-latent
        statistics); `pools` gives (N, ...) arrays that "contexts" inputs draw rows from."""
        if kind not in INPUT_KINDS:
            raise ConfigError(f"input kind must be one of {INPUT_KINDS}, found {kind!r}")
        rng = np.random.default_rng(seed)
        out = {}
        for spec in self.inputs:
            shape = spec.concrete(batch)
            draw = self.draw(spec.name)
            if draw == "timesteps":
                x = rng.integers(1, TRAIN_TIMESTEPS, size=shape)
            elif draw == "contexts":
                if not pools or spec.name not in pools:
                    raise ConfigError(
                        f"contract {self.name}: input {spec.name} draws from pools[{spec.name!r}]"
                    )
                pool = pools[spec.name]
                if pool.shape[1:] != shape[1:]:
                    raise ConfigError(
                        f"{self.name} pool {spec.name}: expected rows {shape[1:]}, found {pool.shape}"
                    )
                x = pool[rng.integers(0, len(pool), size=batch)]
            elif kind == "random":
                x = rng.uniform(-1.0, 1.0, size=shape)
            elif stats and spec.name in stats:
                mean, std = stats[spec.name]
                x = mean + std * rng.standard_normal(size=shape)
            elif draw == "latents":
                x = rng.standard_normal(size=shape)
            elif draw == "images":
                x = smooth_images(rng, shape)
            else:
                x = rng.standard_t(5, size=shape)  # z-scored betas: unit variance, heavy tails
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
            **({"constants": dict(self.constants)} if self.constants else {}),
        }


def smooth_images(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """(B, C, H, W) images in [-1, 1]: a random sum of 4 low spatial frequencies per channel plus ±0.05 noise."""
    b, c, h, w = shape
    y = np.linspace(0.0, 1.0, h)[:, None]  # (H, 1)
    x = np.linspace(0.0, 1.0, w)[None, :]  # (1, W)
    img = np.zeros(shape)
    for _ in range(4):
        fy, fx = rng.uniform(0.0, 3.0, size=(2, b, c, 1, 1))
        phase = rng.uniform(0.0, 2 * np.pi, size=(b, c, 1, 1))
        amp = rng.uniform(0.1, 0.4, size=(b, c, 1, 1))
        img += amp * np.cos(2 * np.pi * (fy * y + fx * x) + phase)
    return np.clip(img + rng.uniform(-0.05, 0.05, size=shape), -1.0, 1.0)


# ----------------------------------------------------------------------------------------- contracts

_TORCHSCRIPT_WHY = (
    "torch.onnx.export(dynamo=False), opset 17: the dynamo exporter needs onnxscript and a dynamo GRU export once "
    "produced wrong linear_before_reset silently (pytorch/pytorch issue tracker); TorchScript at opset 17 emits GRU(linear_before_reset=1) "
    "and fused LayerNormalization, verified by the structural and parity checks at every export"
)
# Betas → latents regressors: batches are cheap; a whole test set (982 images) goes in four calls at most.
REGRESSOR_PROFILE = ShapeProfile(min_batch=1, opt_batch=64, max_batch=256)
# The decoder's activations grow with the batch (imagenet64: ~10 MB per image at 64x64 in fp32); 64 fits any GPU.
DECODER_PROFILE = ShapeProfile(min_batch=1, opt_batch=16, max_batch=64)


def gru_contract(n_voxels: int, latent_dims: int) -> ExportContract:
    """The seed paper's bi-GRU mapper (train/stage1/gru.py GRUMapper): betas (B, V) → vdvae_latents (B, D)."""
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
    """Brain-Diffuser's ridge (train/stage1/ridge.py RidgeRegressor.predict): betas (B, V) @ coef (V, D) + intercept."""
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
    """Deterministic VDVAE decode (train/foundations/vdvae.py VDVAEDecoder): vdvae_latents (B, D) → images (B, S, S, 3) float
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
        draws=(("vdvae_latents", "latents"),),
    )


# ----------------------------------------------------------------------------------------- stage 2

_STAGE2_TORCHSCRIPT_WHY = (
    "torch.onnx.export(dynamo=False), opset 17: the dynamo exporter needs onnxscript; the TorchScript exporter "
    "traces diffusers' AutoencoderKL and the dual-attention UNet2DConditionModel with a dynamic batch ("
    "max diff 1.5e-6 on a tiny dual UNet), emits LayerNormalization as one op, and GroupNorm as "
    "InstanceNormalization (kept fp32 by fp16.py); parity against torch is checked at every export"
)
# Stage 2 runs per image at the VAE's resolution: activations grow with S², so the image models' max batch shrinks
# with it (64 up to 256 px, 16 at Versatile Diffusion's 512 px, the batch TensorRT's diffusion demo builds for).
# The UNet runs both classifier-free-guidance branches in one call, so its profile is twice the image models'.
STAGE2_MAX_BATCH = 64
STAGE2_MAX_BATCH_AT = 256  # pixels per side up to which STAGE2_MAX_BATCH holds


def stage2_profiles(image_size: int) -> tuple[ShapeProfile, ShapeProfile]:
    """(VAE profile, UNet profile) for images of `image_size` px; the UNet's is exactly twice the VAE's."""
    scale = (STAGE2_MAX_BATCH_AT / max(image_size, STAGE2_MAX_BATCH_AT)) ** 2
    max_batch = max(2, int(STAGE2_MAX_BATCH * scale))
    opt_batch = max(1, max_batch // 4)
    return (
        ShapeProfile(min_batch=1, opt_batch=opt_batch, max_batch=max_batch),
        ShapeProfile(min_batch=1, opt_batch=2 * opt_batch, max_batch=2 * max_batch),
    )


def clip_ridge_contract(target: str, n_voxels: int, n_tokens: int, dim: int) -> ExportContract:
    """Stage-2 CLIP regressor (train/stage2/clip_ridge.py ClipRidge.predict with renormalize=False): betas (B, V) →
    clip_<target> (B, T, D) = ((betas @ A) @ B + intercept).reshape(B, T, D). The runtime re-normalises over the
    whole input set in numpy (clip_<target>_target_{mean,std}.npy), as it does for the stage-1 latents."""
    if target not in ("text", "vision"):
        raise ConfigError(f"clip_ridge_contract: target must be text or vision, found {target!r}")
    return ExportContract(
        name=f"clip_{target}",
        inputs=(TensorSpec("betas", (BATCH, n_voxels)),),
        outputs=(TensorSpec(f"clip_{target}", (BATCH, n_tokens, dim)),),
        profile=REGRESSOR_PROFILE,
        exporter="onnx_helper",
        opset=17,
        # scale = max |prediction| (0.13-0.24 with the small CLIP). fp32: another summation order, measured max
        # 5e-7·scale (demo, tiny). fp16: both factors scaled per column by powers of two, intercept added in fp32;
        # measured max 1e-4·scale, median 1e-5·scale (demo), i.e. 5e-4 of the trial-dependent part's spread and
        # 0.24% of the target std after the runtime's re-normalisation (checked in tests/test_export_stage2.py).
        fp32=Tolerance(atol=0.0, rtol=1e-5),
        fp16=Tolerance(atol=0.0, rtol=2e-3, median_rtol=2e-4),
        why=(
            "graph built with onnx.helper (MatMul A → MatMul B → Add → Reshape), opset 17: the reduced-rank factors "
            "stay two MatMuls (A·B would be V × T·D, ~4 B weights at real size); fp16 built the same way with "
            "power-of-two column scales and fp32 I/O, intercept and re-scaling"
        ),
        input_kinds=("random", "realistic"),
        constants=(("n_tokens", n_tokens), ("dim", dim)),
    )


def vae_encoder_contract(
    image_size: int, latent_channels: int, latent_size: int, scale_factor: float
) -> ExportContract:
    """Stage-2 VAE encoder (train/stage2/img2img.py encode_images after its uint8 → [-1, 1] step): images (B, 3, S, S) in
    [-1, 1] → latents (B, C, h, w) = posterior mean × vae_scale_factor (the mean, not a sample: deterministic)."""
    return ExportContract(
        name="vae_encoder",
        inputs=(TensorSpec("images", (BATCH, 3, image_size, image_size)),),
        outputs=(TensorSpec("latents", (BATCH, latent_channels, latent_size, latent_size)),),
        profile=stage2_profiles(image_size)[0],
        exporter="torchscript",
        opset=17,
        # scale = max |latent| (0.7-1.4 on the small VAE). fp32 measured max 7.5e-7·scale: 1e-4·scale leaves a wide
        # margin for other CPUs' kernels. fp16 (GroupNorm as InstanceNormalization and the attention softmax in
        # fp32) measured max 6.6e-4·scale, median 3e-5·scale; bounds 1e-2·scale and 1e-3·scale.
        fp32=Tolerance(atol=1e-5, rtol=1e-4),
        fp16=Tolerance(atol=1e-3, rtol=1e-2, median_rtol=1e-3),
        why=_STAGE2_TORCHSCRIPT_WHY,
        input_kinds=("random", "realistic"),
        draws=(("images", "images"),),
        constants=(("vae_scale_factor", scale_factor),),
    )


def vae_decoder_contract(
    image_size: int, latent_channels: int, latent_size: int, scale_factor: float
) -> ExportContract:
    """Stage-2 VAE decoder (train/stage2/img2img.py decode_latents before its rounding): latents (B, C, h, w), scaled →
    images (B, 3, S, S) = vae.decode(latents / vae_scale_factor).sample, unclipped (~[-1, 1]); the runtime rounds
    ((x + 1) · 127.5) and clips to uint8 as decode_latents does."""
    return ExportContract(
        name="vae_decoder",
        inputs=(TensorSpec("latents", (BATCH, latent_channels, latent_size, latent_size)),),
        outputs=(TensorSpec("images", (BATCH, 3, image_size, image_size)),),
        profile=stage2_profiles(image_size)[0],
        exporter="torchscript",
        opset=17,
        # One uint8 level is 2/255 = 7.8e-3 here; scale = max |image| (2-3.5 for N(0, 1) latents). fp32 measured max
        # 1.2e-5 (5e-6·scale): the bound keeps every pixel within a small fraction of a level (the test allows a
        # one-level flip on 0.1% of rounding edges). fp16 measured max 3.2e-3 (1.4e-3·scale, under half a level),
        # median 2e-4; bounds 2e-2·scale and a median of 2e-3·scale.
        fp32=Tolerance(atol=1e-5, rtol=1e-4),
        fp16=Tolerance(atol=1e-3, rtol=2e-2, median_rtol=2e-3),
        why=_STAGE2_TORCHSCRIPT_WHY,
        input_kinds=("random", "realistic"),
        draws=(("latents", "latents"),),
        constants=(("vae_scale_factor", scale_factor),),
    )


def unet_contract(
    latent_channels: int,
    latent_size: int,
    vision_tokens: int,
    text_tokens: int,
    dim: int,
    mix_ratio: float,
    image_size: int,
) -> ExportContract:
    """Stage-2 dual-guided Versatile Diffusion UNet (train/foundations/dual_unet.py), one denoising evaluation:

        sample (B, C, h, w)                     noised latents x_t
        timestep (B,) float32                   t per row (integer-valued; every row of a call may differ)
        encoder_hidden_states (B, Nv + Nt, D)   vision tokens first, then text (dual_unet.dual_context)
        → noise_pred (B, C, h, w)               epsilon prediction

    The dual mix ratio (vision weight; text 1 - mix_ratio) is baked in at export (`constants`). Classifier-free
    guidance is the runtime's: for B images it sends 2B rows laid out [uncond × B; cond × B] (the unconditional
    context repeated B times, then the B predicted contexts; the same x_t and t in both halves), splits the output
    in that order and computes `uncond + guidance_scale · (cond − uncond)` in numpy, as train/stage2/img2img.py `denoise`.
    The profile's max batch is therefore twice the VAE models'.
    """
    shape = (BATCH, latent_channels, latent_size, latent_size)
    return ExportContract(
        name="unet",
        inputs=(
            TensorSpec("sample", shape),
            TensorSpec("timestep", (BATCH,)),
            TensorSpec("encoder_hidden_states", (BATCH, vision_tokens + text_tokens, dim)),
        ),
        outputs=(TensorSpec("noise_pred", shape),),
        profile=stage2_profiles(image_size)[1],
        exporter="torchscript",
        opset=17,
        # scale = max |noise_pred| (1.1-1.8 on the tiny and demo UNets). fp32 measured max 1.2e-6·scale at t in
        # [1, 999]. fp16 (timestep embedding, norms and softmax fp32) measured max 1.9e-3·scale, median 2.7e-4·scale;
        # bounds 2e-2·scale and 1e-3·scale. Guidance multiplies cond − uncond by 7.5, so the guided prediction's
        # fp16 error is larger than the UNet's; the runtime's end-to-end test owns that comparison.
        fp32=Tolerance(atol=1e-5, rtol=1e-4),
        fp16=Tolerance(atol=1e-3, rtol=2e-2, median_rtol=1e-3),
        why=_STAGE2_TORCHSCRIPT_WHY,
        input_kinds=("realistic",),
        validate_batches=(1, 2, 5),
        draws=(("sample", "latents"), ("timestep", "timesteps"), ("encoder_hidden_states", "contexts")),
        fp32_inputs=("timestep",),
        constants=(
            ("mix_ratio", mix_ratio),
            ("vision_tokens", vision_tokens),
            ("text_tokens", text_tokens),
            ("guidance_layout", "[uncond x B; cond x B]"),
        ),
    )


# ----------------------------------------------------------------------------------------- K/V once
#
# The UNet's contexts are the same at every denoising step, so are the keys and values of its cross-attention
# layers. `unet_context` computes them once per context (per batch of predicted contexts, and once per run for the
# unconditional one); `unet_kv` is the UNet step that takes them instead of the context. Per image and step that
# removes the K/V projections of all Nv + Nt tokens (14% of the demo UNet's FLOPs). Layer j of the layout
# (export/kv_once.py `kv_layout`) has heads h_j, head dim d_j and N_j tokens (Nv or Nt):
#     key_j    (B, h_j, d_j, N_j)  to_k(tokens)ᵀ · d_j^-0.5 (transposed and pre-scaled for the Q·K MatMul)
#     value_j  (B, h_j, N_j, d_j)  to_v(tokens)

KVShape = tuple[int, int, int]  # (heads, head_dim, tokens) of one cross-attention layer


def kv_names(n_layers: int) -> tuple[str, ...]:
    """key_0, value_0, key_1, value_1, ...: the K/V tensors of `unet_context` (outputs) and `unet_kv` (inputs)."""
    return tuple(f"{kind}_{j}" for j in range(n_layers) for kind in ("key", "value"))


def _kv_specs(layers: tuple[KVShape, ...]) -> tuple[TensorSpec, ...]:
    specs = []
    for j, (heads, head_dim, tokens) in enumerate(layers):
        specs.append(TensorSpec(f"key_{j}", (BATCH, heads, head_dim, tokens)))
        specs.append(TensorSpec(f"value_{j}", (BATCH, heads, tokens, head_dim)))
    return tuple(specs)


def unet_context_contract(
    layers: tuple[KVShape, ...], vision_tokens: int, text_tokens: int, dim: int, image_size: int
) -> ExportContract:
    """The K/V of every cross-attention layer of the dual UNet for a context (see the section note):

        encoder_hidden_states (B, Nv + Nt, D)  vision tokens first, as `unet`'s input
        → key_j (B, h_j, d_j, N_j), value_j (B, h_j, N_j, d_j)  for j in the UNet's kv_layout order

    The runtime runs it once on the unconditional context and once per batch of predicted contexts."""
    return ExportContract(
        name="unet_context",
        inputs=(TensorSpec("encoder_hidden_states", (BATCH, vision_tokens + text_tokens, dim)),),
        outputs=_kv_specs(layers),
        profile=stage2_profiles(image_size)[1],
        exporter="torchscript",
        opset=17,
        # Linear projections only (no reduction beyond one dot product of D terms): fp32 as the UNet's bound; fp16
        # rounds weights and products to 11 bits: 2e-2·scale max, 1e-3·scale median as the UNet's.
        fp32=Tolerance(atol=1e-5, rtol=1e-4),
        fp16=Tolerance(atol=1e-3, rtol=2e-2, median_rtol=1e-3),
        why=_STAGE2_TORCHSCRIPT_WHY,
        input_kinds=("realistic",),
        validate_batches=(1, 2, 5),
        draws=(("encoder_hidden_states", "contexts"),),
        constants=(
            ("vision_tokens", vision_tokens),
            ("text_tokens", text_tokens),
            ("kv_layers", len(layers)),
        ),
    )


def unet_kv_contract(
    latent_channels: int,
    latent_size: int,
    layers: tuple[KVShape, ...],
    mix_ratio: float,
    image_size: int,
) -> ExportContract:
    """`unet` with the context's K/V given (`unet_context`'s outputs) instead of the context:

        sample (B, C, h, w), timestep (B,), key_j, value_j (B, ...) for every layer j → noise_pred (B, C, h, w)

    Same guidance layout as `unet` ([uncond × B; cond × B] rows, the unconditional K/V repeated B times), same
    weights, the mix ratio baked in; the feed-forward's GEGLU runs as two MatMuls and each dual block adds its
    residual once after mixing."""
    shape = (BATCH, latent_channels, latent_size, latent_size)
    kv = _kv_specs(layers)
    return ExportContract(
        name="unet_kv",
        inputs=(TensorSpec("sample", shape), TensorSpec("timestep", (BATCH,)), *kv),
        outputs=(TensorSpec("noise_pred", shape),),
        profile=stage2_profiles(image_size)[1],
        exporter="torchscript",
        opset=17,
        # as `unet` (same function up to summation order): fp32 measured max 2e-6·scale against the plain UNet
        fp32=Tolerance(atol=1e-5, rtol=1e-4),
        fp16=Tolerance(atol=1e-3, rtol=2e-2, median_rtol=1e-3),
        why=_STAGE2_TORCHSCRIPT_WHY,
        input_kinds=("realistic",),
        validate_batches=(1, 2, 5),
        draws=(("sample", "latents"), ("timestep", "timesteps"), *((s.name, "contexts") for s in kv)),
        fp32_inputs=("timestep",),
        constants=(
            ("mix_ratio", mix_ratio),
            ("kv_layers", len(layers)),
            ("guidance_layout", "[uncond x B; cond x B]"),
        ),
    )


# ----------------------------------------------------------------------------------------- DeepCache
#
# DeepCache step reuse (train/stage2/deepcache.py; Ma et al., CVPR 2024): a full step runs the whole UNet and keeps
# the hidden state entering its last up block (`feature`); the shallow steps after it run conv_in, the time
# embedding, down_blocks[0], the last up block and the head around that feature. Same weights as `unet`, the mix
# ratio baked in the same way, the plain context (K/V once is not needed: the shallow steps' cross-attention is in
# two blocks only). Exported on request (recon-export --deepcache): the UNet weights twice more on disk.


def unet_deep_contract(
    latent_channels: int,
    latent_size: int,
    feature_channels: int,
    vision_tokens: int,
    text_tokens: int,
    dim: int,
    mix_ratio: float,
    image_size: int,
) -> ExportContract:
    """A DeepCache full step: `unet`'s inputs → noise_pred (B, C, h, w), as `unet`'s, and feature (B, C_f, h, w),
    the hidden state entering the last up block (deepcache.unet_with_feature).

    Tolerances: `unet`'s for both outputs (the same function up to the extra output); on the tiny UNet measured fp32
    max 1.6e-6, fp16 max 2.7e-3 and median 3.9e-4 (absolute; scale ~1-2)."""
    unet = unet_contract(latent_channels, latent_size, vision_tokens, text_tokens, dim, mix_ratio, image_size)
    feature = TensorSpec("feature", (BATCH, feature_channels, latent_size, latent_size))
    return dataclasses.replace(unet, name="unet_deep", outputs=(*unet.outputs, feature))


def unet_shallow_contract(
    latent_channels: int,
    latent_size: int,
    feature_channels: int,
    vision_tokens: int,
    text_tokens: int,
    dim: int,
    mix_ratio: float,
    image_size: int,
) -> ExportContract:
    """A DeepCache shallow step (deepcache.unet_shallow): `unet`'s inputs and feature (B, C_f, h, w), `unet_deep`'s
    output of an earlier step for the same rows → noise_pred (B, C, h, w).

    The feature is validated on features the torch UNet computed from the context pool (a "contexts" draw: rows
    of a pool, export/stage2.py), so it has the scale it runs at. Tolerances: `unet`'s (a subset of its layers); on
    the tiny UNet measured fp32 max 1.0e-6, fp16 max 2.0e-3 and median 2.9e-4 (absolute; scale ~1-2)."""
    unet = unet_contract(latent_channels, latent_size, vision_tokens, text_tokens, dim, mix_ratio, image_size)
    feature = TensorSpec("feature", (BATCH, feature_channels, latent_size, latent_size))
    return dataclasses.replace(
        unet,
        name="unet_shallow",
        inputs=(*unet.inputs, feature),
        draws=(*unet.draws, ("feature", "contexts")),
    )
