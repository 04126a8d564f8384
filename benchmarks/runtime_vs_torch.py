"""Two-stage benchmark: the torch-free runtime (ONNX Runtime fp32, fp16) vs the torch reference pipeline on the same
exported model directory, the same betas and sampling settings, with the per-stage split (`recon-bench`,
benchmarks/bench_stage2_runtime.py).

Each repeat runs ORT fp32, ORT fp16 and torch back to back, so the three share the machine's load; the medians
and their ratios are what is reported (machines here are noisy: compare ratios, not seconds). Both frameworks get
the same thread count and the same images per UNet call. `check` compares the speedups with the floors of a
targets file (CI's regression check, `make bench-check`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.io import read_json
from brainrecon.manifest import producer_versions
from brainrecon.model_dir import STAGE2_SUMMARY

STAGES = ("stage1_s", "clip_s", "vae_encode_s", "unet_s", "vae_decode_s", "total_s")


class TorchReference:
    """`Stage2Model.reconstruct`, stage by stage, so its time splits like the runtime's (same calls inside)."""

    def __init__(self, model_dir: Path):
        from brainrecon.train.stage2.fit import Stage2Model

        self.model = Stage2Model.load(model_dir)

    def run(self, betas: np.ndarray, batch: int) -> tuple[np.ndarray, dict[str, float]]:
        """`batch` images per VAE/UNet call (the UNet sees 2 x batch rows), as the runtime splits them."""
        import torch

        from brainrecon.images import resize
        from brainrecon.noise import img2img_noise
        from brainrecon.train.foundations.dual_unet import dual_context, set_mix_ratio
        from brainrecon.train.stage2.img2img import decode_latents, denoise, encode_images, vd_scheduler

        m, s = self.model, self.model.sampling
        parts = [slice(i, i + batch) for i in range(0, len(betas), batch)]
        t: dict[str, float] = {}
        t_all = t0 = time.perf_counter()
        stage1 = m.stage1.reconstruct(betas)
        t["stage1_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        contexts = m.predict_contexts(betas)
        cond = dual_context(
            torch.from_numpy(contexts["vision"]), torch.from_numpy(contexts["text"]), m.dual_config
        )
        t["clip_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        init = resize(stage1, m.image_size)
        latents = torch.cat([encode_images(m.vae, init[p], s.vae_scale_factor) for p in parts])
        t["vae_encode_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        uncond = dual_context(
            torch.from_numpy(m.uncond["vision"]), torch.from_numpy(m.uncond["text"]), m.dual_config
        )
        set_mix_ratio(m.unet, s.mix_ratio)
        noise = torch.from_numpy(img2img_noise(tuple(latents.shape), s.seed))
        latents = torch.cat(
            [denoise(m.unet, vd_scheduler(), latents[p], cond[p], uncond, s, noise[p]) for p in parts]
        )
        t["unet_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        images = np.concatenate([decode_latents(m.vae, latents[p], s.vae_scale_factor) for p in parts])
        t["vae_decode_s"] = time.perf_counter() - t0
        t["total_s"] = time.perf_counter() - t_all
        return images, t


def median_timings(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in STAGES}


def bench(model_dir: Path, betas: np.ndarray, repeats: int, threads: int) -> dict[str, Any]:
    import torch

    from brainrecon.runtime.api import Reconstructor, RuntimeOptions

    torch.set_num_threads(threads)
    reference = TorchReference(model_dir)
    pipes = {
        p: Reconstructor.open(model_dir, RuntimeOptions(precision=p, threads=threads), stage=2)
        for p in ("fp32", "fp16")
    }
    runs: dict[str, list[dict[str, float]]] = {"torch": [], "ort_fp32": [], "ort_fp16": []}
    images: dict[str, np.ndarray] = {}
    last: dict[str, Any] = {}
    for i in range(repeats + 1):  # the first round warms up (sessions, caches) and is not counted
        results = {p: pipe.reconstruct(betas) for p, pipe in pipes.items()}
        batch = results["fp32"].batch_sizes[
            "unet"
        ]  # images per UNet call in the runtime: torch gets the same
        ref_images, ref_t = reference.run(betas, batch)
        last = {f"ort_{p}": r for p, r in results.items()}
        if i == 0:
            images = {"torch": ref_images, **{f"ort_{p}": r.images for p, r in results.items()}}
            continue
        runs["torch"].append(ref_t)
        for p, r in results.items():
            runs[f"ort_{p}"].append({k: r.timings[k] for k in STAGES})
    for pipe in pipes.values():
        pipe.close()
    medians = {name: median_timings(r) for name, r in runs.items()}
    out: dict[str, Any] = {"median_s": medians}
    for name in ("ort_fp32", "ort_fp16"):
        diff = np.abs(images[name].astype(int) - images["torch"].astype(int))
        out[name] = {
            "speedup_vs_torch": {
                k: round(medians["torch"][k] / max(medians[name][k], 1e-9), 2) for k in STAGES
            },
            "pixel_diff_vs_torch": {
                "mean": round(float(diff.mean()), 4),
                "max": int(diff.max()),
                "mean_over_255": round(float(diff.mean()) / 255, 6),
            },
            "providers": sorted({p for ps in last[name].providers.values() for p in ps}),
        }
    out["images_per_second"] = {name: round(len(betas) / medians[name]["total_s"], 2) for name in runs}
    return out


def check(results: dict[str, Any], targets_path: Path) -> list[str]:
    """Speedup floors: {"ort_fp32": {"total_s": 2.0, ...}, ...} -> the list of misses (empty = pass)."""
    targets = json.loads(targets_path.read_text())["stage2_speedup_floor"]
    misses = []
    for name, floors in targets.items():
        for stage, floor in floors.items():
            found = results["inference"][name]["speedup_vs_torch"][stage]
            if found < floor:
                misses.append(f"{name} {stage}: speedup vs torch {found} < floor {floor}")
    return misses


def run_benchmark(
    model_dir: Path, betas: np.ndarray, repeats: int, threads: int, note: str = ""
) -> dict[str, Any]:
    """The whole results record: machine, versions, sampling, medians, speedups, pixel differences."""
    inference = bench(model_dir, betas, repeats, threads)
    stage2 = read_json(model_dir / STAGE2_SUMMARY, "stage-2 summary")
    return {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "threads": threads,
        },
        "versions": producer_versions(),
        "model_dir": str(model_dir),
        "note": note,
        "betas": {"shape": list(betas.shape)},
        "sampling": stage2["sampling"],
        "repeats": repeats,
        "inference": inference,
    }


def summary_line(results: dict[str, Any]) -> str:
    inf = results["inference"]
    med = inf["median_s"]
    return (
        f"{results['betas']['shape'][0]} images: torch {med['torch']['total_s']:.2f} s | "
        f"ORT fp32 {med['ort_fp32']['total_s']:.2f} s ({inf['ort_fp32']['speedup_vs_torch']['total_s']}x) | "
        f"ORT fp16 {med['ort_fp16']['total_s']:.2f} s ({inf['ort_fp16']['speedup_vs_torch']['total_s']}x)"
    )


def bench_and_write(
    model_dir: Path,
    betas_path: Path,
    out: Path,
    limit: int | None = None,
    repeats: int = 3,
    threads: int | None = None,
    targets: Path | None = None,
    note: str = "",
) -> tuple[str, list[str]]:
    """What `recon-bench` and benchmarks/bench_stage2_runtime.py do: benchmark, write `out`, compare with the
    floors of `targets` when given. Returns (summary line, floor misses)."""
    from brainrecon.io import load_npy, write_json

    betas = load_npy(betas_path, "z-scored betas")[:limit]
    results = run_benchmark(model_dir, betas, repeats, threads or len(os.sched_getaffinity(0)), note)
    results["betas"]["path"] = str(betas_path)
    write_json(out, results)
    return f"{summary_line(results)} -> {out}", check(results, targets) if targets is not None else []
