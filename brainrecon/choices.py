"""Every set of choices the toolkit offers, named once. Each is a `Literal` (what type checkers and typer see);
the tuple beside it is derived from it (what the runtime, export, Triton and error messages check against).

Import the name you need: `from brainrecon.choices import ENGINES, Engine`. No torch here (the runtime imports it).
"""

from __future__ import annotations

from typing import Literal, get_args

# Runtime stages: 1 = betas → VDVAE image; 2 = stage 1 + the Versatile Diffusion img2img refinement.
Stage = Literal[1, 2]
STAGES: tuple[Stage, ...] = get_args(Stage)

# What recon-export exports: one stage-1 regressor, the VDVAE decoder, stage 2, or everything.
ExportStage = Literal["stage1", "gru", "ridge", "vdvae", "stage2", "all"]
EXPORT_STAGES: tuple[ExportStage, ...] = get_args(ExportStage)

# What recon-train subject fits: stage 1 (the regressor onto VDVAE latents), stage 2's CLIP regressors, or both.
TrainStage = Literal["vdvae", "clip", "all"]
TRAIN_STAGES: tuple[TrainStage, ...] = get_args(TrainStage)

# Stage-1 regressors (a subject model folder holds one; its exported contract carries the same name).
Regressor = Literal["gru", "ridge"]
REGRESSORS: tuple[Regressor, ...] = get_args(Regressor)

# Runtime engines: ONNX Runtime, TensorRT plans built on this machine, OpenVINO on the CPU (the same ONNX files).
Engine = Literal["ort", "trt", "openvino"]
ENGINES: tuple[Engine, ...] = get_args(Engine)

# Precisions of a run. bf16 is OpenVINO's inference precision on the fp32 files, not a file of its own.
Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# Precisions of exported ONNX files.
FilePrecision = Literal["fp32", "fp16"]
FILE_PRECISIONS: tuple[FilePrecision, ...] = get_args(FilePrecision)
# What recon-export --precision writes: one file precision, or both.
ExportPrecision = Literal["fp32", "fp16", "both"]
EXPORT_PRECISIONS: tuple[ExportPrecision, ...] = get_args(ExportPrecision)
# What each engine runs.
ENGINE_PRECISIONS: dict[Engine, tuple[Precision, ...]] = {
    "ort": ("fp32", "fp16"),
    "trt": ("fp32", "fp16"),
    "openvino": ("fp32", "bf16"),
}

# ONNX Runtime execution providers a run may ask for.
Device = Literal["cpu", "cuda", "tensorrt"]
DEVICES: tuple[Device, ...] = get_args(Device)
# Where torch trains and runs the reference.
TorchDevice = Literal["cpu", "cuda"]
TORCH_DEVICES: tuple[TorchDevice, ...] = get_args(TorchDevice)

# Which UNet step a run uses: "kv" the K/V-once pair (unet_context + unet_kv), "plain" the context-taking `unet`,
# "auto" the pair when the model folder has it, else plain.
UnetGraph = Literal["auto", "kv", "plain"]
UNET_GRAPHS: tuple[UnetGraph, ...] = get_args(UnetGraph)
# What "auto" resolves to: the UNet step a run uses (model_dir.UNET_GRAPH_MODELS names each one's models).
ResolvedUnetGraph = Literal["kv", "plain"]
RESOLVED_UNET_GRAPHS: tuple[ResolvedUnetGraph, ...] = get_args(ResolvedUnetGraph)
# Which UNet graphs recon-export writes: the pair, the plain UNet, or both.
ExportUnetGraph = Literal["both", "kv", "plain"]
EXPORT_UNET_GRAPHS: tuple[ExportUnetGraph, ...] = get_args(ExportUnetGraph)

# What recon-export writes: the ONNX files (and engines) of a model folder, or a Triton model repository from one.
ExportFormat = Literal["onnx", "triton"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)

# What a Triton model repository's models run: the ONNX files (onnxruntime backend) or TensorRT plans.
TritonEngine = Literal["onnx", "trt"]
TRITON_ENGINES: tuple[TritonEngine, ...] = get_args(TritonEngine)
# Its variants: GPU platforms (onnxruntime_onnx / tensorrt_plan), or Python-backend ONNX Runtime on the CPU.
TritonVariant = Literal["gpu", "cpu"]
TRITON_VARIANTS: tuple[TritonVariant, ...] = get_args(TritonVariant)

# The images of a reconstruction folder: stage 1 (VDVAE) and final (after stage 2), <kind>_NNNNN.png.
ImageKind = Literal["stage1", "final"]
IMAGE_KINDS: tuple[ImageKind, ...] = get_args(ImageKind)


# Stage-2 samplers: DDIM (eta 0, Brain-Diffuser's), DPM-Solver++ 2M (multistep, data prediction; Lu et al. 2022,
# diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++", solver_order 2).
Sampler = Literal["ddim", "dpmpp_2m"]
SAMPLERS: tuple[Sampler, ...] = get_args(Sampler)


# Named sampling presets (brainrecon/sampling.py PRESETS): Brain-Diffuser's recipe, and the fewer, cheaper steps
# chosen from the quality map (docs/speed.md).
Preset = Literal["paper", "fast"]
PRESET_NAMES: tuple[Preset, ...] = get_args(Preset)


def check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    """One-line InputError ("name: expected one of (...), found 'x'") unless `value` is one of `allowed`."""
    if value not in allowed:
        from brainrecon.errors import InputError

        raise InputError(name, f"one of {allowed}", repr(value))
