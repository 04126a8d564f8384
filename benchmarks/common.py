"""What the benchmark scripts share: the machine record written beside every result, peak memory, timed calls and
child processes. Standard library only (numpy aside), so that the serving environment can import it too."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine(threads: int | None = None) -> dict[str, Any]:
    """When and where a result was taken: UTC date, CPU model, cores, platform, Python and the producer versions."""
    from brainrecon.manifest import producer_versions

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        platform.processor() or platform.machine(),
    )
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),  # the machines here are shared: how busy this one was
    }
    if threads is not None:
        record["threads"] = threads
    versions = producer_versions()
    for name in ("openvino", "diffusers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return record | {"versions": versions}


def peak_gb() -> float:
    """This process's peak resident memory (VmHWM), GB; after fork + exec ru_maxrss would still carry the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 3)
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    """Start a new peak: VmHWM drops to the current resident memory (Linux proc(5), /proc/pid/clear_refs, "5")."""
    Path("/proc/self/clear_refs").write_text("5")


def timed(
    fn: Callable[[], Any], repeats: int, budget_s: float = float("inf"), warmup: int = 1
) -> dict[str, Any]:
    """`warmup` untimed calls (sessions allocate, torch.compile compiles), then up to `repeats` timed calls, fewer
    once they took `budget_s` or as long as the warm-up (at least one): median, p95 (linear interpolation) and the
    warm-up's seconds."""
    import numpy as np

    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = time.perf_counter() - t0
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < max(budget_s, first)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {
        "median_s": round(statistics.median(times), 5),
        "p95_s": round(float(np.percentile(times, 95)), 5),
        "runs": len(times),
        "first_call_s": round(first, 3),
    }


def child(args: list[str], log: Path | None = None) -> dict[str, Any]:
    """`python args...` in a fresh interpreter (its peak memory its own), from the repository root; its result is
    the JSON on its last stdout line, or {"error": ...} naming the exit status and the last line of stderr."""
    err = open(log, "a") if log else subprocess.PIPE  # noqa: SIM115 (closed below)
    try:
        proc = subprocess.run(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT
        )
    finally:
        if log:
            err.close()
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (log.read_text() if log else proc.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
    return {"error": f"{' '.join(args[:2])} exited {proc.returncode}: {tail[0][:400]}"}
