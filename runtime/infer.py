"""`recon-infer` as an importable function: betas file → reconstructions, contact sheet and summary, atomically.

Stage 1 writes one PNG per trial (`trial_NNNNN.png`), `contact_sheet.png` and `summary.json`. Stage 2 (the
default when the model directory has a fitted stage 2) writes the same stage-1 files plus `final_NNNNN.png`,
`final_images.npy` (N, S, S, 3) uint8, `timings.json` (per-stage seconds) and, with ground truth, `metrics.json`
(PixCorr, SSIM of stage 1 and final); its contact sheet rows are ground truth / stage 1 / final.

Every check runs before the expensive work (model hashes, sampling overrides, betas shape/dtype/NaN, trial
selection, batch against the engine profiles, ground truth); the output folder appears only when complete, so a
failure leaves nothing behind.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import InputError
from brainrecon.images import check_images, contact_sheet, save_png
from brainrecon.io import atomic_dir, load_npy, save_npy, write_json
from brainrecon.manifest import producer_versions
from brainrecon.runtime.inputs import load_betas, parse_trials
from brainrecon.runtime.stage1 import Progress, Stage1Pipeline
from brainrecon.runtime.stage2 import SUMMARY as STAGE2_SUMMARY
from brainrecon.runtime.stage2 import Stage2Pipeline

STAGES = (1, 2)
PROGRESS_LABELS = {
    "regressor": "stage 1 regressor",
    "decoder": "stage 1 VDVAE decoder",
    "clip_text": "stage 2 CLIP-text",
    "clip_vision": "stage 2 CLIP-vision",
    "vae_encoder": "stage 2 VAE encoder",
    "unet": "stage 2 UNet (steps x batches)",
    "vae_decoder": "stage 2 VAE decoder",
}


def default_stage(model_dir: str | Path) -> int:
    """2 when the model directory has a fitted stage 2 (then it must be exported too), else 1."""
    return 2 if (Path(model_dir) / STAGE2_SUMMARY).is_file() else 1


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Progress | None]:
    """A rich progress callback with one bar per pipeline step, or None."""
    if not enabled:
        yield None
        return
    from rich.progress import Progress as RichProgress

    with RichProgress(transient=True) as bar:
        tasks: dict[str, Any] = {}

        def report(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(PROGRESS_LABELS.get(step, step), total=total)
            bar.update(tasks[step], completed=done)

        yield report


def image_metrics(ground_truth: np.ndarray, rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """PixCorr and SSIM (Brain-Diffuser's definitions, brainrecon.metrics) of each row against the ground truth;
    a NaN (a constant image has no correlation) is written as null."""
    from brainrecon.metrics import pixcorr, ssim

    def finite(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    return {
        "n": len(ground_truth),
        **{
            name: {
                "pixcorr": finite(pixcorr(ground_truth, images)),
                "ssim": finite(ssim(ground_truth, images)),
            }
            for name, images in rows.items()
        },
    }


def run_inference(
    betas_path: str | Path,
    model_dir: str | Path,
    out: str | Path,
    engine: str = "ort",
    stage: int | None = None,
    precision: str = "fp32",
    device: str = "cpu",
    trials: str | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    steps: int | None = None,
    strength: float | None = None,
    guidance: float | None = None,
    stimuli: str | Path | None = None,
    renormalize: bool | None = None,
    allow_cpu_fallback: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Reconstruct the selected trials of `betas_path` with the exported models of `model_dir` into `out`.

    `stage` None: `default_stage(model_dir)`. Stage 2 samples with the fitted settings (`stage2/stage2.json`)
    unless `seed`, `steps`, `strength` or `guidance` override them; stage 1 is deterministic and only records the
    seed. Returns the summary that is also written to `out/summary.json`.
    """
    t_start = time.perf_counter()
    out = Path(out)
    stage = default_stage(model_dir) if stage is None else stage
    if stage not in STAGES:
        raise InputError("--stage", f"one of {STAGES}", str(stage))
    overrides = {"--steps": steps, "--strength": strength, "--guidance": guidance}
    if stage == 1 and any(v is not None for v in overrides.values()):
        given = ", ".join(k for k, v in overrides.items() if v is not None)
        raise InputError(given, "stage 2 (they set its img2img sampling)", "--stage 1")
    if out.exists() and not overwrite:
        raise InputError(out, "a new output directory (or --overwrite)", "an existing path")

    t0 = time.perf_counter()
    pipeline: Stage1Pipeline | Stage2Pipeline
    if stage == 1:
        pipeline = Stage1Pipeline.from_model_dir(
            model_dir, engine, precision, device, allow_cpu_fallback, threads
        )
    else:
        pipeline = Stage2Pipeline.from_model_dir(
            model_dir, engine, precision, device, allow_cpu_fallback, threads
        )
        sampling = pipeline.sampling_for(seed, steps, strength, guidance)  # a bad override fails here
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    betas, source = load_betas(betas_path, model_dir)
    read_s = time.perf_counter() - t0
    pipeline.check_inputs(betas, batch_size, renormalize, str(betas_path))  # rank, dtype, voxels, NaN
    n_rows = len(betas)
    selected = parse_trials(trials, n_rows)
    betas = pipeline.check_inputs(betas[selected], batch_size, renormalize, str(betas_path))[0]
    ground_truth = None
    if stimuli is not None:
        all_images = load_npy(stimuli, "ground-truth stimuli (recon-prepare test_images.npy)", mmap=True)
        if all_images.ndim != 4 or all_images.shape[-1] != 3:
            raise InputError(stimuli, "(N, H, W, 3) images", f"shape {all_images.shape}")
        if len(all_images) != n_rows:
            raise InputError(stimuli, f"one image per row of the betas ({n_rows})", f"{len(all_images)}")
        ground_truth = check_images(np.asarray(all_images[selected]), str(stimuli))

    with progress_bars(progress) as report:
        if isinstance(pipeline, Stage2Pipeline):
            result2 = pipeline.run(
                betas,
                seed=sampling.seed,
                num_inference_steps=sampling.num_inference_steps,
                strength=sampling.strength,
                guidance_scale=sampling.guidance_scale,
                batch_size=batch_size,
                renormalize=renormalize,
                progress=report,
            )
            result1 = result2.stage1
        else:
            result2 = None
            result1 = pipeline.run(betas, batch_size, renormalize, progress=report)

    names = [f"trial_{int(t):05d}.png" for t in selected]
    summary: dict[str, Any] = {
        "betas": str(betas_path),
        "input": source,
        "model_dir": str(model_dir),
        "stage": stage,
        "engine": engine,
        "precision": precision,
        "device": device,
        "providers": result1.providers,
        "cpu_fallback": result1.fallback or None,
        "n_trials": len(selected),
        "trials": [int(t) for t in selected],
        "batch_size": min(result1.batch_sizes.values()),
        "renormalized": result1.renormalized,
        "seed": seed,
        "timings": {"load_models_s": round(load_s, 4), "read_betas_s": round(read_s, 4), **result1.timings},
        "images": names,
        "ground_truth": str(stimuli) if stimuli is not None else None,
        "versions": producer_versions(),
    }
    rows: list[tuple[str, np.ndarray]] = [("ground truth", ground_truth)] if ground_truth is not None else []
    rows.append(("stage 1", result1.images))
    final_names: list[str] = []
    if result2 is not None:
        final_names = [f"final_{int(t):05d}.png" for t in selected]
        rows.append(("final", result2.images))
        summary.update(
            providers=result2.providers,
            cpu_fallback=result2.fallback or None,
            batch_size=min(result2.batch_sizes.values()),
            batch_sizes=result2.batch_sizes,
            renormalized=result2.renormalized,
            seed=result2.sampling.seed,
            sampling={**result2.sampling.to_dict(), "timesteps": [int(t) for t in result2.timesteps]},
            timings={
                "load_models_s": round(load_s, 4),
                "read_betas_s": round(read_s, 4),
                **result2.timings,
                "stage1_split": result1.timings,
                "unet_calls": len(result2.timesteps) * math.ceil(len(selected) / result2.batch_sizes["unet"]),
            },
            final_images=final_names,
        )
        if ground_truth is not None:
            summary["metrics"] = image_metrics(
                ground_truth, {"stage1": result1.images, "final": result2.images}
            )

    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, image in zip(names, result1.images, strict=True):
            save_png(tmp / name, image)
        if result2 is not None:
            for name, image in zip(final_names, result2.images, strict=True):
                save_png(tmp / name, image)
            save_npy(tmp / "final_images.npy", result2.images)
            if "metrics" in summary:
                write_json(tmp / "metrics.json", summary["metrics"])
        contact_sheet(rows, tmp / "contact_sheet.png")
        summary["timings"]["write_s"] = round(time.perf_counter() - t0, 4)
        summary["timings"]["wall_s"] = round(time.perf_counter() - t_start, 4)
        if result2 is not None:
            write_json(tmp / "timings.json", {"stage": 2, "n_trials": len(selected), **summary["timings"]})
        write_json(tmp / "summary.json", summary)
    return summary
