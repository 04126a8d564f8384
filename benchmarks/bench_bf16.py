"""bf16 on AMX vs fp32, per exported model: the runtime's ONNX Runtime backend at fp32 and its OpenVINO backend at f32
and bf16 on the same fp32 ONNX file, interleaved, at several batch sizes; latency medians, their ratios, and the
output error against ONNX Runtime fp32 (max and median |diff| over the output's scale, max |value|). Torch-free.

    python benchmarks/bench_bf16.py --onnx engines/subj01/onnx/unet_kv.fp32.onnx:32 \\
        engines/subj01/onnx/vae_decoder.fp32.onnx:16 --section demo --out benchmarks/results/stage2_runtime_bf16.json

Each file is `path:batch[,batch...]`. Inputs: `timestep` integer-valued in [1, 1000), `encoder_hidden_states` and
K/V tensors N(0, 0.1²) (CLIP-token scale), everything else N(0, 1) (latents, z-scored betas).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.benchmarks.common import RESULTS, machine

SMALL_SCALE_INPUTS = ("encoder_hidden_states", "key_", "value_")


def make_inputs(session: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in spec.shape]
        if spec.name == "timestep":
            x = rng.integers(1, 1000, size=shape).astype(np.float32)
        elif spec.name.startswith(SMALL_SCALE_INPUTS):
            x = 0.1 * rng.standard_normal(shape)
        else:
            x = rng.standard_normal(shape)
        feeds[spec.name] = x.astype(np.float32)
    return feeds


def bench_file(path: Path, batches: list[int], threads: int, repeats: int) -> dict[str, Any]:
    from brainrecon.runtime.backends.openvino import OpenVinoBackend
    from brainrecon.runtime.backends.ort import OrtBackend

    backends = {"ort_fp32": OrtBackend(path, threads=threads)}
    hints = {
        "openvino_f32": "fp32",
        "openvino_bf16": "bf16",
    }  # OpenVINO's INFERENCE_PRECISION_HINT, f32 or bf16
    backends |= {name: OpenVinoBackend(path, precision=p, threads=threads) for name, p in hints.items()}
    out: dict[str, Any] = {"file": str(path), "size_mb": round(path.stat().st_size / 2**20, 1), "batches": {}}
    for batch in batches:
        feeds = make_inputs(backends["ort_fp32"].session, batch)
        first = {name: next(iter(b.run(feeds).values())) for name, b in backends.items()}  # warm-up, compared
        times: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(repeats):
            for name, backend in backends.items():
                t0 = time.perf_counter()
                backend.run(feeds)
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        ref = first["ort_fp32"].astype(np.float64)
        scale = float(np.abs(ref).max())

        def err(x: np.ndarray, ref: np.ndarray = ref, scale: float = scale) -> dict[str, float]:
            d = np.abs(x.astype(np.float64) - ref)
            return {
                "max_over_scale": float(f"{d.max() / scale:.3g}"),
                "median_over_scale": float(f"{np.median(d) / scale:.3g}"),
            }

        row = {"median_s": {k: round(v, 5) for k, v in med.items()}}
        row["speedup_vs_ort_fp32"] = {k: round(med["ort_fp32"] / v, 2) for k, v in med.items()}
        row["bf16_vs_openvino_f32"] = round(med["openvino_f32"] / med["openvino_bf16"], 2)
        row["output_scale"] = round(scale, 4)
        row["error_vs_ort_fp32"] = {k: err(first[k]) for k in hints}
        out["batches"][str(batch)] = row | {"loadavg_1m": round(os.getloadavg()[0], 2)}
        print(path.name, batch, row["speedup_vs_ort_fp32"], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onnx", nargs="+", required=True, help="path:batch[,batch...] per fp32 ONNX file")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "stage2_runtime_bf16.json")
    parser.add_argument("--note", default="")
    parser.add_argument("--section", help="write the results as this section of --out (e.g. demo, real_size)")
    args = parser.parse_args()
    from brainrecon.io import write_json

    info = machine(args.threads)
    results: dict[str, Any] = {"machine": info, "repeats": args.repeats, "note": args.note, "models": {}}
    for item in args.onnx:
        path, _, batches = item.partition(":")
        results["models"][Path(path).name] = bench_file(
            Path(path), [int(b) for b in (batches or "1").split(",")], args.threads, args.repeats
        )
        written = {"versions": info["versions"], "threads": args.threads}
        if args.section:  # the file's other sections stay
            written = (json.loads(args.out.read_text()) if args.out.exists() else {}) | written
        write_json(args.out, written | ({args.section: results} if args.section else results))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
