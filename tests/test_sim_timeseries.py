"""`recon-sim --timeseries`: BOLD runs and design files in NSD's time-series layout, and GLM betas from them.

Measured on the tiny preset, seed 0 (2026-12-05): the per-voxel correlation of the betas with the simulator's
noiseless responses (within sessions, mean over ROI voxels) is 0.9996 for GLM betas of noiseless runs without drift,
0.321 for GLM betas of the default runs and 0.305 for the direct betas; NSD's noise-ceiling estimate (median,
3 repeats) is 26.0% and 24.9%.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.io
from typer.testing import CliRunner

from brainrecon.cli.data import sim_app
from brainrecon.data import layout
from brainrecon.data.nsd import PrepareConfig, prepare_subject
from brainrecon.data.sim import SimConfig, simulate_subject, simulated_responses
from brainrecon.data.timeseries import TimeseriesConfig, betas_quality, measure_subject, trial_kernel

CONFIG = SimConfig.preset("tiny")
SEED = 0
TR = 4 / 3


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny subject written three ways: direct betas, with time series, with noiseless time series."""
    base = tmp_path_factory.mktemp("sim_ts")
    roots = {"direct": base / "direct", "timeseries": base / "timeseries", "noiseless": base / "noiseless"}
    simulate_subject(roots["direct"], CONFIG, seed=SEED)
    summary = simulate_subject(roots["timeseries"], CONFIG, seed=SEED, timeseries=TimeseriesConfig())
    assert summary["n_runs"] == CONFIG.n_sessions  # 50 trials per session: one run each
    simulate_subject(roots["noiseless"], CONFIG, seed=SEED, timeseries=TimeseriesConfig(noise=0, drift_psc=0))
    return roots


@pytest.fixture(scope="module")
def responses(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return simulated_responses(CONFIG, SEED, tmp_path_factory.mktemp("scratch"))


def _info(root: Path) -> dict:
    return json.loads(layout.sim_timeseries_path(root).read_text())


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file; the .mat's header holds its creation time, so its variables stand for it."""
    hashes = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".mat":
            mat = scipy.io.loadmat(path)
            data = b"".join(
                np.ascontiguousarray(mat[k]).tobytes() for k in sorted(mat) if not k.startswith("__")
            )
        else:
            data = path.read_bytes()
        hashes[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return hashes


def test_runs_in_nsd_layout(roots: dict[str, Path]) -> None:
    root = roots["timeseries"]
    mask_img = nib.load(layout.mask_path(root, 1))
    mask = np.asarray(mask_img.dataobj)
    info = _info(root)
    assert info["tr_s"] == pytest.approx(TR)
    assert len(info["runs"]) == CONFIG.n_sessions
    for run in info["runs"]:
        path = layout.timeseries_path(root, 1, run["session"], run["run"])
        assert path.name == f"timeseries_session{run['session']:02d}_run{run['run']:02d}.nii.gz"
        img = nib.load(path)
        assert img.shape == (*CONFIG.grid, run["n_volumes"])
        assert img.get_data_dtype() == np.int16
        assert img.header["pixdim"][4] == pytest.approx(TR)
        assert img.header.get_xyzt_units() == ("mm", "sec")
        np.testing.assert_array_equal(img.affine, mask_img.affine)
        data = np.asarray(img.dataobj)
        assert np.all(data[mask < 0] == 0)  # zeros outside the brain, as NSD's liberal brain mask
        assert data[mask >= 0].min() > 500  # raw intensities around 2000
    for session in range(1, CONFIG.n_sessions + 1):
        img = nib.load(layout.session_path(root, 1, session))
        assert img.shape == (*CONFIG.grid, CONFIG.trials_per_session) and img.get_data_dtype() == np.int16
    # one 50-trial run: 60 slots of 4 s (50 trials, 10 blank), 3 volumes each, plus one volume (NSD: 75 -> 226)
    assert {run["n_volumes"] for run in info["runs"]} == {181}


def test_design_files_follow_the_experiment(roots: dict[str, Path]) -> None:
    root = roots["timeseries"]
    mat = scipy.io.loadmat(layout.expdesign_path(root))
    masterordering = mat["masterordering"].reshape(-1)
    info = _info(root)
    tps = CONFIG.trials_per_session
    seen = []
    for session in range(1, CONFIG.n_sessions + 1):
        shown = []
        for run in (r for r in info["runs"] if r["session"] == session):
            path = layout.run_design_path(root, 1, session, run["run"])
            rows = np.loadtxt(path, dtype=np.int64)
            assert len(rows) == run["n_volumes"] - 1  # NSD: one row fewer than volumes
            onsets = np.flatnonzero(rows)
            assert np.all(onsets % 3 == 0)  # a trial slot is 4 s = 3 volumes
            np.testing.assert_array_equal(onsets, run["onset_volumes"])
            np.testing.assert_allclose(np.array(onsets) * TR, run["onsets_s"], atol=1e-4)
            np.testing.assert_array_equal(rows[onsets], masterordering[run["trials"]])
            np.testing.assert_array_equal(rows[onsets], run["ten_k_ids"])
            shown.extend(rows[onsets])
            seen.extend(run["trials"])
        np.testing.assert_array_equal(shown, masterordering[(session - 1) * tps : session * tps])
    assert seen == list(range(CONFIG.n_trials))


def test_trial_kernel_is_the_spm_response() -> None:
    """The 3 s stimulus convolved with SPM's HRF peaks about 6 s after onset and undershoots after ~12 s."""
    kernel = trial_kernel(TimeseriesConfig())
    assert kernel.max() == pytest.approx(1, abs=0.02) and kernel[0] == 0
    assert 5 <= np.argmax(kernel) * TR <= 7.5
    assert kernel[round(16 / TR)] < 0


def test_glm_betas_recover_the_responses(
    roots: dict[str, Path], responses: np.ndarray, tmp_path: Path
) -> None:
    """Noiseless runs: correlation > 0.999 (measured 0.9996; int16 volumes and betas). Default runs: within 0.05
    of the direct betas' correlation and within 5 points of their noise ceiling (measured 0.321 vs 0.305, 26.0%
    vs 24.9%)."""
    mat = scipy.io.loadmat(layout.expdesign_path(roots["direct"]))
    image_ids = mat["subjectim"][0, mat["masterordering"].reshape(-1) - 1] - 1
    noiseless = measure_subject(roots["noiseless"], CONFIG, SEED, tmp_path / "a")
    assert noiseless["mean_correlation"] > 0.999, noiseless
    glm = measure_subject(roots["timeseries"], CONFIG, SEED, tmp_path / "b")
    direct = measure_subject(roots["direct"], CONFIG, SEED, tmp_path / "c")
    assert 0.2 < direct["mean_correlation"] < 0.45, direct
    assert abs(glm["mean_correlation"] - direct["mean_correlation"]) < 0.05, (glm, direct)
    assert abs(glm["median_noise_ceiling_n3"] - direct["median_noise_ceiling_n3"]) < 5, (glm, direct)
    # the quality measure itself: betas equal to the responses correlate perfectly
    exact = responses[image_ids].reshape(CONFIG.n_sessions, CONFIG.trials_per_session, -1)
    assert betas_quality(exact, image_ids, responses)["mean_correlation"] == pytest.approx(1)


def test_recon_prepare_reads_a_timeseries_subject(roots: dict[str, Path], tmp_path: Path) -> None:
    summaries = {}
    for kind in ("direct", "timeseries"):
        out = tmp_path / kind
        summaries[kind] = prepare_subject(roots[kind], out, PrepareConfig(), progress=False)
        assert np.isfinite(np.load(out / "train_betas.npy")).all()
    assert summaries["timeseries"]["trials"] == summaries["direct"]["trials"] == CONFIG.n_trials
    assert summaries["timeseries"]["voxels"] == summaries["direct"]["voxels"]
    np.testing.assert_array_equal(
        np.load(tmp_path / "timeseries/test_stim_ids.npy"), np.load(tmp_path / "direct/test_stim_ids.npy")
    )


def test_same_brain_and_default_output_unchanged(roots: dict[str, Path]) -> None:
    """Without --timeseries nothing of the time series is written; with it, stimuli, design, mask and truth are
    byte for byte the default's and only the betas differ. (The default's own bytes were checked against the
    code before this option: sha256 of every file of `recon-sim --preset tiny --seed 0`, the .mat's variables.)"""
    direct, timeseries = _files(roots["direct"]), _files(roots["timeseries"])
    assert not any(name.startswith("nsddata_timeseries") for name in direct)
    assert layout.sim_timeseries_path(Path()).name not in direct
    extra = {name for name in timeseries if name not in direct}
    assert extra and all(
        name.startswith("nsddata_timeseries") or name.endswith("timeseries.json") for name in extra
    )
    for name, digest in direct.items():
        if "nsddata_betas" in name:
            assert timeseries[name] != digest, name
        elif not name.startswith("."):  # recon-sim's folder marker is written by the CLI only
            assert timeseries[name] == digest, name


def test_same_seed_same_bytes(roots: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "again"
    result = CliRunner().invoke(
        sim_app, ["--out", str(out), "--preset", "tiny", "--seed", "0", "--timeseries"]
    )
    assert result.exit_code == 0, result.output
    again = _files(out)
    for name, digest in _files(roots["timeseries"]).items():
        assert again[name] == digest, name
