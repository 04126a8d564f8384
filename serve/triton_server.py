"""`recon-serve`: the runtime behind a Triton Inference Server (the `tritonserver` bundled with NVIDIA PyTriton).

One model, `brainrecon`, a Python-backend model that runs `Reconstructor` (serve/triton_models/runtime_model.py):

    input  betas         (V,)      FP32    z-scored betas of one trial (a request may hold several rows)
    input  seed          (1,)      INT64   optional; default: the fitted sampling seed (stage2/stage2.json)
    output final_image   (S, S, 3) UINT8   the two-stage reconstruction (stage 1's image for a stage-1 model)
    output stage1_image  (s, s, 3) UINT8   the VDVAE reconstruction

recon-serve writes a private model repository (`config.pbtxt` + `1/model.py`) in a temporary folder and runs the
bundled binary on it through serve/tritonserver.py (which also restricts the admin APIs); the folder is removed on
shutdown. PyTriton's own `bind` is not used: its proxy answers a whole batch with one error
(`pytriton/proxy/model.py`, BatchResponsesHandler), so one bad request would fail the valid requests batched with
it. The model here answers each request on its own (python_backend: one `InferenceResponse` per request).

A row's img2img noise is `np.random.default_rng(seed).standard_normal((1, 4, h, w), float32)` (the runtime's
`seeds=`), and the server never re-normalises over a batch (`renormalize=False`), so a row's images depend only on
its betas and seed, never on what it was batched with: they equal `recon-infer` of that single trial with
`--seed seed` (a single trial skips the re-normalisation too).

Dynamic batching: Triton queues requests for up to `max_queue_delay_us` (default 5 ms) to fill a batch of up to
`max_batch_size` rows, then one instance runs them in one `Reconstructor.reconstruct` call. Queue policy (Triton's
`default_queue_policy`, model_config.proto): at most `max_queue_size` requests wait (more are refused at once with
"Exceeds maximum queue size"), and a request that waited `queue_timeout_s` (or the shorter `timeout` a request
sets, in microseconds) is refused with "Request timeout expired" instead of computed for a client that gave up.

Errors. Triton itself rejects a request of the wrong rank, voxel count or dtype before batching, with a one-line
message naming expected and found (HTTP 400). Values it cannot check (NaN/Inf betas, a negative seed) are checked
by the runtime's own `Reconstructor.check`: that request alone gets the error (HTTP 400).

Load retries: a model load can fail for a passing reason (ports, memory on a loaded machine); the server is started
again up to LOAD_ATTEMPTS times, each failure logged with Triton's reason. BRAINRECON_SERVE_FAIL_LOADS=N (tests)
makes the model's `initialize` fail in the first N attempts.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainrecon.choices import SAMPLERS, Sampler
from brainrecon.errors import BrainReconError, InputError

log = logging.getLogger("brainrecon.serve")

MODEL_NAME = "brainrecon"
DEFAULT_QUEUE_DELAY_US = 5000
DEFAULT_MAX_QUEUE_SIZE = 64  # requests waiting (not running); a stage-2 request takes seconds on a CPU
DEFAULT_QUEUE_TIMEOUT_S = 60.0
LOAD_ATTEMPTS = 3
LOAD_TIMEOUT_S = 900.0  # a real-size model folder loads in minutes on a CPU
FAIL_LOADS_ENV = "BRAINRECON_SERVE_FAIL_LOADS"
TEMPLATE = importlib.resources.files("brainrecon.serve") / "triton_models" / "runtime_model.py"


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
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE  # 0: no limit
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S  # 0: no timeout
    engine: str = "ort"
    precision: str = "fp32"
    device: str = "cpu"
    threads: int | None = None
    num_inference_steps: int | None = None  # override the fitted schedule length (stage 2)
    sampler: Sampler | None = None  # override the fitted sampler (stage 2)
    guidance_stop: float | None = None  # override the fitted share of guided steps (stage 2)
    cache_interval: int | None = None  # DeepCache: a full UNet step every K-th (stage 2, --deepcache export)
    verbose: bool = False  # Triton's log on stderr, one line per model execution

    def __post_init__(self) -> None:
        for name in ("instances", "max_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}", "an integer >= 1", str(getattr(self, name)))
        if self.max_queue_delay_us < 0:
            raise InputError("--max-queue-delay-us", "microseconds >= 0", str(self.max_queue_delay_us))
        if self.max_queue_size < 0:
            raise InputError("--max-queue-size", "requests >= 0 (0: no limit)", str(self.max_queue_size))
        if not 0 <= self.queue_timeout_s < 1e9:  # NaN and inf refused too (Triton takes whole microseconds)
            raise InputError(
                "--queue-timeout-s", "seconds in [0, 1e9) (0: no timeout)", str(self.queue_timeout_s)
            )
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise InputError("--steps", "an integer >= 1", str(self.num_inference_steps))
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise InputError("--sampler", f"one of {SAMPLERS}", repr(self.sampler))
        if self.guidance_stop is not None and not 0.0 <= self.guidance_stop <= 1.0:  # NaN refused too
            raise InputError("--guidance-stop", "a share of the steps in [0, 1]", str(self.guidance_stop))
        if self.cache_interval is not None and self.cache_interval < 1:
            raise InputError("--cache-interval", "an integer >= 1", str(self.cache_interval))
        ports = [self.http_port, self.grpc_port, self.metrics_port]
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise InputError("ports", "three distinct ports in 1..65535 (http, grpc, metrics)", str(ports))


def model_config(options: ServeOptions, fail_load: str = "") -> str:
    """The `config.pbtxt` of model `brainrecon` (Triton's ModelConfig in protobuf text format), its tensors from
    the model folder's export contracts (export/triton.py `bls_io`, as the exported repository's BLS model)."""
    from brainrecon.export.triton import RepoOptions, bls_io, config_text, repository_models
    from brainrecon.manifest import load_manifest

    manifest = load_manifest(options.model_dir)
    repo_options = RepoOptions(
        precision=options.precision, engine="trt" if options.engine == "trt" else "onnx"
    )
    models = repository_models(manifest, options.model_dir, repo_options)
    inputs, outputs, _ = bls_io(models, manifest, options.model_dir)
    parameters = {
        "model_dir": str(options.model_dir.resolve()),
        "engine": options.engine,
        "precision": options.precision,
        "device": options.device,
        "threads": "" if options.threads is None else str(options.threads),
        "steps": "" if options.num_inference_steps is None else str(options.num_inference_steps),
        "sampler": options.sampler or "",
        "guidance_stop": "" if options.guidance_stop is None else repr(options.guidance_stop),
        "cache_interval": "" if options.cache_interval is None else str(options.cache_interval),
        "verbose": "1" if options.verbose else "0",
    }
    if fail_load:
        parameters["fail_load"] = fail_load
    return config_text(
        MODEL_NAME,
        inputs,
        outputs,
        options.max_batch_size,
        "KIND_CPU",  # the stub runs the runtime, which places its own sessions (RuntimeOptions.device)
        options.instances,
        options.max_queue_delay_us,
        backend="python",
        optional=("seed",),
        parameters=parameters,
        queue_policy={
            "max_queue_size": options.max_queue_size,
            "default_timeout_microseconds": round(options.queue_timeout_s * 1e6),
        },
        dynamic_batching=options.dynamic_batching,  # off: each request its own execution, no queue policy
    )


def write_repository(root: Path, options: ServeOptions, attempt: int) -> Path:
    """`root/brainrecon/{config.pbtxt, 1/model.py}`; the load-failure test hook applies to the first N attempts."""
    fail_loads = int(os.environ.get(FAIL_LOADS_ENV, "0") or 0)
    fail = f"{FAIL_LOADS_ENV}={fail_loads}, attempt {attempt}" if attempt <= fail_loads else ""
    version = root / MODEL_NAME / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATE, version / "model.py")
    (root / MODEL_NAME / "config.pbtxt").write_text(model_config(options, fail))
    return root


def serve(options: ServeOptions, ready: threading.Event | None = None) -> None:
    """Start Triton on the model folder and serve until SIGINT/SIGTERM; returns after a clean shutdown."""
    started: list[tuple[int, str]] = []  # what was running under this process when the signal came
    try:
        # a signal before serving began raises here; the finally blocks in _serve have already cleaned up
        with contextlib.suppress(KeyboardInterrupt):
            _serve(options, ready, started)
    finally:
        end_leftovers(started)
    log.info("stopped")


def _serve(options: ServeOptions, ready: threading.Event | None, started: list[tuple[int, str]]) -> None:
    from brainrecon.serve.tritonserver import TritonServer

    def stop(signum: int, _frame: Any) -> None:
        started.extend(descendants(os.getpid()))
        raise KeyboardInterrupt  # unwinds into the finally blocks below, which stop Triton

    # from the start: a SIGTERM while loading must not orphan tritonserver
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    model_config(options)  # the model folder's contracts, read before anything starts
    workdir = Path(tempfile.mkdtemp(prefix="recon-serve-"))
    try:
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            repo = write_repository(workdir / "repository", options, attempt)
            server = TritonServer(
                repo,
                http_port=options.http_port,
                grpc_port=options.grpc_port,
                metrics_port=options.metrics_port,
                host=options.host,
                log="-" if options.verbose else workdir / f"tritonserver-{attempt}.log",
                workdir=workdir / "server",
            )
            try:
                server.start()
                try:
                    server.wait_ready([MODEL_NAME], timeout_s=LOAD_TIMEOUT_S)
                except RuntimeError as e:
                    reason = str(e).replace("\n", " | ")
                    if attempt == LOAD_ATTEMPTS:
                        raise BrainReconError(
                            f"recon-serve: Triton could not load model {MODEL_NAME} "
                            f"(attempt {attempt} of {LOAD_ATTEMPTS}): {reason}"
                        ) from None
                    log.warning(
                        "Triton could not load model %s (attempt %d of %d): %s; retrying",
                        MODEL_NAME,
                        attempt,
                        LOAD_ATTEMPTS,
                        reason,
                    )
                    continue
                log.info(
                    "serving %s at http://%s:%d, grpc %s:%d (attempt %d)",
                    options.model_dir,
                    options.host,
                    options.http_port,
                    options.host,
                    options.grpc_port,
                    attempt,
                )
                if ready is not None:
                    ready.set()
                assert server.process is not None
                code = server.process.wait()  # until a signal raises KeyboardInterrupt in `stop`
                raise BrainReconError(f"recon-serve: tritonserver exited with code {code} ({server.tail()})")
            finally:
                server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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
