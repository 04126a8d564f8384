"""The simulated subject: files open exactly as NSD's do, the design follows NSD's conventions, the brain has signal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from brainrecon.config import config_from_dict
from brainrecon.data import layout
from brainrecon.data.scenes import (
    CATEGORIES,
    COLOUR_NAMES,
    SEMANTIC_NAMES,
    draw_scene,
    render_scene,
    scene_captions,
    scene_semantics,
)
from brainrecon.data.sim import (
    SimConfig,
    early_drive,
    feature_maps,
    gabor_bank,
    make_brain,
    noise_ceiling,
    receptive_fields,
    simulate_subject,
)
from brainrecon.errors import ConfigError, InputError

CONFIG = SimConfig.preset("tiny")
SEED = 0


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sim")
    summary = simulate_subject(root, CONFIG, seed=SEED)
    assert summary["n_trials"] == CONFIG.n_trials and summary["n_sessions"] == CONFIG.n_sessions
    return root


def _betas(root: Path) -> list[np.ndarray]:
    return [
        np.asarray(nib.load(layout.session_path(root, 1, s)).dataobj) for s in range(1, CONFIG.n_sessions + 1)
    ]


def _design(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mat = scipy.io.loadmat(layout.expdesign_path(root))
    return mat["masterordering"].reshape(-1), mat["subjectim"], mat["sharedix"].reshape(-1)


def _truth(root: Path) -> dict:
    return json.loads(layout.sim_truth_path(root).read_text())


# ---------------------------------------------------------------- files


def test_nifti_files_open_like_nsd(sim_root: Path) -> None:
    mask_img = nib.load(layout.mask_path(sim_root, 1))
    mask = np.asarray(mask_img.dataobj)
    assert mask_img.get_data_dtype() == np.int16
    assert mask.shape == CONFIG.grid
    assert set(np.unique(mask)) == {-1, 0, 1}
    assert np.allclose(np.diag(mask_img.affine)[:3], 1.8)
    n_voxels = int((mask > 0).sum())
    assert n_voxels == _truth(sim_root)["n_voxels"]
    assert 150 <= n_voxels <= 600  # "a few hundred"
    for s in range(1, CONFIG.n_sessions + 1):
        img = nib.load(layout.session_path(sim_root, 1, s))
        assert img.get_data_dtype() == np.int16
        assert img.shape == (*CONFIG.grid, CONFIG.trials_per_session)
        np.testing.assert_array_equal(img.affine, mask_img.affine)
        data = np.asarray(img.dataobj)
        assert data.dtype == np.int16
        assert np.all(data[mask < 0] == 0)  # outside the brain
        assert data[mask > 0].std() > 100  # ROI betas are a few percent x 300


def test_stimuli_and_captions(sim_root: Path) -> None:
    n, s = CONFIG.n_images, CONFIG.image_size
    with h5py.File(layout.stimuli_path(sim_root), "r") as f:
        brick = f["imgBrick"]
        assert brick.shape == (n, s, s, 3) and brick.dtype == np.uint8
        images = brick[:]
    assert images.std() > 20  # not blank
    captions = json.loads(layout.captions_path(sim_root).read_text())
    assert set(captions) == {str(i) for i in range(n)}
    for caps in captions.values():
        assert len(caps) == 5 and len(set(caps)) == 5 and all(isinstance(c, str) and c for c in caps)
        assert all(any(c in cap for c in CATEGORIES) and any(c in cap for c in COLOUR_NAMES) for cap in caps)


def test_design_follows_nsd_conventions(sim_root: Path) -> None:
    masterordering, subjectim, sharedix = _design(sim_root)
    n_test, n = CONFIG.n_test_images, CONFIG.n_images
    assert masterordering.shape == (CONFIG.n_trials,)
    assert subjectim.shape == (8, n) and sharedix.shape == (n_test,)
    assert masterordering.min() == 1 and masterordering.max() == n  # 1-based into the subject's list
    assert subjectim.min() == 1 and subjectim.max() == n  # 1-based stimulus ids
    for row in subjectim:
        assert sorted(row) == list(range(1, n + 1))
        np.testing.assert_array_equal(row[:n_test], sharedix)  # shared images first, in every row
    assert (masterordering <= n_test).sum() == 3 * n_test
    image_ids = subjectim[0, masterordering - 1] - 1
    test_ids = image_ids[masterordering <= n_test]
    ids, counts = np.unique(test_ids, return_counts=True)
    np.testing.assert_array_equal(ids, np.sort(sharedix - 1))
    assert np.all(counts == 3)
    _, train_counts = np.unique(image_ids[masterordering > n_test], return_counts=True)
    assert len(train_counts) == CONFIG.n_train_images
    assert train_counts.min() >= 1 and train_counts.max() == 3 and (train_counts < 3).any()


def test_truth_file(sim_root: Path) -> None:
    truth = _truth(sim_root)
    v = truth["n_voxels"]
    assert truth["seed"] == SEED and truth["preset"] == "tiny" and truth["subject"] == 1
    assert config_from_dict(SimConfig, truth["config"]) == CONFIG
    for key in ("ncsnr", "noise_ceiling_n1", "noise_ceiling_n3", "kind", "rf_x", "rf_y", "rf_size"):
        assert len(truth[key]) == v, key
    ncsnr = np.array(truth["ncsnr"])
    np.testing.assert_allclose(truth["noise_ceiling_n3"], noise_ceiling(ncsnr, 3), rtol=1e-3)
    np.testing.assert_allclose(truth["noise_ceiling_n1"], 100 * ncsnr**2 / (ncsnr**2 + 1), rtol=1e-3)
    kinds = np.array(truth["kind"])
    assert set(kinds) == {"early", "higher"}
    early_rf = np.array([x is not None for x in truth["rf_x"]])
    np.testing.assert_array_equal(early_rf, kinds == "early")


def test_ncsnr_distribution_like_nsd(sim_root: Path) -> None:
    ncsnr = np.array(_truth(sim_root)["ncsnr"])
    lo, hi = CONFIG.ncsnr_clip
    assert ncsnr.min() >= lo and ncsnr.max() <= hi
    assert np.mean((ncsnr >= 0.1) & (ncsnr <= 0.6)) > 0.8
    assert 0.2 < np.median(ncsnr) < 0.4


# ---------------------------------------------------------------- signal


def _repeat_correlation(root: Path, kind: str) -> tuple[float, float]:
    """Mean over good voxels of the across-image correlation of two repeats: same image vs a different image."""
    mask = np.asarray(nib.load(layout.mask_path(root, 1)).dataobj)
    sessions = [s[mask > 0].T.astype(np.float64) for s in _betas(root)]  # (trials, V) each
    # z-score per session so that session offsets do not count as signal
    betas = np.concatenate([(s - s.mean(axis=0)) / s.std(axis=0) for s in sessions])  # (T, V)
    masterordering, subjectim, _ = _design(root)
    image_ids = subjectim[0, masterordering - 1] - 1
    truth = _truth(root)
    ncsnr, kinds = np.array(truth["ncsnr"]), np.array(truth["kind"])
    good = (kinds == kind) & (ncsnr >= np.quantile(ncsnr[kinds == kind], 0.75))
    repeated = [
        np.flatnonzero(image_ids == i)[:2] for i in np.unique(image_ids) if (image_ids == i).sum() >= 2
    ]
    first = betas[[r[0] for r in repeated]][:, good]
    second = betas[[r[1] for r in repeated]][:, good]

    def mean_corr(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a - a.mean(axis=0), b - b.mean(axis=0)
        return float(np.mean((a * b).sum(axis=0) / np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))))

    return mean_corr(first, second), mean_corr(first, np.roll(second, 1, axis=0))


@pytest.mark.parametrize("kind", ["early", "higher"])
def test_repeats_of_an_image_correlate(sim_root: Path, kind: str) -> None:
    same, different = _repeat_correlation(sim_root, kind)
    assert same > 0.1, same
    assert abs(different) < 0.08, different
    assert same - different > 0.08


def test_early_voxels_are_retinotopic() -> None:
    """A bright patch drives an early voxel more at its RF centre than at the mirrored position."""
    brain = make_brain(CONFIG, np.random.default_rng(0))
    rf = receptive_fields(brain, CONFIG.feature_res)
    gabors = gabor_bank(2 * CONFIG.feature_res, CONFIG.n_orientations)
    ecc = np.hypot(brain.rf_x - 0.5, brain.rf_y - 0.5)
    voxels = np.flatnonzero(ecc > 0.25)[:20]
    assert len(voxels) > 5
    s = CONFIG.image_size
    images = np.zeros((2 * len(voxels), s, s, 3), dtype=np.uint8)
    for k, v in enumerate(voxels):
        for j, (x, y) in enumerate([(brain.rf_x[v], brain.rf_y[v]), (1 - brain.rf_x[v], 1 - brain.rf_y[v])]):
            cx, cy = int(x * s), int(y * s)
            images[2 * k + j, max(cy - 4, 0) : cy + 4, max(cx - 4, 0) : cx + 4] = 255
    drive = early_drive(feature_maps(images, CONFIG.feature_res, gabors), rf, brain.channel_weights)
    at_centre, mirrored = drive[0::2, voxels].diagonal(), drive[1::2, voxels].diagonal()
    assert np.all(at_centre > 2 * mirrored)


# ---------------------------------------------------------------- determinism, config


def test_same_seed_same_bytes_other_seed_differs(sim_root: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    simulate_subject(again, CONFIG, seed=SEED)
    simulate_subject(other, CONFIG, seed=SEED + 1)
    reference = _betas(sim_root)
    for a, b in zip(reference, _betas(again), strict=True):
        assert a.tobytes() == b.tobytes()
    assert reference[0].tobytes() != _betas(other)[0].tobytes()
    with h5py.File(layout.stimuli_path(sim_root)) as f, h5py.File(layout.stimuli_path(again)) as g:
        assert f["imgBrick"][:].tobytes() == g["imgBrick"][:].tobytes()
    assert layout.captions_path(sim_root).read_text() == layout.captions_path(again).read_text()
    assert layout.sim_truth_path(sim_root).read_text() == layout.sim_truth_path(again).read_text()
    for a, b in zip(_design(sim_root), _design(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="unknown simulation preset"):
        SimConfig.preset("huge")
    with pytest.raises(ConfigError, match="trials"):
        dataclasses.replace(CONFIG, n_sessions=1)
    with pytest.raises(ConfigError, match="multiple of"):
        dataclasses.replace(CONFIG, image_size=48)
    assert SimConfig.preset("demo").n_trials == SimConfig.preset("demo").n_sessions * 750
    with pytest.raises(InputError, match="subject"):
        simulate_subject(Path("unused"), CONFIG, seed=0, subject=9)


# ---------------------------------------------------------------- scenes


def test_scenes_render_caption_and_summarise() -> None:
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(50):
        scene = draw_scene(rng)
        counts.add(scene.count)
        image = render_scene(scene, 32)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        captions = scene_captions(scene, rng)
        assert len(captions) == 5 and len(set(captions)) == 5
        for obj in scene.objects:
            assert any(obj.colour in c for c in captions) and any(obj.category in c for c in captions)
        if scene.count > 1:
            number = {2: "two", 3: "three", 4: "four"}[scene.count]
            assert any(number in c for c in captions)  # the total count is said by at least one template
        semantics = scene_semantics(scene)
        assert semantics.shape == (len(SEMANTIC_NAMES),) and np.isfinite(semantics).all()
    assert counts == {1, 2, 3, 4}
