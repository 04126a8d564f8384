"""Latent layers: how many VDVAE latent layers K stage 1 should predict, with ridge and with the bi-GRU.

Brain-Diffuser (Ozcelik & VanRullen 2023, ozcelikfu/brain-diffuser) regresses the first 31 of the 75 latent
layers of the ImageNet-64 VDVAE with ridge; the GRU decoding paper (Veronese et al., LorenzoVeronese/GRU-Decoding_JNE)
predicts the first 15 with its bi-GRU and compares 15 with 31. For each K and regressor this fits stage 1 on the
subject's training betas (`fit_stage1`) and scores the test reconstructions (PixCorr, SSIM, CLIP 2-way with the
small CLIP), with the regressor's parameter count and fit time; a third row per K decodes the *true* latents of
the test images (encode, keep K layers, decode): what K layers can carry at best, whatever the regressor.

    out/layers.json  settings and one row per (K, regressor); out/layers.md  the table
    out/layers.png   metrics vs K (ridge, GRU, true latents) and parameters / fit time vs K
    out/models/      the fitted stage-1 model dirs (not committed)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from brainrecon.errors import ConfigError
from brainrecon.io import read_json, write_json, write_text

METRICS = ("pixcorr", "ssim", "clip_2way")


def latent_layers(
    data_dir: str | Path,
    out: str | Path,
    layers: tuple[int, ...] = (1, 4, 8, 13, 17, 21),
    regressors: tuple[str, ...] = ("ridge", "gru"),
    max_epochs: int = 200,
    vdvae: str = "builtin:small64",
    clip: str = "builtin:small",
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    device: str = "cpu",
    encode_batch: int = 64,
    resume: bool = False,
) -> dict:
    """Fit and score stage 1 for every K in `layers` and regressor in `regressors` -> out/layers.{json,md,png}.

    `device` ("cpu", "cuda") runs the VDVAE, the GRU and the CLIP; `encode_batch` images per VDVAE encoder call
    (as `fit_stage1`). `resume`: keep the rows of every K that out/layers.json already has in full (same data,
    models, epoch cap and seed) and fit only the others, so a long sweep that was stopped goes on where it was."""
    from brainrecon.choices import REGRESSORS
    from brainrecon.metrics import pixcorr, ssim
    from brainrecon.train.device import resolve_device
    from brainrecon.train.evaluation.stage2 import clip_identification, clip_image_embeddings
    from brainrecon.train.foundations.loaders import load_clip, resolve_vdvae
    from brainrecon.train.foundations.vdvae import latent_dims
    from brainrecon.train.reference import Stage1Model, decode_images
    from brainrecon.train.stage1.fit import Stage1Config, encode_images, fit_stage1, load_prepared

    device = resolve_device(device)
    data_dir, out = Path(data_dir), Path(out)
    if not layers or len(set(layers)) != len(layers):
        raise ConfigError(f"latent_layers: expected distinct layer counts, found {layers}")
    unknown = [r for r in regressors if r not in REGRESSORS]
    if unknown or not regressors:
        raise ConfigError(f"latent_layers: regressors must be among {REGRESSORS}, found {regressors}")
    model, _ = resolve_vdvae(vdvae)
    model.to(device)
    total = model.config.num_latent_layers
    bad = [k for k in layers if not 1 <= k <= total]
    if bad:
        raise ConfigError(f"latent_layers: expected K in 1..{total} ({vdvae}), found {bad}")
    test_betas, test_images = load_prepared(data_dir, "test")
    gt = np.asarray(test_images)
    extractor, _ = load_clip(clip, device=device)
    gt_embeddings = clip_image_embeddings(extractor, gt)

    def scores(recon: np.ndarray) -> dict:
        return {
            "pixcorr": round(float(pixcorr(gt, recon)), 4),
            "ssim": round(float(ssim(gt, recon)), 4),
            "clip_2way": round(clip_identification(extractor, gt_embeddings, recon), 4),
        }

    t_start = time.perf_counter()
    result = {
        "data": str(data_dir),
        "n_test": len(gt),
        "vdvae": vdvae,
        "vdvae_latent_layers": total,
        "clip": clip,
        "max_epochs": max_epochs,
        "seed": seed,
        "rows": [],
    }
    rows: list[dict] = result["rows"]
    done = _finished_rows(result, out, regressors) if resume else {}
    out.mkdir(parents=True, exist_ok=True)
    for k in sorted(layers):
        if k in done:
            rows.extend(done[k])
            if progress:
                log(f"layers: K={k} kept from {out / 'layers.json'}")
            continue
        true_latents = encode_images(model, gt, k, encode_batch, progress=False)
        true = decode_images(model, true_latents, k)
        rows.append(
            {"k": k, "regressor": "true latents", "latent_dims": latent_dims(model.config, k), **scores(true)}
        )
        for regressor in regressors:
            model_dir = out / "models" / f"{regressor}-k{k}"
            cfg = Stage1Config(
                regressor=regressor, num_layers=k, seed=seed, max_epochs=max_epochs, vdvae=vdvae
            )
            fitted = fit_stage1(
                data_dir, model_dir, cfg, progress=progress, device=device, encode_batch=encode_batch
            )
            recon = Stage1Model.load(model_dir, device).reconstruct(test_betas)
            row = {
                "k": k,
                "regressor": regressor,
                "latent_dims": fitted["latent_dims"],
                "parameters": fitted["regressor_parameters"],
                "fit_seconds": fitted["fit_seconds"],
                **scores(recon),
            }
            if regressor == "gru":
                row.update(epochs=fitted["epochs"], best_epoch=fitted["best_epoch"])
            rows.append(row)
            if progress:
                log(
                    f"layers: {regressor} K={k}: PixCorr {row['pixcorr']:.3f} SSIM {row['ssim']:.3f} "
                    f"CLIP {row['clip_2way']:.3f} ({row['fit_seconds']} s fit, "
                    f"{time.perf_counter() - t_start:.0f} s total)"
                )
        _write(result, out)  # after every K: a long sweep leaves its finished rows behind
    return result


def _finished_rows(result: dict, out: Path, regressors: tuple[str, ...]) -> dict[int, list[dict]]:
    """K -> its rows in out/layers.json, for every K with a row for each of `regressors` and the true latents;
    the file's settings must be `result`'s. {} when there is no file."""
    path = out / "layers.json"
    if not path.exists():
        return {}
    saved = read_json(path, "the latent-layer sweep to resume")
    for key in ("data", "n_test", "vdvae", "clip", "max_epochs", "seed"):
        if saved.get(key) != result[key]:
            raise ConfigError(
                f"{path}: cannot resume, expected {key} {result[key]!r} (this run), found {saved.get(key)!r}"
            )
    by_k: dict[int, list[dict]] = {}
    for row in saved.get("rows", []):
        by_k.setdefault(int(row["k"]), []).append(row)
    wanted = {"true latents", *regressors}
    return {
        k: [r for r in rows if r["regressor"] in wanted]
        for k, rows in by_k.items()
        if wanted <= {r["regressor"] for r in rows}
    }


def _write(result: dict, out: Path) -> None:
    write_json(out / "layers.json", result)
    write_text(out / "layers.md", layers_table(result))
    plot_layers(result, out / "layers.png")


def layers_table(result: dict) -> str:
    lines = [
        f"Latent layers: {result['n_test']} test images, VDVAE {result['vdvae']} "
        f"({result['vdvae_latent_layers']} latent layers), GRU cap {result['max_epochs']} epochs "
        "(early stopping, patience 12).",
        "",
        "| K | regressor | latent dims | parameters | fit s | GRU epochs (best) | PixCorr ↑ | SSIM ↑ | CLIP 2-way ↑ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        params = f"{r['parameters']:,}" if "parameters" in r else ""
        epochs = f"{r['epochs']} ({r['best_epoch']})" if "epochs" in r else ""
        lines.append(
            f"| {r['k']} | {r['regressor']} | {r['latent_dims']:,} | {params} | {r.get('fit_seconds', '')} | "
            f"{epochs} | {r['pixcorr']:.3f} | {r['ssim']:.3f} | {r['clip_2way']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_layers(result: dict, path: str | Path) -> None:
    from brainrecon.train.experiments.plots import METRIC_LABELS, pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    styles = {"true latents": ("grey", "x:"), "ridge": ("C0", "o-"), "gru": ("C3", "s-")}
    for ax, metric in zip(axes[:3], METRICS, strict=True):
        for name, (color, style) in styles.items():
            rows = [r for r in result["rows"] if r["regressor"] == name]
            if rows:
                ax.plot([r["k"] for r in rows], [r[metric] for r in rows], style, color=color, label=name)
        if metric == "clip_2way":
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(METRIC_LABELS[metric])
        ax.set_xlabel("latent layers K")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[3]
    for name in ("ridge", "gru"):
        rows = [r for r in result["rows"] if r["regressor"] == name]
        if rows:
            color, style = styles[name]
            ax.plot(
                [r["k"] for r in rows],
                [r["parameters"] for r in rows],
                style,
                color=color,
                label=f"{name} params",
            )
            ax.plot(
                [r["k"] for r in rows],
                [r["fit_seconds"] for r in rows],
                style.replace("-", "--"),
                color=color,
                alpha=0.6,
                label=f"{name} fit s",
            )
    ax.set_yscale("log")
    ax.set_title("parameters / fit seconds")
    ax.set_xlabel("latent layers K")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Latent layers ({result['vdvae']}, {result['n_test']} test images)", fontsize=10)
    save_figure(fig, path)
