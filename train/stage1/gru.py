"""Stage-1 bi-GRU mapper from z-scored betas to VDVAE latents, and its training recipe.

Source: the GRU decoding paper's official code, LorenzoVeronese/GRU-Decoding_JNE, `scripts/02_vdvae_regression_nn.py`
(`GRUModel`, hidden 100, dropout 0.5). Architecture, optimiser, schedule, early stopping, augmentation and the
retrain-on-train+val with a replayed learning-rate schedule follow that script; differences are named where they
occur (all are about robustness or determinism, none changes the recipe):

- randomness is seeded (one torch seed for initialisation, torch generators for shuffling and augmentation);
- the augmentation is vectorised per batch but draws the same distributions per sample;
- a final training batch of one sample is dropped (BatchNorm1d cannot normalise a batch of one in train mode;
  the original would crash there).

The whole beta vector is one time step: x (B, V) → (B, 1, V) → GRU → … The "sequence" has length 1, so each GRU
is a gated nonlinear layer with no recurrence; the two directions see the same single step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from brainrecon.config import load_config, save_config
from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.io import atomic_path, write_json

RETRAIN_EPOCHS = ("all_run", "best")


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class GRUMapperConfig:
    """Architecture; saved beside the weights as `<name>.json`."""

    n_voxels: int
    n_outputs: int
    hidden_size: int = 100
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if min(self.n_voxels, self.n_outputs, self.hidden_size) < 1:
            raise ConfigError(f"GRUMapperConfig: expected positive sizes, found {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GRUMapperConfig: expected dropout in [0, 1), found {self.dropout}")


class GRUMapper(nn.Module):
    """BiGRU(V→H) → LayerNorm(2H) → Dropout → BiGRU(2H→H) → LayerNorm(2H) → Linear(2H,2H) → BatchNorm1d(2H) → ReLU
    → Dropout → Linear(2H, D). With V=15,724, H=100, D=13,344 (15 VDVAE layers): 12,400,344 parameters.
    """

    def __init__(self, config: GRUMapperConfig):
        super().__init__()
        self.config = config
        h2 = 2 * config.hidden_size
        self.gru1 = nn.GRU(config.n_voxels, config.hidden_size, batch_first=True, bidirectional=True)
        self.norm1 = nn.LayerNorm(h2)
        self.drop1 = nn.Dropout(config.dropout)
        self.gru2 = nn.GRU(h2, config.hidden_size, batch_first=True, bidirectional=True)
        self.norm2 = nn.LayerNorm(h2)
        self.fc1 = nn.Linear(h2, h2)
        self.bn = nn.BatchNorm1d(h2)
        self.drop2 = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(h2, config.n_outputs)

    def forward(self, betas: torch.Tensor) -> torch.Tensor:
        assert betas.ndim == 2 and betas.shape[1] == self.config.n_voxels, (
            f"expected (B, {self.config.n_voxels}), got {tuple(betas.shape)}"
        )
        x = betas.unsqueeze(1)  # (B, 1, V): one time step
        x, _ = self.gru1(x)  # (B, 1, 2H)
        x = self.drop1(self.norm1(x))
        x, _ = self.gru2(x)  # (B, 1, 2H)
        x = self.norm2(x).flatten(1)  # (B, 2H)
        x = self.drop2(torch.relu(self.bn(self.fc1(x))))  # (B, 2H)
        return self.fc2(x)  # (B, D)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- training recipe


@dataclass(frozen=True)
class GRUTrainConfig:
    """The seed paper's recipe (02_vdvae_regression_nn.py). Saved as `<name>.train.json` beside the weights."""

    loss: str = "mse"
    lr: float = 1e-3  # NAdam
    weight_decay: float = 5e-6
    batch_size: int = 64
    plateau_patience: int = 6  # ReduceLROnPlateau on validation MSE (mode min, default threshold 1e-4 rel)
    plateau_factor: float = 0.5
    early_stop_patience: int = 12  # stop after this many epochs without a new best validation MSE
    max_epochs: int = 200
    val_fraction: float = 0.1  # the last int(n * 0.1) of a random permutation, as the original
    noise_p: float = 0.3  # per sample: add N(0, noise_std²) to every (z-scored) voxel
    noise_std: float = 1.0
    mask_p: float = 0.3  # per sample, after the noise: zero a contiguous run of voxels
    mask_max_len: int = (
        500  # run length uniform in [1, mask_max_len), i.e. 1..499 as np.random.randint(1, 500)
    )
    # Retrain on train+val replaying the recorded learning rates. "all_run": for every epoch the first run made,
    # including the early-stopping patience (what the original does: len(learning_rates)); "best": up to and
    # including the epoch with the best validation MSE.
    retrain: bool = True
    retrain_epochs: str = "all_run"
    hidden_size: int = 100
    dropout: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if self.loss != "mse":
            problems.append(f"loss 'mse' (the paper's), found {self.loss!r}")
        if self.retrain_epochs not in RETRAIN_EPOCHS:
            problems.append(f"retrain_epochs in {RETRAIN_EPOCHS}, found {self.retrain_epochs!r}")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction in (0, 1), found {self.val_fraction}")
        for name in ("noise_p", "mask_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} in [0, 1], found {getattr(self, name)}")
        for name in ("batch_size", "max_epochs", "mask_max_len", "hidden_size"):
            if getattr(self, name) < 1 or (name == "mask_max_len" and self.mask_max_len < 2):
                problems.append(f"{name} ≥ {2 if name == 'mask_max_len' else 1}, found {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 < self.plateau_factor < 1:
            problems.append(
                f"lr > 0, weight_decay ≥ 0, 0 < plateau_factor < 1; found {self.lr}, {self.weight_decay}, {self.plateau_factor}"
            )
        if self.plateau_patience < 0 or self.early_stop_patience < 1 or self.noise_std < 0:
            problems.append("plateau_patience ≥ 0, early_stop_patience ≥ 1, noise_std ≥ 0")
        if problems:
            raise ConfigError("GRUTrainConfig: expected " + "; ".join(problems))


@dataclass
class GRUHistory:
    """Per-epoch record. `lrs[e]` is the learning rate used during epoch e of the first run; the retrain replays
    `lrs[:n_retrain_epochs]`, and `retrain_lrs` records what the optimiser actually used."""

    train_mse: list[float] = field(default_factory=list)
    val_mse: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 1-based: epochs up to and including the best validation MSE
    best_val_mse: float = math.inf
    early_stopped: bool = False
    retrain_mse: list[float] = field(default_factory=list)
    retrain_lrs: list[float] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0


def augment(
    betas: torch.Tensor,
    generator: torch.Generator,
    noise_p: float = 0.3,
    noise_std: float = 1.0,
    mask_p: float = 0.3,
    mask_max_len: int = 500,
) -> torch.Tensor:
    """The paper's two augmentations, independently per sample, noise first (as its `transforms.Compose`).

    Noise: with probability noise_p, add N(0, noise_std²) to every voxel. The original adds it after un-z-scoring
    with statistics recomputed on already z-scored betas (mean 0, std 1), i.e. in z-scored units, as here.
    Mask: with probability mask_p, zero voxels [start, start + length) with length uniform in
    [1, min(mask_max_len, V)) and start uniform in [0, V - length), the ranges of the original's
    `np.random.randint` calls. Returns a new tensor; the input is not modified.
    """
    b, v = betas.shape  # (B, V)
    device = betas.device
    noisy = torch.rand(b, generator=generator, device=device) < noise_p  # (B,)
    noise = torch.randn(b, v, generator=generator, device=device, dtype=betas.dtype) * noise_std  # (B, V)
    out = betas + noise * noisy[:, None]
    masked = torch.rand(b, generator=generator, device=device) < mask_p  # (B,)
    high = min(mask_max_len, v)
    if high > 1:
        length = torch.randint(1, high, (b,), generator=generator, device=device)  # (B,) in [1, high)
        # start uniform in [0, v - length): scale a uniform draw, exact for integers
        start = (torch.rand(b, generator=generator, device=device, dtype=torch.float64) * (v - length)).long()
        idx = torch.arange(v, device=device)  # (V,)
        run = (idx >= start[:, None]) & (idx < (start + length)[:, None])  # (B, V)
        out = out.masked_fill(run & masked[:, None], 0.0)
    return out


def _check_training_data(X: np.ndarray, Y: np.ndarray) -> None:
    for name, a in (("X", X), ("Y", Y)):
        if not isinstance(a, np.ndarray) or a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
            found = f"shape {a.shape}, dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
            raise InputError(name, "a float array of shape (n_samples, n)", found)
        if not np.all(np.isfinite(a)):
            raise InputError(name, "finite values", f"{int(np.sum(~np.isfinite(a)))} NaN/Inf values")
    if X.shape[0] != Y.shape[0]:
        raise InputError("Y", f"{X.shape[0]} rows (as X)", f"{Y.shape[0]}")


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()  # BatchNorm1d cannot train on one sample; the original DataLoader would crash here
    return batches


def _train_epoch(model, optimizer, X, Y, cfg: GRUTrainConfig, shuffle_gen, aug_gen) -> float:
    model.train()
    total, count = 0.0, 0
    for idx in _batches(len(X), cfg.batch_size, shuffle_gen):
        inputs = augment(X[idx], aug_gen, cfg.noise_p, cfg.noise_std, cfg.mask_p, cfg.mask_max_len)  # (B, V)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(inputs), Y[idx])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        count += len(idx)
    return total / count


@torch.no_grad()
def _mse(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch_size: int) -> float:
    model.eval()
    sq = sum(
        float(((model(X[i : i + batch_size]) - Y[i : i + batch_size]) ** 2).sum())
        for i in range(0, len(X), batch_size)
    )
    return sq / Y.numel()


def _new_model(config: GRUMapperConfig, seed: int, device: torch.device) -> GRUMapper:
    torch.manual_seed(seed)  # same initial weights for the first run and the retrain
    return GRUMapper(config).to(device)


def train_gru(
    X: np.ndarray,
    Y: np.ndarray,
    config: GRUTrainConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[GRUMapper, GRUHistory]:
    """Train the mapper on z-scored betas X (N, V) → targets Y (N, D) with the paper's recipe.

    1. Split off the validation set (last int(N·val_fraction) of a seeded permutation).
    2. Train with NAdam + ReduceLROnPlateau on validation MSE, early stopping; record the LR of each epoch.
    3. If `config.retrain`: a freshly initialised model (same initial weights) trains on train+val for the chosen
       number of epochs with the recorded LRs replayed, and is returned. Otherwise the first run's weights at its
       best validation epoch are returned.

    Deterministic on CPU for a given seed (and thread count).
    """
    config = config if config is not None else GRUTrainConfig()
    _check_training_data(X, Y)
    n = X.shape[0]
    n_val = int(n * config.val_fraction)
    if n_val < 1 or n - n_val < 2:
        raise InputError(
            "X", f"enough samples for a {config.val_fraction:.0%} validation split", f"{n} samples"
        )
    device = torch.device(device)
    perm = np.random.default_rng(seed).permutation(n)
    X_all = torch.as_tensor(X[perm], dtype=torch.float32, device=device)  # (N, V), validation rows last
    Y_all = torch.as_tensor(Y[perm], dtype=torch.float32, device=device)  # (N, D)
    X_tr, Y_tr, X_va, Y_va = X_all[: n - n_val], Y_all[: n - n_val], X_all[n - n_val :], Y_all[n - n_val :]
    model_config = GRUMapperConfig(X.shape[1], Y.shape[1], config.hidden_size, config.dropout)
    history = GRUHistory(n_train=n - n_val, n_val=n_val)

    def generators(offset: int) -> tuple[torch.Generator, torch.Generator]:
        shuffle = torch.Generator().manual_seed(seed * 1000 + offset)  # randperm of indices on CPU
        aug = torch.Generator(device=device).manual_seed(seed * 1000 + offset + 1)
        return shuffle, aug

    # ---- first run, with validation
    model = _new_model(model_config, seed, device)
    optimizer = torch.optim.NAdam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", patience=config.plateau_patience, factor=config.plateau_factor
    )
    shuffle_gen, aug_gen = generators(0)
    best_state, since_best = None, 0
    bar = tqdm(range(config.max_epochs), desc="gru", disable=not progress)
    for epoch in bar:
        lr = optimizer.param_groups[0]["lr"]
        history.lrs.append(lr)
        history.train_mse.append(_train_epoch(model, optimizer, X_tr, Y_tr, config, shuffle_gen, aug_gen))
        val = _mse(model, X_va, Y_va, 256)
        history.val_mse.append(val)
        scheduler.step(val)
        bar.set_postfix(train=f"{history.train_mse[-1]:.4f}", val=f"{val:.4f}", lr=f"{lr:.1e}")
        if val < history.best_val_mse:
            history.best_val_mse, history.best_epoch, since_best = val, epoch + 1, 0
            if not config.retrain:
                best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if since_best >= config.early_stop_patience:
                history.early_stopped = True
                break
    bar.close()
    if not config.retrain:
        if best_state is None:
            raise InputError("train_gru", "a finite validation MSE", f"{history.val_mse} (training diverged)")
        model.load_state_dict(best_state)
        model.eval()
        return model, history

    # ---- retrain on train + validation, replaying the learning rates
    n_epochs = len(history.lrs) if config.retrain_epochs == "all_run" else history.best_epoch
    model = _new_model(model_config, seed, device)
    optimizer = torch.optim.NAdam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    shuffle_gen, aug_gen = generators(2)
    for lr in tqdm(history.lrs[:n_epochs], desc="gru retrain", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = lr
        history.retrain_lrs.append(optimizer.param_groups[0]["lr"])
        history.retrain_mse.append(_train_epoch(model, optimizer, X_all, Y_all, config, shuffle_gen, aug_gen))
    model.eval()
    return model, history


@torch.no_grad()
def predict(
    model: GRUMapper, X: np.ndarray, batch_size: int = 256, device: str | torch.device | None = None
) -> np.ndarray:
    """(N, V) z-scored betas → (N, D) float32, in eval mode (dropout off, BatchNorm running statistics)."""
    if not isinstance(X, np.ndarray) or X.ndim != 2 or X.shape[1] != model.config.n_voxels:
        found = f"shape {X.shape}" if isinstance(X, np.ndarray) else type(X).__name__
        raise InputError("X", f"an array of shape (N, {model.config.n_voxels})", found)
    if not np.all(np.isfinite(X)):
        raise InputError("X", "finite values", f"{int(np.sum(~np.isfinite(X)))} NaN/Inf values")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.empty((X.shape[0], model.config.n_outputs), dtype=np.float32)
    for i in range(0, len(X), batch_size):
        batch = torch.as_tensor(X[i : i + batch_size], dtype=torch.float32, device=device)  # (B, V)
        out[i : i + batch_size] = model(batch).cpu().numpy()
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- save / load


def save_gru(
    model: GRUMapper,
    directory: str | Path,
    name: str = "gru",
    train_config: GRUTrainConfig | None = None,
    history: GRUHistory | None = None,
) -> Path:
    """Write `<name>.safetensors` (state dict, BatchNorm statistics included) and `<name>.json` (GRUMapperConfig),
    plus `<name>.train.json` and `<name>.history.json` when given; each file atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    weights = directory / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "brainrecon.gru"})
    save_config(model.config, directory / f"{name}.json")
    if train_config is not None:
        save_config(train_config, directory / f"{name}.train.json")
    if history is not None:
        write_json(directory / f"{name}.history.json", asdict(history))
    return weights


def load_gru(directory: str | Path, name: str = "gru", device: str | torch.device = "cpu") -> GRUMapper:
    """Rebuild the mapper from `<name>.json` and load `<name>.safetensors`, strictly; returned in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = load_config(GRUMapperConfig, directory / f"{name}.json")
    weights = directory / f"{name}.safetensors"
    if not weights.is_file():
        raise MissingFileError(weights, "GRU mapper weights", "re-run the GRU training that wrote it")
    state = load_file(str(weights))
    with torch.device("meta"):
        model = GRUMapper(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:4]
        raise InputError(weights, f"the state dict of {config}", f"differences {diff}")
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()
