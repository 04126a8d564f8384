"""Noise sensitivity: Gaussian noise added to a subject's test betas, and what each stage does with it.

The GRU decoding paper's third experiment (Veronese et al., "Optimized two-stage AI-based Neural Decoding",
official code LorenzoVeronese/GRU-Decoding_JNE) adds Gaussian noise of growing standard deviation to the input
betas and reads the roles of the two stages from how PixCorr/SSIM (low level) and CLIP identification (high level)
degrade. Here, for each level and noise seed:

- "both inputs": the noisy betas go to stage 1 and to the CLIP regressors (the whole decoder sees noise);
- "stage-1 input": the noisy betas go to stage 1 only, the CLIP regressors get the clean betas;
- "CLIP input": the CLIP regressors get the noisy betas, stage 1 the clean ones.

Stage 1 is scored on its own images and stage 1+2 on the final images (PixCorr, SSIM: brainrecon.metrics;
CLIP 2-way: the subject's CLIP). Noise levels are multiples of the test betas' own standard deviation (about 1:
they are z-scored with the training statistics). The img2img noise is the model's fitted seed in every run, so
the spread over seeds is the spread of the beta noise alone. The regressors' transductive re-normalisation
(Brain-Diffuser) stays as fitted: it rescales noisy predictions to the training statistics, as the paper's
pipeline does.

    out/noise.json   config, betas' std, every run (role, level, seed, stage, metrics), the mean/std summary
    out/noise.md     the summary table (mean ± std over seeds)
    out/noise.png    metrics vs noise level, one line per stage and role, error bars = std over seeds
    out/noise_sheet.png   ground truth, then stage 1 and stage 1+2 (both inputs noisy, seed 0) per level
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainrecon.config import config_to_dict
from brainrecon.errors import ConfigError, InputError
from brainrecon.io import write_json, write_text

ROLES = {
    "both": "both inputs noisy",
    "stage1_input": "stage-1 input noisy (CLIP clean)",
    "clip_input": "CLIP input noisy (stage 1 clean)",
}
METRICS = ("pixcorr", "ssim", "clip_2way")
SHEET_IMAGES = 8


@dataclass(frozen=True)
class NoiseConfig:
    """Levels are multiples of the test betas' standard deviation; level 0 (no noise) is always run."""

    levels: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    n_images: int | None = None  # the first n test images; None: all
    roles: bool = True  # also the stage-1-input-only and CLIP-input-only runs (stage 2 models only)
    num_inference_steps: int | None = None  # None: the fitted sampling (50 DDIM steps)

    def __post_init__(self) -> None:
        if not self.levels or any(not np.isfinite(v) or v < 0 for v in self.levels):
            raise ConfigError(f"NoiseConfig: expected finite levels >= 0, found {self.levels}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"NoiseConfig: expected distinct seeds, found {self.seeds}")
        if self.n_images is not None and self.n_images < 2:
            raise ConfigError(
                f"NoiseConfig: expected n_images >= 2 (2-way identification), found {self.n_images}"
            )


def noisy_betas(betas: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """betas + sigma * N(0, 1), float32; the draw depends only on (seed, shape), so every level of one seed
    scales the same noise pattern."""
    if sigma == 0:
        return betas
    rng = np.random.default_rng([int(seed), 14])
    return (betas + sigma * rng.standard_normal(betas.shape, dtype=np.float32)).astype(np.float32)


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and std (ddof 0) over seeds of each (role, stage, level)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["role"], r["stage"], r["level"]), []).append(r)
    rows = []
    for (role, stage, level), items in groups.items():
        row = {
            "role": role,
            "stage": stage,
            "level": level,
            "sigma": items[0]["sigma"],
            "n_seeds": len(items),
        }
        for m in METRICS:
            values = np.array([it[m] for it in items], dtype=np.float64)
            row[m] = round(float(values.mean()), 4)
            row[f"{m}_std"] = round(float(values.std()), 4)
        rows.append(row)
    order = {k: i for i, k in enumerate(ROLES)}
    rows.sort(key=lambda r: (r["stage"] != "stage1", order[r["role"]], r["level"]))
    return rows


def noise_sensitivity(
    model_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    config: NoiseConfig = NoiseConfig(),
    progress: bool = True,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> dict:
    """Run the noise experiment on a fitted subject (stage 1 only, or both stages) -> out/noise.{json,md,png}.

    The subject's torch models and the CLIP run on `device` ("cpu", "cuda"); the noise is numpy's either way."""
    from brainrecon.images import contact_sheet
    from brainrecon.metrics import pixcorr, ssim
    from brainrecon.model_dir import STAGE2_SUMMARY
    from brainrecon.train.evaluation.stage2 import clip_identification, clip_image_embeddings
    from brainrecon.train.foundations.loaders import DEFAULTS, load_clip
    from brainrecon.train.reference import Stage1Model, Stage2Model
    from brainrecon.train.stage1.fit import load_prepared

    model_dir, data_dir, out = Path(model_dir), Path(data_dir), Path(out)
    has_stage2 = (model_dir / STAGE2_SUMMARY).is_file()
    model = Stage2Model.load(model_dir, device) if has_stage2 else None
    stage1 = model.stage1 if model else Stage1Model.load(model_dir, device)
    betas, images = load_prepared(data_dir, "test")
    n = len(betas) if config.n_images is None else min(config.n_images, len(betas))
    betas, gt = np.ascontiguousarray(betas[:n]), np.asarray(images[:n])
    if n < 2:
        raise InputError(data_dir / "test_betas.npy", "at least 2 test trials", str(n))
    extractor, _ = load_clip(model.info["config"]["clip"] if model else DEFAULTS["clip"], device=device)
    gt_embeddings = clip_image_embeddings(extractor, gt)
    sampling = None
    if model is not None:
        sampling = model.sampling
        if config.num_inference_steps is not None:
            sampling = dataclasses.replace(sampling, num_inference_steps=config.num_inference_steps)
    beta_std = float(betas.std())
    levels = sorted(set((0.0, *config.levels)))
    roles = ("both", "stage1_input", "clip_input") if (model and config.roles) else ("both",)
    clean_contexts = model.predict_contexts(betas) if model else None
    clean_stage1 = stage1.reconstruct(betas)

    def scores(recon: np.ndarray) -> dict:
        return {
            "pixcorr": round(float(pixcorr(gt, recon)), 4),
            "ssim": round(float(ssim(gt, recon)), 4),
            "clip_2way": round(clip_identification(extractor, gt_embeddings, recon), 4),
        }

    runs: list[dict] = []
    sheet = [("ground truth", gt[:SHEET_IMAGES])]
    result: dict = {}
    out.mkdir(parents=True, exist_ok=True)

    def write(complete: bool) -> None:
        result.clear()
        result.update(
            _result(
                model_dir,
                data_dir,
                n,
                beta_std,
                config,
                model,
                roles,
                sampling,
                stage1,
                t_start,
                runs,
                complete,
            )
        )
        write_json(out / "noise.json", result)
        write_text(out / "noise.md", noise_table(result))
        plot_noise(result, out / "noise.png")
        contact_sheet(sheet, out / "noise_sheet.png")

    jobs = [(lv, s) for lv in levels for s in (config.seeds[:1] if lv == 0 else config.seeds)]
    t_start = time.perf_counter()
    for i, (level, seed) in enumerate(jobs):
        sigma = level * beta_std
        noisy = noisy_betas(betas, sigma, seed)
        s1 = clean_stage1 if level == 0 else stage1.reconstruct(noisy)
        s1_scores = scores(s1)
        noisy_contexts = model.predict_contexts(noisy) if model else None
        for role in roles:
            base = {"role": role, "level": level, "sigma": round(sigma, 4), "seed": seed}
            # stage 1 sees noise in "both" and "stage1_input", clean betas in "clip_input"
            runs.append(
                {**base, "stage": "stage1", **(scores(clean_stage1) if role == "clip_input" else s1_scores)}
            )
            if model is None:
                continue
            if level == 0 and role != "both":  # no noise: every role is the same run
                runs.append({**base, "stage": "stage1+2", **{m: runs[1][m] for m in METRICS}})
                continue
            stage1_betas = betas if role == "clip_input" else noisy
            contexts = clean_contexts if role == "stage1_input" else noisy_contexts
            final = model.reconstruct(stage1_betas, sampling, contexts=contexts, progress=False)["final"]
            runs.append({**base, "stage": "stage1+2", **scores(final)})
            if role == "both" and seed == config.seeds[0]:
                sheet.append((f"s1 x{level:g}", s1[:SHEET_IMAGES]))
                sheet.append((f"s1+2 x{level:g}", final[:SHEET_IMAGES]))
        if model is None and seed == config.seeds[0]:
            sheet.append((f"s1 x{level:g}", s1[:SHEET_IMAGES]))
        if progress:
            elapsed = time.perf_counter() - t_start
            log(f"noise: level {level:g} seed {seed} done ({i + 1}/{len(jobs)}, {elapsed:.0f} s)")
        write(i + 1 == len(jobs))  # after every (level, seed): a long run leaves its finished rows behind
    return result


def _result(
    model_dir, data_dir, n, beta_std, config, model, roles, sampling, stage1, t_start, runs, complete
) -> dict:
    return {
        "model_dir": str(model_dir),
        "data": str(data_dir),
        "n_test": n,
        "betas_std": round(beta_std, 4),
        "config": config_to_dict(config),
        "stages": ["stage1", "stage1+2"] if model else ["stage1"],
        "roles": {k: ROLES[k] for k in roles},
        "sampling": config_to_dict(sampling) if sampling else None,
        "regressor": stage1.config.regressor,
        "num_layers": stage1.num_layers,
        "seconds": round(time.perf_counter() - t_start, 1),
        "complete": complete,
        "summary": summarize(runs),
        "runs": runs,
    }


def noise_table(result: dict) -> str:
    lines = [
        f"Noise sensitivity: {result['n_test']} test images, {result['regressor']} K={result['num_layers']}, "
        f"noise std = level x {result['betas_std']} (the test betas' std), "
        f"{len(result['config']['seeds'])} noise seeds (mean ± std).",
        "",
        *(
            []
            if result.get("complete", True)
            else ["**Partial**: the run stopped before every level and seed was done.", ""]
        ),
        "| stage | noisy input | level | σ | PixCorr ↑ | SSIM ↑ | CLIP 2-way ↑ |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        cells = [f"{r[m]:.3f} ± {r[m + '_std']:.3f}" for m in METRICS]
        lines.append(
            f"| {r['stage']} | {ROLES[r['role']]} | {r['level']:g} | {r['sigma']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot_noise(result: dict, path: str | Path) -> None:
    from brainrecon.train.experiments.plots import METRIC_LABELS, pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    series = [("stage1", "both", "stage 1 (noisy betas)", "C0", "o-")]
    if "stage1+2" in result["stages"]:
        series += [
            ("stage1+2", "both", "stage 1+2, both inputs noisy", "C3", "s-"),
            ("stage1+2", "stage1_input", "stage 1+2, stage-1 input noisy", "C2", "^--"),
            ("stage1+2", "clip_input", "stage 1+2, CLIP input noisy", "C1", "v--"),
        ]
    for ax, metric in zip(axes, METRICS, strict=True):
        for stage, role, label, color, style in series:
            rows = [r for r in result["summary"] if r["stage"] == stage and r["role"] == role]
            if not rows:
                continue
            x = np.arange(len(rows))
            ax.errorbar(
                x,
                [r[metric] for r in rows],
                yerr=[r[metric + "_std"] for r in rows],
                fmt=style,
                color=color,
                label=label,
                capsize=3,
                markersize=4,
            )
            ax.set_xticks(x, [f"{r['level']:g}" for r in rows])
        if metric == "clip_2way":
            ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
        ax.set_title(METRIC_LABELS[metric])
        ax.set_xlabel("noise std / betas' std")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"Noise sensitivity ({result['regressor']} K={result['num_layers']}, {result['n_test']} test images, "
        f"{len(result['config']['seeds'])} seeds)",
        fontsize=10,
    )
    save_figure(fig, path)
