"""`--device` of the torch commands (train/device.py): cpu runs, a missing CUDA is a one-line error before any data
is read, an unknown device is a usage error; the device reaches the VDVAE encoder, the GRU, the references and the
foundation trainers (on the CPU here; the same tests on cuda where a GPU is present)."""

from __future__ import annotations

import itertools
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


DATA = ["--data", "/nonexistent/prep"]
MODEL = ["--model-dir", "/nonexistent/model"]
OUT = ["--out", "/nonexistent/out"]
# Every command that runs torch; `recon-eval report` only reads files and has no --device.
TORCH_COMMANDS = [
    ["recon-train", "subject", *DATA, *MODEL],
    ["recon-reconstruct", *MODEL, *DATA, *OUT],
    *(
        ["recon-train", "foundation", name, *DATA, *OUT]
        for name in ("vdvae", "clip", "vae", "vae-refit", "unet")
    ),
    ["recon-eval", "stage1", *DATA, *OUT],
    ["recon-eval", "stage2", *MODEL, *DATA, *OUT],
    ["recon-eval", "noise", *MODEL, *DATA, *OUT],
    ["recon-eval", "layers", *DATA, *OUT],
]


def _command_id(command: list[str]) -> str:
    return " ".join(itertools.takewhile(lambda word: not word.startswith("-"), command))


@pytest.mark.skipif(HAS_CUDA, reason="checks the error of a machine without a GPU")
@pytest.mark.parametrize("command", TORCH_COMMANDS, ids=_command_id)
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
    from brainrecon.train.reference import Stage1Model
    from brainrecon.train.stage1 import gru as gru_mod
    from brainrecon.train.stage1.fit import Stage1Config, fit_stage1, load_prepared

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


def _tiny_unet_run(out, **kw):
    """Three steps of the tiny dual UNet on seeded random latents and contexts, with a checkpoint after step 2."""
    from brainrecon.train.foundations.dual_unet import DualUNetConfig
    from brainrecon.train.foundations.ldm_train import train_dual_unet

    cfg = DualUNetConfig.tiny()
    g = torch.Generator().manual_seed(0)
    d, side = cfg.cross_attention_dim, cfg.sample_size
    return train_dual_unet(
        torch.randn(4, 4, side, side, generator=g),  # (N, 4, h, w)
        torch.randn(4, cfg.vision_tokens, d, generator=g),
        torch.randn(4, cfg.text_tokens, d, generator=g),
        cfg,
        out,
        uncond_vision=torch.zeros(1, cfg.vision_tokens, d),
        uncond_text=torch.zeros(1, cfg.text_tokens, d),
        batch_size=2,
        lr=1e-3,
        checkpoint_every=2,
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_foundation_trainer_on_the_device(tmp_path, device, one_thread):
    """train_dual_unet (the shared LDM loop of the VAE and UNet trainers) on `device`: the returned model and every
    saved tensor are on the CPU; device="cpu" is bit-identical to the default; on a GPU (same batches and noise,
    drawn on the CPU) the losses are close to the CPU's and its checkpoint resumes on the CPU."""
    from safetensors.torch import load_file

    default = _tiny_unet_run(tmp_path / "default", steps=3)
    run = _tiny_unet_run(tmp_path / device, steps=3, device=device)
    assert next(run["model"].parameters()).device.type == "cpu"
    saved = {
        name: load_file(str(tmp_path / device / name))
        for name in ("unet/diffusion_pytorch_model.safetensors", "checkpoint/model.safetensors")
    }
    if device == "cpu":
        for k, v in default["model"].state_dict().items():
            assert torch.equal(run["model"].state_dict()[k], v), k
        for name, tensors in saved.items():
            want = load_file(str(tmp_path / "default" / name))
            assert tensors.keys() == want.keys() and all(torch.equal(tensors[k], want[k]) for k in want), name
    else:  # kernels differ, the recipe does not
        losses = [h["loss"] for h in run["history"]]
        np.testing.assert_allclose(losses, [h["loss"] for h in default["history"]], rtol=1e-3)
        resumed = _tiny_unet_run(tmp_path / device, steps=4, resume=True)  # the GPU checkpoint, on the CPU
        assert resumed["step"] == 4 and len(resumed["history"]) == 1


@pytest.fixture(scope="module")
def tiny_ridge_model(tiny_subject):
    from brainrecon.train.stage1.fit import Stage1Config, fit_stage1

    model_dir = tiny_subject / "ridge"
    fit_stage1(
        tiny_subject / "prep", model_dir, Stage1Config(regressor="ridge", num_layers=3), progress=False
    )
    return model_dir


@pytest.mark.parametrize(
    "command",
    [
        ["recon-train", "foundation", "vae", "--steps", "2", "--batch-size", "4"],
        ["recon-eval", "noise", "--levels", "1", "--seeds", "0", "--images", "4"],
    ],
    ids=_command_id,
)
def test_device_cpu_runs(tiny_subject, tiny_ridge_model, tmp_path, command):
    """`--device cpu` through the entry points: a foundation trainer and an experiment (stage 1 only) finish."""
    paths = ["--data", str(tiny_subject / "prep"), "--out", str(tmp_path / "out")]
    if command[0] == "recon-eval":
        paths += ["--model-dir", str(tiny_ridge_model)]
    proc = subprocess.run(
        [str(BIN / command[0]), *command[1:], *paths, "--device", "cpu"],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any((tmp_path / "out").iterdir())
