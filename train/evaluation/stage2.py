"""Stage-2 results on a subject's test set: the two-stage reconstructions `recon-reconstruct` writes, the table
of `recon-eval stage2` (stage 1 vs stage 1+2 beside controls), and the scores they share (CLIP 2-way
identification, the recurring error of a fixed-position artifact)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import uniform_filter

from brainrecon.config import config_to_dict
from brainrecon.images import contact_sheet, png_name, resize, save_png
from brainrecon.io import atomic_dir, load_npy, save_npy, write_json, write_text
from brainrecon.metrics import pixcorr, ssim, two_way_identification
from brainrecon.model_dir import CLIP_TARGETS
from brainrecon.sampling import SamplingConfig
from brainrecon.train.evaluation.paper_metrics import PaperScorer, paper_table_rows
from brainrecon.train.foundations.loaders import load_clip
from brainrecon.train.reference import Stage2Model
from brainrecon.train.stage1.fit import load_prepared
from brainrecon.train.stage2.clip_ridge import real_size_parameter_report
from brainrecon.train.stage2.fit import clip_targets
from brainrecon.train.stage2.img2img import decode_latents, encode_images

SHEET_ROWS = {  # compare_stage2 runs shown in its contact sheet, with their row labels
    "stage 1+2 (fitted settings)": "stage 1+2",
    "stage 1+2, guidance 3": "guidance 3",
    "oracle: true CLIP contexts": "oracle CLIP",
    "oracle: true CLIP contexts, strength 1 (no stage 1)": "oracle, no stage 1",
}


def clip_image_embeddings(extractor, images: np.ndarray) -> np.ndarray:
    """(N, D) CLIP image embeddings (projected, normalised CLS token) at the extractor's image size."""
    return extractor.vision_embeddings(resize(np.asarray(images), extractor.preprocess.image_size))[:, 0]


def clip_identification(extractor, gt_embeddings: np.ndarray, recon: np.ndarray) -> float:
    """2-way identification of reconstructions among ground truths on CLIP image embeddings (gt: computed once
    with `clip_image_embeddings`)."""
    return float(two_way_identification(gt_embeddings, clip_image_embeddings(extractor, recon)))


def recurring_error(gt: np.ndarray, recon: np.ndarray, window: int = 5) -> dict:
    """{"ratio", "position"}: the per-pixel absolute error (grey levels, channels averaged) averaged over the
    images and box-filtered over `window` px; its max / median, and where the max is (row, col) at recon's size.
    A spot drawn at the same place in every image raises it: the first shipped VAE's decoder did that (a GroupNorm
    "droplet", benchmarks/results/blob/), fixed since by its 8 groups."""
    gt = resize(np.asarray(gt), recon.shape[1])
    err = np.abs(gt.astype(np.float64) - recon.astype(np.float64)).mean(axis=(0, 3))  # (S, S)
    smooth = uniform_filter(err, size=window, mode="nearest")
    pos = np.unravel_index(int(smooth.argmax()), smooth.shape)
    return {
        "ratio": round(float(smooth.max() / max(np.median(smooth), 1e-8)), 3),
        "position": [int(pos[0]), int(pos[1])],
    }


def reconstruct_test_set(
    model_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    overwrite: bool = False,
    sampling: SamplingConfig | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Two-stage reconstructions of a recon-prepare test set: PNGs, contact sheet, metrics.json, atomically."""
    model = Stage2Model.load(model_dir, device)
    betas, images = load_prepared(Path(data_dir), "test")
    t0 = time.perf_counter()
    recon = model.reconstruct(betas, sampling)
    seconds = time.perf_counter() - t0
    ids = load_npy(Path(data_dir) / "test_stim_ids.npy")
    gt = np.asarray(images)
    extractor, _ = load_clip(model.info["config"]["clip"], device=device)
    metrics = {"n": len(gt), "seconds": round(seconds, 2)}
    gt_embeddings = clip_image_embeddings(extractor, gt)
    for name in ("stage1", "final"):
        metrics[name] = {
            "pixcorr": float(pixcorr(gt, recon[name])),
            "ssim": float(ssim(gt, recon[name])),
            "clip_2way": clip_identification(extractor, gt_embeddings, recon[name]),
        }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for row, (s1, final) in enumerate(zip(recon["stage1"], recon["final"], strict=True)):
            save_png(tmp / png_name("stage1", row), s1)
            save_png(tmp / png_name("final", row), final)
        save_npy(tmp / "stage1_images.npy", recon["stage1"])
        save_npy(tmp / "stim_ids.npy", ids)  # row -> 0-based stimulus id
        save_npy(tmp / "final_images.npy", recon["final"])
        contact_sheet(
            [("ground truth", gt), ("stage 1", recon["stage1"]), ("stage 1+2", recon["final"])],
            tmp / "contact_sheet.png",
        )
        write_json(tmp / "metrics.json", metrics)
    return metrics


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_sizes(model: Stage2Model, extractor) -> list[dict]:
    """Parameters of every model the two-stage reconstruction runs (CLIP only for training and evaluation)."""
    s1 = model.stage1
    regressor = s1.regressor
    reg_params = (
        int(regressor.coef.size + regressor.intercept.size)
        if hasattr(regressor, "coef")
        else _parameters(regressor)
    )
    rows = [
        {"model": f"stage-1 regressor ({s1.config.regressor})", "parameters": reg_params},
        {"model": "VDVAE (whole; the decoder runs)", "parameters": _parameters(s1.vdvae)},
    ]
    for name in CLIP_TARGETS:
        ridge = model.clip[name]
        rows.append(
            {
                "model": f"CLIP-{name} ridge, rank {ridge.config.rank}",
                "parameters": ridge.parameter_count,
                "full_rank_parameters": ridge.full_rank_parameter_count,
            }
        )
    rows += [
        {"model": "VAE (AutoencoderKL)", "parameters": _parameters(model.vae)},
        {"model": "dual-guided UNet", "parameters": _parameters(model.unet)},
        {
            "model": "CLIP (training targets, CLIP identification)",
            "parameters": _parameters(extractor.text_model) + _parameters(extractor.vision_model),
        },
    ]
    return rows


def compare_stage2(
    model_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    sheet_images: int = 12,
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
) -> dict:
    """Stage 1 vs stage 1+2 on a subject's test set, beside controls that say where stage 2's gains come from.

    Rows: stage 1; stage 1+2 at the fitted settings; guidance 1 (no guidance) and 3; strength 0.5; oracle CLIP
    contexts (the true embeddings of the test images: the ceiling of the regressors), also at strength 1 (pure
    generation from them: how well the UNet follows its conditioning); shuffled predicted contexts (conditioning
    that belongs to other images); strength 0 (the VAE round trip of stage 1, no diffusion); the VAE round trip of
    the ground truth (the VAE's own ceiling). Every row also has `recurring_error`, the max / median of the error
    map averaged over the images (`recurring_error`): a fixed-position artifact raises it, and `paper`, Brain-Diffuser's
    eight metrics (`paper_metrics.py`): PixCorr and SSIM always, the six feature-network columns when `weights` holds
    their files (the rest are named in `paper_metrics.missing`). `clip_2way` is ours, on the subject's own CLIP (the
    small one for the demo), not comparable with the papers' CLIP column. Writes out/stage2.{json,md},
    out/stage2_sheet.png. The torch models (the subject's, the CLIP and the feature networks) run on `device`.
    """
    data_dir, out = Path(data_dir), Path(out)
    model = Stage2Model.load(model_dir, device)
    extractor, _ = load_clip(model.info["config"]["clip"], device=device)
    betas, images = load_prepared(data_dir, "test")
    gt = np.asarray(images)
    predicted = model.predict_contexts(betas)
    true = clip_targets(data_dir, "test", extractor, gt)
    gt_embeddings = clip_image_embeddings(extractor, gt)
    scorer = PaperScorer(gt, weights, device=device, show_progress=weights is not None)
    shuffle = np.random.default_rng(model.sampling.seed).permutation(len(gt))
    base = model.sampling
    runs = {
        "stage 1+2 (fitted settings)": (base, predicted),
        "stage 1+2, guidance 3": (dataclasses.replace(base, guidance_scale=3.0), predicted),
        "stage 1+2, guidance 1 (no CFG)": (dataclasses.replace(base, guidance_scale=1.0), predicted),
        "stage 1+2, strength 0.5": (dataclasses.replace(base, strength=0.5), predicted),
        "oracle: true CLIP contexts": (base, true),
        "oracle: true CLIP contexts, strength 1 (no stage 1)": (
            dataclasses.replace(base, strength=1.0),
            true,
        ),
        "control: shuffled predicted contexts": (base, {k: v[shuffle] for k, v in predicted.items()}),
        "control: strength 0 (VAE round trip)": (dataclasses.replace(base, strength=0.0), predicted),
    }
    rows, sheet, paper = [], [("ground truth", gt[:sheet_images])], []
    t0 = time.perf_counter()
    stage1 = model.stage1.reconstruct(betas)

    def score(name: str, recon: np.ndarray, seconds: float | None = None) -> None:
        paper.append((name, scorer.score(recon, name)))
        rows.append(
            {
                "run": name,
                "pixcorr": round(float(pixcorr(gt, recon)), 4),
                "ssim": round(float(ssim(gt, recon)), 4),
                "clip_2way": round(clip_identification(extractor, gt_embeddings, recon), 4),
                "recurring_error": recurring_error(gt, recon)["ratio"],
                "seconds": None if seconds is None else round(seconds, 1),
                "paper": {m: round(v, 4) for m, v in paper[-1][1].values.items() if v is not None},
            }
        )

    score("stage 1", stage1, time.perf_counter() - t0)
    sheet.append(("stage 1", stage1[:sheet_images]))
    for name, (sampling, contexts) in runs.items():
        t0 = time.perf_counter()
        final = model.reconstruct(betas, sampling, contexts=contexts)["final"]
        score(name, final, time.perf_counter() - t0)
        if name in SHEET_ROWS:
            sheet.append((SHEET_ROWS[name], final[:sheet_images]))
    t0 = time.perf_counter()
    scale = base.vae_scale_factor
    with torch.no_grad():
        z = encode_images(model.vae, resize(gt, model.image_size), scale)
        score("control: VAE round trip of the ground truth", decode_latents(model.vae, z, scale))
    rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
    sizes = model_sizes(model, extractor)
    rank = max(model.clip[name].config.rank for name in CLIP_TARGETS)
    result = {
        "model_dir": str(model_dir),
        "data": str(data_dir),
        "n_test": len(gt),
        "sampling": config_to_dict(base),
        "rows": rows,
        "paper_metrics": scorer.info(),
        "sizes": sizes,
        "clip_ridge": model.info["clip_ridge"],
        "real_size_clip_ridge": real_size_parameter_report(rank=max(rank, 256)),
    }
    out.mkdir(parents=True, exist_ok=True)
    contact_sheet(sheet, out / "stage2_sheet.png")
    write_json(out / "stage2.json", result)
    lines = [
        "| run | PixCorr ↑ | SSIM ↑ | CLIP 2-way ↑ (subject's CLIP, ours) | recurring error ↓ | seconds |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['run']} | {r['pixcorr']:.3f} | {r['ssim']:.3f} | {r['clip_2way']:.3f} | "
        f"{r['recurring_error']:.2f} | {r['seconds']} |"
        for r in rows
    ]
    lines += ["", "Brain-Diffuser's eight metrics, in the papers' order (identification as %):", ""]
    lines += paper_table_rows(paper)
    lines += ["", "| model | parameters | full-rank parameters |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r.get('full_rank_parameters', '')} |" for r in sizes]
    write_text(out / "stage2.md", "\n".join(lines) + "\n")
    return result
