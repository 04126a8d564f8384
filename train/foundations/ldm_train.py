"""Train the two latent-diffusion parts of stage 2 on a torch device: the KL autoencoder and the dual-guided UNet.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models") trains
in two phases: an autoencoder first (`train_vae`), then an epsilon-prediction DDPM (Ho et al. 2020) on its
scaled latents (`train_dual_unet`), conditioned here on CLIP-vision + CLIP-text tokens through the dual blocks
of train/foundations/dual_unet.py. Classifier-free guidance (Ho & Salimans 2022) needs the same UNet to know the
unconditional context, so during training each sample's context is replaced by the unconditional one with
probability `cond_drop`.

VAE loss: mean L1 on [-1, 1] pixels + kl_weight * KL / (3 H W). SD's objective is sum(L1) + kl_weight * sum(KL)
per sample; dividing both by the pixel count keeps `kl_weight=1e-6` meaning what it means there while the loss
reads per pixel. Unlike SD's VAE there is no LPIPS or patch-GAN term: the simulated stimuli are smooth shapes
whose L1 reconstruction is already sharp, and both terms would need pretrained weights or a second optimiser.

Reproducible (as train/foundations/vdvae_train.py): the batch order of epoch `e` comes from a generator seeded by
(seed, e) and every random draw of step `s` (posterior sample; noise, timesteps and context drop) from one
seeded by (seed, s), so a resumed run takes the same steps as an uninterrupted one, bit for bit on the CPU.
The data stays on the CPU and each batch is copied to the training device; the random draws are made on the CPU
and copied too (diffusers' `randn_tensor` does the same with a CPU generator), so a GPU run takes the same batches
and noise as a CPU run and differs from it by kernels only. Checkpoints and final weights are written from the CPU.

    out_dir/checkpoint/{model,ema,optimizer}.safetensors + state.json   (resumable; train/foundations/checkpoint.py)
    out_dir/vae/   AutoencoderKL.save_pretrained                       (train_vae; atomically)
    out_dir/unet/  save_pretrained + dual_unet_config.json             (train_dual_unet; load_dual_unet)
    out_dir/train.json                                                  (final loss, steps, settings)
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from brainrecon.config import config_to_dict, load_config, save_config
from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.io import atomic_dir, write_json
from brainrecon.train.foundations.checkpoint import (
    CHECKPOINT_DIR,
    STATE_FILE,
    load_checkpoint,
    resume_state,
    save_checkpoint,
)
from brainrecon.train.foundations.dual_unet import DualUNetConfig, build_dual_unet
from brainrecon.train.stage2.img2img import vd_scheduler

DUAL_UNET_CONFIG = "dual_unet_config.json"
_SEED_STRIDE = 1_000_003


def small_vae_config() -> dict[str, Any]:
    """64x64 stimuli -> 8x8x4 latents: 4 blocks = 3 downsamplings (SD's VAE has the same 4-block layout).

    8 normalisation groups, not SD's 32: with 32 groups the 32-channel layers at 64x64, the decoder's last
    `conv_norm_out` included, are instance norms, which remove each channel's spatial mean. A flat background
    colour then cannot reach the output except through spatial structure, and the decoder learns to make some:
    a bright localised spike at a fixed position that shifts the statistics of the whole map (the "water
    droplet" artifact of StyleGAN, Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN",
    section 2). The first shipped VAE had it at the top right of nearly every round trip; stage 2 inherited it.
    With 4 channels per group the relative levels inside each group carry a flat colour through.
    """
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (32, 64, 128, 128),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
    }


@dataclass(frozen=True)
class LDMTrainConfig:
    """Optimisation settings, saved in the checkpoint; a resume must use the same ones (except `steps`)."""

    kind: str  # "vae" or "dual_unet"
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    ema_rate: float = 0.0  # 0 disables EMA; the saved model is then the trained weights
    weight_decay: float = 0.01
    checkpoint_every: int = 250
    kl_weight: float = 1e-6  # vae only
    cond_drop: float = 0.1  # dual_unet only

    def __post_init__(self) -> None:
        if self.kind not in ("vae", "dual_unet"):
            raise ConfigError(f"LDMTrainConfig: expected kind 'vae' or 'dual_unet', found {self.kind!r}")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"LDMTrainConfig: {name} must be >= 1, found {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"LDMTrainConfig: expected lr > 0, found {self.lr}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ConfigError(f"LDMTrainConfig: expected ema_rate in [0, 1), found {self.ema_rate}")
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ConfigError(f"LDMTrainConfig: expected cond_drop in [0, 1], found {self.cond_drop}")
        if self.kl_weight < 0:
            raise ConfigError(f"LDMTrainConfig: expected kl_weight >= 0, found {self.kl_weight}")


# ------------------------------------------------------------------------------------------------------- VAE


def train_vae(
    images: np.ndarray,
    vae_config: dict[str, Any],
    out_dir: str | Path,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 1e-4,
    seed: int = 0,
    kl_weight: float = 1e-6,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    **settings: Any,
) -> dict[str, Any]:
    """Train an `AutoencoderKL(**vae_config)` on uint8 (N, S, S, 3) images on `device`; save it to `out_dir/vae`.

    `settings`: further LDMTrainConfig fields (ema_rate, weight_decay, checkpoint_every). Returns
    {"step", "final_loss", "history", "model"} (history: one {"loss", "rec", "kl"} per step taken in this call;
    model: the saved one, on the CPU).
    """
    from brainrecon.train.device import resolve_device

    device = resolve_device(device)
    cfg = LDMTrainConfig(
        kind="vae", steps=steps, batch_size=batch_size, lr=lr, seed=seed, kl_weight=kl_weight, **settings
    )
    size = int(vae_config.get("sample_size", 0))
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1:] != (size, size, 3)
    ):
        found = f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
        raise InputError("training images", f"uint8 (N, {size}, {size}, 3) (vae_config sample_size)", found)
    _check_batch(images.shape[0], batch_size, "training images")
    data = {"images": torch.from_numpy(np.ascontiguousarray(images))}  # (N, S, S, 3) uint8

    torch.manual_seed(seed)  # parameter init
    vae = AutoencoderKL(**vae_config)

    def loss_fn(
        batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["images"].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)  # (B, 4, S/f, S/f)
        recon = vae.decode(z).sample  # (B, 3, S, S)
        rec = (recon - x).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()  # per-sample KL sum, per pixel (see module doc)
        loss = rec + kl_weight * kl
        return loss, {"rec": float(rec.detach()), "kl": float(kl.detach())}

    def save_final(model: torch.nn.Module, tmp: Path) -> None:
        model.register_to_config(scaling_factor=latent_scaling_factor(model, images))  # on the device
        model.cpu().save_pretrained(tmp)

    return _train(
        vae, data, loss_fn, save_final, "vae", vae_config, cfg, Path(out_dir), resume, progress, device
    )


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> float:
    """1 / std of the posterior-mean latents of `images`: the LDM recipe (Rombach et al. 2022, section G) that
    gave SD's 0.18215. The UNet's noise schedule assumes unit-variance latents; a VAE of our own with SD's factor
    would leave them at a third of that, so img2img at strength 0.75 would keep far less of the init image."""
    from brainrecon.train.stage2.img2img import encode_images

    vae = vae.eval()
    latents = torch.cat(
        [encode_images(vae, images[i : i + batch_size], 1.0) for i in range(0, len(images), batch_size)]
    )
    return round(1.0 / float(latents.float().std()), 5)


def refit_vae(
    teacher: AutoencoderKL,
    images: np.ndarray,
    out_dir: str | Path,
    norm_num_groups: int = 8,
    steps: int = 600,
    batch_size: int = 16,
    lr: float = 1e-4,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    **settings: Any,
) -> dict[str, Any]:
    """A VAE with `norm_num_groups` normalisation groups that keeps `teacher`'s latent space; save to out_dir/vae.

    For a VAE whose decoder has a normalisation artifact (see `small_vae_config`) when a diffusion UNet has
    already been trained on its latents: the student starts from the teacher's weights (same shapes; only the
    group count differs), its encoder learns to reproduce the teacher's posterior (MSE on mean and log-variance)
    and its decoder to reconstruct the images from the teacher's posterior samples (L1, as `train_vae`). The
    teacher's latent scaling factor is kept, so the UNet trained on the teacher's latents works unchanged.
    Decoder-only fine-tuning that keeps a latent space is how Stability AI made sd-vae-ft-mse for SD 1.x.
    The teacher encodes and the student trains on `device` (the teacher is moved there).
    """
    from brainrecon.train.device import resolve_device

    device = resolve_device(device)
    cfg = LDMTrainConfig(kind="vae", steps=steps, batch_size=batch_size, lr=lr, seed=seed, **settings)
    size = int(teacher.config.sample_size)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise InputError("training images", f"uint8 (N, {size}, {size}, 3)", f"{images.dtype} {images.shape}")
    _check_batch(images.shape[0], batch_size, "training images")
    teacher = teacher.float().eval().to(device)
    means, logvars = [], []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + 64])).to(device)  # (B, S, S, 3) uint8
            posterior = teacher.encode(x.permute(0, 3, 1, 2).float() / 127.5 - 1.0).latent_dist
            means.append(posterior.mean.cpu())
            logvars.append(posterior.logvar.cpu())
    data = {
        "images": torch.from_numpy(np.ascontiguousarray(images)),  # (N, S, S, 3) uint8
        "mean": torch.cat(means),  # (N, 4, h, w) teacher posterior, unscaled
        "logvar": torch.cat(logvars),
    }
    keys = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels")
    keys += ("layers_per_block", "latent_channels", "sample_size", "act_fn", "scaling_factor")
    vae_config = {k: teacher.config[k] for k in keys}
    vae_config = {k: tuple(v) if isinstance(v, list) else v for k, v in vae_config.items()}
    vae_config["norm_num_groups"] = norm_num_groups
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(teacher.state_dict(), strict=True)  # GroupNorm affine shapes do not depend on groups

    def loss_fn(
        batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["images"].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
        posterior = vae.encode(x).latent_dist
        enc = torch.nn.functional.mse_loss(posterior.mean, batch["mean"])
        enc = enc + 0.1 * torch.nn.functional.mse_loss(posterior.logvar, batch["logvar"])
        std = torch.exp(0.5 * batch["logvar"].clamp(-30.0, 20.0))
        eps = torch.randn(batch["mean"].shape, generator=gen).to(x.device)
        z = batch["mean"] + std * eps  # teacher sample
        rec = (vae.decode(z).sample - x).abs().mean()
        return rec + enc, {"rec": float(rec.detach()), "enc": float(enc.detach())}

    def save_final(model: torch.nn.Module, tmp: Path) -> None:
        model.cpu().save_pretrained(tmp)

    return _train(
        vae, data, loss_fn, save_final, "vae", vae_config, cfg, Path(out_dir), resume, progress, device
    )


# ------------------------------------------------------------------------------------------------- dual UNet


def train_dual_unet(
    latents: torch.Tensor,
    vision_ctx: torch.Tensor,
    text_ctx: torch.Tensor,
    unet_config: DualUNetConfig,
    out_dir: str | Path,
    steps: int = 5000,
    batch_size: int = 16,
    lr: float = 1e-4,
    seed: int = 0,
    cond_drop: float = 0.1,
    uncond_vision: torch.Tensor | None = None,
    uncond_text: torch.Tensor | None = None,
    resume: bool = False,
    progress: bool = True,
    ema_rate: float = 0.999,
    device: str | torch.device = "cpu",
    **settings: Any,
) -> dict[str, Any]:
    """Epsilon-prediction DDPM training of `build_dual_unet(unet_config)`; save it to `out_dir/unet`.

    latents (N, 4, h, w) float32, already x the VAE scale factor; vision_ctx (N, Nv, D); text_ctx (N, Nt, D);
    uncond_vision (1, Nv, D) and uncond_text (1, Nt, D): CLIP of the black image and of "" (train/stage2/img2img.py).
    CFG drop: one Bernoulli(cond_drop) per sample replaces *both* token sets together, since sampling guides
    with the (uncond_vision, uncond_text) pair as one unconditional branch; dropping them separately would
    train mixed contexts that sampling never uses. `device` trains there; the returned model is on the CPU.
    """
    from brainrecon.train.device import resolve_device

    device = resolve_device(device)
    cfg = LDMTrainConfig(
        kind="dual_unet",
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        cond_drop=cond_drop,
        ema_rate=ema_rate,
        **settings,
    )
    if not isinstance(unet_config, DualUNetConfig):
        raise ConfigError(f"train_dual_unet: expected a DualUNetConfig, found {type(unet_config).__name__}")
    data = _check_unet_inputs(latents, vision_ctx, text_ctx, uncond_vision, uncond_text, unet_config)
    _check_batch(data["latents"].shape[0], batch_size, "latents")
    uncond = torch.cat([data.pop("uncond_vision"), data.pop("uncond_text")], dim=1)  # (1, Nv + Nt, D)
    uncond = uncond.to(device)

    torch.manual_seed(seed)
    unet = build_dual_unet(unet_config)
    scheduler = vd_scheduler()
    num_timesteps = scheduler.config.num_train_timesteps

    def loss_fn(
        batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = batch["latents"]  # (B, 4, h, w)
        b = x0.shape[0]
        # drawn on the CPU in this order, then copied: the same draws on every device
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)  # (B, 4, h, w)
        t = torch.randint(0, num_timesteps, (b,), generator=gen).to(x0.device)  # (B,)
        drop = (torch.rand(b, generator=gen) < cond_drop).to(x0.device)  # (B,) one draw for both token sets
        context = torch.cat([batch["vision_ctx"], batch["text_ctx"]], dim=1)  # (B, Nv + Nt, D) vision first
        context = torch.where(drop[:, None, None], uncond, context)
        noisy = scheduler.add_noise(x0, noise, t)  # sqrt(a_t) x0 + sqrt(1 - a_t) eps
        pred = unet(noisy, t, encoder_hidden_states=context).sample  # (B, 4, h, w)
        loss = torch.nn.functional.mse_loss(pred, noise)
        return loss, {"dropped": float(drop.float().mean())}

    def save_final(model: torch.nn.Module, tmp: Path) -> None:
        model.cpu().save_pretrained(tmp)
        save_config(unet_config, tmp / DUAL_UNET_CONFIG)

    return _train(
        unet,
        data,
        loss_fn,
        save_final,
        "unet",
        config_to_dict(unet_config),
        cfg,
        Path(out_dir),
        resume,
        progress,
        device,
    )


def load_dual_unet(folder: str | Path) -> UNet2DConditionModel:
    """Rebuild a UNet saved by `train_dual_unet` (folder = out_dir/unet).

    Not `from_pretrained`: the dual blocks are train/foundations/dual_unet.py's `DualAttentionTransformer` with our token
    layout, which diffusers' own `dual_cross_attention=True` construction would not reproduce.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise MissingFileError(weights, "dual UNet weights", "written by train_dual_unet into out_dir/unet")
    unet = build_dual_unet(load_config(DualUNetConfig, folder / DUAL_UNET_CONFIG))
    unet.load_state_dict(load_file(str(weights)), strict=True)
    return unet.eval()


def _check_unet_inputs(
    latents: Any,
    vision_ctx: Any,
    text_ctx: Any,
    uncond_vision: Any,
    uncond_text: Any,
    config: DualUNetConfig,
) -> dict[str, torch.Tensor]:
    """One-line InputError for any dtype, shape or batch mismatch; returns contiguous float32 tensors."""
    d = config.cross_attention_dim
    side = config.sample_size
    expected = {
        "latents": ("N", config.in_channels, side, side),
        "vision_ctx": ("N", config.vision_tokens, d),
        "text_ctx": ("N", config.text_tokens, d),
        "uncond_vision": (1, config.vision_tokens, d),
        "uncond_text": (1, config.text_tokens, d),
    }
    given = {
        "latents": latents,
        "vision_ctx": vision_ctx,
        "text_ctx": text_ctx,
        "uncond_vision": uncond_vision,
        "uncond_text": uncond_text,
    }
    n = latents.shape[0] if isinstance(latents, torch.Tensor) and latents.ndim == 4 else None
    out: dict[str, torch.Tensor] = {}
    for name, tensor in given.items():
        want = tuple(n if s == "N" else s for s in expected[name])
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32:
            found = getattr(tensor, "dtype", type(tensor).__name__)
            raise InputError(name, f"a float32 torch.Tensor {want}", str(found))
        if tuple(tensor.shape) != want:
            raise InputError(
                name, f"shape {want} (DualUNetConfig, batch of latents)", str(tuple(tensor.shape))
            )
        if not torch.isfinite(tensor).all():
            raise InputError(name, "finite values", "NaN or Inf")
        out[name] = tensor.detach().cpu().contiguous()  # the loop copies each batch to the training device
    return out


# ---------------------------------------------------------------------------------------------- shared loop


def _check_batch(n: int, batch_size: int, source: str) -> None:
    if n < batch_size:
        raise InputError(source, f"at least batch_size={batch_size} samples", str(n))


def _data_sha256(data: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(data):
        h.update(name.encode())
        h.update(data[name].numpy().tobytes())
    return h.hexdigest()


def _train(
    model: torch.nn.Module,
    data: dict[str, torch.Tensor],  # each (N, ...)
    loss_fn: Callable[[dict[str, torch.Tensor], torch.Generator], tuple[torch.Tensor, dict[str, float]]],
    save_final: Callable[[torch.nn.Module, Path], None],
    final_name: str,
    model_config: dict[str, Any],
    cfg: LDMTrainConfig,
    out_dir: Path,
    resume: bool,
    progress: bool,
    device: torch.device,
) -> dict[str, Any]:
    """AdamW loop with seeded batches, optional EMA and atomic checkpoints; writes the final model and train.json.

    `data` stays on the CPU; the model trains on `device`, each batch is copied there. `save_final` gets the
    final model on `device` and must leave it on the CPU (it saves from there).
    """
    model_config = _jsonable(model_config)
    data_sha256 = _data_sha256(data)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_rate > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    previous: list[dict[str, float]] = []
    state = resume_state(ckpt_dir, resume, "LDM training state")
    if state is not None:
        state_path = ckpt_dir / STATE_FILE
        if state["model_config"] != model_config:
            raise ConfigError(
                f"{state_path}: checkpoint is for another {cfg.kind} model config; resume with the same one"
            )
        step, previous = load_checkpoint(
            ckpt_dir,
            state,
            model,
            ema,
            optimizer,
            train_cfg=cfg,
            data_sha256=data_sha256,
            data_name="data",
            where=state_path,
        )

    n = next(iter(data.values())).shape[0]
    steps_per_epoch = n // cfg.batch_size  # the last partial batch is dropped: every step sees a full batch
    history: list[dict[str, float]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=cfg.kind, unit="step", dynamic_ncols=True)
    model.train()
    while step < cfg.steps:
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * _SEED_STRIDE + epoch))
        idx = order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
        batch = {k: v[idx].to(device) for k, v in data.items()}
        gen = torch.Generator().manual_seed(cfg.seed * _SEED_STRIDE + step + 7)
        optimizer.zero_grad(set_to_none=True)
        loss, extra = loss_fn(batch, gen)
        if not torch.isfinite(loss):
            raise InputError(f"{cfg.kind} training step {step}", "a finite loss", str(float(loss)))
        loss.backward()
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                    p_ema.lerp_(p, 1.0 - cfg.ema_rate)  # ema = rate * ema + (1 - rate) * p
        history.append({"loss": float(loss.detach()), **extra})
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(
                ckpt_dir,
                model,
                ema,
                optimizer,
                step=step,
                configs={"model_config": model_config, "train": config_to_dict(cfg)},
                data_sha256=data_sha256,
                history=previous + history,
            )
    if bar is not None:
        bar.close()

    final = (ema if ema is not None else model).eval()
    with atomic_dir(out_dir / final_name, overwrite=True) as tmp:
        save_final(final, tmp)
    full_history = previous + history
    final_loss = full_history[-1]["loss"] if full_history else float("nan")
    write_json(
        out_dir / "train.json",
        {
            "kind": cfg.kind,
            "step": step,
            "final_loss": final_loss,
            "saved_weights": "ema" if ema is not None else "model",
            "train": config_to_dict(cfg),
            "model_config": model_config,
            "data_sha256": data_sha256,
        },
    )
    return {"step": step, "final_loss": final_loss, "history": history, "model": final}


def _jsonable(obj: Any) -> Any:
    """Tuples -> lists, so a config compares equal to itself after a JSON round trip."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def unet_training_data(
    images: np.ndarray,
    captions: list[list[str]],
    vae: AutoencoderKL,
    clip: Any,  # CLIPFeatureExtractor
    scale: float | None = None,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """What `train_dual_unet` needs from stimuli: scaled VAE latents (posterior mean) and CLIP token contexts.

    scale: the latent scaling factor, by default the VAE's own (`vae.config.scaling_factor`).
    images uint8 (N, S, S, 3) at the VAE's sample size; captions[i] the captions of image i (their normalised
    text tokens are averaged, as the subject's CLIP targets are). Both models run where they are, `batch_size`
    images per VAE call. Returns float32 CPU tensors latents (N, 4, h, w), vision_ctx (N, Nv, D),
    text_ctx (N, Nt, D), uncond_vision (1, Nv, D), uncond_text (1, Nt, D).
    """
    from brainrecon.train.stage2.img2img import encode_images

    if len(captions) != len(images):
        raise InputError("captions", f"one list per image ({len(images)})", str(len(captions)))
    scale = float(vae.config.scaling_factor) if scale is None else scale
    latents = torch.cat(
        [encode_images(vae, images[i : i + batch_size], scale) for i in range(0, len(images), batch_size)]
    )
    uncond_text, uncond_vision = clip.unconditional_contexts()
    arrays = {
        "vision_ctx": clip.vision_embeddings(images),
        "text_ctx": clip.text_embeddings(captions),
        "uncond_vision": uncond_vision,
        "uncond_text": uncond_text,
    }
    return {"latents": latents.float().cpu(), **{k: torch.from_numpy(v).float() for k, v in arrays.items()}}


def small_unet_config(
    clip_dim: int, vision_tokens: int, text_tokens: int, latent_side: int
) -> DualUNetConfig:
    """The shipped UNet: (64, 128, 128) channels, 7.7 M parameters (15 MB in fp16) for 8x8x4 latents."""
    import dataclasses

    return dataclasses.replace(
        DualUNetConfig.small(clip_dim),
        sample_size=latent_side,
        vision_tokens=vision_tokens,
        text_tokens=text_tokens,
    )


def prepared_train_images(data: Path, size: int) -> np.ndarray:
    """A recon-prepare folder's training stimuli resized to `size` (what every foundation model trains on)."""
    from brainrecon.images import resize
    from brainrecon.io import load_npy

    return resize(load_npy(Path(data) / "train_images.npy", "train images from recon-prepare"), size)


def train_unet_on_prepared(
    data: str | Path,
    out: str | Path,
    clip: str = "builtin:small",
    vae: str = "builtin:small",
    log=print,
    device: str | torch.device = "cpu",
    encode_batch: int = 64,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """`recon-train foundation unet`: encode a recon-prepare folder's training images with the VAE and their
    captions and images with the CLIP, then train the small dual-guided UNet on them (`train_dual_unet`, whose
    keyword arguments `train_kwargs` are: steps, batch_size, lr, seed, cond_drop, resume). Encoding and training
    run on `device`, `encode_batch` images (or captions) per VAE or CLIP call."""
    from brainrecon.io import read_json
    from brainrecon.train.device import resolve_device
    from brainrecon.train.foundations.loaders import load_clip, load_vae

    device = resolve_device(device)
    data = Path(data)
    vae_model, _ = load_vae(vae)
    vae_model.to(device)
    extractor, _ = load_clip(clip, batch_size=encode_batch, device=device)
    images = prepared_train_images(data, vae_model.config.sample_size)
    captions = read_json(data / "train_captions.json", "train captions from recon-prepare")
    log(f"encoding {len(images)} training images and their captions ...")
    tensors = unet_training_data(images, captions, vae_model, extractor, batch_size=encode_batch)
    shapes = extractor.shapes
    config = small_unet_config(
        shapes.dim, shapes.vision_tokens, shapes.text_tokens, tensors["latents"].shape[-1]
    )
    return train_dual_unet(
        tensors["latents"],
        tensors["vision_ctx"],
        tensors["text_ctx"],
        config,
        out,
        uncond_vision=tensors["uncond_vision"],
        uncond_text=tensors["uncond_text"],
        device=device,
        **train_kwargs,
    )
