"""The real-size model set with random weights: every exported model at the size users bring, exported (fp32, fp16)
with parity at the contract's tolerances, loaded by the runtime's ONNX Runtime backend and timed on the CPU.

    python benchmarks/real_size.py --out benchmarks/results/real_size.json [--only unet,vae_decoder] [--keep DIR]

Latency and memory do not depend on the weights' values, so random weights measure what real ones would cost; they
are made as distinct as real ones (no zero or constant tensors, the dual UNet's text blocks differ from its image
blocks) so that nothing is folded or deduplicated into smaller files than real weights give.

Models (sizes from Brain-Diffuser, ozcelikfu/brain-diffuser, and the seed paper's GRU, LorenzoVeronese/GRU-Decoding_JNE):
    ridge_k15 / ridge_k31         15,724 voxels → 13,344 / 91,168 VDVAE latents (K = 15 / 31 layers)
    gru                           the bi-GRU mapper, 15,724 → 13,344 (12,400,344 parameters)
    vdvae_decoder_k15 / _k31      openai/vdvae imagenet64 decoder (125 M with its encoder; the decoder part exported)
    clip_text / clip_vision       reduced-rank CLIP ridges at rank 256: 77 × 768 and 257 × 768 tokens
    vae_encoder / vae_decoder     Stable Diffusion's AutoencoderKL as Versatile Diffusion uses it: 512 px ↔ 64×64×4
    unet                          Versatile Diffusion's dual-guided UNet: 64×64×4 latents, 257 + 77 tokens of 768

Every step runs in its own subprocess, so each peak memory (VmHWM of /proc/self/status) is that step's alone:
    export     build the model (seeded random weights), export fp32 (TorchScript exporter or the ONNX graph builder),
               then compute the torch/numpy reference outputs of the validation inputs (cached for both precisions)
    fp16       ORT's float16 tool (export/fp16.py) with the fp16 fallbacks of onnx_export.export_fp16 (layers that
               overflow kept fp32), or the graph builder at fp16
    validate   ONNX checker, TensorRT operator check, validate_onnx against the cached reference
    load       the runtime's OrtBackend opens the file (load peak), then ORT CPU latency at batch 1 and batch 2
               (the UNet's classifier-free-guidance pair)
Results are written atomically after every model, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
N_VOXELS = 15724  # NSD subj01 nsdgeneral
CLIP_RANK = 256
CLIP_DIM = 768
TEXT_TOKENS, VISION_TOKENS = 77, 257
IMAGE_SIZE = 512
LATENT_SIZE = 64
VAE_SCALE = 0.18215  # Stable Diffusion / Versatile Diffusion VAE scale factor
MIX_RATIO = 0.6
MODELS = (
    "gru",
    "ridge_k15",
    "vdvae_decoder_k15",
    "vdvae_decoder_k31",
    "clip_text",
    "clip_vision",
    "vae_encoder",
    "vae_decoder",
    "unet",
    "ridge_k31",
)
# The image models and the UNet are validated at batch 1 and at the CFG pair (batch 2) only: a batch-5 torch
# reference of the real-size UNet takes minutes on 2 cores and adds no coverage of the dynamic batch axis.
VALIDATE_BATCHES = {"vae_encoder": (1, 2), "vae_decoder": (1, 2), "unet": (1, 2)}


def vd_vae_config() -> dict[str, Any]:
    """Stable Diffusion's AutoencoderKL (Versatile Diffusion's `vae/config.json`): 83,653,863 parameters."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": IMAGE_SIZE,
    }


def vd_unet_config():
    """Versatile Diffusion's `image_unet/config.json` (SD 1.x layout) with the dual blocks of `text_unet`."""
    from brainrecon.train.foundations.dual_unet import DualUNetConfig

    return DualUNetConfig(
        sample_size=LATENT_SIZE,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=CLIP_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        text_tokens=TEXT_TOKENS,
        vision_tokens=VISION_TOKENS,
        mix_ratio=MIX_RATIO,
    )


# ----------------------------------------------------------------------------------------- models


@dataclass
class Built:
    """One real-size model: what onnx_export.ExportSource needs, plus its parameter count."""

    contract: Any
    parameters: int
    module: Any = None  # torch module (TorchScript exporter)
    build: Any = None  # (path, precision, external) -> None (ONNX graph builder)
    reference: Any = None  # inputs -> outputs
    stats: dict | None = None
    pools: dict | None = None
    weight_bytes: int = 0


def make_distinct(module: Any, seed: int, relative: float = 0.0) -> None:
    """In place: every constant tensor (zeros, ones: norms, biases, zero-initialised output convs) gets N(0, 0.01)
    noise, and with `relative` > 0 every other tensor N(0, relative · its std): no two tensors equal, no constant
    tensor the exporter could fold or deduplicate."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = float(p.detach().std()) if p.numel() > 1 else 0.0
            scale = relative * std if std > 0 and relative > 0 else (0.01 if std == 0 else 0.0)
            if scale:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def context_pool(seed: int, n: int = 8) -> np.ndarray:
    """(n, 257 + 77, 768): row 0 the unconditional context, then predicted ones; tokens of about unit norm, as
    Versatile Diffusion's CLIP features (divided by the CLS / pooled token's norm)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, VISION_TOKENS + TEXT_TOKENS, CLIP_DIM)) / np.sqrt(CLIP_DIM)).astype(
        np.float32
    )


def exported_parameters(module: Any) -> list[Any]:
    """The parameters the exported graph holds: the VAE graphs wrap the whole AutoencoderKL but use one half."""
    vae = getattr(module, "vae", None)
    if vae is not None and type(module).__name__ == "VAEDecoderGraph":
        return [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    if vae is not None and type(module).__name__ == "VAEEncoderGraph":
        return [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    return list(module.parameters())


def build_model(name: str, seed: int = 0) -> Built:
    """The real-size model `name` with seeded random weights."""
    from brainrecon.export import contracts as C

    if name.startswith("ridge_k"):
        from brainrecon.export.stage1 import build_ridge_onnx
        from brainrecon.train.foundations.vdvae import latent_dims, vdvae_config

        dims = latent_dims(vdvae_config("imagenet64"), int(name.removeprefix("ridge_k")))
        rng = np.random.default_rng(seed)
        # ridge at alpha 5e4: small weights (fp16 needs the builder's column scaling), a per-latent intercept
        coef = rng.standard_normal((N_VOXELS, dims), dtype=np.float32)
        coef *= np.float32(1e-3)
        intercept = rng.standard_normal(dims, dtype=np.float32)
        contract = C.ridge_contract(N_VOXELS, dims)

        def build(path: Path, precision: str, external: bool) -> None:
            build_ridge_onnx(coef, intercept, path, precision, contract.opset, external)

        return Built(
            contract,
            coef.size + intercept.size,
            build=build,
            reference=lambda x: {"vdvae_latents": x["betas"] @ coef + intercept},
            weight_bytes=coef.nbytes + intercept.nbytes,
        )
    if name.startswith("clip_"):
        from brainrecon.export.stage2 import build_clip_ridge_onnx

        tokens = TEXT_TOKENS if name == "clip_text" else VISION_TOKENS
        rng = np.random.default_rng(seed)
        A = (rng.standard_normal((N_VOXELS, CLIP_RANK), dtype=np.float32) / np.sqrt(N_VOXELS)).astype(
            np.float32
        )
        B = (
            rng.standard_normal((CLIP_RANK, tokens * CLIP_DIM), dtype=np.float32) * 0.05 / np.sqrt(CLIP_RANK)
        ).astype(np.float32)
        intercept = (rng.standard_normal(tokens * CLIP_DIM, dtype=np.float32) / np.sqrt(CLIP_DIM)).astype(
            np.float32
        )
        contract = C.clip_ridge_contract(name.removeprefix("clip_"), N_VOXELS, tokens, CLIP_DIM)

        def build(path: Path, precision: str, external: bool) -> None:
            build_clip_ridge_onnx(
                A, B, intercept, tokens, CLIP_DIM, name, path, precision, contract.opset, external
            )

        def reference(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            flat = (x["betas"] @ A) @ B + intercept  # (B, T·D)
            return {name: flat.reshape(len(flat), tokens, CLIP_DIM)}

        return Built(
            contract,
            A.size + B.size + intercept.size,
            build=build,
            reference=reference,
            weight_bytes=A.nbytes + B.nbytes + intercept.nbytes,
        )

    import torch

    from brainrecon.export.onnx_export import torch_reference

    torch.manual_seed(seed)
    if name == "gru":
        from brainrecon.train.foundations.vdvae import latent_dims, vdvae_config
        from brainrecon.train.stage1.gru import GRUMapper, GRUMapperConfig

        dims = latent_dims(vdvae_config("imagenet64"), 15)
        module = GRUMapper(GRUMapperConfig(n_voxels=N_VOXELS, n_outputs=dims)).eval()
        make_distinct(module, seed)
        contract = C.gru_contract(N_VOXELS, dims)
    elif name.startswith("vdvae_decoder_k"):
        from brainrecon.train.foundations.vdvae import VDVAE, VDVAEDecoder, vdvae_config

        config = vdvae_config("imagenet64")
        vdvae = VDVAE(config).eval()
        # openai/vdvae zero-initialises each residual block's last conv (and the latent biases): trained weights are
        # not zero, and a zero residual path would make the decoder ignore its latents.
        make_distinct(vdvae, seed)
        module = VDVAEDecoder(vdvae, int(name.removeprefix("vdvae_decoder_k"))).eval()
        contract = C.vdvae_decoder_contract(module.latent_dims, config.image_size)
    elif name in ("vae_encoder", "vae_decoder"):
        from diffusers import AutoencoderKL

        from brainrecon.export.stage2 import VAEDecoderGraph, VAEEncoderGraph

        vae = AutoencoderKL(**vd_vae_config()).eval()
        make_distinct(vae, seed)
        if name == "vae_encoder":
            module = VAEEncoderGraph(vae.eval(), VAE_SCALE).eval()
            contract = C.vae_encoder_contract(IMAGE_SIZE, 4, LATENT_SIZE, VAE_SCALE)
        else:
            module = VAEDecoderGraph(vae.eval(), VAE_SCALE).eval()
            contract = C.vae_decoder_contract(IMAGE_SIZE, 4, LATENT_SIZE, VAE_SCALE)
    elif name == "unet":
        from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel

        from brainrecon.export.stage2 import UNetGraph
        from brainrecon.train.foundations.dual_unet import TEXT_TRANSFORMER, build_dual_unet, set_mix_ratio

        unet = build_dual_unet(vd_unet_config()).eval()
        make_distinct(unet, seed)
        # build_dual_unet copies each image block as the text block when no text-UNet state is given: real text
        # blocks are different weights (Versatile Diffusion's text_unet), so perturb every copy.
        for k, block in enumerate(m for m in unet.modules() if isinstance(m, DualTransformer2DModel)):
            make_distinct(block.transformers[TEXT_TRANSFORMER], seed + 1 + k, relative=0.1)
        set_mix_ratio(unet, MIX_RATIO)
        module = UNetGraph(unet).eval()
        contract = C.unet_contract(
            4, LATENT_SIZE, VISION_TOKENS, TEXT_TOKENS, CLIP_DIM, MIX_RATIO, IMAGE_SIZE
        )
    else:
        raise SystemExit(f"error: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    for p in module.parameters():
        p.requires_grad_(False)
    pools = {"encoder_hidden_states": context_pool(seed)} if name == "unet" else None
    n_params = sum(p.numel() for p in exported_parameters(module))
    return Built(
        contract,
        n_params,
        module=module,
        reference=torch_reference(module, contract),
        pools=pools,
        weight_bytes=n_params * 4,
    )


# ----------------------------------------------------------------------------------------- steps (subprocesses)


def peak_gb() -> float:
    """This process's peak resident memory so far (VmHWM), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 3)
    raise RuntimeError("no VmHWM in /proc/self/status")


def _digest(inputs: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(inputs):
        h.update(key.encode())
        h.update(np.ascontiguousarray(inputs[key]).tobytes())
    return h.hexdigest()[:16]


def validation_inputs(built: Built, name: str) -> list[dict[str, np.ndarray]]:
    """The inputs validate_onnx will draw (same seeds), so references computed once serve both precisions."""
    c = built.contract
    batches = VALIDATE_BATCHES.get(name, c.validate_batches)
    return [
        c.sample_input(batch, kind, seed=1000 * k + b, stats=built.stats, pools=built.pools)
        for k, kind in enumerate(c.input_kinds)
        for b, batch in enumerate(batches)
    ]


def files_of(path: Path) -> list[Path]:
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def step_export(name: str, work: Path, precision: str) -> dict[str, Any]:
    """fp32: build + export (+ references). fp16: the graph builder at fp16, or ORT's float16 tool with the
    project's overflow handling (onnx_export.export_fp16: activation ranges of the fp32 graph, then fallbacks),
    checked against the cached reference: its peak includes the range probe and that check."""
    from brainrecon.export.onnx_export import EXTERNAL_DATA_THRESHOLD, export_fp16, export_torchscript

    torchscript_fp16 = precision == "fp16" and build_contract_only(name).contract.exporter == "torchscript"
    t0 = time.perf_counter()
    built = build_contract_only(name) if torchscript_fp16 else build_model(name)
    build_s = time.perf_counter() - t0
    path = work / f"{name}.{precision}.onnx"
    for f in files_of(path):
        f.unlink(missing_ok=True)
    out: dict[str, Any] = {"build_s": round(build_s, 2)}
    if built.parameters:
        out["parameters"] = built.parameters
    t0 = time.perf_counter()
    if built.build is not None:
        bytes_ = built.weight_bytes // (2 if precision == "fp16" else 1)
        built.build(path, precision, bytes_ > EXTERNAL_DATA_THRESHOLD)
    elif precision == "fp32":
        import torch

        with torch.no_grad():
            export_torchscript(built.module, built.contract, path, EXTERNAL_DATA_THRESHOLD, built.pools)
    else:
        fp32_path = work / f"{name}.fp32.onnx"
        c = built.contract
        feeds = [
            c.sample_input(2, kind, seed=k, stats=built.stats, pools=built.pools)
            for k, kind in enumerate(c.input_kinds)
        ]
        external = fp32_path.with_name(fp32_path.name + ".data").exists()
        # No activation-range probe (feeds=None): ORT held every probed tensor at once and the imagenet64 decoder's
        # probe was OOM-killed at 20 GB; the parity fallbacks still apply.
        del feeds
        _, info = export_fp16(c, fp32_path, path, external, lambda p: checked_validation(name, work, p), None)
        info["fp32_overflow_nodes"] = len(info["fp32_overflow_nodes"])
        out["fp16"] = info
    out["export_s"] = round(time.perf_counter() - t0, 2)
    out["export_peak_gb"] = peak_gb()
    if precision == "fp32":
        t0 = time.perf_counter()
        cache = {}
        for inputs in validation_inputs(built, name):
            for out_name, value in built.reference(inputs).items():
                cache[f"{_digest(inputs)}/{out_name}"] = np.asarray(value)
        np.savez(work / f"{name}.reference.npz", **cache)
        out["reference_s"] = round(time.perf_counter() - t0, 2)
    return out


def cached_validation(name: str, work: Path, path: Path, precision: str = "fp16") -> dict[str, Any]:
    """validate_onnx of `path` against the reference outputs cached by the fp32 export step."""
    from brainrecon.export.validate import validate_onnx

    built = build_contract_only(name)
    cache = np.load(work / f"{name}.reference.npz")

    def reference(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = _digest(inputs)
        return {n: cache[f"{key}/{n}"] for n in built.contract.output_names}

    return validate_onnx(
        built.contract,
        path,
        reference,
        precision,
        batches=VALIDATE_BATCHES.get(name),
        stats=built.stats,
        pools=built.pools,
    )


def checked_validation(name: str, work: Path, path: Path, precision: str = "fp16") -> dict[str, Any]:
    """ONNX checker + TensorRT operator table + parity against the cached reference (as stage_contract does)."""
    from brainrecon.export.onnx_export import check_onnx
    from brainrecon.export.trt_support import require_trt_support

    check_onnx(path)
    require_trt_support(path)
    return cached_validation(name, work, path, precision)


def step_validate(name: str, work: Path, precision: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = checked_validation(name, work, work / f"{name}.{precision}.onnx", precision)
    return {
        "validation": report,
        "validate_s": round(time.perf_counter() - t0, 2),
        "validate_peak_gb": peak_gb(),
    }


def build_contract_only(name: str) -> Built:
    """The contract, stats and pools of `name` without its weights (validation reads outputs from the cache)."""
    from brainrecon.export import contracts as C
    from brainrecon.train.foundations.vdvae import latent_dims, vdvae_config

    pools = None
    if name.startswith("ridge_k"):
        contract = C.ridge_contract(N_VOXELS, latent_dims(vdvae_config("imagenet64"), int(name[7:])))
    elif name.startswith("clip_"):
        tokens = TEXT_TOKENS if name == "clip_text" else VISION_TOKENS
        contract = C.clip_ridge_contract(name.removeprefix("clip_"), N_VOXELS, tokens, CLIP_DIM)
    elif name == "gru":
        contract = C.gru_contract(N_VOXELS, latent_dims(vdvae_config("imagenet64"), 15))
    elif name.startswith("vdvae_decoder_k"):
        k = int(name.removeprefix("vdvae_decoder_k"))
        contract = C.vdvae_decoder_contract(latent_dims(vdvae_config("imagenet64"), k), 64)
    elif name == "vae_encoder":
        contract = C.vae_encoder_contract(IMAGE_SIZE, 4, LATENT_SIZE, VAE_SCALE)
    elif name == "vae_decoder":
        contract = C.vae_decoder_contract(IMAGE_SIZE, 4, LATENT_SIZE, VAE_SCALE)
    elif name == "unet":
        contract = C.unet_contract(
            4, LATENT_SIZE, VISION_TOKENS, TEXT_TOKENS, CLIP_DIM, MIX_RATIO, IMAGE_SIZE
        )
        pools = {"encoder_hidden_states": context_pool(0)}
    else:
        raise SystemExit(f"error: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return Built(contract, 0, pools=pools)


def step_load(name: str, work: Path, precision: str, threads: int | None) -> dict[str, Any]:
    """The runtime's ONNX Runtime backend opens the file (load peak), then ORT CPU latency at batch 1 and 2."""
    from brainrecon.runtime.backends.ort import OrtBackend

    built = build_contract_only(name)
    base = peak_gb()
    t0 = time.perf_counter()
    backend = OrtBackend(work / f"{name}.{precision}.onnx", device="cpu", threads=threads)
    out: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 2), "load_peak_gb": peak_gb()}
    out["baseline_gb"] = base
    latency = {}
    for batch in (1, 2):
        inputs = built.contract.sample_input(batch, built.contract.input_kinds[-1], pools=built.pools)
        t0 = time.perf_counter()
        backend.session.run(None, inputs)  # warm-up (ORT allocates its arena on the first call)
        first = time.perf_counter() - t0
        times = []
        while len(times) < 5 and sum(times) < max(3.0, first):
            t0 = time.perf_counter()
            backend.session.run(None, inputs)
            times.append(time.perf_counter() - t0)
        latency[str(batch)] = {"median_s": round(float(np.median(times)), 4), "runs": len(times)}
    out["latency"] = latency
    # a shared machine: the 1-minute load average beside the figures says how contended they were
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)
    out["run_peak_gb"] = peak_gb()
    out["providers"] = backend.providers
    return out


# ----------------------------------------------------------------------------------------- model folder

# The exported files a real-size model folder is assembled from: GRU stage 1 at K = 15 and the whole stage 2.
FOLDER_MODELS = {
    "gru": "gru",
    "vdvae_decoder_k15": "vdvae_decoder",
    "clip_text": "clip_text",
    "clip_vision": "clip_vision",
    "vae_encoder": "vae_encoder",
    "vae_decoder": "vae_decoder",
    "unet": "unet",
}


def assemble_model_dir(work: Path, out: Path, seed: int = 0) -> Path:
    """A real-size subject model folder that `recon-infer` runs: the kept ONNX files (hard links into `out/onnx/`),
    the data files the runtime reads (preprocessing, stage-1/2 summaries and statistics, DDIM tables) and a
    manifest with every file's sha256, written as export/subject.py writes one. Statistics are neutral (zero
    mean, unit std); the unconditional contexts are the UNet validation pool's first row."""
    from brainrecon import model_dir as layout
    from brainrecon.export.stage2 import scheduler_tables
    from brainrecon.io import save_npy, write_json
    from brainrecon.manifest import describe_file, write_manifest
    from brainrecon.sampling import SamplingConfig
    from brainrecon.train.foundations.vdvae import latent_dims, vdvae_config

    out.mkdir(parents=True, exist_ok=True)
    (out / layout.ONNX_DIR).mkdir(exist_ok=True)
    dims = latent_dims(vdvae_config("imagenet64"), 15)
    sampling = SamplingConfig(seed=seed)
    write_json(
        out / layout.PREPROCESS,
        {
            "format_version": 1,
            "producer": "benchmarks/real_size.py (random weights, no recording)",
            "subject": 1,
            "config": {"subject": 1, "session_zscore": True, "image_size": IMAGE_SIZE},
            "n_voxels": N_VOXELS,
            "mask": {"file": "none", "sha256": "none", "shape": [81, 104, 83], "affine": None},
            "betas_scale": 300.0,
            "steps": ["real-size benchmark: inputs are z-scored betas (.npy)"],
            "files": {},
        },
    )
    save_npy(out / layout.MASK_INDICES, np.arange(N_VOXELS, dtype=np.int64))
    save_npy(out / layout.VOXEL_MEAN, np.zeros(N_VOXELS, np.float32))
    save_npy(out / layout.VOXEL_STD, np.ones(N_VOXELS, np.float32))
    write_json(
        out / layout.STAGE1_SUMMARY,
        {"config": {"regressor": "gru", "num_layers": 15, "renormalize": True}, "n_voxels": N_VOXELS},
    )
    save_npy(out / layout.LATENT_MEAN, np.zeros(dims, np.float32))
    save_npy(out / layout.LATENT_STD, np.ones(dims, np.float32))
    stage2 = all((work / f"{m}.fp32.onnx").exists() for m in STAGE2_SOURCES)
    if not stage2:  # stage 1 only: what was kept of stage 2 is left out
        write_manifest(out, stage1_artifacts(work, out, layout), merge=False)
        return out
    write_json(
        out / layout.STAGE2_SUMMARY,
        {"sampling": dataclasses.asdict(sampling), "config": {"renormalize": True}},
    )
    pool = context_pool(seed)
    for target, tokens in (("text", TEXT_TOKENS), ("vision", VISION_TOKENS)):
        save_npy(out / layout.clip_target_stat(target, "mean"), np.zeros((tokens, CLIP_DIM), np.float32))
        save_npy(
            out / layout.clip_target_stat(target, "std"),
            np.full((tokens, CLIP_DIM), 1 / np.sqrt(CLIP_DIM), np.float32),
        )
        row = pool[:1, :VISION_TOKENS] if target == "vision" else pool[:1, VISION_TOKENS:]
        save_npy(out / layout.uncond_context(target), np.ascontiguousarray(row))
    write_json(out / layout.SCHEDULER, scheduler_tables(sampling))

    data_files = (*layout.STAGE2_FILES, layout.SCHEDULER)
    artifacts = stage1_artifacts(work, out, layout) + [describe_file(out, rel, "data") for rel in data_files]
    artifacts += onnx_artifacts(work, out, layout, STAGE2_SOURCES)
    write_manifest(out, artifacts, merge=False)
    return out


STAGE2_SOURCES = ("clip_text", "clip_vision", "vae_encoder", "vae_decoder", "unet")


def stage1_artifacts(work: Path, out: Path, layout: Any) -> list[Any]:
    from brainrecon.manifest import describe_file

    data_files = (*layout.PREPROCESS_FILES, *layout.STAGE1_FILES)
    artifacts = [describe_file(out, rel, "data") for rel in data_files]
    return artifacts + onnx_artifacts(work, out, layout, ("gru", "vdvae_decoder_k15"))


def onnx_artifacts(work: Path, out: Path, layout: Any, sources: tuple[str, ...]) -> list[Any]:
    """Hard links of the kept exports of `sources` under `out/onnx/` (renamed to the contract names) and their
    manifest entries; fp32 must exist, fp16 is taken when it does."""
    from brainrecon.export.onnx_export import StagedFile
    from brainrecon.export.subject import _onnx_artifact

    artifacts = []
    for source in sources:
        name = FOLDER_MODELS[source]
        contract = build_contract_only(source).contract
        for precision in ("fp32", "fp16"):
            src = work / f"{source}.{precision}.onnx"
            if not src.exists():
                if precision == "fp16":
                    continue
                raise SystemExit(f"error: {src}: expected a kept export (run with --keep), found none")
            staged = []
            for f in files_of(src):
                dst = out / layout.ONNX_DIR / f.name.replace(f"{source}.", f"{name}.", 1)
                dst.unlink(missing_ok=True)
                os.link(f, dst)
                staged.append(dst)
            if len(staged) > 1:  # the .onnx names its data file: the renamed copy must keep that name
                rewrite_data_location(staged[0], staged[1].name)
            entries, _ = _onnx_artifact(
                out, StagedFile(contract, precision, staged[0], staged[1:]), layout.ONNX_DIR
            )
            artifacts += entries
    return artifacts


def rewrite_data_location(path: Path, data_name: str) -> None:
    """Point every external tensor of `path` at `data_name` (the graph file is small; weights are not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    path.unlink()  # a hard link: write a new file rather than through the link into the kept export
    path.write_bytes(model.SerializeToString())


# ----------------------------------------------------------------------------------------- driver


def run_step(
    step: str, name: str, work: Path, precision: str, threads: int | None, log: Path
) -> dict[str, Any]:
    """One step in a fresh interpreter (clean peak memory); its JSON result on the last stdout line."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--step",
        step,
        "--model",
        name,
        "--work",
        str(work),
    ]
    cmd += ["--precision", precision] + (["--threads", str(threads)] if threads else [])
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = Path(log).read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"{step} {precision} exited {proc.returncode}: {tail[0][:400]}"}
    result = json.loads(lines[-1])
    result[f"{step}_wall_s"] = round(time.perf_counter() - t0, 2)
    return result


STEPS = ("export", "validate", "load")


def measure_model(
    name: str,
    work: Path,
    threads: int | None,
    log: Path,
    save: Any = lambda entry: None,
    steps: tuple[str, ...] = STEPS,
    entry: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`steps` of `name` at both precisions, merged into `entry` (an earlier result: `--steps load` re-times the
    kept files on a quieter machine); `save(entry)` after each step, so a run stopped midway keeps what it
    measured."""
    entry = dict(entry or {})
    for precision in ("fp32", "fp16"):
        result: dict[str, Any] = dict(entry.get(precision, {})) if steps != STEPS else {}
        result.pop("error", None)
        for step in steps:
            if step == "validate" and "check" in result.get("fp16", {}):
                result["validation"] = result["fp16"].pop("check")  # validated inside export_fp16 already
                continue
            r = run_step(step, name, work, precision, threads, log)
            result.update(r)
            entry.setdefault("parameters", result.get("parameters"))
            save({**entry, precision: result, "partial": True})
            if "error" in r:
                break
        path = work / f"{name}.{precision}.onnx"
        if path.exists():
            result["file_bytes"] = sum(f.stat().st_size for f in files_of(path))
            result["external_data"] = len(files_of(path)) > 1
        entry.setdefault("parameters", result.pop("parameters", None))
        entry[precision] = result
        if "error" in result and precision == "fp32":
            break
    return entry


def markdown_table(results: dict[str, Any]) -> str:
    """The README table: one row per model and precision."""

    def gb(x: Any) -> str:
        return f"{x:.2f}" if isinstance(x, (int, float)) else "–"

    rows = [
        "| model | precision | parameters | file size | export s | export peak GB | parity max diff (scale) "
        "| ORT CPU s, batch 1 | batch 2 (CFG pair) | load peak GB | fp16: kept fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():
        for precision in ("fp32", "fp16"):
            r = entry.get(precision)
            if r is None:
                continue
            if "error" in r:
                params = f"{entry['parameters']:,}" if entry.get("parameters") else "–"
                cells = " | ".join(["–"] * 8)
                rows.append(
                    f"| {name} | {precision} | {params} | {cells} | not measured: {r['error'].split(':')[0]} |"
                )
                continue
            v = r.get("validation", {})
            lat = r.get("latency", {})
            size = (
                f"{r['file_bytes'] / 1e9:.2f} GB"
                if r.get("file_bytes", 0) >= 1e8
                else f"{r.get('file_bytes', 0) / 1e6:.0f} MB"
            )
            size += " (external data)" if r.get("external_data") else ""
            kept = "–"
            if precision == "fp16" and "fp16" in r:
                f = r["fp16"]
                probe = (
                    f"{f['fp32_overflow_nodes']} nodes (peak {f['activation_peak']:.3g})"
                    if f.get("activation_peak") is not None
                    else "no range probe"
                )
                kept = probe + (
                    f", fallback {f['fp32_prefixes']}" if f["fp32_prefixes"] else ", no fallback needed"
                )
            parity = (
                f"{v['max_abs']:.2g} ({v['scale']:.2g})"
                if "max_abs" in v and "scale" in v
                else (f"{v['max_abs']:.2g}" if "max_abs" in v else "–")
            )
            rows.append(
                f"| {name} | {precision} | {entry.get('parameters') or '–':,} | {size} | {r.get('export_s', '–')} | "
                f"{gb(r.get('export_peak_gb'))} | {parity} | {lat.get('1', {}).get('median_s', '–')} | "
                f"{lat.get('2', {}).get('median_s', '–')} | {gb(r.get('load_peak_gb'))} | {kept} |"
            )
    return "\n".join(rows)


def environment() -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/real_size.json")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument(
        "--work", type=Path, default=ROOT / "engines/real-size", help="ONNX files (GBs; not committed)"
    )
    p.add_argument("--keep", action="store_true", help="keep the ONNX files (recon-infer's real-size folder)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    p.add_argument(
        "--model-dir",
        type=Path,
        help="assemble a real-size model folder for recon-infer from the kept files in --work, then exit",
    )
    p.add_argument("--table", action="store_true", help="print the README table of --out and exit")
    p.add_argument(
        "--steps",
        default=",".join(STEPS),
        help="steps to run (export,validate,load); e.g. --steps load re-times the files kept by --keep",
    )
    p.add_argument("--step", choices=("export", "validate", "load"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.step:  # a subprocess of the driver
        if args.step == "export":
            result = step_export(args.model, args.work, args.precision)
        elif args.step == "validate":
            result = step_validate(args.model, args.work, args.precision)
        else:
            result = step_load(args.model, args.work, args.precision, args.threads)
        print(json.dumps(result))
        return 0

    from brainrecon.io import write_json

    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return 0
    if args.model_dir:
        print(f"model folder: {assemble_model_dir(args.work, args.model_dir)}")
        return 0
    steps = tuple(s for s in STEPS if s in args.steps.split(","))
    if not steps or set(args.steps.split(",")) - set(STEPS):
        p.error(f"--steps: expected some of {','.join(STEPS)}, found {args.steps!r}")
    names = [n for n in args.only.split(",") if n] or list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        p.error(f"--only: unknown models {unknown}; expected some of {','.join(MODELS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("models", {})
    results["environment"] = environment()
    results["command"] = "python benchmarks/real_size.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    log = args.work / "real_size.log"
    for name in names:
        print(f"[real-size] {name} ...", flush=True)
        t0 = time.perf_counter()

        def save(partial: dict[str, Any], name: str = name) -> None:
            results["models"][name] = partial
            write_json(args.out, results)

        earlier = results["models"].get(name) if steps != STEPS else None
        entry = measure_model(name, args.work, args.threads, log, save, steps, earlier)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if steps == STEPS:
            entry["wall_s"] = round(time.perf_counter() - t0, 1)
            entry["measured_at"] = now
        else:  # the earlier run's wall time and date stay; say what was re-run when
            entry["rerun"] = {"steps": list(steps), "at": now, "wall_s": round(time.perf_counter() - t0, 1)}
        results["models"][name] = entry
        write_json(args.out, results)
        print(f"[real-size] {name}: {json.dumps(entry)[:600]}", flush=True)
        if not args.keep and steps == STEPS:  # a partial re-run reads kept files and leaves them
            for f in args.work.glob(f"{name}.*"):
                f.unlink(missing_ok=True)
    failed = [n for n in names if any("error" in results["models"][n].get(p, {}) for p in ("fp32", "fp16"))]
    if failed:
        print(f"error: real-size models failed: {', '.join(failed)} (details in {args.out}, log {log})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
