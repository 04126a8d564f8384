"""benchmarks/stream.py on the tiny subject: its online-vs-offline pairing and tables (the `online` mode), and the
latency mode's rows with the page in headless Chromium (docs/real-time.md's tables come from these functions).

The tiny subject's time series are simulated here with runs of at most 25 trials, so each session has a run 1 to
calibrate on and a run 2 to score (the `tiny` preset's default is one run of 50 trials per session); same preset and
seed as the tiny model, so the same mask and voxel responses."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainrecon.benchmarks import stream as bench
from brainrecon.data import layout
from brainrecon.data.sim import SimConfig, simulate_subject
from brainrecon.data.timeseries import TimeseriesConfig

STEPS = 4  # stage 2: 3 UNet calls at strength 0.75


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, tiny2: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream-bench") / "sim"
    config = TimeseriesConfig(max_trials_per_run=25)
    simulate_subject(root, SimConfig.preset("tiny"), seed=0, timeseries=config, progress=False)
    mask = np.asarray(nib.load(layout.mask_path(root, 1)).dataobj).reshape(-1)
    assert np.array_equal(np.flatnonzero(mask > 0), np.load(tiny2["model"] / "mask_indices.npy"))
    return {"root": root, "model": tiny2["model"], "prep": tiny2["prep"]}


def test_online_offline_pairs(two_runs: dict[str, Path]) -> None:
    runs = bench.session_runs(two_runs["root"], 1)
    assert runs and all(r == [1, 2] for r in runs.values())
    test_ids = np.load(two_runs["prep"] / "test_stim_ids.npy")
    found = bench.collect_betas(two_runs["root"], 1, two_runs["model"], test_ids)
    n = len(found["trials"])
    assert n >= 10 and found["online"].shape == found["offline"].shape == (n, found["online"].shape[1])
    assert all(t["run"] == 2 and t["stim_id"] in set(test_ids.tolist()) for t in found["trials"])
    assert np.isfinite(found["online"]).all() and np.isfinite(found["offline"]).all()
    # the same trial's two estimates agree (tests/test_stream.py: 0.60 at full runs); a pairing off by one
    # trial would not
    assert found["psc_r"].mean() > 0.4, found["psc_r"].mean()
    same = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(found["online"], found["offline"], strict=True)])
    shifted = np.mean(
        [np.corrcoef(a, b)[0, 1] for a, b in zip(found["online"][1:], found["offline"][:-1], strict=True)]
    )
    assert same > shifted + 0.2, (same, shifted)


def test_online_quality_tables(two_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "online"
    result = bench.online_quality(
        two_runs["root"], two_runs["model"], two_runs["prep"], out, preset="fast", sessions=2
    )
    assert result["sessions"] == [1, 2]
    names = [row["betas"] for row in result["rows"]]
    assert names == ["offline", "online", "offline, repeats averaged (the test set)"]
    for row in result["rows"]:
        for kind in ("stage1", "final"):
            assert 0 <= row[kind]["clip_2way"] <= 1 and -1 <= row[kind]["pixcorr"] <= 1
    assert json.loads((out / "online.json").read_text())["trials"] == result["trials"]
    table = (out / "online.md").read_text()
    assert "| online | " in table and result["machine"]["cpu"] in table
    assert (out / "online_sheet.png").stat().st_size > 0


def test_front_end_real_size(two_runs: dict[str, Path]) -> None:
    f = bench.front_end_real_size(layout.run_design_path(two_runs["root"], 1, 1, 1), 4 / 3, repeats=2)
    assert f["voxels"] == bench.NSD_VOXELS and f["glm_window_volumes"] > 7
    assert all(f[k] > 0 for k in ("read_s", "glm_s", "normalise_s", "write_png_s"))


@pytest.mark.browser
def test_latency_rows_with_page(two_runs: dict[str, Path], tmp_path: Path) -> None:
    """Session 1 run 2 (25 trials) at 8x real time with the page open: every trial's images on disk and on the
    page, each step's share of the final image's mean latency."""
    result = bench.stream_latency(
        two_runs["root"], two_runs["model"], tmp_path / "latency", presets=("fast",), speed=8
    )
    row = result["presets"]["fast"]
    assert row["trials"] == 25 and not row["faults"]
    for kind in ("stage1", "final"):
        assert row["latency"][kind]["n"] == 25
        assert row["page_latency"][kind]["n"] == 25, row["page_latency"]
        assert row["page_latency"][kind]["p50_s"] >= row["latency"][kind]["p50_s"]
    assert set(row["share_of_final_mean"]) == set(bench.STEP_NAMES)
    assert 0.3 < sum(row["share_of_final_mean"].values()) < 1.2  # the rest: waiting, the page
    assert "| fast | 25 |" in (tmp_path / "latency" / "latency.md").read_text()
    for name, projected in result["gpu_projection"]["rows"].items():  # the committed GPU figures, added up
        assert max(projected["stage1_image_s"], projected["unet_s"]) < projected["final_image_s"], name
