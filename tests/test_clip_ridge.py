"""CLIP ridge: stacked = per-token ridges; reduced rank at full rank = full ridge; automatic rank; save/load."""

from __future__ import annotations

import numpy as np
import pytest

from brainrecon.errors import ConfigError, InputError
from brainrecon.train.stage1.ridge import RidgeRegressor
from brainrecon.train.stage2.clip_ridge import (
    ClipRidge,
    fit_clip_ridge,
    rank_grid,
    real_size_parameter_report,
)

N, V, T, D = 120, 300, 5, 16


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


def _synthetic(true_rank: int | None, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X (N, V) with non-zero voxel means; Y (N, T, D) from a rank-`true_rank` map (dense if None) plus noise."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, V)) + rng.normal(size=V)
    if true_rank is None:
        W = rng.normal(size=(V, T * D)) / np.sqrt(V)
    else:
        W = rng.normal(size=(V, true_rank)) @ rng.normal(size=(true_rank, T * D)) / np.sqrt(V * true_rank)
    Y = X @ W + 2.0 + noise * rng.normal(size=(N, T * D))
    return X.astype(np.float32), Y.reshape(N, T, D).astype(np.float32)


@pytest.fixture(scope="module")
def dense() -> tuple[np.ndarray, np.ndarray]:
    return _synthetic(None, noise=0.3)


def test_stacked_full_rank_equals_per_token_ridges(dense):
    """One alpha for all outputs ⇒ the stacked ridge is the per-token ridges (Brain-Diffuser fits one per token)."""
    X, Y = dense
    alpha = 50.0
    X_test = np.random.default_rng(1).normal(size=(9, V)).astype(np.float32)
    per_token = np.stack(
        [RidgeRegressor(alpha).fit(X, Y[:, t]).predict(X_test) for t in range(T)], axis=1
    )  # (9, T, D)
    stacked = RidgeRegressor(alpha).fit(X, Y.reshape(N, T * D)).predict(X_test).reshape(9, T, D)
    assert _rel_err(stacked, per_token) < 1e-5
    # full rank: r ≥ min(N, V, T·D) is clipped to the rank of the fitted values and is the ridge itself
    model = fit_clip_ridge(X, Y, alpha, rank=N * V, renormalize=False)
    assert model.config.rank == T * D  # rank of Ŷc = min(N - 1, V, T·D) = 80
    assert _rel_err(model.predict(X_test), per_token) < 1e-5


def test_reduced_rank_at_fitted_rank_equals_full_ridge(dense):
    X, Y = _synthetic(None, noise=0.3, seed=2)
    X, Y = X[:40], Y[:40]  # N - 1 = 39 < T·D: the fitted values have rank 39, not T·D
    alpha = 10.0
    full = RidgeRegressor(alpha).fit(X, Y.reshape(40, T * D))
    model = fit_clip_ridge(X, Y, alpha, rank=39, renormalize=False)
    assert model.config.rank == 39 and model.config.rank_selection == "given"
    X_test = np.random.default_rng(3).normal(size=(7, V)).astype(np.float32)
    assert _rel_err(model.predict(X_test).reshape(7, -1), full.predict(X_test)) < 1e-5
    # a lower rank is a genuine approximation, and never materialises W
    low = fit_clip_ridge(X, Y, alpha, rank=8, renormalize=False)
    assert low.A.shape == (V, 8) and low.B.shape == (8, T * D)
    assert _rel_err(low.predict(X_test).reshape(7, -1), full.predict(X_test)) > 1e-3


def test_automatic_rank_on_low_rank_data():
    X, Y = _synthetic(true_rank=4, noise=0.3, seed=4)
    model = fit_clip_ridge(X, Y, alpha=50.0, rank=None, val_fraction=0.2, seed=0, renormalize=False)
    c = model.config
    assert c.rank_selection == "validation" and c.rank <= 16
    assert c.val_ranks == rank_grid(min(96, V, T * D)) == (8, 16, 32, 64, 80)
    assert len(c.val_mse) == len(c.val_ranks)
    chosen = c.val_mse[c.val_ranks.index(c.rank)]
    assert chosen <= 1.01 * c.val_mse_full
    # the top of the grid is the full ridge
    assert c.val_mse[-1] == pytest.approx(c.val_mse_full, rel=1e-5)
    assert model.parameter_count == V * c.rank + c.rank * T * D + T * D
    assert model.full_rank_parameter_count == V * T * D + T * D


def test_predict_shapes_dtypes_and_renormalize(dense):
    X, Y = dense
    model = fit_clip_ridge(X, Y, 50.0, rank=16)
    X_test = np.random.default_rng(5).normal(size=(11, V))  # float64 input is accepted
    raw = model.predict(X_test, renormalize=False)
    assert raw.shape == (11, T, D) and raw.dtype == np.float32
    renorm = model.predict(X_test)  # config default: on
    assert renorm.shape == (11, T, D) and renorm.dtype == np.float32
    flat = renorm.reshape(11, -1).astype(np.float64)
    np.testing.assert_allclose(flat.mean(0), model.target_mean, atol=1e-4)
    np.testing.assert_allclose(flat.std(0), model.target_std, rtol=1e-3)
    # intercept from the stored factors: the mean input maps to the mean target
    at_mean = model.predict(X.mean(0, keepdims=True), renormalize=False).reshape(-1)
    np.testing.assert_allclose(at_mean, Y.reshape(N, -1).mean(0), atol=1e-4)


def test_save_load_round_trip(dense, tmp_path):
    X, Y = dense
    model = fit_clip_ridge(X[:60], Y[:60], 50.0, rank=None, val_fraction=0.2)
    model.save(tmp_path, "clip_text")
    loaded = ClipRidge.load(tmp_path, "clip_text")
    assert loaded.config == model.config
    for name in ("A", "B", "intercept", "target_mean", "target_std"):  # bytes copied: exact
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name), err_msg=name)
    X_test = X[60:70]
    # The same matmuls on differently placed arrays may take another BLAS kernel: float32 rounding only
    # (measured: equal, AMD EPYC and Intel Xeon).
    pred = model.predict(X_test)
    np.testing.assert_allclose(loaded.predict(X_test), pred, rtol=0, atol=1e-6 * np.abs(pred).max())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_text.json", "clip_text.safetensors"]


@pytest.mark.parametrize(
    "case",
    ["Y 2-D", "Y NaN", "X NaN", "rows differ", "X int"],
)
def test_bad_inputs_raise_input_error(dense, case):
    X, Y = dense
    X, Y = X.copy(), Y.copy()
    if case == "Y 2-D":
        Y = Y.reshape(N, -1)
    elif case == "Y NaN":
        Y[3, 1, 2] = np.nan
    elif case == "X NaN":
        X[0, 0] = np.nan
    elif case == "rows differ":
        Y = Y[:-1]
    elif case == "X int":
        X = X.astype(np.int16)
    with pytest.raises(InputError):
        fit_clip_ridge(X, Y, 50.0, rank=8)


def test_bad_config_and_predict_inputs(dense):
    X, Y = dense
    with pytest.raises(ConfigError):
        fit_clip_ridge(X, Y, 50.0, rank=0)
    with pytest.raises(ConfigError):
        fit_clip_ridge(X, Y, -1.0, rank=8)
    model = fit_clip_ridge(X, Y, 50.0, rank=8)
    with pytest.raises(InputError):
        model.predict(X[:, :-1])
    with pytest.raises(InputError):
        model.predict(X[:1])  # re-normalisation over a set of one is meaningless


def test_real_size_parameter_report():
    full = (77 + 257) * 768 * 15724 + (77 + 257) * 768
    assert full == 4_033_651_200
    rep = real_size_parameter_report(rank=64)
    assert rep["full_params"] == full
    assert rep["full_mb_fp16"] == pytest.approx(full * 2 / 1e6)
    text, vision = 77 * 768, 257 * 768
    assert rep["reduced_params"] == (15724 * 64 + 64 * text + text) + (15724 * 64 + 64 * vision + vision)
    assert rep["compression"] > 100
    assert real_size_parameter_report(rank=256)["reduced_params"] > rep["reduced_params"]


def test_output_chunks_do_not_change_the_answer(dense, monkeypatch):
    import brainrecon.train.stage2.clip_ridge as clip_ridge

    X, Y = dense
    whole = fit_clip_ridge(X, Y, 50.0, rank=None, renormalize=False)
    monkeypatch.setattr(clip_ridge, "OUTPUT_CHUNK", 7)  # does not divide T·D = 80: exercises the ragged chunk
    chunked = fit_clip_ridge(X, Y, 50.0, rank=None, renormalize=False)
    assert chunked.config.rank == whole.config.rank
    np.testing.assert_allclose(
        chunked.config.val_mse, whole.config.val_mse, rtol=1e-12
    )  # summation order only
    X_test = X[:5]
    assert _rel_err(chunked.predict(X_test), whole.predict(X_test).astype(np.float64)) < 1e-5
