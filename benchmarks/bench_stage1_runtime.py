"""Stage-1 runtime benchmark (issue: export layer and lean runtime): export time and artifact sizes (fp32, fp16),
ONNX Runtime vs the torch reference on the same betas, runtime import time, ORT session-creation time.
Results: benchmarks/results/stage1_runtime.json.

    python benchmarks/bench_stage1_runtime.py --model-dir engines/subj01 --betas data/subj01/test_betas.npy
        [--repeats 3] [--export-in-place]

The export runs on a copy of the model directory (its ONNX, engines and manifest left out) unless
`--export-in-place`; inference then uses the exported copy. Every timing is wall clock on this machine: the first
("cold") run and the median of `--repeats` further runs. Torch and ONNX Runtime use their default thread counts.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.io import load_npy, write_json
from brainrecon.manifest import producer_versions

RESULTS = Path(__file__).parent / "results" / "stage1_runtime.json"


def timed(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, float], Any]:
    """Cold run, then `repeats` runs; seconds rounded to 0.1 ms."""
    t0 = time.perf_counter()
    result = fn()
    cold = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - t0)
    return {
        "cold_s": round(cold, 4),
        "median_s": round(statistics.median(runs), 4),
        "runs": len(runs),
    }, result


def subprocess_seconds(code: str, repeats: int) -> float:
    """Median wall time of `python -c code` in fresh interpreters (what a user pays per command)."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        runs.append(time.perf_counter() - t0)
    return round(statistics.median(runs), 3)


def bench_export(model_dir: Path, work: Path, in_place: bool) -> tuple[Path, dict[str, Any]]:
    from brainrecon.export.subject import export_model_dir

    target = model_dir
    if not in_place:
        target = work / model_dir.name
        shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("onnx", "trt", "manifest.json"))
    t0 = time.perf_counter()
    summary = export_model_dir(target, stage="all", precision="both")
    seconds = time.perf_counter() - t0
    return target, {
        "total_s_with_validation": round(seconds, 2),
        "artifacts": [
            {
                "model": e["model"],
                "precision": e["precision"],
                "megabytes": round(e["bytes"] / 1e6, 3),
                "export_s": e["export_seconds"],
                "validation_max_abs": e["validation"]["max_abs"],
                "validation_median_abs": e["validation"]["median_abs"],
            }
            for e in summary["exported"]
        ],
        "engines": summary["engines"],
    }


def bench_inference(
    model_dir: Path, betas: np.ndarray, betas_path: Path, repeats: int, work: Path
) -> dict[str, Any]:
    import torch

    from brainrecon.runtime.infer import run_inference
    from brainrecon.runtime.stage1 import Stage1Pipeline
    from brainrecon.train.reference import Stage1Model

    reference = Stage1Model.load(model_dir)
    torch_stats, torch_images = timed(lambda: reference.reconstruct(betas), repeats)
    out: dict[str, Any] = {"torch": {**torch_stats, "threads": torch.get_num_threads()}}
    for precision in ("fp32", "fp16"):
        pipe = Stage1Pipeline.from_model_dir(model_dir, "ort", precision)
        stats, result = timed(lambda pipe=pipe: pipe.run(betas), repeats)
        diff = np.abs(result.images.astype(int) - torch_images.astype(int))
        out[f"ort_{precision}"] = {
            **stats,
            "speedup_vs_torch_median": round(torch_stats["median_s"] / stats["median_s"], 2),
            "step_s_last_run": result.timings,
            "providers": result.providers,
            "pixel_diff_vs_torch": {"mean": round(float(diff.mean()), 4), "max": int(diff.max())},
        }
    # recon-infer end to end (manifest verification, reading, PNGs, contact sheet, summary), one run
    t0 = time.perf_counter()
    summary = run_inference(betas_path, model_dir, work / "recon-infer-out")
    out["recon_infer_ort_fp32_end_to_end_s"] = round(time.perf_counter() - t0, 3)
    out["recon_infer_timings"] = summary["timings"]
    return out


def bench_sessions(model_dir: Path, repeats: int) -> dict[str, float]:
    from brainrecon.manifest import load_manifest
    from brainrecon.runtime.backends.base import ModelIO
    from brainrecon.runtime.backends.ort import OrtBackend

    manifest = load_manifest(model_dir)
    out = {}
    for entry in manifest.artifacts:
        if entry.kind != "onnx":
            continue
        io = ModelIO.from_spec(entry.model, entry.io)
        stats, _ = timed(lambda entry=entry, io=io: OrtBackend(model_dir / entry.path, io), repeats)
        out[f"{entry.model}.{entry.precision}"] = stats["median_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--betas", type=Path, required=True, help="z-scored betas .npy (test_betas.npy)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--export-in-place", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="How the model dir was made (recorded with the results).")
    args = parser.parse_args()

    betas = load_npy(args.betas, "z-scored betas")
    with tempfile.TemporaryDirectory(prefix="bench-stage1-") as tmp:
        work = Path(tmp)
        model_dir, export = bench_export(args.model_dir, work, args.export_in_place)
        inference = bench_inference(model_dir, betas, args.betas, args.repeats, work)
        sessions = bench_sessions(model_dir, args.repeats)
    results = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        },
        "versions": producer_versions(),
        "model_dir": str(args.model_dir),
        "note": args.note,
        "betas": {"path": str(args.betas), "shape": list(betas.shape)},
        "repeats": args.repeats,
        "export": export,
        "inference": inference,
        "ort_session_creation_median_s": sessions,
        "import_s_median": {
            "brainrecon.runtime": subprocess_seconds("import brainrecon.runtime", args.repeats),
            "brainrecon.runtime.stage1 + onnxruntime": subprocess_seconds(
                "import brainrecon.runtime.stage1, onnxruntime", args.repeats
            ),
            "brainrecon.train.reference (torch reference)": subprocess_seconds(
                "import brainrecon.train.reference", args.repeats
            ),
        },
    }
    write_json(args.out, results)
    inf = results["inference"]
    print(
        f"torch {inf['torch']['median_s']:.3f} s | ORT fp32 {inf['ort_fp32']['median_s']:.3f} s "
        f"({inf['ort_fp32']['speedup_vs_torch_median']}x) | ORT fp16 {inf['ort_fp16']['median_s']:.3f} s "
        f"({inf['ort_fp16']['speedup_vs_torch_median']}x) -> {args.out}"
    )


if __name__ == "__main__":
    main()
