"""BOLD time series of a simulated subject in NSD's layout, and the betas an offline GLM estimates from them.

`recon-sim --timeseries` writes, for the brain and design of `sim.py`, what a scanner session of NSD's
preprocessed data looks like (NSD data manual, "Time-series data"), then derives the session betas from those runs,
so that a subject fitted on the betas and a real-time reader of the volumes see one brain:

- runs of volumes at TR 4/3 s (func1pt8mm after NSD's temporal resampling; volume k is at k x TR, time 0 the start
  of the first volume), in raw scanner units (int16), zeros outside the brain;
- NSD's trial timing: trial slots of 4 s (image 3 s, gap 1 s), so a trial starts every 3 volumes; NSD runs have
  75 slots for 62 or 63 stimulus trials, the rest blank, and one volume more than the design file's rows;
- each trial's response is the simulator's own noiseless beta (ROI baseline + image-driven response with the
  session's gain and offset, percent signal change), times the 3 s stimulus convolved with SPM's canonical
  double-gamma HRF (peak 1); plus a slow drift (low-frequency cosines), AR(1) noise and per-run baseline offsets;
- the betas: one ordinary least-squares GLM per run with a regressor per trial (the same HRF) and Legendre
  polynomial drift terms; a trial's beta is 100 x its coefficient / the run's intercept (percent signal change),
  written as NSD's int16 betas (x 300).

The noise is scaled so that the GLM betas' single-trial noise equals the direct betas' (`noise_psc`): the noise
ceilings in `simulation_truth.json` describe both. What a reader needs (TR, HRF, onsets, run lengths, ids) goes to
`simulation_timeseries.json`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import scipy.io
from scipy.stats import gamma

from brainrecon.data import layout
from brainrecon.data.sim import Brain, Design, SimConfig, _to_int16
from brainrecon.errors import ConfigError


@dataclass(frozen=True)
class TimeseriesConfig:
    """Timing, HRF, noise and GLM of the simulated time series. Defaults follow NSD's func1pt8mm runs."""

    tr: float = 4 / 3  # s, after NSD's temporal resampling (acquisition TR 1.6 s)
    stimulus_s: float = 3.0  # image on
    trial_s: float = 4.0  # image + 1 s gap
    max_trials_per_run: int = 63  # NSD: 63 (odd runs) or 62 (even runs) stimulus trials
    slots_per_full_run: int = 75  # NSD: 75 trial slots per run; the others are blank
    end_blank_slots: int = 3  # blank slots closing each run, so the last response is measured (our choice)
    intensity: float = 2000.0  # median baseline intensity of a brain voxel, scanner units
    intensity_sd: float = 0.25  # lognormal spread of the baseline over voxels
    run_offset_sd: float = 0.01  # per-run, per-voxel change of the baseline, as a fraction of it
    drift_psc: float = 1.0  # sd of the slow drift, percent signal change
    drift_cosines: int = 3  # drift = the first cosines of a DCT over the run (periods >= 2/3 of the run)
    ar1: float = 0.4  # lag-1 autocorrelation of the noise between volumes
    noise: float = 1.0  # scale of the noise: 1 gives the GLM betas the direct betas' trial noise; 0 none
    glm_degree: int = 3  # Legendre polynomials 0..degree per run in the GLM

    def __post_init__(self) -> None:
        if not (self.tr > 0 and 0 < self.stimulus_s <= self.trial_s):
            raise ConfigError(
                f"TimeseriesConfig: expected tr > 0 and 0 < stimulus_s <= trial_s, found {self.tr}, "
                f"{self.stimulus_s}, {self.trial_s}"
            )
        if abs(self.trial_s / self.tr - round(self.trial_s / self.tr)) > 1e-6:
            raise ConfigError(
                f"TimeseriesConfig: expected trial_s a multiple of tr (onsets on volumes), found "
                f"{self.trial_s} / {self.tr} = {self.trial_s / self.tr:.4f}"
            )
        if not 1 <= self.max_trials_per_run < self.slots_per_full_run - self.end_blank_slots:
            raise ConfigError(
                f"TimeseriesConfig: expected 1 <= max_trials_per_run < slots_per_full_run - end_blank_slots, "
                f"found {self.max_trials_per_run}, {self.slots_per_full_run}, {self.end_blank_slots}"
            )
        if not (0 <= self.ar1 < 1 and self.noise >= 0 and self.drift_psc >= 0 and self.glm_degree >= 0):
            raise ConfigError(
                f"TimeseriesConfig: expected 0 <= ar1 < 1 and noise, drift_psc, glm_degree >= 0, found "
                f"{self.ar1}, {self.noise}, {self.drift_psc}, {self.glm_degree}"
            )

    @property
    def volumes_per_slot(self) -> int:
        return round(self.trial_s / self.tr)


# ---------------------------------------------------------------- HRF and runs


def spm_hrf(t: np.ndarray) -> np.ndarray:
    """SPM's canonical HRF at times t (s): gamma(6) - gamma(16) / 6, unit scale (spm_hrf.m defaults)."""
    return gamma.pdf(t, 6) - gamma.pdf(t, 16) / 6


def trial_kernel(config: TimeseriesConfig, length_s: float = 32.0) -> np.ndarray:
    """(K,) a trial's BOLD response at volumes 0, 1, ... after its onset: the stimulus boxcar convolved with the
    HRF (on a 10 ms grid), peak 1, so that a regressor's coefficient is the response amplitude."""
    dt = 0.01
    t = np.arange(0, length_s, dt)
    response = np.convolve(spm_hrf(t), np.ones(round(config.stimulus_s / dt)))[: len(t)] * dt
    response /= response.max()
    volumes = np.arange(math.ceil(length_s / config.tr)) * config.tr
    return np.interp(volumes, t, response, right=0.0)


@dataclass(frozen=True)
class Run:
    """One run: which slots hold which trial of the session."""

    session: int  # 1-based
    run: int  # 1-based
    slot_trial: np.ndarray  # (slots,) index of the trial in its session (0-based), -1 for a blank slot

    @property
    def trial_slots(self) -> np.ndarray:
        return np.flatnonzero(self.slot_trial >= 0)

    def n_volumes(self, config: TimeseriesConfig) -> int:
        # NSD: one volume more than the design rows (225 rows, 226 volumes for 75 slots)
        return len(self.slot_trial) * config.volumes_per_slot + 1


def plan_runs(config: TimeseriesConfig, trials_per_session: int, n_sessions: int, rng: np.random.Generator):
    """Split each session's trials into runs of at most max_trials_per_run, in masterordering order.

    Runs of a session have equal length (NSD: 12 runs of 75 slots for 750 trials, 63 trials in odd runs and 62 in
    even ones); blank slots open each run (one) and close it (end_blank_slots), the rest are placed at random.
    """
    n_runs = math.ceil(trials_per_session / config.max_trials_per_run)
    base, extra = divmod(trials_per_session, n_runs)
    counts = np.full(n_runs, base)
    counts[np.concatenate([np.arange(0, n_runs, 2), np.arange(1, n_runs, 2)])[:extra]] += 1  # odd runs first
    slots = math.ceil(counts.max() * config.slots_per_full_run / config.max_trials_per_run)
    runs = []
    for session in range(1, n_sessions + 1):
        first = 0
        for r, count in enumerate(counts):
            free = np.arange(1, slots - config.end_blank_slots)
            used = np.sort(rng.choice(free, count, replace=False))
            slot_trial = np.full(slots, -1, dtype=np.int64)
            slot_trial[used] = first + np.arange(count)
            runs.append(Run(session, r + 1, slot_trial))
            first += count
    return runs


def design_matrix(run: Run, config: TimeseriesConfig, kernel: np.ndarray) -> np.ndarray:
    """(volumes, trials + degree + 1): one regressor per trial in slot order, then Legendre drift terms."""
    n = run.n_volumes(config)
    slots = run.trial_slots
    x = np.zeros((n, len(slots) + config.glm_degree + 1))
    for j, slot in enumerate(slots):
        onset = slot * config.volumes_per_slot
        k = min(len(kernel), n - onset)
        x[onset : onset + k, j] = kernel[:k]
    x[:, len(slots) :] = np.polynomial.legendre.legvander(np.linspace(-1, 1, n), config.glm_degree)
    return x


def beta_noise_factor(runs: list[Run], config: TimeseriesConfig, kernel: np.ndarray) -> float:
    """Mean variance of a trial's OLS estimate per unit variance of AR(1) noise, over the runs' trials."""
    factors = []
    for run in runs:
        x = design_matrix(run, config, kernel)
        n, n_trials = len(x), len(run.trial_slots)
        lag = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))
        p = np.linalg.pinv(x)[:n_trials]  # (trials, volumes)
        factors.append(np.einsum("ij,jk,ik->i", p, config.ar1**lag, p))
    return float(np.mean(np.concatenate(factors)))


# ---------------------------------------------------------------- writing


def write_timeseries(
    out: Path,
    sim_config: SimConfig,
    config: TimeseriesConfig,
    subject: int,
    design: Design,
    brain: Brain,
    signal: np.ndarray,
    rng: np.random.Generator,
    advance: Callable[[int], None],
) -> dict[str, Any]:
    """Write every run's volumes and design file, then the session betas from a GLM per run.

    Returns what `simulation_timeseries.json` holds. Memory: one run of the brain's voxels at a time.
    """
    tps = sim_config.trials_per_session
    runs = plan_runs(config, tps, sim_config.n_sessions, rng)
    kernel = trial_kernel(config)
    brain_index = np.flatnonzero(brain.mask >= 0)  # the time series cover the brain, as NSD's brain mask
    in_roi = brain.mask.reshape(-1)[brain_index] > 0
    n_brain, n_roi = len(brain_index), int(in_roi.sum())
    grid, n_grid = sim_config.grid, int(np.prod(sim_config.grid))
    ten_k_ids = design.masterordering

    # Per voxel: baseline intensity, and the beta-noise sd that the time-series noise must reproduce
    # (ROI: the brain's noise_psc; other brain voxels: drawn as the direct betas' are).
    intensity = config.intensity * np.exp(rng.normal(0, config.intensity_sd, n_brain))
    beta_noise_psc = np.empty(n_brain)
    beta_noise_psc[in_roi] = brain.noise_psc
    beta_noise_psc[~in_roi] = sim_config.noise_psc * np.exp(rng.normal(0, 0.2, n_brain - n_roi))
    noise_sd = (
        config.noise * beta_noise_psc / math.sqrt(beta_noise_factor(runs, config, kernel))
    )  # per volume
    ncsnr, noise_psc, baseline = (
        a[:, None].astype(np.float64) for a in (brain.ncsnr, brain.noise_psc, brain.baseline_psc)
    )

    betas_folder = layout.betas_dir(out, subject)
    betas_folder.mkdir(parents=True, exist_ok=True)
    layout.timeseries_path(out, subject, 1, 1).parent.mkdir(parents=True, exist_ok=True)
    layout.run_design_path(out, subject, 1, 1).parent.mkdir(parents=True, exist_ok=True)
    record = []
    for session in range(1, sim_config.n_sessions + 1):
        ids = design.trial_images(subject)[(session - 1) * tps : session * tps]
        gain = 1 + rng.normal(0, sim_config.session_gain_sd)
        offset = rng.normal(0, sim_config.session_offset_sd, (n_roi, 1))
        # The direct betas without their trial noise, percent signal change: (V_roi, trials); the other brain
        # voxels do not respond.
        amplitude = baseline + noise_psc * (gain * ncsnr * signal[ids].T + offset)
        betas = np.zeros((n_brain, tps), dtype=np.float32)
        for run in (r for r in runs if r.session == session):
            x = design_matrix(run, config, kernel)
            n = len(x)
            trials = run.slot_trial[run.trial_slots]
            bold = np.zeros((n, n_brain))  # (volumes, V_brain) percent signal change
            bold[:, in_roi] = x[:, : len(trials)] @ amplitude[:, trials].T
            phase = np.pi * (np.arange(n)[:, None] + 0.5) / n
            drift = np.cos(phase * np.arange(1, config.drift_cosines + 1)) @ rng.standard_normal(
                (config.drift_cosines, n_brain)
            )
            bold += config.drift_psc * drift / math.sqrt(config.drift_cosines / 2)
            bold += noise_sd * _ar1(rng, n, n_brain, config.ar1)
            level = intensity * (1 + rng.normal(0, config.run_offset_sd, n_brain))
            volumes = np.clip(np.rint(level * (1 + bold / 100)), -32768, 32767).astype(np.int16)

            full = np.zeros((n_grid, n), dtype=np.int16)
            full[brain_index] = volumes.T
            img = nib.Nifti1Image(full.reshape(*grid, n), brain.affine)
            img.set_data_dtype(np.int16)
            img.header.set_xyzt_units("mm", "sec")
            img.header["pixdim"][4] = config.tr
            nib.save(img, layout.timeseries_path(out, subject, session, run.run))
            rows = np.zeros(len(run.slot_trial) * config.volumes_per_slot, dtype=np.int64)
            first_trial = (session - 1) * tps
            rows[run.trial_slots * config.volumes_per_slot] = ten_k_ids[first_trial + trials]
            layout.run_design_path(out, subject, session, run.run).write_text("".join(f"{v}\n" for v in rows))

            # The GLM reads what was written (int16), as a reader of the files would.
            coef = np.linalg.pinv(x) @ volumes.astype(np.float64)  # (trials + drift terms, V_brain)
            betas[:, trials] = (100 * coef[: len(trials)] / coef[len(trials)]).T
            record.append(
                {
                    "session": session,
                    "run": run.run,
                    "n_volumes": n,
                    "onsets_s": _round(run.trial_slots * config.trial_s),
                    "onset_volumes": (run.trial_slots * config.volumes_per_slot).tolist(),
                    "trials": (first_trial + trials).tolist(),
                    "ten_k_ids": ten_k_ids[first_trial + trials].tolist(),
                }
            )
        volume = np.zeros((n_grid, tps), dtype=np.int16)
        volume[brain_index] = _to_int16(betas)
        img = nib.Nifti1Image(volume.reshape(*grid, tps), brain.affine)
        img.set_data_dtype(np.int16)
        nib.save(img, layout.session_path(out, subject, session))
        advance(1)

    return {
        "config": dataclasses.asdict(config),
        "tr_s": config.tr,
        "time_zero": "the start of the first volume's acquisition; volume k is at k x tr",
        "units": "volumes: int16 scanner intensity, zeros outside the brain (mask < 0); design rows: the 10k id "
        "(1-based, as masterordering) of the trial starting at that volume, else 0; one row fewer than volumes; "
        "trials: 0-based index into masterordering (betas_sessionNN volume = index mod trials per session); "
        "trial_kernel: a trial's response (peak 1) at volumes 0, 1, ... after its onset",
        "hrf": "SPM canonical double gamma (gamma(6) - gamma(16)/6) convolved with the stimulus_s boxcar, peak 1",
        "trial_kernel": _round(kernel),
        "glm": f"OLS per run: a regressor per trial (trial_kernel at its onset) + Legendre polynomials "
        f"0..{config.glm_degree}; beta = 100 x coefficient / intercept, written x 300 as int16",
        "noise_sd_psc_per_volume_median": float(np.median(noise_sd)),
        "runs": record,
    }


def _ar1(rng: np.random.Generator, n: int, v: int, rho: float) -> np.ndarray:
    """(n, v) stationary AR(1) noise with unit variance."""
    e = rng.standard_normal((n, v))
    out = np.empty_like(e)
    out[0] = e[0]
    innovation = math.sqrt(1 - rho**2)
    for t in range(1, n):
        out[t] = rho * out[t - 1] + innovation * e[t]
    return out


def _round(values: np.ndarray, digits: int = 6) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64)]


# ---------------------------------------------------------------- measuring betas


def betas_quality(betas: np.ndarray, image_ids: np.ndarray, responses: np.ndarray) -> dict[str, float]:
    """How well single-trial betas carry the simulator's noiseless responses.

    betas: (sessions, trials, V) session by session; image_ids: (T,) 0-based; responses: (N images, V).
    Betas are z-scored per voxel within each session (as `recon-prepare` does). Returns the mean over voxels of
    the correlation across a session's trials with the responses (averaged over sessions), and NSD's noise-ceiling estimate (ncsnr from the variance
    across repeats of images shown 3 times; NC = 100 ncsnr^2 / (ncsnr^2 + 1/3)), median over voxels.
    """
    z = (betas - betas.mean(axis=1, keepdims=True)) / betas.std(axis=1, keepdims=True)
    target = responses[image_ids].reshape(z.shape)
    target = (target - target.mean(axis=1, keepdims=True)) / target.std(axis=1, keepdims=True)
    corr = (z * target).mean(axis=1).mean(axis=0)  # (V,) within each session, then averaged
    z = z.reshape(-1, z.shape[-1])  # (T, V)
    shown, counts = np.unique(image_ids, return_counts=True)
    triple = [np.flatnonzero(image_ids == i) for i in shown[counts == 3]]
    noise_var = np.mean([z[t].var(axis=0, ddof=1) for t in triple], axis=0)
    ncsnr = np.sqrt(np.maximum(1 - noise_var, 0) / noise_var)
    ceiling = 100 * ncsnr**2 / (ncsnr**2 + 1 / 3)
    return {
        "mean_correlation": float(corr.mean()),
        "median_noise_ceiling_n3": float(np.median(ceiling)),
        "median_ncsnr": float(np.median(ncsnr)),
    }


def measure_subject(
    root: Path, config: SimConfig, seed: int, scratch: Path, subject: int = 1
) -> dict[str, float]:
    """`betas_quality` of the betas of a simulated subject written with (config, seed), any kind."""
    from brainrecon.data.sim import simulated_responses

    mask = np.asarray(nib.load(layout.mask_path(root, subject)).dataobj).reshape(-1)
    betas = np.stack(
        [
            np.asarray(nib.load(layout.session_path(root, subject, s)).dataobj)
            .reshape(-1, config.trials_per_session)[mask > 0]
            .T
            / layout.BETAS_SCALE
            for s in range(1, config.n_sessions + 1)
        ]
    )
    mat = scipy.io.loadmat(layout.expdesign_path(root))
    image_ids = mat["subjectim"][subject - 1, mat["masterordering"].reshape(-1) - 1] - 1
    return betas_quality(betas, image_ids, simulated_responses(config, seed, scratch))
