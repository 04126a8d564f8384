"""recon-batch (serve/ray_batch.py) on a real Ray cluster: one head started per module by `ray start --head
--num-cpus 2` in the serving environment (loopback only, token auth disabled), joined with `--address`.

Inputs: the tiny subject's 10 test trials split into two "sessions" (6 + 4 rows). Checked:
- every trial's PNGs equal the runtime API's with seed `--seed + i` and no re-normalisation (tolerance: max
  |diff| <= 1 grey level, measured 0), i.e. recon-infer of that single trial with that seed; summaries and
  run.json; a rerun skips all; a deleted, an empty and a truncated PNG under finished shards are redone, and
  nothing else (journal, inodes);
- faults at points the test controls (serve/ray_batch.py TEST_HOOKS_ENV: the actor stops right after a chosen
  trial's PNGs and reports its process id through a FIFO): a worker killed there (SIGKILL) with retries: the
  trials it wrote survive untouched, only the rest of its shard is redone, by another process, every trial
  written exactly once; without retries: that shard is recorded as failed, the others finish, exit 1, the
  summary lists exactly the missing trial, and a rerun (a local Ray, token auth on) computes only that one;
- an exception in one shard and a hung shard (--shard-timeout): each recorded for its shard in the summary,
  the other shards finish, exit 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import select
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

from brainrecon.serve.ray_batch import TEST_HOOKS_ENV
from tests.fixtures import exported_tiny_model, tiny_betas_file
from tests.serve_helpers import (
    STEPS,
    free_ports,
    serve_venv,
    session_pids,
)

pytestmark = pytest.mark.serve  # every test runs recon-batch on a Ray cluster from the serving venv

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
    """`ray start --head` once for the module (its temp dir private, so no other ray.init on the machine joins
    it); every process of its session is killed, by id, at the end."""
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
    record = json.loads((out / "sess01" / "run.json").read_text())
    sess01 = next(path for path in sessions if path.endswith("sess01.npy"))
    assert record["input"] == {
        "path": sess01,
        "size": Path(sess01).stat().st_size,
        "sha256": hashlib.sha256(Path(sess01).read_bytes()).hexdigest(),
    }
    assert (
        record["model"]["manifest_sha256"]
        == hashlib.sha256((model / "manifest.json").read_bytes()).hexdigest()
    )
    assert record["images"]["sampling"]["num_inference_steps"] == STEPS
    assert (record["images"]["seed"], record["images"]["engine"], record["images"]["precision"]) == (
        SEED,
        "ort",
        "fp32",
    )

    # PNGs damaged under finished shards (markers present): exactly those trials are redone, nothing else
    (out / "sess01" / "final_00001.png").unlink()
    (out / "sess01" / "stage1_00003.png").write_bytes(b"")
    whole = (out / "sess02" / "final_00002.png").read_bytes()
    (out / "sess02" / "final_00002.png").write_bytes(whole[: len(whole) // 2])
    damaged = {"sess01:1", "sess01:3", "sess02:2"}
    untouched = {
        png: (png.stat().st_ino, png.stat().st_mtime_ns)
        for png in out.glob("*/*.png")
        if f"{png.parent.name}:{int(png.stem.split('_')[1])}" not in damaged
    }
    before = wrote_counts(out)
    repair = run_batch(sessions, model, out, ray_address, "--shard-size=2", f"--steps={STEPS}")
    assert repair.returncode == 0, repair.stdout[-3000:] + repair.stderr[-3000:]
    redone = wrote_counts(out) - before
    assert redone == Counter(damaged)  # each damaged trial once; no trial with whole PNGs recomputed
    assert {png: (png.stat().st_ino, png.stat().st_mtime_ns) for png in untouched} == untouched
    summaries = {name: json.loads((out / name / "summary.json").read_text()) for name in ("sess01", "sess02")}
    assert (summaries["sess01"]["computed"], summaries["sess02"]["computed"]) == ([1, 3], [2])
    assert summaries["sess01"]["shards_done_before"] == 1  # 0-2 and 2-4 each had a damaged PNG under a marker
    for path, rows in sessions.items():
        final, stage1 = expected_images(model, rows, STEPS)
        for trial in damaged:
            name, i = trial.split(":")
            if path.endswith(f"{name}.npy"):
                got = np.asarray(Image.open(out / name / f"final_{int(i):05d}.png")).astype(int)
                assert np.abs(got - final[int(i)]).max() <= 1
                got = np.asarray(Image.open(out / name / f"stage1_{int(i):05d}.png")).astype(int)
                assert np.abs(got - stage1[int(i)]).max() <= 1
    no_half_written(out)


def hooks_env(*hooks: dict) -> dict[str, str]:
    """The environment of a recon-batch run whose actors stop at the given points (serve/ray_batch.py
    _fault)."""
    return {**os.environ, **LOOPBACK_RAY, TEST_HOOKS_ENV: json.dumps(list(hooks))}


def reported_pid(fifo: Path, process: subprocess.Popen, timeout_s: float = 180.0) -> int:
    """The process id an actor writes into `fifo` when it reaches its hook (it then waits to be killed).
    Opened read-write, so that the open does not block and there is no end-of-file before the actor writes;
    select waits for the line, and the recon-batch process is checked between waits so that a run that ends
    first fails here."""
    fd = os.open(fifo, os.O_RDWR)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 1.0)[0]:
                return int(os.read(fd, 64).decode().split()[0])
            if process.poll() is not None:
                pytest.fail(f"recon-batch exited {process.returncode} before an actor reached its hook")
        pytest.fail("no actor reached its hook")
    finally:
        os.close(fd)


def stats(out: Path, name: str, trials: range) -> dict[str, tuple[int, int]]:
    return {
        f"{kind}_{i:05d}": (
            (out / name / f"{kind}_{i:05d}.png").stat().st_ino,
            (out / name / f"{kind}_{i:05d}.png").stat().st_mtime_ns,
        )
        for kind in ("stage1", "final")
        for i in trials
    }


def killed_at_trial_1(sessions, model, ray_address, tmp_path, *extra) -> tuple[subprocess.Popen, int, dict]:
    """A run whose actor stops right after writing sess01's trial 1 (shard 0-3, one trial per runtime call)
    and is SIGKILLed there; returns the process, the killed pid, and the stats of the PNGs it wrote, taken
    before the kill."""
    out = tmp_path / "out"
    fifo = tmp_path / "hook.fifo"
    os.mkfifo(fifo)
    hook = {"file": "sess01", "after_trial": 1, "action": "hang", "report": str(fifo)}
    # the deadline only matters if the retry recomputed trial 1 (the hook would stop it again): then the run ends
    # in a minute, failing this test, instead of hanging
    extra = ("--shard-timeout=60", *extra)
    command = batch_command(
        sessions, model, out, ray_address, "--shard-size=3", "--rows-per-call=1", f"--steps={STEPS}", *extra
    )
    process = subprocess.Popen(
        command, env=hooks_env(hook), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    pid = reported_pid(fifo, process)
    assert not (out / "sess01" / "final_00002.png").exists()  # the actor stopped before trial 2
    written = stats(out, "sess01", range(2))
    os.kill(pid, signal.SIGKILL)
    return process, pid, written


def test_killed_worker_is_replaced_and_only_the_rest_of_its_shard_is_redone(
    sessions, model, ray_address, tmp_path
):
    out = tmp_path / "out"
    process, killed, written = killed_at_trial_1(sessions, model, ray_address, tmp_path, "--retries=3")
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    lines = journal(out)
    assert {w.replace(" wrote ", ":") for pid, w in lines if pid == killed and " wrote " in w} == {
        "sess01:0",
        "sess01:1",
    }
    counts = wrote_counts(out)
    assert set(counts) == all_trials(sessions) and set(counts.values()) == {1}  # nothing written twice
    redo = [(pid, w) for pid, w in lines if w.startswith("sess01 start 0-3") and pid != killed]
    assert [w for _, w in redo] == ["sess01 start 0-3 todo 1"]  # the retry found trials 0 and 1 whole
    assert {pid for pid, w in lines if w == "sess01 wrote 2"} == {redo[0][0]}
    assert stats(out, "sess01", range(2)) == written  # the killed actor's PNGs kept as they were
    summary = json.loads((out / "sess01" / "summary.json").read_text())
    assert (summary["missing"], summary["failed_shards"], summary["computed"]) == ([], [], list(range(6)))
    no_half_written(out)
    final, _ = expected_images(model, sessions[next(iter(sessions))], STEPS)
    for i in range(3):
        got = np.asarray(Image.open(out / "sess01" / f"final_{i:05d}.png")).astype(int)
        assert np.abs(got - final[i]).max() <= 1


def test_without_retries_the_shard_fails_the_rest_finish_and_a_rerun_resumes(
    sessions, model, ray_address, tmp_path
):
    out = tmp_path / "out"
    process, _, written = killed_at_trial_1(sessions, model, ray_address, tmp_path, "--retries=0")
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 1, output[-3000:]
    assert (
        "error: recon-batch: 1 trials missing: {'sess01': [2]}; failed shards: {'sess01': ['0-3']}" in output
    )
    summary = json.loads((out / "sess01" / "summary.json").read_text())
    assert summary["missing"] == [2]
    assert [(f["shard"], f["status"]) for f in summary["failed_shards"]] == [("0-3", "failed")]
    assert summary["failed_shards"][0]["error"].startswith("actor died 1 times")
    assert (
        json.loads((out / "sess02" / "summary.json").read_text())["missing"] == []
    )  # the other shards went on
    for png in out.rglob("*.png"):  # what exists is whole
        with Image.open(png) as image:
            image.verify()

    # resumed on a private local Ray instance (no --address), with Ray's token auth as a user gets it: on
    home = tmp_path / "home"
    home.mkdir()
    command = [
        c
        for c in batch_command(sessions, model, out, "", "--shard-size=3", f"--steps={STEPS}", "--num-cpus=2")
        if c != "--address="
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (home / ".ray" / "auth_token").is_file(), "recon-batch turned Ray's token auth off"
    summaries = {name: json.loads((out / name / "summary.json").read_text()) for name in ("sess01", "sess02")}
    assert (summaries["sess01"]["computed"], summaries["sess02"]["computed"]) == ([2], [])
    assert summaries["sess01"]["shards_done_before"] == 1 and summaries["sess02"]["shards_done_before"] == 2
    counts = wrote_counts(out)
    assert set(counts) == all_trials(sessions) and set(counts.values()) == {1}  # over both runs
    assert stats(out, "sess01", range(2)) == written
    no_half_written(out)


def test_a_failing_and_a_hung_shard_are_recorded_and_the_others_finish(
    sessions, model, ray_address, tmp_path
):
    """--shard-timeout 30 s: a shard of this run takes about 1 s (3 trials, tiny model, 6 UNet calls each) on
    2 loaded cores, so only the hung one reaches it."""
    out = tmp_path / "out"
    hooks = [
        {"file": "sess01", "after_trial": 1, "action": "raise"},
        {"file": "sess02", "after_trial": 0, "action": "hang"},
    ]
    command = batch_command(
        sessions,
        model,
        out,
        ray_address,
        "--shard-size=3",
        "--rows-per-call=1",
        f"--steps={STEPS}",
        "--shard-timeout=30",
    )
    run = subprocess.run(command, env=hooks_env(*hooks), capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    summaries = {name: json.loads((out / name / "summary.json").read_text()) for name in ("sess01", "sess02")}
    assert summaries["sess01"]["failed_shards"] == [
        {"shard": "0-3", "status": "failed", "error": "RuntimeError: fault injected after trial 1 of sess01"}
    ]
    assert summaries["sess02"]["failed_shards"] == [
        {
            "shard": "0-3",
            "status": "timed out",
            "error": "no result after 30 s (--shard-timeout): its actor was killed",
        }
    ]
    assert (summaries["sess01"]["missing"], summaries["sess02"]["missing"]) == ([2], [1, 2])
    assert (summaries["sess01"]["written"], summaries["sess02"]["written"]) == (5, 2)  # 3-6 and 3-4 finished
    assert "failed shards: {'sess01': ['0-3'], 'sess02': ['0-3']}" in run.stderr
    no_half_written(out)
