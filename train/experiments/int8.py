"""INT8 on the CPU: NNCF post-training quantization of an exported folder's stage-2 UNet (and VAE), measured end to
end through the torch-free runtime beside OpenVINO fp32 and bf16 and the ONNX Runtime fp32 reference; and the
repeated-call check of OpenVINO's static-shape compile. `recon-eval int8`.

Quantization follows OpenVINO's recommended path (NNCF docs, "Post-training Quantization", OpenVINO backend):
`openvino.Core().read_model(<the folder's fp32 ONNX>)` → `nncf.quantize(model, nncf.Dataset(inputs))` →
`openvino.save_model` as IR (.xml + .bin, weights kept fp32 where not quantized). The calibration inputs are the
models' real inputs, recorded from a run of the runtime (ONNX Runtime fp32, the paper's sampling) on
CALIBRATION_TRIALS of the subject's *training* betas, evenly spaced over the file: never a test image. Each
recorded UNet call (a chunk of rows at one timestep) is one calibration item, so the statistics cover every
timestep of the schedule; the VAE's recorded calls are split into single images.

What was chosen, on the demo UNet (mean |eps − eps_ORT| / mean |eps_ORT| over held-out training calls): NNCF's
transformer preset (`ModelType.TRANSFORMER`, with SmoothQuant) 0.17, without SmoothQuant 0.077, the default
(CNN) preset 0.095; the first convolution (`conv_in`, on the raw latents) held most of it: without SmoothQuant and
with `conv_in` and `conv_out` left in fp32 (EDGE_LAYERS), 0.029; convolutions alone quantized (MatMuls fp32) 0.020,
MatMuls alone 0.018. So: transformer preset, SmoothQuant off, EDGE_LAYERS fp32. Beside it, weight-only INT8
(`nncf.compress_weights`, INT8_ASYM per channel: activations stay fp32, no calibration) at 0.008.

The INT8 models run in the runtime unchanged but for their backends: `open_reconstructor` opens the folder as
usual and swaps the UNet workers (and the VAE backends) for `OpenVinoBackend`s on the IR files. The runtime itself
neither imports nor needs nncf.

    out/int8.json      machine, calibration, quantization seconds, per-setting scores and differences, per-call
                       seconds at 1 and 2 rows per model and precision, the static-shape check
    out/int8.md        the tables
    out/int8_sheet.png ground truth, then every setting (first 12 test images)
    out/models/*.xml|.bin  the INT8 IR files (git-ignored, as every benchmarks/results/*/models/)

The static-shape check (`static_shape_check`): OpenVINO 2026.4.1 once returned drifting results from a model
compiled at a fixed batch (`Model.reshape`), so the runtime compiles with the dynamic batch. Here each model is
compiled both ways at both precision hints, called STATIC_CALLS times on the same input, and every call's max
error against ONNX Runtime fp32 and against the same model's first call is recorded, with the per-call seconds.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import InputError

CALIBRATION_TRIALS = 16
QUANTIZABLE = ("unet", "vae_decoder", "vae_encoder")  # stage-2 roles whose ONNX can be quantized
# Left in fp32: the first and last convolutions (diffusers' names in the UNet and both VAE halves).
EDGE_LAYERS = (".*conv_in/.*", ".*conv_out/.*")
STATIC_CALLS = 5
TIMING_WARMUP, TIMING_REPEATS = 3, 15
SHEET_IMAGES = 12


# ----------------------------------------------------------------------------------------------- recording


class _Recorder:
    """A backend that keeps a copy of every input it is given, then runs the backend it wraps."""

    def __init__(self, backend: Any, calls: list[dict[str, np.ndarray]]):
        self.backend, self.calls = backend, calls
        self.io, self.providers, self.path = backend.io, backend.providers, getattr(backend, "path", None)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append({k: np.array(v, copy=True) for k, v in inputs.items()})  # list.append: thread-safe
        return self.backend.run(inputs)

    def close(self) -> None:
        self.backend.close()


def calibration_betas(data_dir: str | Path, n: int = CALIBRATION_TRIALS) -> tuple[np.ndarray, list[int]]:
    """`n` training trials of recon-prepare's train_betas.npy, evenly spaced over the file → ((n, V), their rows)."""
    from brainrecon.io import load_npy

    betas = load_npy(Path(data_dir) / "train_betas.npy", "training betas from recon-prepare", mmap=True)
    if len(betas) < 2:
        raise InputError(Path(data_dir) / "train_betas.npy", "at least 2 training trials", str(len(betas)))
    rows = sorted({int(r) for r in np.linspace(0, len(betas) - 1, min(n, len(betas)))})
    return np.ascontiguousarray(betas[rows], dtype=np.float32), rows


def record_inputs(model_dir: str | Path, betas: np.ndarray, sampling: Any = None) -> dict[str, list[dict]]:
    """Every input the stage-2 UNet, VAE encoder and decoder and the stage-1 VDVAE decoder were given while the
    runtime (ONNX Runtime fp32) reconstructed `betas` with `sampling` (default: the folder's fitted one)."""
    from brainrecon.runtime import Reconstructor, RuntimeOptions

    calls: dict[str, list[dict]] = {role: [] for role in (*QUANTIZABLE, "vdvae_decoder")}
    with Reconstructor.open(model_dir, RuntimeOptions(engine="ort", precision="fp32"), stage=2) as rec:
        pipe = rec.pipeline
        pipe.unet_workers = [_Recorder(w, calls["unet"]) for w in pipe.unet_workers]
        for role in ("vae_decoder", "vae_encoder"):
            pipe.backends[role] = _Recorder(pipe.backends[role], calls[role])
        rec.stage1.decoder = _Recorder(rec.stage1.decoder, calls["vdvae_decoder"])
        rec.reconstruct(betas, sampling)
    # The UNet workers' threads record in any order, and NNCF's result depends on the order (the same calls
    # reversed gave other weights): sort by chunk (its context, the last input, is the same at every step), then
    # by step (timesteps fall).
    calls["unet"].sort(key=lambda c: (float(c[list(c)[-1]].sum(dtype=np.float64)), -float(c["timestep"][0])))
    return calls


def split_rows(calls: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Each recorded call as single-row calls (one image per calibration item)."""
    return [
        {k: v[i : i + 1] for k, v in call.items()}
        for call in calls
        for i in range(len(next(iter(call.values()))))
    ]


# ----------------------------------------------------------------------------------------------- quantization


def quantize_onnx(
    onnx_path: str | Path, items: Sequence[dict[str, np.ndarray]] | None, out_xml: str | Path
) -> dict[str, Any]:
    """NNCF INT8 of an ONNX file read by OpenVINO → out_xml (+ .bin), written atomically (a temporary name, then
    renamed). With calibration `items` (each a dict of the model's inputs, as one call gives them): post-training
    quantization of weights and activations (the module docstring's recipe); None: weight-only INT8
    (`nncf.compress_weights`). Returns what was done: mode, seconds, items, sizes."""
    import nncf
    import openvino as ov

    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = ov.Core().read_model(str(onnx_path))
    if items is None:
        quantized = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    else:
        quantized = nncf.quantize(
            model,
            nncf.Dataset(list(items)),
            subset_size=len(items),
            model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(patterns=list(EDGE_LAYERS), validate=False),
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1)  # -1: off
            ),
        )
    tmp = out_xml.with_name(f".{out_xml.stem}.tmp.xml")
    ov.save_model(quantized, str(tmp), compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(out_xml.with_suffix(".bin"))
    tmp.replace(out_xml)  # the .xml last: an .xml is never there without its weights
    return {
        "onnx": str(onnx_path),
        "ir": str(out_xml),
        "mode": "weight-only INT8_ASYM" if items is None else "weights and activations",
        "calibration_items": 0 if items is None else len(items),
        "seconds": round(time.perf_counter() - t0, 1),
        "onnx_bytes": Path(onnx_path).stat().st_size,
        "ir_bytes": out_xml.stat().st_size + out_xml.with_suffix(".bin").stat().st_size,
        "nncf": nncf.__version__,
    }


def folder_onnx(model_dir: str | Path, role: str) -> tuple[Path, Any]:
    """(fp32 ONNX path, ModelIO) of a stage-2 role (the UNet step the folder runs by default) or vdvae_decoder."""
    from brainrecon.runtime import ModelIO, read_model_folder

    folder = read_model_folder(model_dir, 2, "fp32", "auto")  # the manifest verified, as Reconstructor.open
    name = folder.stage2.models.get(role, role)
    onnx = folder.manifest.find("onnx", name, "fp32")
    if onnx is None:
        raise InputError(folder.path / "manifest.json", f"a {name} fp32 ONNX entry", "none")
    return folder.path / onnx.path, ModelIO.from_spec(name, onnx.io or {})


def open_reconstructor(
    model_dir: str | Path, engine: str, precision: str, irs: Mapping[str, Path] | None = None
) -> Any:
    """Reconstructor.open(model_dir) at (engine, precision), then the backends of the roles in `irs` (unet,
    vae_decoder, vae_encoder) replaced by OpenVinoBackends on those IR files at `precision`'s hint (the UNet: as
    many workers as the runtime opened, 1 thread each when several, as the runtime does)."""
    from brainrecon.runtime import OpenVinoBackend, Reconstructor, RuntimeOptions

    rec = Reconstructor.open(model_dir, RuntimeOptions(engine=engine, precision=precision), stage=2)
    pipe = rec.pipeline
    for role, xml in (irs or {}).items():
        if role == "unet":
            threads = 1 if len(pipe.unet_workers) > 1 else rec.options.threads
            old = pipe.unet_workers
            pipe.unet_workers = [OpenVinoBackend(xml, old[0].io, precision, threads) for _ in old]
            pipe.backends["unet"] = pipe.unet_workers[0]
        else:
            old = [pipe.backends[role]]
            pipe.backends[role] = OpenVinoBackend(xml, old[0].io, precision, rec.options.threads)
        for backend in old:
            backend.close()
    return rec


# ----------------------------------------------------------------------------------------------- timing


def _seconds(fn: Any, warmup: int = TIMING_WARMUP, repeats: int = TIMING_REPEATS) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 6)


def per_call_seconds(
    onnx_path: Path,
    io: Any,
    irs: Mapping[str, Path],
    call: dict[str, np.ndarray],
    rows: Sequence[int] = (1, 2),
) -> dict[str, dict[str, float]]:
    """Median seconds per call (after warm-up) of one model at `rows` rows per call (the first rows of a recorded
    `call`), all cores, as ONNX Runtime fp32, OpenVINO fp32 and bf16 on the ONNX, and OpenVINO on each IR of
    `irs` ({"int8": path, ...}) with the f32 hint, the "int8" one with the bf16 hint as well (for what is not
    quantized)."""
    from brainrecon.runtime import OpenVinoBackend, OrtBackend

    makers = {
        "ort fp32": lambda: OrtBackend(onnx_path, io, "cpu"),
        "openvino fp32": lambda: OpenVinoBackend(onnx_path, io, "fp32"),
        "openvino bf16": lambda: OpenVinoBackend(onnx_path, io, "bf16"),
    }
    for label, ir in irs.items():
        makers[f"openvino {label}"] = lambda ir=ir: OpenVinoBackend(ir, io, "fp32")
        if label == "int8":
            makers["openvino int8+bf16"] = lambda ir=ir: OpenVinoBackend(ir, io, "bf16")
    out: dict[str, dict[str, float]] = {}
    for key, make in makers.items():
        backend = make()
        out[key] = {}
        for n in rows:
            x = {k: np.ascontiguousarray(v[:n]) for k, v in call.items()}
            out[key][str(n)] = _seconds(lambda x=x, backend=backend: backend.run(x))
        backend.close()
    return out


# ----------------------------------------------------------------------------------------------- static shapes


def static_shape_check(
    model_dir: str | Path, calls: Mapping[str, list[dict]], batch: int = 2, n_calls: int = STATIC_CALLS
) -> dict[str, Any]:
    """Per model (the UNet step, the VAE decoder, the VDVAE decoder), hint (f32, bf16) and compile (the dynamic
    batch the runtime uses; static: `Model.reshape` to `batch`): `n_calls` calls on one recorded input of `batch`
    rows, each call's max abs error against ONNX Runtime fp32 and against the first call, the output's scale, and
    the median seconds per call (after warm-up)."""
    import openvino as ov

    from brainrecon.runtime import OrtBackend

    core, result = ov.Core(), {"batch": batch, "calls": n_calls, "openvino": ov.__version__, "models": {}}
    for role in ("unet", "vae_decoder", "vdvae_decoder"):
        onnx_path, io = folder_onnx(model_dir, role)
        call = max(calls[role], key=lambda c: len(next(iter(c.values()))))
        x = {k: np.ascontiguousarray(v[:batch]) for k, v in call.items()}
        reference = next(iter(OrtBackend(onnx_path, io, "cpu").run(x).values()))
        entry: dict[str, Any] = {"onnx": str(onnx_path), "scale": float(np.abs(reference).max())}
        for hint in ("f32", "bf16"):
            for mode in ("dynamic", "static"):
                model = core.read_model(str(onnx_path))
                if mode == "static":
                    model.reshape({name: list(v.shape) for name, v in x.items()})
                config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
                request = core.compile_model(model, "CPU", config).create_infer_request()

                def run(request=request, x=x) -> np.ndarray:
                    return np.array(request.infer(x)[0], copy=True)  # a copy: no buffer shared between calls

                outputs = [run() for _ in range(n_calls)]
                entry[f"{hint} {mode}"] = {
                    "max_error_vs_ort": [float(np.abs(y - reference).max()) for y in outputs],
                    "max_change_vs_first_call": [float(np.abs(y - outputs[0]).max()) for y in outputs],
                    "seconds_per_call": _seconds(run, warmup=1, repeats=10),
                }
        for hint in ("f32", "bf16"):
            entry[f"{hint} static_speedup"] = round(
                entry[f"{hint} dynamic"]["seconds_per_call"] / entry[f"{hint} static"]["seconds_per_call"], 2
            )
        result["models"][io.model] = entry
    return result


# ----------------------------------------------------------------------------------------------- the experiment


def int8_experiment(
    model_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    recipes: Sequence[str] = ("paper", "fast"),
    n_images: int | None = None,
    calibration_trials: int = CALIBRATION_TRIALS,
    device: str = "cpu",
    static_check: bool = True,
) -> dict:
    """Quantize the folder's stage-2 UNet, VAE decoder and VAE encoder (calibrated on training trials), then run
    the first `n_images` test images (None: all) per recipe ("paper": the fitted sampling; "fast":
    `brainrecon.sampling.PRESETS["fast"]`) in ORT fp32, OpenVINO fp32, bf16, INT8 UNet (f32 and bf16 hints for
    the rest) and INT8 UNet + VAE; scores against the ground truth and differences from the ORT fp32 paper
    images; per-call seconds; the static-shape check → out/int8.{json,md}, out/int8_sheet.png."""
    from brainrecon.config import config_from_dict
    from brainrecon.images import contact_sheet
    from brainrecon.io import read_json, write_json, write_text
    from brainrecon.metrics import pixcorr, ssim
    from brainrecon.model_dir import STAGE2_SUMMARY
    from brainrecon.sampling import PRESETS, SamplingConfig
    from brainrecon.train.experiments.quality import image_difference, load_test_set, machine, within_bounds

    model_dir, data_dir, out = Path(model_dir), Path(data_dir), Path(out)
    unknown = sorted(set(recipes) - set(PRESETS))
    if unknown or not recipes:
        raise InputError("--recipe", f"some of {', '.join(PRESETS)}", ", ".join(unknown) or "none")
    info = read_json(model_dir / STAGE2_SUMMARY, "stage-2 summary (recon-train subject)")
    fitted = config_from_dict(SamplingConfig, info["sampling"], str(model_dir / STAGE2_SUMMARY))
    samplings = {r: fitted.with_overrides(**PRESETS[r]) for r in recipes}
    betas, gt = load_test_set(data_dir, n_images)
    n = len(betas)
    host = machine()
    t_start = time.perf_counter()

    # 1. calibration inputs from training trials, then the INT8 IR files
    cal_betas, cal_rows = calibration_betas(data_dir, calibration_trials)
    calls = record_inputs(model_dir, cal_betas, fitted)
    ir_dir = out / "models"
    quantized, irs = {}, {}  # "unet", "vae_decoder", "vae_encoder", "unet w8" (weight-only)
    for role in (*QUANTIZABLE, "unet w8"):
        onnx_path, io = folder_onnx(model_dir, role.split()[0])
        items = None if role.endswith("w8") else calls[role] if role == "unet" else split_rows(calls[role])
        irs[role] = ir_dir / f"{io.model}.{'w8' if items is None else 'int8'}.xml"
        quantized[role] = quantize_onnx(onnx_path, items, irs[role])

    # 2. per-call seconds at 1 and 2 rows, each model alone
    per_call = {}
    for role in QUANTIZABLE:
        onnx_path, io = folder_onnx(model_dir, role)
        variants = {"int8": irs[role]} | ({"w8": irs["unet w8"]} if role == "unet" else {})
        per_call[io.model] = per_call_seconds(onnx_path, io, variants, calls[role][0])

    # 3. the test set through the runtime, per recipe and setting
    from brainrecon.train.evaluation.stage2 import clip_identification, clip_image_embeddings
    from brainrecon.train.foundations.loaders import load_clip

    extractor, _ = load_clip(info["config"]["clip"], device=device)
    gt_embeddings = clip_image_embeddings(extractor, gt)
    unet_only = {"unet": irs["unet"]}
    settings = {  # name: (engine, precision, IR files by role)
        "ort-fp32": ("ort", "fp32", {}),
        "ov-fp32": ("openvino", "fp32", {}),
        "ov-bf16": ("openvino", "bf16", {}),
        "ov-int8": ("openvino", "fp32", unet_only),
        "ov-int8+bf": ("openvino", "bf16", unet_only),  # names of at most 10 characters: the sheet's labels
        "ov-w8": ("openvino", "fp32", {"unet": irs["unet w8"]}),
        "ov-int8all": ("openvino", "fp32", {role: irs[role] for role in QUANTIZABLE}),
    }
    rows, outputs = [], {}
    for name, (engine, precision, files) in settings.items():
        with open_reconstructor(model_dir, engine, precision, files) as rec:
            rec.reconstruct(
                betas[:2], fitted
            )  # untimed warm-up: sessions allocate, the uncond K/V is computed
            for recipe, sampling in samplings.items():
                recon = rec.reconstruct(betas, sampling)
                key = f"{recipe} {name}"
                final = outputs[key] = recon.images
                row = {
                    "name": key,
                    "recipe": recipe,
                    "setting": name,
                    "engine": engine,
                    "precision": precision,
                    "int8": sorted(p.name for p in files.values()),
                    "steps": len(recon.timesteps),
                    "seconds_per_image": round(recon.timings["total_s"] / n, 5),
                    "unet_seconds_per_image": round(recon.timings["unet_s"] / n, 5),
                    "pixcorr": round(float(pixcorr(gt, final)), 4),
                    "ssim": round(float(ssim(gt, final)), 4),
                    "clip_2way": round(clip_identification(extractor, gt_embeddings, final), 4),
                    "vs_same_recipe_ort_fp32": image_difference(outputs[f"{recipe} ort-fp32"], final),
                }
                rows.append(row)
    # scored against the reference once every setting ran: ORT fp32 runs first, but a --recipe list may omit paper
    reference_name = "paper ort-fp32" if "paper" in samplings else f"{recipes[0]} ort-fp32"
    reference = next(r for r in rows if r["name"] == reference_name)
    for row in rows:
        row["vs_reference"] = image_difference(outputs[reference_name], outputs[row["name"]])
        row |= within_bounds(row, reference)

    # 4. the static-shape compile, repeated calls
    static = static_shape_check(model_dir, calls) if static_check else None
    result = {
        "command": "recon-eval int8",
        "model_dir": str(model_dir),
        "data": str(data_dir),
        "n_test": n,
        "machine": host,
        "calibration": {
            "source": f"{data_dir / 'train_betas.npy'}: training trials (never a test image), evenly spaced",
            "rows": cal_rows,
            "sampling": "the folder's fitted (paper) sampling, ONNX Runtime fp32",
            "recorded_calls": {role: len(c) for role, c in calls.items()},
        },
        "quantized": quantized,
        "recipes": {r: s.to_dict() for r, s in samplings.items()},
        "reference": reference_name,
        "per_call_seconds": per_call,
        "per_call_note": "median seconds per call after warm-up, all cores, each model alone; keys: rows per call",
        "settings": rows,
        "static_shape": static,
        "seconds": round(time.perf_counter() - t_start, 1),
        "loadavg_1m_end": round(
            os.getloadavg()[0], 2
        ),  # a shared machine: the load beside machine's at the start
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "int8.json", result)
    write_text(out / "int8.md", int8_table(result))
    first = gt[:SHEET_IMAGES]
    contact_sheet(
        [("ground truth", first), *((k, v[:SHEET_IMAGES]) for k, v in outputs.items())],
        out / "int8_sheet.png",
    )
    return result


def int8_table(result: dict) -> str:
    """The Markdown of int8.md: scores per recipe and setting, per-call seconds, the static-shape check."""
    m = result["machine"]
    lines = [
        f"INT8 (NNCF post-training quantization, OpenVINO CPU): {result['n_test']} test images of "
        f"{result['model_dir']}, the torch-free runtime, on {m['cpu']} ({m['affinity']} of {m['cores']} cores, "
        f"flags {', '.join(m['cpu_flags'])}; 1-min load {m['loadavg_1m']} at the start, "
        f"{result.get('loadavg_1m_end')} at the end), {m['date']}. Calibration: {len(result['calibration']['rows'])} "
        f"training trials (never a test image). vs ref: the {result['reference']} images, grey levels (0-255). "
        "Within: CLIP 2-way at most 0.01, PixCorr and SSIM at most 0.02 below the reference's.",
        "",
        "| recipe | setting | INT8 models | s/image | UNet s/image | PixCorr ↑ | SSIM ↑ | CLIP 2-way ↑ (ours) | "
        "vs ref: mean / max abs | vs same recipe ORT fp32: mean / max abs | within |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["settings"]:
        d, s = r["vs_reference"], r["vs_same_recipe_ort_fp32"]
        within = "reference" if r["name"] == result["reference"] else "✓" if r["within_bounds"] else "✗"
        lines.append(
            f"| {r['recipe']} | {r['setting']} | {', '.join(r['int8']) or '–'} | {r['seconds_per_image']:.4f} | "
            f"{r['unet_seconds_per_image']:.4f} | {r['pixcorr']:.3f} | {r['ssim']:.3f} | {r['clip_2way']:.3f} | "
            f"{d['mean_abs']:.2f} / {d['max_abs']} | {s['mean_abs']:.2f} / {s['max_abs']} | {within} |"
        )
    lines += [
        "",
        "Per-call seconds (median after warm-up, all cores, each model alone), at 1 / 2 rows per call:",
        "",
    ]
    keys = list(dict.fromkeys(k for per in result["per_call_seconds"].values() for k in per))
    lines += ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for model, per in result["per_call_seconds"].items():
        cells = [f"{per[k]['1'] * 1e3:.2f} / {per[k]['2'] * 1e3:.2f} ms" if k in per else "–" for k in keys]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    q = result["quantized"]
    lines += ["", "Quantization: " + "; ".join(
        f"{v['ir'].rsplit('/', 1)[-1]} ({v['mode']}) {v['seconds']} s on {v['calibration_items']} items "
        f"({v['onnx_bytes'] / 1e6:.1f} → {v['ir_bytes'] / 1e6:.1f} MB)" for v in q.values()
    ) + "."]  # fmt: skip
    static = result["static_shape"]
    if static is not None:
        lines += [
            "",
            f"Static-shape compile (`Model.reshape` to batch {static['batch']}) against the dynamic batch, OpenVINO "
            f"{static['openvino']}: {static['calls']} calls on the same input, max abs error against ONNX Runtime "
            "fp32 per call, max change from the first call, seconds per call.",
            "",
            "| model | hint | compile | max error vs ORT per call | max change vs call 1 | ms/call | static speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for model, e in static["models"].items():
            for hint in ("f32", "bf16"):
                for mode in ("dynamic", "static"):
                    c = e[f"{hint} {mode}"]
                    errors = ", ".join(f"{v:.2g}" for v in c["max_error_vs_ort"])
                    lines.append(
                        f"| {model} (scale {e['scale']:.3g}) | {hint} | {mode} | {errors} | "
                        f"{max(c['max_change_vs_first_call']):.2g} | {c['seconds_per_call'] * 1e3:.2f} | "
                        + (f"{e[f'{hint} static_speedup']:.2f}× |" if mode == "static" else "– |")
                    )
    return "\n".join(lines) + "\n"
