"""A simulated NSD subject: procedural stimuli, a toy visual cortex and its betas, written in the NSD layout.

The files match real NSD's (Allen et al. 2022) names, dtypes and conventions (see `layout.py`), so the same
reader, training and evaluation code runs on both. The brain model:

- voxels in the ROI of a brain-shaped ellipsoid on a 1.8 mm grid (`nsdgeneral.nii.gz`: -1 / 0 / 1);
- "early" voxels (posterior end) pool low-level feature maps (luminance, colour opponency, local contrast,
  oriented energy) through Gaussian receptive fields laid out as a retinotopic map, then compress (power 0.5);
- "higher" voxels are sparse linear + nonlinear mixtures of the scene semantics (category, colour, count, size);
- each voxel's noiseless response is standardised over images and observed with single-trial noise at a noise
  ceiling SNR `ncsnr` spread like NSD's, plus per-session offsets and gain, stored as int16 = % change x 300.

The ground truth (ncsnr, noise ceilings, voxel kinds, receptive fields) goes to `simulation_truth.json`.
With a `TimeseriesConfig` (`recon-sim --timeseries`), the same brain is also observed as BOLD runs and the betas
come from a GLM on them instead (`timeseries.py`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import nibabel as nib
import numpy as np
import scipy.io
from scipy.ndimage import gaussian_filter
from scipy.stats import rankdata

from brainrecon.data import layout
from brainrecon.data.scenes import SEMANTIC_NAMES, draw_scene, render_scene, scene_captions, scene_semantics
from brainrecon.errors import ConfigError, InputError

if TYPE_CHECKING:
    from brainrecon.data.timeseries import TimeseriesConfig

N_SUBJECTS = 8  # rows of NSD's subjectim
REPEATS_TEST = 3  # every shared image is shown three times, as in NSD
VOXEL_MM = 1.8
# Feature-map channels before the oriented energies (one per orientation); see `feature_maps`.
LOW_LEVEL_CHANNELS = ("luminance", "red", "green", "blue", "yellow", "contrast")


@dataclass(frozen=True)
class SimConfig:
    """Size of the simulated subject and parameters of its brain. Presets: `SimConfig.preset("tiny" | "demo")`."""

    name: str = "custom"
    n_train_images: int = 60
    n_test_images: int = 10  # the shared images, each shown 3 times
    image_size: int = 64
    grid: tuple[int, int, int] = (10, 12, 8)  # X (left-right), Y (posterior-anterior), Z (inferior-superior)
    n_sessions: int = 4
    trials_per_session: int = 50
    roi_extent: float = 0.6  # the ROI is the posterior part of the brain, this fraction of the Y axis
    early_fraction: float = 0.45  # the most posterior share of ROI voxels is retinotopic ("early")
    feature_res: int = 32  # feature maps are feature_res^2; image_size must be a multiple of 2 * feature_res
    n_orientations: int = 4
    max_eccentricity: float = 0.6  # of RF centres, as a fraction of the image side
    rf_size_min: float = 0.03  # RF Gaussian sd = rf_size_min + rf_size_slope * eccentricity (image fractions)
    rf_size_slope: float = 0.2
    compressive_exponent: float = 0.5
    semantic_sparsity: float = 0.25  # share of semantic features each higher voxel reads
    ncsnr_median: float = 0.3
    ncsnr_sigma: float = 0.45  # lognormal spread of ncsnr across voxels
    ncsnr_clip: tuple[float, float] = (0.02, 1.2)
    noise_psc: float = 2.0  # median single-trial noise sd, percent signal change
    session_offset_sd: float = 0.3  # per-session, per-voxel offsets, in units of the trial noise sd
    session_gain_sd: float = 0.05
    batch_size: int = 128  # images rendered and filtered at once

    def __post_init__(self) -> None:
        for f in (
            "n_train_images",
            "n_test_images",
            "image_size",
            "n_sessions",
            "trials_per_session",
            "feature_res",
            "n_orientations",
            "batch_size",
        ):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ConfigError(f"SimConfig.{f}: expected a positive integer, found {getattr(self, f)!r}")
        if len(self.grid) != 3 or min(self.grid) < 4:
            raise ConfigError(f"SimConfig.grid: expected 3 sizes >= 4, found {self.grid}")
        if self.image_size % (2 * self.feature_res):
            raise ConfigError(
                f"SimConfig.image_size: expected a multiple of 2 * feature_res = {2 * self.feature_res}, "
                f"found {self.image_size}"
            )
        lo, hi = self.n_train_images + REPEATS_TEST * self.n_test_images, REPEATS_TEST * self.n_images
        if not lo <= self.n_trials <= hi:
            raise ConfigError(
                f"SimConfig: n_sessions x trials_per_session = {self.n_trials} trials, expected {lo}..{hi} "
                f"(each train image 1-3 times, each test image {REPEATS_TEST} times)"
            )
        if not (0 < self.roi_extent <= 1 and 0 < self.early_fraction < 1):
            raise ConfigError(
                f"SimConfig: expected roi_extent in (0, 1] and early_fraction in (0, 1), found "
                f"{self.roi_extent} and {self.early_fraction}"
            )
        if not 0 < self.ncsnr_clip[0] < self.ncsnr_clip[1]:
            raise ConfigError(f"SimConfig.ncsnr_clip: expected 0 < low < high, found {self.ncsnr_clip}")

    @property
    def n_images(self) -> int:
        return self.n_train_images + self.n_test_images

    @property
    def n_trials(self) -> int:
        return self.n_sessions * self.trials_per_session

    @classmethod
    def preset(cls, name: str) -> SimConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown simulation preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(name=name, **PRESETS[name])


PRESETS: dict[str, dict[str, Any]] = {
    # Under a second to simulate; for tests. ~300 ROI voxels, 700 trials: enough training images for
    # both stage-1 regressors to beat the mean-image baseline.
    "tiny": dict(
        n_train_images=300,
        n_test_images=10,
        image_size=64,
        grid=(10, 12, 8),
        n_sessions=14,
        trials_per_session=50,
    ),
    # Big enough for the reconstruction pipeline to learn something. ~4500 ROI voxels, 6000 trials.
    "demo": dict(
        n_train_images=2000,
        n_test_images=100,
        image_size=128,
        grid=(24, 28, 20),
        n_sessions=8,
        trials_per_session=750,
    ),
}


# ---------------------------------------------------------------- design


@dataclass(frozen=True)
class Design:
    masterordering: np.ndarray  # (T,) 1-based index into the subject's image list
    subjectim: np.ndarray  # (8, M) 1-based stimulus ids; the first n_test columns are the shared images
    sharedix: np.ndarray  # (n_test,) 1-based stimulus ids

    def trial_images(self, subject: int) -> np.ndarray:
        """(T,) 0-based stimulus id of each trial, the way the reader computes it."""
        return self.subjectim[subject - 1, self.masterordering - 1] - 1


def make_design(config: SimConfig, rng: np.random.Generator) -> Design:
    """NSD-style design: shared images first in every subject's list, 3 repeats each; train images 1-3 repeats."""
    n_test, n_train = config.n_test_images, config.n_train_images
    shared = np.sort(rng.choice(config.n_images, n_test, replace=False))
    others = np.setdiff1d(np.arange(config.n_images), shared)
    subjectim = np.stack([np.concatenate([shared, rng.permutation(others)]) for _ in range(N_SUBJECTS)]) + 1
    # Start from 3 repeats per train image and take away exactly the surplus, at most 2 from any image,
    # so that the trial count is n_sessions x trials_per_session.
    surplus = REPEATS_TEST * n_train - (config.n_trials - REPEATS_TEST * n_test)
    removable = np.repeat(np.arange(n_train), 2)
    taken = removable[rng.choice(len(removable), surplus, replace=False)]
    train_repeats = REPEATS_TEST - np.bincount(taken, minlength=n_train)
    repeats = np.concatenate([np.full(n_test, REPEATS_TEST), train_repeats])
    masterordering = rng.permutation(np.repeat(np.arange(1, config.n_images + 1), repeats))
    assert len(masterordering) == config.n_trials
    return Design(masterordering.astype(np.int32), subjectim.astype(np.int32), (shared + 1).astype(np.int32))


# ---------------------------------------------------------------- brain


@dataclass(frozen=True)
class Brain:
    """Anatomy and voxel tuning. Per-voxel arrays are in mask order: np.flatnonzero(mask > 0), C order."""

    mask: np.ndarray  # (X, Y, Z) int16: -1 outside the brain, 0 brain, 1 ROI
    affine: np.ndarray  # (4, 4)
    early: np.ndarray  # (V,) bool
    rf_x: np.ndarray  # (V_early,) RF centre, fraction of image width (0 = left)
    rf_y: np.ndarray  # (V_early,) fraction of image height (0 = top)
    rf_size: np.ndarray  # (V_early,) Gaussian sd, fraction of the image side
    channel_weights: np.ndarray  # (V_early, C) feature mix of each early voxel, rows sum to 1
    semantic_linear: np.ndarray  # (D, V_higher) sparse
    semantic_hidden: np.ndarray  # (D + 1, H) sparse, last row is the bias
    semantic_nonlinear: np.ndarray  # (H, V_higher) sparse
    linear_share: np.ndarray  # (V_higher,) weight of the linear part
    ncsnr: np.ndarray  # (V,)
    noise_psc: np.ndarray  # (V,) single-trial noise sd, percent signal change
    baseline_psc: np.ndarray  # (V,)

    @property
    def roi_index(self) -> np.ndarray:
        return np.flatnonzero(self.mask > 0)

    @property
    def other_index(self) -> np.ndarray:
        """Brain voxels outside the ROI: they get noise only."""
        return np.flatnonzero(self.mask == 0)


def _sparse(rng: np.random.Generator, rows: int, cols: int, density: float) -> np.ndarray:
    """Gaussian weights with `density` of them kept; every column keeps at least one (no flat voxel)."""
    keep = rng.random((rows, cols)) < density
    keep[rng.integers(rows, size=cols), np.arange(cols)] = True
    return (rng.standard_normal((rows, cols)) * keep).astype(np.float32)


def make_brain(config: SimConfig, rng: np.random.Generator) -> Brain:
    """Mask, affine, receptive fields, semantic tuning and noise levels of every voxel."""
    grid = np.array(config.grid)
    ijk = np.indices(config.grid, dtype=np.float32)  # (3, X, Y, Z)
    centre = (grid - 1) / 2
    radius = np.sqrt(sum(((ijk[d] - centre[d]) / (grid[d] / 2)) ** 2 for d in range(3)))
    brain = radius <= 1
    # A smooth wobble makes the ROI's anterior border irregular, like a real nsdgeneral mask.
    wobble = gaussian_filter(rng.standard_normal(config.grid), 1.5)
    wobble /= wobble.std()
    roi = brain & (ijk[1] / (grid[1] - 1) + 0.05 * wobble < config.roi_extent)
    mask = np.where(roi, 1, np.where(brain, 0, -1)).astype(np.int16)
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = -VOXEL_MM * centre  # world origin at the grid centre

    x, y, z = (ijk[d][roi] for d in range(3))  # mask order (C order of the grid)
    n_vox = len(x)
    early = y <= np.quantile(y, config.early_fraction)
    n_early, n_higher = int(early.sum()), int(n_vox - early.sum())
    if n_early < 1 or n_higher < 1:
        raise ConfigError(
            f"SimConfig: grid {config.grid} gives {n_early} early and {n_higher} higher voxels; "
            "expected both >= 1 (enlarge the grid or change early_fraction)"
        )

    # Retinotopy: eccentricity grows from the posterior pole (by rank, so more voxels represent the fovea),
    # polar angle follows Z (inferior voxels see the upper field), each hemisphere sees the opposite side.
    ex, ey, ez = x[early], y[early], z[early]
    depth = (rankdata(ey) - 0.5) / n_early
    ecc = config.max_eccentricity * depth**1.5
    z_span = max(ez.max() - ez.min(), 1)
    polar = 0.9 * np.pi * (0.5 - (ez - ez.min()) / z_span)
    side = np.where(ex < centre[0], 1.0, -1.0)
    jitter = rng.normal(0, 0.015, size=(2, n_early))
    rf_x = np.clip(0.5 + side * ecc * np.cos(polar) + jitter[0], 0.02, 0.98)
    rf_y = np.clip(0.5 - ecc * np.sin(polar) + jitter[1], 0.02, 0.98)
    rf_size = (config.rf_size_min + config.rf_size_slope * ecc) * np.exp(rng.normal(0, 0.15, n_early))
    n_channels = len(LOW_LEVEL_CHANNELS) + config.n_orientations
    channel_weights = rng.dirichlet(np.full(n_channels, 0.5), size=n_early)

    n_sem, n_hidden = len(SEMANTIC_NAMES), 16
    semantic_linear = _sparse(rng, n_sem, n_higher, config.semantic_sparsity)
    semantic_hidden = _sparse(rng, n_sem + 1, n_hidden, 0.3) / np.sqrt(0.3 * n_sem)
    semantic_nonlinear = _sparse(rng, n_hidden, n_higher, 0.3)
    linear_share = rng.uniform(0.2, 0.8, n_higher)

    # ncsnr is spatially smooth in real data: a smoothed Gaussian field, made lognormal.
    field = gaussian_filter(rng.standard_normal(config.grid), 1.0)[roi]
    field = (field - field.mean()) / field.std()
    ncsnr = np.clip(config.ncsnr_median * np.exp(config.ncsnr_sigma * field), *config.ncsnr_clip)
    noise_psc = config.noise_psc * np.exp(rng.normal(0, 0.2, n_vox))
    # Betas have a voxel-specific mean in real data; the reader's z-scoring has to remove it.
    baseline_psc = rng.normal(0.5, 0.5, n_vox)

    f32 = np.float32
    return Brain(
        mask=mask,
        affine=affine,
        early=early,
        rf_x=rf_x.astype(f32),
        rf_y=rf_y.astype(f32),
        rf_size=rf_size.astype(f32),
        channel_weights=channel_weights.astype(f32),
        semantic_linear=semantic_linear,
        semantic_hidden=semantic_hidden.astype(f32),
        semantic_nonlinear=semantic_nonlinear,
        linear_share=linear_share.astype(f32),
        ncsnr=ncsnr.astype(f32),
        noise_psc=noise_psc.astype(f32),
        baseline_psc=baseline_psc.astype(f32),
    )


# ---------------------------------------------------------------- voxel responses


def gabor_bank(n: int, n_orientations: int) -> np.ndarray:
    """(O, n, n) complex64 FFTs of zero-mean complex Gabors, about 10 cycles per image."""
    wavelength = n / 10
    u = np.fft.fftfreq(n, d=1 / n).astype(np.float32)  # signed pixel offsets, filter centred at (0, 0)
    yy, xx = np.meshgrid(u, u, indexing="ij")
    envelope = np.exp(-(xx**2 + yy**2) / (2 * (0.5 * wavelength) ** 2))
    # Envelope summing to 2: a full-contrast grating (amplitude 0.5) at the preferred orientation gives energy 0.5.
    envelope *= 2 / envelope.sum()
    bank = []
    for theta in np.arange(n_orientations) * np.pi / n_orientations:
        carrier = np.exp(2j * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / wavelength)
        gabor = envelope * carrier
        gabor -= envelope * (gabor.sum() / envelope.sum())  # no response to uniform luminance
        bank.append(np.fft.fft2(gabor))
    return np.stack(bank).astype(np.complex64)


def feature_maps(images: np.ndarray, res: int, gabors: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) uint8 -> (B, C, res, res) float32 non-negative maps, each roughly in [0, 1].

    Channels: luminance, red, green, blue, yellow (rectified opponent channels), local contrast, then one
    oriented energy per Gabor. Computed at 2 x res and averaged down to res.
    """
    b, s = images.shape[:2]
    n = 2 * res
    f = s // n
    rgb = _block_mean(images.astype(np.float32) / 255, f, axes=(1, 2))  # (B, n, n, 3)
    r, g, bl = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    lum = 0.299 * r + 0.587 * g + 0.114 * bl
    red_green, blue_yellow = r - g, bl - 0.5 * (r + g)
    local_mean = gaussian_filter(lum, sigma=(0, 2, 2))
    contrast = np.sqrt(np.maximum(gaussian_filter((lum - local_mean) ** 2, sigma=(0, 2, 2)), 0))
    energy = np.abs(np.fft.ifft2(np.fft.fft2(lum)[:, None] * gabors[None]))  # (B, O, n, n)
    maps = np.concatenate(
        [
            np.stack(
                [
                    lum,
                    np.maximum(red_green, 0),
                    np.maximum(-red_green, 0),
                    np.maximum(blue_yellow, 0),
                    np.maximum(-blue_yellow, 0),
                    2 * contrast,
                ],
                axis=1,
            ),
            energy.astype(np.float32),
        ],
        axis=1,
    )  # (B, C, n, n)
    return _block_mean(maps, 2, axes=(2, 3))


def _block_mean(x: np.ndarray, f: int, axes: tuple[int, int]) -> np.ndarray:
    """Average f x f blocks over two axes; strided slices are much faster here than a reshaped mean."""
    if f == 1:
        return x
    index = [slice(None)] * x.ndim
    total = np.zeros_like(x[tuple(slice(None, None, f) if a in axes else slice(None) for a in range(x.ndim))])
    for i in range(f):
        for j in range(f):
            index[axes[0]], index[axes[1]] = slice(i, None, f), slice(j, None, f)
            total += x[tuple(index)]
    return total / (f * f)


def receptive_fields(brain: Brain, res: int) -> np.ndarray:
    """(res*res, V_early) Gaussian pooling weights, each column summing to 1."""
    p = (np.arange(res, dtype=np.float32) + 0.5) / res
    dx = p[None, None, :] - brain.rf_x[:, None, None]
    dy = p[None, :, None] - brain.rf_y[:, None, None]
    rf = np.exp(-(dx**2 + dy**2) / (2 * brain.rf_size[:, None, None] ** 2))  # (V_early, res, res)
    # Cut the tails at 4 sd: float32 subnormals there make the pooling matmul ~50x slower.
    rf[rf < np.exp(-8)] = 0
    rf /= rf.sum(axis=(1, 2), keepdims=True)
    return rf.reshape(len(rf), -1).T


def early_drive(maps: np.ndarray, rf: np.ndarray, channel_weights: np.ndarray) -> np.ndarray:
    """(B, C, res, res) maps -> (B, V_early) pooled, feature-mixed drive (non-negative)."""
    b, c = maps.shape[:2]
    pooled = (maps.reshape(b * c, -1) @ rf).reshape(b, c, -1)  # (B, C, V_early)
    return np.einsum("bcv,vc->bv", pooled, channel_weights)


def higher_response(semantics: np.ndarray, brain: Brain) -> np.ndarray:
    """(N, D) scene semantics -> (N, V_higher) responses of the higher voxels."""
    sd = semantics.std(axis=0)
    s = (semantics - semantics.mean(axis=0)) / np.where(sd > 0, sd, 1)
    hidden = np.tanh(np.concatenate([s, np.ones((len(s), 1), np.float32)], axis=1) @ brain.semantic_hidden)
    linear = _standardise(s @ brain.semantic_linear)
    nonlinear = _standardise(hidden @ brain.semantic_nonlinear)
    return brain.linear_share * linear + (1 - brain.linear_share) * nonlinear


def _standardise(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    return ((x - x.mean(axis=0)) / np.where(sd > 0, sd, 1)).astype(np.float32)


# ---------------------------------------------------------------- writing


class _Progress:
    """A rich progress bar, or nothing when disabled."""

    def __init__(self, enabled: bool):
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )

    def __enter__(self) -> _Progress:
        if self._bar:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar:
            self._bar.stop()

    def task(self, description: str, total: int) -> Callable[[int], None]:
        if self._bar is None:
            return lambda k: None
        bar, task_id = self._bar, self._bar.add_task(description, total=total)
        return lambda k: bar.advance(task_id, k)


def _write_stimuli(
    out: Path,
    config: SimConfig,
    brain: Brain,
    rng_scenes: np.random.Generator,
    rng_captions: np.random.Generator,
    advance: Callable[[int], None],
) -> np.ndarray:
    """Render, write imgBrick and captions; return the (N, V) standardised noiseless voxel responses."""
    n, s = config.n_images, config.image_size
    gabors = gabor_bank(2 * config.feature_res, config.n_orientations)
    rf = receptive_fields(brain, config.feature_res)
    drive = np.empty((n, rf.shape[1]), dtype=np.float32)
    semantics = np.empty((n, len(SEMANTIC_NAMES)), dtype=np.float32)
    captions: dict[str, list[str]] = {}
    path = layout.stimuli_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        # One chunk per image, uncompressed like NSD: readers fetch single images at random.
        brick = f.create_dataset("imgBrick", shape=(n, s, s, 3), dtype=np.uint8, chunks=(1, s, s, 3))
        for start in range(0, n, config.batch_size):
            stop = min(start + config.batch_size, n)
            scenes = [draw_scene(rng_scenes) for _ in range(start, stop)]
            images = np.stack([render_scene(scene, s) for scene in scenes])
            brick[start:stop] = images
            for i, scene in enumerate(scenes, start=start):
                captions[str(i)] = scene_captions(scene, rng_captions)
                semantics[i] = scene_semantics(scene)
            maps = feature_maps(images, config.feature_res, gabors)
            drive[start:stop] = early_drive(maps, rf, brain.channel_weights)
            advance(stop - start)
    layout.captions_path(out).write_text(json.dumps(captions))

    signal = np.empty((n, len(brain.early)), dtype=np.float32)
    signal[:, brain.early] = _standardise(drive**config.compressive_exponent)
    signal[:, ~brain.early] = _standardise(higher_response(semantics, brain))
    return signal


def _write_sessions(
    out: Path,
    config: SimConfig,
    subject: int,
    design: Design,
    brain: Brain,
    signal: np.ndarray,
    rng: np.random.Generator,
    advance: Callable[[int], None],
) -> None:
    """One betas_sessionNN.nii.gz per session, int16 = percent signal change x 300."""
    grid, tps = config.grid, config.trials_per_session
    roi, other = brain.roi_index, brain.other_index
    image_of_trial = design.trial_images(subject)
    folder = layout.betas_dir(out, subject)
    folder.mkdir(parents=True, exist_ok=True)
    ncsnr, noise_psc, baseline = (a[:, None] for a in (brain.ncsnr, brain.noise_psc, brain.baseline_psc))
    other_noise_psc = config.noise_psc * np.exp(rng.normal(0, 0.2, (len(other), 1))).astype(np.float32)
    for session in range(config.n_sessions):
        ids = image_of_trial[session * tps : (session + 1) * tps]
        gain = np.float32(1 + rng.normal(0, config.session_gain_sd))
        offset = rng.normal(0, config.session_offset_sd, (len(roi), 1)).astype(np.float32)
        noise = rng.standard_normal((len(roi), tps), dtype=np.float32)
        # In units of the trial noise sd: signal sd = ncsnr, noise sd = 1. This is signal sd 1 with noise sd
        # 1/ncsnr rescaled, so low-SNR voxels keep a realistic amplitude instead of overflowing int16.
        response = gain * (ncsnr * signal[ids].T + noise) + offset  # (V, tps)
        volume = np.zeros((int(np.prod(grid)), tps), dtype=np.int16)
        volume[roi] = _to_int16(baseline + noise_psc * response)
        volume[other] = _to_int16(other_noise_psc * rng.standard_normal((len(other), tps), dtype=np.float32))
        img = nib.Nifti1Image(volume.reshape(*grid, tps), brain.affine)
        img.set_data_dtype(np.int16)
        nib.save(img, layout.session_path(out, subject, session + 1))
        advance(1)


def _to_int16(psc: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(psc * layout.BETAS_SCALE), -32768, 32767).astype(np.int16)


def _round(values: np.ndarray, digits: int = 5) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64)]


def noise_ceiling(ncsnr: np.ndarray, n_repeats: int) -> np.ndarray:
    """NSD's noise ceiling in percent of variance for the average of n_repeats trials."""
    return 100 * ncsnr**2 / (ncsnr**2 + 1 / n_repeats)


def _truth(config: SimConfig, seed: int, subject: int, design: Design, brain: Brain) -> dict[str, Any]:
    rf_x = np.full(len(brain.early), np.nan)
    rf_y, rf_size = rf_x.copy(), rf_x.copy()
    rf_x[brain.early], rf_y[brain.early], rf_size[brain.early] = brain.rf_x, brain.rf_y, brain.rf_size
    ncsnr = brain.ncsnr.astype(np.float64)

    def with_nulls(a: np.ndarray) -> list[float | None]:
        return [None if np.isnan(v) else v for v in _round(a)]

    return {
        "seed": seed,
        "preset": config.name,
        "config": dataclasses.asdict(config),
        "subject": subject,
        "n_voxels": len(ncsnr),
        "voxel_order": "np.flatnonzero(mask > 0) in C order of the X x Y x Z grid",
        "units": "rf_x, rf_y: RF centre as a fraction of the image (x right, y down); rf_size: Gaussian sd as a "
        "fraction of the image side; null for higher voxels; noise ceilings in percent",
        "shared_ids": (design.sharedix - 1).tolist(),
        "ncsnr": _round(ncsnr),
        "noise_ceiling_n1": _round(noise_ceiling(ncsnr, 1)),
        "noise_ceiling_n3": _round(noise_ceiling(ncsnr, 3)),
        "kind": ["early" if e else "higher" for e in brain.early],
        "rf_x": with_nulls(rf_x),
        "rf_y": with_nulls(rf_y),
        "rf_size": with_nulls(rf_size),
    }


def simulated_responses(config: SimConfig, seed: int, scratch: Path) -> np.ndarray:
    """(N, V) standardised noiseless responses of a seed's brain to its images, the ones its betas are drawn
    around (rendering the stimuli again, into `scratch`)."""
    _, rng_brain, rng_scenes, rng_captions, *_ = np.random.default_rng(seed).spawn(6)
    brain = make_brain(config, rng_brain)
    return _write_stimuli(Path(scratch), config, brain, rng_scenes, rng_captions, lambda k: None)


def simulate_subject(
    out: Path,
    config: SimConfig,
    seed: int,
    subject: int = 1,
    progress: bool = False,
    timeseries: TimeseriesConfig | None = None,
) -> dict:
    """Write a simulated subject into directory `out` in the NSD layout; deterministic for a seed.

    With `timeseries`, also write BOLD runs and design files, and betas estimated from the runs by a GLM in place
    of the direct ones; stimuli, design, mask and truth are the same as without.
    Returns a summary: n_images, n_test_images, n_trials, n_sessions, n_voxels, grid, seconds (and n_runs).
    """
    if not 1 <= subject <= N_SUBJECTS:
        raise InputError("subject", f"an NSD subject number in 1..{N_SUBJECTS}", str(subject))
    start = time.perf_counter()
    out = Path(out)
    # A sixth stream for the time series leaves the first five, and so the default output, unchanged.
    streams = np.random.default_rng(seed).spawn(6)
    rng_design, rng_brain, rng_scenes, rng_captions, rng_noise, rng_timeseries = streams
    design = make_design(config, rng_design)
    brain = make_brain(config, rng_brain)

    layout.expdesign_path(out).parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        layout.expdesign_path(out),
        {
            "masterordering": design.masterordering[None],
            "subjectim": design.subjectim,
            "sharedix": design.sharedix[None],
        },
    )
    layout.mask_path(out, subject).parent.mkdir(parents=True, exist_ok=True)
    mask_img = nib.Nifti1Image(brain.mask, brain.affine)
    mask_img.set_data_dtype(np.int16)
    nib.save(mask_img, layout.mask_path(out, subject))

    with _Progress(progress) as bar:
        signal = _write_stimuli(
            out, config, brain, rng_scenes, rng_captions, bar.task("stimuli", config.n_images)
        )
        sessions = bar.task("sessions", config.n_sessions)
        if timeseries is None:
            _write_sessions(out, config, subject, design, brain, signal, rng_noise, sessions)
        else:
            from brainrecon.data.timeseries import write_timeseries

            record = write_timeseries(
                out, config, timeseries, subject, design, brain, signal, rng_timeseries, sessions
            )
            layout.sim_timeseries_path(out).write_text(json.dumps(record) + "\n")
    del signal
    layout.sim_truth_path(out).write_text(json.dumps(_truth(config, seed, subject, design, brain)) + "\n")
    return {
        "n_images": config.n_images,
        "n_test_images": config.n_test_images,
        "n_trials": config.n_trials,
        "n_sessions": config.n_sessions,
        "n_voxels": int(brain.early.size),
        "grid": list(config.grid),
        "seconds": round(time.perf_counter() - start, 2),
        **({"n_runs": len(record["runs"])} if timeseries is not None else {}),
    }
