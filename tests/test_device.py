"""`--device` of the torch commands (train/device.py): cpu runs, a missing CUDA is a one-line error before any data
is read, an unknown device is a usage error; the device reaches the VDVAE encoder, the GRU and the references
(on the CPU here; the same tests on cuda where a GPU is present)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from brainrecon.train.device import DeviceError, resolve_device  # noqa: E402

BIN = Path(sys.executable).parent
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="expected one of cpu, cuda"):
        resolve_device("tpu")
    if not HAS_CUDA:
        with pytest.raises(DeviceError) as e:
            resolve_device("cuda")
        assert "--device cuda: expected a CUDA GPU, found none" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error of a machine without a GPU")
@pytest.mark.parametrize(
    "command",
    [
        ["recon-train", "subject", "--data", "/nonexistent/prep", "--model-dir", "/nonexistent/model"],
        [
            "recon-reconstruct",
            "--model-dir",
            "/nonexistent/model",
            "--data",
            "/nonexistent/prep",
            "--out",
            "/x",
        ],
    ],
)
def test_missing_cuda_is_a_one_line_error_before_any_data_is_read(command):
    proc = subprocess.run(
        [str(BIN / command[0]), *command[1:], "--device", "cuda"], capture_output=True, text=True
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--device cuda: expected a CUDA GPU" in lines[0], proc.stderr
    assert "nonexistent" not in proc.stderr  # refused before the data folder was looked at


def test_unknown_device_is_a_usage_error():
    proc = subprocess.run(
        [str(BIN / "recon-train"), "subject", "--data", "x", "--model-dir", "y", "--device", "tpu"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "tpu" in proc.stderr


@pytest.fixture(scope="module")
def tiny_subject(tmp_path_factory):
    from brainrecon.data.nsd import prepare_subject
    from brainrecon.data.sim import SimConfig, simulate_subject

    root = tmp_path_factory.mktemp("device")
    simulate_subject(root / "sim", SimConfig.preset("tiny"), seed=0)
    prepare_subject(root / "sim", root / "prep", progress=False)
    return root


@pytest.mark.parametrize("device", DEVICES)
def test_stage1_fit_and_reference_on_the_device(tiny_subject, device, monkeypatch):
    """fit_stage1 trains the GRU on `device` (seen by the model's parameters when train_gru returns), and the loaded
    reference (VDVAE, GRU) runs there; on a GPU its latents are close to a CPU fit's."""
    from brainrecon.train.stage1 import gru as gru_mod
    from brainrecon.train.stage1.fit import Stage1Config, Stage1Model, fit_stage1, load_prepared

    seen = []
    real_train = gru_mod.train_gru

    def spy_train(*args, **kwargs):
        model, history = real_train(*args, **kwargs)
        seen.append(next(model.parameters()).device.type)
        return model, history

    monkeypatch.setattr(gru_mod, "train_gru", spy_train)
    prep = tiny_subject / "prep"
    cfg = Stage1Config(regressor="gru", num_layers=5, max_epochs=1, seed=3)
    fit_stage1(prep, tiny_subject / f"m-{device}", cfg, progress=False, device=device, encode_batch=7)
    assert seen == [device]
    model = Stage1Model.load(tiny_subject / f"m-{device}", device)
    assert next(model.vdvae.parameters()).device.type == device
    assert next(model.regressor.parameters()).device.type == device
    betas, _ = load_prepared(prep, "test")
    recon = model.reconstruct(betas)
    assert recon.dtype == np.uint8 and recon.shape == (len(betas), 64, 64, 3)
    if device == "cuda":  # a GPU fit differs by kernels, not by recipe: close to a CPU fit
        fit_stage1(prep, tiny_subject / "m-cpu", cfg, progress=False, device="cpu")
        cpu = Stage1Model.load(tiny_subject / "m-cpu").predict_latents(betas)
        np.testing.assert_allclose(model.predict_latents(betas), cpu, atol=0.05 * float(np.abs(cpu).max()))
