"""The K/V-once UNet step at real size (issue 13): Versatile Diffusion's dual UNet (1.13 B parameters, random
weights, `benchmarks/real_size.py`) exported as `unet_kv` (the step on precomputed cross-attention K/V, with the
fused dual block of `train/foundations/dual_unet.py`), against the plain `unet` file `real_size.py --keep` wrote,
in ONNX Runtime fp32 on the CPU, on one guided step of one image (2 rows: unconditional and conditional context).

    python benchmarks/real_size.py --only unet --keep          # once: engines/real-size/unet.fp32.onnx
    python benchmarks/real_size_kv_step.py --out benchmarks/results/real_size_unet_kv_step.json

Both graphs get the same sample, timestep and contexts (the K/V computed from them in torch), so their outputs are
compared too. One session of the 1.13 B UNet holds about 14 GB, so two cannot be open side by side on 24 GB: each
timing is a subprocess that loads one graph, makes a warm-up call and `--repeats` timed calls, and the two graphs
alternate `--rounds` times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def export_kv(work: Path) -> dict[str, float]:
    """Build the real-size dual UNet, write unet_kv.fp32.onnx and both graphs' inputs into `work`."""
    import torch
    from real_size import IMAGE_SIZE, LATENT_SIZE, MIX_RATIO, build_model, context_pool

    from brainrecon.export import contracts as C
    from brainrecon.export.kv_once import context_kv
    from brainrecon.export.onnx_export import EXTERNAL_DATA_THRESHOLD, export_torchscript
    from brainrecon.export.stage2 import UNetKVGraph, unet_kv_shapes

    t0 = time.perf_counter()
    unet = build_model("unet").module.unet
    build_s = time.perf_counter() - t0
    context = torch.from_numpy(context_pool(0)[[0, 3]])  # the unconditional context, then a predicted one
    with torch.no_grad():
        kv = context_kv(unet, context)
    kv_inputs = {n: t.numpy() for n, t in zip(C.kv_names(len(kv) // 2), kv, strict=True)}
    rng = np.random.default_rng(0)
    step = {
        "sample": rng.standard_normal((2, 4, LATENT_SIZE, LATENT_SIZE)).astype(np.float32),
        "timestep": np.full((2,), 801, np.float32),
    }
    np.savez(work / "kv_step_plain_inputs.npz", **step, encoder_hidden_states=context.numpy())
    np.savez(work / "kv_step_kv_inputs.npz", **step, **kv_inputs)
    contract = C.unet_kv_contract(4, LATENT_SIZE, unet_kv_shapes(unet), MIX_RATIO, IMAGE_SIZE)
    t0 = time.perf_counter()
    export_torchscript(
        UNetKVGraph(unet).eval(), contract, work / "unet_kv.fp32.onnx", EXTERNAL_DATA_THRESHOLD, kv_inputs
    )
    return {"build_s": round(build_s, 1), "export_s": round(time.perf_counter() - t0, 1)}


def time_graph(path: Path, inputs: Path, out: Path, repeats: int, threads: int) -> dict[str, object]:
    """In this process: load, a warm-up call (its output saved to `out`), then `repeats` timed calls."""
    from brainrecon.runtime.backends.ort import OrtBackend

    x = dict(np.load(inputs))
    t0 = time.perf_counter()
    backend = OrtBackend(path, device="cpu", threads=threads)
    load_s = time.perf_counter() - t0
    np.save(out, next(iter(backend.run(x).values())))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.run(x)
        times.append(round(time.perf_counter() - t0, 3))
    return {"load_s": round(load_s, 1), "times_s": times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work", type=Path, default=ROOT / "engines/real-size", help="real_size.py --keep's files"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/real_size_unet_kv_step.json")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--graph", nargs=3, help=argparse.SUPPRESS)  # a subprocess: path, inputs, output
    args = p.parse_args(argv)
    if args.graph:
        path, inputs, out = (Path(a) for a in args.graph)
        print(json.dumps(time_graph(path, inputs, out, args.repeats, args.threads)))
        return 0

    from brainrecon.io import write_json
    from brainrecon.manifest import producer_versions

    plain = args.work / "unet.fp32.onnx"
    if not plain.exists():
        raise SystemExit(
            f"error: {plain} not found; export it with: python benchmarks/real_size.py --only unet --keep"
        )
    export = export_kv(args.work) if not (args.work / "unet_kv.fp32.onnx").exists() else None
    graphs = {
        "plain": (plain, "kv_step_plain_inputs.npz"),
        "kv": (args.work / "unet_kv.fp32.onnx", "kv_step_kv_inputs.npz"),
    }
    times: dict[str, list[float]] = {name: [] for name in graphs}
    loads: dict[str, list[float]] = {name: [] for name in graphs}
    for r in range(args.rounds):
        for name, (path, inputs) in graphs.items():
            cmd = [sys.executable, __file__, "--graph", str(path), str(args.work / inputs)]
            cmd += [str(args.work / f"kv_step_{name}_out.npy"), "--repeats", str(args.repeats)]
            cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            times[name] += result["times_s"]
            loads[name].append(result["load_s"])
            print(f"round {r + 1} {name}: {result['times_s']} s", file=sys.stderr, flush=True)
    a = np.load(args.work / "kv_step_plain_out.npy").astype(np.float64)
    b = np.load(args.work / "kv_step_kv_out.npy").astype(np.float64)
    scale = float(np.abs(a).max())
    medians = {name: float(np.median(t)) for name, t in times.items()}
    write_json(
        args.out,
        {
            "command": "python benchmarks/real_size_kv_step.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "rows": 2,
            "threads": args.threads,
            "versions": producer_versions(),
            "export": export,
            "times_s": times,
            "load_s": loads,
            "median_s": {k: round(v, 3) for k, v in medians.items()},
            "kv_speedup_over_plain": round(medians["plain"] / medians["kv"], 3),
            "kv_vs_plain_error": {
                "max_over_scale": float(np.abs(a - b).max() / scale),
                "median_over_scale": float(np.median(np.abs(a - b)) / scale),
            },
            "loadavg_1m": round(os.getloadavg()[0], 2),
        },
    )
    print(f"plain {medians['plain']:.2f} s, kv {medians['kv']:.2f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
