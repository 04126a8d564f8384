"""GRU mapper: architecture/parameter count, augmentation statistics, training recipe on tiny seeded data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from brainrecon.errors import ConfigError, InputError
from brainrecon.train.stage1.gru import (
    GRUMapper,
    GRUMapperConfig,
    GRUTrainConfig,
    augment,
    count_parameters,
    load_gru,
    predict,
    save_gru,
    train_gru,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = GRUTrainConfig(max_epochs=5, batch_size=32)


@pytest.fixture(scope="module")
def tiny_data() -> tuple[np.ndarray, np.ndarray]:
    """200 samples, 300 z-scored voxels, 20 targets linearly related to the voxels."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 300)).astype(np.float32)
    Y = (X @ rng.normal(size=(300, 20)) / np.sqrt(300)).astype(np.float32)
    return X, Y


def test_parameter_count_of_the_paper():
    with torch.device("meta"):  # shapes only: no 50 MB allocation
        model = GRUMapper(GRUMapperConfig(n_voxels=15_724, n_outputs=13_344))
    assert count_parameters(model) == 12_400_344


def test_forward_shape_and_batch_consistency():
    torch.manual_seed(0)
    model = GRUMapper(GRUMapperConfig(n_voxels=50, n_outputs=7)).eval()
    x = torch.randn(5, 50)
    out = model(x)
    assert out.shape == (5, 7)
    single = torch.cat([model(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(out, single, rtol=1e-4, atol=1e-5)


def test_augmentation_statistics():
    b, v = 20_000, 1_000
    x = torch.ones(b, v)
    out = augment(
        x, torch.Generator().manual_seed(0), noise_p=0.3, noise_std=1.0, mask_p=0.3, mask_max_len=500
    )
    assert torch.equal(x, torch.ones(b, v))  # input untouched
    zero = out == 0
    masked = zero.any(1)  # noise never hits exactly 0.0 in practice
    noisy = ((out != 1) & ~zero).sum(1) > v // 2
    assert abs(noisy.float().mean().item() - 0.3) < 0.015
    assert abs(masked.float().mean().item() - 0.3) < 0.015
    assert abs((noisy & masked).float().mean().item() - 0.09) < 0.01  # independent decisions
    # noise: std 1, mean 0 on the noised samples
    resid = (out[noisy & ~masked] - 1.0).flatten()
    assert abs(resid.mean().item()) < 0.01 and abs(resid.std().item() - 1.0) < 0.01
    # mask: one contiguous run per masked sample, length uniform in 1..499, never reaching the last voxel
    rows = zero[masked]
    lengths = rows.sum(1)
    first = rows.float().argmax(1)
    last = v - 1 - rows.flip(1).float().argmax(1)
    assert torch.equal(last - first + 1, lengths)
    assert lengths.min() >= 1 and lengths.max() <= 499
    assert abs(lengths.float().mean().item() - 250.0) < 10.0
    assert last.max() <= v - 2
    # p = 0 is the identity
    assert torch.equal(augment(x[:10], torch.Generator().manual_seed(1), 0.0, 1.0, 0.0, 500), x[:10])


def test_augmentation_short_inputs():
    # fewer voxels than the maximum run: runs are capped below the voxel count
    out = augment(
        torch.ones(2000, 30), torch.Generator().manual_seed(0), noise_p=0.0, mask_p=1.0, mask_max_len=500
    )
    lengths = (out == 0).sum(1)
    assert lengths.min() >= 1 and lengths.max() <= 29


def test_training_decreases_loss_and_is_deterministic(tiny_data):
    X, Y = tiny_data
    model_a, hist_a = train_gru(X, Y, TINY, seed=0, progress=False)
    assert hist_a.n_train == 180 and hist_a.n_val == 20
    assert hist_a.train_mse[-1] < hist_a.train_mse[0]
    assert hist_a.val_mse[-1] < hist_a.val_mse[0]
    assert hist_a.retrain_mse[-1] < hist_a.retrain_mse[0]
    model_b, hist_b = train_gru(X, Y, TINY, seed=0, progress=False)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert hist_a == hist_b
    model_c, _ = train_gru(X, Y, dataclasses.replace(TINY, max_epochs=1), seed=1, progress=False)
    assert not torch.equal(model_a.fc2.weight, model_c.fc2.weight)
    assert not model_a.training  # returned ready for inference


def test_retrain_replays_the_learning_rate_schedule(tiny_data):
    X, Y = tiny_data
    # a tiny lr and zero plateau patience force LR reductions; early stopping ends the first run
    cfg = dataclasses.replace(TINY, lr=1e-7, plateau_patience=0, early_stop_patience=3, max_epochs=12)
    _, hist = train_gru(X, Y, cfg, seed=0, progress=False)
    assert len(set(hist.lrs)) > 1, hist.lrs  # the schedule really changed
    assert all(a >= b for a, b in zip(hist.lrs, hist.lrs[1:], strict=False))
    assert hist.retrain_lrs == hist.lrs  # "all_run": every epoch of the first run, as the original
    assert hist.early_stopped and len(hist.lrs) == hist.best_epoch + cfg.early_stop_patience
    _, hist_best = train_gru(X, Y, dataclasses.replace(cfg, retrain_epochs="best"), seed=0, progress=False)
    assert hist_best.retrain_lrs == hist_best.lrs[: hist_best.best_epoch]


def test_no_retrain_returns_best_validation_weights(tiny_data):
    X, Y = tiny_data
    model, hist = train_gru(
        X, Y, dataclasses.replace(TINY, retrain=False, max_epochs=3), seed=0, progress=False
    )
    assert hist.retrain_lrs == [] and hist.best_epoch >= 1
    # re-evaluating the returned weights on the validation split gives the recorded best MSE
    perm = np.random.default_rng(0).permutation(len(X))
    val = perm[-hist.n_val :]
    mse = float(np.mean((predict(model, X[val]) - Y[val]) ** 2))
    assert mse == pytest.approx(hist.best_val_mse, rel=1e-4)


def test_predict_and_save_load(tiny_data, tmp_path):
    X, Y = tiny_data
    model, hist = train_gru(X, Y, dataclasses.replace(TINY, max_epochs=2), seed=0, progress=False)
    pred = predict(model, X, batch_size=64)
    assert pred.dtype == np.float32 and pred.shape == (200, 20)
    np.testing.assert_allclose(predict(model, X, batch_size=7), pred, rtol=1e-4, atol=1e-5)
    save_gru(model, tmp_path, name="vdvae_gru", train_config=TINY, history=hist)
    assert {p.name for p in tmp_path.iterdir()} == {
        "vdvae_gru.safetensors",
        "vdvae_gru.json",
        "vdvae_gru.train.json",
        "vdvae_gru.history.json",
    }
    loaded = load_gru(tmp_path, name="vdvae_gru")
    assert loaded.config == model.config and not loaded.training
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())  # bytes copied: exact
    # `load_gru` keeps the tensors where safetensors put them (`assign=True`, not 64-byte aligned); MKL's summation
    # order can depend on the operands' alignment, so outputs may differ by float32 rounding (measured: equal,
    # AMD EPYC with 1 and 2 threads and with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, and Intel Xeon).
    np.testing.assert_allclose(
        predict(loaded, X, batch_size=64), pred, rtol=0, atol=1e-6 * np.abs(pred).max()
    )
    with pytest.raises(InputError, match="shape"):
        predict(loaded, X[:, :10])


def test_config_validation(tiny_data):
    with pytest.raises(ConfigError, match="retrain_epochs"):
        GRUTrainConfig(retrain_epochs="last")
    with pytest.raises(ConfigError, match="loss"):
        GRUTrainConfig(loss="mae")
    X, Y = tiny_data
    with pytest.raises(InputError, match="rows"):
        train_gru(X, Y[:10], TINY, progress=False)
    with pytest.raises(InputError, match="validation split"):
        train_gru(X[:5], Y[:5], TINY, progress=False)
