"""Reconstruction metrics exactly as Brain-Diffuser's evaluation (ozcelikfu/brain-diffuser,
`scripts/evaluate_reconstruction.py`; Ozcelik & VanRullen 2023).

Torch-free: numpy, Pillow (resizing, as the original) and scikit-image (rgb2gray, and the SSIM reference in tests).

- PixCorr: the generated image is resized to 425 px with Pillow's default `Image.resize` filter (BICUBIC since
  Pillow 7; the original environment pins Pillow 9.2), both images scaled to [0, 1], then the Pearson r of the
  flattened RGB values; per image, then the mean.
- SSIM: `rgb2gray` of both, then skimage `structural_similarity(gen, gt, multichannel=True, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1.0)`. The original passes `multichannel=True` on a 2-D gray
  image with scikit-image 0.17.2, which loops over the last axis: the published SSIM (0.356, and the anchors that
  copy this script) is the mean over image columns of a 1-D Gaussian SSIM along each column. `ssim(...,
  mode="brain_diffuser")` (the default) reproduces that; `mode="2d"` is the textbook 2-D SSIM. Modern skimage gives
  the former with `channel_axis=-1` on the gray image, the latter with `channel_axis=None`.
- 2-way identification: `r = corrcoef(gt_feats, pred_feats)`; for prediction j the fraction of the other ground
  truths i with `r[i, j] < r[j, j]`; mean over j (chance 0.5).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter1d
from skimage.color import rgb2gray

from brainrecon.errors import InputError

EVAL_SIZE = 425  # NSD stimuli are 425×425; Brain-Diffuser resizes its 512 px outputs to this size
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage's Gaussian window: radius int(3.5 * 1.5 + 0.5) = 5, window 11
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_MODES = ("brain_diffuser", "2d")


# ----------------------------------------------------------------------------- input checks and resizing


def _check_images(images: np.ndarray, name: str) -> np.ndarray:
    """N×H×W×3, uint8 or float in [0, 1], finite."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(name, "images of shape (N, H, W, 3)", f"shape {images.shape}")
    if images.shape[0] == 0:
        raise InputError(name, "at least one image", "N = 0")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise InputError(name, "dtype uint8 or float in [0, 1]", f"dtype {images.dtype}")
    if not np.all(np.isfinite(images)):
        raise InputError(name, "finite values", f"{int(np.sum(~np.isfinite(images)))} NaN/Inf values")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(name, "float values in [0, 1]", f"range [{lo:.4g}, {hi:.4g}]")
    return images


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = _check_images(gt, "gt")
    pred = _check_images(pred, "pred")
    if gt.shape[0] != pred.shape[0]:
        raise InputError("pred", f"{gt.shape[0]} images (as many as gt)", f"{pred.shape[0]}")
    return gt, pred


def _to_eval_float(image: np.ndarray) -> np.ndarray:
    """One H×W×3 image → 425×425×3 float64 in [0, 1], resized like the original (Pillow bicubic).

    uint8 goes through Pillow's RGB path exactly as the original (which opened PNGs); float images are resized per
    channel in Pillow's 32-bit float mode and clipped to [0, 1], as the uint8 path clips implicitly.
    """
    h, w = image.shape[:2]
    if image.dtype == np.uint8:
        if (h, w) != (EVAL_SIZE, EVAL_SIZE):
            image = np.asarray(
                Image.fromarray(np.ascontiguousarray(image)).resize(
                    (EVAL_SIZE, EVAL_SIZE), Image.Resampling.BICUBIC
                )
            )
        return image.astype(np.float64) / 255.0
    image = image.astype(np.float64)
    if (h, w) == (EVAL_SIZE, EVAL_SIZE):
        return image
    channels = [
        np.asarray(
            Image.fromarray(image[..., c].astype(np.float32)).resize(
                (EVAL_SIZE, EVAL_SIZE), Image.Resampling.BICUBIC
            )
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1).astype(np.float64), 0.0, 1.0)


def _reduce(values: np.ndarray, per_item: bool) -> float | np.ndarray:
    return values if per_item else float(values.mean())


# ----------------------------------------------------------------------------- low-level metrics


def pixcorr(gt: np.ndarray, pred: np.ndarray, per_image: bool = False) -> float | np.ndarray:
    """Pearson r of the flattened RGB values at 425 px in [0, 1]; mean over images (or the (N,) values).

    A constant image has no correlation: its value is NaN, and so is the mean (a black output is a failure to see).
    """
    gt, pred = _check_pair(gt, pred)
    values = np.empty(len(gt))
    for i in range(len(gt)):
        a = _to_eval_float(gt[i]).ravel()  # (425*425*3,)
        b = _to_eval_float(pred[i]).ravel()
        a = a - a.mean()
        b = b - b.mean()
        denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
        values[i] = np.dot(a, b) / denom if denom > 0 else np.nan
    return _reduce(values, per_image)


def _ssim_brain_diffuser(gray_gt: np.ndarray, gray_pred: np.ndarray) -> float:
    """Mean over columns of the 1-D Gaussian SSIM along each column (skimage 0.17 `multichannel=True` on 2-D).

    Vectorised: filtering a 2-D array along axis 0 is the per-column 1-D filter (skimage's `gaussian_filter`,
    mode 'reflect', truncate 3.5); each column is then cropped by the window radius and averaged. All columns have
    the same length, so the mean of the means is the mean of the cropped map.
    """

    def blur(a: np.ndarray) -> np.ndarray:
        return gaussian_filter1d(a, SSIM_SIGMA, axis=0, mode="reflect", truncate=SSIM_TRUNCATE)

    x, y = gray_pred, gray_gt  # the original calls ssim(gen, gt); SSIM is symmetric anyway
    ux, uy = blur(x), blur(y)
    vx = blur(x * x) - ux * ux  # use_sample_covariance=False: no N/(N-1) factor
    vy = blur(y * y) - uy * uy
    vxy = blur(x * y) - ux * uy
    c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2  # data_range=1
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))  # (H, W)
    pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    return float(s[pad:-pad].mean())


def _ssim_2d(gray_gt: np.ndarray, gray_pred: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(
            gray_pred,
            gray_gt,
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
            data_range=1.0,
        )
    )


def ssim(
    gt: np.ndarray, pred: np.ndarray, per_image: bool = False, mode: str = "brain_diffuser"
) -> float | np.ndarray:
    """Grayscale SSIM at 425 px (Gaussian σ=1.5, population covariance, data_range 1); mean over images.

    mode "brain_diffuser" (default) reproduces the published numbers (column-wise 1-D SSIM, see the module
    docstring); "2d" is the standard 2-D SSIM, which is not comparable with the Brain-Diffuser/GRU anchors.
    """
    if mode not in SSIM_MODES:
        raise InputError("mode", f"one of {SSIM_MODES}", repr(mode))
    gt, pred = _check_pair(gt, pred)
    fn = _ssim_brain_diffuser if mode == "brain_diffuser" else _ssim_2d
    values = np.array(
        [fn(rgb2gray(_to_eval_float(gt[i])), rgb2gray(_to_eval_float(pred[i]))) for i in range(len(gt))]
    )
    return _reduce(values, per_image)


def two_way_identification(
    gt_feats: np.ndarray, pred_feats: np.ndarray, per_item: bool = False, chunk: int = 65536
) -> float | np.ndarray:
    """2-way identification accuracy of predictions among ground truths (Brain-Diffuser `pairwise_corr_all`).

    r[i, j] = Pearson r(gt_i, pred_j) over the flattened features. Prediction j scores the fraction of the N-1 other
    ground truths i with r[i, j] < r[j, j] (strict, as the original). Returns the mean over j, or the (N,) scores.
    Only the N×N cross block of the correlation matrix is formed, accumulated over feature chunks in float64, so
    large feature maps (AlexNet, Inception) need no float64 copy of the whole array.
    """
    gt = np.asarray(gt_feats)
    pred = np.asarray(pred_feats)
    if gt.ndim < 2 or pred.ndim < 2:
        raise InputError(
            "feats", "arrays of shape (N, ...) with N items", f"gt {gt.shape}, pred {pred.shape}"
        )
    n = gt.shape[0]
    gt = gt.reshape(n, -1)
    pred = pred.reshape(pred.shape[0], -1)
    if gt.shape != pred.shape:
        raise InputError("pred_feats", f"shape {gt.shape} (as gt_feats, flattened)", f"{pred.shape}")
    if n < 2:
        raise InputError("feats", "at least 2 items", f"{n}")
    for name, a in (("gt_feats", gt), ("pred_feats", pred)):
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise InputError(name, "a numeric array", f"dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise InputError(name, "finite values", f"{int(np.sum(~np.isfinite(a)))} NaN/Inf values")

    gt_mean = gt.mean(axis=1, dtype=np.float64)[:, None]  # (N, 1)
    pred_mean = pred.mean(axis=1, dtype=np.float64)[:, None]
    cross = np.zeros((n, n))  # (N_gt, N_pred) un-normalised covariances
    gt_ss = np.zeros(n)
    pred_ss = np.zeros(n)
    for start in range(0, gt.shape[1], chunk):
        g = gt[:, start : start + chunk].astype(np.float64) - gt_mean  # (N, c)
        p = pred[:, start : start + chunk].astype(np.float64) - pred_mean
        cross += g @ p.T
        gt_ss += np.einsum("ij,ij->i", g, g)
        pred_ss += np.einsum("ij,ij->i", p, p)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = cross / np.sqrt(np.outer(gt_ss, pred_ss))  # rows: ground truth, columns: predictions
    congruent = np.diag(r)  # (N,)
    # the diagonal never satisfies r[j, j] < r[j, j], so dividing by N-1 counts only the other items
    scores = np.sum(r < congruent[None, :], axis=0) / (n - 1)
    return _reduce(scores.astype(np.float64), per_item)
