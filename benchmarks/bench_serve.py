"""Load and fault benchmark of `recon-serve` on loopback (run in the serving environment: `make bench-serve`).

Bounded and self-stopping: for each setting (dynamic batching on / off) one server is started on 127.0.0.1; for
each concurrency N, N client threads (one tritonclient HTTP client each) send `--requests` one-trial requests in
total (each its own seed), with a time cap per level; then requests/s, p50/p95/p99 latency and errors. Fault
checks on the batching server: a client that disconnects mid-request, malformed requests (not JSON, wrong shape,
NaN), and a server restarted (SIGTERM, new process) while a client keeps retrying. Results: JSON and a plot of
latency against concurrency in `--out`.

    .venv-serve/bin/python benchmarks/bench_serve.py --model-dir .bench-check/model \
        --betas .bench-check/prep/test_betas.npy --out benchmarks/results/serve
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from brainrecon.benchmarks.common import RESULTS, machine
from brainrecon.io import write_json


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Server:
    """recon-serve as a subprocess (its own session, stopped with SIGTERM)."""

    def __init__(self, model_dir: Path, batching: bool, ports: list[int], log: Path, extra: list[str]):
        recon_serve = Path(sys.executable).parent / "recon-serve"
        self.command = [
            str(recon_serve),
            f"--model-dir={model_dir}",
            f"--http-port={ports[0]}",
            f"--grpc-port={ports[1]}",
            f"--metrics-port={ports[2]}",
            "--dynamic-batching" if batching else "--no-dynamic-batching",
            *extra,
        ]
        self.port, self.log = ports[0], log
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> float:
        t0 = time.monotonic()
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        while time.monotonic() - t0 < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"recon-serve exited: {self.log.read_text()[-2000:]}")
            try:
                url = f"http://127.0.0.1:{self.port}/v2/models/brainrecon/ready"
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("recon-serve not ready in time")

    def stop(self) -> float:
        t0 = time.monotonic()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return time.monotonic() - t0


def load_level(server: Server, betas: np.ndarray, clients: int, requests: int, cap_s: float) -> dict:
    """`requests` one-trial requests from `clients` threads (one `brainrecon.serve.client.ReconClient` each, the
    client users get); latency percentiles, throughput, errors."""
    from brainrecon.serve.client import ReconClient

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + cap_s

    def client_loop() -> None:
        with ReconClient(f"127.0.0.1:{server.port}", timeout_s=cap_s) as client:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    final, _ = client.reconstruct(betas[i % len(betas)], seed=i)
                    assert final.dtype == np.uint8
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                except Exception as e:  # counted, reported
                    with lock:
                        errors.append(f"{type(e).__name__}: {str(e)[:120]}")

    before = model_counts(server.log)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    time.sleep(0.3)  # the log line of the last call
    after = model_counts(server.log)
    runs = after[1] - before[1]  # runtime calls (Triton executions) for this level
    ms = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies) + len(errors),
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 3),
        "runtime_calls": runs,
        "mean_rows_per_call": round((after[0] - before[0]) / runs, 2) if runs else None,
        **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) if len(ms) else None for q in (50, 95, 99)},
    }


def model_counts(log: Path) -> tuple[int, int]:
    """(rows run, runtime calls) so far, from recon-serve's --verbose log (PyTriton restricts Triton's
    statistics endpoint to its access token)."""
    calls = re.findall(r"runtime call \d+: \d+ requests, (\d+) rows", log.read_text(errors="replace"))
    return sum(int(rows) for rows in calls), len(calls)


def post(port: int, body: bytes, timeout: float = 60.0) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/brainrecon/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode()[:200]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}").get("error", "")


def json_body(row: np.ndarray, seed: int | None = None, shape: list[int] | None = None) -> bytes:
    inputs = [
        {"name": "betas", "shape": shape or [1, len(row)], "datatype": "FP32", "data": row.tolist()},
    ]
    if seed is not None:
        inputs.append({"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [seed]})
    return json.dumps({"inputs": inputs}).encode()


def one_line(message: str) -> str:
    from brainrecon.serve.client import one_line as extract

    return extract(message) if message else ""


def healthy(port: int, row: np.ndarray) -> bool:
    return post(port, json_body(row, 0))[0] == 200


def fault_disconnect(port: int, row: np.ndarray) -> dict:
    """A client sends a full request and closes its socket before the answer; the server must go on."""
    body = json_body(row, 1)
    head = (
        f"POST /v2/models/brainrecon/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    results = []
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(head + body)
            time.sleep(0.05)  # the request is in the server, being batched or run
        t0 = time.perf_counter()
        ok = healthy(port, row)
        results.append(
            {"next_request_ok": ok, "next_request_ms": round((time.perf_counter() - t0) * 1000, 1)}
        )
    # and one that closes half-way through its body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head + body[: len(body) // 2])
    results.append({"half_body_then_close": True, "next_request_ok": healthy(port, row)})
    return {"cases": results, "server_kept_serving": all(r["next_request_ok"] for r in results)}


def fault_malformed(port: int, row: np.ndarray) -> dict:
    bad_nan = row.copy()
    bad_nan[0] = np.nan
    cases = {
        "not JSON": b"{not json",
        "no inputs": b"{}",
        "wrong voxel count": json_body(row[:-1]),
        "wrong rank": json_body(row, shape=[1, 1, len(row)]),
        "negative seed": json_body(row, -1),
    }
    results = {}
    for name, body in cases.items():
        status, message = post(port, body)
        results[name] = {"status": status, "error": one_line(message), "next_ok": healthy(port, row)}
    # NaN has no JSON spelling: the binary protocol of tritonclient (ReconClient)
    from brainrecon.serve.client import ReconClient, ServeError

    bad = row.copy()
    bad[3] = np.nan
    with ReconClient(f"127.0.0.1:{port}") as client:
        try:
            client.reconstruct(bad, seed=0)
            results["NaN betas"] = {"status": 200, "error": ""}
        except ServeError as e:
            results["NaN betas"] = {"status": int(e.status or 0), "error": str(e)}
    results["NaN betas"]["next_ok"] = healthy(port, row)
    return {"cases": results, "server_kept_serving": all(r["next_ok"] for r in results.values())}


def fault_restart(server: Server, row: np.ndarray, requests: int = 6) -> dict:
    """A client sends `requests` requests, retrying each until it succeeds (0.2 s back-off, 60 s cap), while the
    server is stopped (SIGTERM) and started again after its second answer."""
    from brainrecon.serve.client import ReconClient

    log: list[dict] = []
    done = threading.Event()

    def client() -> None:
        for i in range(requests):
            attempts, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 60:
                attempts += 1
                try:
                    with ReconClient(f"127.0.0.1:{server.port}", timeout_s=30) as c:
                        final, _ = c.reconstruct(row, seed=7)
                    ms = round((time.perf_counter() - t0) * 1000)
                    log.append({"request": i, "attempts": attempts, "ms": ms, "final": final})
                    break
                except Exception:
                    time.sleep(0.2)
        done.set()

    thread = threading.Thread(target=client)
    thread.start()
    while len(log) < 2 and thread.is_alive():
        time.sleep(0.05)
    stop_s = server.stop()
    t0 = time.perf_counter()
    start_s = server.start()
    downtime = time.perf_counter() - t0 + stop_s
    thread.join(120)
    finals = [entry.pop("final") for entry in log]
    return {
        "requests": requests,
        "answered": len(log),
        "stop_s": round(stop_s, 2),
        "restart_ready_s": round(start_s, 2),
        "downtime_s": round(downtime, 2),
        "max_attempts": max((e["attempts"] for e in log), default=None),
        "same_image_before_and_after": all(np.array_equal(f, finals[0]) for f in finals),
        "log": log,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("dynamic_batching", "-o"), ("no_batching", "--s")):
        levels = results["load"][mode]
        n = [r["clients"] for r in levels]
        for q, alpha in (("p50_ms", 1.0), ("p95_ms", 0.5)):
            axes[0].plot(
                n, [r[q] for r in levels], style, alpha=alpha, label=f"{mode.replace('_', ' ')} {q[:3]}"
            )
        axes[1].plot(n, [r["requests_per_s"] for r in levels], style, label=mode.replace("_", " "))
    axes[0].set(xlabel="concurrent clients", ylabel="latency (ms)", xscale="log", title="recon-serve latency")
    axes[1].set(xlabel="concurrent clients", ylabel="requests / s", xscale="log", title="throughput")
    for ax in axes:
        ax.set_xticks(n, [str(c) for c in n])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(results["setup"]["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--betas", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve")
    parser.add_argument("--clients", default="1,2,4,8", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--cap-s", type=float, default=120.0, help="time cap per level")
    parser.add_argument("--steps", type=int, default=None, help="recon-serve --steps (default: fitted)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=5000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    betas = np.load(args.betas).astype(np.float32)
    levels = [int(c) for c in args.clients.split(",")]
    extra = [
        f"--max-batch-size={args.max_batch_size}",
        f"--max-queue-delay-us={args.max_queue_delay_us}",
        "--verbose",
    ]
    if args.steps:
        extra.append(f"--steps={args.steps}")
    for old_log in args.out.glob("recon-serve*.log"):
        old_log.unlink()
    results: dict = {
        "setup": {
            "title": f"recon-serve, tiny subject with the shipped foundations: {betas.shape[1]} voxels, {os.cpu_count()} CPU cores, "
            f"max batch {args.max_batch_size}, queue delay {args.max_queue_delay_us} us",
            "model_dir": str(args.model_dir),
            "machine": machine(),
            "server_options": extra,
            "requests_per_level": args.requests,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "load": {},
    }
    # Both servers are up for the whole run and the settings alternate at each level, so that a change of load
    # on the (shared) machine hits both alike; only one is being sent requests at a time.
    modes = {"dynamic_batching": True, "no_batching": False}
    servers = {
        mode: Server(args.model_dir, batching, free_ports(3), args.out / f"recon-serve-{mode}.log", extra)
        for mode, batching in modes.items()
    }
    try:
        for mode, server in servers.items():
            results.setdefault("startup_s", {})[mode] = round(server.start(), 2)
            load_level(server, betas, 1, 2, args.cap_s)  # warm-up, not counted
        for n in levels:
            for mode, server in servers.items():
                level = load_level(server, betas, n, args.requests, args.cap_s)
                level["load_average_1min"] = round(os.getloadavg()[0], 2)
                results["load"].setdefault(mode, []).append(level)
                print(mode, level, flush=True)
        servers["no_batching"].stop()
        batching = servers["dynamic_batching"]
        results["faults"] = {
            "client_disconnects_mid_request": fault_disconnect(batching.port, betas[0]),
            "malformed_requests": fault_malformed(batching.port, betas[0]),
            "server_restarted_while_client_retries": fault_restart(batching, betas[0]),
        }
        print(json.dumps(results["faults"], indent=1)[:3000], flush=True)
    finally:
        for mode, server in servers.items():
            results.setdefault("shutdown_s", {})[mode] = round(server.stop(), 2)
    results["setup"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out / "serve_load.json", results)
    plot(results, args.out / "serve_latency.png")
    print(f"wrote {args.out / 'serve_load.json'} and {args.out / 'serve_latency.png'}")


if __name__ == "__main__":
    main()
