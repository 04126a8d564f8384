"""Stage-1 results on a subject's test set: the reconstructions `recon-reconstruct --stage 1` writes, and the
ridge vs GRU table of `recon-eval stage1` with its controls (the mean training image, shuffled betas)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from brainrecon.images import contact_sheet, png_name, save_png
from brainrecon.io import atomic_dir, load_npy, save_npy, write_json, write_text
from brainrecon.metrics import pixcorr, ssim
from brainrecon.train.evaluation.paper_metrics import PaperScorer, paper_table_rows
from brainrecon.train.reference import Stage1Model
from brainrecon.train.stage1.fit import Stage1Config, fit_stage1, load_prepared


def reconstruct_test_set(
    model_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Stage-1 reconstructions of a recon-prepare test set: PNGs, a contact sheet and metrics, atomically."""
    model = Stage1Model.load(model_dir, device)
    betas, images = load_prepared(Path(data_dir), "test")
    t0 = time.perf_counter()
    recon = model.reconstruct(betas)
    seconds = time.perf_counter() - t0
    ids = load_npy(Path(data_dir) / "test_stim_ids.npy")
    gt = np.asarray(images)
    metrics = {
        "n": len(recon),
        "pixcorr": float(pixcorr(gt, recon)),
        "ssim": float(ssim(gt, recon)),
        "seconds": round(seconds, 2),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for row, img in enumerate(recon):
            save_png(tmp / png_name("stage1", row), img)
        save_npy(tmp / "stage1_images.npy", recon)
        save_npy(tmp / "stim_ids.npy", ids)  # row -> 0-based stimulus id
        contact_sheet([("ground truth", gt), ("stage 1", recon)], tmp / "contact_sheet.png")
        write_json(tmp / "metrics.json", metrics)
    return metrics


def compare_stage1(
    data_dir: str | Path,
    out: str | Path,
    layers: tuple[int, ...],
    vdvae: str = "builtin:small64",
    max_epochs: int = 200,
    seed: int = 0,
    device: str | torch.device = "cpu",
    encode_batch: int = 64,
    weights: str | Path | None = None,
) -> list[dict]:
    """Ridge vs GRU at each K, plus controls, on a subject's test set -> out/stage1.{json,md}, stage1_sheet.png.

    `device` and `encode_batch` as `fit_stage1`; the reconstructions run on `device` too. Each row also has `paper`:
    Brain-Diffuser's eight metrics, as many as `weights` has files for (PixCorr and SSIM always).
    """
    data_dir, out = Path(data_dir), Path(out)
    test_betas, test_images = load_prepared(data_dir, "test")
    gt = np.asarray(test_images)
    rows, sheet, paper = [], [("ground truth", gt)], []
    scorer = PaperScorer(gt, weights, device=device, show_progress=weights is not None)

    def score(name: str, recon: np.ndarray, **extra) -> None:
        paper.append((name, scorer.score(recon, name)))
        rows.append(
            {
                "model": name,
                "pixcorr": round(float(pixcorr(gt, recon)), 4),
                "ssim": round(float(ssim(gt, recon)), 4),
                **extra,
                "paper": {m: round(v, 4) for m, v in paper[-1][1].values.items() if v is not None},
            }
        )

    _, train_images = load_prepared(data_dir, "train")
    mean_image = np.asarray(train_images, dtype=np.float64).mean(axis=0)
    score(
        "control: mean training image",
        np.repeat(np.rint(mean_image)[None].astype(np.uint8), len(gt), axis=0),
        parameters=0,
    )
    for k in layers:
        for regressor in ("ridge", "gru"):
            model_dir = out / "models" / f"{regressor}-k{k}"
            cfg = Stage1Config(
                regressor=regressor, num_layers=k, seed=seed, max_epochs=max_epochs, vdvae=vdvae
            )
            info = fit_stage1(data_dir, model_dir, cfg, device=device, encode_batch=encode_batch)
            recon = Stage1Model.load(model_dir, device).reconstruct(test_betas)
            score(
                f"{regressor} K={k}",
                recon,
                latent_dims=info["latent_dims"],
                parameters=info["regressor_parameters"],
                fit_seconds=info["fit_seconds"],
            )
            sheet.append((f"{regressor} K={k}", recon))
    k = max(layers)
    model_dir = out / "models" / f"ridge-k{k}-shuffled"
    fit_stage1(
        data_dir,
        model_dir,
        Stage1Config(regressor="ridge", num_layers=k, seed=seed, vdvae=vdvae),
        shuffle_pairs=True,
        device=device,
        encode_batch=encode_batch,
    )
    shuffled = Stage1Model.load(model_dir, device).reconstruct(test_betas)
    score(f"control: ridge K={k}, shuffled betas", shuffled)
    contact_sheet(sheet, out / "stage1_sheet.png")
    write_json(
        out / "stage1.json",
        {
            "data": str(data_dir),
            "n_test": len(gt),
            "vdvae": vdvae,
            "rows": rows,
            "paper_metrics": scorer.info(),
        },
    )
    lines = ["| model | latent dims | regressor parameters | PixCorr | SSIM |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r.get('latent_dims', '')} | {r.get('parameters', '')} | {r['pixcorr']:.3f} | {r['ssim']:.3f} |"
        for r in rows
    ]
    lines += ["", "Brain-Diffuser's eight metrics, in the papers' order (identification as %):", ""]
    lines += paper_table_rows(paper)
    write_text(out / "stage1.md", "\n".join(lines) + "\n")
    return rows
