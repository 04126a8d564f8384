"""LDM training (train/foundations/ldm_train.py): tiny seeded configs, tiny random data, a handful of CPU steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from brainrecon.errors import InputError, MissingFileError
from brainrecon.train.foundations.dual_unet import DualUNetConfig
from brainrecon.train.foundations.ldm_train import load_dual_unet, train_dual_unet, train_vae
from tests.fixtures import tiny_vae_config

# A reloaded model's parameters are bytes copied, so they are compared exactly; its outputs are compared with
# ATOL_RELOAD, because two separately built modules need not run the same kernels. The trained model (the EMA copy)
# has requires_grad=False, the reloaded one True, and ATen's matmul folds a strided (B, T, D) @ (D, E) product (the
# text tokens are a slice of the context) into one mm or runs it batched depending on that flag; MKL sums the two
# in different orders on some CPUs. Measured on UNet outputs of scale 1.4, AMD EPYC, torch 2.13: 6.9e-7 (AVX-512,
# 2 threads), 1.4e-6 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2), 0 (1 thread); 0 on the Intel Xeon (AMX)
# the suite was written on. The VAE's reload measured 0 in all of these.
ATOL_RELOAD = 1e-5  # ~7x the largest difference measured, 7e-6 of the outputs' scale

CFG = DualUNetConfig.tiny()


def _images(n: int = 4, seed: int = 0) -> np.ndarray:
    # 4x4 blocks of colour: structured like the simulated stimuli, so a tiny VAE can fit it in a few steps.
    coarse = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return coarse.repeat(4, axis=1).repeat(4, axis=2)  # (N, 16, 16, 3)


def _unet_data(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = CFG.cross_attention_dim
    return {
        "latents": torch.randn(n, 4, CFG.sample_size, CFG.sample_size, generator=g),  # (N, 4, 8, 8)
        "vision_ctx": torch.randn(n, CFG.vision_tokens, d, generator=g),
        "text_ctx": torch.randn(n, CFG.text_tokens, d, generator=g),
        "uncond_vision": torch.zeros(1, CFG.vision_tokens, d),
        "uncond_text": torch.zeros(1, CFG.text_tokens, d),
    }


def _vae(out, steps: int, **kw):
    return train_vae(
        _images(), tiny_vae_config(), out, steps=steps, batch_size=4, lr=2e-3, progress=False, **kw
    )


def _unet(out, steps: int, data=None, **kw):
    return train_dual_unet(
        unet_config=CFG,
        out_dir=out,
        steps=steps,
        batch_size=4,
        lr=1e-3,
        progress=False,
        **(data or _unet_data()),
        **kw,
    )


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical tensors. Exact by construction for two runs in one process (the same ops on the same shapes,
    thread count and requires_grad flags, so the same kernels) and for weights copied through a file."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_vae_overfits_and_reloads(tmp_path):
    result = _vae(tmp_path, steps=20)
    losses = [r["loss"] for r in result["history"]]
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])
    reloaded = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    _assert_same(_state(result["model"]), _state(reloaded))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = result["model"].decode(result["model"].encode(x).latent_dist.mean).sample
        got = reloaded.decode(reloaded.encode(x).latent_dist.mean).sample
    torch.testing.assert_close(got, want, atol=ATOL_RELOAD, rtol=0)
    assert (tmp_path / "train.json").is_file()


def test_vae_deterministic_and_resume(tmp_path):
    full_a = _vae(tmp_path / "a", steps=4, checkpoint_every=2)
    full_b = _vae(tmp_path / "b", steps=4, checkpoint_every=2)
    _assert_same(_state(full_a["model"]), _state(full_b["model"]))
    _vae(tmp_path / "c", steps=2)
    resumed = _vae(tmp_path / "c", steps=4, resume=True)
    _assert_same(_state(full_a["model"]), _state(resumed["model"]))
    assert resumed["final_loss"] == full_a["final_loss"]


def test_unet_overfits(tmp_path):
    # A fixed timestep range would make this sharper, but even with random t the noise MSE on 4 samples falls.
    result = _unet(tmp_path, steps=20, ema_rate=0.0)
    losses = [r["loss"] for r in result["history"]]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_unet_deterministic_resume_and_reload(tmp_path):
    full_a = _unet(tmp_path / "a", steps=4, checkpoint_every=2)
    full_b = _unet(tmp_path / "b", steps=4, checkpoint_every=2)
    _assert_same(_state(full_a["model"]), _state(full_b["model"]))
    _unet(tmp_path / "c", steps=2)
    resumed = _unet(tmp_path / "c", steps=4, resume=True)
    _assert_same(_state(full_a["model"]), _state(resumed["model"]))  # EMA weights (ema_rate 0.999)

    reloaded = load_dual_unet(tmp_path / "a" / "unet")
    _assert_same(_state(full_a["model"]), _state(reloaded))
    d = _unet_data(2, seed=1)
    ctx = torch.cat([d["vision_ctx"], d["text_ctx"]], dim=1)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        want = full_a["model"](d["latents"], t, encoder_hidden_states=ctx).sample
        got = reloaded(d["latents"], t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, want, atol=ATOL_RELOAD, rtol=0)


def test_checkpoint_without_resume_is_refused(tmp_path):
    _unet(tmp_path, steps=1)
    with pytest.raises(InputError, match="resume=True"):
        _unet(tmp_path, steps=2)


@pytest.mark.parametrize(
    "name, bad",
    [
        ("latents", torch.randn(4, 4, 4, 4)),  # wrong latent side
        ("vision_ctx", torch.randn(3, CFG.vision_tokens, CFG.cross_attention_dim)),  # batch mismatch
        ("text_ctx", torch.randn(4, CFG.text_tokens + 1, CFG.cross_attention_dim)),  # token count
        ("uncond_vision", torch.randn(2, CFG.vision_tokens, CFG.cross_attention_dim)),  # not (1, Nv, D)
        ("latents", torch.randn(4, 4, 8, 8, dtype=torch.float64)),  # dtype
        ("text_ctx", np.zeros((4, CFG.text_tokens, CFG.cross_attention_dim), np.float32)),  # not a tensor
    ],
)
def test_unet_bad_inputs(tmp_path, name, bad):
    data = _unet_data()
    data[name] = bad
    with pytest.raises(InputError, match=name) as info:
        _unet(tmp_path, steps=1, data=data)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoint").exists()


def test_vae_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="uint8"):
        train_vae(
            _images().astype(np.float32), tiny_vae_config(), tmp_path, steps=1, batch_size=4, progress=False
        )
    with pytest.raises(InputError, match="uint8"):
        train_vae(_images()[:, :8], tiny_vae_config(), tmp_path, steps=1, batch_size=4, progress=False)
    with pytest.raises(InputError, match="batch_size"):
        train_vae(_images(2), tiny_vae_config(), tmp_path, steps=1, batch_size=4, progress=False)


def test_training_curves_of_a_run(tmp_path):
    import json

    from brainrecon.train.experiments.curves import training_curves

    _vae(tmp_path / "vae", steps=6)
    result = training_curves({"vae": tmp_path / "vae"}, tmp_path / "out", window=2)
    run = result["runs"]["vae"]
    history = json.loads((tmp_path / "vae" / "checkpoint" / "state.json").read_text())["history"]
    assert run["steps"] == 6 and run["step"] == [2, 4, 6]
    assert run["curves"]["loss"][0] == pytest.approx((history[0]["loss"] + history[1]["loss"]) / 2, abs=1e-5)
    assert set(run["curves"]) == {"loss", "rec", "kl"}
    assert json.loads((tmp_path / "out" / "training.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "out" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MissingFileError, match="checkpoint state"):
        training_curves({"x": tmp_path / "missing"}, tmp_path / "out2")
