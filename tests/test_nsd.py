"""NSD reader: checked against a straightforward whole-array computation, and every bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import scipy.io

from brainrecon.data import layout
from brainrecon.data.nsd import PrepareConfig, prepare_subject
from brainrecon.errors import BrainReconError, InputError, MissingFileError
from tests.fixtures import AFFINE
from tests.fixtures import make_nsd_folder as make_fixture


def reference_prepare(fx, session_zscore=True):
    """The obvious computation: whole arrays in memory, loops over images."""
    m = fx.mask > 0
    sessions = []
    for b in fx.betas:
        x = b[m].T.astype(np.float64) / 300.0  # (T, V)
        if session_zscore:
            sd = x.std(0)
            sd[sd == 0] = 1
            x = (x - x.mean(0)) / sd
        sessions.append(x)
    x = np.concatenate(sessions)
    n = len(x)
    ids = fx.subjectim[0, fx.masterordering[:n] - 1] - 1
    test = fx.masterordering[:n] <= len(fx.sharedix)
    train_ids, test_ids = np.unique(ids[~test]), np.unique(ids[test])
    train = np.stack([x[ids == i].mean(0) for i in train_ids])
    tst = np.stack([x[ids == i].mean(0) for i in test_ids])
    mu, sd = train.mean(0), train.std(0, ddof=1)
    return (train - mu) / sd, (tst - mu) / sd, train_ids, test_ids


@pytest.fixture
def fx(tmp_path):
    return make_fixture(tmp_path / "nsd")


@pytest.mark.parametrize("session_zscore", [True, False])
def test_reader_matches_reference(fx, tmp_path, session_zscore):
    out = tmp_path / "prep"
    cfg = PrepareConfig(session_zscore=session_zscore, chunk_trials=5)  # chunks that do not divide 12
    summary = prepare_subject(fx.root, out, cfg, progress=False)
    train, test, train_ids, test_ids = reference_prepare(fx, session_zscore)
    np.testing.assert_allclose(np.load(out / "train_betas.npy"), train, atol=2e-5)
    np.testing.assert_allclose(np.load(out / "test_betas.npy"), test, atol=2e-5)
    np.testing.assert_array_equal(np.load(out / "train_stim_ids.npy"), train_ids)
    np.testing.assert_array_equal(np.load(out / "test_stim_ids.npy"), test_ids)
    np.testing.assert_array_equal(np.load(out / "test_stim_ids.npy"), np.sort(fx.sharedix - 1))
    np.testing.assert_array_equal(np.load(out / "test_images.npy"), fx.images[test_ids])
    np.testing.assert_array_equal(np.load(out / "mask_indices.npy"), np.flatnonzero(fx.mask > 0))
    assert np.load(out / "test_trial_counts.npy").tolist() == [3, 3]
    assert summary["trials"] == 36 and summary["voxels"] == int((fx.mask > 0).sum())
    info = json.loads((out / "preprocess.json").read_text())
    assert info["config"]["session_zscore"] is session_zscore
    assert info["n_train"] == len(train_ids) and info["mask"]["shape"] == list(fx.grid)
    captions = json.loads((out / "train_captions.json").read_text())
    assert captions[0] == [f"image {train_ids[0]} caption {k}" for k in range(5)]
    assert not list(tmp_path.glob(".prep*")), "temporary folder left behind"


def test_resize_and_max_sessions(fx, tmp_path):
    out = tmp_path / "prep"
    summary = prepare_subject(fx.root, out, PrepareConfig(max_sessions=2, image_size=8), progress=False)
    assert summary["sessions"] == 2 and summary["trials"] == 24
    assert np.load(out / "train_images.npy").shape[1:] == (8, 8, 3)


def test_output_exists_is_refused_and_kept(fx, tmp_path):
    out = tmp_path / "prep"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="existing path"):
        prepare_subject(fx.root, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def _rewrite_session(fx, session, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), layout.session_path(fx.root, 1, session))


BAD_INPUTS = {
    "missing mask": (lambda fx: layout.mask_path(fx.root, 1).unlink(), MissingFileError, "nsdgeneral"),
    "missing design": (lambda fx: layout.expdesign_path(fx.root).unlink(), MissingFileError, "nsd_expdesign"),
    "missing stimuli": (lambda fx: layout.stimuli_path(fx.root).unlink(), MissingFileError, "imgBrick"),
    "corrupt session": (
        lambda fx: layout.session_path(fx.root, 1, 2).write_bytes(b"not a nifti"),
        InputError,
        "unreadable",
    ),
    "grid mismatch": (
        lambda fx: _rewrite_session(fx, 2, fx.betas[1][:-1]),
        InputError,
        r"shape \(4, 6, 4, 12\)",
    ),
    "affine mismatch": (lambda fx: _rewrite_session(fx, 1, fx.betas[0], AFFINE * 1.1), InputError, "affine"),
    "wrong dtype": (
        lambda fx: _rewrite_session(fx, 1, fx.betas[0].astype(np.int32)),
        InputError,
        "dtype int32",
    ),
    "nan betas": (
        lambda fx: _rewrite_session(
            fx, 3, np.where(fx.betas[2] == fx.betas[2][2, 3, 2, 5], np.nan, fx.betas[2].astype(np.float32))
        ),
        InputError,
        "NaN/Inf",
    ),
    "trial count": (lambda fx: _rewrite_session(fx, 2, fx.betas[1][..., :10]), InputError, "12 trials"),
    "design too short": (
        lambda fx: scipy.io.savemat(
            layout.expdesign_path(fx.root),
            {
                "masterordering": fx.masterordering[None, :30],
                "subjectim": fx.subjectim,
                "sharedix": fx.sharedix[None],
            },
        ),
        InputError,
        "at least 36 trials",
    ),
    "design out of range": (
        lambda fx: scipy.io.savemat(
            layout.expdesign_path(fx.root),
            {
                "masterordering": (fx.masterordering + 50)[None],
                "subjectim": fx.subjectim,
                "sharedix": fx.sharedix[None],
            },
        ),
        InputError,
        "masterordering in 1..10",
    ),
    "shared image in a train trial": (
        lambda fx: scipy.io.savemat(
            layout.expdesign_path(fx.root),
            {
                "masterordering": fx.masterordering[None],
                # the subject's first train image is the first shared image
                "subjectim": np.where(
                    np.arange(fx.subjectim.shape[1]) == len(fx.sharedix), fx.sharedix[0], fx.subjectim
                ),
                "sharedix": fx.sharedix[None],
            },
        ),
        InputError,
        "a shared image in a train trial",
    ),
    "stimulus id out of range": (
        lambda fx: scipy.io.savemat(
            layout.expdesign_path(fx.root),
            {
                "masterordering": fx.masterordering[None],
                "subjectim": fx.subjectim + 100,
                "sharedix": fx.sharedix[None],
            },
        ),
        InputError,
        "stimuli",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input(fx, tmp_path, name):
    breaker, error, pattern = BAD_INPUTS[name]
    breaker(fx)
    out = tmp_path / "prep"
    with pytest.raises(error, match=pattern) as info:
        prepare_subject(fx.root, out, progress=False)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, BrainReconError)
    assert not out.exists() and not list(tmp_path.glob(".prep*")), "half-written output left behind"


def test_sim_round_trip(tmp_path):
    """recon-sim tiny -> reader: shapes, ids and repeat averaging agree with the simulator's design."""
    import scipy.io

    from brainrecon.data.sim import SimConfig, simulate_subject

    cfg = SimConfig.preset("tiny")
    simulate_subject(tmp_path / "sim", cfg, seed=3)
    summary = prepare_subject(tmp_path / "sim", tmp_path / "prep", progress=False)
    out = tmp_path / "prep"
    mat = scipy.io.loadmat(layout.expdesign_path(tmp_path / "sim"))
    ids = mat["subjectim"][0, mat["masterordering"].ravel() - 1] - 1
    test = mat["masterordering"].ravel() <= mat["sharedix"].size
    assert summary["train_images"] == cfg.n_train_images and summary["test_images"] == cfg.n_test_images
    np.testing.assert_array_equal(np.load(out / "test_stim_ids.npy"), np.sort(mat["sharedix"].ravel() - 1))
    np.testing.assert_array_equal(np.load(out / "train_stim_ids.npy"), np.unique(ids[~test]))
    counts = np.load(out / "train_trial_counts.npy")
    np.testing.assert_array_equal(counts, np.unique(ids[~test], return_counts=True)[1])
    assert np.load(out / "test_trial_counts.npy").tolist() == [3] * cfg.n_test_images
    train = np.load(out / "train_betas.npy")
    assert train.shape == (cfg.n_train_images, summary["voxels"]) and train.dtype == np.float32
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(0, ddof=1), 1, atol=1e-3)
    assert np.load(out / "train_images.npy").shape == (cfg.n_train_images, cfg.image_size, cfg.image_size, 3)


def test_cli_errors_are_one_line_with_exit_codes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    res = subprocess.run(
        [bin_dir / "recon-prepare", "--nsd-root", tmp_path / "nope", "--out", tmp_path / "o"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert res.stderr.strip().startswith("error:") and "NSD root directory" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = subprocess.run(
        [bin_dir / "recon-sim", "--out", tmp_path / "s", "--preset", "huge"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "tiny or demo" in res.stderr
    assert not (tmp_path / "s").exists()
    res = subprocess.run(
        [bin_dir / "recon-sim", "--out", tmp_path / "s", "--preset", "tiny"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        [bin_dir / "recon-prepare", "--nsd-root", tmp_path / "s", "--out", tmp_path / "p"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "p" / "preprocess.json").is_file()
