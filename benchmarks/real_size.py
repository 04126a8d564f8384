"""The real-size model set with random weights: every exported model at the size users bring, exported by the
export's own routine (fp32, fp16, checked, validated at the contract's tolerances), loaded by the runtime's ONNX
Runtime backend and timed on the CPU.

    python benchmarks/real_size.py [--only unet,vae_decoder] [--keep] [--steps load]   # → results/real_size.json
    python benchmarks/real_size.py --table                       # the docs' table of --out
    python benchmarks/real_size.py --model-dir engines/real-size-model   # a recon-infer folder of --keep's files
    python benchmarks/real_size.py --curve 1,2,4 --pipelines torch,torch_bf16,ort_fp32,openvino_bf16 --repeats 2
    python benchmarks/real_size.py --kv-step                     # → results/real_size_unet_kv_step.json
    python benchmarks/real_size.py --curve 1,2 --pipelines torch,openvino_bf16,openvino_int8,openvino_w8 \
        --out benchmarks/results/real_size_unet_int8.json         # NNCF INT8 of the kept UNet (INT8_PIPELINES)

Latency and memory do not depend on the weights' values, so random weights measure what real ones would cost; they
are made as distinct as real ones (no zero or constant tensors, the dual UNet's text blocks differ from its image
blocks) so that nothing is folded or deduplicated into smaller files than real weights give. Sizes from
Brain-Diffuser (ozcelikfu/brain-diffuser) and the seed paper's GRU (LorenzoVeronese/GRU-Decoding_JNE): ridge_k15 /
ridge_k31 (15,724 voxels → 13,344 / 91,168 VDVAE latents), gru (12,400,344 parameters), vdvae_decoder_k15 / _k31
(openai/vdvae imagenet64), clip_text / clip_vision (reduced-rank ridges, rank 256: 77 / 257 tokens of 768),
vae_encoder / vae_decoder (Stable Diffusion's AutoencoderKL at 512 px), unet (Versatile Diffusion's dual UNet).

Each step runs in its own interpreter, so that its peak memory (VmHWM) is its own:
    export   build the model, then export/onnx_export.py `stage_contract` (what recon-export runs per model) into
             --work/<model>/: fp32, fp16, ONNX checker, TensorRT operator table, parity; its `on_step` hook gives
             each step's seconds and peak memory (reset between steps)
    load     the runtime's OrtBackend opens one file (load peak), then ORT CPU latency at batch 1 and 2 (the UNet's
             classifier-free-guidance pair)
    time     one --curve pipeline on --model: torch (eager, bf16 autocast, torch.compile + bf16) on the module, or
             the runtime's ONNX Runtime / OpenVINO bf16 backend on the kept fp32 file, over the batch sizes
Results are written after every step, so an interrupted run keeps what it measured. --kv-step times the K/V-once UNet
step (`unet_kv`, exported by the same routine) against the kept plain `unet` on one guided step of one image.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.benchmarks.common import ROOT, child, machine, peak_gb, reset_peak, timed
from brainrecon.choices import FILE_PRECISIONS as PRECISIONS

N_VOXELS = 15724  # NSD subj01 nsdgeneral
CLIP_RANK, CLIP_DIM, TEXT_TOKENS, VISION_TOKENS = 256, 768, 77, 257
IMAGE_SIZE, LATENT_SIZE, VAE_SCALE, MIX_RATIO = 512, 64, 0.18215, 0.6  # Versatile Diffusion's VAE and mix
STEPS_PER_IMAGE = 37  # Versatile Diffusion's guided steps at strength 0.75 of 50 (Brain-Diffuser)
MODELS = ("gru", "ridge_k15", "vdvae_decoder_k15", "vdvae_decoder_k31", "clip_text", "clip_vision")
MODELS += ("vae_encoder", "vae_decoder", "unet", "ridge_k31")
STEPS = ("export", "load")
PIPELINES = ("torch", "torch_bf16", "torch_compile_bf16", "ort_fp32", "openvino_bf16")
# Named only when asked (--pipelines torch,openvino_int8): NNCF INT8 of the kept fp32 file, made at the first call and
# kept beside it (train/experiments/int8.py quantize_onnx), run by OpenVINO with the f32 hint for what stays fp32.
# int8 calibrates on INT8_CALIBRATION_CALLS of the contract's sample inputs (random draws: a speed figure, not a
# quality one; the demo's quality is recon-eval int8's); w8 is weight-only INT8 (no calibration).
INT8_PIPELINES = ("openvino_int8", "openvino_w8")
INT8_CALIBRATION_CALLS = 8
# The image models and the UNet are validated at batch 1 and at the CFG pair (batch 2) only: a batch-5 torch
# reference of the real-size UNet takes minutes on 2 cores and adds no coverage of the dynamic batch axis.
VALIDATE_BATCHES = {"vae_encoder": (1, 2), "vae_decoder": (1, 2), "unet": (1, 2), "unet_kv": (1, 2)}
# The kept files a real-size model folder is assembled from: GRU stage 1 at K = 15 and the whole stage 2.
FOLDER_MODELS = ("gru", "vdvae_decoder_k15", "clip_text", "clip_vision", "vae_encoder", "vae_decoder", "unet")


def vd_vae_config() -> dict[str, Any]:
    """Stable Diffusion's AutoencoderKL (Versatile Diffusion's `vae/config.json`): 83,653,863 parameters."""
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
    channels = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": IMAGE_SIZE}
    return (
        blocks
        | channels
        | {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
    )


def vd_unet_config():
    """Versatile Diffusion's `image_unet/config.json` (SD 1.x layout) with the dual blocks of `text_unet`."""
    from brainrecon.train.foundations.dual_unet import DualUNetConfig

    return DualUNetConfig(
        sample_size=LATENT_SIZE, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), attention_head_dim=8,
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=CLIP_DIM,
        text_tokens=TEXT_TOKENS, vision_tokens=VISION_TOKENS, mix_ratio=MIX_RATIO,
    )  # fmt: skip


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


def real_size_unet(seed: int = 0) -> Any:
    """The dual UNet at Versatile Diffusion's size (1,126,760,324 parameters), distinct weights, mix ratio set."""
    from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel

    from brainrecon.train.foundations.dual_unet import TEXT_TRANSFORMER, build_dual_unet, set_mix_ratio

    unet = build_dual_unet(vd_unet_config()).eval()
    make_distinct(unet, seed)
    # build_dual_unet copies each image block as the text block when no text-UNet state is given: real text
    # blocks are different weights (Versatile Diffusion's text_unet), so perturb every copy.
    for k, block in enumerate(m for m in unet.modules() if isinstance(m, DualTransformer2DModel)):
        make_distinct(block.transformers[TEXT_TRANSFORMER], seed + 1 + k, relative=0.1)
    set_mix_ratio(unet, MIX_RATIO)
    return unet.requires_grad_(False)


def context_pool(seed: int = 0, n: int = 8) -> np.ndarray:
    """(n, 257 + 77, 768): row 0 the unconditional context, then predicted ones; tokens of about unit norm, as
    Versatile Diffusion's CLIP features (divided by the CLS / pooled token's norm)."""
    pool = np.random.default_rng(seed).standard_normal((n, VISION_TOKENS + TEXT_TOKENS, CLIP_DIM))
    return (pool / np.sqrt(CLIP_DIM)).astype(np.float32)


# ----------------------------------------------------------------------------------------- models


def contract(name: str) -> Any:
    """The export contract of real-size model `name` (no weights needed), its validation batches as above."""
    from brainrecon.export import contracts as C
    from brainrecon.train.foundations.vdvae import latent_dims, vdvae_config

    k = int(name.rpartition("_k")[2]) if "_k" in name else 15
    dims = latent_dims(vdvae_config("imagenet64"), k)
    tokens = TEXT_TOKENS if name == "clip_text" else VISION_TOKENS
    contracts = {
        "ridge": lambda: C.ridge_contract(N_VOXELS, dims),
        "clip": lambda: C.clip_ridge_contract(name.removeprefix("clip_"), N_VOXELS, tokens, CLIP_DIM),
        "gru": lambda: C.gru_contract(N_VOXELS, dims),
        "vdvae": lambda: C.vdvae_decoder_contract(dims, 64),
        "vae_encoder": lambda: C.vae_encoder_contract(IMAGE_SIZE, 4, LATENT_SIZE, VAE_SCALE),
        "vae_decoder": lambda: C.vae_decoder_contract(IMAGE_SIZE, 4, LATENT_SIZE, VAE_SCALE),
        "unet": lambda: C.unet_contract(
            4, LATENT_SIZE, VISION_TOKENS, TEXT_TOKENS, CLIP_DIM, MIX_RATIO, IMAGE_SIZE
        ),
    }
    if name not in MODELS:
        raise SystemExit(f"error: model: expected one of {', '.join(MODELS)}, found {name!r}")
    c = contracts[name if name in contracts else name.split("_")[0]]()
    return dataclasses.replace(c, validate_batches=VALIDATE_BATCHES.get(name, c.validate_batches))


def pools(name: str) -> dict[str, np.ndarray] | None:
    """The rows the UNet's contexts are drawn from (contracts.INPUT_DRAWS "contexts")."""
    return {"encoder_hidden_states": context_pool()} if name == "unet" else None


def source(name: str, seed: int = 0) -> tuple[Any, int]:
    """(ExportSource, parameter count) of model `name` with seeded random weights, made as export/stage1.py and
    export/stage2.py make theirs: an ONNX graph builder with a numpy reference, or a torch module (the export's
    graph wrappers) that is its own reference."""
    from brainrecon.export.onnx_export import ExportSource, torch_reference

    c, rng = contract(name), np.random.default_rng(seed)
    if name.startswith("ridge_k"):
        from brainrecon.export.stage1 import build_ridge_onnx

        # ridge at alpha 5e4: small weights (fp16 needs the builder's column scaling), a per-latent intercept
        coef = rng.standard_normal((N_VOXELS, c.outputs[0].shape[1]), dtype=np.float32)
        coef *= np.float32(1e-3)
        b = rng.standard_normal(coef.shape[1], dtype=np.float32)

        def build(path: Path, precision: str, external: bool) -> None:
            build_ridge_onnx(coef, b, path, precision, c.opset, external)

        reference = lambda x: {"vdvae_latents": x["betas"] @ coef + b}  # noqa: E731
        return ExportSource(
            c, reference, build=build, weight_bytes=coef.nbytes + b.nbytes
        ), coef.size + b.size
    if name.startswith("clip_"):
        from brainrecon.export.stage2 import build_clip_ridge_onnx

        t, d = c.outputs[0].shape[1:]
        A = (rng.standard_normal((N_VOXELS, CLIP_RANK), dtype=np.float32) / np.sqrt(N_VOXELS)).astype(
            np.float32
        )
        B = (rng.standard_normal((CLIP_RANK, t * d), dtype=np.float32) * 0.05 / np.sqrt(CLIP_RANK)).astype(
            np.float32
        )
        b = (rng.standard_normal(t * d, dtype=np.float32) / np.sqrt(d)).astype(np.float32)

        def build(path: Path, precision: str, external: bool) -> None:
            build_clip_ridge_onnx(A, B, b, t, d, name, path, precision, c.opset, external)

        reference = lambda x: {name: ((x["betas"] @ A) @ B + b).reshape(-1, t, d)}  # noqa: E731
        size = A.size + B.size + b.size
        return ExportSource(c, reference, build=build, weight_bytes=4 * size), size

    import torch

    torch.manual_seed(seed)
    if name == "gru":
        from brainrecon.train.stage1.gru import GRUMapper, GRUMapperConfig

        module = exported = GRUMapper(GRUMapperConfig(n_voxels=N_VOXELS, n_outputs=c.outputs[0].shape[1]))
        make_distinct(module, seed)
    elif name.startswith("vdvae_decoder_k"):
        from brainrecon.train.foundations.vdvae import VDVAE, VDVAEDecoder, vdvae_config

        vdvae = VDVAE(vdvae_config("imagenet64")).eval()
        # openai/vdvae zero-initialises each residual block's last conv (and the latent biases): trained weights are
        # not zero, and a zero residual path would make the decoder ignore its latents.
        make_distinct(vdvae, seed)
        module = exported = VDVAEDecoder(vdvae, int(name.removeprefix("vdvae_decoder_k")))
    elif name.startswith("vae_"):
        from diffusers import AutoencoderKL

        from brainrecon.export.stage2 import VAEDecoderGraph, VAEEncoderGraph

        vae = AutoencoderKL(**vd_vae_config()).eval()
        make_distinct(vae, seed)
        encoder = name == "vae_encoder"
        module = (VAEEncoderGraph if encoder else VAEDecoderGraph)(vae, VAE_SCALE)
        # the graph wraps the whole AutoencoderKL but uses one half
        exported = torch.nn.ModuleList(
            [vae.encoder, vae.quant_conv] if encoder else [vae.decoder, vae.post_quant_conv]
        )
    else:  # unet
        from brainrecon.export.stage2 import UNetGraph

        module = exported = UNetGraph(real_size_unet(seed))
    module = module.eval().requires_grad_(False)
    n = sum(p.numel() for p in exported.parameters())
    return ExportSource(
        c, torch_reference(module, c), module=module, pools=pools(name), weight_bytes=4 * n
    ), n


# ----------------------------------------------------------------------------------------- steps (children)


def onnx_path(work: Path, name: str, precision: str) -> Path:
    """The kept file of `name` (stage_contract names it after its contract: ridge_k15 → ridge.fp32.onnx)."""
    found = sorted((work / name).glob(f"*.{precision}.onnx"))
    if not found:
        raise SystemExit(
            f"error: {work / name}: expected a kept {precision} export (run with --keep), found none"
        )
    return found[0]


def step_export(name: str, work: Path, precisions: tuple[str, ...] = PRECISIONS) -> dict[str, Any]:
    """Build `name`, then `stage_contract` into `work/name/`: per precision the seconds and peak memory of each step
    (fp32 export: since the start, so with the build; then each from where the previous one left off). Reference
    outputs are computed once, during the fp32 validation (`reference_s`), and reused for fp16; the weights are
    dropped as soon as nothing needs them (a torch module after that, a builder's after the fp16 file), so the fp16
    steps' peaks are their own."""
    from brainrecon.export.onnx_export import EXTERNAL_DATA_THRESHOLD, stage_contract

    t0 = time.perf_counter()
    src, parameters = source(name)
    out: dict[str, Any] = {
        "parameters": parameters,
        "build_s": round(time.perf_counter() - t0, 2),
        "fp32": {},
    }
    live, cache, clock = src.reference, {}, {"reference_s": 0.0, "step": time.perf_counter()}

    def reference(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = hashlib.sha256(b"".join(k.encode() + inputs[k].tobytes() for k in sorted(inputs))).digest()
        if key not in cache:
            t = time.perf_counter()
            cache[key] = live(inputs)
            clock["reference_s"] += time.perf_counter() - t
        return cache[key]

    def on_step(step: str, precision: str) -> None:
        nonlocal live
        r = out.setdefault(precision, {})
        r |= {f"{step}_s": round(time.perf_counter() - clock["step"], 2), f"{step}_peak_gb": peak_gb()}
        if (step, precision) == ("validate", "fp32"):  # the references are cached: the module is not needed
            r["reference_s"] = round(clock["reference_s"], 2)
            src.module = live = None
        if (step, precision) == ("export", "fp16"):  # nor a builder's weights, once both files are written
            src.build = None
        gc.collect()
        reset_peak()
        clock["step"] = time.perf_counter()

    src.reference = reference
    shutil.rmtree(work / name, ignore_errors=True)
    (work / name).mkdir(parents=True)
    for staged in stage_contract(src, work / name, precisions, True, EXTERNAL_DATA_THRESHOLD, on_step):
        out[staged.precision]["validation"] = staged.validation
    return out


def step_load(name: str, work: Path, precision: str, threads: int | None) -> dict[str, Any]:
    """The runtime's OrtBackend opens the file (load peak), then ORT CPU latency at batch 1 and 2."""
    from brainrecon.runtime.backends.ort import OrtBackend

    c, base, t0 = contract(name), peak_gb(), time.perf_counter()
    backend = OrtBackend(onnx_path(work, name, precision), device="cpu", threads=threads)
    out: dict[str, Any] = {
        "load_s": round(time.perf_counter() - t0, 2),
        "load_peak_gb": peak_gb(),
        "latency": {},
    }
    for batch in (1, 2):
        x = c.sample_input(batch, c.input_kinds[-1], pools=pools(name))
        out["latency"][str(batch)] = timed(lambda x=x: backend.run(x), 5, budget_s=3.0)
    # a shared machine: the 1-minute load average beside the figures says how contended they were
    out |= {"baseline_gb": base, "loadavg_1m": round(os.getloadavg()[0], 2), "run_peak_gb": peak_gb()}
    return out | {"providers": backend.providers}


def runner(name: str, pipeline: str, work: Path, threads: int | None) -> Any:
    """inputs → the model's (first) output as float32 numpy, in one of PIPELINES."""
    if pipeline.startswith("torch"):
        import torch

        torch.set_num_threads(threads or torch.get_num_threads())
        module = source(name)[0].module
        call = torch.compile(module) if pipeline == "torch_compile_bf16" else module
        names = [spec.name for spec in contract(name).inputs]

        def run(x: dict[str, np.ndarray]) -> np.ndarray:
            with (
                torch.no_grad(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=pipeline.endswith("bf16")),
            ):
                out = call(*(torch.from_numpy(x[k]) for k in names))
            return (out[0] if isinstance(out, tuple | list) else out).float().numpy()

        return run
    if pipeline == "ort_fp32":
        from brainrecon.runtime.backends.ort import OrtBackend

        backend = OrtBackend(onnx_path(work, name, "fp32"), device="cpu", threads=threads)
    elif pipeline == "openvino_bf16":
        from brainrecon.runtime.backends.openvino import OpenVinoBackend

        backend = OpenVinoBackend(onnx_path(work, name, "fp32"), precision="bf16", threads=threads)
    else:
        return int8_runner(name, pipeline, work, threads)
    return lambda x: next(iter(backend.run(x).values()))


def int8_runner(name: str, pipeline: str, work: Path, threads: int | None) -> Any:
    """An INT8_PIPELINES runner: the IR beside the kept fp32 file (quantized here at the first call), on OpenVINO."""
    from brainrecon.runtime.backends.openvino import OpenVinoBackend

    if pipeline not in INT8_PIPELINES:
        raise SystemExit(
            f"error: pipeline: expected one of {', '.join(PIPELINES + INT8_PIPELINES)}, found {pipeline!r}"
        )
    fp32 = onnx_path(work, name, "fp32")
    ir = fp32.with_name(f"{name}.{pipeline.removeprefix('openvino_')}.xml")
    if not ir.is_file():
        from brainrecon.train.experiments.int8 import quantize_onnx

        c = contract(name)
        items = [
            c.sample_input(2, c.input_kinds[-1], seed=i, pools=pools(name))
            for i in range(INT8_CALIBRATION_CALLS)
        ]
        t0 = time.perf_counter()
        quantize_onnx(fp32, None if pipeline == "openvino_w8" else items, ir)
        print(
            f"{pipeline}: quantized in {time.perf_counter() - t0:.0f} s -> {ir}", file=sys.stderr, flush=True
        )
    backend = OpenVinoBackend(ir, precision="fp32", threads=threads)
    return lambda x: next(iter(backend.run(x).values()))


def step_time(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One pipeline: load, then per batch size (or on the --inputs file) a first call and --repeats timed calls; the
    first output is saved beside the kept files, to be compared with torch eager's."""
    t0 = time.perf_counter()
    run = runner(name, args.pipeline, args.work, args.threads)
    out: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 1), "batches": {}}
    for i, b in enumerate(int(b) for b in args.batches.split(",")):
        c = None if args.inputs else contract(name)
        x = (
            dict(np.load(args.inputs))
            if c is None
            else c.sample_input(b, c.input_kinds[-1], pools=pools(name))
        )
        last: dict[str, np.ndarray] = {}
        t = timed(lambda x=x, last=last: last.update(y=run(x)), args.repeats)
        if i == 0:
            np.save(args.work / f"curve_{name}_{args.pipeline}.npy", last["y"])
        row = {
            "p50_s": round(t["median_s"], 3),
            "p95_s": round(t["p95_s"], 3),
            "first_call_s": t["first_call_s"],
        }
        out["batches"][str(b)] = row | {"rows_per_s": round(b / t["median_s"], 3)}
        if name == "unet":
            out["batches"][str(b)]["s_per_image_37_steps"] = round(2 * STEPS_PER_IMAGE * t["median_s"] / b, 1)
        print(f"{args.pipeline} B={b}: p50 {t['median_s']:.2f} s", file=sys.stderr, flush=True)
    return out | {"peak_gb": peak_gb(), "loadavg_1m": round(os.getloadavg()[0], 2)}


# ----------------------------------------------------------------------------------------- driver


def step(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """A step of this script in a fresh interpreter (its output in --work/real_size.log), with its wall time."""
    cmd = [__file__, *extra, "--work", str(args.work), "--repeats", str(args.repeats)]
    cmd += ["--precisions", ",".join(args.precisions)]
    t0 = time.perf_counter()
    result = child(
        cmd + (["--threads", str(args.threads)] if args.threads else []), args.work / "real_size.log"
    )
    return result | {"wall_s": round(time.perf_counter() - t0, 2)}


def measure_model(
    name: str, args: argparse.Namespace, steps: tuple[str, ...], entry: dict, save: Any
) -> dict:
    """`steps` of `name` merged into `entry` (an earlier result: `--steps load` re-times the kept files on a quieter
    machine); `save(entry)` after each step."""
    if "export" in steps:
        r = step(args, "--step", "export", "--model", name)
        if "error" in r:
            return {"error": r["error"]}
        entry = {"parameters": r["parameters"], "build_s": r["build_s"], "export_wall_s": r["wall_s"]}
        save(entry := entry | {p: r[p] for p in args.precisions})
    for precision in args.precisions if "load" in steps else ():
        r = step(args, "--step", "load", "--model", name, "--precision", precision)
        r["load_wall_s"] = r.pop("wall_s")
        entry[precision] = entry.get(precision, {}) | r
        if "error" not in r:
            files = [onnx_path(args.work, name, precision)]
            files += [f for f in [files[0].with_name(files[0].name + ".data")] if f.exists()]
            entry[precision] |= {
                "file_bytes": sum(f.stat().st_size for f in files),
                "external_data": len(files) > 1,
            }
        save(entry)
    return entry


def markdown_table(results: dict[str, Any]) -> str:
    """The docs' table: one row per model and precision."""
    rows = [
        "| model | precision | parameters | file size | export s | export peak GB | parity max diff "
        "| ORT CPU s, batch 1 | batch 2 (CFG pair) | load peak GB | fp16: kept fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():
        for precision in PRECISIONS:
            r, cells = entry.get(precision, {}), [name, precision, f"{entry.get('parameters') or 0:,}"]
            if "error" in r or "error" in entry:
                rows.append("| " + " | ".join([*cells, *["–"] * 7, "not measured"]) + " |")
                continue
            v, lat, size = r.get("validation") or {}, r.get("latency", {}), r.get("file_bytes", 0)
            kept = "–" if precision == "fp32" or "fp16_fp32_prefixes" not in v else "no range probe, "
            if kept != "–":  # the ORT float16 tool's fallbacks (export/fp16.py FP16_FALLBACKS)
                kept += ", ".join(v["fp16_fp32_prefixes"]) or "no fallback needed"
            size = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.0f} MB"
            cells += [size + " (external data)" * bool(r.get("external_data")), r.get("export_s", "–")]
            cells += [f"{r.get('export_peak_gb', 0):.2f}", f"{v['max_abs']:.2g}" if "max_abs" in v else "–"]
            cells += [lat.get(b, {}).get("median_s", "–") for b in ("1", "2")]
            rows.append(
                "| " + " | ".join(str(c) for c in [*cells, f"{r.get('load_peak_gb', 0):.2f}", kept]) + " |"
            )
    return "\n".join(rows)


def rel_error(path: Path, ref: np.ndarray) -> dict[str, float]:
    """max and median |output − ref| over ref's max |value|."""
    d, scale = np.abs(np.load(path).astype(np.float64) - ref), float(np.abs(ref).max())
    return {
        "max_over_scale": float(f"{d.max() / scale:.3g}"),
        "median_over_scale": float(f"{np.median(d) / scale:.3g}"),
    }


def curve(args: argparse.Namespace) -> dict[str, Any]:
    """--curve: every pipeline over the batch sizes, one interpreter each (the UNet is 4.5 GB: two side by side would
    measure the machine's memory); speedups and output errors against torch eager fp32; the plot beside --out."""
    from brainrecon.benchmarks.runtime_vs_torch import label_axes
    from brainrecon.io import write_json

    names = [n for n in args.pipelines.split(",") if n]
    if set(names) - set(PIPELINES + INT8_PIPELINES) or "torch" not in names:
        raise SystemExit(
            f"error: --pipelines: expected torch and some of {','.join(PIPELINES + INT8_PIPELINES)}, found {names}"
        )
    result = {
        "command": args.command,
        "machine": machine(args.threads),
        "model": args.model,
        "threads": args.threads,
    }
    result |= {"repeats": args.repeats, "batches": [int(b) for b in args.curve.split(",")], "pipelines": {}}
    for name in names:
        print(f"[{args.model} curve] {name} ...", file=sys.stderr, flush=True)
        result["pipelines"][name] = step(
            args, "--step", "time", "--pipeline", name, "--model", args.model, "--batches", args.curve
        )
        write_json(args.out, result)  # after every pipeline: an interrupted run keeps what it measured
    done = [n for n in names if "batches" in result["pipelines"][n]]
    if "torch" in done:
        ref = np.load(args.work / f"curve_{args.model}_torch.npy").astype(np.float64)
        result["error_vs_torch_fp32"] = {
            n: rel_error(args.work / f"curve_{args.model}_{n}.npy", ref) for n in done
        }
        for name in done:
            for b, r in result["pipelines"][name]["batches"].items():
                r["speedup_vs_torch"] = round(
                    result["pipelines"]["torch"]["batches"][b]["p50_s"] / r["p50_s"], 2
                )
    write_json(args.out, result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in done:
        rows = [result["pipelines"][name]["batches"][str(b)] for b in result["batches"]]
        (line,) = ax_lat.plot(result["batches"], [r["p50_s"] for r in rows], marker="o", label=name)
        ax_lat.fill_between(
            result["batches"],
            *([r[k] for r in rows] for k in ("p50_s", "p95_s")),
            color=line.get_color(),
            alpha=0.15,
        )
        ax_thr.plot(result["batches"], [r["rows_per_s"] for r in rows], marker="o", label=name)
    axes = ((ax_lat, "seconds per call (p50; band to p95)"), (ax_thr, "rows / s (at p50)"))
    label_axes(axes, result["batches"], "batch (rows per call; a guided UNet step of one image = 2)")
    ax_thr.legend(fontsize=8)
    fig.suptitle(f"Real-size {args.model}, CPU, {args.threads} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    return result


def kv_step(args: argparse.Namespace) -> dict[str, Any]:
    """--kv-step: `unet_kv` (exported and validated by stage_contract unless kept) against the kept `unet`, one
    guided step of one image (2 rows: the unconditional and a predicted context; the K/V of the same contexts
    computed in torch); ONNX Runtime fp32, the two graphs alternating --rounds times, one interpreter each (a
    session of the 1.13 B UNet holds about 14 GB: two cannot be open side by side on 24 GB)."""
    import torch

    from brainrecon.export import contracts as C
    from brainrecon.export.kv_once import context_kv
    from brainrecon.export.onnx_export import EXTERNAL_DATA_THRESHOLD as LIMIT
    from brainrecon.export.onnx_export import ExportSource, stage_contract, torch_reference
    from brainrecon.export.stage2 import UNetKVGraph, kv_pool, unet_kv_shapes

    onnx_path(args.work, "unet", "fp32")  # kept by --only unet --keep
    unet = real_size_unet()
    context = context_pool()[[0, 3]]  # the unconditional context, then a predicted one
    with torch.no_grad():
        kv = [t.numpy() for t in context_kv(unet, torch.from_numpy(context))]
    x = {
        "sample": np.random.default_rng(0)
        .standard_normal((2, 4, LATENT_SIZE, LATENT_SIZE))
        .astype(np.float32)
    }
    x["timestep"] = np.full((2,), 801, np.float32)
    np.savez(args.work / "kv_step_unet.npz", **x, encoder_hidden_states=context)
    np.savez(args.work / "kv_step_unet_kv.npz", **x, **dict(zip(C.kv_names(len(kv) // 2), kv, strict=True)))
    export = None
    if not list((args.work / "unet_kv").glob("*.fp32.onnx")):
        c = C.unet_kv_contract(4, LATENT_SIZE, unet_kv_shapes(unet), MIX_RATIO, IMAGE_SIZE)
        c = dataclasses.replace(c, validate_batches=VALIDATE_BATCHES["unet_kv"])
        module = UNetKVGraph(unet).eval()
        src = ExportSource(c, torch_reference(module, c), module=module, pools=kv_pool(unet, context_pool()))
        (args.work / "unet_kv").mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        staged = stage_contract(src, args.work / "unet_kv", ("fp32",), True, LIMIT)
        export = {"export_s": round(time.perf_counter() - t0, 1), "validation": staged[0].validation}
    del unet, kv
    times: dict[str, list[float]] = {"unet": [], "unet_kv": []}
    for _ in range(args.rounds):
        for model in times:
            inputs = str(args.work / f"kv_step_{model}.npz")
            cmd = ["--step", "time", "--pipeline", "ort_fp32", "--model", model, "--batches", "2"]
            r = step(args, *cmd, "--inputs", inputs)
            if "error" in r:
                raise SystemExit(f"error: {r['error']}")
            times[model].append(r["batches"]["2"]["p50_s"])
    medians = {g: round(float(np.median(t)), 3) for g, t in times.items()}
    ref = np.load(args.work / "curve_unet_ort_fp32.npy").astype(np.float64)
    result = {"command": args.command, "machine": machine(args.threads), "rows": 2, "export": export}
    result |= {"round_p50_s": times, "median_s": medians}
    result["kv_speedup_over_plain"] = round(medians["unet"] / medians["unet_kv"], 3)
    return result | {"kv_vs_plain_error": rel_error(args.work / "curve_unet_kv_ort_fp32.npy", ref)}


def deepcache_step(args: argparse.Namespace) -> dict[str, Any]:
    """--deepcache-step: the DeepCache shallow step (train/stage2/deepcache.py unet_shallow) against the full step
    with its feature (unet_with_feature) on the real-size UNet, one guided step of one image (2 rows), in torch eager
    fp32 and bf16 autocast, --repeats timed calls each after a warm-up, one interpreter: the share of a full step a
    shallow one costs at this size (the runtime's graphs are these functions exported)."""
    import torch

    from brainrecon.train.stage2.deepcache import unet_shallow, unet_with_feature

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    unet = real_size_unet().eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(rng.standard_normal((2, 4, LATENT_SIZE, LATENT_SIZE)).astype(np.float32))
    t, context = torch.full((2,), 801.0), torch.from_numpy(context_pool()[[0, 3]])
    result: dict[str, Any] = {"command": args.command, "machine": machine(args.threads), "rows": 2}
    for mode in ("eager", "bf16"):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16"):
            eps, feature = unet_with_feature(unet, sample, t, context)
            calls = {
                "full": lambda: unet_with_feature(unet, sample, t, context),
                "shallow": lambda feature=feature: unet_shallow(unet, sample, t, context, feature),
            }
            seconds = {}
            for name, call in calls.items():
                call()  # warm-up
                runs = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    call()
                    runs.append(time.perf_counter() - t0)
                seconds[name] = round(float(np.median(runs)), 3)
            error = (unet_shallow(unet, sample, t, context, feature) - eps).abs().max() / eps.abs().max()
        result[mode] = seconds | {
            "shallow_over_full": round(seconds["shallow"] / seconds["full"], 3),
            "shallow_vs_full_same_feature_error": float(error),
        }
    return result


def assemble_model_dir(work: Path, out: Path, seed: int = 0) -> Path:
    """A real-size subject model folder that `recon-infer` runs: the kept ONNX files of FOLDER_MODELS (hard links
    into `out/onnx/`), the data files the runtime reads and a manifest, as recon-export writes them. Statistics are
    neutral (zero mean, unit std); the unconditional contexts are the UNet validation pool's first row."""
    from brainrecon import model_dir as layout
    from brainrecon.config import config_to_dict
    from brainrecon.export.onnx_export import StagedFile
    from brainrecon.export.stage2 import write_scheduler_json
    from brainrecon.export.subject import _onnx_artifact
    from brainrecon.io import save_npy, write_json
    from brainrecon.manifest import describe_file, write_manifest
    from brainrecon.sampling import SamplingConfig

    mask = {"file": "none", "sha256": "none", "shape": [81, 104, 83], "affine": None}
    prep = {
        "format_version": 1,
        "producer": "benchmarks/real_size.py (random weights)",
        "subject": 1,
        "mask": mask,
    }
    prep |= {"config": {"subject": 1, "session_zscore": True, "image_size": IMAGE_SIZE}, "n_voxels": N_VOXELS}
    stage1 = {"config": {"regressor": "gru", "num_layers": 15, "renormalize": True}, "n_voxels": N_VOXELS}
    stage2 = {"sampling": config_to_dict(SamplingConfig(seed=seed)), "config": {"renormalize": True}}
    files = {
        layout.PREPROCESS: prep | {"betas_scale": 300.0, "steps": ["z-scored betas (.npy)"], "files": {}}
    }
    files |= {layout.STAGE1_SUMMARY: stage1, layout.STAGE2_SUMMARY: stage2}
    files |= {layout.MASK_INDICES: np.arange(N_VOXELS), layout.VOXEL_MEAN: np.zeros(N_VOXELS, np.float32)}
    files |= {layout.VOXEL_STD: np.ones(N_VOXELS, np.float32)}
    dims = contract("gru").outputs[0].shape[1]
    files |= {layout.LATENT_MEAN: np.zeros(dims, np.float32), layout.LATENT_STD: np.ones(dims, np.float32)}
    for target, rows in (("vision", slice(0, VISION_TOKENS)), ("text", slice(VISION_TOKENS, None))):
        uncond = np.ascontiguousarray(context_pool(seed)[:1, rows])
        std = np.full(uncond.shape[1:], 1 / np.sqrt(CLIP_DIM), np.float32)
        files |= {layout.uncond_context(target): uncond, layout.clip_target_stat(target, "std"): std}
        files |= {layout.clip_target_stat(target, "mean"): np.zeros_like(std)}
    for rel, content in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (save_npy if isinstance(content, np.ndarray) else write_json)(out / rel, content)
    artifacts = [describe_file(out, rel, "data") for rel in (*files, write_scheduler_json(out))]
    (out / layout.ONNX_DIR).mkdir(exist_ok=True)
    # fp16 files only where they were exported (--precisions fp32 keeps fp32 alone: the OpenVINO bf16 path reads fp32)
    exported = [p for p in PRECISIONS if all(any((work / n).glob(f"*.{p}.onnx")) for n in FOLDER_MODELS)]
    for name, precision in ((n, p) for n in FOLDER_MODELS for p in exported):
        staged = []
        for f in sorted((work / name).glob(f"*.{precision}.onnx*")) or [onnx_path(work, name, precision)]:
            (out / layout.ONNX_DIR / f.name).unlink(missing_ok=True)
            os.link(f, out / layout.ONNX_DIR / f.name)  # the names stay: an .onnx names its .data file
            staged.append(out / layout.ONNX_DIR / f.name)
        entries, _ = _onnx_artifact(
            out, StagedFile(contract(name), precision, staged[0], staged[1:]), layout.ONNX_DIR
        )
        artifacts += entries
    write_manifest(out, artifacts, merge=False)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: benchmarks/results/<mode>.json)"
    )
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument(
        "--work", type=Path, default=ROOT / "engines/real-size", help="ONNX files (GBs; not committed)"
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the ONNX files (--model-dir, --curve, --kv-step)"
    )
    p.add_argument("--threads", type=int, default=None, help="ORT and torch threads (default: all cores)")
    p.add_argument(
        "--steps", default=",".join(STEPS), help="export,load; --steps load re-times the kept files"
    )
    p.add_argument(
        "--precisions", default=",".join(PRECISIONS), help="the files to export: fp32 (always) and/or fp16"
    )
    p.add_argument("--table", action="store_true", help="print the docs' table of --out and exit")
    p.add_argument("--model-dir", type=Path, help="assemble a recon-infer folder of the kept files and exit")
    p.add_argument("--curve", default="", help="batch sizes (rows per call) to time --model at, e.g. 1,2,4")
    p.add_argument("--model", default="unet", help="--curve's model (one with a torch module)")
    p.add_argument("--pipelines", default=",".join(PIPELINES), help="--curve's pipelines, torch among them")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per figure of --curve and --kv-step")
    p.add_argument("--kv-step", action="store_true", help="the K/V-once UNet step against the plain one")
    p.add_argument(
        "--deepcache-step", action="store_true", help="DeepCache's shallow step against the full one"
    )
    p.add_argument("--rounds", type=int, default=2, help="--kv-step: rounds of the two graphs, alternating")
    p.add_argument(
        "--step", choices=("export", "load", "time"), help=argparse.SUPPRESS
    )  # a child of the driver
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help=argparse.SUPPRESS)
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    p.add_argument("--batches", default="", help=argparse.SUPPRESS)
    p.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.command = "python benchmarks/real_size.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.precisions = tuple(x for x in PRECISIONS if x in args.precisions.split(",") or x == "fp32")
    if args.step == "export":
        print(json.dumps(step_export(args.model, args.work, args.precisions)))
    elif args.step == "load":
        print(json.dumps(step_load(args.model, args.work, args.precision, args.threads)))
    elif args.step == "time":
        print(json.dumps(step_time(args.model, args)))
    if args.step:
        return 0

    from brainrecon.io import write_json

    modes = {"curve": "real_size_unet_curve", "kv_step": "real_size_unet_kv_step"}
    modes["deepcache_step"] = "real_size_unet_deepcache_step"
    mode = next((m for flag, m in modes.items() if getattr(args, flag)), "real_size")
    args.out = args.out or ROOT / f"benchmarks/results/{mode}.json"
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
    elif args.model_dir:
        print(f"model folder: {assemble_model_dir(args.work, args.model_dir)}")
    elif args.curve or args.kv_step or args.deepcache_step:
        args.threads = args.threads or len(os.sched_getaffinity(0))  # torch and the engines alike
        run = curve if args.curve else kv_step if args.kv_step else deepcache_step
        write_json(args.out, run(args))
        print(f"-> {args.out}")
    else:
        return measure_models(args, p)
    return 0


def measure_models(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """The model set (--only), --steps of each, results merged into --out after every step."""
    from brainrecon.io import write_json

    steps = tuple(s for s in STEPS if s in args.steps.split(","))
    if not steps or set(args.steps.split(",")) - set(STEPS):
        p.error(f"--steps: expected some of {','.join(STEPS)}, found {args.steps!r}")
    names = [n for n in args.only.split(",") if n] or list(MODELS)
    if set(names) - set(MODELS):
        p.error(f"--only: expected some of {','.join(MODELS)}, found {sorted(set(names) - set(MODELS))}")
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = {k: v for k, v in results.items() if k != "environment"}  # `machine` in the earlier layout
    results |= {
        "command": args.command,
        "machine": machine(args.threads),
        "models": results.get("models", {}),
    }
    for name in names:
        print(f"[real-size] {name} ...", flush=True)
        t0 = time.perf_counter()

        def save(entry: dict[str, Any], name: str = name) -> None:
            results["models"][name] = entry | {"partial": True}
            write_json(args.out, results)

        entry = measure_model(
            name, args, steps, dict(results["models"].get(name, {})) if steps != STEPS else {}, save
        )
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if steps == STEPS:
            entry |= {"wall_s": round(time.perf_counter() - t0, 1), "measured_at": at}
        else:  # the earlier run's wall time and date stay; say what was re-run when
            entry["rerun"] = {"steps": list(steps), "at": at, "wall_s": round(time.perf_counter() - t0, 1)}
        results["models"][name] = entry
        write_json(args.out, results)
        print(f"[real-size] {name}: {json.dumps(entry)[:600]}", flush=True)
        if not args.keep and steps == STEPS:  # a partial re-run reads kept files and leaves them
            shutil.rmtree(args.work / name, ignore_errors=True)
    failed = [n for n, e in results["models"].items() if n in names and "error" in json.dumps(e)]
    if failed:
        print(
            f"error: real-size models failed: {', '.join(failed)} (details in {args.out}, log in {args.work})"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
