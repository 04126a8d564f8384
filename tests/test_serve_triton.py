"""recon-serve (serve/triton_server.py): a real Triton server (PyTriton's bundled tritonserver) on 127.0.0.1 serving
the tiny two-stage model of tests/fixtures.py with the short schedule (`--steps 6`), real HTTP requests.

Parity with recon-infer: a request's final and stage-1 images equal `recon-infer --trials i --seed s --steps 6` of
that single trial, tolerance max |diff| <= 1 grey level (a rounding tie of `rint` if two ONNX Runtime sessions
block a matmul differently; measured: 0, identical). Batching: a row's images are the same whether it came alone,
in a multi-row request, or dynamically batched with other requests (identical, measured). Requests are batched
deterministically, not by timing: they queue behind a running 8-row request (Triton's pending-request gauge) and
the batcher takes them together; Triton's statistics and the model's log prove it. Bad requests get a one-line
error naming expected and found with HTTP 400, alone: the valid requests of the same batch are answered. Under
pressure (one instance, a queue of four): a request beyond the queue is refused at once (503 "Exceeds maximum queue size"), a
request whose timeout expires behind a slow one is refused (503 "Request timeout expired"), a client that gives up
does not disturb the server. A failed model load is retried; a stopped server starts again on the same model and
serves the same images; nothing is left in the temporary folders. SIGTERM stops the server and all of its
processes within 10 s (measured about 4 s).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures import exported_tiny_model, tiny_betas_file
from tests.serve_helpers import (
    ADMIN_KEY,
    STEPS,
    free_ports,
    http,
    images,
    infer,
    infer_body,
    leftovers,
    model_stats,
    pending_requests,
    reply,
    send,
    serve_env,
    serve_venv,
    session_pids,
    shm_regions,
    stop_session,
    wait_for,
    wait_ready,
)

QUEUE_DELAY_US = 20_000  # not the default (5 ms): the config test sees the option applied


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return exported_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def betas_file(model, tmp_path_factory) -> Path:
    return tiny_betas_file(tmp_path_factory)


@pytest.fixture(scope="module")
def betas(betas_file) -> np.ndarray:
    return np.load(betas_file)  # (10, V) float32


def start_server(
    model: Path, ports: list[int], log: Path, env: dict[str, str], *args: str
) -> subprocess.Popen:
    """recon-serve in the serving environment, in its own session, its output (with --verbose, Triton's log and a
    line per model execution) in `log`."""
    command = [
        str(serve_venv() / "bin" / "recon-serve"),
        f"--model-dir={model}",
        f"--http-port={ports[0]}",
        f"--grpc-port={ports[1]}",
        f"--metrics-port={ports[2]}",
        "--threads=1",
        "--verbose",
        *args,
    ]
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """recon-serve in the serving environment; yields (http port, grpc port, process, log path)."""
    serve_venv()
    ports = free_ports(3)
    root = tmp_path_factory.mktemp("serve")
    log = root / "recon-serve.log"
    args = (f"--steps={STEPS}", f"--max-queue-delay-us={QUEUE_DELAY_US}", "--max-batch-size=8")
    process = start_server(model, ports, log, serve_env(root), *args)
    try:
        wait_ready(ports[0], "brainrecon", process)
        yield ports[0], ports[1], process, log
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


@pytest.mark.serve
def test_model_config(server, betas):
    http_port = server[0]
    status, config = http(http_port, "/v2/models/brainrecon/config")
    assert status == 200
    assert config["max_batch_size"] == 8
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == QUEUE_DELAY_US
    assert config["dynamic_batching"]["default_queue_policy"] == {  # recon-serve's defaults
        "timeout_action": "REJECT",
        "default_timeout_microseconds": 60_000_000,
        "allow_timeout_override": True,
        "max_queue_size": 64,
    }
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("betas", "TYPE_FP32", [betas.shape[1]]),
        ("seed", "TYPE_INT64", [1]),
    ]
    assert [o["name"] for o in config["output"]] == ["final_image", "stage1_image"]


@pytest.mark.serve
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


@pytest.mark.serve
def test_images_do_not_depend_on_batching(busy_server, betas):
    """A row's images are the same alone, in a four-row request, and dynamically batched with three other requests.
    The batch is made deterministic, not hoped for: while the one instance runs an 8-row request (its log line),
    four requests queue (Triton's pending-request gauge says 4); when it is free the batcher takes all four into ONE
    execution, which Triton's statistics prove (2 executions, 8 + 4 inferences)."""
    ports, process, log = busy_server
    seeds = [11, 12, 13, 14]
    alone = [infer(ports[0], betas[i : i + 1], [seeds[i]]) for i in range(4)]
    alone = [images(body)["final_image"][0] for _, body in alone]
    status, together = infer(ports[0], betas[:4], seeds)  # one request, four rows
    assert status == 200 and all(
        np.array_equal(images(together)["final_image"][i], alone[i]) for i in range(4)
    )
    before = model_stats(ports[0])
    running = occupy(ports, process, log, betas)
    queued = [send(ports[0], infer_body(betas[i : i + 1], [seeds[i]])) for i in range(4)]
    wait_for("four queued requests", lambda: pending_requests(ports[2]) == 4, process)
    assert reply(running)[0] == 200
    results = [reply(c) for c in queued]
    after = model_stats(ports[0])
    assert [status for status, _ in results] == [200] * 4, results
    assert (
        after["execution_count"] - before["execution_count"] == 2
    )  # the 8-row request, then one for all four
    assert after["inference_count"] - before["inference_count"] == 8 + 4
    assert all(np.array_equal(images(results[i][1])["final_image"][0], alone[i]) for i in range(4))


@pytest.mark.parametrize(
    "case",
    ["voxels", "nan", "dtype", "rank", "negative seed"],
)
@pytest.mark.serve
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
    assert status == 400, body  # a client error, from Triton (shape, dtype) or from the model (values)
    for text in expected:
        assert text in body["error"], body["error"]
    ok = served(http_port, row, [0])  # the next request is served
    assert ok["final_image"].shape[1:] == (64, 64, 3)


@pytest.mark.parametrize("fault", ["inf betas", "negative seed"])
@pytest.mark.serve
def test_invalid_request_batched_with_valid_ones(busy_server, betas, fault):
    """An invalid request and two valid ones queued behind a running 8-row request run in ONE execution (the
    model's log line: 3 requests, 2 valid, 3 rows; Triton's statistics: 2 executions, 8 + 4 inferences): the
    invalid one gets its own one-line error (HTTP 400), the valid ones their images, equal to those they get
    alone."""
    ports, process, log = busy_server
    bad, bad_seed = betas[:1].copy(), [5]
    if fault == "inf betas":
        bad[0, 0] = np.inf
        message = "betas: expected finite betas, found 1 NaN/Inf values (first at row 0, voxel 0)"
    else:
        bad_seed = [-1]
        message = "seed: expected a non-negative integer, found -1"
    before = model_stats(ports[0])
    seen = len(executions(log))
    running = occupy(ports, process, log, betas)
    bodies = [infer_body(betas[1:2], [5]), infer_body(bad, bad_seed), infer_body(betas[2:4], [6, 7])]
    queued = [send(ports[0], b) for b in bodies]
    wait_for("three queued requests", lambda: pending_requests(ports[2]) == 3, process)
    assert reply(running)[0] == 200
    (good_status, good), (bad_status, bad_reply), (pair_status, pair) = [reply(c) for c in queued]
    after = model_stats(ports[0])
    assert after["execution_count"] - before["execution_count"] == 2
    assert after["inference_count"] - before["inference_count"] == 8 + 4  # 8, then 1 + 1 + 2 rows
    assert executions(log)[seen:] == [(1, 1, 8), (3, 2, 3)]
    assert (bad_status, bad_reply) == (400, {"error": message})
    assert good_status == 200 and pair_status == 200, (good, pair)
    status, good_alone = infer(ports[0], betas[1:2], [5])
    assert status == 200 and np.array_equal(images(good)["final_image"], images(good_alone)["final_image"])
    status, pair_alone = infer(ports[0], betas[2:4], [6, 7])
    assert status == 200 and np.array_equal(images(pair)["final_image"], images(pair_alone)["final_image"])


@pytest.mark.serve
def test_admin_apis_need_the_admin_key(server):
    """Statistics, logging, trace, shared memory and the repository API answer 403 without the header
    `admin-key` (Triton's restricted-API check), and answer with it; inference-side APIs stay open."""
    http_port = server[0]
    restricted = [
        "/v2/models/brainrecon/stats",
        "/v2/logging",
        "/v2/trace/setting",
        "/v2/systemsharedmemory/status",
        "/v2/cudasharedmemory/status",
    ]
    for path in restricted:
        assert http(http_port, path) == (
            403,
            {"error": "This API is restricted, expecting header 'admin-key'"},
        )
    assert http(http_port, "/v2/repository/index", {}) == (
        403,
        {"error": "This API is restricted, expecting header 'admin-key'"},
    )
    for path in restricted[:4]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}{path}", headers={"admin-key": ADMIN_KEY}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200, path
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v2/models/brainrecon/stats", headers={"admin-key": "a wrong key"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403
    for path in ("/v2/health/ready", "/v2", "/v2/models/brainrecon", "/v2/models/brainrecon/config"):
        assert http(http_port, path)[0] == 200, path


@pytest.mark.serve
def test_readme_client_example(server, model, betas_file, tmp_path):
    """The tritonclient example of docs/deployment.md runs against the server as written,
    with this server's port and the tiny model's betas, and gets recon-infer's image for trial 0, seed 0."""
    http_port = server[0]
    guide = (Path(__file__).resolve().parent.parent / "docs" / "deployment.md").read_text()
    found = re.search(r"<!-- client-example -->\s*```python\n(.*?)```", guide, re.S)
    assert found, "docs/deployment.md: the client example block (<!-- client-example -->) is missing"
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


def executions(log: Path) -> list[tuple[int, int, int]]:
    """(requests, valid requests, rows) of each model execution, from the model's own log line (--verbose)."""
    found = re.findall(r"runtime call \d+: (\d+) requests, (\d+) rows, (\d+) valid", log.read_text())
    return [(int(n), int(valid), int(rows)) for n, rows, valid in found]


@pytest.fixture(scope="module")
def busy_server(model, tmp_path_factory):
    """A server under pressure: one instance, no batching delay, a queue of FOUR requests, the fitted schedule (so
    one 8-row batch keeps the instance busy for a while). Yields (ports, process, log)."""
    serve_venv()
    ports = free_ports(3)
    root = tmp_path_factory.mktemp("busy")
    log = root / "recon-serve.log"
    args = ("--max-queue-delay-us=0", "--max-queue-size=4", "--max-batch-size=8", "--instances=1")
    process = start_server(model, ports, log, serve_env(root), *args)
    try:
        wait_ready(ports[0], "brainrecon", process)
        yield ports, process, log
    finally:
        stop_session(process)


def occupy(ports: list[int], process: subprocess.Popen, log: Path, betas: np.ndarray):
    """Send an 8-row request (a full batch) and return its connection once the model has started executing it
    (its log line): from then on the one instance is busy and new requests queue."""
    seen = len(executions(log))
    connection = send(ports[0], infer_body(betas[:8], list(range(8))))
    wait_for("the 8-row execution", lambda: executions(log)[seen:] == [(1, 1, 8)], process)
    return connection


@pytest.mark.serve
def test_queue_full_is_refused_at_once(busy_server, betas):
    """Instance busy, the queue full (four requests; Triton's pending-request gauge says 4): the next is refused at
    once with 503 and Triton's message; the running and the queued requests are then answered."""
    ports, process, log = busy_server
    running = occupy(ports, process, log, betas)
    queued = [send(ports[0], infer_body(betas[:1], [i])) for i in range(4)]
    wait_for("four queued requests", lambda: pending_requests(ports[2]) == 4, process)
    assert reply(send(ports[0], infer_body(betas[1:2], [2]))) == (
        503,
        {"error": "[request id: <id_unknown>] Exceeds maximum queue size"},
    )
    assert reply(running)[0] == 200
    for connection in queued:
        status, body = reply(connection)
        assert status == 200 and images(body)["final_image"].shape == (1, 64, 64, 3)


@pytest.mark.serve
def test_request_timeout_behind_a_slow_request(busy_server, betas):
    """A request with a 1 ms queue timeout (KServe v2 parameter `timeout`) waits behind a running 8-row batch:
    refused with 503 and Triton's message instead of computed; a request without a timeout is then served."""
    ports, process, log = busy_server
    running = occupy(ports, process, log, betas)
    late = send(ports[0], infer_body(betas[:1], [1], timeout_us=1000))
    assert reply(late) == (503, {"error": "Request timeout expired"})
    assert reply(running)[0] == 200
    assert infer(ports[0], betas[:1], [1])[0] == 200


@pytest.mark.serve
def test_client_that_gives_up_does_not_disturb_the_server(busy_server, betas):
    """A client sends a request behind a busy instance and closes its connection before the answer (it gave up):
    the server goes on, the running request is answered, and later requests are served with the same images.
    Triton's HTTP front end does not cancel a queued request whose client left: it is still computed once (its
    answer dropped), which the queue timeout (--queue-timeout-s) bounds; the test waits for that execution."""
    ports, process, log = busy_server
    reference = infer(ports[0], betas[:1], [9])
    running = occupy(ports, process, log, betas)
    quitter = send(ports[0], infer_body(betas[:1], [9]))
    wait_for("the quitter's request queued", lambda: pending_requests(ports[2]) == 1, process)
    quitter.sock.shutdown(2)  # gives up: no reply read, connection gone
    quitter.close()
    seen = len(executions(log))
    assert reply(running)[0] == 200
    wait_for("the abandoned request's execution", lambda: executions(log)[seen:] == [(1, 1, 1)], process)
    assert process.poll() is None
    status, body = infer(ports[0], betas[:1], [9])
    assert status == 200 and np.array_equal(images(body)["final_image"], images(reference[1])["final_image"])
    assert http(ports[0], "/v2/health/ready")[0] == 200


@pytest.mark.serve
def test_load_failure_is_retried_and_a_restart_serves_the_same(model, betas, tmp_path):
    """The model's first load fails for real inside Triton (BRAINRECON_SERVE_FAIL_LOADS=1: its `initialize`
    raises in attempt 1 only): recon-serve logs the failure with Triton's reason and comes up on attempt 2. Then it
    is stopped and started again on the same model and ports, and serves identical images (same files, same
    seed: exact). Each stop leaves nothing in the private TMPDIR, PyTriton's home or /dev/shm."""
    ports = free_ports(3)
    env = serve_env(tmp_path)
    shm_before = shm_regions()
    log = tmp_path / "first.log"
    process = start_server(model, ports, log, {**env, "BRAINRECON_SERVE_FAIL_LOADS": "1"}, f"--steps={STEPS}")
    try:
        wait_ready(ports[0], "brainrecon", process)
        wait_for("recon-serve's serving line", lambda: "(attempt 2)\n" in log.read_text(), process)
        text = log.read_text()
        assert "Triton could not load model brainrecon (attempt 1 of 3)" in text, text[-3000:]
        assert "model load failure injected (BRAINRECON_SERVE_FAIL_LOADS=1, attempt 1)" in text
        status, first = infer(ports[0], betas[:2], [4, 5])
        assert status == 200, first
    finally:
        stop_session(process)
    assert process.returncode == 0, log.read_text()[-2000:]
    assert [x for x in leftovers(tmp_path) if x not in shm_before] == []

    log = tmp_path / "restart.log"
    process = start_server(model, ports, log, env, f"--steps={STEPS}")
    try:
        wait_ready(ports[0], "brainrecon", process)
        wait_for("recon-serve's serving line", lambda: "(attempt 1)\n" in log.read_text(), process)
        assert "could not load" not in log.read_text()
        status, again = infer(ports[0], betas[:2], [4, 5])
        assert status == 200, again
        for name in ("final_image", "stage1_image"):
            assert np.array_equal(images(again)[name], images(first)[name])
    finally:
        stop_session(process)
    assert process.returncode == 0, log.read_text()[-2000:]
    assert [x for x in leftovers(tmp_path) if x not in shm_before] == []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid} (gone)"


@pytest.mark.serve
def test_shutdown_is_clean_and_quick(model, tmp_path):
    """A second server (dynamic batching off, two instances): SIGTERM ends it and every process it started (Triton,
    the Python-backend stubs) within 10 s; the ports are free again."""
    serve_venv()
    ports = free_ports(3)
    args = (f"--steps={STEPS}", "--no-dynamic-batching", "--instances=2")
    process = start_server(model, ports, tmp_path / "serve.log", serve_env(tmp_path), *args)
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


def test_a_missing_serving_environment_fails_where_it_is_expected(monkeypatch, tmp_path):
    """`make test` sets BRAINRECON_SERVE_VENV: a missing serving environment then FAILS the serving tests (as under
    CI); only with the variable and CI unset is it a skip, whose reason says so."""
    import tests.serve_helpers as helpers

    def outcome() -> tuple[str, str]:
        try:
            helpers.serve_venv()
        except pytest.fail.Exception as e:
            return "failed", str(e)
        except pytest.skip.Exception as e:
            return "skipped", str(e)
        return "found", ""

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("BRAINRECON_SERVE_VENV", str(tmp_path / "no-venv"))
    status, reason = outcome()
    assert status == "failed" and f"serving environment {tmp_path / 'no-venv'} missing" in reason, reason
    monkeypatch.delenv("BRAINRECON_SERVE_VENV")
    monkeypatch.setattr(helpers, "ROOT", tmp_path)  # the default .venv-serve, here absent
    status, reason = outcome()
    assert status == "skipped", reason
    assert "skipped because BRAINRECON_SERVE_VENV and CI are unset" in reason
    monkeypatch.setenv("CI", "true")
    assert outcome()[0] == "failed"


TIMEOUT_REFUSED = "--queue-timeout-s: expected seconds in [0, 1e9) (0: no timeout)"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("max_queue_size", -1, "--max-queue-size: expected requests >= 0 (0: no limit), found -1"),
        ("queue_timeout_s", -0.5, f"{TIMEOUT_REFUSED}, found -0.5"),
        ("queue_timeout_s", float("nan"), f"{TIMEOUT_REFUSED}, found nan"),
        ("queue_timeout_s", float("inf"), f"{TIMEOUT_REFUSED}, found inf"),
    ],
)
def test_queue_options_are_checked(option, value, message, tmp_path):
    """recon-serve's queue options are refused before anything starts, with one line naming expected and found."""
    from brainrecon.errors import InputError
    from brainrecon.serve.triton_server import ServeOptions

    with pytest.raises(InputError) as refused:
        ServeOptions(model_dir=tmp_path, **{option: value})
    assert str(refused.value) == message


@pytest.mark.serve
def test_client_errors_are_one_line_with_the_status(server, betas_file, tmp_path):
    """serve/client.py (tritonclient, in the serving environment) over HTTP and gRPC: a NaN row gives ServeError
    with the runtime's one line and status 400; a valid row its two images."""
    http_port, grpc_port = server[0], server[1]
    code = f"""
import numpy as np
from brainrecon.serve.client import ReconClient, ServeError
betas = np.load({str(betas_file)!r})
bad = betas[0].copy()
bad[5] = np.nan
for url, protocol in (("127.0.0.1:{http_port}", "http"), ("127.0.0.1:{grpc_port}", "grpc")):
    with ReconClient(url, protocol=protocol) as client:
        try:
            client.reconstruct(bad, seed=1)
        except ServeError as e:
            print(protocol, e.status, e)
        final, stage1 = client.reconstruct(betas[0], seed=1)
        print(protocol, final.shape, stage1.shape)
"""
    run = subprocess.run(
        [str(serve_venv() / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    message = "betas: expected finite betas, found 1 NaN/Inf values (first at row 0, voxel 5)"
    assert run.stdout.splitlines() == [
        f"http 400 {message}",
        "http (64, 64, 3) (64, 64, 3)",
        f"grpc StatusCode.INVALID_ARGUMENT {message}",
        "grpc (64, 64, 3) (64, 64, 3)",
    ]
