"""Ridge against a direct solve of the primal normal equations; alpha search; save/load; re-normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from brainrecon.errors import ConfigError, InputError
from brainrecon.train.stage1.ridge import (
    RidgeRegressor,
    fit_alpha_on_validation,
    renormalize_predictions,
    target_stats,
)


def _synthetic(n: int, v: int, d: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, v)) + rng.normal(size=v)  # non-zero voxel means exercise the intercept
    W = rng.normal(size=(v, d)) / np.sqrt(v)
    Y = X @ W + 3.0 + noise * rng.normal(size=(n, d))
    return X, Y, W


def _primal_reference(X: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """sklearn Ridge(fit_intercept=True) written out: centre, solve (XcᵀXc + αI) W = XcᵀYc, intercept."""
    xm, ym = X.mean(0), Y.mean(0)
    Xc, Yc = X - xm, Y - ym
    W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ Yc)
    return W, ym - xm @ W


@pytest.mark.parametrize("n, v", [(60, 300), (300, 40)], ids=["dual v>n", "primal v<n"])
@pytest.mark.parametrize("alpha", [0.5, 500.0])
def test_matches_primal_normal_equations(n, v, alpha):
    X, Y, _ = _synthetic(n, v, d=17, noise=0.5, seed=0)
    reg = RidgeRegressor(alpha).fit(X.astype(np.float32), Y.astype(np.float32))
    assert reg.config.solver == ("dual" if v > n else "primal")
    W, b = _primal_reference(
        X.astype(np.float32).astype(np.float64), Y.astype(np.float32).astype(np.float64), alpha
    )
    # float32 storage of the weights is the only loss: relative 1e-5 of the weight scale
    np.testing.assert_allclose(reg.coef, W, rtol=0, atol=1e-5 * np.abs(W).max())
    np.testing.assert_allclose(reg.intercept, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()))
    X_test = np.random.default_rng(1).normal(size=(9, v)).astype(np.float32)
    pred = reg.predict(X_test)
    assert pred.dtype == np.float32 and pred.shape == (9, 17)
    ref = X_test.astype(np.float64) @ W + b
    np.testing.assert_allclose(pred, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_output_chunks_do_not_change_the_answer(monkeypatch):
    import brainrecon.train.stage1.ridge as ridge

    X, Y, _ = _synthetic(50, 120, d=23, noise=0.1, seed=3)
    whole = RidgeRegressor(10.0).fit(X, Y)
    monkeypatch.setattr(ridge, "OUTPUT_CHUNK", 5)
    chunked = RidgeRegressor(10.0).fit(X, Y)
    # Each column is solved from the same float64 factor either way, but BLAS may run edge columns of a narrower
    # block through another micro-kernel (with or without FMA), so a float32 weight may round the other way: a
    # few ulps allowed (measured: equal, AMD EPYC and Intel Xeon); a misplaced chunk would be off by O(1).
    np.testing.assert_allclose(chunked.coef, whole.coef, rtol=1e-6, atol=1e-7 * np.abs(whole.coef).max())


def test_alpha_search_picks_a_sensible_alpha():
    # fMRI-like: a 10-dim stimulus drives both 400 noisy voxels and 30 targets; 120 training samples.
    # A tiny alpha overfits the voxel noise, a huge one shrinks everything: the optimum lies in between.
    rng = np.random.default_rng(4)
    latent = rng.normal(size=(150, 10))
    X = latent @ rng.normal(size=(10, 400)) + 2.0 * rng.normal(size=(150, 400)) + rng.normal(size=400)
    Y = latent @ rng.normal(size=(10, 30)) + rng.normal(size=(150, 30)) + 3.0
    alphas = [1e-3, 1e-1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e7]
    for criterion in ("corr", "mse"):
        search = fit_alpha_on_validation(X, Y, alphas, val_fraction=0.2, seed=0, criterion=criterion)
        assert search.n_val == 30 and search.n_train == 120
        assert 1e2 <= search.best_alpha <= 1e4, (criterion, search)
        best = max(search.scores) if criterion == "corr" else -min(search.scores)
        extremes = [search.scores[0], search.scores[-1]]
        worst_extreme = max(extremes) if criterion == "corr" else -min(extremes)
        assert best > worst_extreme + 0.01
    # the eigendecomposition shortcut reproduces a plain fit on the same split
    mse = fit_alpha_on_validation(X, Y, [100.0], val_fraction=0.2, seed=0, criterion="mse")
    perm = np.random.default_rng(0).permutation(150)
    tr, va = np.sort(perm[30:]), np.sort(perm[:30])
    pred = RidgeRegressor(100.0).fit(X[tr], Y[tr]).predict(X[va])
    assert mse.scores[0] == pytest.approx(np.mean((pred - Y[va]) ** 2), rel=1e-5)


def test_alpha_search_primal_branch():
    X, Y, _ = _synthetic(200, 20, d=5, noise=1.0, seed=5)
    search = fit_alpha_on_validation(X, Y, [1e-2, 1.0, 1e6], criterion="mse")
    assert search.best_alpha < 1e6


def test_save_load_roundtrip(tmp_path):
    X, Y, _ = _synthetic(40, 80, d=7, noise=0.1, seed=6)
    reg = RidgeRegressor(3.0).fit(X, Y)
    weights, config = reg.save(tmp_path / "stage1", name="vdvae_ridge")
    assert weights.name == "vdvae_ridge.safetensors" and config.name == "vdvae_ridge.json"
    assert not list((tmp_path / "stage1").glob(".*"))  # no temporary files left behind
    loaded = RidgeRegressor.load(tmp_path / "stage1", name="vdvae_ridge")
    assert loaded.config == reg.config
    np.testing.assert_array_equal(loaded.coef, reg.coef)  # bytes copied: exact
    np.testing.assert_array_equal(loaded.intercept, reg.intercept)
    # The same matmul on differently placed arrays may take another BLAS kernel: float32 rounding only
    # (measured: equal, AMD EPYC and Intel Xeon).
    pred = reg.predict(X)
    np.testing.assert_allclose(loaded.predict(X), pred, rtol=0, atol=1e-6 * np.abs(pred).max())


def test_input_validation():
    with pytest.raises(ConfigError, match="alpha"):
        RidgeRegressor(0.0)
    reg = RidgeRegressor(1.0)
    with pytest.raises(InputError, match="rows"):
        reg.fit(np.zeros((5, 3)), np.zeros((4, 2)))
    with pytest.raises(InputError, match="NaN"):
        reg.fit(np.full((5, 3), np.nan), np.zeros((5, 2)))
    with pytest.raises(InputError, match="unfitted"):
        reg.predict(np.zeros((2, 3)))
    reg.fit(np.random.default_rng(0).normal(size=(5, 3)), np.zeros((5, 2)))
    with pytest.raises(InputError, match="3 voxels"):
        reg.predict(np.zeros((2, 4)))


def test_renormalize_predictions():
    rng = np.random.default_rng(7)
    train_targets = rng.normal(loc=[1.0, -2.0, 5.0], scale=[0.5, 3.0, 1.0], size=(1000, 3))
    pred = rng.normal(loc=0.1, scale=0.01, size=(50, 3))  # shrunk ridge-like predictions
    pred[:, 2] = 4.0  # a constant dimension
    mean, std = target_stats(train_targets)
    out = renormalize_predictions(pred, mean, std)
    assert out.dtype == np.float32 and out.shape == pred.shape
    np.testing.assert_allclose(out[:, :2].mean(0), mean[:2], atol=1e-5)
    np.testing.assert_allclose(out[:, :2].std(0), std[:2], rtol=1e-5)  # ddof=0 on both sides
    np.testing.assert_allclose(out[:, 2], mean[2], rtol=1e-6)  # constant → target mean, not NaN
    # same as Brain-Diffuser's two lines (where defined)
    p = pred[:, :2]
    ref = (p - p.mean(0)) / p.std(0) * train_targets[:, :2].std(0) + train_targets[:, :2].mean(0)
    np.testing.assert_allclose(out[:, :2], ref, rtol=1e-5)
    # order-preserving per dimension: correlation with the raw predictions is 1
    assert np.corrcoef(out[:, 0], pred[:, 0])[0, 1] == pytest.approx(1.0)
    with pytest.raises(InputError, match="at least 2"):
        renormalize_predictions(pred[:1], mean, std)
    with pytest.raises(InputError, match="shape"):
        renormalize_predictions(pred, mean[:2], std)
