"""Fitting stage 2 of a subject: the CLIP regressors fitted on its betas, with the foundations they serve.

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
and a changed file is refused, as stage 1 does for its VDVAE. The fitted folder is loaded back by train/reference.py
`Stage2Model` (the two-stage torch reference); train/evaluation/stage2.py scores it on the test set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainrecon.config import config_to_dict
from brainrecon.errors import ConfigError, InputError
from brainrecon.io import atomic_dir, read_json, save_npy, write_json
from brainrecon.model_dir import CLIP_TARGETS, STAGE2_DIR, STAGE2_SUMMARY, clip_target_stat, uncond_context
from brainrecon.sampling import SamplingConfig
from brainrecon.train.foundations.loaders import DEFAULTS, load_clip, load_unet, load_vae
from brainrecon.train.stage1.fit import copy_preprocessing, load_prepared
from brainrecon.train.stage2.clip_ridge import ClipRidge, fit_clip_ridge


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
    with atomic_dir(model_dir / STAGE2_DIR, overwrite=True) as tmp:  # tmp: the stage folder, staged
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
            shape = targets[name].shape[1:]
            save_npy(tmp / Path(clip_target_stat(name, "mean")).name, model.target_mean.reshape(shape))
            save_npy(tmp / Path(clip_target_stat(name, "std")).name, model.target_std.reshape(shape))
            ridges[name] = {
                "alpha": alpha,
                "rank": model.config.rank,
                "parameters": model.parameter_count,
                "full_rank_parameters": model.full_rank_parameter_count,
                "val_mse_at_rank": _val_mse_at(model),
                "val_mse_full": model.config.val_mse_full,
            }
        uncond_text, uncond_vision = extractor.unconditional_contexts()
        save_npy(tmp / Path(uncond_context("text")).name, uncond_text)
        save_npy(tmp / Path(uncond_context("vision")).name, uncond_vision)
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
        write_json(tmp / Path(STAGE2_SUMMARY).name, summary)
    return summary


def _val_mse_at(model: ClipRidge) -> float | None:
    c = model.config
    if not c.val_ranks or c.rank not in c.val_ranks:
        return None
    return c.val_mse[c.val_ranks.index(c.rank)]
