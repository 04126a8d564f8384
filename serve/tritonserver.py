"""Run the `tritonserver` binary bundled in the PyTriton wheel on a model repository of our own.

The wheel ships Triton 2.51 with the Python backend only (no onnxruntime or TensorRT backend), so it can load the
CPU variant of `recon-export --format triton` (Python-backend wrappers around the ONNX files plus the BLS model).
What PyTriton itself does before starting the binary (`pytriton/triton.py _prepare_triton_inference_server`,
`pytriton/server/triton_server.py _get_env`) is done here in a private folder: the backends are copied and the
Python-backend stub for this interpreter's version is put beside `libtriton_python.so`; LD_LIBRARY_PATH gets the
wheel's libraries and this interpreter's LIBDIR (the stub links libpython3.X.so, and another copy of it on the
system fails model loading); PATH starts with this environment's bin, whose python has numpy and onnxruntime.

Admin APIs. Clients need health, metadata, model config and inference; the others (shared memory, which maps
client-named memory into the server; the model repository's load/unload; statistics; trace and logging settings,
which write files) are restricted on HTTP and gRPC (`--http-restricted-api`, `--grpc-restricted-protocol`; Triton
docs `docs/customization_guide/inference_protocols.md`, "Limit endpoint access"): a request to them must carry the
header `admin-key: <key>`, the key taken from BRAINRECON_SERVE_ADMIN_KEY, else drawn at random per start and never
shown (those APIs are then closed to everyone).

    with TritonServer(repo, http_port=8000, grpc_port=8001, metrics_port=8002) as server:
        server.wait_ready(["brainrecon"], timeout_s=120)
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ADMIN_HEADER = "admin-key"
ADMIN_KEY_ENV = "BRAINRECON_SERVE_ADMIN_KEY"
RESTRICTED_APIS = ("shared-memory", "model-repository", "statistics", "trace", "logging")


def pytriton_dist() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


class TritonServer:
    def __init__(
        self,
        repository: str | Path,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        host: str = "127.0.0.1",
        log: str | Path | None = None,
        workdir: str | Path | None = None,
    ):
        """log: a file for tritonserver's output, "-" to pass it through to this process's, None to discard it.
        workdir: where the backends are copied (removed by `stop`); default a new temporary folder."""
        self.repository = Path(repository).resolve()
        self.host, self.http_port, self.grpc_port, self.metrics_port = (
            host,
            http_port,
            grpc_port,
            metrics_port,
        )
        self.log = Path(log) if log and log != "-" else None
        self.passthrough = log == "-"
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = Path(workdir) if workdir else None
        self.admin_key = os.environ.get(ADMIN_KEY_ENV) or secrets.token_hex(16)

    def start(self) -> TritonServer:
        dist = pytriton_dist()
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="brainrecon-tritonserver-"))
        backends = self._workdir / "backends"
        shutil.rmtree(backends, ignore_errors=True)  # a restart in the same workdir
        shutil.copytree(dist / "backends", backends)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
        libs = [sysconfig.get_config_var("LIBDIR") or "", str(dist.parent.parent / "nvidia_pytriton.libs")]
        env = os.environ.copy()
        env["LD_LIBRARY_PATH"] = ":".join(p for p in [*libs, env.get("LD_LIBRARY_PATH", "")] if p)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        command = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=5",  # unloading the Python-backend stubs; a hard exit leaks their /dev/shm regions
            f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}",
        ]
        if self.passthrough:
            self.process = subprocess.Popen(command, env=env)
        else:
            out = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115
            try:
                self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            finally:
                if self.log:
                    out.close()  # the child holds its own descriptor
        return self

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.http_port}{path}"

    def wait_ready(self, models: list[str], timeout_s: float = 120.0) -> None:
        """Until every model answers ready; RuntimeError with the log's tail if the server dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        pending = list(models)
        while pending:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"tritonserver exited with code {code} ({self.tail()})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"models {pending} not ready after {timeout_s} s ({self.tail()})")
            try:
                with urllib.request.urlopen(self.url(f"/v2/models/{pending[0]}/ready"), timeout=2) as r:
                    if r.status == 200:
                        pending.pop(0)
                        continue
            except OSError:
                pass
            time.sleep(0.5)

    def tail(self, lines: int = 15) -> str:
        if self.log and self.log.is_file():
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "its output is above" if self.passthrough else "no log"

    def stop(self, timeout_s: float = 20.0) -> float:
        """SIGTERM, wait; returns the seconds it took (SIGKILL after `timeout_s`)."""
        t0 = time.monotonic()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        return time.monotonic() - t0

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m brainrecon.serve.tritonserver REPO --http-port N ...`: serve until SIGTERM/SIGINT."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log", type=Path, default=None, help="tritonserver's output (default: discarded)")
    args = parser.parse_args(argv)
    server = TritonServer(
        args.repository, args.http_port, args.grpc_port, args.metrics_port, args.host, args.log
    ).start()

    stopping = threading.Event()  # the handler only flags: Popen.wait from a handler would wait for itself
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    assert server.process is not None
    while not stopping.wait(0.2) and server.process.poll() is None:
        pass
    code = server.process.poll()
    server.stop()
    return 0 if code is None else code


if __name__ == "__main__":
    raise SystemExit(main())
