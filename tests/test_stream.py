"""`recon-stream` on the tiny subject's simulated time series (`recon-sim --preset tiny --seed 0 --timeseries`), with
the exported tiny two-stage model of tests/fixtures.py: both come from the same simulated brain (same seed, the
mask checked equal), though the model was fitted on the direct betas, not on these runs' GLM betas.

Online vs offline betas (measured 2026-12-05 on the first 6 runs, window 7 volumes, drift degree 1): the mean over
trials of the correlation across voxels of a trial's online LSS beta with the simulator's offline GLM beta of the
same trial is 0.60 (lowest run 0.57); the bound below is 0.45. They differ because the online GLM sees only the
volumes up to onset + 7, lumps the other trials into one regressor and fits its drift to a short stretch, while the
offline GLM fits every trial of the whole run.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from brainrecon.cli.serve import stream_app
from brainrecon.data import layout
from brainrecon.data.sim import SimConfig, simulate_subject
from brainrecon.data.timeseries import TimeseriesConfig
from brainrecon.errors import InputError
from brainrecon.images import png_name
from brainrecon.runtime import Reconstructor
from brainrecon.runtime.inputs import Preprocessing
from brainrecon.serve.stream import (
    LOG,
    Calibration,
    StreamConfig,
    calibrate,
    normalise,
    run_stream,
)

TRIALS = 50  # tiny: one run of 50 trials (181 volumes) per session
STEPS = 4  # stage 2: 3 UNet calls at strength 0.75


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory, tiny2: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream") / "sim"
    simulate_subject(root, SimConfig.preset("tiny"), seed=0, timeseries=TimeseriesConfig(), progress=False)
    model = tiny2["model"]
    mask = np.asarray(nib.load(layout.mask_path(root, 1)).dataobj).reshape(-1)
    assert np.array_equal(np.flatnonzero(mask > 0), np.load(model / "mask_indices.npy"))
    cal = root.parent / "calibration.npz"
    calibrate(layout.timeseries_path(root, 1, 1, 1), layout.run_design_path(root, 1, 1, 1), model, cal)
    return {"root": root, "model": model, "calibration": cal}


def _run(subject: dict[str, Path], session: int = 2) -> dict[str, Path]:
    root = subject["root"]
    return {
        "replay_path": layout.timeseries_path(root, 1, session, 1),
        "design_path": layout.run_design_path(root, 1, session, 1),
    }


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG).read_text().splitlines()]


def _count(events: list[dict], name: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for e in events:
        if e["event"] == name:
            counts[e["trial"]] = counts.get(e["trial"], 0) + 1
    return counts


def test_replay_every_trial_once(subject: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = _run(subject)
    summary = run_stream(
        subject["model"], run["design_path"], out, replay_path=run["replay_path"],
        calibration_path=subject["calibration"], speed=0, sampling_overrides={"num_inference_steps": STEPS},
    )  # fmt: skip
    assert summary["complete"] and summary["trials_done_now"] == TRIALS and not summary["faults"]
    for kind in ("stage1", "final"):
        assert summary["latency"][kind]["n"] == TRIALS and summary["latency"][kind]["p95_s"] > 0
        assert sorted(p.name for p in out.glob(f"{kind}_*.png")) == [png_name(kind, t) for t in range(TRIALS)]
    assert all(
        summary["steps"][k]["n"] > 0 for k in ("read", "glm", "normalise", "stage1", "stage2", "write")
    )
    events = _events(out)
    assert sorted(e["volume"] for e in events if e["event"] == "volume") == list(range(181))
    design = np.loadtxt(run["design_path"], dtype=np.int64)
    for name in ("trial_estimated", "stage1_written", "final_written"):
        assert _count(events, name) == {t: 1 for t in range(TRIALS)}, name
    ids = {e["trial"]: e["ten_k_id"] for e in events if e["event"] == "trial_estimated"}
    assert [ids[t] for t in range(TRIALS)] == design[design > 0].tolist()
    assert json.loads((out / "summary.json").read_text()) == summary

    # the online betas against the offline GLM betas of the same trials (bound: module docstring)
    info = json.loads(layout.sim_timeseries_path(subject["root"]).read_text())["runs"][1]
    prep = Preprocessing(subject["model"])
    offline = np.asarray(nib.load(layout.session_path(subject["root"], 1, 2)).dataobj).reshape(-1, TRIALS)
    offline = offline[prep.mask_indices].T[np.asarray(info["trials"]) % TRIALS] / layout.BETAS_SCALE
    online = np.stack([np.load(out / f"beta_{t:05d}.npy") for t in range(TRIALS)])
    r = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(online, offline, strict=True)])
    assert r > 0.45, r

    # trial 7's final PNG is what the runtime gives for its normalised beta with seed 0 + 7
    from PIL import Image

    cal = Calibration.load(subject["calibration"], len(prep.mask_indices), StreamConfig())
    with Reconstructor.open(subject["model"]) as rec:
        sampling = rec.sampling.with_overrides(num_inference_steps=STEPS)
        expected = rec.reconstruct(normalise(online[7], prep, cal), sampling, seeds=[7], renormalize=False)
    assert np.array_equal(np.asarray(Image.open(out / png_name("final", 7))), expected.final_images[0])


def test_calibration_checked(subject: dict[str, Path], tmp_path: Path) -> None:
    run = _run(subject)
    with pytest.raises(InputError, match="--calibration: expected a calibration file"):
        run_stream(
            subject["model"], run["design_path"], tmp_path / "a", replay_path=run["replay_path"], speed=0
        )
    with pytest.raises(InputError, match="window_volumes': 5.*recalibrate"):
        run_stream(
            subject["model"], run["design_path"], tmp_path / "b", replay_path=run["replay_path"],
            calibration_path=subject["calibration"], speed=0, config=StreamConfig(window_volumes=5),
        )  # fmt: skip
    with pytest.raises(InputError, match="a 4-D run of 181 volumes"):
        run_stream(
            subject["model"], _run(subject, 3)["design_path"], tmp_path / "c",
            replay_path=subject["root"] / "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz",
            calibration_path=subject["calibration"], speed=0,
        )  # fmt: skip


def test_resume_after_stop(subject: dict[str, Path], tmp_path: Path) -> None:
    """Stopped after 60 volumes (the CLI's --max-volumes), then rerun: every trial's PNG once, none redone."""
    out = tmp_path / "out"
    run = _run(subject, 3)
    args = [
        "--model-dir", str(subject["model"]), "--design", str(run["design_path"]), "--out", str(out),
        "--replay", str(run["replay_path"]), "--calibration", str(subject["calibration"]), "--speed", "0",
        "--stage", "1",
    ]  # fmt: skip
    result = CliRunner().invoke(stream_app, [*args, "--max-volumes", "60"])
    assert result.exit_code == 0, result.output
    first = json.loads((out / "summary.json").read_text())
    assert not first["complete"] and 0 < first["trials_done_now"] < TRIALS
    assert not list(out.glob("final_*.png"))
    result = CliRunner().invoke(stream_app, args)
    assert result.exit_code == 0, result.output
    second = json.loads((out / "summary.json").read_text())
    assert second["complete"] and second["trials_done_before"] == first["trials_done_now"]
    assert second["trials_done_before"] + second["trials_done_now"] == TRIALS
    events = _events(out)
    assert _count(events, "stage1_written") == {t: 1 for t in range(TRIALS)}
    assert [e["resumed"] for e in events if e["event"] == "start"] == [False, True]
    # another setting is refused, and so is a folder this command did not make
    with pytest.raises(InputError, match="other seed"):
        run_stream(
            subject["model"], run["design_path"], out, replay_path=run["replay_path"],
            calibration_path=subject["calibration"], speed=0, stage=1, seed=1,
        )  # fmt: skip
    (tmp_path / "other").mkdir()
    with pytest.raises(InputError, match="one this command made"):
        run_stream(
            subject["model"], run["design_path"], tmp_path / "other", replay_path=run["replay_path"],
            calibration_path=subject["calibration"], speed=0, stage=1,
        )  # fmt: skip


def test_replay_paces_volumes(subject: dict[str, Path], tmp_path: Path) -> None:
    """--speed 20: volume k is due at start + k x TR / 20 and is not handed out before."""
    run = _run(subject)
    run_stream(
        subject["model"], run["design_path"], tmp_path / "out", replay_path=run["replay_path"],
        calibration_path=subject["calibration"], speed=20, stage=1, max_volumes=12,
    )  # fmt: skip
    volumes = [e for e in _events(tmp_path / "out") if e["event"] == "volume"]
    assert [e["volume"] for e in volumes] == list(range(12))
    due = np.array([e["arrived"] for e in volumes])
    np.testing.assert_allclose(np.diff(due), 4 / 3 / 20, atol=1e-5)
    assert all(e["time"] >= e["arrived"] for e in volumes)


def _save(folder: Path, name: str, volume: np.ndarray, affine: np.ndarray) -> None:
    """As an exporter that writes a temporary name, then renames."""
    tmp = folder / f".{name}"
    nib.save(nib.Nifti1Image(volume, affine), tmp.with_suffix(".nii"))
    tmp.with_suffix(".nii").rename(folder / name)


def _wait_for(out: Path, event: str, volume: int, timeout: float = 20.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if (out / LOG).is_file() and any(
            e["event"] == event and e.get("volume") == volume for e in _events(out)
        ):
            return
        time.sleep(0.01)
    raise TimeoutError(f"{event} {volume}")


def test_watch_faults(subject: dict[str, Path], tmp_path: Path) -> None:
    """Per-volume files with every fault: duplicated (10), out of order (21 before 20), missing (30), late (40,
    after 41-43 waited past late_s), wrong shape (50), NaNs (60), a gap of 5 after a trial's onset (its window
    keeps 3 of 8 volumes: it fails, its neighbours keep 4 or more); each logged once, no crash, every trial handled
    once."""
    run = _run(subject, 4)
    design = np.loadtxt(run["design_path"], dtype=np.int64)
    onsets = np.flatnonzero(design)
    failing = int(onsets[onsets >= 66][0])
    gap = range(failing + 1, failing + 6)
    img = nib.load(run["replay_path"])
    data = np.asarray(img.dataobj)  # (X, Y, Z, 181) int16
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    config = StreamConfig(late_s=2.0, idle_s=6.0)  # late_s: room for 20 to follow 21 on a loaded machine
    summary: dict = {}

    def stream() -> None:
        summary.update(
            run_stream(
                subject["model"], run["design_path"], out, watch_dir=watch, tr=4 / 3,
                calibration_path=subject["calibration"], stage=1, config=config,
            )
        )  # fmt: skip

    thread = threading.Thread(target=stream)
    thread.start()
    name = "vol_{:05d}.nii"
    for k in range(data.shape[3]):
        if k == 30 or k in gap:
            continue
        volume = data[..., k]
        if k == 50:
            volume = volume[:, :, :-1]
        if k == 60:
            volume = volume.astype(np.float32)
            volume[volume > 0] = np.nan
        if k == 20:  # out of order: 21 first, read before 20 appears
            _save(watch, name.format(21), data[..., 21], img.affine)
            _wait_for(out, "volume", 21)
        if k == 21:
            continue
        if k == 40:  # late: 41-43 first; 40 comes once it was given up
            for j in (41, 42, 43):
                _save(watch, name.format(j), data[..., j], img.affine)
            _wait_for(out, "volume_missing", 40)
        if k in (41, 42, 43):
            continue
        _save(watch, name.format(k), volume, img.affine)
        if k == 10:
            _wait_for(out, "volume", 10)
            _save(watch, "vol_00010_again.nii", volume, img.affine)
    thread.join(timeout=120)
    assert not thread.is_alive() and summary, "the stream did not end"
    events = _events(out)
    faults = [(e["event"], e.get("volume")) for e in events if "fault" in e]
    assert sorted(faults, key=str) == sorted(
        [
            ("volume_duplicate", 10),
            ("volume_out_of_order", 20),
            ("volume_missing", 30),
            ("volume_missing", 40),
            ("volume_late", 40),
            ("volume_bad", 50),
            ("volume_bad", 60),
            *(("volume_missing", k) for k in gap),
            ("trial_failed", None),
        ],
        key=str,
    )
    assert summary["trials_failed"] == [int(np.flatnonzero(onsets == failing)[0])]
    estimated = {e["trial"]: e for e in events if e["event"] == "trial_estimated"}
    written = _count(events, "stage1_written")
    assert written == {t: 1 for t in estimated}
    assert sorted([*estimated, *summary["trials_failed"]]) == list(range(TRIALS))
    for t, e in estimated.items():  # a trial's GLM leaves out the skipped volumes before its window end
        gone = {30, 50, 60, *gap} & set(range(onsets[t] + config.window_volumes + 1))
        assert gone <= set(e["volumes_missing"]), (t, e["volumes_missing"])
    assert not (out / png_name("stage1", summary["trials_failed"][0])).exists()
