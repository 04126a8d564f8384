"""The live page of recon-stream (serve/viewer.py): its routes on a real uvicorn server (http.client, no browser),
and end to end in headless Chromium on the tiny subject's simulated run (`browser`)."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from brainrecon.data import layout
from brainrecon.data.nsd import load_design
from brainrecon.errors import InputError
from brainrecon.images import png_name, save_png
from brainrecon.serve.viewer import VIEWER_LOG, LogTail, page_latency, start_viewer
from tests.browser import close_chromium, open_chromium, run_chromium
from tests.fixtures import make_nsd_folder


def _append(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, text.encode())
    os.close(fd)


def _line(event: str, **fields) -> str:
    return json.dumps({"event": event, "time": time.time(), **fields}) + "\n"


def _request(url: str, path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _sse(url: str, n: int, last_id: str | None = None, quiet_s: float = 0.5) -> list[tuple[int, dict]]:
    """The first n messages of /events (id, data), then whatever else comes before quiet_s of silence."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/events", headers={"Last-Event-ID": last_id} if last_id else {})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    messages: list[tuple[int, dict]] = []
    fields: dict[str, str] = {}
    try:
        while True:
            if len(messages) >= n:
                conn.sock.settimeout(quiet_s)
            line = response.readline().decode().rstrip("\n")
            if line:
                key, _, value = line.partition(": ")
                fields[key] = value
            elif "data" in fields:
                messages.append((int(fields["id"]), json.loads(fields["data"])))
                fields = {}
    except TimeoutError:
        assert len(messages) >= n, messages
    finally:
        conn.close()
    return messages


def test_log_tail_holds_back_a_partial_line(tmp_path):
    path = tmp_path / "stream.jsonl"
    tail = LogTail(path)
    assert tail.read() == []  # no file yet
    _append(path, _line("start", trials=2) + '{"event": "vol')
    assert [(n, e["event"]) for n, e in tail.read()] == [(1, "start")]
    assert tail.read() == []
    _append(path, 'ume", "volume": 0}\n')
    assert tail.read() == [(2, {"event": "volume", "volume": 0})]
    assert [n for n, _ in LogTail(path, skip=1).read()] == [2]


def test_events_once_in_order_then_resumed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    log = out / "stream.jsonl"
    _append(log, _line("start", trials=2) + _line("volume", volume=0))
    _append(log, _line("trial_estimated", trial=0, ten_k_id=3, ready=time.time()))
    with start_viewer(out) as viewer:
        first = _sse(viewer.url, 2)
        assert [(n, e["event"]) for n, e in first] == [
            (1, "start"),
            (3, "trial_estimated"),
        ]  # volumes not sent
        # a line written while the page listens arrives; a partial one waits for its newline
        _append(log, _line("stage1_written", trial=0, ten_k_id=3, file="stage1_00000.png") + '{"event": "fin')
        assert [n for n, _ in _sse(viewer.url, 3)] == [1, 3, 4]
        _append(log, 'al_written", "trial": 0, "ten_k_id": 3, "file": "final_00000.png"}\n')
        # a reconnecting EventSource (Last-Event-ID) gets only what follows
        assert [(n, e["event"]) for n, e in _sse(viewer.url, 2, last_id="3")] == [
            (4, "stage1_written"),
            (5, "final_written"),
        ]
        assert _sse(viewer.url, 0, last_id="5") == []
    assert not viewer.thread.is_alive()  # stopped while no stream was open


def test_stop_ends_an_open_event_stream(tmp_path):
    viewer = start_viewer(tmp_path / "not-yet")  # recon-stream makes OUT after the viewer starts
    port = int(viewer.url.rstrip("/").rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/events")
    response = conn.getresponse()
    deadline = time.monotonic() + 10
    while not viewer.pages[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert viewer.pages[0] == 1
    viewer.stop()
    assert not viewer.thread.is_alive()
    assert response.read() == b"retry: 500\n\n"  # the stream ended cleanly (a complete chunked body)
    conn.close()


def test_images_only_the_streams_pngs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    save_png(out / png_name("stage1", 0), image)
    (out / "summary.json").write_text("{}")
    with start_viewer(out) as viewer:
        status, body = _request(viewer.url, "/image/stage1_00000.png")
        assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(body))), image)
        for path in (
            "/image/../summary.json",
            "/image/..%2Fsummary.json",
            "/image/%2E%2E/summary.json",
            "/image/summary.json",
            "/image/stage1_00001.png",  # the pattern, not on disk
            "/image/stage1_0.png",
            "/truth/1",  # no NSD root given
        ):
            assert _request(viewer.url, path)[0] == 404, path


@pytest.mark.parametrize("subject", [1, 2])
def test_truth_is_the_subjects_stimulus(tmp_path, subject):
    root = make_nsd_folder(tmp_path / "nsd").root
    subjectim = load_design(root, subject).subjectim  # (8, images) 1-based stimulus ids
    with h5py.File(layout.stimuli_path(root), "r") as f:
        brick = f["imgBrick"][:]
    with start_viewer(tmp_path / "out", nsd_root=root, subject=subject) as viewer:
        for ten_k_id in range(1, subjectim.shape[1] + 1):
            status, body = _request(viewer.url, f"/truth/{ten_k_id}")
            assert status == 200
            expected = brick[subjectim[subject - 1, ten_k_id - 1] - 1]
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(body))), expected), ten_k_id
        for path in ("/truth/0", f"/truth/{subjectim.shape[1] + 1}", "/truth/x"):
            assert _request(viewer.url, path)[0] == 404, path


def test_shown_reports(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ready = time.time() - 1.5
    _append(out / "stream.jsonl", _line("trial_estimated", trial=4, ten_k_id=9, ready=ready))
    with start_viewer(out) as viewer:
        for body in (
            b"not json",
            b"[1, 2]",
            b'{"trial": 4, "kind": "final"}',
            b'{"trial": "4", "kind": "final", "shown": 1}',
            b'{"trial": true, "kind": "final", "shown": 1}',
            b'{"trial": -1, "kind": "final", "shown": 1}',
            b'{"trial": 4, "kind": "truth", "shown": 1}',
            b'{"trial": 4, "kind": "final", "shown": NaN}',
            b'{"trial": 4, "kind": "final", "shown": "now"}',
        ):
            status, message = _request(viewer.url, "/shown", "POST", body)
            assert status == 400 and message.decode().count("\n") == 1, (body, message)
            assert message.startswith(b"POST /shown: expected JSON")
        assert not (out / VIEWER_LOG).exists()
        assert _request(viewer.url, "/shown", "POST", json.dumps({"trial": 4, "kind": "final", "shown": ready + 0.25}).encode())[0] == 200  # fmt: skip
        assert _request(viewer.url, "/shown", "POST", json.dumps({"trial": 5, "kind": "stage1", "shown": ready}).encode())[0] == 200  # fmt: skip
    lines = [json.loads(line) for line in (out / VIEWER_LOG).read_text().splitlines()]
    assert lines[0] == {"trial": 4, "kind": "final", "shown": ready + 0.25, "ready": ready, "latency_s": 0.25}
    assert lines[1]["latency_s"] is None  # no trial_estimated for trial 5


def test_page_latency_counts_each_images_first_report(tmp_path):
    rows = [(0, "stage1", 0.1), (0, "final", 0.5), (1, "stage1", 0.3), (1, "final", 0.7), (0, "final", 9.0)]
    rows += [(2, "stage1", None)]
    text = "".join(json.dumps({"trial": t, "kind": k, "latency_s": v}) + "\n" for t, k, v in rows)
    (tmp_path / VIEWER_LOG).write_text(text)
    found = page_latency(tmp_path)
    assert found["stage1"] == {"n": 2, "p50_s": 0.2, "p95_s": 0.29, "mean_s": 0.2}
    assert found["final"] == {"n": 2, "p50_s": 0.6, "p95_s": 0.69, "mean_s": 0.6}
    assert page_latency(tmp_path / "none")["final"]["n"] == 0


def test_binds_loopback_only_and_a_busy_port_is_one_line(tmp_path, capsys, monkeypatch):
    with start_viewer(tmp_path) as viewer:
        assert viewer.url.startswith("http://127.0.0.1:")
        (sock,) = viewer.server.servers[0].sockets
        host, port = sock.getsockname()[:2]
        assert host == "127.0.0.1" and sock.family == socket.AF_INET
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/", headers={"Host": "rebound.example"})  # DNS rebinding: another site's name
        assert conn.getresponse().status == 400
        conn.close()
        with pytest.raises(InputError, match=f"--port {port}: expected a free port on 127.0.0.1, found"):
            start_viewer(tmp_path, port=port)
        from brainrecon.cli.serve import view_main

        for args, message in (
            ([str(tmp_path / "missing")], "missing recon-stream output folder"),
            ([str(tmp_path), "--port", str(port)], "expected a free port on 127.0.0.1"),
        ):
            monkeypatch.setattr(sys, "argv", ["recon-view", *args])
            with pytest.raises(SystemExit) as exit:
                view_main()
            assert exit.value.code == 1
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------ end to end, browser

SPEED = 8  # the run's 181 volumes in 30 s: a trial every 0.5 s, each done in tens of ms (tiny model)
STEPS = 4  # stage 2 as tests/test_stream.py
FINAL_BOUND_S = 10.0  # see test_live_page_shows_every_trial_in_order


@pytest.fixture(scope="module")
def subject(tmp_path_factory, tiny2):
    from brainrecon.data.sim import SimConfig, simulate_subject
    from brainrecon.data.timeseries import TimeseriesConfig
    from brainrecon.serve.stream import calibrate

    root = tmp_path_factory.mktemp("viewer") / "sim"
    simulate_subject(root, SimConfig.preset("tiny"), seed=0, timeseries=TimeseriesConfig(), progress=False)
    cal = root.parent / "calibration.npz"
    calibrate(
        layout.timeseries_path(root, 1, 1, 1), layout.run_design_path(root, 1, 1, 1), tiny2["model"], cal
    )
    return {"root": root, "model": tiny2["model"], "calibration": cal}


def test_stream_view_serves_during_and_after_the_run(subject, tmp_path):
    """recon-stream --view: the page's URL on stderr, served while the run goes and --view-hold seconds after it,
    then the port is free again; with no page open, summary.json's page_latency counts no image."""
    from typer.testing import CliRunner

    from brainrecon.cli.serve import stream_app

    root, out = subject["root"], tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        "--model-dir", str(subject["model"]), "--design", str(layout.run_design_path(root, 1, 3, 1)),
        "--replay", str(layout.timeseries_path(root, 1, 3, 1)), "--calibration", str(subject["calibration"]),
        "--out", str(out), "--speed", "0", "--stage", "1", "--view", "--port", str(port), "--view-hold", "2",
    ]  # fmt: skip
    results = []
    thread = threading.Thread(target=lambda: results.append(CliRunner().invoke(stream_app, args)))
    thread.start()
    url, status, deadline = f"http://127.0.0.1:{port}/", None, time.monotonic() + 60
    while status != 200 and time.monotonic() < deadline:
        try:
            status, page = _request(url, "/")
        except ConnectionRefusedError:
            time.sleep(0.05)
    thread.join(120)
    assert not thread.is_alive() and status == 200 and b"recon-stream live" in page
    (result,) = results
    assert result.exit_code == 0, result.output
    assert f"live page at {url}" in result.output and f"serving {url} for 2 s" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["page_latency"]["stage1"]["n"] == 0
    start_viewer(out, port=port).stop()  # the port was given back


class _Rows(HTMLParser):
    """The page's trial rows: data-* of each <tr> and the src of the <img> in each cell, by the cell's class."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-trial" in a:
            self.rows.append({"trial": int(a["data-trial"]), "ten_k_id": int(a["data-ten-k-id"])})
        elif tag == "td" and self.rows:
            self._cell = a.get("class")
        elif tag == "img" and self._cell:
            self.rows[-1][self._cell] = a["src"]


@pytest.mark.browser
def test_live_page_shows_every_trial_in_order(subject, tmp_path):
    """Session 2 run 1 of the tiny subject replayed at SPEED x real time (about 30 s) into a viewer whose page is
    open in headless Chromium; then, from viewer.jsonl (the page's own reports, each sent after the image was
    decoded and painted): every trial's stage-1 and final image was shown, stage 1 before final, trials in order,
    and every final image on the page within FINAL_BOUND_S = 10 s of the trial's ready (the arrival of the volume
    completing its window). The bound is generous for a loaded CI machine; the measured latency is in
    docs/real-time.md ("Live viewer"). Then a --dump-dom of the page shows one row per trial with its ground
    truth, stage-1 and final images in order."""
    from brainrecon.serve.stream import run_stream

    root = subject["root"]
    design = layout.run_design_path(root, 1, 2, 1)
    rows = np.loadtxt(design, dtype=np.int64)
    ten_k_ids = rows[rows > 0].tolist()
    trials = len(ten_k_ids)
    out = tmp_path / "out"
    with start_viewer(out, nsd_root=root, subject=1) as viewer:
        chrome = open_chromium([viewer.url], tmp_path / "profile")
        try:
            deadline = time.monotonic() + 60
            while not viewer.pages[0]:  # the page is open and listening before the first volume
                assert chrome.poll() is None and time.monotonic() < deadline, "the page did not connect"
                time.sleep(0.05)
            summary = run_stream(
                subject["model"], design, out, replay_path=layout.timeseries_path(root, 1, 2, 1),
                calibration_path=subject["calibration"], speed=SPEED, sampling_overrides={"num_inference_steps": STEPS},
            )  # fmt: skip
            page = viewer.settle(timeout=30)
        finally:
            close_chromium(chrome)
        assert summary["trials_done_now"] == trials and not summary["faults"]
        reports = [json.loads(line) for line in (out / VIEWER_LOG).read_text().splitlines()]
        shown = {(r["trial"], r["kind"]): r for r in reports}
        assert len(reports) == len(shown) == 2 * trials  # each image reported once
        assert set(shown) == {(t, k) for t in range(trials) for k in ("stage1", "final")}
        assert [(r["trial"], r["kind"]) for r in reports] == [
            (t, k) for t in range(trials) for k in ("stage1", "final")
        ]
        assert all(a["shown"] <= b["shown"] for a, b in zip(reports, reports[1:], strict=False))
        final = [shown[t, "final"]["latency_s"] for t in range(trials)]
        assert all(0 < v <= FINAL_BOUND_S for v in final), final
        assert json.loads((out / "summary.json").read_text())["page_latency"] == page
        assert page["stage1"]["n"] == page["final"]["n"] == trials
        print(
            f"\npage latency ({trials} trials, speed {SPEED}): stage 1 {page['stage1']}, final {page['final']}"
        )

        viewer.close_streams()  # the dump's page gets the whole log, then its stream ends: virtual time runs out
        res = run_chromium(["--dump-dom", viewer.url], tmp_path / "profile-dump", timeout=120)
        assert res.returncode == 0 and "<tbody" in res.stdout, res.stderr[-2000:]
    parser = _Rows()
    parser.feed(res.stdout)
    assert parser.rows == [
        {
            "trial": t,
            "ten_k_id": ten_k_ids[t],
            "truth": f"/truth/{ten_k_ids[t]}",  # placed only once it has loaded and decoded
            "stage1": f"/image/{png_name('stage1', t)}",
            "final": f"/image/{png_name('final', t)}",
        }
        for t in range(trials)
    ]
