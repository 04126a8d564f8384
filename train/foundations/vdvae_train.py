"""Train a VDVAE (train/foundations/vdvae.py) on 64x64 stimuli, as openai/vdvae `train.py` does, on a torch device.

Loss: the ELBO in nats per dim (DmoL NLL + KL of every latent layer). AdamW (betas 0.9, 0.9) with a linear
warm-up then a constant rate; gradients clipped to `grad_clip`, and a step whose gradient norm reaches
`skip_threshold` (or whose loss is not finite) is skipped, leaving weights and EMA untouched. EMA weights are
what gets saved for use.

Reproducible: the batch order and the posterior noise of step `s` come from generators seeded by
(seed, epoch) and (seed, s), so a resumed run takes the same steps as an uninterrupted one. The images stay on the
CPU and each batch is copied to the device; the noise generator lives on the device (the model draws its posterior
noise there), so a GPU run is reproducible on its own but takes other noise than a CPU run.

    out_dir/checkpoint/{model,ema,optimizer}.safetensors + state.json   (resumable; train/foundations/checkpoint.py)
    out_dir/model.safetensors + config.json                             (final EMA weights, save_vdvae)
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from brainrecon.config import config_from_dict, config_to_dict
from brainrecon.errors import ConfigError, InputError
from brainrecon.train.foundations.checkpoint import (
    CHECKPOINT_DIR,
    STATE_FILE,
    load_checkpoint,
    resume_state,
    save_checkpoint,
)
from brainrecon.train.foundations.vdvae import VDVAE, VDVAEConfig, save_vdvae

_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class VDVAETrainConfig:
    """Optimisation settings, saved in the checkpoint; a resume must use the same ones (except `steps`)."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    ema_rate: float = 0.995
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.9)
    grad_clip: float = 200.0
    skip_threshold: float = 400.0  # <= 0 disables skipping
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup_steps", "checkpoint_every"):
            if getattr(self, name) < (0 if name == "warmup_steps" else 1):
                raise ConfigError(f"VDVAETrainConfig: {name} must be positive, found {getattr(self, name)}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ConfigError(f"VDVAETrainConfig: ema_rate must be in [0, 1), found {self.ema_rate}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ConfigError(
                f"VDVAETrainConfig: lr and grad_clip must be > 0, found {self.lr}, {self.grad_clip}"
            )


@dataclass
class VDVAETrainResult:
    ema_model: VDVAE
    step: int
    # One entry per step taken in this call: elbo, distortion, rate (nats/dim), grad_norm, skipped.
    history: list[dict[str, float]] = field(default_factory=list)
    skipped: int = 0


def train_vdvae(
    images_uint8: np.ndarray,
    config: VDVAEConfig,
    out_dir: str | Path,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    ema_rate: float = 0.995,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    **settings,
) -> VDVAETrainResult:
    """Train on (N, S, S, 3) uint8 images; write checkpoints and the final EMA model into `out_dir`.

    `settings`: further VDVAETrainConfig fields (warmup_steps, weight_decay, grad_clip, skip_threshold,
    checkpoint_every, adam_betas). With `resume`, continue from `out_dir/checkpoint` if there is one;
    without it, an existing checkpoint is an error (nothing is overwritten by accident). `device` trains there;
    the returned EMA model is on the CPU.
    """
    from brainrecon.train.device import resolve_device

    device = resolve_device(device)
    train_cfg = VDVAETrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema_rate=ema_rate, **settings
    )
    images = _check_training_images(images_uint8, config, batch_size)
    data_sha256 = hashlib.sha256(np.ascontiguousarray(images_uint8).tobytes()).hexdigest()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR

    torch.manual_seed(seed)  # parameter init
    model = VDVAE(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=train_cfg.adam_betas, weight_decay=train_cfg.weight_decay
    )
    step = 0
    previous: list[dict[str, float]] = []  # history of the steps before a resume
    state = resume_state(ckpt_dir, resume, "VDVAE training state")
    if state is not None:
        saved_config = config_from_dict(VDVAEConfig, state["config"], source=str(ckpt_dir / STATE_FILE))
        if saved_config != config:
            raise ConfigError(
                f"{ckpt_dir}: checkpoint is for VDVAE config {saved_config.name!r}, not {config.name!r}"
            )
        step, previous = load_checkpoint(
            ckpt_dir,
            state,
            model,
            ema,
            optimizer,
            train_cfg=train_cfg,
            data_sha256=data_sha256,
            data_name="images",
            where=ckpt_dir,
        )

    n = images.shape[0]
    steps_per_epoch = n // batch_size
    history: list[dict[str, float]] = []
    bar = _progress_bar(step, steps, progress)
    model.train()
    while step < steps:
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch))
        batch = images[order[pos * batch_size : (pos + 1) * batch_size]].to(device)  # (B,S,S,3) uint8
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, train_cfg.warmup_steps))
        noise_gen = torch.Generator(device=device).manual_seed(seed * _SEED_STRIDE + step + 7)
        record = _train_step(model, ema, optimizer, batch, noise_gen, train_cfg)
        history.append(record)
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                elbo=f"{record['elbo']:.3f}", rate=f"{record['rate']:.3f}", skip=int(record["skipped"])
            )
        if step % train_cfg.checkpoint_every == 0 or step == steps:
            save_checkpoint(
                ckpt_dir,
                model,
                ema,
                optimizer,
                step=step,
                configs={"config": config_to_dict(config), "train": config_to_dict(train_cfg)},
                data_sha256=data_sha256,
                history=previous + history,
            )
    if bar is not None:
        bar.close()
    ema.cpu()
    save_vdvae(ema, config, out_dir)
    return VDVAETrainResult(
        ema_model=ema.eval(), step=step, history=history, skipped=int(sum(r["skipped"] for r in history))
    )


def _train_step(
    model: VDVAE,
    ema: VDVAE,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    generator: torch.Generator,
    cfg: VDVAETrainConfig,
) -> dict[str, float]:
    optimizer.zero_grad(set_to_none=True)
    stats = model(batch, generator=generator)
    stats["elbo"].backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    finite = all(math.isfinite(float(v.detach())) for v in stats.values())
    skip = (
        not finite
        or not math.isfinite(grad_norm)
        or (cfg.skip_threshold > 0 and grad_norm >= cfg.skip_threshold)
    )
    if not skip:
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - cfg.ema_rate)  # ema = rate * ema + (1 - rate) * p
    return {
        **{k: float(v.detach()) for k, v in stats.items()},
        "grad_norm": grad_norm,
        "skipped": float(skip),
    }


def _check_training_images(images: np.ndarray, config: VDVAEConfig, batch_size: int) -> torch.Tensor:
    s = config.image_size
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != (s, s, 3):
        found = f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
        raise InputError("training images", f"uint8 array (N, {s}, {s}, 3)", found)
    if images.shape[0] < batch_size:
        raise InputError("training images", f"at least batch_size={batch_size} images", str(images.shape[0]))
    return torch.from_numpy(np.ascontiguousarray(images))


def _progress_bar(start: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="vdvae", unit="step", dynamic_ncols=True)
