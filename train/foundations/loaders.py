"""Where the stage-2 foundation models come from: the shipped small weights, or a local folder.

Each loader takes a spec and returns the model with a provenance dict ({"source", "sha256"}) that the subject's
model folder records, so a later run can refuse a foundation that changed under it.

    clip: "builtin:small" | a local Hugging Face CLIP folder (ViT-L/14 or ours)
    vae:  "builtin:small" | an AutoencoderKL folder | a Versatile Diffusion folder (its vae/)
    unet: "builtin:small" | a recon-train foundation unet folder | a Versatile Diffusion folder
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

import brainrecon
from brainrecon.errors import MissingFileError
from brainrecon.io import sha256_file
from brainrecon.train.foundations.clip_features import CLIPFeatureExtractor
from brainrecon.train.foundations.dual_unet import DualUNetConfig, load_versatile_diffusion_unet

BUILTIN_WEIGHTS = Path(brainrecon.__file__).resolve().parent / "weights"  # shipped in the core package
DEFAULTS = {"clip": "builtin:small", "vae": "builtin:small", "unet": "builtin:small"}


def resolve(spec: str, kind: str) -> Path:
    """'builtin:<name>' -> the shipped brainrecon/weights/<kind>-<name> folder; anything else -> that path."""
    if spec.startswith("builtin:"):
        path = BUILTIN_WEIGHTS / f"{kind}-{spec.removeprefix('builtin:')}"
        if not path.is_dir():
            raise MissingFileError(path, f"shipped {kind} weights for {spec}", "re-install brainrecon")
        return path
    path = Path(spec)
    if not path.exists():
        raise MissingFileError(path, f"{kind} foundation model folder")
    return path


def _weights_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise MissingFileError(folder, what, f"expected one of {', '.join(names)}")


def load_clip(spec: str = DEFAULTS["clip"], batch_size: int = 64) -> tuple[CLIPFeatureExtractor, dict]:
    folder = resolve(spec, "clip")
    weights = _weights_file(folder, ("model.safetensors", "pytorch_model.bin"), "CLIP weights")
    return CLIPFeatureExtractor.from_pretrained(folder, batch_size=batch_size), _info(spec, weights)


def load_vae(spec: str = DEFAULTS["vae"]) -> tuple[AutoencoderKL, dict]:
    folder = resolve(spec, "vae")
    if (folder / "vae").is_dir():  # a whole Versatile Diffusion / Stable Diffusion folder
        folder = folder / "vae"
    weights = _weights_file(
        folder, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), "VAE weights"
    )
    with quiet_diffusers():
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    return vae.eval(), _info(spec, weights)


def load_unet(
    spec: str = DEFAULTS["unet"],
) -> tuple[UNet2DConditionModel, DualUNetConfig, dict]:
    """The dual-guided UNet and its token layout (vision tokens first, then text)."""
    from brainrecon.config import load_config
    from brainrecon.train.foundations.ldm_train import DUAL_UNET_CONFIG, load_dual_unet

    folder = resolve(spec, "unet")
    if (folder / "image_unet").is_dir():  # a Versatile Diffusion folder: ViT-L/14 token counts
        with quiet_diffusers():
            unet = load_versatile_diffusion_unet(folder).eval()
        weights = _weights_file(
            folder / "image_unet",
            ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
            "UNet weights",
        )
        cfg = unet.config
        config = DualUNetConfig(
            sample_size=cfg.sample_size,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            cross_attention_dim=cfg.cross_attention_dim,
            attention_head_dim=cfg.attention_head_dim,
            down_block_types=tuple(cfg.down_block_types),
            up_block_types=tuple(cfg.up_block_types),
        )
        return unet, config, _info(spec, weights)
    unet = load_dual_unet(folder)
    config = load_config(DualUNetConfig, folder / DUAL_UNET_CONFIG)
    return unet, config, _info(spec, folder / "diffusion_pytorch_model.safetensors")


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers warns on every load that `accelerate` is absent; loading is small and CPU-side here."""
    old = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(old)


def _info(spec: str, weights: Path) -> dict:
    return {"source": spec, "sha256": sha256_file(weights)}
