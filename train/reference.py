"""The torch reference: a fitted subject model folder loaded back into torch, and its reconstruction.

What the torch-free runtime (runtime/) must match and what recon-export exports from:

    Stage1Model.load(model_dir)     stage1/: summary, regressor, latent statistics; the foundation VDVAE
      .predict_latents(betas)       (N, V) z-scored betas → (N, D) VDVAE latents, re-normalised over the batch
      .reconstruct(betas)           → (N, s, s, 3) uint8: the VDVAE's deterministic decode
    Stage2Model.load(model_dir)     + stage2/: summary, CLIP ridges, unconditional contexts; the VAE and the UNet
      .predict_contexts(betas)      → {"text": (N, Nt, D), "vision": (N, Nv, D)}
      .reconstruct(betas)           → {"stage1": (N, s, s, 3), "final": (N, S, S, 3)} uint8: stage 1, then
                                      Versatile Diffusion img2img (train/stage2/img2img.py `img2img`)

Fitting writes these folders (train/stage1/fit.py, train/stage2/fit.py); a foundation whose weights changed since
the fit (sha256 recorded by the fit) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from brainrecon.config import config_from_dict
from brainrecon.errors import InputError
from brainrecon.images import resize
from brainrecon.io import load_npy, read_json
from brainrecon.model_dir import (
    CLIP_TARGETS,
    LATENT_MEAN,
    LATENT_STD,
    STAGE1_DIR,
    STAGE1_SUMMARY,
    STAGE2_DIR,
    STAGE2_SUMMARY,
    uncond_context,
)
from brainrecon.normalize import renormalize_predictions
from brainrecon.sampling import SamplingConfig
from brainrecon.train.device import resolve_device
from brainrecon.train.foundations.dual_unet import DualUNetConfig
from brainrecon.train.foundations.loaders import load_unet, load_vae, resolve_vdvae
from brainrecon.train.foundations.vdvae import VDVAE, decode_latents
from brainrecon.train.stage1 import gru as gru_mod
from brainrecon.train.stage1.fit import Stage1Config
from brainrecon.train.stage1.ridge import RidgeRegressor
from brainrecon.train.stage2.clip_ridge import ClipRidge
from brainrecon.train.stage2.fit import Stage2Config
from brainrecon.train.stage2.img2img import img2img, vd_scheduler


@torch.no_grad()
def decode_images(model: VDVAE, latents: np.ndarray, num_layers: int, batch: int = 64) -> np.ndarray:
    """(N, D) latents -> uint8 (N, S, S, 3), deterministic decode (prior means after layer K, DmoL mode)."""
    out = []
    for i in range(0, len(latents), batch):
        img = decode_latents(model, torch.from_numpy(latents[i : i + batch]), num_layers, deterministic=True)
        out.append(np.clip(np.rint(img.cpu().numpy()), 0, 255).astype(np.uint8))
    return np.concatenate(out)


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
        device = resolve_device(device)
        model_dir = Path(model_dir)
        summary = model_dir / STAGE1_SUMMARY
        info = read_json(summary, "stage-1 summary (recon-train subject --stage vdvae)")
        cfg = dict(info["config"])
        num_layers = cfg.pop("num_layers")
        config = config_from_dict(Stage1Config, {**cfg, "num_layers": num_layers}, str(summary))
        vdvae, foundation = resolve_vdvae(config.vdvae)
        if foundation["sha256"] != info["foundation"]["vdvae"]["sha256"]:
            raise InputError(
                config.vdvae,
                f"the VDVAE the regressor was fitted with (sha256 {info['foundation']['vdvae']['sha256'][:12]}…)",
                f"sha256 {foundation['sha256'][:12]}… (re-fit stage 1)",
            )
        stage_dir = model_dir / STAGE1_DIR
        if config.regressor == "ridge":
            regressor = RidgeRegressor.load(stage_dir, "ridge")
        else:
            regressor = gru_mod.load_gru(stage_dir, "gru", device=device)
        return cls(
            config,
            num_layers,
            vdvae.to(device),
            regressor,
            load_npy(model_dir / LATENT_MEAN),
            load_npy(model_dir / LATENT_STD),
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
        device = resolve_device(device)
        model_dir = Path(model_dir)
        summary = model_dir / STAGE2_SUMMARY
        info = read_json(summary, "stage-2 summary (recon-train subject --stage clip)")
        config = config_from_dict(Stage2Config, info["config"], str(summary))
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
            clip={name: ClipRidge.load(model_dir / STAGE2_DIR, f"clip_{name}") for name in CLIP_TARGETS},
            vae=vae.to(device),
            unet=unet.to(device),
            dual_config=dual_config,
            uncond={name: load_npy(model_dir / uncond_context(name)) for name in CLIP_TARGETS},
            sampling=config_from_dict(SamplingConfig, info["sampling"], str(summary)),
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

        `batch_size` images per VAE and UNet call; the result does not depend on it (`img2img`). `contexts`
        replaces the predicted CLIP embeddings (oracle controls).
        """
        sampling = sampling or self.sampling
        stage1 = self.stage1.reconstruct(betas)  # (N, s, s, 3)
        contexts = contexts or self.predict_contexts(betas)
        final = img2img(
            self.unet,
            self.vae,
            vd_scheduler(),
            resize(stage1, self.image_size),  # (N, S, S, 3)
            torch.from_numpy(contexts["vision"]),
            torch.from_numpy(contexts["text"]),
            torch.from_numpy(self.uncond["vision"]),
            torch.from_numpy(self.uncond["text"]),
            sampling,
            dual_config=self.dual_config,
            batch_size=batch_size,
            progress=progress,
        )
        return {"stage1": stage1, "final": final}
