"""`recon-view` and `recon-stream --view`: a local web page that shows a stream's images as they are written.

    OUT/stream.jsonl --tail every 50 ms--> GET /events (server-sent events, id = line number) --> the page
    OUT/stage1_TTTTT.png, final_TTTTT.png --> GET /image/{name};  NSD stimuli HDF5 --> GET /truth/{ten_k_id}
    the page --POST /shown {trial, kind, shown}--> OUT/viewer.jsonl (latency_s = shown - the trial's ready)

Starlette served by uvicorn in a background thread (`start_viewer`), bound to 127.0.0.1 only. The page puts each
image in place once it has loaded and decoded (img.decode()), one at a time in the log's order, and reports it
after the next frame (requestAnimationFrame, then a task): `shown` is the browser's wall clock, the same machine's
clock as the stream's `ready`. It reports only images written while it was open (not a log's backlog), so
`page_latency` measures ready -> on screen for a page that was watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.choices import IMAGE_KINDS
from brainrecon.errors import BrainReconError, InputError, MissingFileError
from brainrecon.io import read_json, write_json
from brainrecon.serve.stream import LOG, SUMMARY, latency_stats

VIEWER_LOG = "viewer.jsonl"
IMAGE = re.compile(r"(stage1|final)_\d{5}\.png")  # brainrecon.images.png_name
POLL_S = 0.05
HOSTS = ["127.0.0.1", "localhost"]


class LogTail:
    """The complete lines of a growing JSONL file after line `skip`, as (line number from 1, object); a last line
    without its newline waits for the next read."""

    def __init__(self, path: Path, skip: int = 0):
        self.path, self.skip, self.offset, self.line = path, skip, 0, 0

    def read(self) -> list[tuple[int, dict[str, Any]]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:  # the stream has not started yet
            return []
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(whole)
        found = []
        for raw in whole.splitlines():
            self.line += 1
            if self.line > self.skip:
                found.append((self.line, json.loads(raw)))
        return found


def page_latency(out: str | Path) -> dict[str, Any]:
    """p50/p95/mean/n of the page latency of stage-1 and final images from OUT/viewer.jsonl: each image's first
    report (a reloaded page reports again)."""
    first: dict[tuple[int, str], float] = {}
    for _, r in LogTail(Path(out) / VIEWER_LOG).read():
        if r["latency_s"] is not None:
            first.setdefault((r["trial"], r["kind"]), r["latency_s"])
    return {
        "from": "the trial's ready (stream.jsonl) to the image decoded and painted on the page (its report)",
        **{kind: latency_stats([v for (_, k), v in first.items() if k == kind]) for kind in IMAGE_KINDS},
    }


class Stimuli:
    """Ground truth: 10k id (1-based) -> NSD stimulus subjectim[subject-1, id-1] - 1 of the stimuli HDF5, as PNG."""

    def __init__(self, root: Path, subject: int):
        from brainrecon.data import layout
        from brainrecon.data.nsd import load_design, stimuli_side

        self.ids = load_design(root, subject).subjectim[subject - 1]  # (10k,) 1-based stimulus ids
        self.path = layout.stimuli_path(root)
        if not self.path.is_file():
            raise MissingFileError(self.path, "NSD stimuli (nsd_stimuli.hdf5)")
        self.side = stimuli_side(self.path)  # the file checked once, up front

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one Stimuli per viewer, alive as long as it)
    def png(self, ten_k_id: int) -> bytes | None:
        from PIL import Image

        from brainrecon.data.nsd import read_images

        if not 1 <= ten_k_id <= len(self.ids):
            return None
        image = np.zeros((1, self.side, self.side, 3), dtype=np.uint8)
        read_images(self.path, np.array([self.ids[ten_k_id - 1] - 1]), None, image)
        buffer = io.BytesIO()
        Image.fromarray(image[0]).save(buffer, format="PNG")
        return buffer.getvalue()


def _append(path: Path, record: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())  # one write: lines never interleave
    finally:
        os.close(fd)


def build_app(out: Path, stimuli: Stimuli | None, stopping: threading.Event, pages: list[int]):
    """The Starlette app over OUT; `stopping` ends the event streams; pages[0] counts the open ones."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    ready: dict[int, float] = {}  # trial -> its ready time (trial_estimated)
    log = LogTail(out / LOG)

    async def index(request: Request) -> Response:
        page = PAGE.replace("TRUTH", "1" if stimuli else "0").replace("FOLDER", html.escape(out.name))
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        last = request.headers.get("last-event-id", "0")
        tail = LogTail(out / LOG, int(last) if last.isdigit() else 0)

        async def stream():
            pages[0] += 1
            try:
                yield "retry: 500\n\n"
                while True:
                    for line, event in tail.read():
                        if event["event"] != "volume":  # the page needs trials and faults, not every volume
                            yield f"id: {line}\ndata: {json.dumps(event)}\n\n"
                    if stopping.is_set():  # what is there is sent, then the stream ends
                        return
                    await asyncio.sleep(POLL_S)
            finally:
                pages[0] -= 1

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    async def image(request: Request) -> Response:
        name = request.path_params["name"]
        if not IMAGE.fullmatch(name) or not (out / name).is_file():
            return PlainTextResponse(
                f"/image/{name}: expected a stream image (stage1|final)_TTTTT.png in OUT\n", 404
            )
        return FileResponse(out / name, media_type="image/png")

    def truth(request: Request) -> Response:  # sync: starlette runs it in a thread (an HDF5 read)
        ten_k_id = request.path_params["ten_k_id"]
        png = stimuli.png(ten_k_id) if stimuli else None
        if png is None:
            return PlainTextResponse(
                f"/truth/{ten_k_id}: expected a 10k id with --nsd-root, found none\n", 404
            )
        return Response(png, media_type="image/png")

    async def shown(request: Request) -> Response:
        body = await request.body()
        try:
            report = json.loads(body)
            trial, kind, when = report["trial"], report["kind"], report["shown"]
            valid = type(trial) is int and trial >= 0 and kind in IMAGE_KINDS
            valid = valid and type(when) in (int, float) and math.isfinite(when)
        except (ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            return PlainTextResponse(
                'POST /shown: expected JSON {"trial": int >= 0, "kind": "stage1"|"final", "shown": epoch seconds}, '
                f"found {body[:80]!r}\n",
                400,
            )
        ready.update(
            (e["trial"], e["ready"])
            for _, e in log.read()
            if e["event"] == "trial_estimated" and "ready" in e
        )
        at = ready.get(trial)
        latency = None if at is None else round(when - at, 6)
        _append(
            out / VIEWER_LOG, {"trial": trial, "kind": kind, "shown": when, "ready": at, "latency_s": latency}
        )
        return PlainTextResponse("ok\n")

    routes = [
        Route("/", index),
        Route("/events", events),
        Route("/image/{name}", image),
        Route("/truth/{ten_k_id:int}", truth),
        Route("/shown", shown, methods=["POST"]),
    ]
    # a page of another site that a DNS name points at 127.0.0.1 (DNS rebinding) is refused by its Host header
    return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=HOSTS)])


CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def headless_chromium(args: list[str], profile: Path) -> list[str]:
    """The command line of a headless Chromium from PATH (`make browser` installs one) with its own profile folder:
    how the tests and benchmarks/stream.py open the page."""
    exe = next((path for path in map(shutil.which, CHROMIUM) if path), None)
    if exe is None:
        raise InputError("chromium", f"one of {', '.join(CHROMIUM)} on PATH (make browser)", "none")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    return [exe, *flags, "--no-default-browser-check", f"--user-data-dir={profile}", *args]


def open_chromium(args: list[str], profile: Path, output: int = subprocess.PIPE) -> subprocess.Popen:
    """A headless Chromium left running (e.g. on a live page's URL) in its own process group; close it with
    `close_chromium`. `output`: where its stdout and stderr go (DEVNULL for a long run: a full pipe stalls it)."""
    return subprocess.Popen(
        headless_chromium(args, profile), stdout=output, stderr=output, text=True, start_new_session=True
    )


def close_chromium(proc: subprocess.Popen) -> None:
    """Kill the whole group `open_chromium` started: its renderer and GPU processes outlive a killed parent."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


@dataclass
class Viewer:
    """A running viewer: its URL, and how to wait for the page and stop it."""

    url: str
    out: Path
    server: Any  # uvicorn.Server
    thread: threading.Thread
    stopping: threading.Event
    pages: list[int]

    def settle(self, timeout: float = 5.0) -> dict[str, Any]:
        """While a page is open, wait (at most `timeout`) until it has shown the stream's last written image (it
        shows them in order), then add `page_latency` to OUT/summary.json; returns it."""
        written = [
            e for _, e in LogTail(self.out / LOG).read() if e["event"] in ("stage1_written", "final_written")
        ]
        deadline = time.monotonic() + timeout
        while written and self.pages[0] and time.monotonic() < deadline:
            last = (written[-1]["trial"], written[-1]["event"].removesuffix("_written"))
            if last in {(r["trial"], r["kind"]) for _, r in LogTail(self.out / VIEWER_LOG).read()}:
                break
            time.sleep(POLL_S)
        latency = page_latency(self.out)
        if (self.out / SUMMARY).is_file():
            write_json(
                self.out / SUMMARY,
                {**read_json(self.out / SUMMARY, "recon-stream summary"), "page_latency": latency},
            )
        return latency

    def hold(self, seconds: float | None = None) -> None:
        """Serve until Ctrl-C (or `seconds`), then stop."""
        try:
            self.thread.join(seconds)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def close_streams(self) -> None:
        """End every event stream once it has sent what is in the log (a page that reconnects gets what is new,
        then its stream ends again): uvicorn's shutdown waits for open streams, and a --dump-dom of the page
        waits for every pending request."""
        self.stopping.set()

    def stop(self) -> None:
        self.close_streams()
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> Viewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_viewer(
    out: str | Path, nsd_root: str | Path | None = None, subject: int = 1, port: int = 0
) -> Viewer:
    """Serve the viewer of OUT (which may not exist yet: recon-stream makes it) on 127.0.0.1:`port` (0: a free
    one) in a background thread; returns once it accepts connections."""
    import uvicorn

    out = Path(out)
    stimuli = Stimuli(Path(nsd_root), subject) if nsd_root is not None else None
    stopping, pages = threading.Event(), [0]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is reusable
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        raise InputError(f"--port {port}", "a free port on 127.0.0.1", f"{e.strerror or e}") from None
    config = uvicorn.Config(
        build_app(out, stimuli, stopping, pages), log_level="warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=2,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="recon-view", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise BrainReconError(
                f"recon-view: expected the server on port {port} to start in 10 s, found not"
            )
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    return Viewer(url, out, server, thread, stopping, pages)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>recon-stream live: FOLDER</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; }
header { position: sticky; top: 0; background: #f4f4f4; border-bottom: 1px solid #ccc; padding: 8px 16px; }
h1 { font-size: 18px; margin: 0 16px 0 0; display: inline; }
.wrap { display: flex; gap: 16px; padding: 8px 16px; align-items: flex-start; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }
td img { width: 128px; height: 128px; image-rendering: pixelated; display: block; }
td.truth, td.stage1, td.final { width: 128px; height: 128px; color: #888; }
tr.failed { color: #b00; } tr.before { color: #777; }
aside { min-width: 280px; max-width: 420px; } aside li { color: #b00; margin-bottom: 4px; }
</style></head>
<body data-truth="TRUTH">
<header><h1>recon-stream live: FOLDER</h1><span id="progress">waiting for the stream</span>
<span id="connection"></span></header>
<div class="wrap">
<table id="trials"><thead><tr><th>trial</th><th>10k id</th><th>ground truth</th><th>stage 1</th><th>final</th>
<th>ready &rarr; on the page</th></tr></thead><tbody></tbody></table>
<aside><h2>Faults</h2><ul id="faults"></ul></aside>
</div>
<script>
"use strict";
const truth = document.body.dataset.truth === "1";
const opened = Date.now() / 1000;  // images written before the page opened are shown, not reported
const tbody = document.querySelector("#trials tbody");
const rows = new Map();  // trial -> {tr, cells, ready, latency}
const done = {stage1: new Set(), final: new Set(), failed: new Set()};
let inRun = "?", ended = false, faults = 0;
let queue = Promise.resolve();  // images go on the page one at a time, in the log's order

function progress() {
  document.getElementById("progress").textContent = `on the page: stage 1 ${done.stage1.size}, final ` +
    `${done.final.size} of ${inRun} trials in the run · failed ${done.failed.size} · faults ${faults}` +
    (ended ? " · run ended" : "");
}

function row(trial, tenK) {
  if (rows.has(trial)) return rows.get(trial);
  const tr = document.createElement("tr");
  tr.dataset.trial = trial;
  tr.dataset.tenKId = tenK;
  const cells = {};
  for (const name of ["trial", "id", "truth", "stage1", "final", "latency"]) {
    cells[name] = tr.insertCell();
    cells[name].className = name;
  }
  cells.trial.textContent = trial;
  cells.id.textContent = tenK;
  const after = [...tbody.rows].find(other => Number(other.dataset.trial) > trial);
  tbody.insertBefore(tr, after || null);
  const r = {trial, tr, cells, ready: null, latency: {}};
  rows.set(trial, r);
  if (truth) place(r, "truth", `/truth/${tenK}`);
  return r;
}

function place(r, kind, src) {  // resolves true once the image is decoded and in its cell
  const img = new Image();
  img.alt = `${kind} ${r.trial}`;
  img.src = src;
  return img.decode().then(() => { r.cells[kind].replaceChildren(img); return true; },
                           () => { r.cells[kind].textContent = "not available"; return false; });
}

function painted() {  // after the next frame: the image is on screen
  return new Promise(resolve => requestAnimationFrame(() => setTimeout(resolve, 0)));
}

function show(r, kind, e, report) {  // report: written while this page was open
  const step = async () => {
    if (!(await place(r, kind, `/image/${e.file}`))) return;
    if (report) await painted();
    const shown = Date.now() / 1000;
    done[kind].add(r.trial);
    progress();
    const label = kind === "final" ? "final" : "stage 1";
    if (report && r.ready !== null) r.latency[kind] = `${label} ${(shown - r.ready).toFixed(2)} s`;
    else if (e.latency_s !== undefined) r.latency[kind] = `${label} ${e.latency_s.toFixed(2)} s on disk`;
    if (Object.keys(r.latency).length) r.cells.latency.textContent =
      ["stage1", "final"].filter((k) => k in r.latency).map((k) => r.latency[k]).join(" · ");
    if (report) await fetch("/shown", {method: "POST", headers: {"Content-Type": "application/json"},
                                       body: JSON.stringify({trial: r.trial, kind, shown})});
  };
  if (report) queue = queue.then(step);
  else step();  // a backlog (the page opened late) is placed at once, in any order
}

function handle(e) {
  if (e.fault) {
    faults += e.event !== "trial_failed";
    const li = document.createElement("li");
    li.textContent = `${e.event}: ${e.fault}`;
    document.getElementById("faults").append(li);
  }
  if (e.event === "start") { inRun = e.trials; ended = false; }
  else if (e.event === "end") ended = true;
  else if (e.event === "trial_estimated") row(e.trial, e.ten_k_id).ready = e.ready;
  else if (e.event === "stage1_written" || e.event === "final_written") {
    show(row(e.trial, e.ten_k_id), e.event.replace("_written", ""), e, e.time >= opened);
  } else if (e.event === "trial_failed") {
    done.failed.add(e.trial);
    const r = row(e.trial, e.ten_k_id);
    r.tr.className = "failed";
    r.cells.stage1.textContent = r.cells.final.textContent = "failed";
  } else if (e.event === "trial_skipped") {  // done by an earlier run of the same command
    const r = row(e.trial, e.ten_k_id);
    r.tr.className = "before";
    r.cells.latency.textContent = "done before";
    const number = String(e.trial).padStart(5, "0");
    for (const kind of ["stage1", "final"]) show(r, kind, {file: `${kind}_${number}.png`}, false);
  }
  progress();
}

const source = new EventSource("/events");
source.onmessage = m => handle(JSON.parse(m.data));
source.onopen = () => { document.getElementById("connection").textContent = " · live"; };
source.onerror = () => { document.getElementById("connection").textContent = " · reconnecting"; };
</script>
</body></html>
"""
