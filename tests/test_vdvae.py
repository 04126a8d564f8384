"""VDVAE (train/foundations/vdvae.py, train/foundations/vdvae_train.py): openai layout, latents, deterministic decode, ONNX, training.

Tiny seeded configs on the CPU; the 125 M-parameter ImageNet-64 model is only ever built on the meta device.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.train.foundations.vdvae import (
    VDVAE,
    VDVAEConfig,
    VDVAEDecoder,
    decode_latents,
    dmol_nll,
    encode_latents,
    latent_dims,
    latent_shapes,
    load_openai_checkpoint,
    load_vdvae,
    prior_noise_shapes,
    save_vdvae,
    split_latents,
    vdvae_config,
)

# A loaded model's parameters are bytes copied and are compared exactly; its latents are compared with ATOL_RELOAD.
# `load_vdvae` keeps the tensors where safetensors put them (`assign=True`: not 64-byte aligned), and with one
# thread a 1x1 convolution on a small batch runs ATen's im2col + MKL sgemm (not oneDNN), whose summation order
# depends on the operands' alignment. Measured on latents of scale 0.1, AMD EPYC, torch 2.13: 1.1e-8 with 1 thread,
# 1.7e-8 with 1 thread and ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, 0 with 2 threads.
ATOL_RELOAD = 1e-6  # ~60x the largest difference measured, 1e-5 of the latents' scale

# Same code as imagenet64, small: widths change across resolutions (16 -> 32), so the encoder's channel
# padding and the decoder's mix-in slicing are exercised too. 6 latent layers at 1, 4, 8, 16, 16, 64.
TINY = VDVAEConfig(
    name="tiny",
    width=16,
    zdim=4,
    enc_blocks="64d4,16x1,16d2,8d2,4d4,1x1",
    dec_blocks="1x1,4m1,8m4,16m8,16x1,64m16",
    custom_width_str="8:32,4:32,1:32",
)


def _tiny_model(seed: int = 0, perturb: float = 0.05) -> VDVAE:
    """A tiny VDVAE whose zero-initialised weights (prior outputs, biases) are perturbed, so every path matters."""
    torch.manual_seed(seed)
    model = VDVAE(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * perturb)
    return model.eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------ openai layout


def test_imagenet64_matches_openai_layout():
    config = vdvae_config("imagenet64")
    with torch.device("meta"):
        model = VDVAE(config)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 125_005_860
    # 65 encoder blocks x 4 convs x 2 + in_conv 2; 75 decoder blocks x (3 x 8 + z_proj 2); 6 biases; out 2; gain, bias.
    assert len(state) == 2 + 65 * 8 + 75 * 26 + 6 + 2 + 2
    expected_shapes = {
        "encoder.in_conv.weight": (512, 3, 3, 3),
        "encoder.enc_blocks.0.c1.weight": (128, 512, 1, 1),
        "encoder.enc_blocks.64.c2.weight": (128, 128, 1, 1),  # 1x1 maps: no 3x3
        "decoder.dec_blocks.0.enc.c1.weight": (128, 1024, 1, 1),
        "decoder.dec_blocks.0.enc.c4.weight": (32, 128, 1, 1),
        "decoder.dec_blocks.2.prior.c2.weight": (128, 128, 3, 3),
        "decoder.dec_blocks.2.prior.c4.weight": (544, 128, 1, 1),
        "decoder.dec_blocks.74.resnet.c3.bias": (128,),
        "decoder.dec_blocks.74.z_proj.weight": (512, 16, 1, 1),
        "decoder.bias_xs.0": (1, 512, 1, 1),
        "decoder.bias_xs.5": (1, 512, 64, 64),
        "decoder.out_net.out_conv.weight": (100, 512, 1, 1),
        "decoder.gain": (1, 512, 1, 1),
        "decoder.bias": (1, 512, 1, 1),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "decoder.bias_xs.6" not in state
    assert config.num_latent_layers == 75
    # Brain-Diffuser's latent sizes: 31 layers -> 91,168 dims, 15 -> 13,344 (GRU decoding paper).
    assert latent_dims(config, 31) == 91_168
    assert latent_dims(config, 15) == 13_344
    assert latent_shapes(config, 3) == [(16, 1, 1), (16, 1, 1), (16, 4, 4)]


def test_small64_budget():
    config = vdvae_config("small64")
    with torch.device("meta"):
        model = VDVAE(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params <= 4_500_000 and 2 * n_params <= 10_000_000
    resolutions = {res for res, _ in config.dec_layers}
    assert {1, 4, 8, 16, 32} <= resolutions
    assert 20 <= config.num_latent_layers <= 30
    assert latent_dims(config, 5) < latent_dims(config, 10) < latent_dims(config, 15)


def test_openai_checkpoint_roundtrip(tmp_path):
    model = _tiny_model()
    state = model.state_dict()
    # openai saves a plain state dict; under DistributedDataParallel keys carry a `module.` prefix.
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.th")
    torch.save(state, tmp_path / "plain.th")
    for name in ("ddp.th", "plain.th"):
        loaded = load_openai_checkpoint(tmp_path / name, TINY)
        for k, v in loaded.state_dict().items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    images = _images(2)
    torch.testing.assert_close(
        encode_latents(loaded, images, 4), encode_latents(model, images, 4), rtol=0, atol=ATOL_RELOAD
    )


def test_openai_checkpoint_errors(tmp_path):
    with pytest.raises(MissingFileError, match="missing openai VDVAE checkpoint"):
        load_openai_checkpoint(tmp_path / "absent.th", TINY)
    state = _tiny_model().state_dict()
    broken = dict(state)
    del broken["decoder.gain"]
    broken["decoder.extra"] = torch.zeros(1)
    torch.save(broken, tmp_path / "keys.th")
    with pytest.raises(InputError, match=r"1 missing \(e\.g\. \['decoder\.gain'\]\) and 1 unexpected"):
        load_openai_checkpoint(tmp_path / "keys.th", TINY)
    wrong = dict(state)
    wrong["decoder.gain"] = torch.ones(1, 8, 1, 1)
    torch.save(wrong, tmp_path / "shape.th")
    with pytest.raises(InputError, match="1 mismatches"):
        load_openai_checkpoint(tmp_path / "shape.th", TINY)
    with pytest.raises(InputError, match="keys of VDVAE config 'imagenet64'"):
        load_openai_checkpoint(tmp_path / "shape.th")  # default: imagenet64
    (tmp_path / "garbage.th").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="weights_only"):
        load_openai_checkpoint(tmp_path / "garbage.th", TINY)


# ------------------------------------------------------------------------------------------ latents


@pytest.mark.parametrize("num_layers", [1, 3, 6])
def test_encode_decode_shapes(num_layers):
    model = _tiny_model()
    latents = encode_latents(model, _images(3), num_layers)
    assert latents.shape == (3, latent_dims(TINY, num_layers)) and latents.dtype == torch.float32
    parts = split_latents(latents, TINY, num_layers)
    assert [tuple(p.shape[1:]) for p in parts] == latent_shapes(TINY, num_layers)
    images = decode_latents(model, latents, num_layers)
    assert images.shape == (3, 64, 64, 3)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 255.0


def test_encode_is_deterministic_and_batch_independent():
    model = _tiny_model()
    images = _images(3)
    batch = encode_latents(model, images, 5)
    torch.testing.assert_close(encode_latents(model, images, 5), batch, rtol=0, atol=0)
    single = torch.cat([encode_latents(model, images[i : i + 1], 5) for i in range(3)])
    torch.testing.assert_close(single, batch, rtol=1e-4, atol=1e-4)
    # The first K layers do not depend on how many layers are encoded.
    torch.testing.assert_close(
        encode_latents(model, images, 6)[:, : batch.shape[1]], batch, rtol=1e-5, atol=1e-5
    )


def test_deterministic_decode_equals_zero_noise():
    model = _tiny_model()
    latents = torch.randn(2, latent_dims(TINY, 3), generator=torch.Generator().manual_seed(1))
    first = decode_latents(model, latents, 3)
    torch.testing.assert_close(decode_latents(model, latents, 3), first, rtol=0, atol=0)
    zeros = [torch.zeros(2, *s) for s in prior_noise_shapes(TINY, 3)]
    torch.testing.assert_close(decode_latents(model, latents, 3, noise=zeros), first, rtol=0, atol=1e-4)
    ones = [torch.ones(2, *s) for s in prior_noise_shapes(TINY, 3)]
    assert not torch.allclose(decode_latents(model, latents, 3, noise=ones), first)
    # Sampling (prior noise and DmoL) is reproducible through its generator.
    a = decode_latents(model, latents, 3, deterministic=False, generator=torch.Generator().manual_seed(0))
    b = decode_latents(model, latents, 3, deterministic=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, first)


def test_decoder_module_matches_decode_latents():
    model = _tiny_model()
    latents = torch.randn(2, latent_dims(TINY, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = VDVAEDecoder(model, 4)(latents)
    torch.testing.assert_close(out, decode_latents(model, latents, 4), rtol=0, atol=1e-4)


def test_input_checks():
    model = _tiny_model()
    with pytest.raises(InputError, match=r"\(B, 64, 64, 3\) NHWC"):
        encode_latents(model, torch.zeros(1, 3, 64, 64, dtype=torch.uint8), 2)
    with pytest.raises(InputError, match="float values in"):
        encode_latents(model, torch.full((1, 64, 64, 3), 300.0), 2)
    with pytest.raises(InputError, match=r"num_layers in \[0, 6\]"):
        encode_latents(model, _images(1), 7)
    with pytest.raises(InputError, match=r"\(B, 68\) for 2 layers"):
        decode_latents(model, torch.zeros(1, 5), 2)
    with pytest.raises(InputError, match="noise"):
        decode_latents(model, torch.zeros(1, 68), 2, noise=[torch.zeros(1, 4, 8, 8)])
    with pytest.raises(ConfigError, match="unknown VDVAE config"):
        vdvae_config("imagenet32")
    with pytest.raises(ConfigError, match="dec_blocks must end at image_size"):
        VDVAEConfig(dec_blocks="1x2,4m1")
    with pytest.raises(ConfigError, match="no encoder activations"):
        VDVAEConfig(enc_blocks="64d4,16d16", dec_blocks="1x1,8m1,64m8")


def test_dmol_nll_is_a_normalised_distribution():
    """Summing exp(-NLL) over every (G, B) for a fixed R gives P(R) of the single logistic component."""
    mean, log_scale = 0.1, -2.0
    # openai layout for 1 mixture: [mixture logit, then per channel (mean, log_scale, pre-tanh coeff)].
    params = torch.tensor([0.0, mean, log_scale, 0.5, 0.3, -1.5, -0.4, -0.2, -2.5, 0.8])
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    g, b = torch.meshgrid(values, values, indexing="ij")
    r_index = 140
    target = torch.stack([torch.full_like(g, values[r_index]), g, b], dim=-1).reshape(-1, 1, 1, 3)
    logits = params.double().expand(target.shape[0], 1, 1, 10)
    log_p = -3.0 * dmol_nll(logits, target)  # the NLL is per dim: 3 dims per 1x1 image
    s = np.exp(log_scale)
    x = float(values[r_index])
    p_r = 1 / (1 + np.exp(-(x + 1 / 255 - mean) / s)) - 1 / (1 + np.exp(-(x - 1 / 255 - mean) / s))
    assert float(log_p.exp().sum()) == pytest.approx(p_r, rel=1e-4)


# ------------------------------------------------------------------------------------------ files and ONNX


def test_save_load_vdvae(tmp_path):
    model = _tiny_model()
    images = _images(2)
    save_vdvae(model, TINY, tmp_path / "fp32")
    loaded = load_vdvae(tmp_path / "fp32")
    assert loaded.config == TINY
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    torch.testing.assert_close(
        encode_latents(loaded, images, 6), encode_latents(model, images, 6), rtol=0, atol=ATOL_RELOAD
    )
    save_vdvae(model, TINY, tmp_path / "fp16", fp16=True)
    assert (tmp_path / "fp16" / "model.safetensors").stat().st_size < 0.6 * (
        tmp_path / "fp32" / "model.safetensors"
    ).stat().st_size
    half = load_vdvae(tmp_path / "fp16")
    for k, v in half.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, model.state_dict()[k], rtol=1e-3, atol=1e-4)
    config_path = tmp_path / "fp32" / "config.json"
    data = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**data, "depth": 3}))
    with pytest.raises(ConfigError, match="unknown keys for VDVAEConfig: depth"):
        load_vdvae(tmp_path / "fp32")
    with pytest.raises(MissingFileError):
        load_vdvae(tmp_path / "absent")


def test_onnx_export_parity(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _tiny_model()
    decoder = VDVAEDecoder(model, 4).eval()
    path = tmp_path / "vdvae_decoder.onnx"
    with (
        warnings.catch_warnings()
    ):  # the TorchScript exporter (dynamo=False) is deprecated but chosen on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            decoder,
            (decoder.sample_input(2),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=list(decoder.input_names),
            output_names=list(decoder.output_names),
            dynamic_axes={"vdvae_latents": {0: "batch"}, "images": {0: "batch"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # neither is the export batch
        latents = torch.randn(batch, decoder.latent_dims, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = decoder(latents).numpy()
        (found,) = session.run(None, {"vdvae_latents": latents.numpy()})
        assert found.shape == (batch, 64, 64, 3)
        # Pixels in [0, 255]; a flipped argmax between near-tied mixture logits would show as a large error.
        assert float(np.abs(found - expected).max()) < 1e-2


# ------------------------------------------------------------------------------------------ training


def _train(out_dir, steps, resume=False, **kw):
    from brainrecon.train.foundations.vdvae_train import train_vdvae

    images = _images(12, seed=3).numpy()
    settings = dict(
        batch_size=4, lr=3e-3, seed=0, ema_rate=0.0, warmup_steps=1, checkpoint_every=3, progress=False
    )
    return train_vdvae(images, TINY, out_dir, steps=steps, resume=resume, **{**settings, **kw})


def _elbo(model: VDVAE) -> float:
    with torch.no_grad():
        return float(model(_images(8, seed=3), generator=torch.Generator().manual_seed(0))["elbo"])


def test_training_reduces_loss_and_resumes(tmp_path):
    full = _train(tmp_path / "full", steps=6)
    assert full.step == 6 and len(full.history) == 6 and full.skipped == 0
    torch.manual_seed(0)
    initial = VDVAE(TINY)  # train_vdvae initialises from torch.manual_seed(seed)
    assert _elbo(full.ema_model) < _elbo(initial) - 0.05  # ema_rate 0: the EMA is the trained model

    first = _train(tmp_path / "resumed", steps=3)
    assert first.step == 3
    with pytest.raises(InputError, match="resume=True"):
        _train(tmp_path / "resumed", steps=6)
    with pytest.raises(ConfigError, match="these differ: lr"):
        _train(tmp_path / "resumed", steps=6, resume=True, lr=1e-3)
    second = _train(tmp_path / "resumed", steps=6, resume=True)
    assert second.step == 6 and len(second.history) == 3
    assert [h["elbo"] for h in first.history + second.history] == pytest.approx(
        [h["elbo"] for h in full.history], abs=1e-6
    )
    final = load_vdvae(tmp_path / "resumed")
    for k, v in final.state_dict().items():
        torch.testing.assert_close(v, full.ema_model.state_dict()[k], rtol=1e-6, atol=1e-6)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6 and len(state["history"]) == 6
