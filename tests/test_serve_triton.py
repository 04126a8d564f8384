"""recon-serve (serve/triton_server.py): a real Triton server (PyTriton's bundled tritonserver) on 127.0.0.1 serving
the tiny two-stage model of tests/stage2_fixture.py with the short schedule (`--steps 8`), real HTTP requests.

Parity with recon-infer: a request's final and stage-1 images equal `recon-infer --trials i --seed s --steps 8` of
that single trial, tolerance max |diff| <= 1 grey level (a rounding tie of `rint` if two ONNX Runtime sessions
block a matmul differently; measured: 0, identical). Batching: a row's images are the same whether it came alone,
in a multi-row request, or dynamically batched with other requests (identical, measured). Bad requests get a
one-line error naming expected and found, and the next request is served. SIGTERM stops the server and all of its
processes within 10 s (measured about 4 s).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serve_helpers import (
    STEPS,
    exported_tiny_model,
    free_ports,
    http,
    images,
    infer,
    serve_venv,
    session_pids,
    stop_session,
    tiny_betas_file,
    wait_ready,
)

RESEND_MARKER = "not run: resend"  # serve/triton_server.py (which needs PyTriton, absent from this venv)
QUEUE_DELAY_US = 200_000  # long enough that concurrent test requests reliably meet in one batch


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return exported_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def betas_file(model, tmp_path_factory) -> Path:
    return tiny_betas_file(tmp_path_factory)


@pytest.fixture(scope="module")
def betas(betas_file) -> np.ndarray:
    return np.load(betas_file)  # (10, V) float32


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """recon-serve in the serving environment; yields (http port, grpc port, process, log path)."""
    venv = serve_venv()
    http_port, grpc_port, metrics_port = free_ports(3)
    log = tmp_path_factory.mktemp("serve") / "recon-serve.log"
    command = [
        str(venv / "bin" / "recon-serve"),
        f"--model-dir={model}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        f"--steps={STEPS}",
        f"--max-queue-delay-us={QUEUE_DELAY_US}",
        "--max-batch-size=8",
        "--threads=1",
        "--verbose",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(http_port, "brainrecon", process)
        yield http_port, grpc_port, process, log
    finally:
        stop_session(process)


def recon_infer(model: Path, betas_file: Path, trial: int, seed: int, out: Path) -> dict[str, np.ndarray]:
    """recon-infer (main venv, the CLI) on one trial; its stage-1 and final PNGs."""
    command = [
        str(Path(__import__("sys").executable).parent / "recon-infer"),
        str(betas_file),
        f"--model-dir={model}",
        f"--out={out}",
        f"--trials={trial}",
        f"--seed={seed}",
        f"--steps={STEPS}",
    ]
    subprocess.run(command, check=True, capture_output=True)
    return {kind: np.asarray(Image.open(out / f"{kind}_{trial:05d}.png")) for kind in ("stage1", "final")}


def served(port: int, rows: np.ndarray, seeds: list[int] | None) -> dict[str, np.ndarray]:
    status, body = infer(port, rows, seeds)
    assert status == 200, body
    return images(body)


def test_model_config(server, betas):
    http_port = server[0]
    status, config = http(http_port, "/v2/models/brainrecon/config")
    assert status == 200
    assert config["max_batch_size"] == 8
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == QUEUE_DELAY_US
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("betas", "TYPE_FP32", [betas.shape[1]]),
        ("seed", "TYPE_INT64", [1]),
    ]
    assert [o["name"] for o in config["output"]] == ["final_image", "stage1_image"]


def test_same_images_as_recon_infer(server, model, betas, betas_file, tmp_path):
    http_port = server[0]
    for trial, seed in ((0, 0), (3, 7)):
        expected = recon_infer(model, betas_file, trial, seed, tmp_path / f"infer-{trial}")
        got = served(http_port, betas[trial : trial + 1], [seed])
        final = got["final_image"][0].astype(int)
        stage1 = got["stage1_image"][0].astype(int)
        assert final.shape == expected["final"].shape
        assert np.abs(final - expected["final"]).max() <= 1
        assert np.abs(stage1 - expected["stage1"]).max() <= 1
    # the default seed is the fitted one (0)
    default = served(http_port, betas[:1], None)["final_image"]
    assert np.array_equal(default, served(http_port, betas[:1], [0])["final_image"])
    assert not np.array_equal(default, served(http_port, betas[:1], [1])["final_image"])


def test_images_do_not_depend_on_batching(server, betas):
    http_port, _, _, log = server
    seeds = [11, 12, 13, 14]
    alone = [served(http_port, betas[i : i + 1], [seeds[i]])["final_image"][0] for i in range(4)]
    together = served(http_port, betas[:4], seeds)["final_image"]  # one request, four rows
    assert all(np.array_equal(together[i], alone[i]) for i in range(4))
    # four concurrent requests: the dynamic batcher puts them into fewer runtime calls
    calls_before = len(re.findall(r"runtime call \d+", log.read_text()))
    results: dict[int, np.ndarray] = {}

    def send(i: int) -> None:
        results[i] = served(http_port, betas[i : i + 1], [seeds[i]])["final_image"][0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(np.array_equal(results[i], alone[i]) for i in range(4))
    time.sleep(0.5)  # the log line of the last call
    calls = re.findall(r"runtime call \d+: (\d+) requests", log.read_text())[calls_before:]
    assert sum(int(c) for c in calls) == 4 and len(calls) < 4, calls


@pytest.mark.parametrize(
    "case",
    ["voxels", "nan", "dtype", "rank", "negative seed"],
)
def test_bad_request_gets_clear_error_and_server_goes_on(server, betas, case):
    http_port = server[0]
    v = betas.shape[1]
    row = betas[:1]
    if case == "voxels":
        status, body = infer(http_port, row[:, :-3])
        expected = [f"Expected [-1,{v}], got [1,{v - 3}]", "betas"]
    elif case == "nan":
        bad = row.copy()
        bad[0, 7] = np.nan
        status, body = infer(http_port, bad)
        expected = ["expected finite betas", "voxel 7"]
    elif case == "dtype":
        status, body = infer(http_port, row.astype(np.float64), datatype="FP64")
        expected = ["data-type is 'FP64'", "expects 'FP32'"]
    elif case == "rank":
        status, body = infer(http_port, row[None])
        expected = [f"Expected [-1,{v}], got [1,1,{v}]"]
    else:
        status, body = infer(http_port, row, [-2])
        expected = ["seed: expected a non-negative integer, found -2"]
    assert status in (400, 500), body
    for text in expected:
        assert text in body["error"], body["error"]
    ok = served(http_port, row, [0])  # the next request is served
    assert ok["final_image"].shape[1:] == (64, 64, 3)


def test_invalid_request_batched_with_valid_ones(server, betas):
    """PyTriton answers a batch with one error: the valid requests batched with a NaN one are told to resend, and
    resent they succeed; the NaN request's error names what is wrong."""
    http_port = server[0]
    bad = betas[:1].copy()
    bad[0, 0] = np.inf
    replies: dict[str, tuple[int, dict]] = {}

    def send(name: str, rows: np.ndarray) -> None:
        replies[name] = infer(http_port, rows, [5])

    threads = [
        threading.Thread(target=send, args=("bad", bad)),
        threading.Thread(target=send, args=("good", betas[1:2])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert replies["bad"][0] != 200 and "expected finite betas" in replies["bad"][1]["error"]
    status, body = replies["good"]
    if status != 200:  # it met the bad one in a batch
        assert RESEND_MARKER in body["error"] and "expected finite betas" in body["error"]
        status, body = infer(http_port, betas[1:2], [5])
    assert status == 200
    assert np.array_equal(images(body)["final_image"], served(http_port, betas[1:2], [5])["final_image"])


def test_readme_client_example(server, model, betas_file, tmp_path):
    """The tritonclient example of README.md ("Deployment: Triton and Ray") runs against the server as written,
    with this server's port and the tiny model's betas, and gets recon-infer's image for trial 0, seed 0."""
    http_port = server[0]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    found = re.search(r"<!-- client-example -->\s*```python\n(.*?)```", readme, re.S)
    assert found, "README.md: the client example block (<!-- client-example -->) is missing"
    code = found.group(1).replace("127.0.0.1:8000", f"127.0.0.1:{http_port}")
    code = code.replace("data/subj01/test_betas.npy", str(betas_file))
    code += f"\nnp.save({str(tmp_path / 'final.npy')!r}, final)\n"
    script = tmp_path / "client_example.py"
    script.write_text(code)
    subprocess.run([str(serve_venv() / "bin" / "python"), str(script)], check=True, timeout=120)
    final = np.load(tmp_path / "final.npy")
    expected = recon_infer(model, betas_file, 0, 0, tmp_path / "infer")
    assert final.shape == expected["final"].shape
    assert np.abs(final.astype(int) - expected["final"]).max() <= 1


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid} (gone)"


def test_shutdown_is_clean_and_quick(model, tmp_path):
    """A second server (dynamic batching off, two instances): SIGTERM ends it and every process it started (Triton,
    the Python-backend stubs) within 10 s; the ports are free again."""
    venv = serve_venv()
    ports = free_ports(3)
    command = [
        str(venv / "bin" / "recon-serve"),
        f"--model-dir={model}",
        f"--http-port={ports[0]}",
        f"--grpc-port={ports[1]}",
        f"--metrics-port={ports[2]}",
        f"--steps={STEPS}",
        "--no-dynamic-batching",
        "--instances=2",
        "--threads=1",
    ]
    with open(tmp_path / "serve.log", "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(ports[0], "brainrecon", process)
        status, config = http(ports[0], "/v2/models/brainrecon/config")
        assert status == 200 and "dynamic_batching" not in config
        assert [g["count"] for g in config["instance_group"]] == [2]
        assert http(ports[0], "/v2/models/brainrecon/infer", {"inputs": []})[0] == 400  # answers, then stops
        assert len(session_pids(process.pid)) >= 3  # recon-serve, tritonserver, the python-backend stub
        t0 = time.monotonic()
        process.terminate()
        process.wait(10)
        while session_pids(process.pid) and time.monotonic() - t0 < 10:  # the stubs exit just after
            time.sleep(0.1)
        seconds = time.monotonic() - t0
    finally:
        leftovers = session_pids(process.pid)
        lingering = [_cmdline(pid) for pid in leftovers]
        stop_session(process)
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()[-2000:]
    assert seconds < 10, lingering  # what is still running, if anything
    assert leftovers == []
    with pytest.raises(OSError):
        http(ports[0], "/v2/health/live", timeout=2)


def test_leftovers_of_a_stopped_server_are_ended():
    """What recon-serve ends after Triton's shutdown: the processes below it when the signal came, found through
    /proc (a child and its grandchild here), and nothing else, even a process that ignores SIGTERM."""
    from brainrecon.serve.triton_server import descendants, end_leftovers

    script = "import subprocess, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    script += "subprocess.Popen(['sleep', '60']); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", script])
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (found := descendants(child.pid)) or _cmdline(found[0][0]).split()[:1] != ["sleep"]:
            assert time.monotonic() < deadline, found
            time.sleep(0.05)
        tree = [(child.pid, "")] + found
        assert len(found) == 1  # the grandchild `sleep` (started after the SIGTERM handler was set)
        started = [p for p in descendants(os.getpid()) if p[0] in {pid for pid, _ in tree}]
        assert {pid for pid, _ in started} == {pid for pid, _ in tree}
        t0 = time.monotonic()
        end_leftovers(started, grace_s=0.5)
        assert time.monotonic() - t0 < 5
        assert child.wait(5) == -9  # ignored SIGTERM, so SIGKILL
        assert bystander.poll() is None  # not below us: left alone
    finally:
        for p in (child, bystander):
            p.kill()
            p.wait()
