"""Fitting stage 1 for one subject: betas -> VDVAE latents (ridge or the seed paper's bi-GRU) -> VDVAE decode.

Model directory layout (`--model-dir`), shared with later stages:

    preprocess.json, voxel_mean.npy, voxel_std.npy, mask_indices.npy   copied from `recon-prepare`
    stage1/stage1.json        Stage1Config, foundation VDVAE (source, sha256, config), dims, parameter counts
    stage1/gru.* | ridge.*    regressor weights (safetensors) and configs
    stage1/latent_mean.npy, latent_std.npy   training-latent statistics for prediction re-normalisation

The foundation VDVAE is the shipped `small64` by default, or a folder written by `save_vdvae`
(`recon-train foundation vdvae`), or an openai checkpoint file (`imagenet64-iter-1600000-model-ema.th`)
(train/foundations/loaders.py `resolve_vdvae`). The fitted folder is loaded back by train/reference.py
`Stage1Model`; train/evaluation/stage1.py scores it on the test set.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from brainrecon.choices import REGRESSORS
from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.images import resize
from brainrecon.io import atomic_dir, atomic_path, load_npy, save_npy, sha256_file, write_json
from brainrecon.model_dir import LATENT_MEAN, LATENT_STD, PREPROCESS_FILES, STAGE1_DIR, STAGE1_SUMMARY
from brainrecon.train.foundations.loaders import resolve_vdvae
from brainrecon.train.foundations.vdvae import VDVAE, encode_latents, latent_dims
from brainrecon.train.stage1 import gru as gru_mod
from brainrecon.train.stage1.ridge import RidgeRegressor, fit_alpha_on_validation, target_stats

# Latent layers used by default: the seed paper's 15 of 75 for imagenet64; for small64 the layers up to 8x8
# plus the first 16x16 one, a similar share of the hierarchy.
DEFAULT_LAYERS = {"imagenet64": 15, "small64": 13}


@dataclass(frozen=True)
class Stage1Config:
    regressor: str = "gru"
    num_layers: int | None = None  # None: DEFAULT_LAYERS of the foundation
    alpha: float | None = 5e4  # ridge; None picks one on a 10% validation split
    renormalize: bool = True  # Brain-Diffuser's transductive re-normalisation of predictions
    seed: int = 0
    max_epochs: int = 200  # GRU
    vdvae: str = "builtin:small64"

    def __post_init__(self) -> None:
        if self.regressor not in REGRESSORS:
            raise ConfigError(
                f"Stage1Config: regressor must be one of {REGRESSORS}, found {self.regressor!r}"
            )


def load_prepared(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(betas (N, V) float32, images (N, S, S, 3) uint8) of one split of a recon-prepare folder."""
    betas = load_npy(data_dir / f"{split}_betas.npy", f"{split} betas from recon-prepare")
    images = load_npy(data_dir / f"{split}_images.npy", f"{split} images from recon-prepare", mmap=True)
    if len(betas) != len(images):
        raise InputError(data_dir, f"as many {split} images as betas ({len(betas)})", f"{len(images)}")
    return betas, images


@torch.no_grad()
def encode_images(
    model: VDVAE, images: np.ndarray, num_layers: int, batch: int = 64, progress: bool = True
) -> np.ndarray:
    """uint8 (N, S, S, 3) images -> (N, D) VDVAE posterior-mean latents, resized to the model's size."""
    size = model.config.image_size
    out = np.empty((len(images), latent_dims(model.config, num_layers)), dtype=np.float32)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("VDVAE encode", total=len(images))
        for i in range(0, len(images), batch):
            chunk = resize(np.asarray(images[i : i + batch]), size)
            out[i : i + batch] = (
                encode_latents(model, torch.tensor(chunk, dtype=torch.float32), num_layers).cpu().numpy()
            )
            bar.advance(task, len(chunk))
    return out


def copy_preprocessing(data_dir: Path, model_dir: Path) -> None:
    """Put recon-prepare's preprocessing beside the models; refuse a model dir made from other data."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in PREPROCESS_FILES:
        src, dst = data_dir / name, model_dir / name
        if not src.is_file():
            raise MissingFileError(src, "recon-prepare output", "run recon-prepare first")
        if dst.is_file() and sha256_file(dst) != sha256_file(src):
            raise InputError(
                dst, f"the same {name} as {data_dir}", "a different file (use a new --model-dir)"
            )
        if not dst.is_file():
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)


def fit_stage1(
    data_dir: str | Path,
    model_dir: str | Path,
    config: Stage1Config = Stage1Config(),
    progress: bool = True,
    shuffle_pairs: bool = False,
    device: str | torch.device = "cpu",
    encode_batch: int = 64,
) -> dict:
    """Fit the stage-1 regressor of one subject and write `model_dir/stage1/` atomically.

    `shuffle_pairs` permutes betas against images (a control that must score at chance). `device` runs the VDVAE
    encoding and the GRU training (the ridge is a float64 numpy solve, on the CPU); `encode_batch` images per
    VDVAE call (the imagenet64 encoder holds ~0.2 GB of activations per image at 64 px in fp32).
    """
    from brainrecon.train.device import resolve_device

    device = resolve_device(device)
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    t0 = time.perf_counter()
    train_betas, train_images = load_prepared(data_dir, "train")
    vdvae, foundation = resolve_vdvae(config.vdvae)
    num_layers = config.num_layers or DEFAULT_LAYERS.get(vdvae.config.name, 15)
    latents = encode_images(vdvae.to(device), train_images, num_layers, encode_batch, progress)  # (N, D)
    vdvae.cpu()
    if shuffle_pairs:
        train_betas = train_betas[np.random.default_rng(config.seed).permutation(len(train_betas))]
    copy_preprocessing(data_dir, model_dir)
    with atomic_dir(model_dir / STAGE1_DIR, overwrite=True) as tmp:  # tmp: the stage folder, staged
        if config.regressor == "ridge":
            alpha = config.alpha
            search = None
            if alpha is None:
                search = fit_alpha_on_validation(
                    train_betas, latents, alphas=np.logspace(2, 6, 9), seed=config.seed
                )
                alpha = search.best_alpha
            reg = RidgeRegressor(alpha).fit(train_betas, latents)
            reg.save(tmp, "ridge")
            n_params = int(reg.coef.size + reg.intercept.size)
            extra = {"alpha": alpha, "alpha_search": dataclasses.asdict(search) if search else None}
        else:
            train_cfg = gru_mod.GRUTrainConfig(max_epochs=config.max_epochs)
            model, history = gru_mod.train_gru(
                train_betas, latents, train_cfg, seed=config.seed, progress=progress, device=device
            )
            gru_mod.save_gru(model.cpu(), tmp, "gru", train_cfg, history)
            n_params = gru_mod.count_parameters(model)
            extra = {
                "epochs": len(history.lrs),
                "best_epoch": history.best_epoch,
                "best_val_mse": history.best_val_mse,
            }
        mean, std = target_stats(latents)
        save_npy(tmp / Path(LATENT_MEAN).name, mean.astype(np.float32))
        save_npy(tmp / Path(LATENT_STD).name, std.astype(np.float32))
        summary = {
            "config": {**dataclasses.asdict(config), "num_layers": num_layers},
            "foundation": {"vdvae": foundation},
            "n_voxels": int(train_betas.shape[1]),
            "latent_dims": int(latents.shape[1]),
            "n_train": len(train_betas),
            "regressor_parameters": n_params,
            "shuffled_pairs_control": shuffle_pairs,
            "fit_seconds": round(time.perf_counter() - t0, 1),
            **extra,
        }
        write_json(tmp / Path(STAGE1_SUMMARY).name, summary)
    return summary
