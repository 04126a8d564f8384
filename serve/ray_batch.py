"""`recon-batch`: reconstruct many betas files (subjects, sessions) on a local Ray instance or a Ray cluster.

A pool of Ray actors, each with one stateful model (Ray Core actors, "Actor" and "Fault tolerance" guides),
fed one shard at a time by the driver, so that every shard gets its own result, error and deadline:

    files ──check (memory map: voxels, dtype, finite; seeds in range)──► run.json per output folder
      (refuses a folder holding another run's images) ──plan──► shards (file, start, stop); done ones
      (marker + whole PNGs) skipped ──driver──► N actors (one Reconstructor each, num_cpus/num_gpus per
      actor), one shard per call: read rows [start, stop), reconstruct the trials whose PNGs are not whole,
      `rows_per_call` at a time, each PNG written atomically as soon as it is made, then the shard's marker
      ──driver──► OUT/<folder>/summary.json per input (atomic): written, computed, missing, failed shards

Output, per input file `X.npy`: `OUT/X/final_00012.png` and `stage1_00012.png` (trial 12, the row index in the
file), `OUT/X/run.json` (what the images are made from), `OUT/X/.shards/<start>-<stop>.json` markers,
`OUT/X/writes.log` (one line per PNG pair written, with the process id: how the tests check that each trial
was written once) and `OUT/X/summary.json`. With `new_run`, a file whose folder holds another run gets
`OUT/X-2` (`-3`, ...); a later rerun with the same settings finds its folder again.

Images equal `recon-infer`'s for the same trial and seed: trial i of a file gets img2img seed `seed + i` (its
own noise, `Reconstructor.reconstruct(seeds=...)`) and no re-normalisation over the set, exactly what
`recon-infer FILE --trials i --seed (seed + i)` does for that single trial; so a trial's image does not depend
on the shard it lands in, on the actor, on `rows_per_call` or on a retry.

Faults: an actor that dies (a killed worker, a lost node) is replaced and its shard retried up to `retries`
times; an exception inside a shard is recorded for that shard (not retried: it would fail again); a shard with
no result after `shard_timeout` seconds has its actor killed and is recorded as timed out. The other shards go
on; PNGs already written are kept (atomic, so whole) and not recomputed. The summaries list the failed shards
and exactly the missing trials, and recon-batch exits 1; a rerun does only what is missing.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon import model_dir as layout
from brainrecon.choices import IMAGE_KINDS, SAMPLERS, Sampler
from brainrecon.errors import BrainReconError, InputError
from brainrecon.images import png_name, save_png
from brainrecon.io import load_npy, read_json, sha256_file, write_json
from brainrecon.sampling import SEED_MAX, SamplingConfig

SHARDS_DIR = ".shards"
WRITES_LOG = "writes.log"
SUMMARY = "summary.json"
RUN = "run.json"
RUN_VERSION = 1
SAMPLING_DEFAULTS = SamplingConfig().to_dict()
# A shard is the unit of resuming and of the per-shard deadline; its rows are read into memory at once
# (1024 x 15,724 voxels x 4 B = 64 MB at NSD size).
MAX_SHARD_SIZE = 1024
# Per-row seeds are int64 (Reconstructor.check; the Triton model's `seed` input is INT64): seed + last row
# must fit.
# Set only by the tests (tests/test_ray_batch*.py): JSON list of {"file", "after_trial", "action": "raise" |
# "hang", "report": optional FIFO path that gets the actor's process id}; the fault fires right after that
# trial's PNGs.
TEST_HOOKS_ENV = "BRAINRECON_BATCH_TEST_HOOKS"


@dataclass(frozen=True)
class BatchOptions:
    shard_size: int = 16
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    seed: int = 0  # trial i of a file: seed + i
    engine: str = "ort"
    precision: str = "fp32"
    device: str = "cpu"
    threads: int | None = 1  # ONNX Runtime threads per actor: actors already use the cores in parallel
    retries: int = 3  # retries of a shard whose actor died; 0: none
    num_inference_steps: int | None = None  # stage 2: override the fitted schedule length
    sampler: Sampler | None = None  # stage 2: override the fitted sampler
    guidance_stop: float | None = None  # stage 2: override the fitted share of guided steps
    cache_interval: int | None = None  # stage 2: DeepCache, a full UNet step every K-th (--deepcache export)
    num_cpus: int | None = None  # a local Ray instance's CPUs (default: all)
    rows_per_call: int = 4  # trials per runtime call; their PNGs are written as soon as the call returns
    shard_timeout: float | None = None  # seconds a shard may take before its actor is killed; None: no limit
    new_run: bool = False  # a folder holding another run: start a new folder instead of refusing

    def __post_init__(self) -> None:
        for name in ("shard_size", "actors", "rows_per_call"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_SHARD_SIZE:
                raise InputError(
                    f"--{name.replace('_', '-')}", f"an integer in [1, {MAX_SHARD_SIZE}]", str(value)
                )
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise InputError(
                "--cpus-per-actor/--gpus-per-actor",
                "CPUs > 0 and GPUs >= 0",
                f"{self.cpus_per_actor}, {self.gpus_per_actor}",
            )
        if not 0 <= self.seed <= SEED_MAX:
            raise InputError("--seed", f"an integer in [0, {SEED_MAX}] (int64 seeds)", str(self.seed))
        if self.retries < 0:
            raise InputError("--retries", "an integer >= 0", str(self.retries))
        if self.shard_timeout is not None and not self.shard_timeout > 0:
            raise InputError("--shard-timeout", "seconds > 0", str(self.shard_timeout))
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise InputError("--sampler", f"one of {SAMPLERS}", repr(self.sampler))
        if self.guidance_stop is not None and not 0.0 <= self.guidance_stop <= 1.0:  # NaN refused too
            raise InputError("--guidance-stop", "a share of the steps in [0, 1]", str(self.guidance_stop))
        if self.cache_interval is not None and self.cache_interval < 1:
            raise InputError("--cache-interval", "an integer >= 1", str(self.cache_interval))

    def sampling_overrides(self) -> dict[str, Any]:
        """The stage-2 sampling fields these options set (--steps, --sampler, --guidance-stop, --cache-interval), by
        name."""
        overrides = {
            "num_inference_steps": self.num_inference_steps,
            "sampler": self.sampler,
            "guidance_stop": self.guidance_stop,
            "cache_interval": self.cache_interval,
        }
        return {k: v for k, v in overrides.items() if v is not None}


def marker(out_dir: Path, start: int, stop: int) -> Path:
    return out_dir / SHARDS_DIR / f"{start:06d}-{stop:06d}.json"


# ----------------------------------------------------------------------------------------- inputs


def model_voxels(model_dir: Path) -> int:
    """Voxels per row the model takes: recon-prepare's mask (`mask_indices.npy`, read by its header only)."""
    return int(load_npy(model_dir / layout.MASK_INDICES, "mask indices", mmap=True).shape[0])


def check_finite(path: Path, betas: np.ndarray) -> None:
    """Finite after the cast to float32 (what the runtime computes with: a float64 1e300 becomes inf), in
    blocks of about 64 MB so a memory-mapped file is never read whole."""
    step = max(1, (64 << 20) // max(1, 4 * betas.shape[1]))
    for start in range(0, len(betas), step):
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what this looks for
            block = np.asarray(betas[start : start + step], dtype=np.float32)
        bad = ~np.isfinite(block)
        if bad.any():
            row, voxel = np.argwhere(bad)[0]
            raise InputError(
                path,
                "finite z-scored betas (as float32)",
                f"NaN/Inf in {int(bad.sum())} values of rows {start}-{start + len(block) - 1} "
                f"(first at row {start + row}, voxel {voxel})",
            )


def check_input(path: Path, model_dir: Path, n_voxels: int) -> int:
    """Trials in a betas file, after checking what every actor would otherwise find only after loading the
    model: shape and voxel count, dtype, finiteness. A .npy is read through a memory map (no pickle); NIfTI /
    HDF5 are preprocessed as the runtime preprocesses them."""
    if path.name.lower().endswith(".npy"):
        betas = load_npy(path, "z-scored betas", mmap=True)
        if betas.dtype.kind != "f":
            raise InputError(path, "float32 or float64 z-scored betas", f"dtype {betas.dtype}")
    else:
        from brainrecon.runtime import load_betas

        betas = load_betas(path, model_dir)[0]
    if betas.ndim != 2 or betas.shape[1] != n_voxels or betas.shape[0] < 1:
        raise InputError(
            path, f"(N >= 1, {n_voxels}) z-scored betas (the model's voxels)", f"shape {betas.shape}"
        )
    check_finite(path, betas)
    return int(betas.shape[0])


def image_settings(model_dir: Path, options: BatchOptions) -> dict[str, Any]:
    """Everything besides the input and the model files that changes the images of a run (run.json
    "images")."""
    from brainrecon.runtime import default_stage

    stage = default_stage(model_dir)
    sampling = None
    if (
        stage == 2
    ):  # the fitted sampling (stage2/stage2.json, covered by the manifest's hash), overrides applied
        sampling = dict(read_json(model_dir / layout.STAGE2_SUMMARY, "stage-2 summary")["sampling"])
        sampling.pop("seed", None)  # unused: every trial has its own seed (seed_rule)
        sampling |= options.sampling_overrides()
        # sampler, guidance_stop and cache_interval came after run.json's version 1: at their defaults (the only
        # behaviour then) they are left out, so a record written before them still matches the same run
        for key in ("sampler", "guidance_stop", "cache_interval"):
            if sampling.get(key) == SAMPLING_DEFAULTS[key]:
                del sampling[key]
    return {
        "stage": stage,
        "seed": options.seed,
        "sampling": sampling,
        "engine": options.engine,
        "precision": options.precision,
        "device": options.device,
        "seed_rule": f"trial i gets img2img seed {options.seed} + i; no re-normalisation over the set",
    }


def run_record(path: Path, model_dir: Path, images: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "recon-batch run",
        "version": RUN_VERSION,
        "input": {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)},
        "model": {"dir": str(model_dir), "manifest_sha256": sha256_file(model_dir / layout.MANIFEST)},
        "images": images,
    }


def run_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first setting that differs between two run records, in words; None when they make the same images.
    Paths are not compared: the same bytes moved elsewhere make the same images."""
    if old.get("version") != RUN_VERSION:
        return f"run.json version {new['version']} differs from run.json's {old.get('version')!r}"
    pairs = [
        ("input sha256", old["input"]["sha256"], new["input"]["sha256"], f" (input {old['input']['path']})"),
        (
            "model manifest sha256",
            old["model"]["manifest_sha256"],
            new["model"]["manifest_sha256"],
            f" (model {old['model']['dir']})",
        ),
    ]
    for key, value in new["images"].items():
        if isinstance(value, dict):  # the sampling settings, each by name (num_inference_steps: --steps)
            before = old["images"].get(key) or {}
            pairs += [(f"{key}.{k}", before.get(k), v, "") for k, v in value.items()]
        else:
            pairs.append((key, old["images"].get(key), value, ""))
    for what, before, now, where in pairs:
        if before != now:
            subject = f"input {new['input']['path']} sha256" if what == "input sha256" else what
            return f"{subject} {now} differs from run.json's {before}{where}"
    return None


def output_folder(out: Path, name: str, record: dict[str, Any], new_run: bool) -> Path:
    """The folder for one input: the first of `name`, `name-2`, ... whose run.json matches `record`; else
    `name` if it holds nothing yet; else a new folder with `new_run`; else a one-line refusal naming what
    changed."""
    first = out / name
    candidates = [first, *sorted(out.glob(f"{name}-[0-9]*"), key=lambda p: p.name)]
    for folder in candidates:
        if (folder / RUN).is_file() and run_difference(
            read_json(folder / RUN, "recon-batch run.json"), record
        ) is None:
            return folder
    if not first.exists() or not any(first.iterdir()):
        return first
    if new_run:
        k = 2
        while (out / f"{name}-{k}").exists():
            k += 1
        return out / f"{name}-{k}"
    if (first / RUN).is_file():
        change = run_difference(read_json(first / RUN, "recon-batch run.json"), record)
    else:
        change = f"a folder without {RUN} (images of unknown origin)"
    raise BrainReconError(
        f"{first}: {change}: another run's images are there; pass --new-run for a new folder, or another "
        "--out"
    )


# ----------------------------------------------------------------------------------------- PNGs and plan


def png_whole(path: Path, size: tuple[int, int] | None = None) -> bool:
    """A PNG that exists, is not empty, decodes completely and (when given) has `size` (width, height)."""
    from PIL import Image

    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path) as image:
            image.load()  # decodes every row: a truncated or corrupt file raises here
            return image.format == "PNG" and (size is None or image.size == tuple(size))
    except (OSError, SyntaxError, ValueError):
        return False


def trial_whole(out_dir: Path, trial: int, sizes: dict[str, Any] | None) -> bool:
    return all(png_whole(out_dir / png_name(kind, trial), (sizes or {}).get(kind)) for kind in IMAGE_KINDS)


def marker_sizes(path: Path) -> dict[str, Any] | None:
    """The PNG sizes a shard marker records; None for a missing or unreadable marker."""
    try:
        sizes = json.loads(path.read_text())["sizes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sizes if isinstance(sizes, dict) else None


def shard_done(out_dir: Path, start: int, stop: int) -> bool:
    """Done: a marker (written after the PNGs) and every PNG of its trials whole, of the sizes the marker
    records."""
    sizes = marker_sizes(marker(out_dir, start, stop))
    return sizes is not None and all(trial_whole(out_dir, t, sizes) for t in range(start, stop))


def plan(files: list[Path], model_dir: Path, out: Path, options: BatchOptions) -> dict[str, dict[str, Any]]:
    """{input stem: {input, out_dir, run, rows, shards: [(start, stop)], done: [(start, stop)]}}; every input
    is checked, and every output folder chosen, before anything is written or started."""
    n_voxels = model_voxels(model_dir)
    images = image_settings(model_dir, options)
    jobs: dict[str, dict[str, Any]] = {}
    for path in files:
        path = Path(path).resolve()
        if not path.is_file():
            raise InputError(path, "a betas file", "no such file")
        name = path.name.split(".")[0]
        if name in jobs:
            raise InputError(
                path,
                f"a file name unique among the inputs (output folder {out / name})",
                f"{jobs[name]['input']}",
            )
        rows = check_input(path, model_dir, n_voxels)
        if images["stage"] == 2 and options.seed + rows - 1 > SEED_MAX:
            raise InputError(
                "--seed",
                f"seed + row <= {SEED_MAX} (int64 seeds) for the {rows} rows of {path}",
                f"{options.seed} + {rows - 1}",
            )
        record = run_record(path, model_dir, images)
        jobs[name] = {"input": str(path), "rows": rows, "run": record}
    chosen: dict[Path, str] = {}
    for name, job in jobs.items():
        out_dir = output_folder(out, name, job["run"], options.new_run)
        if out_dir in chosen:  # inputs X and X-2 with --new-run: both would write X-2
            raise InputError(
                job["input"], "an output folder of its own", f"{out_dir}, chosen for {chosen[out_dir]}"
            )
        chosen[out_dir] = job["input"]
        shards = [
            (s, min(s + options.shard_size, job["rows"])) for s in range(0, job["rows"], options.shard_size)
        ]
        job.update(out_dir=out_dir, shards=shards, done=[s for s in shards if shard_done(out_dir, *s)])
    return jobs


def prepare_folder(job: dict[str, Any]) -> None:
    """Create the folder and its run.json (first run); remove temporary files of a killed writer
    (brainrecon.io atomic_path names, never a final name); note where this run's lines of the journal
    begin."""
    out_dir = job["out_dir"]
    (out_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    if not (out_dir / RUN).is_file():
        write_json(out_dir / RUN, {**job["run"], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    stale = [p for folder in (out_dir, out_dir / SHARDS_DIR) for p in folder.glob(".*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    log = out_dir / WRITES_LOG
    job.update(stale=len(stale), journal_offset=log.stat().st_size if log.is_file() else 0)


def computed_now(job: dict[str, Any]) -> list[int]:
    """Trials written by this run, by any actor (one that died or was killed too), from the journal."""
    log = job["out_dir"] / WRITES_LOG
    if not log.is_file():
        return []
    with open(log, "rb") as f:
        f.seek(job["journal_offset"])
        lines = f.read().decode().splitlines()
    return sorted(int(line.split()[2]) for line in lines if line.split()[1:2] == ["wrote"])


# ----------------------------------------------------------------------------------------- the actor


class ShardWorker:
    """One Ray actor: a Reconstructor loaded once; each call reconstructs and writes one shard."""

    def __init__(self, model_dir: str, options: dict[str, Any]):
        from brainrecon.runtime import Reconstructor, RuntimeOptions

        self.options = BatchOptions(**options)
        o = self.options
        self.rec = Reconstructor.open(
            model_dir,
            RuntimeOptions(engine=o.engine, precision=o.precision, device=o.device, threads=o.threads),
        )
        self.sampling = self.rec.sampling
        if self.sampling is not None:
            self.sampling = self.sampling.with_overrides(**o.sampling_overrides())
        # PIL's (width, height) of each kind of image
        self.sizes = {kind: [side, side] for kind, side in self.rec.image_sizes.items()}
        self.hooks = json.loads(os.environ.get(TEST_HOOKS_ENV, "[]"))
        self._cache: dict[str, np.ndarray] = {}

    def ready(self) -> int:
        return os.getpid()

    def rows(self, path: str, start: int, stop: int) -> np.ndarray:
        if path.lower().endswith(".npy"):
            return np.asarray(np.load(path, mmap_mode="r", allow_pickle=False)[start:stop])
        if path not in self._cache:  # NIfTI / HDF5: preprocessed once per actor and file
            self._cache = {path: self.rec.load_betas(path)[0]}
        return self._cache[path][start:stop]

    def run_shard(self, path: str, out_dir: str, start: int, stop: int) -> dict[str, Any]:
        """Reconstruct the trials of [start, stop) whose PNGs are not whole; an exception is returned as this
        shard's error (the actor stays usable for the next shard)."""
        t0 = time.perf_counter()
        computed: list[int] = []
        try:
            self._run_shard(path, Path(out_dir), start, stop, computed)
            return {"status": "done", "computed": computed, "seconds": time.perf_counter() - t0}
        except Exception as e:
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return {
                "status": "failed",
                "error": error,
                "computed": computed,
                "seconds": time.perf_counter() - t0,
            }

    def _run_shard(self, path: str, out_dir: Path, start: int, stop: int, computed: list[int]) -> None:
        todo = [t for t in range(start, stop) if not trial_whole(out_dir, t, self.sizes)]
        journal(out_dir, f"start {start}-{stop} todo {len(todo)}")
        betas = self.rows(path, start, stop)  # (stop - start, V)
        name = Path(path).name.split(".")[0]
        step = self.options.rows_per_call
        for i in range(0, len(todo), step):
            trials = np.asarray(todo[i : i + step], np.int64)
            seeds = self.options.seed + trials if self.rec.stage == 2 else None
            out = self.rec.reconstruct(
                betas[trials - start], sampling=self.sampling, seeds=seeds, renormalize=False
            )
            for j, trial in enumerate(trials.tolist()):
                # stage 1 first: a trial counts as written when both PNGs are whole (recon-infer's names)
                save_png(out_dir / png_name("stage1", trial), out.stage1_images[j])
                save_png(out_dir / png_name("final", trial), out.images[j])
                journal(out_dir, f"wrote {trial}")
                computed.append(trial)
                self._fault(name, trial)
        # after the PNGs (atomic_path fsyncs each file and its folder before this)
        write_json(
            marker(out_dir, start, stop),
            {"trials": [start, stop], "computed": computed, "pid": os.getpid(), "sizes": self.sizes},
        )

    def _fault(self, name: str, trial: int) -> None:
        """Test-only faults (TEST_HOOKS_ENV), at a point the test chooses: after `trial`'s PNGs of file
        `name`."""
        for hook in self.hooks:
            if hook["file"] == name and hook["after_trial"] == trial:
                if hook["action"] == "raise":
                    raise RuntimeError(f"fault injected after trial {trial} of {name}")
                if hook.get("report"):  # a FIFO the test reads: it learns which process to kill, and when
                    with open(hook["report"], "w") as fifo:
                        fifo.write(f"{os.getpid()}\n")
                threading.Event().wait()  # "hang": until killed


def journal(out_dir: Path, line: str) -> None:
    """Append one line (one write(2) on an O_APPEND file: lines from several processes do not interleave)."""
    fd = os.open(out_dir / WRITES_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {line}\n".encode())
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------- the driver


def summarize(
    job: dict[str, Any],
    results: dict[tuple, dict[str, Any]],
    options: BatchOptions,
    seconds: float,
) -> dict[str, Any]:
    out_dir = job["out_dir"]
    markers = sorted((out_dir / SHARDS_DIR).glob("*.json"))
    sizes = next((s for s in map(marker_sizes, markers) if s), None)  # the model's PNG sizes, once known
    written = [t for t in range(job["rows"]) if trial_whole(out_dir, t, sizes)]
    missing = sorted(set(range(job["rows"])) - set(written))
    mine = {(start, stop): r for (folder, start, stop), r in results.items() if folder == str(out_dir)}
    failed = [
        {"shard": f"{start}-{stop}", "status": r["status"], "error": r["error"]}
        for (start, stop), r in sorted(mine.items())
        if r["status"] != "done"
    ]
    summary = {
        "input": job["input"],
        "run": str(out_dir / RUN),
        "trials": job["rows"],
        "written": len(written),
        "computed": computed_now(job),  # trials computed (and written) by this run
        "missing": missing,
        "shards": len(job["shards"]),
        "shards_done_before": len(job["done"]),
        "failed_shards": failed,
        "stale_temporary_files_removed": job["stale"],
        "seed_rule": job["run"]["images"]["seed_rule"],
        "options": asdict(options),
        "seconds": round(seconds, 3),
    }
    write_json(out_dir / SUMMARY, summary)
    return summary


def run_batch(
    files: list[Path],
    model_dir: Path,
    out: Path,
    options: BatchOptions | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Reconstruct every trial of `files` into `out`; returns a report (see module docstring)."""
    options = options or BatchOptions()
    model_dir, out = Path(model_dir).resolve(), Path(out).resolve()
    if not (model_dir / layout.MANIFEST).is_file():
        raise InputError(
            model_dir / layout.MANIFEST, "an exported model folder (recon-export)", "no manifest"
        )
    t0 = time.perf_counter()
    jobs = plan(files, model_dir, out, options)  # every refusal happens here, before anything is written
    for job in jobs.values():
        prepare_folder(job)
    shards = [
        (job["input"], str(job["out_dir"]), start, stop)
        for job in jobs.values()
        for start, stop in job["shards"]
        if (start, stop) not in job["done"]
    ]
    results: dict[tuple, dict[str, Any]] = {}
    error = None
    if shards:
        error = _execute(shards, model_dir, options, address, results)
    seconds = time.perf_counter() - t0
    summaries = {name: summarize(job, results, options, seconds) for name, job in jobs.items()}
    missing = {str(jobs[name]["out_dir"].name): s["missing"] for name, s in summaries.items() if s["missing"]}
    failed = {
        str(jobs[name]["out_dir"].name): [f["shard"] for f in s["failed_shards"]]
        for name, s in summaries.items()
        if s["failed_shards"]
    }
    return {
        "files": summaries,
        "folders": {name: str(job["out_dir"]) for name, job in jobs.items()},
        "written": sum(s["written"] for s in summaries.values()),
        "computed": sum(len(s["computed"]) for s in summaries.values()),
        "skipped_shards": sum(len(j["done"]) for j in jobs.values()),
        "missing": missing,
        "missing_count": sum(len(m) for m in missing.values()),
        "failed_shards": failed,
        "error": error,
        "seconds": round(seconds, 3),
    }


def _execute(
    shards: list[tuple[str, str, int, int]],
    model_dir: Path,
    options: BatchOptions,
    address: str | None,
    results: dict[tuple, dict[str, Any]],
) -> str | None:
    """Run the shards on a pool of actors, filling `results[(out_dir, start, stop)]`; returns the error that
    stopped the whole run (an actor that cannot load the model), or None."""
    import ray

    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            if options.num_cpus is not None:
                kwargs["num_cpus"] = options.num_cpus
            # A private single-node instance on loopback: Ray otherwise binds the node's network address
            # (`ray._private.services.get_node_ip_address`; this switch makes it use 127.0.0.1).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray's token auth (on by default since 2.59) is left as configured: only tests and CI turn it off
        # (RAY_AUTH_MODE=disabled in their environment). "local": always a new instance; without it ray.init
        # joins a cluster that `ray start` left on the machine.
        ray.init(address=address or "local", **kwargs)
    try:
        return _schedule(ray, shards, model_dir, options, results)
    except Exception as e:  # the pool could not start: every shard not yet done is reported missing
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        if started:
            ray.shutdown()


def _schedule(
    ray: Any,
    shards: list[tuple[str, str, int, int]],
    model_dir: Path,
    options: BatchOptions,
    results: dict[tuple, dict[str, Any]],
) -> None:
    actor_options: dict[str, Any] = {
        "num_cpus": options.cpus_per_actor,
        "num_gpus": options.gpus_per_actor,
        "max_restarts": 0,  # a dead actor is replaced here, and its shard retried here, so both are counted
    }
    if os.environ.get(
        TEST_HOOKS_ENV
    ):  # workers of a running cluster do not inherit this driver's environment
        actor_options["runtime_env"] = {"env_vars": {TEST_HOOKS_ENV: os.environ[TEST_HOOKS_ENV]}}
    worker = ray.remote(ShardWorker).options(**actor_options)

    def spawn(n: int) -> list[Any]:
        actors = [worker.remote(str(model_dir), asdict(options)) for _ in range(n)]
        ray.get(
            [a.ready.remote() for a in actors]
        )  # a model that cannot load stops the run here, with its error
        return actors

    queue = collections.deque(shards)
    attempts: collections.Counter = collections.Counter()
    idle = spawn(min(options.actors, len(shards)))
    running: dict[Any, tuple[Any, tuple[str, str, int, int], float]] = {}  # ref -> (actor, shard, deadline)
    limit = options.shard_timeout
    while queue or running:
        while queue and idle:
            actor, shard = idle.pop(), queue.popleft()
            deadline = time.monotonic() + limit if limit is not None else float("inf")
            running[actor.run_shard.remote(*shard)] = (actor, shard, deadline)
        wait_s = min(d for _, _, d in running.values()) - time.monotonic()
        ready, _ = ray.wait(
            list(running), num_returns=1, timeout=None if wait_s == float("inf") else max(0, wait_s)
        )
        for ref in ready:
            actor, shard, _ = running.pop(ref)
            key = (shard[1], shard[2], shard[3])
            try:
                results[key] = ray.get(ref)
                idle.append(actor)
            except ray.exceptions.RayActorError as e:  # the process died: killed, out of memory, node lost
                attempts[key] += 1
                if attempts[key] <= options.retries:
                    queue.appendleft(shard)
                else:
                    first = str(e).splitlines()[0] if str(e) else ""
                    results[key] = {"status": "failed", "error": f"actor died {attempts[key]} times: {first}"}
                if queue:
                    idle += spawn(1)
        now = time.monotonic()
        for ref, (actor, shard, deadline) in list(running.items()):
            if now >= deadline:
                del running[ref]
                ray.kill(actor, no_restart=True)
                results[(shard[1], shard[2], shard[3])] = {
                    "status": "timed out",
                    "error": f"no result after {limit:g} s (--shard-timeout): its actor was killed",
                }
                if queue:
                    idle += spawn(1)


def read_summary(out_dir: Path) -> dict[str, Any]:
    return read_json(out_dir / SUMMARY, "recon-batch summary")
