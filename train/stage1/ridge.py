"""Closed-form ridge regression from voxels to feature targets, and Brain-Diffuser's prediction re-normalisation.

Mirrors `sklearn.linear_model.Ridge(alpha, fit_intercept=True)` as Brain-Diffuser uses it
(ozcelikfu/brain-diffuser `scripts/vdvae_regression.py`, `cliptext_regression.py`, `clipvision_regression.py`):
X and Y are centred with their training means, the penalty is alpha·‖W‖² on the weights only, and the intercept is
`y_mean - x_mean @ W`. No scaling of X (the betas are z-scored upstream).

With centred Xc (n×v) and Yc (n×d):
  primal  W = (XcᵀXc + αI_v)⁻¹ XcᵀYc      — v×v system; used when v ≤ n
  dual    W = Xcᵀ (XcXcᵀ + αI_n)⁻¹ Yc     — n×n system; used when v > n (NSD: 15,724 voxels ≫ 8,859 images)
The two are the same matrix (push-through identity). Solves run in float64 (Cholesky for one alpha, one
eigendecomposition of the Gram matrix for an alpha search); weights are stored and applied in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from brainrecon.config import load_config, save_config
from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.io import atomic_path
from brainrecon.normalize import renormalize_predictions  # noqa: F401 (re-exported)

OUTPUT_CHUNK = (
    8192  # output columns solved at a time: bounds float64 temporaries to n × 8192 (≈ 0.6 GB at n=8859)
)
CRITERIA = ("corr", "mse")


@dataclass(frozen=True)
class RidgeConfig:
    """Saved beside the weights as `<name>.json`."""

    alpha: float
    n_features: int  # v, voxels
    n_targets: int  # d, feature dimensions
    solver: str  # "dual" (v > n) or "primal"; recorded for the record, prediction does not depend on it
    n_train: int


@dataclass(frozen=True)
class AlphaSearch:
    """Result of `fit_alpha_on_validation`: one score per alpha (higher is better for "corr", lower for "mse")."""

    alphas: tuple[float, ...]
    scores: tuple[float, ...]
    criterion: str
    best_alpha: float
    n_train: int
    n_val: int


# ----------------------------------------------------------------------------- checks


def _check_xy(X: np.ndarray, Y: np.ndarray | None = None) -> None:
    if not isinstance(X, np.ndarray) or X.ndim != 2 or not np.issubdtype(X.dtype, np.floating):
        raise InputError("X", "a float array of shape (n_samples, n_voxels)", _describe(X))
    if not np.all(np.isfinite(X)):
        raise InputError("X", "finite values", f"{int(np.sum(~np.isfinite(X)))} NaN/Inf values")
    if Y is None:
        return
    if not isinstance(Y, np.ndarray) or Y.ndim != 2 or not np.issubdtype(Y.dtype, np.floating):
        raise InputError("Y", "a float array of shape (n_samples, n_targets)", _describe(Y))
    if Y.shape[0] != X.shape[0]:
        raise InputError("Y", f"{X.shape[0]} rows (as X)", f"{Y.shape[0]}")
    if not np.all(np.isfinite(Y)):
        raise InputError("Y", "finite values", f"{int(np.sum(~np.isfinite(Y)))} NaN/Inf values")
    if X.shape[0] < 2:
        raise InputError("X", "at least 2 samples", f"{X.shape[0]}")


def _describe(a: object) -> str:
    return f"shape {a.shape}, dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"ridge alpha: expected a finite value > 0, found {alpha}")
    return alpha


# ----------------------------------------------------------------------------- model


class RidgeRegressor:
    """Multi-output ridge with intercept. `fit` in float64, `predict` in float32.

    >>> reg = RidgeRegressor(alpha=5e4).fit(train_betas, train_latents)
    >>> pred = reg.predict(test_betas)  # (n_test, d) float32
    """

    def __init__(self, alpha: float):
        self.alpha = _check_alpha(alpha)
        self.coef: np.ndarray | None = None  # (V, D) float32
        self.intercept: np.ndarray | None = None  # (D,) float32
        self.config: RidgeConfig | None = None

    def fit(self, X: np.ndarray, Y: np.ndarray) -> RidgeRegressor:
        _check_xy(X, Y)
        n, v = X.shape
        d = Y.shape[1]
        x_mean = X.mean(axis=0, dtype=np.float64)  # (V,)
        y_mean = Y.mean(axis=0, dtype=np.float64)  # (D,)
        Xc = X.astype(np.float64) - x_mean  # (N, V)
        solver = "dual" if v > n else "primal"
        gram = Xc @ Xc.T if solver == "dual" else Xc.T @ Xc  # (N, N) or (V, V)
        gram[np.diag_indices_from(gram)] += self.alpha
        chol = scipy.linalg.cho_factor(gram, lower=True, overwrite_a=True, check_finite=False)
        coef = np.empty((v, d), dtype=np.float32)
        for start in range(0, d, OUTPUT_CHUNK):
            Yc = (
                Y[:, start : start + OUTPUT_CHUNK].astype(np.float64) - y_mean[start : start + OUTPUT_CHUNK]
            )  # (N, c)
            if solver == "dual":
                dual_coef = scipy.linalg.cho_solve(chol, Yc, check_finite=False)  # (N, c)
                coef[:, start : start + OUTPUT_CHUNK] = Xc.T @ dual_coef
            else:
                coef[:, start : start + OUTPUT_CHUNK] = scipy.linalg.cho_solve(
                    chol, Xc.T @ Yc, check_finite=False
                )
        self._set(coef, x_mean, y_mean, solver, n)
        return self

    def _set(self, coef: np.ndarray, x_mean: np.ndarray, y_mean: np.ndarray, solver: str, n: int) -> None:
        self.coef = coef
        # intercept from the float32 weights actually used in predict, so predict(x_mean) == y_mean up to rounding
        self.intercept = (y_mean - x_mean @ coef.astype(np.float64)).astype(np.float32)
        self.config = RidgeConfig(
            alpha=self.alpha, n_features=coef.shape[0], n_targets=coef.shape[1], solver=solver, n_train=n
        )

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(N, V) → (N, D) float32."""
        if self.coef is None:
            raise InputError(
                "RidgeRegressor", "a fitted or loaded model", "an unfitted one (call fit or load)"
            )
        _check_xy(X)
        if X.shape[1] != self.coef.shape[0]:
            raise InputError("X", f"{self.coef.shape[0]} voxels (as the fitted model)", f"{X.shape[1]}")
        return X.astype(np.float32, copy=False) @ self.coef + self.intercept

    # ------------------------------------------------------------------------- save / load

    def save(self, directory: str | Path, name: str = "ridge") -> tuple[Path, Path]:
        """Write `<name>.safetensors` (coef, intercept) and `<name>.json` (RidgeConfig), each atomically."""
        from safetensors.numpy import save_file

        if self.coef is None or self.config is None:
            raise InputError("RidgeRegressor", "a fitted model to save", "an unfitted one")
        directory = Path(directory)
        weights, config = directory / f"{name}.safetensors", directory / f"{name}.json"
        with atomic_path(weights) as tmp:
            save_file(
                {"coef": self.coef, "intercept": self.intercept},
                str(tmp),
                metadata={"format": "brainrecon.ridge"},
            )
        save_config(self.config, config)
        return weights, config

    @classmethod
    def load(cls, directory: str | Path, name: str = "ridge") -> RidgeRegressor:
        from safetensors.numpy import load_file

        directory = Path(directory)
        weights_path = directory / f"{name}.safetensors"
        config = load_config(RidgeConfig, directory / f"{name}.json")
        if not weights_path.is_file():
            raise MissingFileError(weights_path, "ridge weights", "re-run the ridge fit that wrote it")
        tensors = load_file(str(weights_path))
        expected = {"coef": (config.n_features, config.n_targets), "intercept": (config.n_targets,)}
        for key, shape in expected.items():
            found = tensors.get(key)
            if found is None or found.shape != shape or found.dtype != np.float32:
                raise InputError(
                    weights_path,
                    f"{key}: float32 {shape}",
                    "missing" if found is None else f"{found.dtype} {found.shape}",
                )
        reg = cls(config.alpha)
        reg.coef, reg.intercept, reg.config = tensors["coef"], tensors["intercept"], config
        return reg


# ----------------------------------------------------------------------------- alpha search


def fit_alpha_on_validation(
    X: np.ndarray,
    Y: np.ndarray,
    alphas: list[float] | tuple[float, ...] | np.ndarray,
    val_fraction: float = 0.1,
    seed: int = 0,
    criterion: str = "corr",
) -> AlphaSearch:
    """Choose alpha on a random held-out split of (X, Y); refit on all data with `RidgeRegressor(best_alpha)`.

    One eigendecomposition of the training Gram matrix (n×n when v > n, else v×v), G = U diag(s) Uᵀ, gives every
    alpha's validation predictions as (Xval_c · B) diag(1/(s+α)) (Bᵀ · rhs) with fixed products, so each extra
    alpha costs one (n_val × k) @ (k × d) product.

    criterion:
      "corr" (default): mean over output dimensions of the Pearson r between prediction and target on the
        validation split (constant dimensions count as 0). Scale-free, so it matches the pipeline, which
        re-normalises predictions anyway (`renormalize_predictions`).
      "mse": mean squared error over all validation entries (lower is better).
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"alpha search criterion: expected one of {CRITERIA}, found {criterion!r}")
    alphas = tuple(_check_alpha(a) for a in np.atleast_1d(np.asarray(alphas, dtype=np.float64)))
    if not alphas:
        raise ConfigError("alpha search: expected at least one alpha, found none")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"alpha search val_fraction: expected a value in (0, 1), found {val_fraction}")
    _check_xy(X, Y)
    n = X.shape[0]
    n_val = int(round(n * val_fraction))
    if n_val < 2 or n - n_val < 2:
        raise InputError(
            "X", f"enough samples for a {val_fraction:.0%} validation split (≥ 2 each side)", f"{n} samples"
        )
    perm = np.random.default_rng(seed).permutation(n)
    tr, va = np.sort(perm[n_val:]), np.sort(perm[:n_val])

    x_mean = X[tr].mean(axis=0, dtype=np.float64)
    y_mean = Y[tr].mean(axis=0, dtype=np.float64)
    Xtr = X[tr].astype(np.float64) - x_mean  # (Ntr, V)
    Xva = X[va].astype(np.float64) - x_mean  # (Nva, V)
    Yva = Y[va].astype(np.float64)  # (Nva, D)
    dual = X.shape[1] > len(tr)
    if dual:
        s, U = np.linalg.eigh(Xtr @ Xtr.T)  # (Ntr,), (Ntr, Ntr)
        left = (Xva @ Xtr.T) @ U  # (Nva, Ntr): W = Xtrᵀ U diag Uᵀ Yc, applied to Xva
    else:
        s, U = np.linalg.eigh(Xtr.T @ Xtr)  # (V,), (V, V)
        left = Xva @ U  # (Nva, V): W = U diag Uᵀ Xtrᵀ Yc, applied to Xva
    s = np.clip(s, 0.0, None)  # round-off can make tiny eigenvalues of a PSD Gram slightly negative

    # accumulate per-alpha statistics over output chunks so d = 91,168 outputs never need n × d float64 at once
    sq_err = np.zeros(len(alphas))
    corr_sum = np.zeros(len(alphas))
    for start in range(0, Y.shape[1], OUTPUT_CHUNK):
        cols = slice(start, start + OUTPUT_CHUNK)
        Yc = Y[tr, cols].astype(np.float64) - y_mean[cols]  # (Ntr, c)
        right = U.T @ Yc if dual else U.T @ (Xtr.T @ Yc)  # (k, c)
        target = Yva[:, cols]
        for a, alpha in enumerate(alphas):
            pred = (left / (s + alpha)) @ right + y_mean[cols]  # (Nva, c)
            sq_err[a] += np.sum((pred - target) ** 2)
            corr_sum[a] += np.sum(_columnwise_corr(pred, target))
    if criterion == "mse":
        scores = sq_err / (n_val * Y.shape[1])
        best = int(np.argmin(scores))
    else:
        scores = corr_sum / Y.shape[1]
        best = int(np.argmax(scores))
    return AlphaSearch(
        alphas=alphas,
        scores=tuple(float(x) for x in scores),
        criterion=criterion,
        best_alpha=alphas[best],
        n_train=len(tr),
        n_val=n_val,
    )


def _columnwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r per column; 0 where either column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt(np.sum(a * a, axis=0) * np.sum(b * b, axis=0))  # (D,)
    num = np.sum(a * b, axis=0)
    return np.divide(num, denom, out=np.zeros_like(num), where=denom > 0)


# ----------------------------------------------------------------------------- re-normalisation


def target_stats(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (ddof=0, as np.std in Brain-Diffuser) of the training targets."""
    if not isinstance(Y, np.ndarray) or Y.ndim != 2 or len(Y) < 2:
        raise InputError("Y", "an array of shape (n_samples >= 2, n_targets)", _describe(Y))
    return Y.mean(axis=0, dtype=np.float64), Y.std(axis=0, dtype=np.float64)
