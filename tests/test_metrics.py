"""Metrics against independent straightforward computations (np.corrcoef loops, skimage calls)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from brainrecon.errors import InputError
from brainrecon.metrics import pixcorr, ssim, two_way_identification


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random RGB images (uint8), so SSIM and correlations are far from trivial values."""
    rng = np.random.default_rng(seed)
    raw = gaussian_filter(rng.normal(size=(n, size, size, 3)), sigma=(0, 4, 4, 0))
    raw = (raw - raw.min()) / (raw.max() - raw.min())
    return (raw * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    gt = _images(3, 425, seed=0)  # NSD stimuli are already 425 px
    rng = np.random.default_rng(1)
    pred512 = _images(3, 512, seed=2)  # generated images are 512 px
    # make the predictions partly related to the ground truth so r is not ~0
    up = np.stack([np.asarray(Image.fromarray(g).resize((512, 512), Image.Resampling.BICUBIC)) for g in gt])
    pred512 = np.clip(0.6 * up + 0.4 * pred512 + rng.normal(0, 5, up.shape), 0, 255).astype(np.uint8)
    return gt, pred512


def _reference_gen(pred: np.ndarray) -> np.ndarray:
    """The Brain-Diffuser script: Image.open(png).resize((425, 425)) with Pillow's default filter, then / 255."""
    return np.stack([np.asarray(Image.fromarray(p).resize((425, 425))) for p in pred]) / 255.0


def test_pixcorr_matches_reference(pair):
    gt, pred = pair
    gen = _reference_gen(pred)
    ref = [np.corrcoef(gt[i].reshape(1, -1) / 255.0, gen[i].reshape(1, -1))[0, 1] for i in range(len(gt))]
    np.testing.assert_allclose(pixcorr(gt, pred, per_image=True), ref, rtol=0, atol=1e-12)
    assert pixcorr(gt, pred) == pytest.approx(np.mean(ref), abs=1e-12)
    assert pixcorr(gt, gt) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_skimage(pair):
    gt, pred = pair
    gen = _reference_gen(pred)
    gray_gen = [rgb2gray(g) for g in gen]
    gray_gt = [rgb2gray(g / 255.0) for g in gt]
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    # skimage 0.17's multichannel=True on the 2-D gray image == channel_axis=-1 today: per-column 1-D SSIM
    ref_bd = [
        structural_similarity(a, b, channel_axis=-1, **kw) for a, b in zip(gray_gen, gray_gt, strict=True)
    ]
    ref_2d = [structural_similarity(a, b, **kw) for a, b in zip(gray_gen, gray_gt, strict=True)]
    np.testing.assert_allclose(ssim(gt, pred, per_image=True), ref_bd, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ssim(gt, pred, per_image=True, mode="2d"), ref_2d, rtol=0, atol=1e-10)
    assert abs(np.mean(ref_bd) - np.mean(ref_2d)) > 1e-3  # the two definitions really differ
    assert ssim(gt, gt) == pytest.approx(1.0, abs=1e-9)


def test_float_and_uint8_inputs_agree(pair):
    gt, pred = pair
    # floats at 425 px need no resize: identical to the uint8 path up to float rounding
    assert pixcorr(gt.astype(np.float32) / 255, gt[::-1].astype(np.float64) / 255) == pytest.approx(
        pixcorr(gt, gt[::-1]), abs=1e-6
    )
    # floats at 512 px are resized without 8-bit rounding: close to, not equal to, the uint8 path
    assert ssim(gt, pred.astype(np.float64) / 255) == pytest.approx(ssim(gt, pred), abs=5e-3)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 425, 425), np.uint8), "shape"),
        (np.zeros((2, 425, 425, 3), np.int32), "dtype"),
        (np.full((2, 425, 425, 3), 2.0), r"\[0, 1\]"),
        (np.full((2, 425, 425, 3), np.nan), "NaN"),
        (np.zeros((3, 425, 425, 3), np.uint8), "as many as gt"),
    ],
)
def test_image_validation(bad, match):
    gt = np.zeros((2, 425, 425, 3), np.uint8)
    with pytest.raises(InputError, match=match):
        pixcorr(gt, bad)


def _two_way_reference(gt: np.ndarray, pred: np.ndarray) -> float:
    """Brain-Diffuser's pairwise_corr_all, written out."""
    n = len(gt)
    r = np.corrcoef(gt, pred)[:n, n:]
    return float(np.mean(np.sum(r < np.diag(r), axis=0)) / (n - 1))


def test_two_way_matches_reference_loop():
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(40, 50))
    pred = gt + rng.normal(scale=4.0, size=gt.shape)
    expected = _two_way_reference(gt, pred)
    assert 0.6 < expected < 1.0
    assert two_way_identification(gt, pred) == pytest.approx(expected, abs=1e-12)
    # chunked accumulation over features gives the same answer
    assert two_way_identification(gt, pred, chunk=7) == pytest.approx(expected, abs=1e-12)
    # float32 4-D feature maps are flattened per item
    maps = two_way_identification(gt.reshape(40, 5, 10), pred.reshape(40, 5, 10).astype(np.float32))
    assert maps == pytest.approx(expected, abs=1e-12)


def test_two_way_perfect_and_chance():
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(200, 64))
    assert two_way_identification(gt, gt) == 1.0
    scores = two_way_identification(gt, rng.normal(size=gt.shape), per_item=True)
    assert scores.shape == (200,)
    assert np.mean(scores) == pytest.approx(0.5, abs=0.03)
    assert two_way_identification(gt, gt[rng.permutation(200)]) == pytest.approx(0.5, abs=0.03)


def test_two_way_hand_example():
    gt = np.array([[1.0, 2, 3], [3, 2, 1], [1, 3, 2]])
    # r(gt0, gt1) = -1, r(gt0, gt2) = 0.5, r(gt1, gt2) = -0.5
    pred = np.array([[1.0, 2, 3], [1, 2, 3], [1, 3, 2]])  # item 1 is predicted as item 0
    # pred0 beats both others (1 > -1, 0.5); pred1: r(gt1, pred1) = -1 beats none; pred2 beats both
    np.testing.assert_allclose(two_way_identification(gt, pred, per_item=True), [1.0, 0.0, 1.0])
    assert two_way_identification(gt, pred) == pytest.approx(2 / 3)


def test_two_way_validation():
    with pytest.raises(InputError, match="shape"):
        two_way_identification(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(InputError, match="at least 2"):
        two_way_identification(np.zeros((1, 4)), np.zeros((1, 4)))
    with pytest.raises(InputError, match="NaN"):
        two_way_identification(np.full((3, 4), np.nan), np.zeros((3, 4)))
