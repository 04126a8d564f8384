"""Shared by the serving tests (test_serve_triton.py, test_triton_repo.py, test_ray_batch.py,
test_ray_batch_checks.py); those that need the serving environment carry the `serve` marker.

The tests run in the main venv (torch, to build and export the tiny two-stage model of tests/fixtures.py once per
session, shared with test_runtime_stage2.py) and start recon-serve, tritonserver and Ray in the serving environment
(`make serve-env`, found through BRAINRECON_SERVE_VENV, default `.venv-serve`). They talk to the servers with real
HTTP requests on 127.0.0.1 in the KServe v2 JSON protocol (standard library only), and compare images with the
runtime API or recon-infer in this venv.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import FAST_STEPS

ROOT = Path(__file__).resolve().parent.parent
STEPS = FAST_STEPS  # every server and batch run here shortens the fitted schedule to this (6 UNet calls)


ADMIN_KEY = "brainrecon-tests"  # BRAINRECON_SERVE_ADMIN_KEY of every server the tests start (statistics API)
SERVE_VENV_ENV = "BRAINRECON_SERVE_VENV"


def serve_venv() -> Path:
    """The serving environment. Missing, the test FAILS when BRAINRECON_SERVE_VENV is set (`make test` sets it after
    building the environment) or CI is set; it is skipped only when neither is, with that said in the reason."""
    configured = os.environ.get(SERVE_VENV_ENV)
    venv = Path(configured or ROOT / ".venv-serve")
    if not venv.is_absolute():
        venv = ROOT / venv
    if not (venv / "bin" / "python").is_file() or not (venv / "bin" / "recon-serve").is_file():
        message = (
            f"serving environment {venv} missing (no bin/python or bin/recon-serve): run `make serve-env`"
        )
        if configured or os.environ.get("CI"):
            pytest.fail(f"{message} ({SERVE_VENV_ENV}={configured!r}, CI={os.environ.get('CI')!r})")
        pytest.skip(
            f"{message}; skipped because {SERVE_VENV_ENV} and CI are unset (`make test` sets the first)"
        )
    return venv


def serve_env(tmp: Path) -> dict[str, str]:
    """The environment of a server under test: the admin key the tests send, and a private temporary and cache
    folder (TMPDIR, XDG_CACHE_HOME) so that what a server leaves behind can be listed exactly."""
    for name in ("tmp", "cache"):
        (tmp / name).mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "BRAINRECON_SERVE_ADMIN_KEY": ADMIN_KEY,
        "TMPDIR": str(tmp / "tmp"),
        "XDG_CACHE_HOME": str(tmp / "cache"),
    }


def leftovers(tmp: Path) -> list[str]:
    """What a stopped server left in its private TMPDIR and PyTriton's home (XDG_CACHE_HOME/pytriton), and the
    Python-backend shared-memory regions in /dev/shm (to be compared with a listing taken before it started)."""
    # hidden files are skipped: the host's own tooling may drop one into any TMPDIR; none of Triton's are hidden
    found = sorted(str(p.relative_to(tmp)) for p in (tmp / "tmp").iterdir() if not p.name.startswith("."))
    found += sorted(str(p.relative_to(tmp)) for p in (tmp / "cache").glob("pytriton*"))
    return found + shm_regions()


def shm_regions() -> list[str]:
    shm = Path("/dev/shm")
    return sorted(p.name for p in shm.glob("triton_python_backend_shm_region_*")) if shm.is_dir() else []


def model_stats(port: int, model: str = "brainrecon") -> dict[str, int]:
    """Triton's statistics API (restricted: sent with the admin key): inference_count (rows), execution_count."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model}/stats", headers={"admin-key": ADMIN_KEY}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        stats = json.loads(r.read())["model_stats"][0]
    return {key: int(stats[key]) for key in ("inference_count", "execution_count")}


def infer_body(
    betas: np.ndarray, seed: int | list[int] | None = None, timeout_us: int | None = None
) -> bytes:
    """A KServe v2 JSON inference request body; `timeout_us` is Triton's per-request queue timeout parameter."""
    betas = np.asarray(betas, np.float32)
    inputs = [
        {"name": "betas", "shape": list(betas.shape), "datatype": "FP32", "data": betas.ravel().tolist()}
    ]
    if seed is not None:
        seeds = np.asarray(seed, np.int64).reshape(-1, 1)
        inputs.append(
            {"name": "seed", "shape": list(seeds.shape), "datatype": "INT64", "data": seeds.ravel().tolist()}
        )
    body: dict = {"inputs": inputs}
    if timeout_us is not None:
        body["parameters"] = {"timeout": timeout_us}
    return json.dumps(body).encode()


def send(port: int, body: bytes, model: str = "brainrecon") -> HTTPConnection:
    """Write one inference request and return its open connection (read it with `reply`): requests written one
    after another reach the server within milliseconds, with no thread scheduling in between."""
    connection = HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request(
        "POST", f"/v2/models/{model}/infer", body, headers={"Content-Type": "application/json"}
    )
    return connection


def reply(connection: HTTPConnection) -> tuple[int, dict]:
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    return response.status, json.loads(raw) if raw else {}


def wait_for(what: str, predicate, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Poll `predicate` (an observable server state: a log line, a metric) until true; fails if the server dies
    or time runs out. Synchronisation on the server's own state, never a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout_s} s")
        time.sleep(0.02)


def pending_requests(metrics_port: int, model: str = "brainrecon") -> int:
    """Triton's gauge nv_inference_pending_request_count: requests queued, not yet executing."""
    return metric(metrics_port, "nv_inference_pending_request_count", model)


def metric(metrics_port: int, name: str, model: str) -> int:
    """One of Triton's Prometheus metrics for `model` (the metrics port is not an admin API)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def http(port: int, path: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, dict]:
    """GET (or POST `body` as JSON) on 127.0.0.1:port; returns (status, parsed JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else {}


def infer(
    port: int,
    betas: np.ndarray,
    seed: int | list[int] | None = None,
    datatype: str = "FP32",
    model: str = "brainrecon",
) -> tuple[int, dict]:
    """One KServe v2 JSON inference request: betas (b, V) (or any shape, to test refusals), optional seeds."""
    betas = np.asarray(betas)
    inputs = [
        {"name": "betas", "shape": list(betas.shape), "datatype": datatype, "data": betas.ravel().tolist()}
    ]
    if seed is not None:
        seeds = np.asarray(seed, np.int64).reshape(-1, 1)
        inputs.append(
            {"name": "seed", "shape": list(seeds.shape), "datatype": "INT64", "data": seeds.ravel().tolist()}
        )
    return http(port, f"/v2/models/{model}/infer", {"inputs": inputs})


def images(body: dict) -> dict[str, np.ndarray]:
    """{output name: uint8 array} of a successful JSON response."""
    return {o["name"]: np.asarray(o["data"], np.uint8).reshape(o["shape"]) for o in body["outputs"]}


def wait_ready(port: int, model: str, process: subprocess.Popen, timeout_s: float = 180.0) -> float:
    """Seconds until `model` answers ready; fails with the process's state if it dies or time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode} before {model} was ready")
        try:
            if http(port, f"/v2/models/{model}/ready", timeout=2)[0] == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{model} not ready after {timeout_s} s")


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (a server started with start_new_session: it and everything it spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and (entry / "stat").read_text().split()[2] != "Z":
                    pids.append(int(entry.name))
            except (OSError, IndexError):
                continue
    return pids


def stop_session(process: subprocess.Popen, timeout_s: float = 30.0) -> float:
    """SIGTERM the server, wait; seconds taken. Anything left in its session is killed (by its process ids)."""
    t0 = time.monotonic()
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    seconds = time.monotonic() - t0
    for pid in session_pids(process.pid):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    return seconds
