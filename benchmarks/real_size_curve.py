"""A real-size model as a curve over batch sizes (issue 13), by default the UNet step: Versatile Diffusion's
dual-guided UNet (1.13 B parameters, 64×64×4 latents, 257 + 77 context tokens of 768; random weights,
`benchmarks/real_size.py`), in torch eager fp32, torch's faster CPU modes and the runtime's engines on the file
`real_size.py --keep` exported.

    python benchmarks/real_size.py --only unet --keep      # once: engines/real-size/unet.fp32.onnx
    python benchmarks/real_size_curve.py --batches 1,2,4 --out benchmarks/results/real_size_unet_curve.json

Pipelines (PIPELINES), one subprocess each, one after the other: the model is 4.5 GB in fp32, so two of them side by
side would measure the machine's memory, not the engines; each subprocess's peak resident memory (VmHWM) is its own.
    torch            torch eager fp32, the reference
    torch_bf16       the same under bf16 autocast (AMX on these Xeons)
    torch_compile_bf16   torch.compile + bf16 autocast (the demo's fastest torch mode); its first call is the compile
    ort_fp32         ONNX Runtime fp32 (the runtime's OrtBackend, all graph optimisations)
    openvino_bf16    OpenVINO at bf16 on the same fp32 file (the runtime's OpenVinoBackend)
Per batch size B (rows per call; a guided UNet step of one image is B = 2): a warm-up call, then `repeats` calls:
p50 and p95 seconds, rows/s and, for the UNet, the seconds per image of a 37-step guided run that rows/s implies. Each pipeline's
output at the first batch size is compared with torch eager fp32's (max and median |diff| over its max |value|).
Latency does not depend on the weights' values; the seeded random weights make the outputs comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PIPELINES = ("torch", "torch_bf16", "torch_compile_bf16", "ort_fp32", "openvino_bf16")
STEPS_PER_IMAGE = 37  # Versatile Diffusion's guided steps at strength 0.75 of 50 (Brain-Diffuser)


def inputs(model: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The model contract's sample inputs at `batch` rows (the UNet's contexts from real_size's context pool)."""
    from real_size import build_contract_only

    built = build_contract_only(model)
    return built.contract.sample_input(batch, built.contract.input_kinds[-1], seed=seed, pools=built.pools)


def _runner(model: str, name: str, work: Path, threads: int) -> Any:
    """A callable taking the inputs dict and returning the model's (first) output as float32 numpy."""
    if name.startswith("torch"):
        import torch
        from real_size import build_model

        torch.set_num_threads(threads)
        built = build_model(model)
        names = [spec.name for spec in built.contract.inputs]
        call = torch.compile(built.module) if name == "torch_compile_bf16" else built.module
        bf16 = name.endswith("bf16")

        def run(x: dict[str, np.ndarray]) -> np.ndarray:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = call(*(torch.from_numpy(x[k]) for k in names))
            return (out[0] if isinstance(out, tuple | list) else out).float().numpy()

        return run
    path = work / f"{model}.fp32.onnx"
    if not path.exists():
        raise SystemExit(
            f"error: {path} not found; export it with: python benchmarks/real_size.py --only {model} --keep"
        )
    if name == "ort_fp32":
        from brainrecon.runtime.backends.ort import OrtBackend

        backend = OrtBackend(path, device="cpu", threads=threads)
    elif name == "openvino_bf16":
        from brainrecon.runtime.backends.openvino import OpenVinoBackend

        backend = OpenVinoBackend(path, precision="bf16", threads=threads)
    else:
        raise SystemExit(f"error: unknown pipeline {name!r}; expected one of {', '.join(PIPELINES)}")
    return lambda x: next(iter(backend.run(x).values()))


def measure(
    model: str, name: str, work: Path, batches: list[int], repeats: int, threads: int
) -> dict[str, Any]:
    """One pipeline, in this process: load, then per batch a warm-up and `repeats` timed calls."""
    from real_size import peak_gb

    t0 = time.perf_counter()
    run = _runner(model, name, work, threads)
    out: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 1), "batches": {}}
    for i, b in enumerate(batches):
        x = inputs(model, b)
        t0 = time.perf_counter()
        y = run(x)
        first = time.perf_counter() - t0
        if i == 0:
            np.save(work / f"curve_{model}_{name}.npy", y)  # compared with torch eager's by the driver
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
        p50 = float(np.percentile(times, 50))
        out["batches"][str(b)] = {
            "p50_s": round(p50, 3),
            "p95_s": round(float(np.percentile(times, 95)), 3),
            "first_call_s": round(first, 2),
            "rows_per_s": round(b / p50, 3),
        }
        if model == "unet":
            out["batches"][str(b)]["s_per_image_37_steps"] = round(2 * STEPS_PER_IMAGE * p50 / b, 1)
        print(f"{name} B={b}: p50 {p50:.2f} s (first {first:.1f} s)", file=sys.stderr, flush=True)
    out["peak_gb"] = peak_gb()
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return out


def errors(model: str, work: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """max and median |output − torch eager fp32| over torch's max |value|, at the first batch size."""
    ref = np.load(work / f"curve_{model}_torch.npy").astype(np.float64)
    scale = float(np.abs(ref).max())
    out = {}
    for name in names:
        d = np.abs(np.load(work / f"curve_{model}_{name}.npy").astype(np.float64) - ref)
        out[name] = {
            "max_over_scale": float(f"{d.max() / scale:.3g}"),
            "median_over_scale": float(f"{np.median(d) / scale:.3g}"),
        }
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Seconds per call and rows/s against the batch size, one line per pipeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from runtime_vs_torch import label_axes

    batches = result["batches"]
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in result["pipelines"].items():
        if "batches" not in r:
            continue
        got = [b for b in batches if str(b) in r["batches"]]
        p50 = [r["batches"][str(b)]["p50_s"] for b in got]
        p95 = [r["batches"][str(b)]["p95_s"] for b in got]
        (line,) = ax_lat.plot(got, p50, marker="o", label=name)
        ax_lat.fill_between(got, p50, p95, color=line.get_color(), alpha=0.15)
        ax_thr.plot(got, [r["batches"][str(b)]["rows_per_s"] for b in got], marker="o", label=name)
    label_axes(
        ((ax_lat, "seconds per call (p50; band to p95)"), (ax_thr, "rows / s (at p50)")),
        batches,
        "batch (rows per call; a guided UNet step of one image = 2)",
    )
    ax_thr.legend(fontsize=8)
    fig.suptitle(f"Real-size {result['model']}, CPU, {result['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="unet", help="a real_size.py model with a torch module (default unet)")
    p.add_argument("--batches", default="1,2,4", help="rows per call, comma-separated")
    p.add_argument("--pipelines", default=",".join(PIPELINES), help=f"some of {','.join(PIPELINES)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument(
        "--work", type=Path, default=ROOT / "engines/real-size", help="real_size.py --keep's files"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/real_size_unet_curve.json")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the curves (default: --out with .png)")
    p.add_argument("--pipeline", help=argparse.SUPPRESS)  # a subprocess of the driver
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.pipeline:
        print(json.dumps(measure(args.model, args.pipeline, args.work, batches, args.repeats, args.threads)))
        return 0

    from brainrecon.io import write_json
    from brainrecon.manifest import producer_versions

    names = [n for n in args.pipelines.split(",") if n]
    unknown = sorted(set(names) - set(PIPELINES))
    if unknown or "torch" not in names:
        p.error(f"--pipelines: expected torch and some of {','.join(PIPELINES)}, found {args.pipelines!r}")
    result: dict[str, Any] = {
        "command": "python benchmarks/real_size_curve.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "threads": args.threads,
        "repeats": args.repeats,
        "batches": batches,
        "versions": producer_versions(),
        "pipelines": {},
    }
    for name in names:
        print(f"[{args.model} curve] {name} ...", file=sys.stderr, flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--pipeline",
            name,
            "--batches",
            args.batches,
            "--repeats",
            str(args.repeats),
        ]
        cmd += ["--threads", str(args.threads), "--work", str(args.work), "--model", args.model]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        lines = proc.stdout.strip().splitlines()
        result["pipelines"][name] = (
            json.loads(lines[-1])
            if proc.returncode == 0 and lines
            else {"error": f"exited {proc.returncode}"}
        )
        write_json(args.out, result)  # after every pipeline: an interrupted run keeps what it measured
    done = [n for n in names if "batches" in result["pipelines"][n]]
    if "torch" in done:
        result["error_vs_torch_fp32"] = errors(args.model, args.work, done)
        ref = result["pipelines"]["torch"]["batches"]
        for name in done:
            for b, r in result["pipelines"][name]["batches"].items():
                if b in ref:
                    r["speedup_vs_torch"] = round(ref[b]["p50_s"] / r["p50_s"], 2)
    write_json(args.out, result)
    plot(result, args.plot or args.out.with_suffix(".png"))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
