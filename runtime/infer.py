"""`recon-infer` as an importable function: betas file → stage-1 images, contact sheet and summary, atomically.

Every check runs before the expensive work (model hashes, betas shape/dtype/NaN, trial selection, batch against the
engine profiles, ground truth); the output folder appears only when complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import InputError
from brainrecon.images import check_images, contact_sheet, save_png
from brainrecon.io import atomic_dir, load_npy, write_json
from brainrecon.manifest import producer_versions
from brainrecon.runtime.inputs import load_betas, parse_trials
from brainrecon.runtime.stage1 import Stage1Pipeline


def run_inference(
    betas_path: str | Path,
    model_dir: str | Path,
    out: str | Path,
    engine: str = "ort",
    stage: int = 1,
    precision: str = "fp32",
    device: str = "cpu",
    trials: str | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    stimuli: str | Path | None = None,
    renormalize: bool | None = None,
    allow_cpu_fallback: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Reconstruct the selected trials of `betas_path` with the exported stage 1 of `model_dir` into `out`.

    `seed` is recorded (the stage-1 decode is deterministic: prior means, DmoL mode). Returns the summary that is
    also written to `out/summary.json`.
    """
    t_start = time.perf_counter()
    out = Path(out)
    if stage != 1:
        raise InputError("--stage", "1 (stage 2 is not exported yet)", str(stage))
    if out.exists() and not overwrite:
        raise InputError(out, "a new output directory (or --overwrite)", "an existing path")

    t0 = time.perf_counter()
    pipeline = Stage1Pipeline.from_model_dir(model_dir, engine, precision, device, allow_cpu_fallback)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    betas, source = load_betas(betas_path, model_dir)
    read_s = time.perf_counter() - t0
    betas, batch, renorm = pipeline.check_inputs(
        betas, batch_size, renormalize, str(betas_path)
    )  # rank, dtype, voxels, NaN
    n_rows = len(betas)
    selected = parse_trials(trials, n_rows)
    betas, batch, renorm = pipeline.check_inputs(betas[selected], batch, renorm, str(betas_path))
    ground_truth = None
    if stimuli is not None:
        all_images = load_npy(stimuli, "ground-truth stimuli (recon-prepare test_images.npy)", mmap=True)
        if all_images.ndim != 4 or all_images.shape[-1] != 3:
            raise InputError(stimuli, "(N, H, W, 3) images", f"shape {all_images.shape}")
        if len(all_images) != n_rows:
            raise InputError(stimuli, f"one image per row of the betas ({n_rows})", f"{len(all_images)}")
        ground_truth = check_images(np.asarray(all_images[selected]), str(stimuli))

    if progress:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            tasks: dict[str, Any] = {}

            def report(step: str, done: int, total: int) -> None:
                if step not in tasks:
                    tasks[step] = bar.add_task(f"stage 1 {step}", total=total)
                bar.update(tasks[step], completed=done)

            result = pipeline.run(betas, batch, renorm, progress=report)
    else:
        result = pipeline.run(betas, batch, renorm)

    names = [f"trial_{int(t):05d}.png" for t in selected]
    summary = {
        "betas": str(betas_path),
        "input": source,
        "model_dir": str(model_dir),
        "stage": stage,
        "engine": engine,
        "precision": precision,
        "device": device,
        "providers": result.providers,
        "cpu_fallback": result.fallback or None,
        "n_trials": len(selected),
        "trials": [int(t) for t in selected],
        "batch_size": batch,
        "renormalized": result.renormalized,
        "seed": seed,
        "timings": {
            "load_models_s": round(load_s, 4),
            "read_betas_s": round(read_s, 4),
            **result.timings,
        },
        "images": names,
        "ground_truth": str(stimuli) if stimuli is not None else None,
        "versions": producer_versions(),
    }
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, image in zip(names, result.images, strict=True):
            save_png(tmp / name, image)
        rows = [("ground truth", ground_truth)] if ground_truth is not None else []
        contact_sheet([*rows, ("stage 1", result.images)], tmp / "contact_sheet.png")
        summary["timings"]["write_s"] = round(time.perf_counter() - t0, 4)
        summary["timings"]["wall_s"] = round(time.perf_counter() - t_start, 4)
        write_json(tmp / "summary.json", summary)
    return summary
