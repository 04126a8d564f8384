"""bf16 on AMX vs fp32, per exported model (issue 13): ONNX Runtime fp32, OpenVINO f32 and OpenVINO bf16 on the same
fp32 ONNX file, interleaved, at several batch sizes; latency medians, their ratios, and the bf16 output error
against fp32 (max and median |diff| over the output's scale, max |value|). Torch-free.

    python benchmarks/bench_bf16.py --onnx engines/subj01/onnx/unet_kv.fp32.onnx:32 \\
        engines/subj01/onnx/vae_decoder.fp32.onnx:16 engines/real-size/vdvae_decoder_k15.fp32.onnx:4 \\
        --out benchmarks/results/stage2_runtime_bf16.json

Each file is `path:batch[,batch...]`. Inputs: `timestep` integer-valued in [1, 1000), `encoder_hidden_states` and
K/V tensors N(0, 0.1²) (CLIP-token scale), everything else N(0, 1) (latents, z-scored betas). OpenVINO runs with
INFERENCE_PRECISION_HINT set explicitly (runtime/backends/openvino.py); ONNX Runtime with all graph optimisations.
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
    import onnxruntime as ort
    import openvino as ov

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    core = ov.Core()
    compiled = {
        hint: core.compile_model(
            str(path),
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": hint,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": threads,
            },
        )
        for hint in ("f32", "bf16")
    }
    requests = {hint: c.create_infer_request() for hint, c in compiled.items()}
    out: dict[str, Any] = {"file": str(path), "size_mb": round(path.stat().st_size / 2**20, 1), "batches": {}}
    for batch in batches:
        feeds = make_inputs(session, batch)
        runs = {
            "ort_fp32": lambda f=feeds: session.run(None, f)[0],
            "openvino_f32": lambda f=feeds: np.asarray(requests["f32"].infer(f)[0]),
            "openvino_bf16": lambda f=feeds: np.asarray(requests["bf16"].infer(f)[0]),
        }
        first = {name: run() for name, run in runs.items()}  # warm-up, and the outputs compared
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
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

        out["batches"][str(batch)] = {
            "median_s": {k: round(v, 5) for k, v in med.items()},
            "speedup_vs_ort_fp32": {k: round(med["ort_fp32"] / v, 2) for k, v in med.items()},
            "bf16_vs_openvino_f32": round(med["openvino_f32"] / med["openvino_bf16"], 2),
            "output_scale": round(scale, 4),
            "error_vs_ort_fp32": {k: err(first[k]) for k in ("openvino_f32", "openvino_bf16")},
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }
        print(path.name, batch, out["batches"][str(batch)]["speedup_vs_ort_fp32"], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onnx", nargs="+", required=True, help="path:batch[,batch...] per fp32 ONNX file")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "stage2_runtime_bf16.json"
    )
    parser.add_argument("--note", default="")
    parser.add_argument(
        "--section",
        default=None,
        help="write the results as this section of --out (e.g. demo, real_size), keeping the file's others",
    )
    args = parser.parse_args()
    import onnxruntime
    import openvino

    results: dict[str, Any] = {
        "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__},
        "threads": args.threads,
        "repeats": args.repeats,
        "note": args.note,
        "models": {},
    }
    for item in args.onnx:
        path, _, batches = item.partition(":")
        results["models"][Path(path).name] = bench_file(
            Path(path), [int(b) for b in (batches or "1").split(",")], args.threads, args.repeats
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        written = results
        if args.section:
            written = json.loads(args.out.read_text()) if args.out.exists() else {}
            shared = ("versions", "threads")
            written.update({k: results[k] for k in shared})
            written[args.section] = {k: v for k, v in results.items() if k not in shared}
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(written, indent=2) + "\n")
        os.replace(tmp, args.out)  # after every model: an interrupted run keeps what it measured
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
