"""recon-batch (serve/ray_batch.py) on a real Ray cluster: one head started per module by `ray start --head
--num-cpus 2` in the serving environment (loopback only, token auth disabled), joined with `--address`.

Inputs: the tiny subject's 10 test trials split into two "sessions" (6 + 4 rows). Checked:
- every trial's PNGs equal the runtime API's with seed `--seed + i` and no re-normalisation (tolerance: max |diff|
  <= 1 grey level, measured 0), i.e. recon-infer of that single trial with that seed; summaries; a rerun skips all;
- a worker killed (SIGKILL, from this test, by the process id it journals) in the middle of a shard: with retries the
  run ends with every trial written exactly once (writes.log) and the killed shard redone by another process;
  without retries the run exits 1 and each summary lists exactly the trials with no PNG; nothing is half-written;
  a rerun completes only what was missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serve_helpers import (
    STEPS,
    exported_tiny_model,
    free_ports,
    serve_venv,
    session_pids,
    tiny_betas_file,
)

SEED = 100
LOOPBACK_RAY = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return exported_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory) -> dict[str, np.ndarray]:
    betas = np.load(tiny_betas_file(tmp_path_factory))
    root = tmp_path_factory.mktemp("betas")
    files = {"sess01": betas[:6], "sess02": betas[6:]}
    for name, rows in files.items():
        np.save(root / f"{name}.npy", rows)
    return {str(root / f"{name}.npy"): rows for name, rows in files.items()}


@pytest.fixture(scope="module")
def ray_address():
    """`ray start --head` once for the module (its temp dir private, so no other ray.init on the machine joins it);
    every process of its session is killed, by id, at the end."""
    venv = serve_venv()
    port = free_ports(1)[0]
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, **LOOPBACK_RAY}
    command = [
        str(venv / "bin" / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    starter = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output = starter.communicate(timeout=120)[0].decode()
    try:
        assert starter.returncode == 0, output[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        for pid in session_pids(starter.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def batch_command(sessions, model, out, address, *extra: str) -> list[str]:
    return [
        str(serve_venv() / "bin" / "recon-batch"),
        *sessions,
        f"--model-dir={model}",
        f"--out={out}",
        f"--address={address}",
        "--actors=2",
        f"--seed={SEED}",
        *extra,
    ]


def run_batch(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, **LOOPBACK_RAY}
    return subprocess.run(
        batch_command(*args, **kwargs), env=env, capture_output=True, text=True, timeout=300
    )


def journal(out: Path) -> list[tuple[int, str]]:
    lines = []
    for log in sorted(out.glob("*/writes.log")):
        for line in log.read_text().splitlines():
            pid, rest = line.split(" ", 1)
            lines.append((int(pid), f"{log.parent.name} {rest}"))
    return lines


def wrote_counts(out: Path) -> Counter:
    return Counter(what.replace(" wrote ", ":") for _, what in journal(out) if " wrote " in what)


def all_trials(sessions) -> set[str]:
    return {f"{Path(path).stem}:{i}" for path, rows in sessions.items() for i in range(len(rows))}


def expected_images(model: Path, rows: np.ndarray, steps: int | None) -> tuple[np.ndarray, np.ndarray]:
    from brainrecon.runtime import Reconstructor, RuntimeOptions

    with Reconstructor.open(model, RuntimeOptions(threads=1)) as rec:
        sampling = (
            rec.sampling if steps is None else dataclasses.replace(rec.sampling, num_inference_steps=steps)
        )
        out = rec.reconstruct(rows, sampling=sampling, seeds=SEED + np.arange(len(rows)), renormalize=False)
    return out.images, out.stage1_images


def no_half_written(out: Path) -> None:
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    for png in out.rglob("*.png"):
        with Image.open(png) as image:
            image.verify()


def test_batch_writes_every_trial_and_a_rerun_skips(sessions, model, ray_address, tmp_path):
    out = tmp_path / "out"
    run = run_batch(sessions, model, out, ray_address, "--shard-size=2", f"--steps={STEPS}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for path, rows in sessions.items():
        folder = out / Path(path).stem
        summary = json.loads((folder / "summary.json").read_text())
        assert (summary["trials"], summary["written"], summary["missing"]) == (len(rows), len(rows), [])
        assert summary["shards"] == (len(rows) + 1) // 2
        final, stage1 = expected_images(model, rows, STEPS)
        for i in range(len(rows)):
            got = np.asarray(Image.open(folder / f"final_{i:05d}.png")).astype(int)
            assert np.abs(got - final[i]).max() <= 1
            got = np.asarray(Image.open(folder / f"stage1_{i:05d}.png")).astype(int)
            assert np.abs(got - stage1[i]).max() <= 1
    counts = wrote_counts(out)
    assert set(counts) == all_trials(sessions) and set(counts.values()) == {1}
    assert len({pid for pid, _ in journal(out)}) == 2  # two actors, one runtime each
    no_half_written(out)
    # recon-infer itself, on one trial of the second file with the seed recon-batch gave it
    sess02 = next(path for path in sessions if path.endswith("sess02.npy"))
    infer = subprocess.run(
        [
            str(Path(sys.executable).parent / "recon-infer"),
            sess02,
            f"--model-dir={model}",
            f"--out={tmp_path / 'infer'}",
            "--trials=2",
            f"--seed={SEED + 2}",
            f"--steps={STEPS}",
        ],
        capture_output=True,
        text=True,
    )
    assert infer.returncode == 0, infer.stderr[-2000:]
    for kind in ("final", "stage1"):
        by_infer = np.asarray(Image.open(tmp_path / "infer" / f"{kind}_00002.png")).astype(int)
        by_batch = np.asarray(Image.open(out / "sess02" / f"{kind}_00002.png")).astype(int)
        assert np.abs(by_infer - by_batch).max() <= 1

    before = journal(out)
    t0 = time.monotonic()
    rerun = run_batch(sessions, model, out, ray_address, "--shard-size=2", f"--steps={STEPS}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert journal(out) == before  # nothing recomputed, nothing rewritten
    assert json.loads((out / "sess01" / "summary.json").read_text())["shards_done_before"] == 3
    assert time.monotonic() - t0 < 30


def kill_first_busy_worker(process: subprocess.Popen, out: Path, timeout_s: float = 120.0) -> tuple[int, str]:
    """SIGKILL the first actor that journals the start of a shard with work to do; returns (pid, "sessNN a-b")."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        for pid, what in journal(out):
            found = re.fullmatch(r"(\S+) start (\d+-\d+) todo ([1-9]\d*)", what)
            if found:
                os.kill(pid, signal.SIGKILL)
                return pid, f"{found.group(1)} {found.group(2)}"
        time.sleep(0.01)
    pytest.fail("no shard started")


def trials_of(shard: str) -> set[str]:
    name, span = shard.split()
    start, stop = map(int, span.split("-"))
    return {f"{name}:{i}" for i in range(start, stop)}


def test_killed_worker_is_replaced_and_every_trial_written_once(sessions, model, ray_address, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, **LOOPBACK_RAY}
    # the fitted schedule (37 UNet steps): a 3-trial shard takes long enough to be killed in the middle
    command = batch_command(sessions, model, out, ray_address, "--shard-size=3", "--retries=3")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, shard = kill_first_busy_worker(process, out)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    lines = journal(out)
    killed_wrote = {w.replace(" wrote ", ":") for pid, w in lines if pid == killed and " wrote " in w}
    assert not killed_wrote & trials_of(shard)  # killed before it wrote any trial of that shard
    counts = wrote_counts(out)
    assert set(counts) == all_trials(sessions) and set(counts.values()) == {1}
    redo = {pid for pid, w in lines if " wrote " in w and w.replace(" wrote ", ":") in trials_of(shard)}
    assert redo and killed not in redo
    no_half_written(out)
    final, _ = expected_images(model, sessions[next(iter(sessions))], None)
    got = np.asarray(Image.open(out / "sess01" / "final_00000.png")).astype(int)
    assert np.abs(got - final[0]).max() <= 1


def test_without_retries_the_missing_trials_are_reported_then_resumed(sessions, model, ray_address, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, **LOOPBACK_RAY}
    command = batch_command(sessions, model, out, ray_address, "--shard-size=3", "--retries=0")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, shard = kill_first_busy_worker(process, out)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 1, output[-3000:]
    assert "trials missing" in output
    missing_reported = set()
    for path, rows in sessions.items():
        folder = out / Path(path).stem
        summary = json.loads((folder / "summary.json").read_text())
        on_disk = {i for i in range(len(rows)) if (folder / f"final_{i:05d}.png").is_file()}
        assert summary["missing"] == sorted(set(range(len(rows))) - on_disk)
        assert summary["written"] == len(on_disk)
        missing_reported |= {f"{Path(path).stem}:{i}" for i in summary["missing"]}
    assert trials_of(shard) <= missing_reported
    for png in out.rglob("*.png"):  # what exists is whole
        with Image.open(png) as image:
            image.verify()

    markers = len(list(out.glob("*/.shards/*.json")))  # shards finished before the failure
    # resumed on a private local Ray instance this time (no --address): ray.init(address="local", num_cpus=2)
    command = batch_command(sessions, model, out, "", "--shard-size=3", "--num-cpus=2")
    command = [c for c in command if c != "--address="]
    resumed = subprocess.run(
        command, env={**os.environ, **LOOPBACK_RAY}, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in out.glob("*/summary.json")]
    assert sum(summary["shards_done_before"] for summary in summaries) == markers
    counts = wrote_counts(out)
    assert set(counts) == all_trials(sessions) and set(counts.values()) == {1}  # over both runs
    no_half_written(out)
