"""`recon-serve`: the runtime behind a Triton Inference Server, through NVIDIA PyTriton.

One model, `brainrecon` (PyTriton docs, "Binding models"; triton-inference-server/pytriton `pytriton/triton.py`):

    input  betas         (V,)      FP32    z-scored betas of one trial (a request may hold several rows)
    input  seed          (1,)      INT64   optional; default: the fitted sampling seed (stage2/stage2.json)
    output final_image   (S, S, 3) UINT8   the two-stage reconstruction (stage 1's image for a stage-1 model)
    output stage1_image  (s, s, 3) UINT8   the VDVAE reconstruction

A row's img2img noise is `np.random.default_rng(seed).standard_normal((1, 4, h, w), float32)` (the runtime's
`seeds=`), and the server never re-normalises over a batch (`renormalize=False`), so a row's images depend only on
its betas and seed, never on what it was batched with: they equal `recon-infer` of that single trial with
`--seed seed` (a single trial skips the re-normalisation too).

Dynamic batching: Triton queues requests for up to `max_queue_delay_us` (default 5 ms) to fill a batch of up to
`max_batch_size` rows, then the model runs them in one `Reconstructor.reconstruct` call. Several instances
(`--instances`) share one loaded Reconstructor (ONNX Runtime sessions are safe to run from several threads).

Errors. Triton itself rejects a request of the wrong rank, voxel count or dtype before batching, with a one-line
message naming expected and found (HTTP 400). Values it cannot check (NaN/Inf betas, a negative seed) are checked
here by the runtime's own `Reconstructor.check`. PyTriton answers one batch with one error
(`pytriton/proxy/model.py`, BatchResponsesHandler), so when an invalid request is batched with valid ones, all of
them get the error, which names the invalid request and tells the valid ones to resend (`client.py` does, once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import BrainReconError

log = logging.getLogger("brainrecon.serve")

MODEL_NAME = "brainrecon"
DEFAULT_QUEUE_DELAY_US = 5000
# PyTriton's Python-backend stub waits 1 s for its proxy's handshake (`pytriton/proxy/communication.py
# get_config_from_handshake_server`, not configurable); on a loaded machine a model load can miss it: retried.
HANDSHAKE_TIMEOUT = "Timeout occurred while waiting for config file"
LOAD_ATTEMPTS = 3
# What a valid request batched with an invalid one reads in its error; serve/client.py resends on it.
RESEND_MARKER = "not run: resend"


class RequestError(Exception):
    """A request the runtime refuses (one line: what was expected, what was found)."""


@dataclass(frozen=True)
class ServeOptions:
    model_dir: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    max_batch_size: int = 8
    dynamic_batching: bool = True
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    engine: str = "ort"
    precision: str = "fp32"
    device: str = "cpu"
    threads: int | None = None
    num_inference_steps: int | None = None  # override the fitted DDIM schedule length (stage 2)

    def __post_init__(self) -> None:
        from brainrecon.errors import InputError

        for name in ("instances", "max_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}", "an integer >= 1", str(getattr(self, name)))
        if self.max_queue_delay_us < 0:
            raise InputError("--max-queue-delay-us", "microseconds >= 0", str(self.max_queue_delay_us))
        ports = [self.http_port, self.grpc_port, self.metrics_port]
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise InputError("ports", "three distinct ports in 1..65535 (http, grpc, metrics)", str(ports))


class BatchInfer:
    """PyTriton infer callable: a list of requests → one `reconstruct` call → one response per request."""

    def __init__(self, rec: Any, num_inference_steps: int | None = None):
        self.rec = rec
        self.sampling = rec.sampling
        if rec.sampling is not None and num_inference_steps is not None:
            self.sampling = dataclasses.replace(rec.sampling, num_inference_steps=num_inference_steps)
        self.default_seed = rec.sampling.seed if rec.sampling is not None else 0
        self.calls = 0  # runtime calls made; with the rows they held, visible in the log at debug level

    def check(self, data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """One request's rows and seeds, checked by the runtime; RequestError (one line) when refused."""
        betas = data["betas"]  # (b, V) float32: Triton checked rank, voxel count and dtype
        seed = data.get("seed")  # (b, 1) int64 or absent
        seeds = None
        if seed is not None and (seed < 0).any():
            raise RequestError(f"seed: expected a non-negative integer, found {int(seed.min())}")
        if self.rec.stage == 2:
            seeds = (
                np.full(len(betas), self.default_seed, np.int64) if seed is None else seed.reshape(len(betas))
            )
        try:
            self.rec.check(betas, sampling=self.sampling, seeds=seeds, renormalize=False)
        except BrainReconError as e:
            raise RequestError(str(e)) from None
        return betas, seeds

    def __call__(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        checked, errors = [], []
        for i, request in enumerate(requests):
            try:
                checked.append(self.check(request.data))
            except RequestError as e:
                errors.append((i, str(e)))
        if errors:
            i, message = errors[0]
            if len(requests) == 1:
                raise RequestError(message)
            raise RequestError(
                f"request {i + 1} of a batch of {len(requests)}: {message} "
                f"({len(errors)} invalid; the valid requests of this batch were {RESEND_MARKER})"
            )
        betas = np.concatenate([b for b, _ in checked])  # (N, V)
        seeds = None if self.rec.stage == 1 else np.concatenate([s for _, s in checked])
        out = self.rec.reconstruct(betas, sampling=self.sampling, seeds=seeds, renormalize=False)
        self.calls += 1
        log.debug("runtime call %d: %d requests, %d rows", self.calls, len(requests), len(betas))
        responses, start = [], 0
        for rows, _ in checked:
            part = slice(start, start + len(rows))
            responses.append({"final_image": out.images[part], "stage1_image": out.stage1_images[part]})
            start = part.stop
        return responses


def python_backend_env() -> None:
    """The Python-backend stub links libpython; point it at this interpreter's (not the system's) copy."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def serve(options: ServeOptions, ready: threading.Event | None = None) -> None:
    """Load the model folder, start Triton and serve until SIGINT/SIGTERM; returns after a clean shutdown."""
    started: list[tuple[int, str]] = []  # what was running under this process when the signal came
    try:
        # a signal before serving began raises here; the context managers in _serve have already cleaned up
        with contextlib.suppress(KeyboardInterrupt):
            _serve(options, ready, started)
    finally:
        end_leftovers(started)
    log.info("stopped")


def _serve(options: ServeOptions, ready: threading.Event | None, started: list[tuple[int, str]]) -> None:
    from brainrecon.runtime import Reconstructor, RuntimeOptions

    def stop(signum: int, _frame: Any) -> None:
        started.extend(descendants(os.getpid()))
        raise KeyboardInterrupt  # Triton.serve() and the context managers below stop everything on it

    # from the start: a SIGTERM while loading must not orphan tritonserver
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    python_backend_env()
    runtime = RuntimeOptions(
        engine=options.engine, precision=options.precision, device=options.device, threads=options.threads
    )
    with Reconstructor.open(options.model_dir, runtime) as rec:
        infer = BatchInfer(rec, options.num_inference_steps)
        warm = rec.reconstruct(
            np.zeros((1, rec.n_voxels), np.float32),
            sampling=infer.sampling,
            seeds=None if rec.stage == 1 else [0],
            renormalize=False,
        )  # the first call pays ONNX Runtime's lazy allocations, not the first client
        shapes = (warm.images.shape[1:], warm.stage1_images.shape[1:])
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            try:
                _run_triton(options, rec, infer, shapes, ready)
                return
            except (
                Exception
            ) as e:  # PyTriton raises tritonclient's InferenceServerException for a failed load
                if HANDSHAKE_TIMEOUT not in str(e) or attempt == LOAD_ATTEMPTS:
                    raise BrainReconError(
                        f"recon-serve: Triton could not load model {MODEL_NAME} "
                        f"(attempt {attempt} of {LOAD_ATTEMPTS}): {str(e).splitlines()[0]}"
                    ) from None
                log.warning(
                    "model load timed out in PyTriton's stub handshake (attempt %d); retrying", attempt
                )


def _run_triton(
    options: ServeOptions, rec: Any, infer: BatchInfer, shapes: tuple[tuple[int, ...], ...], ready: Any
) -> None:
    """One Triton server with model `brainrecon` bound to `infer`, serving until SIGINT/SIGTERM."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(
        http_address=options.host,
        http_port=options.http_port,
        grpc_address=options.host,
        grpc_port=options.grpc_port,
        metrics_address=options.host,
        metrics_port=options.metrics_port,
        exit_timeout_secs=1,  # the default waits 30 s for in-flight requests on shutdown
    )
    batcher = DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=[infer] * options.instances,
            inputs=[
                Tensor(name="betas", dtype=np.float32, shape=(rec.n_voxels,)),
                Tensor(name="seed", dtype=np.int64, shape=(1,), optional=True),
            ],
            outputs=[
                Tensor(name="final_image", dtype=np.uint8, shape=shapes[0]),
                Tensor(name="stage1_image", dtype=np.uint8, shape=shapes[1]),
            ],
            config=ModelConfig(
                batching=True,
                max_batch_size=options.max_batch_size,
                batcher=batcher if options.dynamic_batching else None,
            ),
            strict=True,
        )
        log.info(
            "serving %s (stage %d, %d voxels) at http://%s:%d, grpc %s:%d",
            options.model_dir,
            rec.stage,
            rec.n_voxels,
            options.host,
            options.http_port,
            options.host,
            options.grpc_port,
        )
        if ready is not None:
            ready.set()
        triton.serve()


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after "pid (comm)" (state, ppid, ..., starttime at 19); [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `pid`, read from /proc (Triton runs on Linux only)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):  # gone meanwhile: skipped
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))  # ppid, starttime
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _alive(process: tuple[int, str]) -> bool:
    """Still running, and the same process (its start time), not a new one that reuses the pid."""
    fields = _stat(process[0])
    return bool(fields) and fields[19] == process[1] and fields[0] != "Z"


def end_leftovers(processes: list[tuple[int, str]], grace_s: float = 1.0) -> None:
    """SIGTERM, then after `grace_s` SIGKILL, whatever of `processes` outlived Triton's shutdown: PyTriton 0.7's
    Python-backend stub starts a multiprocessing manager for its tensor store (`pytriton/proxy/data.py`), which
    can outlive the stub by 10 s or more."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in processes if _alive(p)]
        if not alive:
            return
        log.info("ending %d leftover process(es) with %s", len(alive), sig.name)
        for pid, _ in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in alive):
            time.sleep(0.05)


def check_model_dir(model_dir: Path) -> None:
    from brainrecon.errors import MissingFileError
    from brainrecon.model_dir import MANIFEST

    if not (model_dir / MANIFEST).is_file():
        raise MissingFileError(model_dir / MANIFEST, "exported model folder", "run recon-export first")
