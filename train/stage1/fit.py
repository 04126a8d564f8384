"""Stage 1 for one subject: betas -> VDVAE latents (ridge or the seed paper's bi-GRU) -> VDVAE decode.

Model directory layout (`--model-dir`), shared with later stages:

    preprocess.json, voxel_mean.npy, voxel_std.npy, mask_indices.npy   copied from `recon-prepare`
    stage1/stage1.json        Stage1Config, foundation VDVAE (source, sha256, config), dims, parameter counts
    stage1/gru.* | ridge.*    regressor weights (safetensors) and configs
    stage1/latent_mean.npy, latent_std.npy   training-latent statistics for prediction re-normalisation

The foundation VDVAE is the shipped `small64` by default, or a folder written by `save_vdvae`
(`recon-train foundation vdvae`), or an openai checkpoint file (`imagenet64-iter-1600000-model-ema.th`).
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

import brainrecon
from brainrecon.config import config_from_dict
from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.images import resize
from brainrecon.io import (
    atomic_dir,
    atomic_path,
    load_npy,
    read_json,
    save_npy,
    sha256_file,
    write_json,
    write_text,
)
from brainrecon.model_dir import PREPROCESS_FILES
from brainrecon.train.foundations.vdvae import (
    VDVAE,
    VDVAE_CONFIGS,
    decode_latents,
    encode_latents,
    latent_dims,
    load_openai_checkpoint,
    load_vdvae,
)
from brainrecon.train.stage1 import gru as gru_mod
from brainrecon.train.stage1.ridge import (
    RidgeRegressor,
    fit_alpha_on_validation,
    renormalize_predictions,
    target_stats,
)

BUILTIN_WEIGHTS = Path(brainrecon.__file__).resolve().parent / "weights"  # shipped in the core package
# Latent layers used by default: the seed paper's 15 of 75 for imagenet64; for small64 the layers up to 8x8
# plus the first 16x16 one, a similar share of the hierarchy.
DEFAULT_LAYERS = {"imagenet64": 15, "small64": 13}
REGRESSORS = ("gru", "ridge")


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


def resolve_vdvae(spec: str) -> tuple[VDVAE, dict]:
    """Foundation VDVAE from 'builtin:<name>', a save_vdvae folder or an openai checkpoint file."""
    if spec.startswith("builtin:"):
        path = BUILTIN_WEIGHTS / f"vdvae-{spec.removeprefix('builtin:')}"
        if not path.is_dir():
            raise MissingFileError(
                path, f"shipped VDVAE weights for {spec}", "re-install brainrecon or pass --vdvae"
            )
        model, weights = load_vdvae(path), path / "model.safetensors"
    elif Path(spec).is_dir():
        model, weights = load_vdvae(spec), Path(spec) / "model.safetensors"
    elif Path(spec).is_file():
        model, weights = load_openai_checkpoint(spec, VDVAE_CONFIGS["imagenet64"]), Path(spec)
    else:
        raise MissingFileError(
            spec, "VDVAE weights (a folder from recon-train foundation vdvae, or an openai .th file)"
        )
    info = {"source": spec, "sha256": sha256_file(weights), "config": dataclasses.asdict(model.config)}
    return model.eval(), info


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


@torch.no_grad()
def decode_images(model: VDVAE, latents: np.ndarray, num_layers: int, batch: int = 64) -> np.ndarray:
    """(N, D) latents -> uint8 (N, S, S, 3), deterministic decode (prior means after layer K, DmoL mode)."""
    out = []
    for i in range(0, len(latents), batch):
        img = decode_latents(model, torch.from_numpy(latents[i : i + batch]), num_layers, deterministic=True)
        out.append(np.clip(np.rint(img.cpu().numpy()), 0, 255).astype(np.uint8))
    return np.concatenate(out)


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
    with atomic_dir(model_dir / "stage1", overwrite=True) as tmp:
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
        save_npy(tmp / "latent_mean.npy", mean.astype(np.float32))
        save_npy(tmp / "latent_std.npy", std.astype(np.float32))
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
        write_json(tmp / "stage1.json", summary)
    return summary


@dataclass
class Stage1Model:
    """A fitted stage 1, loaded for reconstruction (the torch reference the runtime must match)."""

    config: Stage1Config
    num_layers: int
    vdvae: VDVAE
    regressor: object  # RidgeRegressor or GRUMapper
    latent_mean: np.ndarray
    latent_std: np.ndarray
    n_voxels: int

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> Stage1Model:
        """The fitted stage 1; the VDVAE and a GRU on `device` (a ridge predicts in numpy)."""
        from brainrecon.train.device import resolve_device

        device = resolve_device(device)
        stage_dir = Path(model_dir) / "stage1"
        info = read_json(stage_dir / "stage1.json", "stage-1 summary (recon-train subject --stage vdvae)")
        cfg = dict(info["config"])
        num_layers = cfg.pop("num_layers")
        config = config_from_dict(
            Stage1Config, {**cfg, "num_layers": num_layers}, str(stage_dir / "stage1.json")
        )
        vdvae, foundation = resolve_vdvae(config.vdvae)
        if foundation["sha256"] != info["foundation"]["vdvae"]["sha256"]:
            raise InputError(
                config.vdvae,
                f"the VDVAE the regressor was fitted with (sha256 {info['foundation']['vdvae']['sha256'][:12]}…)",
                f"sha256 {foundation['sha256'][:12]}… (re-fit stage 1)",
            )
        if config.regressor == "ridge":
            regressor = RidgeRegressor.load(stage_dir, "ridge")
        else:
            regressor = gru_mod.load_gru(stage_dir, "gru", device=device)
        return cls(
            config,
            num_layers,
            vdvae.to(device),
            regressor,
            load_npy(stage_dir / "latent_mean.npy"),
            load_npy(stage_dir / "latent_std.npy"),
            info["n_voxels"],
        )

    def predict_latents(self, betas: np.ndarray, renormalize: bool | None = None) -> np.ndarray:
        if betas.ndim != 2 or betas.shape[1] != self.n_voxels:
            raise InputError("betas", f"(N, {self.n_voxels}) z-scored betas", f"shape {betas.shape}")
        if isinstance(self.regressor, RidgeRegressor):
            pred = self.regressor.predict(betas)
        else:
            pred = gru_mod.predict(self.regressor, betas)
        if self.config.renormalize if renormalize is None else renormalize:
            pred = renormalize_predictions(pred, self.latent_mean, self.latent_std)
        return pred

    def reconstruct(self, betas: np.ndarray, renormalize: bool | None = None) -> np.ndarray:
        """(N, V) z-scored betas -> (N, S, S, 3) uint8 stage-1 images."""
        return decode_images(self.vdvae, self.predict_latents(betas, renormalize), self.num_layers)


def reconstruct_test_set(
    model_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Stage-1 reconstructions of a recon-prepare test set: PNGs, a contact sheet and metrics, atomically."""
    from brainrecon.images import contact_sheet, png_name, save_png
    from brainrecon.metrics import pixcorr, ssim

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
) -> list[dict]:
    """Ridge vs GRU at each K, plus controls, on a subject's test set -> out/stage1.{json,md}, stage1_sheet.png.

    `device` and `encode_batch` as `fit_stage1`; the reconstructions run on `device` too.
    """
    from brainrecon.images import contact_sheet
    from brainrecon.metrics import pixcorr, ssim

    data_dir, out = Path(data_dir), Path(out)
    test_betas, test_images = load_prepared(data_dir, "test")
    gt = np.asarray(test_images)
    rows, sheet = [], [("ground truth", gt)]

    def score(name: str, recon: np.ndarray, **extra) -> None:
        rows.append(
            {
                "model": name,
                "pixcorr": round(float(pixcorr(gt, recon)), 4),
                "ssim": round(float(ssim(gt, recon)), 4),
                **extra,
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
    write_json(out / "stage1.json", {"data": str(data_dir), "n_test": len(gt), "vdvae": vdvae, "rows": rows})
    lines = ["| model | latent dims | regressor parameters | PixCorr | SSIM |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r.get('latent_dims', '')} | {r.get('parameters', '')} | {r['pixcorr']:.3f} | {r['ssim']:.3f} |"
        for r in rows
    ]
    write_text(out / "stage1.md", "\n".join(lines) + "\n")
    return rows
