"""`recon-stream`: BOLD volumes as they arrive → a single-trial beta per trial once its window has passed →
images through the runtime API (torch-free: numpy, nibabel and the runtime).

    volumes  --replay RUN.nii.gz (a recorded 4-D run played at its TR / --speed) or --watch DIR (per-TR 3-D files)
      │  read: the model's mask (mask_indices.npy), float32 (V,); a wrong shape or a NaN drops the volume
      ▼
    buffer (volumes, V) + per-volume state (pending, present, missing); a trial is ready once every volume of
      [0, onset + window_volumes] is present or given up
      ▼
    LSS GLM over volumes 0 .. onset + window_volumes (the present ones): [this trial, all other trials seen so far,
      Legendre drift 0..drift_degree] → beta = 100 x coefficient / intercept (percent signal change, as the
      simulator's offline GLM; brainrecon/data/timeseries.py)
      ▼
    normalise: z-score per voxel with a calibration run's statistics of the same online betas (`--calibrate`),
      in place of recon-prepare's per-session z-score, then (x - voxel_mean) / voxel_std as recon-prepare
      ▼
    Reconstructor: stage 1 → stage1_TTTTT.png at once; stage 2 → final_TTTTT.png (TTTTT the trial in the run)

Everything happens in one thread, in volume order: a volume that arrives while a trial reconstructs waits, and
the latency counts from its arrival, so the log shows the wait. Each event is one JSON line appended to
`stream.jsonl` (one os.write per line on an O_APPEND file); PNGs and betas (`beta_TTTTT.npy`, percent signal
change) are written atomically; a rerun of the same command resumes: trials whose PNGs are all on disk are
skipped (after a hard kill, the one trial in flight is done again, its stage-1 PNG rewritten identically).

Faults, each one line in the log and on stderr, none fatal (watch mode, where volumes are numbered by name):
duplicated (a volume number seen again: ignored); out of order (a number below the highest seen: placed in
order); missing (a gap still open when a later volume has waited late_s, or at the run's end: given up); late (a
volume given up, then arrived: used for trials not estimated yet, none redone); bad (wrong shape, NaN/Inf in the
mask, unreadable: skipped like a missing one). A trial is estimated without its missing volumes, or marked failed
(no images) when fewer than min_window_share of its window's volumes are present.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.images import png_name, save_png
from brainrecon.io import atomic_path, read_json, save_npy, write_json
from brainrecon.runtime import Reconstructor
from brainrecon.runtime.inputs import Preprocessing

LOG = "stream.jsonl"
SUMMARY = "summary.json"
RUN = "stream_run.json"  # the settings of the run that made the folder; a rerun must match them to resume
CALIBRATION_FORMAT = 1

# volume states
PENDING, PRESENT, MISSING = 0, 1, 2


@dataclass(frozen=True)
class StreamConfig:
    """How betas are estimated online and how long the watcher waits. The same settings must be used to calibrate
    and to stream (checked)."""

    # A trial is estimated once volume onset + window_volumes is in: 7 volumes = 9.3 s at NSD's TR, past the peak
    # of the simulator's trial response (3-s stimulus * SPM HRF: peak at volume 5, 6.7 s) and two volumes beyond.
    window_volumes: int = 7
    # Legendre polynomials 0..degree over the volumes so far (the offline GLM: 0..3 over the whole run); higher
    # degrees overfit the short early windows (tiny subject, 6 runs: online vs offline per-voxel r 0.58 at 1,
    # 0.52 at 2, 0.46 at 3); 1 keeps a linear trend, which a scanner's drift has.
    drift_degree: int = 1
    # A trial with fewer present volumes than this share of its window [onset, onset + window_volumes] is marked
    # failed (no images), not estimated from too little data.
    min_window_share: float = 0.5
    late_s: float = 2.0  # watch: a gap is given up (the volume missing) once a later volume waited this long
    settle_s: float = 1.0  # watch: a file that does not parse is refused once it held still this long
    idle_s: float = 30.0  # watch: no new file this long ends the run (pending volumes missing)
    poll_s: float = 0.02  # watch: folder listing interval

    def __post_init__(self) -> None:
        if not (self.window_volumes >= 1 and self.drift_degree >= 0 and 0 <= self.min_window_share <= 1):
            raise ConfigError(
                f"StreamConfig: expected window_volumes >= 1, drift_degree >= 0, 0 <= min_window_share <= 1, found "
                f"{self.window_volumes}, {self.drift_degree}, {self.min_window_share}"
            )

    def glm_settings(self) -> dict[str, Any]:
        return {"window_volumes": self.window_volumes, "drift_degree": self.drift_degree}


# ----------------------------------------------------------------------------------------------- design and GLM


@dataclass(frozen=True)
class RunDesign:
    """NSD's per-run design file: one row per volume but the last, the 1-based 10k id of the trial starting at
    that volume, else 0 (brainrecon/data/layout.py)."""

    n_volumes: int
    onsets: np.ndarray  # (trials,) volume of each trial's onset
    ten_k_ids: np.ndarray  # (trials,)

    @classmethod
    def read(cls, path: str | Path) -> RunDesign:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(path, "design file (one row per volume: 10k id or 0)")
        try:
            rows = np.array([int(line) for line in path.read_text().split()], dtype=np.int64)
        except ValueError:
            raise InputError(path, "one integer per row (10k id or 0)", "a non-integer row") from None
        if len(rows) == 0 or (rows < 0).any():
            raise InputError(
                path, "rows of 10k ids >= 0, at least one", f"{len(rows)} rows, min {rows.min(initial=0)}"
            )
        onsets = np.flatnonzero(rows)
        return cls(len(rows) + 1, onsets, rows[onsets])


def hrf_kernel(tr: float) -> np.ndarray:
    """(K,) the simulator's trial response per volume (3-s stimulus * SPM's canonical HRF, peak 1)."""
    from brainrecon.data.timeseries import TimeseriesConfig, trial_kernel

    # trial_s only has to be a multiple of the TR that holds the 3-s stimulus
    return trial_kernel(dataclasses.replace(TimeseriesConfig(), tr=tr, trial_s=tr * math.ceil(4.0 / tr)))


def lss_beta(
    data: np.ndarray,
    present: np.ndarray,
    trial: int,
    design: RunDesign,
    kernel: np.ndarray,
    degree: int,
) -> np.ndarray:
    """Least-squares-separate beta of one trial, percent signal change (V,) float32.

    data: (n, V) the volumes 0..n-1 (n = onset + window + 1, clipped to the run); present: (n,) bool. Regressors
    over the present volumes: this trial, the sum of all other trials with an onset before n (each its kernel at
    its onset), Legendre polynomials 0..degree of the volume index over 0..n-1. beta = 100 x coefficient / the
    degree-0 coefficient, as the offline GLM.
    """
    n = len(present)
    x = np.zeros((n, 2 + degree + 1))  # (n, p)
    for j, onset in enumerate(design.onsets):
        if onset >= n:
            break
        k = min(len(kernel), n - onset)
        x[onset : onset + k, 0 if j == trial else 1] += kernel[:k]
    x[:, 2:] = np.polynomial.legendre.legvander(np.linspace(-1, 1, n), degree)
    x = x[present]
    if not x[:, 1].any():  # the first trials: no other trial yet
        x = np.delete(x, 1, axis=1)
    pinv = np.linalg.pinv(x)  # (p, n_present)
    rows = pinv[[0, x.shape[1] - degree - 1]]  # this trial's row and the intercept's
    coef = rows @ data[present]  # (2, V) float64
    return (100 * coef[0] / coef[1]).astype(np.float32)


# ----------------------------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """Per-voxel mean and std (ddof 0) of the online betas of a calibration run: the z-score that stands in for
    recon-prepare's per-session one, which needs the whole session."""

    mean: np.ndarray  # (V,) float64, percent signal change
    std: np.ndarray  # (V,) float64, 1 where constant (as zscore_session)
    settings: dict[str, Any]  # glm settings and n_trials, source

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mean=self.mean, std=self.std, settings=json.dumps(self.settings))

    @classmethod
    def load(cls, path: str | Path, n_voxels: int, config: StreamConfig) -> Calibration:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(path, "calibration (recon-stream --calibrate FILE.npz)")
        try:
            with np.load(path, allow_pickle=False) as f:
                mean, std, settings = f["mean"], f["std"], json.loads(str(f["settings"]))
        except (OSError, ValueError, KeyError) as e:
            raise InputError(path, "a recon-stream calibration (.npz: mean, std, settings)", f"{e}") from None
        if mean.shape != (n_voxels,) or std.shape != (n_voxels,):
            raise InputError(path, f"statistics of the model's {n_voxels} voxels", f"shape {mean.shape}")
        if (
            settings.get("format") != CALIBRATION_FORMAT
            or {k: settings.get(k) for k in config.glm_settings()} != config.glm_settings()
        ):
            raise InputError(
                path,
                f"a calibration with format {CALIBRATION_FORMAT} and {config.glm_settings()} (recalibrate)",
                f"{ {k: settings.get(k) for k in ('format', *config.glm_settings())} }",
            )
        return cls(mean, std, settings)

    @classmethod
    def from_betas(cls, betas: np.ndarray, settings: dict[str, Any]) -> Calibration:
        mean = betas.mean(axis=0, dtype=np.float64)
        std = betas.std(axis=0, dtype=np.float64)
        std[std == 0] = 1.0
        return cls(mean, std, {"format": CALIBRATION_FORMAT, **settings, "n_trials": len(betas)})


def normalise(psc: np.ndarray, prep: Preprocessing, calibration: Calibration | None) -> np.ndarray:
    """(V,) percent signal change → (1, V) float32 model input: recon-prepare's steps 3 and 5 with step 3's
    statistics from the calibration run."""
    x = psc.astype(np.float64)
    if prep.session_zscore:
        assert calibration is not None
        x = (x - calibration.mean) / calibration.std
    return ((x - prep.voxel_mean) / prep.voxel_std).astype(np.float32)[None]


# ----------------------------------------------------------------------------------------------- volume sources


@dataclass
class Volume:
    """One arrival: volume `index` of the run (or None when its number is unreadable), its 3-D data or why it was
    refused, the wall time it arrived (replay: its scheduled time; watch: the file's mtime) and the read time."""

    index: int | None
    data: np.ndarray | None  # (X, Y, Z)
    problem: str | None
    arrived: float
    read_s: float
    source: str


def replay(path: Path, tr_override: float | None, speed: float, max_volumes: int | None) -> Iterator[Volume]:
    """Volume k of a 4-D run at start + k x TR / speed (speed 0: at once). The run is loaded once up front (it
    is recorded); the per-volume read is a copy of that volume."""
    import nibabel as nib

    img = nib.load(path)
    if len(img.shape) != 4:
        raise InputError(path, "a 4-D run (X x Y x Z x volumes)", f"shape {img.shape}")
    data = np.asarray(img.dataobj)
    start = time.time()
    tr = tr_override or float(img.header.get_zooms()[3])
    for k in range(data.shape[3] if max_volumes is None else min(max_volumes, data.shape[3])):
        due = start + k * tr / speed if speed > 0 else time.time()
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        t0 = time.perf_counter()
        volume = np.array(data[..., k])
        yield Volume(k, volume, None, due, time.perf_counter() - t0, f"{path.name}[{k}]")


NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last group of digits in a name


def watch(
    folder: Path, first_number: int, config: StreamConfig, max_volumes: int | None
) -> Iterator[Volume | None]:
    """Per-volume 3-D NIfTI files (.nii, .nii.gz; hidden files and other names are ignored) as they appear, in name
    order, each read once. A file counts as complete when it parses whole (header and every voxel: nibabel refuses
    a short file or a truncated gzip stream), so a file written under a temporary name and renamed is read at once;
    one that does not parse is tried again on every poll until its size and mtime have held still for settle_s,
    then refused as a bad volume. Its volume is the last number in its name minus `first_number`. Yields None on
    every poll that found nothing (so the caller can give up gaps); stops after idle_s without a new file, or
    after max_volumes files."""
    import nibabel as nib

    still: dict[str, tuple[int, float, float]] = {}  # name -> (size, mtime, when first seen with them)
    done: set[str] = set()
    last_new = time.time()
    count = 0
    while True:
        new = False
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            name = entry.name
            if name in done or name.startswith(".") or not name.endswith((".nii", ".nii.gz")):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # renamed or removed since the listing
                continue
            now = time.time()
            if still.get(name, (None, None, 0.0))[:2] != (st.st_size, st.st_mtime):
                still[name] = (st.st_size, st.st_mtime, now)
            t0 = time.perf_counter()
            data, problem = None, None
            try:
                data = np.asarray(nib.load(entry.path).dataobj)
                if data.ndim == 4 and data.shape[3] == 1:
                    data = data[..., 0]
            except Exception as e:  # noqa: BLE001 (an incomplete or corrupt file: retried, then refused)
                if now - still[name][2] < config.settle_s:
                    continue
                problem = f"an unreadable NIfTI ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
            read_s = time.perf_counter() - t0
            done.add(name)
            new = True
            count += 1
            match = NUMBER.search(name.removesuffix(".gz").removesuffix(".nii"))
            index = int(match.group(1)) - first_number if match else None
            if index is None and problem is None:
                problem = "no number in its name"
            yield Volume(index, data, problem, st.st_mtime, read_s, name)
            if max_volumes is not None and count >= max_volumes:
                return
        if new:
            last_new = time.time()
        elif time.time() - last_new > config.idle_s:
            return
        else:
            yield None
            time.sleep(config.poll_s)


# ----------------------------------------------------------------------------------------------- the stream


class EventLog:
    """stream.jsonl: one JSON object per line, appended with one write each; faults also go to stderr."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: str, fault: str | None = None, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time(), 6), **fields}
        if fault is not None:
            record["fault"] = fault
            print(f"recon-stream: {fault}", file=sys.stderr, flush=True)
        os.write(self.fd, (json.dumps(record) + "\n").encode())
        self.events.append(record)
        return record

    def close(self) -> None:
        os.close(self.fd)


class Stream:
    """The state of one run: the volume buffer, which trials are done, and how each trial is processed."""

    def __init__(
        self,
        rec: Reconstructor | None,
        prep: Preprocessing,
        design: RunDesign,
        tr: float,
        config: StreamConfig,
        out: Path | None,
        log: EventLog | None,
        calibration: Calibration | None = None,
        sampling: Any = None,
        seed: int = 0,
    ):
        self.rec, self.prep, self.design, self.config = rec, prep, design, config
        self.out, self.log, self.calibration = out, log, calibration
        self.stage = (
            rec.stage if rec is not None else 1
        )  # the images it writes: stage 1, or stage 1 and final
        self.sampling, self.seed = sampling, seed
        self.kernel = hrf_kernel(tr)
        self.grid = prep.grid
        n, v = design.n_volumes, len(prep.mask_indices)
        self.data = np.zeros((n, v), dtype=np.float32)  # (volumes, V) masked voxels
        self.state = np.full(n, PENDING, dtype=np.int8)
        self.arrived = np.full(n, np.nan)  # wall time each volume arrived
        self.frontier = 0  # first volume still pending
        self.highest = -1  # highest volume number seen
        self.ends = np.minimum(design.onsets + config.window_volumes, n - 1)  # (trials,) last window volume
        self.handled = np.zeros(len(design.onsets), dtype=bool)  # done before, now, or failed
        self.betas: dict[int, np.ndarray] = {}  # trial -> psc beta (V,), estimated now
        self.latency: dict[str, list[float]] = {"stage1": [], "final": []}
        self.steps: dict[str, list[float]] = {
            k: [] for k in ("read", "glm", "normalise", "stage1", "stage2", "write")
        }

    def emit(self, event: str, fault: str | None = None, **fields: Any) -> None:
        if self.log is not None:
            self.log(event, fault, **fields)

    def done_before(self) -> None:
        """Mark trials whose PNGs are all on disk (a resumed run) as handled."""
        assert self.out is not None
        kinds = ("stage1",) if self.stage == 1 else ("stage1", "final")
        for t in range(len(self.design.onsets)):
            if all((self.out / png_name(k, t)).is_file() for k in kinds):
                self.handled[t] = True
                self.emit(
                    "trial_skipped", trial=t, ten_k_id=int(self.design.ten_k_ids[t]), reason="done before"
                )

    # ------------------------------------------------------------------ volumes

    def add(self, vol: Volume) -> None:
        """Take one arrival: check it, store it, then process every trial it completes."""
        n = self.design.n_volumes
        where = f"volume {vol.index} ({vol.source})"
        if vol.index is None or not 0 <= vol.index < n:
            self.emit(
                "volume_bad",
                f"{vol.source}: expected a volume number in [0, {n - 1}], found "
                f"{vol.index if vol.problem is None else vol.problem}: ignored",
                source=vol.source,
            )
            return
        k = vol.index
        if self.state[k] == PRESENT:
            self.emit(
                "volume_duplicate",
                f"{where}: expected each volume once, found it again: ignored",
                volume=k,
                source=vol.source,
            )
            return
        problem = vol.problem
        if problem is None and vol.data is not None and vol.data.shape != self.grid:
            problem = f"shape {vol.data.shape}, expected {self.grid}"
        masked = None
        if problem is None and vol.data is not None:
            masked = vol.data.reshape(-1)[self.prep.mask_indices].astype(np.float32)  # (V,)
            if not np.isfinite(masked).all():
                problem = f"{int((~np.isfinite(masked)).sum())} NaN/Inf values in the mask"
        if problem is not None:
            if self.state[k] == PENDING:
                self.state[k] = MISSING
            self.emit(
                "volume_bad",
                f"{where}: skipped: {problem}; trials whose window holds it are estimated without it",
                volume=k,
                source=vol.source,
            )
            self._advance(vol.arrived)
            return
        late = self.state[k] == MISSING
        if late:
            self.emit(
                "volume_late",
                f"{where}: arrived after it was given up as missing: used for trials not "
                "estimated yet; trials estimated without it are not redone",
                volume=k,
                source=vol.source,
            )
        elif k < self.highest:
            self.emit(
                "volume_out_of_order",
                f"{where}: arrived after volume {self.highest}: placed in order",
                volume=k,
                source=vol.source,
            )
        self.highest = max(self.highest, k)
        self.data[k] = masked
        self.state[k] = PRESENT
        self.arrived[k] = vol.arrived
        self.steps["read"].append(vol.read_s)
        self.emit(
            "volume", volume=k, source=vol.source, arrived=round(vol.arrived, 6), read_s=round(vol.read_s, 6)
        )
        self._advance(vol.arrived)

    def give_up(self, now: float, everything: bool = False) -> None:
        """Declare pending volumes missing: those below a volume that has waited late_s (or all, at the end)."""
        n = self.design.n_volumes
        while self.frontier < n and self.state[self.frontier] == PENDING:
            later = np.flatnonzero(self.state[self.frontier :] == PRESENT)
            waited = now - self.arrived[self.frontier + later[0]] if len(later) else 0.0
            if not (everything or waited > self.config.late_s):
                return
            self.state[self.frontier] = MISSING
            why = "the run ended" if everything and waited <= self.config.late_s else f"waited {waited:.2f} s"
            self.emit(
                "volume_missing",
                f"volume {self.frontier}: expected by now, found none ({why}): trials "
                "whose window holds it are estimated without it",
                volume=self.frontier,
            )
            self._advance(now)

    def _advance(self, now: float) -> None:
        n = self.design.n_volumes
        while self.frontier < n and self.state[self.frontier] != PENDING:
            self.frontier += 1
        for t in np.flatnonzero(~self.handled & (self.ends < self.frontier)):
            self.handled[t] = True
            self.process(int(t), now)

    # ------------------------------------------------------------------ trials

    def estimate(self, t: int) -> np.ndarray | None:
        """The trial's psc beta, or None (logged) when too little of its window is present."""
        onset, end = int(self.design.onsets[t]), int(self.ends[t])
        present = self.state[: end + 1] == PRESENT
        window = present[onset:]
        if window.sum() < max(1, math.ceil(self.config.min_window_share * len(window))):
            self.emit(
                "trial_failed",
                f"trial {t}: expected at least {self.config.min_window_share:.0%} of its "
                f"window's {len(window)} volumes, found {int(window.sum())}: no images",
                trial=t,
                ten_k_id=int(self.design.ten_k_ids[t]),
            )
            return None
        return lss_beta(self.data[: end + 1], present, t, self.design, self.kernel, self.config.drift_degree)

    def process(self, t: int, now: float) -> None:
        """Estimate, normalise, reconstruct and write trial t; `now` is when it became ready."""
        ready = now  # the arrival of the volume that completed the window (or when the last gap was given up)
        t0 = time.perf_counter()
        psc = self.estimate(t)
        glm_s = time.perf_counter() - t0
        if psc is None:
            return
        self.betas[t] = psc
        self.steps["glm"].append(glm_s)
        base = {"trial": t, "ten_k_id": int(self.design.ten_k_ids[t])}
        missing = [int(v) for v in np.flatnonzero(self.state[: self.ends[t] + 1] != PRESENT)]
        if self.rec is None:  # calibration: the betas only
            self.emit("trial_estimated", **base, glm_s=round(glm_s, 6), volumes_missing=missing)
            return
        t0 = time.perf_counter()
        x = normalise(psc, self.prep, self.calibration)
        norm_s = time.perf_counter() - t0
        self.steps["normalise"].append(norm_s)
        self.emit(
            "trial_estimated",
            **base,
            onset_volume=int(self.design.onsets[t]),
            window_end=int(self.ends[t]),
            volumes_missing=missing,
            ready=round(ready, 6),
            glm_s=round(glm_s, 6),
            normalise_s=round(norm_s, 6),
        )
        assert self.out is not None
        save_npy(self.out / f"beta_{t:05d}.npy", psc)
        two = self.stage == 2
        checked = self.rec.check(
            x, self.sampling if two else None, seeds=[self.seed + t] if two else None, renormalize=False
        )
        t0 = time.perf_counter()
        stage1 = self.rec.stage1.run(checked)
        stage1_s = time.perf_counter() - t0
        self._write(t, "stage1", stage1.stage1_images[0], ready, base, stage1_s=round(stage1_s, 6))
        self.steps["stage1"].append(stage1_s)
        if two:
            t0 = time.perf_counter()
            # runs stage 1 again inside (the runtime has no entry from stage-1 images); its cost is in stage2_s
            result = self.rec.run_checked(checked)
            stage2_s = time.perf_counter() - t0
            self.steps["stage2"].append(stage2_s)
            self._write(
                t,
                "final",
                result.final_images[0],
                ready,
                base,
                stage2_s=round(stage2_s, 6),
                stage1_again_s=round(result.timings["stage1_s"], 6),
            )

    def _write(self, t: int, kind: str, image: np.ndarray, ready: float, base: dict, **timings: Any) -> None:
        assert self.out is not None
        t0 = time.perf_counter()
        save_png(self.out / png_name(kind, t), image)
        write_s = time.perf_counter() - t0
        self.steps["write"].append(write_s)
        latency = time.time() - ready
        if self.stage == 1 or kind == "final":
            self.latency["final"].append(latency)
        if kind == "stage1":
            self.latency["stage1"].append(latency)
        self.emit(
            f"{kind}_written",
            **base,
            file=png_name(kind, t),
            **timings,
            write_s=round(write_s, 6),
            latency_s=round(latency, 6),
        )

    def summary(self, complete: bool) -> dict[str, Any]:
        events = self.log.events if self.log is not None else []
        faults = [e["event"] for e in events if "fault" in e]
        return {
            "complete": complete,
            "trials_in_run": len(self.design.onsets),
            "trials_handled": int(self.handled.sum()),
            "trials_done_now": sum(
                e["event"] == ("stage1_written" if self.stage == 1 else "final_written") for e in events
            ),
            "trials_done_before": sum(e["event"] == "trial_skipped" for e in events),
            "trials_failed": [e["trial"] for e in events if e["event"] == "trial_failed"],
            "volumes_in_run": self.design.n_volumes,
            "volumes_present": int((self.state == PRESENT).sum()),
            "faults": {name: faults.count(name) for name in sorted(set(faults))},
            "latency": {
                "from": "arrival of the volume completing the trial's window (replay: its scheduled time; "
                "watch: the file's mtime) to the PNG on disk",
                "stage1": latency_stats(self.latency["stage1"]),
                "final": latency_stats(self.latency["final"]),
            },
            "steps": {k: latency_stats(v) for k, v in self.steps.items()},
        }


def latency_stats(values: list[float]) -> dict[str, float | int | None]:
    """n, p50, p95 and mean of a list of seconds (None for an empty list): summary.json's latency entries."""
    a = np.asarray(values)
    if len(a) == 0:
        return {"n": 0, "p50_s": None, "p95_s": None, "mean_s": None}
    p50, p95 = np.percentile(a, [50, 95])
    return {
        "n": len(a),
        "p50_s": round(float(p50), 6),
        "p95_s": round(float(p95), 6),
        "mean_s": round(float(a.mean()), 6),
    }


# ----------------------------------------------------------------------------------------------- entry points


def _run_tr(replay_path: Path | None, tr: float | None) -> float:
    if tr is not None:
        return tr
    if replay_path is None:
        raise InputError(
            "--tr", "the TR in seconds for --watch (the files' headers may not carry it)", "none"
        )
    import nibabel as nib

    found = float(nib.load(replay_path).header.get_zooms()[3])
    if not found > 0:
        raise InputError(replay_path, "a TR > 0 in the header (pixdim[4]) or --tr", f"{found}")
    return found


def online_betas(
    replay_path: Path, design: RunDesign, prep: Preprocessing, tr: float, config: StreamConfig
) -> dict[int, np.ndarray]:
    """{trial: (V,) percent signal change}: the stream's online estimate of every trial of a recorded run, played
    at once (no model runs); trials with too little of their window are left out."""
    _check_run_length(replay_path, design)
    stream = Stream(None, prep, design, tr, config, None, None)
    for vol in replay(replay_path, tr, 0, None):
        stream.add(vol)
    stream.give_up(time.time(), everything=True)
    return stream.betas


def calibrate(
    replay_path: Path,
    design_path: Path,
    model_dir: Path,
    out: Path,
    config: StreamConfig | None = None,
    tr: float | None = None,
) -> dict[str, Any]:
    """Online betas of every trial of a recorded run (the same estimator as the stream, at once) → their
    per-voxel mean and std, written to `out` (.npz)."""
    config = config or StreamConfig()
    tr = _run_tr(replay_path, tr)
    found = online_betas(replay_path, RunDesign.read(design_path), Preprocessing(model_dir), tr, config)
    if len(found) < 2:
        raise InputError(replay_path, "a calibration run with at least 2 trials", f"{len(found)}")
    betas = np.stack([found[t] for t in sorted(found)])  # (trials, V)
    cal = Calibration.from_betas(betas, {**config.glm_settings(), "source": str(replay_path), "tr": tr})
    cal.save(out)
    return cal.settings


def _check_run_length(path: Path, design: RunDesign) -> None:
    import nibabel as nib

    shape = nib.load(path).shape
    if len(shape) != 4 or shape[3] != design.n_volumes:
        raise InputError(
            path, f"a 4-D run of {design.n_volumes} volumes (the design's rows + 1)", f"shape {shape}"
        )


def run_stream(
    model_dir: Path,
    design_path: Path,
    out: Path,
    replay_path: Path | None = None,
    watch_dir: Path | None = None,
    calibration_path: Path | None = None,
    speed: float = 1.0,
    stage: int | None = None,
    sampling_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    tr: float | None = None,
    first_number: int = 0,
    max_volumes: int | None = None,
    config: StreamConfig | None = None,
    options: Any = None,
) -> dict[str, Any]:
    """Stream one run into `out`; returns the summary also written to `out/summary.json`. A folder that holds this
    command's `stream_run.json` with the same settings is resumed; any other existing path is refused."""
    config = config or StreamConfig()
    if (replay_path is None) == (watch_dir is None):
        raise InputError(
            "recon-stream", "exactly one of --replay RUN.nii.gz and --watch DIR", "both or neither"
        )
    if speed < 0 or not math.isfinite(speed):
        raise InputError("--speed", "a factor >= 0 (0: as fast as possible)", f"{speed}")
    design = RunDesign.read(design_path)
    if replay_path is not None:
        _check_run_length(replay_path, design)
    elif not watch_dir.is_dir():
        raise MissingFileError(watch_dir, "folder to watch for volumes")
    tr = _run_tr(replay_path, tr)
    prep = Preprocessing(model_dir)
    calibration = None
    if prep.session_zscore:
        if calibration_path is None:
            raise InputError(
                "--calibration",
                "a calibration file (recon-stream --calibrate): the model's betas "
                "were z-scored per session, which a stream cannot do",
                "none",
            )
        calibration = Calibration.load(calibration_path, len(prep.mask_indices), config)
    overrides = {k: v for k, v in (sampling_overrides or {}).items() if v is not None}
    settings = {
        "model_dir": str(Path(model_dir).resolve()),
        "design": str(Path(design_path).resolve()),
        "input": str(Path(replay_path or watch_dir).resolve()),
        "calibration": None if calibration_path is None else str(Path(calibration_path).resolve()),
        "stage": stage,
        "sampling": overrides,
        "seed": seed,
        **config.glm_settings(),
    }
    out = Path(out)
    resumed = out.exists()
    if resumed:
        run_file = out / RUN
        if not run_file.is_file():
            raise InputError(out, f"a new folder, or one this command made ({RUN}) to resume", "another path")
        found = read_json(run_file, "recon-stream settings")
        if found != settings:
            diff = sorted(k for k in settings if found.get(k) != settings[k])
            raise InputError(
                out, "the settings of the run that made it, to resume", f"other {', '.join(diff)}"
            )
    else:
        out.mkdir(parents=True)
        write_json(out / RUN, settings)

    with Reconstructor.open(model_dir, options, stage) as rec:
        sampling = None
        if rec.stage == 2:
            sampling = rec.sampling.with_overrides(**overrides)
        log = EventLog(out / LOG)
        try:
            stream = Stream(rec, prep, design, tr, config, out, log, calibration, sampling, seed)
            log(
                "start",
                resumed=resumed,
                mode="replay" if replay_path else "watch",
                speed=speed,
                tr_s=tr,
                window_volumes=config.window_volumes,
                trials=len(design.onsets),
                volumes=design.n_volumes,
            )
            if resumed:
                stream.done_before()
            if replay_path is not None:
                for vol in replay(replay_path, tr, speed, max_volumes):
                    stream.add(vol)
            else:
                for vol in watch(watch_dir, first_number, config, max_volumes):
                    if vol is not None:
                        stream.add(vol)
                    stream.give_up(time.time())
                    if stream.frontier >= design.n_volumes:  # every volume in or given up
                        break
            stopped = max_volumes is not None and int((stream.state != PENDING).sum()) < design.n_volumes
            if not stopped:  # the run ended: what never came is missing, the last trials are processed
                stream.give_up(time.time(), everything=True)
            summary = stream.summary(complete=bool(stream.handled.all()))
            log("end", **{k: summary[k] for k in ("complete", "trials_done_now", "trials_failed")})
        finally:
            log.close()
    write_json(out / SUMMARY, summary)
    return summary
