"""`recon-batch`: reconstruct many betas files (subjects, sessions) on a local Ray instance or a Ray cluster.

Ray Data offline batch inference with one stateful model per actor (Ray docs, "End-to-end: Offline Batch
Inference"; `Dataset.map_batches` with `compute=ray.data.ActorPoolStrategy(size=N)`):

    files ──plan──► shards (file, start, stop), one Ray Data row each; finished ones (marker present) are skipped
      ──map_batches(ShardWorker, ActorPoolStrategy(actors), num_cpus/num_gpus per actor)──►
      each actor: one Reconstructor, loaded once; per shard: read rows [start, stop) of the file, reconstruct the
      trials not yet written, write each PNG atomically, then the shard's marker
      ──driver──► OUT/<file stem>/summary.json per input (atomic): trials written, missing trials, timings

Output, per input file `X.npy`: `OUT/X/final_00012.png` and `stage1_00012.png` (trial 12, the row index in the
file), `OUT/X/.shards/<start>-<stop>.json` markers, `OUT/X/writes.log` (one line per PNG written, with the
process id: how the tests check that each trial was written once) and `OUT/X/summary.json`.

Images equal `recon-infer`'s for the same trial and seed: trial i of a file gets img2img seed `seed + i` (its own
noise, `Reconstructor.reconstruct(seeds=...)`) and no re-normalisation over the set, exactly what `recon-infer
FILE --trials i --seed (seed + i)` does for that single trial; so a trial's image does not depend on the shard it
lands in, on the actor, or on a retry.

Faults: an actor that dies (a killed worker, a lost node) is restarted by Ray and its shard retried up to
`retries` times (`max_restarts`, `max_task_retries`); PNGs already written are kept (atomic, so whole) and not
recomputed. When retries run out, the run stops, every summary lists exactly the missing trials and recon-batch
exits 1; a rerun does only what is missing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import InputError
from brainrecon.images import png_name, save_png
from brainrecon.io import atomic_path, read_json, write_json

SHARDS_DIR = ".shards"
WRITES_LOG = "writes.log"
SUMMARY = "summary.json"


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
    retries: int = 3  # actor restarts and task retries after a death; 0: none
    num_inference_steps: int | None = None  # stage 2: override the fitted schedule length
    num_cpus: int | None = None  # a local Ray instance's CPUs (default: all)

    def __post_init__(self) -> None:
        for name in ("shard_size", "actors"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}", "an integer >= 1", str(getattr(self, name)))
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise InputError(
                "--cpus-per-actor/--gpus-per-actor",
                "CPUs > 0 and GPUs >= 0",
                f"{self.cpus_per_actor}, {self.gpus_per_actor}",
            )
        if self.seed < 0 or self.retries < 0:
            raise InputError("--seed/--retries", "integers >= 0", f"{self.seed}, {self.retries}")


def marker(out_dir: Path, start: int, stop: int) -> Path:
    return out_dir / SHARDS_DIR / f"{start:06d}-{stop:06d}.json"


def count_rows(path: Path, model_dir: Path) -> int:
    """Trials in a betas file (a .npy header is enough; other formats are read as the runtime reads them)."""
    if path.name.lower().endswith(".npy"):
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.ndim != 2:
            raise InputError(path, "(N, V) z-scored betas", f"shape {array.shape}")
        return int(array.shape[0])
    from brainrecon.runtime.inputs import load_betas

    return len(load_betas(path, model_dir)[0])


def plan(files: list[Path], model_dir: Path, out: Path, shard_size: int) -> dict[str, dict[str, Any]]:
    """{output folder name: {input, rows, shards: [(start, stop)], done: [(start, stop)]}}, checked up front."""
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
        rows = count_rows(path, model_dir)
        shards = [(s, min(s + shard_size, rows)) for s in range(0, rows, shard_size)]
        done = [s for s in shards if marker(out / name, *s).is_file()]
        # temporary files of a worker killed while writing (brainrecon.io.atomic_path names): never a final name
        stale = [p for folder in (out / name, out / name / SHARDS_DIR) for p in folder.glob(".*.tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        jobs[name] = {"input": str(path), "rows": rows, "shards": shards, "done": done, "stale": len(stale)}
    return jobs


class ShardWorker:
    """One Ray actor: a Reconstructor loaded once; each call reconstructs and writes a batch of shards."""

    def __init__(self, model_dir: str, options: dict[str, Any]):
        from brainrecon.runtime import Reconstructor, RuntimeOptions

        self.options = BatchOptions(**options)
        o = self.options
        self.rec = Reconstructor.open(
            model_dir,
            RuntimeOptions(engine=o.engine, precision=o.precision, device=o.device, threads=o.threads),
        )
        self.sampling = self.rec.sampling
        if self.sampling is not None and o.num_inference_steps is not None:
            import dataclasses

            self.sampling = dataclasses.replace(self.sampling, num_inference_steps=o.num_inference_steps)
        self._cache: dict[str, np.ndarray] = {}

    def rows(self, path: str, start: int, stop: int) -> np.ndarray:
        if path.lower().endswith(".npy"):
            return np.asarray(np.load(path, mmap_mode="r", allow_pickle=False)[start:stop])
        if path not in self._cache:  # NIfTI / HDF5: preprocessed once per actor and file
            self._cache = {path: self.rec.load_betas(path)[0]}
        return self._cache[path][start:stop]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seconds, written = [], []
        for path, out_dir, start, stop in zip(
            batch["input"], batch["out_dir"], batch["start"], batch["stop"], strict=True
        ):
            t0 = time.perf_counter()
            written.append(self.run_shard(str(path), Path(str(out_dir)), int(start), int(stop)))
            seconds.append(time.perf_counter() - t0)
        return {**batch, "written": np.asarray(written), "seconds": np.asarray(seconds)}

    def run_shard(self, path: str, out_dir: Path, start: int, stop: int) -> int:
        trials = np.arange(start, stop)
        todo = np.array([t for t in trials if not (out_dir / png_name("final", t)).is_file()], np.int64)
        journal(out_dir, f"start {start}-{stop} todo {len(todo)}")
        if len(todo):
            betas = self.rows(path, start, stop)[todo - start]
            seeds = self.options.seed + todo if self.rec.stage == 2 else None
            out = self.rec.reconstruct(betas, sampling=self.sampling, seeds=seeds, renormalize=False)
            for i, trial in enumerate(todo):
                # stage 1 first: a trial counts as written when its final PNG exists (recon-infer's names)
                save_png(out_dir / png_name("stage1", trial), out.stage1_images[i])
                save_png(out_dir / png_name("final", trial), out.images[i])
                journal(out_dir, f"wrote {trial}")
        with atomic_path(marker(out_dir, start, stop)) as tmp:
            tmp.write_text(
                json.dumps({"trials": [start, stop], "computed": todo.tolist(), "pid": os.getpid()})
            )
        return len(todo)


def journal(out_dir: Path, line: str) -> None:
    """Append one line (one write(2) on an O_APPEND file: lines from several processes do not interleave)."""
    fd = os.open(out_dir / WRITES_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {line}\n".encode())
    finally:
        os.close(fd)


def summarize(
    name: str, job: dict[str, Any], out: Path, options: BatchOptions, seconds: float
) -> dict[str, Any]:
    out_dir = out / name
    written = [t for t in range(job["rows"]) if (out_dir / png_name("final", t)).is_file()]
    missing = sorted(set(range(job["rows"])) - set(written))
    summary = {
        "input": job["input"],
        "trials": job["rows"],
        "written": len(written),
        "missing": missing,
        "shards": len(job["shards"]),
        "shards_done_before": len(job["done"]),
        "stale_temporary_files_removed": job["stale"],
        "seed_rule": f"trial i gets img2img seed {options.seed} + i; no re-normalisation over the set",
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
    from brainrecon.model_dir import MANIFEST

    if not (model_dir / MANIFEST).is_file():
        raise InputError(model_dir / MANIFEST, "an exported model folder (recon-export)", "no manifest")
    t0 = time.perf_counter()
    jobs = plan(files, model_dir, out, options.shard_size)
    rows = []
    for name, job in jobs.items():
        (out / name / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        for start, stop in job["shards"]:
            if (start, stop) not in job["done"]:
                rows.append({"input": job["input"], "out_dir": str(out / name), "start": start, "stop": stop})
    error = None
    if rows:
        error = _execute(rows, model_dir, options, address)
    seconds = time.perf_counter() - t0
    summaries = {name: summarize(name, job, out, options, seconds) for name, job in jobs.items()}
    missing = {name: s["missing"] for name, s in summaries.items() if s["missing"]}
    return {
        "files": summaries,
        "written": sum(s["written"] for s in summaries.values()),
        "skipped_shards": sum(len(j["done"]) for j in jobs.values()),
        "missing": missing,
        "missing_count": sum(len(m) for m in missing.values()),
        "error": error,
        "seconds": round(seconds, 3),
    }


def _execute(
    rows: list[dict[str, Any]], model_dir: Path, options: BatchOptions, address: str | None
) -> str | None:
    """Run the shards through the actor pool; returns the error that stopped the run, or None."""
    os.environ.setdefault(
        "RAY_AUTH_MODE", "disabled"
    )  # Ray >= 2.59 turns on token auth for a local ray.init()
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
        # "local": always a new instance; without it ray.init joins a cluster that `ray start` left on the machine
        ray.init(address=address or "local", **kwargs)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))  # one shard per block
        dataset = dataset.map_batches(
            ShardWorker,
            fn_constructor_kwargs={"model_dir": str(model_dir), "options": asdict(options)},
            compute=ray.data.ActorPoolStrategy(size=options.actors),
            batch_size=1,  # one shard per call: the unit of retry
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor or None,
            max_restarts=options.retries,
            max_task_retries=options.retries,
        )
        dataset.take_all()
        return None
    except Exception as e:  # a shard failed for good (retries exhausted): report what is missing
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        if started:
            ray.shutdown()


def read_summary(out_dir: Path) -> dict[str, Any]:
    return read_json(out_dir / SUMMARY, "recon-batch summary")
