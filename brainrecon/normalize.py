"""Brain-Diffuser's transductive re-normalisation of regressor outputs, shared by training and the runtime."""

from __future__ import annotations

import numpy as np

from brainrecon.errors import InputError


def renormalize_predictions(pred: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray) -> np.ndarray:
    """Standardise each output dimension over the given prediction set (ddof=0), then scale to the training
    targets' mean and std (every regression script of ozcelikfu/brain-diffuser, and the GRU repo's
    `normalize_pred`).

    Transductive: the statistics come from the whole set being predicted (the test set in the papers), so one
    prediction depends on the others and a set of one is meaningless. Kept for parity with the published numbers.
    A dimension whose predictions are constant has no spread to rescale; it is set to the target mean (the
    original divides by zero and produces NaN there). float64 maths; returns float32 of `pred`'s shape (N, D).
    """
    if not isinstance(pred, np.ndarray) or pred.ndim != 2:
        found = f"shape {pred.shape}" if isinstance(pred, np.ndarray) else type(pred).__name__
        raise InputError("predictions", "an array of shape (n_samples, n_targets)", found)
    if pred.shape[0] < 2:
        raise InputError(
            "predictions", "at least 2 predictions (statistics are taken over the set)", f"{pred.shape[0]}"
        )
    d = pred.shape[1]
    target_mean = np.asarray(target_mean, dtype=np.float64)
    target_std = np.asarray(target_std, dtype=np.float64)
    if target_mean.shape != (d,) or target_std.shape != (d,):
        raise InputError(
            "target stats", f"mean and std of shape ({d},)", f"{target_mean.shape} and {target_std.shape}"
        )
    pred64 = pred.astype(np.float64)
    if not np.isfinite(pred64).all():
        raise InputError(
            "predictions", "finite values", f"{int(np.sum(~np.isfinite(pred64)))} NaN/Inf values"
        )
    mean = pred64.mean(axis=0)  # (D,)
    std = pred64.std(axis=0)  # (D,) ddof=0
    z = np.divide(pred64 - mean, std, out=np.zeros_like(pred64), where=std > 0)
    return (z * target_std + target_mean).astype(np.float32)
