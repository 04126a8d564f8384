"""Stage 2 of a subject: CLIP regressors fitted on its betas, and the two-stage torch reference reconstruction.

Brain-Diffuser (Ozcelik & VanRullen 2023) step 2: betas → CLIP-text (77 tokens) and CLIP-vision (257 tokens)
embeddings by per-token ridge (text alpha 1e5, vision 6e4), here stored at reduced rank (train/stage2/clip_ridge.py);
then the stage-1 image is refined by Versatile Diffusion img2img guided by both predictions (train/stage2/img2img.py).

    model_dir/stage2/stage2.json        config, sampling settings, foundations (source + sha256), shapes, sizes
    model_dir/stage2/clip_text.{safetensors,json}    reduced-rank ridge betas → (Nt, D)
    model_dir/stage2/clip_vision.{safetensors,json}  reduced-rank ridge betas → (Nv, D)
    model_dir/stage2/clip_{text,vision}_target_{mean,std}.npy  (Nt|Nv, D) training-target statistics
    model_dir/stage2/uncond_text.npy    (1, Nt, D) CLIP-text of ""          (classifier-free guidance)
    model_dir/stage2/uncond_vision.npy  (1, Nv, D) CLIP-vision of a black image

The VAE and UNet stay where the foundation spec points (the shipped weights by default); their sha256 is recorded
and a changed file is refused, as stage 1 does for its VDVAE.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from brainrecon.config import config_from_dict, config_to_dict
from brainrecon.errors import ConfigError, InputError
from brainrecon.images import resize
from brainrecon.io import atomic_dir, load_npy, read_json, save_npy, write_json, write_text
from brainrecon.noise import img2img_noise
from brainrecon.sampling import SamplingConfig
from brainrecon.train.foundations.dual_unet import DualUNetConfig
from brainrecon.train.foundations.loaders import DEFAULTS, load_clip, load_unet, load_vae
from brainrecon.train.stage1.fit import Stage1Model, copy_preprocessing, load_prepared
from brainrecon.train.stage2.clip_ridge import ClipRidge, fit_clip_ridge
from brainrecon.train.stage2.img2img import img2img, vd_scheduler

STAGE_DIR = "stage2"
SHEET_ROWS = {  # compare_stage2 runs shown in its contact sheet, with their row labels
    "stage 1+2 (fitted settings)": "stage 1+2",
    "stage 1+2, guidance 3": "guidance 3",
    "oracle: true CLIP contexts": "oracle CLIP",
    "oracle: true CLIP contexts, strength 1 (no stage 1)": "oracle, no stage 1",
}
CLIP_TARGETS = ("text", "vision")


@dataclass(frozen=True)
class Stage2Config:
    """What `recon-train subject --stage clip` fits, and the foundations it uses."""

    clip: str = DEFAULTS["clip"]
    vae: str = DEFAULTS["vae"]
    unet: str = DEFAULTS["unet"]
    text_alpha: float = 1e5  # Brain-Diffuser's cliptext_regression.py
    vision_alpha: float = 6e4  # Brain-Diffuser's clipvision_regression.py
    rank: int | None = None  # None: smallest rank within 1% of full-rank validation MSE
    renormalize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("text_alpha", "vision_alpha"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"Stage2Config: expected {name} > 0, found {getattr(self, name)}")


def clip_targets(data_dir: Path, split: str, extractor, images: np.ndarray) -> dict[str, np.ndarray]:
    """CLIP-text (captions of each image averaged) and CLIP-vision token embeddings of one split."""
    captions = read_json(data_dir / f"{split}_captions.json", f"{split} captions from recon-prepare")
    if len(captions) != len(images):
        raise InputError(
            data_dir / f"{split}_captions.json", f"{len(images)} caption lists", str(len(captions))
        )
    return {
        "text": extractor.text_embeddings(captions),
        "vision": extractor.vision_embeddings(np.asarray(images)),
    }


def fit_stage2(
    data_dir: str | Path,
    model_dir: str | Path,
    config: Stage2Config = Stage2Config(),
    device: str | torch.device = "cpu",
) -> dict:
    """Fit the subject's two CLIP regressors and write `model_dir/stage2/` atomically. `device` runs the CLIP
    feature extraction (the ridges are numpy solves on the CPU)."""
    from brainrecon.train.device import resolve_device

    device = resolve_device(device)
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    t0 = time.perf_counter()
    train_betas, train_images = load_prepared(data_dir, "train")
    extractor, clip_info = load_clip(config.clip, device=device)
    vae, vae_info = load_vae(config.vae)  # load once now: a broken foundation fails before the fit
    _, dual_config, unet_info = load_unet(config.unet)
    shapes = extractor.shapes
    if (shapes.vision_tokens, shapes.text_tokens, shapes.dim) != (
        dual_config.vision_tokens,
        dual_config.text_tokens,
        dual_config.cross_attention_dim,
    ):
        raise ConfigError(
            f"{config.unet}: expected a UNet conditioned on {config.clip}'s tokens "
            f"({shapes.vision_tokens} vision + {shapes.text_tokens} text, dim {shapes.dim}), found "
            f"{dual_config.vision_tokens} + {dual_config.text_tokens}, dim {dual_config.cross_attention_dim}"
        )
    targets = clip_targets(data_dir, "train", extractor, train_images)
    copy_preprocessing(data_dir, model_dir)
    ridges = {}
    with atomic_dir(model_dir / STAGE_DIR, overwrite=True) as tmp:
        for name in CLIP_TARGETS:
            alpha = config.text_alpha if name == "text" else config.vision_alpha
            model = fit_clip_ridge(
                train_betas,
                targets[name],
                alpha,
                rank=config.rank,
                seed=config.seed,
                renormalize=config.renormalize,
            )
            model.save(tmp, f"clip_{name}")
            # the re-normalisation statistics again as .npy: what the torch-free runtime reads
            save_npy(tmp / f"clip_{name}_target_mean.npy", model.target_mean.reshape(targets[name].shape[1:]))
            save_npy(tmp / f"clip_{name}_target_std.npy", model.target_std.reshape(targets[name].shape[1:]))
            ridges[name] = {
                "alpha": alpha,
                "rank": model.config.rank,
                "parameters": model.parameter_count,
                "full_rank_parameters": model.full_rank_parameter_count,
                "val_mse_at_rank": _val_mse_at(model),
                "val_mse_full": model.config.val_mse_full,
            }
        uncond_text, uncond_vision = extractor.unconditional_contexts()
        save_npy(tmp / "uncond_text.npy", uncond_text)
        save_npy(tmp / "uncond_vision.npy", uncond_vision)
        summary = {
            "config": config_to_dict(config),
            # the latent scale the UNet was trained with: the VAE's own (0.18215 for Versatile Diffusion's)
            "sampling": config_to_dict(
                SamplingConfig(seed=config.seed, vae_scale_factor=float(vae.config.scaling_factor))
            ),
            "foundation": {"clip": clip_info, "vae": vae_info, "unet": unet_info},
            "dual_unet": config_to_dict(dual_config),
            "n_voxels": int(train_betas.shape[1]),
            "n_train": len(train_betas),
            "text_tokens": shapes.text_tokens,
            "vision_tokens": shapes.vision_tokens,
            "clip_dim": shapes.dim,
            "clip_ridge": ridges,
            "fit_seconds": round(time.perf_counter() - t0, 1),
        }
        write_json(tmp / "stage2.json", summary)
    return summary


def _val_mse_at(model: ClipRidge) -> float | None:
    c = model.config
    if not c.val_ranks or c.rank not in c.val_ranks:
        return None
    return c.val_mse[c.val_ranks.index(c.rank)]


@dataclass
class Stage2Model:
    """A fitted subject, both stages, loaded for reconstruction: the torch reference the runtime must match."""

    stage1: Stage1Model
    clip: dict[str, ClipRidge]
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    dual_config: DualUNetConfig
    uncond: dict[str, np.ndarray]  # "text" (1, Nt, D), "vision" (1, Nv, D)
    sampling: SamplingConfig
    info: dict

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> Stage2Model:
        """The fitted subject with its VDVAE, GRU, VAE and UNet on `device` (the CLIP ridges run in numpy)."""
        from brainrecon.train.device import resolve_device

        device = resolve_device(device)
        stage_dir = Path(model_dir) / STAGE_DIR
        info = read_json(stage_dir / "stage2.json", "stage-2 summary (recon-train subject --stage clip)")
        config = config_from_dict(Stage2Config, info["config"], str(stage_dir / "stage2.json"))
        vae, vae_info = load_vae(config.vae)
        unet, dual_config, unet_info = load_unet(config.unet)
        for name, found in (("vae", vae_info), ("unet", unet_info)):
            expected = info["foundation"][name]["sha256"]
            if found["sha256"] != expected:
                raise InputError(
                    found["source"],
                    f"the {name} stage 2 was fitted with (sha256 {expected[:12]}…)",
                    f"sha256 {found['sha256'][:12]}… (re-run recon-train subject --stage clip)",
                )
        return cls(
            stage1=Stage1Model.load(model_dir, device),
            clip={name: ClipRidge.load(stage_dir, f"clip_{name}") for name in CLIP_TARGETS},
            vae=vae.to(device),
            unet=unet.to(device),
            dual_config=dual_config,
            uncond={name: load_npy(stage_dir / f"uncond_{name}.npy") for name in CLIP_TARGETS},
            sampling=config_from_dict(SamplingConfig, info["sampling"], str(stage_dir / "stage2.json")),
            info=info,
        )

    @property
    def image_size(self) -> int:
        return int(self.vae.config.sample_size)

    def predict_contexts(self, betas: np.ndarray) -> dict[str, np.ndarray]:
        """(N, V) betas → {"text": (N, Nt, D), "vision": (N, Nv, D)}; re-normalised over the batch if configured."""
        return {name: self.clip[name].predict(betas) for name in CLIP_TARGETS}

    def reconstruct(
        self,
        betas: np.ndarray,
        sampling: SamplingConfig | None = None,
        contexts: dict[str, np.ndarray] | None = None,
        batch_size: int = 50,
        progress: bool = True,
    ) -> dict[str, np.ndarray]:
        """(N, V) z-scored betas → {"stage1": uint8 (N, s, s, 3), "final": uint8 (N, S, S, 3)}.

        The noise of all N images is drawn at once from `sampling.seed` (brainrecon.noise), so the result does not
        depend on `batch_size`. `contexts` replaces the predicted CLIP embeddings (oracle controls).
        """
        from rich.progress import Progress

        sampling = sampling or self.sampling
        stage1 = self.stage1.reconstruct(betas)  # (N, s, s, 3)
        init = resize(stage1, self.image_size)  # (N, S, S, 3)
        contexts = contexts or self.predict_contexts(betas)
        side = self.image_size // 2 ** (len(self.vae.config.block_out_channels) - 1)
        noise = img2img_noise((len(betas), self.vae.config.latent_channels, side, side), sampling.seed)
        uncond = {k: torch.from_numpy(v) for k, v in self.uncond.items()}
        final = []
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("stage 2 img2img", total=len(betas))
            for i in range(0, len(betas), batch_size):
                part = slice(i, i + batch_size)
                final.append(
                    img2img(
                        self.unet,
                        self.vae,
                        vd_scheduler(),
                        init[part],
                        torch.from_numpy(contexts["vision"][part]),
                        torch.from_numpy(contexts["text"][part]),
                        uncond["vision"],
                        uncond["text"],
                        sampling,
                        dual_config=self.dual_config,
                        noise=torch.from_numpy(noise[part]),
                    )
                )
                bar.advance(task, len(final[-1]))
        return {"stage1": stage1, "final": np.concatenate(final)}


def clip_image_embeddings(extractor, images: np.ndarray) -> np.ndarray:
    """(N, D) CLIP image embeddings (projected, normalised CLS token) at the extractor's image size."""
    return extractor.vision_embeddings(resize(np.asarray(images), extractor.preprocess.image_size))[:, 0]


def clip_identification(extractor, gt_embeddings: np.ndarray, recon: np.ndarray) -> float:
    """2-way identification of reconstructions among ground truths on CLIP image embeddings (gt: computed once
    with `clip_image_embeddings`)."""
    from brainrecon.metrics import two_way_identification

    return float(two_way_identification(gt_embeddings, clip_image_embeddings(extractor, recon)))


def reconstruct_test_set(
    model_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    overwrite: bool = False,
    sampling: SamplingConfig | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Two-stage reconstructions of a recon-prepare test set: PNGs, contact sheet, metrics.json, atomically."""
    from brainrecon.images import contact_sheet, png_name, save_png
    from brainrecon.metrics import pixcorr, ssim

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
) -> dict:
    """Stage 1 vs stage 1+2 on a subject's test set, beside controls that say where stage 2's gains come from.

    Rows: stage 1; stage 1+2 at the fitted settings; guidance 1 (no guidance) and 3; strength 0.5; oracle CLIP
    contexts (the true embeddings of the test images: the ceiling of the regressors), also at strength 1 (pure
    generation from them: how well the UNet follows its conditioning); shuffled predicted contexts (conditioning
    that belongs to other images); strength 0 (the VAE round trip of stage 1, no diffusion); the VAE round trip of
    the ground truth (the VAE's own ceiling). Every row also has `recurring_error`, the max / median of the error
    map averaged over the images (`train/experiments/blob.py`): a fixed-position artifact raises it. Writes
    out/stage2.{json,md}, out/stage2_sheet.png. The torch models (the subject's and the CLIP) run on `device`.
    """
    from brainrecon.images import contact_sheet
    from brainrecon.metrics import pixcorr, ssim
    from brainrecon.train.experiments.blob import recurring_error
    from brainrecon.train.stage2.img2img import decode_latents, encode_images

    data_dir, out = Path(data_dir), Path(out)
    model = Stage2Model.load(model_dir, device)
    extractor, _ = load_clip(model.info["config"]["clip"], device=device)
    betas, images = load_prepared(data_dir, "test")
    gt = np.asarray(images)
    predicted = model.predict_contexts(betas)
    true = clip_targets(data_dir, "test", extractor, gt)
    gt_embeddings = clip_image_embeddings(extractor, gt)
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
    rows, sheet = [], [("ground truth", gt[:sheet_images])]
    t0 = time.perf_counter()
    stage1 = model.stage1.reconstruct(betas)

    def score(name: str, recon: np.ndarray, seconds: float | None = None) -> None:
        rows.append(
            {
                "run": name,
                "pixcorr": round(float(pixcorr(gt, recon)), 4),
                "ssim": round(float(ssim(gt, recon)), 4),
                "clip_2way": round(clip_identification(extractor, gt_embeddings, recon), 4),
                "recurring_error": recurring_error(gt, recon)["ratio"],
                "seconds": None if seconds is None else round(seconds, 1),
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
    from brainrecon.train.stage2.clip_ridge import real_size_parameter_report

    rank = max(model.clip[name].config.rank for name in CLIP_TARGETS)
    result = {
        "model_dir": str(model_dir),
        "data": str(data_dir),
        "n_test": len(gt),
        "sampling": config_to_dict(base),
        "rows": rows,
        "sizes": sizes,
        "clip_ridge": model.info["clip_ridge"],
        "real_size_clip_ridge": real_size_parameter_report(rank=max(rank, 256)),
    }
    out.mkdir(parents=True, exist_ok=True)
    contact_sheet(sheet, out / "stage2_sheet.png")
    write_json(out / "stage2.json", result)
    lines = [
        "| run | PixCorr ↑ | SSIM ↑ | CLIP 2-way ↑ | recurring error ↓ | seconds |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['run']} | {r['pixcorr']:.3f} | {r['ssim']:.3f} | {r['clip_2way']:.3f} | "
        f"{r['recurring_error']:.2f} | {r['seconds']} |"
        for r in rows
    ]
    lines += ["", "| model | parameters | full-rank parameters |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r.get('full_rank_parameters', '')} |" for r in sizes]
    write_text(out / "stage2.md", "\n".join(lines) + "\n")
    return result
