"""Stage-1 runtime benchmark: export time and file sizes (fp32, fp16), the runtime (`Reconstructor`, ONNX Runtime)
against the torch reference on the same betas, `recon-infer` end to end, import and ONNX Runtime session times.

    python benchmarks/bench_stage1_runtime.py --model-dir engines/subj01 --betas data/subj01/test_betas.npy \\
        [--repeats 3] [--export-in-place] [--out benchmarks/results/stage1_runtime.json]

The export runs on a copy of the model directory (its ONNX, engines and manifest left out) unless
`--export-in-place`; inference then uses the exported copy. Every timing is wall clock: the first call and the median
of `--repeats` further calls. Torch and ONNX Runtime use their default thread counts.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.benchmarks.common import RESULTS, machine, timed
from brainrecon.io import load_npy, read_json, write_json


def bench_export(model_dir: Path, work: Path, in_place: bool) -> tuple[Path, dict[str, Any]]:
    """recon-export's routine on the stage-1 models, timed; per file its size, export seconds and parity."""
    from brainrecon.export.subject import export_model_dir

    target = model_dir
    if not in_place:
        target = work / model_dir.name
        shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("onnx", "trt", "manifest.json"))
    t0 = time.perf_counter()
    summary = export_model_dir(target, stage="stage1", precision="both")
    artifacts = [
        {"model": e["model"], "precision": e["precision"], "megabytes": round(e["bytes"] / 1e6, 3)}
        | {"export_s": e["export_seconds"], "validation_max_abs": e["validation"]["max_abs"]}
        | {"validation_median_abs": e["validation"]["median_abs"]}
        for e in summary["exported"]
    ]
    total = round(time.perf_counter() - t0, 2)
    return target, {"total_s_with_validation": total, "artifacts": artifacts, "engines": summary["engines"]}


def bench_inference(model_dir: Path, betas: np.ndarray, betas_path: Path, repeats: int, work: Path) -> dict:
    """The torch reference, then the runtime at fp32 and fp16 (public API), then recon-infer as a user runs it."""
    import torch

    from brainrecon.runtime import Reconstructor, RuntimeOptions
    from brainrecon.train.reference import Stage1Model

    reference = Stage1Model.load(model_dir)
    images: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {"torch": timed(lambda: images.update(torch=reference.reconstruct(betas)), repeats)}
    out["torch"]["threads"] = torch.get_num_threads()
    for precision in ("fp32", "fp16"):
        with Reconstructor.open(model_dir, RuntimeOptions(engine="ort", precision=precision), stage=1) as rec:
            last: dict[str, Any] = {}
            stats = timed(lambda rec=rec, last=last: last.update(r=rec.reconstruct(betas)), repeats)
        diff = np.abs(last["r"].images.astype(int) - images["torch"].astype(int))
        out[f"ort_{precision}"] = stats | {
            "speedup_vs_torch_median": round(out["torch"]["median_s"] / stats["median_s"], 2),
            "step_s_last_run": last["r"].timings,
            "providers": last["r"].providers,
            "pixel_diff_vs_torch": {"mean": round(float(diff.mean()), 4), "max": int(diff.max())},
        }
    # recon-infer end to end, as a user runs it (interpreter start, manifest verification, PNGs, contact sheet)
    cmd = [Path(sys.executable).parent / "recon-infer", betas_path, "--model-dir", model_dir, "--stage", "1"]
    t0 = time.perf_counter()
    subprocess.run([*map(str, cmd), "--out", str(work / "recon-infer-out")], check=True, capture_output=True)
    out["recon_infer_ort_fp32_end_to_end_s"] = round(time.perf_counter() - t0, 3)
    out["recon_infer_timings"] = read_json(work / "recon-infer-out" / "summary.json")["timings"]
    return out


def bench_sessions(model_dir: Path, repeats: int) -> dict[str, float]:
    """Median seconds to open each exported file in the runtime's ONNX Runtime backend."""
    from brainrecon.manifest import load_manifest
    from brainrecon.runtime.backends.ort import OrtBackend

    onnx = [a for a in load_manifest(model_dir).artifacts if a.kind == "onnx"]
    return {
        f"{a.model}.{a.precision}": timed(lambda a=a: OrtBackend(model_dir / a.path), repeats)["median_s"]
        for a in onnx
    }


def import_seconds(code: str, repeats: int) -> float:
    """Median wall time of `python -c code` in fresh interpreters (what a user pays per command)."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        runs.append(time.perf_counter() - t0)
    return round(statistics.median(runs), 3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--betas", type=Path, required=True, help="z-scored betas .npy (test_betas.npy)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--export-in-place", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "stage1_runtime.json")
    parser.add_argument("--note", default="", help="How the model dir was made (recorded with the results).")
    args = parser.parse_args()

    betas = load_npy(args.betas, "z-scored betas")
    results: dict[str, Any] = {"machine": machine(), "model_dir": str(args.model_dir), "note": args.note}
    results |= {"betas": {"path": str(args.betas), "shape": list(betas.shape)}, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="bench-stage1-") as tmp:
        model_dir, results["export"] = bench_export(args.model_dir, Path(tmp), args.export_in_place)
        results["inference"] = bench_inference(model_dir, betas, args.betas, args.repeats, Path(tmp))
        results["ort_session_creation_median_s"] = bench_sessions(model_dir, args.repeats)
    imports = {
        "brainrecon.runtime": "import brainrecon.runtime",
        "brainrecon.runtime.Reconstructor + onnxruntime": "from brainrecon.runtime import Reconstructor; import onnxruntime",
        "brainrecon.train.reference (torch reference)": "import brainrecon.train.reference",
    }
    results["import_s_median"] = {name: import_seconds(code, args.repeats) for name, code in imports.items()}
    write_json(args.out, results)
    inf = results["inference"]
    print(
        f"torch {inf['torch']['median_s']:.3f} s | ORT fp32 {inf['ort_fp32']['median_s']:.3f} s "
        f"({inf['ort_fp32']['speedup_vs_torch_median']}x) | ORT fp16 {inf['ort_fp16']['median_s']:.3f} s "
        f"({inf['ort_fp16']['speedup_vs_torch_median']}x) -> {args.out}"
    )


if __name__ == "__main__":
    main()
