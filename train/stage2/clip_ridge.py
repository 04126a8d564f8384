"""Stage-2 CLIP regressor: Brain-Diffuser's per-token ridge, stored and run as a reduced-rank factorisation.

Brain-Diffuser (ozcelikfu/brain-diffuser `scripts/cliptext_regression.py`, `scripts/clipvision_regression.py`)
fits one `Ridge(alpha)` per CLIP token t: betas X (n×v) → Y[:, t, :] (n×D); text 77×768 with alpha 1e5,
vision 257×768 with alpha 6e4. Every token shares X and alpha, so the per-token ridges are exactly one
multi-output ridge X → Y.reshape(n, T·D): the ridge solution is column-separable
(W = Xcᵀ (XcXcᵀ + αI)⁻¹ Yc acts on each output column alone). At real size that is
(77+257)·768·15,724 ≈ 4.03 B weights (16 GB fp32), too large to ship.

Reduced-rank ridge (reduced-rank regression, Izenman 1975, applied to the ridge fit): with the centred training
fitted values Ŷc = Xc W (n×T·D) and V_r its top-r right singular vectors (principal directions of Ŷc),
W_r = W V_r V_rᵀ = A B with A = W V_r (v×r) and B = V_rᵀ (r×T·D). This is the projection of the ridge fit onto
the r output directions it explains best on the training set, the standard RRR choice (not a truncated SVD of W,
which would weight directions by weight norm rather than by how much of the fitted targets they carry).
At r = rank(Ŷc) it is the full ridge exactly. The intercept stays a full T·D vector.

Everything is computed in the dual (n×n) form, chunked over output columns, so W (v×T·D) and the n×T·D float64
matrices are never materialised; with K = XcXcᵀ and C = (K + αI)⁻¹Yc:
  W = XcᵀC,   Ŷc = K C,   Ŷc Ŷcᵀ = K M K with M = C Cᵀ  →  eigh gives U, s² (Ŷc = U diag(s) Vᵀ)
  V_r = Cᵀ K U_r / s_r,   A = W V_r = Xcᵀ M K U_r / s_r,   B = V_rᵀ = (U_rᵀ K C) / s_r
The ridge math is `brainrecon.train.stage1.ridge.RidgeRegressor`'s dual solver; it is not called directly because it
stores W, the one thing this module exists to avoid. `tests/test_clip_ridge.py` checks the result against
per-token `RidgeRegressor` fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from brainrecon.config import load_config, save_config
from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.io import atomic_path
from brainrecon.train.stage1.ridge import (
    _check_alpha,
    _check_xy,
    _describe,
    renormalize_predictions,
    target_stats,
)

OUTPUT_CHUNK = 8192  # output columns per pass: bounds float64 temporaries to n × 8192 (≈ 0.6 GB at n=8859)
RANK_GRID_START = 8
REL_TOL = 0.01  # automatic rank: smallest r with val MSE ≤ (1 + REL_TOL) · full-rank val MSE
EIG_RTOL = 1e-12  # squared singular values below EIG_RTOL · max are numerical zeros (rank of Ŷc)


@dataclass(frozen=True)
class ClipRidgeConfig:
    """Saved beside the factors as `<name>.json`."""

    alpha: float
    n_features: int  # v, voxels
    n_tokens: int  # T (77 text, 257 vision)
    dim: int  # D (768)
    rank: int  # r, inner dimension of A (v×r) · B (r×T·D)
    n_train: int
    rank_selection: str  # "given" or "validation"
    renormalize: bool = True  # Brain-Diffuser's transductive re-normalisation, on by default for parity
    val_ranks: tuple[int, ...] = ()  # validation curve (empty when the rank was given)
    val_mse: tuple[float, ...] = ()
    val_mse_full: float | None = None
    val_fraction: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class RankSearch:
    """Validation curve of `fit_clip_ridge(rank=None)`: MSE per rank against the full-rank ridge."""

    ranks: tuple[int, ...]
    val_mse: tuple[float, ...]
    val_mse_full: float
    best_rank: int
    n_train: int
    n_val: int


# ----------------------------------------------------------------------------- checks


def _check_clip_inputs(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Validate X (n, v) and Y (n, T, D); return Y flattened to (n, T·D) (a view)."""
    if not isinstance(Y, np.ndarray) or Y.ndim != 3 or not np.issubdtype(Y.dtype, np.floating):
        raise InputError("Y", "a float array of shape (n_samples, n_tokens, dim)", _describe(Y))
    Y2 = Y.reshape(Y.shape[0], -1)  # (N, T·D)
    _check_xy(X, Y2)
    return Y2


# ----------------------------------------------------------------------------- dual reduced-rank solve


@dataclass
class _Factors:
    x_mean: np.ndarray  # (V,) float64
    y_mean: np.ndarray  # (T·D,) float64
    A: np.ndarray  # (V, r) float32
    B: np.ndarray | None  # (r, T·D) float32; None in validation mode (never kept at full size)
    val_mse: np.ndarray | None = None  # (len(ranks),) in validation mode
    val_mse_full: float | None = None


def _solve(
    X: np.ndarray,
    Y2: np.ndarray,
    alpha: float,
    max_rank: int,
    X_val: np.ndarray | None = None,
    Y_val: np.ndarray | None = None,
    ranks: tuple[int, ...] = (),
) -> _Factors:
    """Reduced-rank ridge factors of (X, Y2) at rank ≤ max_rank (clipped to the numerical rank of Ŷc).

    With X_val/Y_val, B is not kept: each output chunk of B is applied to the validation set and scored for every
    rank in `ranks` (and the full ridge) on the spot, so the search never holds an r_max × T·D matrix.
    """
    x_mean = X.mean(axis=0, dtype=np.float64)  # (V,)
    y_mean = Y2.mean(axis=0, dtype=np.float64)  # (T·D,)
    Xc = X.astype(np.float64) - x_mean  # (N, V)
    K = Xc @ Xc.T  # (N, N)
    chol = scipy.linalg.cho_factor(K + alpha * np.eye(len(K)), lower=True, check_finite=False)
    d = Y2.shape[1]

    def dual_chunk(cols: slice) -> np.ndarray:  # C[:, cols] = (K + αI)⁻¹ Yc[:, cols], (N, c)
        Yc = Y2[:, cols].astype(np.float64) - y_mean[cols]
        return scipy.linalg.cho_solve(chol, Yc, check_finite=False)

    # pass 1: M = C Cᵀ, so Ŷc Ŷcᵀ = K M K without holding C (n × T·D)
    M = np.zeros_like(K)  # (N, N)
    for start in range(0, d, OUTPUT_CHUNK):
        C = dual_chunk(slice(start, start + OUTPUT_CHUNK))
        M += C @ C.T
    s2, U = np.linalg.eigh(K @ M @ K)  # ascending
    s2, U = s2[::-1], U[:, ::-1]  # descending: leading principal directions of Ŷc first
    n_nonzero = int(np.sum(s2 > EIG_RTOL * max(s2[0], np.finfo(np.float64).tiny)))
    r = max(1, min(max_rank, n_nonzero))
    s = np.sqrt(s2[:r])  # (r,)
    KU = (K @ U[:, :r]) / s  # (N, r): V_r = Cᵀ KU, A = Xcᵀ M KU
    A = (Xc.T @ (M @ KU)).astype(np.float32)  # (V, r)

    if X_val is None:
        B = np.empty((r, d), dtype=np.float32)
        for start in range(0, d, OUTPUT_CHUNK):
            cols = slice(start, start + OUTPUT_CHUNK)
            B[:, cols] = KU.T @ dual_chunk(cols)  # (r, c)
        return _Factors(x_mean, y_mean, A, B)

    # validation mode: accumulate squared errors chunk by chunk
    Xv = X_val.astype(np.float64) - x_mean  # (Nva, V)
    XvA = Xv @ A.astype(np.float64)  # (Nva, r) — from the float32 A that would be stored
    XvXt = Xv @ Xc.T  # (Nva, N): full ridge prediction is XvXt @ C
    sq_err = np.zeros(len(ranks))
    sq_err_full = 0.0
    for start in range(0, d, OUTPUT_CHUNK):
        cols = slice(start, start + OUTPUT_CHUNK)
        C = dual_chunk(cols)
        Bc = (KU.T @ C).astype(np.float32).astype(np.float64)  # (r, c)
        target = Y_val[:, cols].astype(np.float64) - y_mean[cols]  # (Nva, c)
        sq_err_full += float(np.sum((XvXt @ C - target) ** 2))
        for i, rank in enumerate(ranks):
            k = min(rank, r)
            sq_err[i] += np.sum((XvA[:, :k] @ Bc[:k] - target) ** 2)
    n_entries = Y_val.shape[0] * d
    return _Factors(x_mean, y_mean, A, None, sq_err / n_entries, sq_err_full / n_entries)


def rank_grid(max_rank: int, start: int = RANK_GRID_START) -> tuple[int, ...]:
    """8, 16, 32, ... below max_rank, then max_rank itself (the full ridge when max_rank ≥ rank of Ŷc)."""
    grid = []
    r = start
    while r < max_rank:
        grid.append(r)
        r *= 2
    return (*grid, max_rank)


# ----------------------------------------------------------------------------- model


class ClipRidge:
    """Per-token CLIP ridge as W ≈ A (V×r) · B (r×T·D) + intercept. Predicts without materialising W.

    >>> model = fit_clip_ridge(train_betas, train_clip_text, alpha=1e5)  # rank chosen on a validation split
    >>> pred = model.predict(test_betas)  # (n_test, 77, 768) float32, re-normalised over the test set
    """

    def __init__(
        self,
        A: np.ndarray,
        B: np.ndarray,
        intercept: np.ndarray,
        target_mean: np.ndarray,
        target_std: np.ndarray,
        config: ClipRidgeConfig,
    ):
        self.A = A  # (V, r) float32
        self.B = B  # (r, T·D) float32
        self.intercept = intercept  # (T·D,) float32
        self.target_mean = target_mean  # (T·D,) float32, training targets, for renormalize
        self.target_std = target_std  # (T·D,) float32
        self.config = config

    @property
    def parameter_count(self) -> int:
        """Stored regression parameters: A, B and the intercept (target stats excluded)."""
        return self.A.size + self.B.size + self.intercept.size

    @property
    def full_rank_parameter_count(self) -> int:
        """Parameters of the equivalent per-token ridges: v·T·D weights + T·D intercepts."""
        c = self.config
        return c.n_features * c.n_tokens * c.dim + c.n_tokens * c.dim

    def predict(self, X: np.ndarray, renormalize: bool | None = None) -> np.ndarray:
        """(N, V) → (N, T, D) float32. `renormalize` defaults to the config's (True: needs N ≥ 2, transductive)."""
        _check_xy(X)
        c = self.config
        if X.shape[1] != c.n_features:
            raise InputError("X", f"{c.n_features} voxels (as the fitted model)", f"{X.shape[1]}")
        # (X A) B: N·r·(V + T·D) flops instead of N·V·T·D, and W is never formed
        pred = (X.astype(np.float32, copy=False) @ self.A) @ self.B + self.intercept  # (N, T·D)
        if c.renormalize if renormalize is None else renormalize:
            pred = renormalize_predictions(pred, self.target_mean, self.target_std)
        return pred.reshape(len(X), c.n_tokens, c.dim)  # (N, T, D)

    # ------------------------------------------------------------------------- save / load

    def save(self, directory: str | Path, name: str = "clip_ridge") -> tuple[Path, Path]:
        """Write `<name>.safetensors` (A, B, intercept, target stats) and `<name>.json`, each atomically."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        weights, config = directory / f"{name}.safetensors", directory / f"{name}.json"
        with atomic_path(weights) as tmp:
            save_file(
                {k: np.ascontiguousarray(v) for k, v in self._tensors().items()},
                str(tmp),
                metadata={"format": "brainrecon.clip_ridge"},
            )
        save_config(self.config, config)
        return weights, config

    def _tensors(self) -> dict[str, np.ndarray]:
        return {
            "A": self.A,
            "B": self.B,
            "intercept": self.intercept,
            "target_mean": self.target_mean,
            "target_std": self.target_std,
        }

    @classmethod
    def load(cls, directory: str | Path, name: str = "clip_ridge") -> ClipRidge:
        from safetensors.numpy import load_file

        directory = Path(directory)
        weights_path = directory / f"{name}.safetensors"
        config = load_config(ClipRidgeConfig, directory / f"{name}.json")
        if not weights_path.is_file():
            raise MissingFileError(weights_path, "CLIP ridge factors", "re-run fit_clip_ridge and save")
        tensors = load_file(str(weights_path))
        td = config.n_tokens * config.dim
        expected = {
            "A": (config.n_features, config.rank),
            "B": (config.rank, td),
            "intercept": (td,),
            "target_mean": (td,),
            "target_std": (td,),
        }
        for key, shape in expected.items():
            found = tensors.get(key)
            if found is None or found.shape != shape or found.dtype != np.float32:
                raise InputError(
                    weights_path,
                    f"{key}: float32 {shape}",
                    "missing" if found is None else f"{found.dtype} {found.shape}",
                )
        return cls(config=config, **{k: tensors[k] for k in expected})


# ----------------------------------------------------------------------------- fit


def fit_clip_ridge(
    X: np.ndarray,
    Y: np.ndarray,
    alpha: float,
    rank: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    renormalize: bool = True,
) -> ClipRidge:
    """Fit the per-token ridge X (N, V) → Y (N, T, D) with one alpha, stored at reduced rank.

    rank: an int fits that rank (clipped to the rank of the fitted values; rank ≥ min(N, V, T·D) gives the full
      ridge exactly). None chooses it: on a random `val_fraction` split, the smallest r of `rank_grid` whose
      validation MSE is within 1% of the full-rank ridge's; then refits on all data at that r. The curve is kept
      in the config (`val_ranks`, `val_mse`, `val_mse_full`).
    """
    alpha = _check_alpha(alpha)
    Y2 = _check_clip_inputs(X, Y)  # (N, T·D)
    n, v = X.shape
    _, t, dim = Y.shape
    cap = min(n, v, t * dim)
    search: RankSearch | None = None
    if rank is None:
        search = search_rank(X, Y, alpha, val_fraction=val_fraction, seed=seed)
        rank = search.best_rank
    elif not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"CLIP ridge rank: expected an int ≥ 1 or None, found {rank!r}")

    f = _solve(X, Y2, alpha, min(int(rank), cap))
    r = f.A.shape[1]
    # intercept from the float32 factors used in predict, so predict(x_mean) == y_mean up to rounding
    intercept = f.y_mean - (f.x_mean @ f.A.astype(np.float64)) @ f.B.astype(np.float64)  # (T·D,)
    t_mean, t_std = target_stats(Y2)
    config = ClipRidgeConfig(
        alpha=alpha,
        n_features=v,
        n_tokens=t,
        dim=dim,
        rank=r,
        n_train=n,
        rank_selection="given" if search is None else "validation",
        renormalize=bool(renormalize),
        val_ranks=() if search is None else search.ranks,
        val_mse=() if search is None else search.val_mse,
        val_mse_full=None if search is None else search.val_mse_full,
        val_fraction=None if search is None else float(val_fraction),
        seed=None if search is None else int(seed),
    )
    return ClipRidge(
        f.A,
        f.B,
        intercept.astype(np.float32),
        t_mean.astype(np.float32),
        t_std.astype(np.float32),
        config,
    )


def search_rank(
    X: np.ndarray,
    Y: np.ndarray,
    alpha: float,
    val_fraction: float = 0.1,
    seed: int = 0,
    rel_tol: float = REL_TOL,
) -> RankSearch:
    """Validation MSE per rank of `rank_grid(min(N_train, V, T·D))` and of the full-rank ridge (MSE, not
    correlation: the rank should preserve the ridge's predictions, which MSE measures directly)."""
    alpha = _check_alpha(alpha)
    Y2 = _check_clip_inputs(X, Y)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"rank search val_fraction: expected a value in (0, 1), found {val_fraction}")
    n = X.shape[0]
    n_val = int(round(n * val_fraction))
    if n_val < 2 or n - n_val < 2:
        raise InputError(
            "X", f"enough samples for a {val_fraction:.0%} validation split (≥ 2 each side)", f"{n} samples"
        )
    perm = np.random.default_rng(seed).permutation(n)  # same split rule as ridge.fit_alpha_on_validation
    tr, va = np.sort(perm[n_val:]), np.sort(perm[:n_val])
    ranks = rank_grid(min(len(tr), X.shape[1], Y2.shape[1]))
    f = _solve(X[tr], Y2[tr], alpha, ranks[-1], X_val=X[va], Y_val=Y2[va], ranks=ranks)
    assert f.val_mse is not None and f.val_mse_full is not None
    ok = np.flatnonzero(f.val_mse <= (1.0 + rel_tol) * f.val_mse_full)
    best = ranks[int(ok[0])] if len(ok) else ranks[-1]
    return RankSearch(
        ranks=ranks,
        val_mse=tuple(float(x) for x in f.val_mse),
        val_mse_full=float(f.val_mse_full),
        best_rank=best,
        n_train=len(tr),
        n_val=n_val,
    )


# ----------------------------------------------------------------------------- real-size arithmetic


def real_size_parameter_report(
    n_voxels: int = 15724,
    tokens: tuple[int, ...] = (77, 257),
    dim: int = 768,
    rank: int = 256,
) -> dict:
    """Parameters of the per-token ridges vs their reduced-rank factorisation, one regressor per token set
    (text 77, vision 257), and fp16 sizes in MB (10⁶ bytes). Pure arithmetic."""
    per_model = {}
    for t in tokens:
        td = t * dim
        per_model[t] = {
            "full_params": n_voxels * td + td,
            "reduced_params": n_voxels * rank + rank * td + td,
        }
    full = sum(m["full_params"] for m in per_model.values())
    reduced = sum(m["reduced_params"] for m in per_model.values())
    return {
        "n_voxels": n_voxels,
        "tokens": tuple(tokens),
        "dim": dim,
        "rank": rank,
        "per_model": per_model,
        "full_params": full,
        "reduced_params": reduced,
        "full_mb_fp16": full * 2 / 1e6,
        "reduced_mb_fp16": reduced * 2 / 1e6,
        "compression": full / reduced,
    }
