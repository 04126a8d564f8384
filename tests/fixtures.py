"""Every tiny model and data folder the tests build (CPU, seconds to a minute); tests/conftest.py exposes the
shared ones as pytest fixtures (`tiny`, `tiny2`, `betas`).

- The tiny stage-1 subject (`build_tiny_stage1`): recon-sim tiny → prepare_subject → a seeded random VDVAE
  (save_vdvae) → fit_stage1 (GRU 2 epochs; ridge) → exported with both precisions.
- The tiny two-stage subject (`build_tiny_stage2`, `export_tiny_stage2`): the ridge stage-1 subject above, the
  shipped small CLIP and VAE, a seeded random dual UNet small enough for seconds-scale sampling, fit_stage2; and
  its exported copy (--stage all --precision both), which the runtime, export, report and serving tests share.
- Tiny diffusers components that never touch disk (`tiny_components`, `tiny_vae_config`): 16x16 images <-> 8x8x4
  latents.
- A hand-made miniature NSD folder (`make_nsd_folder`), independent of the simulator, for the reader tests.

The builders write into a folder and mark it done, so a folder in pytest's session temp dir (`tiny-stage1`,
`tiny-stage2`) is built once per session whichever test asks first; tests that change a model folder copy it
first. torch, diffusers and the training code are imported inside the builders: importing this module costs
nothing to a torch-free test.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from brainrecon.data import layout
from brainrecon.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from brainrecon.train.foundations.dual_unet import DualUNetConfig


# ----------------------------------------------------------------------------------------- tiny stage-1 subject

TINY_VDVAE = dict(
    name="tiny",
    width=16,
    zdim=4,
    num_mixtures=2,
    enc_blocks="64x1,64d2,32d2,16d2,8d2,4d4,1x1",
    dec_blocks="1x1,4m1,8m4,16m8,32m16,64m32",
)
TINY_LAYERS = 3  # latents of the 1x1, 4x4 and 8x8 layers: 4 + 64 + 256 = 324 dims


def build_tiny_stage1(root: Path) -> dict[str, Path]:
    """Build (once per folder) a simulated subject, a tiny VDVAE and two exported stage-1 model dirs."""
    paths = {
        "sim": root / "sim",
        "prep": root / "prep",
        "vdvae": root / "vdvae",
        "gru": root / "model-gru",
        "ridge": root / "model-ridge",
    }
    if (root / "done").is_file():
        return paths
    import torch

    from brainrecon.data.nsd import PrepareConfig, prepare_subject
    from brainrecon.data.sim import SimConfig, simulate_subject
    from brainrecon.export.subject import export_model_dir
    from brainrecon.train.foundations.vdvae import VDVAE, VDVAEConfig, save_vdvae
    from brainrecon.train.stage1.fit import Stage1Config, fit_stage1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread avoids fork/join overhead on shared cores
    try:
        simulate_subject(paths["sim"], SimConfig.preset("tiny"), seed=0, subject=1, progress=False)
        prepare_subject(paths["sim"], paths["prep"], PrepareConfig(), progress=False)
        config = VDVAEConfig(**TINY_VDVAE)
        torch.manual_seed(0)
        vdvae = VDVAE(config)
        with torch.no_grad():  # perturb the zero-initialised layers so every path carries signal
            for p in vdvae.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_vdvae(vdvae.eval(), config, paths["vdvae"])
        for regressor in ("gru", "ridge"):
            cfg = Stage1Config(
                regressor=regressor, num_layers=TINY_LAYERS, max_epochs=2, vdvae=str(paths["vdvae"]), seed=0
            )
            fit_stage1(paths["prep"], paths[regressor], cfg, progress=False)
            export_model_dir(paths[regressor], stage="all", precision="both")
    finally:
        torch.set_num_threads(threads)
    (root / "done").write_text("ok\n")
    return paths


# ----------------------------------------------------------------------------------------- tiny two-stage subject

FAST_STEPS = 8  # strength 0.75 -> 6 UNet calls


def tiny_unet_config() -> DualUNetConfig:
    from brainrecon.train.foundations.dual_unet import DualUNetConfig

    # the shipped small CLIP's token layout (65 vision + 77 text, dim 128) on the small VAE's 8x8 latents
    return dataclasses.replace(
        DualUNetConfig.tiny(), cross_attention_dim=128, vision_tokens=65, text_tokens=77
    )


def save_tiny_unet(folder: Path, seed: int = 0) -> Path:
    import torch

    from brainrecon.config import save_config
    from brainrecon.train.foundations.dual_unet import build_dual_unet
    from brainrecon.train.foundations.ldm_train import DUAL_UNET_CONFIG

    config = tiny_unet_config()
    torch.manual_seed(seed)
    unet = build_dual_unet(config).eval()
    with torch.no_grad():  # zero-initialised output layers would make every prediction 0
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(folder)
    save_config(config, folder / DUAL_UNET_CONFIG)
    return folder


def build_tiny_stage2(root: Path) -> dict[str, Path]:
    """Build (once per folder) a stage-1 + stage-2 model dir; returns its paths (model, prep, unet)."""
    import torch

    from brainrecon.train.stage2.fit import Stage2Config, fit_stage2

    stage1 = build_tiny_stage1(root / "stage1")
    paths = {"prep": stage1["prep"], "unet": root / "unet", "model": root / "model-2"}
    if (root / "done").is_file():
        return paths
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        save_tiny_unet(paths["unet"])
        if paths["model"].exists():
            shutil.rmtree(paths["model"])
        shutil.copytree(
            stage1["ridge"], paths["model"], ignore=shutil.ignore_patterns("onnx", "manifest.json")
        )
        fit_stage2(paths["prep"], paths["model"], Stage2Config(unet=str(paths["unet"]), rank=16))
    finally:
        torch.set_num_threads(threads)
    (root / "done").write_text("ok\n")
    return paths


def export_tiny_stage2(root: Path) -> Path:
    """A copy of the tiny stage-2 model dir exported with --stage all --precision both (once per folder), so the
    fitted model dir that other fixtures copy is never changed; `summary.json` beside it is the export summary."""
    import torch

    from brainrecon.export.subject import export_model_dir

    paths = build_tiny_stage2(root)
    model_dir = root / "model-2-exported"
    if (root / "exported").is_file():
        return model_dir
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(paths["model"], model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = export_model_dir(model_dir, stage="all", precision="both")
    finally:
        torch.set_num_threads(threads)
    (model_dir / "summary.json").write_text(json.dumps(summary, default=str))
    (root / "exported").write_text("ok\n")
    return model_dir


def exported_tiny_model(tmp_path_factory) -> Path:
    """The tiny two-stage model, exported (fp32 + fp16) once per test session: conftest's `tiny2["model"]`."""
    return export_tiny_stage2(tmp_path_factory.getbasetemp() / "tiny-stage2")


def tiny_betas_file(tmp_path_factory) -> Path:
    """The tiny subject's test betas (10, V) float32, z-scored (recon-prepare's test_betas.npy)."""
    return build_tiny_stage2(tmp_path_factory.getbasetemp() / "tiny-stage2")["prep"] / "test_betas.npy"


# ----------------------------------------------------------------------------------------- tiny diffusers parts


def tiny_vae_config() -> dict[str, Any]:
    """Tests: 16x16 images -> 8x8x4 latents (one downsampling), as `tiny_components`."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 16,
    }


def tiny_components(
    seed: int = 0,
) -> tuple[UNet2DConditionModel, AutoencoderKL, DDIMScheduler, DualUNetConfig]:
    """Tiny seeded random UNet/VAE/scheduler for CPU tests: 16x16 images -> 8x8x4 latents (VAE downsampling 2)."""
    import torch
    from diffusers import AutoencoderKL

    from brainrecon.train.foundations.dual_unet import DualUNetConfig, build_dual_unet
    from brainrecon.train.stage2.img2img import vae_downsampling, vd_scheduler

    dual_config = DualUNetConfig.tiny()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=2 * dual_config.sample_size,
    ).eval()
    unet = build_dual_unet(dual_config).eval()
    if vae.config.latent_channels != unet.config.in_channels:
        raise ConfigError(
            f"tiny_components: expected VAE latent channels {unet.config.in_channels}, "
            f"found {vae.config.latent_channels}"
        )
    if vae.config.sample_size // vae_downsampling(vae) != dual_config.sample_size:
        raise ConfigError(
            f"tiny_components: expected latent side {dual_config.sample_size}, "
            f"found {vae.config.sample_size // vae_downsampling(vae)}"
        )
    return unet, vae, vd_scheduler(), dual_config


# ----------------------------------------------------------------------------------------- miniature NSD folder

AFFINE = np.diag([1.8, 1.8, 1.8, 1.0]) + np.array(
    [[0, 0, 0, -70], [0, 0, 0, -90], [0, 0, 0, -60], [0, 0, 0, 0]]
)


@dataclasses.dataclass
class NsdFolder:
    """What `make_nsd_folder` wrote, for the tests to compare the reader's output with."""

    root: Path
    grid: tuple[int, int, int]
    mask: np.ndarray  # (X, Y, Z) int16 in {-1, 0, 1}
    betas: list[np.ndarray]  # per session (X, Y, Z, T) int16
    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray
    images: np.ndarray  # (N, S, S, 3) uint8


def make_nsd_folder(
    root: Path,
    n_sessions: int = 3,
    trials: int = 12,
    n_shared: int = 2,
    n_train: int = 8,
    grid: tuple[int, int, int] = (5, 6, 4),
    n_stimuli: int = 14,
    size: int = 16,
    seed: int = 0,
) -> NsdFolder:
    """A seeded miniature NSD folder in the real layout (brainrecon/data/layout.py): experiment design, mask,
    beta sessions, stimuli and captions of subject 1."""
    rng = np.random.default_rng(seed)
    total = n_sessions * trials
    # Subject's image list: shared first (NSD convention), then train images; ids 1-based into the stimuli.
    perm = rng.permutation(n_stimuli) + 1
    subjectim = np.stack([np.roll(perm, k)[: n_shared + n_train] for k in range(8)])
    sharedix = subjectim[0, :n_shared].copy()
    subjectim[:, :n_shared] = sharedix
    order = np.concatenate(
        [np.repeat(np.arange(1, n_shared + 1), 3), rng.integers(n_shared + 1, n_shared + n_train + 1, total)]
    )
    masterordering = rng.permutation(order[:total] if len(order) >= total else order)[:total]
    mask = np.full(grid, -1, dtype=np.int16)
    mask[1:-1, 1:-1, :] = 0
    mask[1:-1, 2:-1, 1:-1] = 1
    betas = [rng.normal(0, 600, size=(*grid, trials)).round().astype(np.int16) for _ in range(n_sessions)]
    images = rng.integers(0, 256, size=(n_stimuli, size, size, 3), dtype=np.uint8)

    layout.expdesign_path(root).parent.mkdir(parents=True)
    scipy.io.savemat(
        layout.expdesign_path(root),
        {"masterordering": masterordering[None], "subjectim": subjectim, "sharedix": sharedix[None]},
    )
    layout.mask_path(root, 1).parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask, AFFINE), layout.mask_path(root, 1))
    layout.betas_dir(root, 1).mkdir(parents=True)
    for s, b in enumerate(betas, start=1):
        nib.save(nib.Nifti1Image(b, AFFINE), layout.session_path(root, 1, s))
    layout.stimuli_path(root).parent.mkdir(parents=True)
    with h5py.File(layout.stimuli_path(root), "w") as f:
        f.create_dataset("imgBrick", data=images)
    layout.captions_path(root).write_text(
        json.dumps({str(i): [f"image {i} caption {k}" for k in range(5)] for i in range(n_stimuli)})
    )
    return NsdFolder(root, grid, mask, betas, masterordering, subjectim, sharedix, images)
