"""Stage-1 benchmarks (issue 3): GRU inference (batch 64) and ridge fitting on the demo subject, and how a
real-size ridge (8,859 samples x 15,724 voxels -> 13,344 or 91,168 outputs) grows in time and memory,
measured at reduced sizes and extrapolated. Each measurement runs in its own subprocess (peak = VmHWM).

    python benchmarks/bench_stage1.py --data data/subj01 [--skip-scaling]

Results: benchmarks/results/stage1_bench.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from brainrecon.benchmarks.common import RESULTS, child, machine
from brainrecon.io import write_json

REAL = {"n": 8859, "v": 15724}
REAL_OUTPUTS = (13344, 91168)

CHILD = r"""
import json, sys, time
import numpy as np
from brainrecon.benchmarks.common import peak_gb as hwm_gb
task = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
if task["kind"] == "ridge_synthetic":
    from brainrecon.train.stage1.ridge import RidgeRegressor
    n, v, d = task["n"], task["v"], task["d"]
    X = rng.standard_normal((n, v), dtype=np.float32)
    Y = rng.standard_normal((n, d), dtype=np.float32)
    base = hwm_gb()
    t0 = time.perf_counter()
    RidgeRegressor(5e4).fit(X, Y)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_gb": hwm_gb(), "inputs_gb": base}))
elif task["kind"] == "ridge_demo":
    from brainrecon.train.stage1.ridge import RidgeRegressor
    X = np.load(task["x"]); Y = np.load(task["y"])
    t0 = time.perf_counter()
    RidgeRegressor(5e4).fit(X, Y)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_gb": hwm_gb(), "n": X.shape[0], "v": X.shape[1], "d": Y.shape[1]}))
elif task["kind"] == "gru_infer":
    import torch
    from brainrecon.train.stage1.gru import GRUMapper, GRUMapperConfig
    model = GRUMapper(GRUMapperConfig(n_voxels=task["v"], n_outputs=task["d"])).eval()
    x = torch.from_numpy(rng.standard_normal((64, task["v"]), dtype=np.float32))
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(task["repeats"]):
            t0 = time.perf_counter(); model(x); times.append(time.perf_counter() - t0)
    print(json.dumps({"median_ms": 1000 * float(np.median(times)), "peak_gb": hwm_gb(),
                      "parameters": sum(p.numel() for p in model.parameters())}))
"""


def run_child(task: dict) -> dict:
    """One measurement in a fresh interpreter (its peak memory its own)."""
    result = child(["-c", CHILD, json.dumps(task)])
    if "error" in result:
        raise SystemExit(f"benchmark child {task} failed: {result['error']}")
    return result


def fit_power_law(sizes: list[float], values: list[float]) -> tuple[float, float]:
    """values ~ a * sizes**b, least squares in log-log."""
    b, log_a = np.polyfit(np.log(sizes), np.log(values), 1)
    return float(np.exp(log_a)), float(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path("data/subj01"), help="recon-prepare folder (demo subject)"
    )
    parser.add_argument("--skip-scaling", action="store_true", help="skip the real-size ridge extrapolation")
    parser.add_argument("--out", type=Path, default=RESULTS / "stage1_bench.json")
    args = parser.parse_args()
    results: dict = {"machine": machine()}

    # Demo subject: GRU inference at batch 64 and ridge fitting, with the demo's latent sizes (small64, K=13).
    betas = np.load(args.data / "train_betas.npy")
    n, v = betas.shape
    d = 11296  # small64, K=13
    results["gru_infer_batch64_demo"] = run_child({"kind": "gru_infer", "v": v, "d": d, "repeats": 20})
    results["gru_infer_batch64_real_size"] = run_child(
        {"kind": "gru_infer", "v": REAL["v"], "d": 13344, "repeats": 10}
    )
    print(
        "GRU inference, batch 64:", results["gru_infer_batch64_demo"], results["gru_infer_batch64_real_size"]
    )
    tmp = Path(args.data) / ".bench_latents.npy"
    np.save(tmp, np.random.default_rng(0).standard_normal((n, d), dtype=np.float32))
    try:
        results["ridge_fit_demo"] = run_child(
            {"kind": "ridge_demo", "x": str(args.data / "train_betas.npy"), "y": str(tmp)}
        )
    finally:
        tmp.unlink()
    print("ridge fit, demo:", results["ridge_fit_demo"])

    if not args.skip_scaling:
        scaling = {}
        for d_real in REAL_OUTPUTS:
            fractions = (0.125, 0.25, 0.5) if d_real == 13344 else (0.0625, 0.125, 0.25)
            rows = []
            for f in fractions:
                size = {"n": int(REAL["n"] * f), "v": int(REAL["v"] * f), "d": int(d_real * f)}
                rows.append({"fraction": f, **size, **run_child({"kind": "ridge_synthetic", **size})})
                print(f"ridge {size}: {rows[-1]['seconds']:.1f} s, peak {rows[-1]['peak_gb']:.2f} GB")
            a_t, b_t = fit_power_law([r["fraction"] for r in rows], [r["seconds"] for r in rows])
            a_m, b_m = fit_power_law([r["fraction"] for r in rows], [r["peak_gb"] for r in rows])
            # Dominant arrays at full size (float64 Xc and Gram, one float64 chunk of Y, float32 weights).
            n_, v_ = REAL["n"], REAL["v"]
            analytic_gb = (
                n_ * v_ * 8
                + n_ * n_ * 8
                + n_ * 8192 * 8 * 2
                + v_ * d_real * 4
                + n_ * v_ * 4
                + n_ * d_real * 4
            ) / 2**30
            scaling[str(d_real)] = {
                "measured": rows,
                "time_exponent": round(b_t, 2),
                "extrapolated_seconds": round(a_t, 1),
                "memory_exponent": round(b_m, 2),
                "extrapolated_peak_gb": round(a_m, 2),
                "analytic_peak_gb": round(analytic_gb, 2),
                "fits_24_gb": analytic_gb < 24,
            }
            print(f"real size -> {d_real}: ~{a_t:.0f} s, peak ~{a_m:.1f} GB (analytic {analytic_gb:.1f} GB)")
        results["ridge_real_size_scaling"] = scaling
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
