"""`recon-infer`'s output folder, over the public API (`api.Reconstructor`): betas file → reconstructions, contact
sheet and summary, atomically.

Stage 1 writes one PNG per row of the input (`stage1_NNNNN.png`, NNNNN the row: the torch reference
`recon-reconstruct` names its files the same way, so the two folders compare file by file), `stage1_images.npy`,
`contact_sheet.png` and `summary.json`. Stage 2 (the default when the model directory has a fitted stage 2) adds
`final_NNNNN.png`, `final_images.npy` (N, S, S, 3) uint8, `timings.json` (per-stage seconds) and, with ground
truth, `metrics.json` (PixCorr, SSIM of stage 1 and final); its contact sheet rows are ground truth / stage 1 /
final.

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
from brainrecon.images import check_images, contact_sheet, png_name, save_png
from brainrecon.io import atomic_dir, load_npy, save_npy, write_json
from brainrecon.manifest import producer_versions
from brainrecon.runtime.api import Reconstructor
from brainrecon.runtime.inputs import parse_trials
from brainrecon.runtime.types import Progress, Reconstruction, RuntimeOptions

OPTION_NAMES = {  # sampling field -> recon-infer option, for error messages
    "seed": "--seed",
    "num_inference_steps": "--steps",
    "strength": "--strength",
    "guidance_scale": "--guidance",
    "sampler": "--sampler",
    "guidance_stop": "--guidance-stop",
    "cache_interval": "--cache-interval",
}
PROGRESS_LABELS = {
    "regressor": "stage 1 regressor",
    "decoder": "stage 1 VDVAE decoder",
    "clip_text": "stage 2 CLIP-text",
    "clip_vision": "stage 2 CLIP-vision",
    "vae_encoder": "stage 2 VAE encoder",
    "unet": "stage 2 UNet (steps x batches)",
    "vae_decoder": "stage 2 VAE decoder",
}


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
    options: RuntimeOptions | None = None,
    stage: int | None = None,
    sampling: dict[str, Any] | None = None,
    trials: str | None = None,
    batch_size: int | None = None,
    stimuli: str | Path | None = None,
    renormalize: bool | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Reconstruct the selected trials of `betas_path` with the exported models of `model_dir` into `out`.

    `stage` None: 2 when stage 2 is fitted. `sampling` overrides fields of the fitted stage-2 sampling (seed,
    num_inference_steps, strength, guidance_scale, sampler, guidance_stop, cache_interval; None values are
    ignored). Returns the summary that is also written to `out/summary.json`.
    """
    t_start = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(out, "a new output directory (or --overwrite)", "an existing path")
    options = options or RuntimeOptions()
    overrides = {k: v for k, v in (sampling or {}).items() if v is not None}

    t0 = time.perf_counter()
    with Reconstructor.open(model_dir, options, stage) as rec:
        stage2_only = [OPTION_NAMES[k] for k in overrides if k != "seed"]  # stage 1 is deterministic
        if rec.stage == 1 and stage2_only:
            raise InputError(", ".join(stage2_only), "stage 2 (they set its img2img sampling)", "--stage 1")
        chosen = rec.sampling.with_overrides(**overrides) if rec.sampling is not None else None
        load_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        betas, source = rec.load_betas(betas_path)
        read_s = time.perf_counter() - t0
        if not isinstance(betas, np.ndarray) or betas.ndim != 2:
            rec.check(betas, chosen, source=str(betas_path))  # the one-line error for a wrong rank or type
        selected = parse_trials(trials, len(betas))
        checked = rec.check(
            betas[selected], chosen, renormalize=renormalize, batch_size=batch_size, source=str(betas_path)
        )
        ground_truth = read_ground_truth(stimuli, len(betas), selected)
        with progress_bars(progress) as report:
            result = rec.run_checked(checked, report)

    summary = describe_run(betas_path, source, model_dir, options, rec.stage, selected, result)
    summary["timings"] = {
        "load_models_s": round(load_s, 4),
        "read_betas_s": round(read_s, 4),
        **result.timings,
    }
    if result.timesteps is not None:
        calls_per_step = math.ceil(len(selected) / result.batch_sizes["unet"])
        summary["timings"]["unet_calls"] = len(result.timesteps) * calls_per_step
    summary["ground_truth"] = str(stimuli) if stimuli is not None else None
    rows: list[tuple[str, np.ndarray]] = [("ground truth", ground_truth)] if ground_truth is not None else []
    rows.append(("stage 1", result.stage1_images))
    if result.final_images is not None:
        rows.append(("final", result.final_images))
        if ground_truth is not None:
            summary["metrics"] = image_metrics(
                ground_truth, {"stage1": result.stage1_images, "final": result.final_images}
            )

    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for kind, images in (("stage1", result.stage1_images), ("final", result.final_images)):
            if images is None:
                continue
            for row, image in zip(selected, images, strict=True):
                save_png(tmp / png_name(kind, row), image)
            save_npy(tmp / f"{kind}_images.npy", images)
        if "metrics" in summary:
            write_json(tmp / "metrics.json", summary["metrics"])
        contact_sheet(rows, tmp / "contact_sheet.png")
        summary["timings"]["write_s"] = round(time.perf_counter() - t0, 4)
        summary["timings"]["wall_s"] = round(time.perf_counter() - t_start, 4)
        if rec.stage == 2:
            write_json(tmp / "timings.json", {"stage": 2, "n_trials": len(selected), **summary["timings"]})
        write_json(tmp / "summary.json", summary)
    return summary


def read_ground_truth(stimuli: str | Path | None, n_rows: int, selected: np.ndarray) -> np.ndarray | None:
    """The selected rows of recon-prepare's `test_images.npy` (one image per row of the betas), or None."""
    if stimuli is None:
        return None
    all_images = load_npy(stimuli, "ground-truth stimuli (recon-prepare test_images.npy)", mmap=True)
    if all_images.ndim != 4 or all_images.shape[-1] != 3:
        raise InputError(stimuli, "(N, H, W, 3) images", f"shape {all_images.shape}")
    if len(all_images) != n_rows:
        raise InputError(stimuli, f"one image per row of the betas ({n_rows})", f"{len(all_images)}")
    return check_images(np.asarray(all_images[selected]), str(stimuli))


def describe_run(
    betas_path: str | Path,
    source: dict[str, Any],
    model_dir: str | Path,
    options: RuntimeOptions,
    stage: int,
    selected: np.ndarray,
    result: Reconstruction,
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "betas": str(betas_path),
        "input": source,
        "model_dir": str(model_dir),
        "stage": stage,
        "engine": options.engine,
        "precision": options.precision,
        "device": options.device,
        "providers": result.providers,
        "cpu_fallback": result.fallback or None,
        "n_trials": len(selected),
        "trials": [int(t) for t in selected],
        "batch_size": min(result.batch_sizes.values()),
        "batch_sizes": result.batch_sizes,
        "renormalized": result.renormalized,
        "stage1_images": [png_name("stage1", t) for t in selected],
        "versions": producer_versions(),
    }
    if result.sampling is not None:
        assert result.timesteps is not None
        summary["seed"] = result.sampling.seed
        summary["sampling"] = {
            **result.sampling.to_dict(),
            "timesteps": [int(t) for t in result.timesteps],
            "guided_steps": result.sampling.guided_steps(len(result.timesteps)),
            # DeepCache: the steps that ran the whole UNet (all of them at cache_interval 1)
            "full_steps": math.ceil(len(result.timesteps) / result.sampling.cache_interval),
        }
        summary["final_images"] = [png_name("final", t) for t in selected]
    return summary
