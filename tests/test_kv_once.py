"""K/V once (issue 13): the contexts' cross-attention keys and values computed once (`unet_context`) and the UNet
step that takes them (`unet_kv`), in torch (export/kv_once.py), exported (export/stage2.py) and in the
runtime (runtime/stage2.py), against the plain dual UNet and the torch reference.

Tolerances (scale = max |noise_pred|):
- torch K/V forward vs the plain forward: max ≤ 1e-5·scale (measured 1.6e-6·scale on the tiny UNet: another
  summation order for the pre-scaled keys, the GEGLU halves and the once-added residual);
- exported unet_context → unet_kv vs the plain torch UNet: fp32 max ≤ 1e-4·scale (the `unet` contract's bound);
  fp16 max ≤ 2e-2·scale, median ≤ 1e-3·scale (the fp16 `unet` bounds);
- the runtime on the K/V pair vs the plain UNet and vs the torch reference: the fp32 pixel tolerance of
  tests/test_runtime_stage2.py (mean ≤ 0.01 grey level, max ≤ 1), latents within 1e-4;
- recon-infer on a folder exported with the pair only (`recon-export --unet-graph kv`) vs the folder exported with
  both graphs: identical images (the same graphs, exported again from the same weights, run the same way).
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.export.contracts import kv_names, unet_context_contract, unet_kv_contract
from brainrecon.export.kv_once import context_kv, kv_cross_attention_kwargs, kv_layout
from brainrecon.export.stage2 import context_pool, unet_kv_shapes
from brainrecon.manifest import MANIFEST_FILE, load_manifest, write_manifest
from brainrecon.runtime import Reconstructor, RuntimeOptions
from brainrecon.train.foundations.dual_unet import DualUNetConfig, build_dual_unet, convert_to_dual_attention
from tests.fixtures import FAST_STEPS, build_tiny_stage2

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TORCH_RTOL = 1e-5
FP32_RTOL = 1e-4
FP16 = {"max": 2e-2, "median": 1e-3}
PIXELS_FP32 = {"mean": 0.01, "max": 1}


def _inputs(cfg: DualUNetConfig, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(1, 1000, (batch,), generator=g).float()
    context = torch.randn(batch, cfg.context_tokens, cfg.cross_attention_dim, generator=g)
    return x, t, context


@pytest.mark.parametrize("linear_projection", [False, True])
def test_kv_forward_matches_the_plain_dual_unet(linear_projection):
    """Every parameter is perturbed first: the norms' affines (folded into proj_in), the biases and the two
    transformers of each dual block (which start as copies) all differ, so a swapped or dropped term shows."""
    torch.manual_seed(0)
    cfg = DualUNetConfig.tiny()
    unet = convert_to_dual_attention(
        UNet2DConditionModel(**cfg.unet_kwargs(), use_linear_projection=linear_projection),
        vision_tokens=cfg.vision_tokens,
        text_tokens=cfg.text_tokens,
        mix_ratio=cfg.mix_ratio,
    ).eval()
    for attn in (m for m in unet.modules() if isinstance(m, Attention)):  # q/k/v biases (attention_bias=True)
        for name in ("to_q", "to_k", "to_v"):
            layer = getattr(attn, name)
            setattr(attn, name, torch.nn.Linear(layer.in_features, layer.out_features))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, context = _inputs(cfg, 4)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=context).sample
        kv = context_kv(unet, context)
        fast = unet(
            x, t, encoder_hidden_states=None, cross_attention_kwargs=kv_cross_attention_kwargs(kv)
        ).sample
    scale = plain.abs().max().item()
    assert (fast - plain).abs().max().item() <= TORCH_RTOL * scale
    # same parameters and the diffusers state dict untouched (the K/V path is a second forward, not new weights)
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def test_kv_layout_shapes_and_order():
    cfg = DualUNetConfig.tiny()
    unet = build_dual_unet(cfg).eval()
    layers = kv_layout(unet)
    # every dual block: vision (condition 0) then text, one BasicTransformerBlock each in the tiny config
    assert [layer.condition for layer in layers] == [0, 1] * (len(layers) // 2)
    assert [layer.tokens for layer in layers] == [cfg.vision_tokens, cfg.text_tokens] * (len(layers) // 2)
    x, _, context = _inputs(cfg, 3)
    with torch.no_grad():
        kv = context_kv(unet, context)
    assert len(kv) == 2 * len(layers)
    for j, layer in enumerate(layers):
        assert tuple(kv[2 * j].shape) == (3, *layer.key_shape)
        assert tuple(kv[2 * j + 1].shape) == (3, *layer.value_shape)
    # the keys are per context: a row's K/V do not depend on the other rows
    with torch.no_grad():
        single = context_kv(unet, context[1:2])
    for a, b in zip(kv, single, strict=True):
        torch.testing.assert_close(a[1:2], b, rtol=0, atol=1e-6)


def test_contracts_pair_context_outputs_with_step_inputs():
    layers = ((4, 8, 7), (4, 8, 5), (8, 16, 7), (8, 16, 5))
    ctx = unet_context_contract(layers, 7, 5, 32, image_size=64)
    step = unet_kv_contract(4, 8, layers, 0.6, image_size=64)
    assert ctx.output_names == step.input_names[2:] == list(kv_names(4))
    assert [s.shape for s in ctx.outputs[:2]] == [("batch", 4, 8, 7), ("batch", 4, 7, 8)]
    assert step.profile == ctx.profile and step.profile.max_batch == 128  # the UNet's (2 x images) profile
    assert dict(step.constants)["mix_ratio"] == 0.6 and step.fp32_inputs == ("timestep",)


def test_wrong_kv_count_is_a_one_line_error():
    from brainrecon.export.stage2 import UNetKVGraph

    cfg = DualUNetConfig.tiny()
    graph = UNetKVGraph(build_dual_unet(cfg).eval())
    x, t, _ = _inputs(cfg, 1)
    with pytest.raises(InputError, match="K/V tensors"):
        graph(x, t, torch.zeros(1))


# ----------------------------------------------------------------------------------------- exported


@pytest.fixture(scope="module")
def model(tiny2):
    from brainrecon.train.foundations.dual_unet import set_mix_ratio
    from brainrecon.train.reference import Stage2Model

    m = Stage2Model.load(tiny2["model"])
    set_mix_ratio(m.unet, m.sampling.mix_ratio)
    return m


def _session(tiny2, name: str, precision: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(tiny2["model"] / f"onnx/{name}.{precision}.onnx"), options)


def test_manifest_lists_the_kv_pair_with_matching_io(tiny2, model):
    manifest = load_manifest(tiny2["model"])
    layers = unet_kv_shapes(model.unet)
    for precision in ("fp32", "fp16"):
        ctx = manifest.find("onnx", "unet_context", precision)
        step = manifest.find("onnx", "unet_kv", precision)
        assert ctx is not None and step is not None
        assert [s["name"] for s in ctx.io["outputs"]] == list(kv_names(len(layers)))
        assert [s["name"] for s in step.io["inputs"]] == ["sample", "timestep", *kv_names(len(layers))]
        assert step.io["constants"]["mix_ratio"] == model.sampling.mix_ratio
        assert step.io["max_batch"] == manifest.find("onnx", "unet", precision).io["max_batch"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_exported_pair_matches_the_plain_torch_unet(tiny2, model, precision):
    """unet_context on [uncond; predicted] contexts, then unet_kv at several timesteps, vs the torch plain UNet."""
    pool = context_pool(model)  # (1 + 7, Nv + Nt, D): uncond first
    context = pool[[0, 0, 3, 5]]  # a CFG batch of two images: [uncond x 2; cond x 2]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    ctx_session, step_session = (
        _session(tiny2, "unet_context", precision),
        _session(tiny2, "unet_kv", precision),
    )
    kv = dict(
        zip(
            [o.name for o in ctx_session.get_outputs()],
            ctx_session.run(None, {"encoder_hidden_states": context}),
            strict=True,
        )
    )
    for t in (981.0, 501.0, 1.0):
        timestep = np.full(4, t, np.float32)
        with torch.no_grad():
            ref = model.unet(
                torch.from_numpy(x),
                torch.from_numpy(timestep),
                encoder_hidden_states=torch.from_numpy(context),
            ).sample.numpy()
        out = step_session.run(None, {"sample": x, "timestep": timestep, **kv})[0]
        diff, scale = np.abs(out - ref), np.abs(ref).max()
        if precision == "fp32":
            assert diff.max() <= FP32_RTOL * scale, (t, diff.max(), scale)
        else:
            assert diff.max() <= FP16["max"] * scale and np.median(diff) <= FP16["median"] * scale, (
                t,
                diff.max(),
            )


# ----------------------------------------------------------------------------------------- runtime


def _pixels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def _open(model_dir, unet_graph: str = "auto") -> Reconstructor:
    return Reconstructor.open(model_dir, RuntimeOptions(threads=1, unet_graph=unet_graph))


def test_runtime_kv_matches_plain_and_the_torch_reference(tiny2, model, betas):
    import dataclasses

    kv, plain_rec = _open(tiny2["model"], "kv"), _open(tiny2["model"], "plain")
    kv_pipe = kv.pipeline
    assert kv_pipe.kv_once and not plain_rec.pipeline.kv_once
    assert _open(tiny2["model"]).pipeline.kv_once  # "auto" takes the pair
    short = dataclasses.replace(kv.sampling, num_inference_steps=FAST_STEPS)

    calls = []
    context_backend = kv_pipe.backends["unet_context"]

    class Counting:
        providers = context_backend.providers

        def run(self, inputs):
            calls.append(len(inputs["encoder_hidden_states"]))
            return context_backend.run(inputs)

    kv_pipe.backends["unet_context"] = Counting()  # after open: opening ran no model
    fast = kv.reconstruct(betas, short, batch_size=3)  # chunks 3 + 3 + 3 + 1
    # the unconditional K/V once, at the first run; those of the predicted contexts once per chunk, never per step
    assert calls == [1, 3, 3, 3, 1] and kv_pipe.uncond_kv()["key_0"].shape[0] == 1
    calls.clear()
    again = kv.reconstruct(betas, short, batch_size=3)
    assert calls == [3, 3, 3, 1]  # the unconditional K/V are kept
    np.testing.assert_array_equal(again.final_images, fast.final_images)
    plain = plain_rec.reconstruct(betas, short, batch_size=3)
    np.testing.assert_allclose(fast.latents, plain.latents, rtol=0, atol=1e-4)
    d = _pixels(fast.images, plain.images)
    assert d.mean() <= PIXELS_FP32["mean"] and d.max() <= PIXELS_FP32["max"]

    expected = model.reconstruct(betas, short, progress=False)["final"]
    d = _pixels(fast.images, expected)
    assert d.mean() <= PIXELS_FP32["mean"] and d.max() <= PIXELS_FP32["max"], (d.mean(), d.max())


def test_kv_required_but_not_exported_and_bad_choice(tiny2, tmp_path):
    with pytest.raises(InputError, match="unet_graph"):
        RuntimeOptions(unet_graph="fast")
    model_dir = tmp_path / "model"
    shutil.copytree(tiny2["model"], model_dir)
    kept = [a for a in load_manifest(model_dir).artifacts if a.model not in ("unet_context", "unet_kv")]
    (model_dir / MANIFEST_FILE).unlink()
    write_manifest(model_dir, kept, merge=False)
    with pytest.raises(MissingFileError, match="unet_context and unet_kv"):
        _open(model_dir, "kv")
    # an export from before K/V once still runs, on the plain UNet
    assert not _open(model_dir).pipeline.kv_once


def test_kv_forward_refuses_dual_blocks_with_different_norms():
    cfg = DualUNetConfig.tiny()
    unet = build_dual_unet(cfg).eval()
    dual = next(m for m in unet.modules() if hasattr(m, "transformers"))
    dual.transformers[1].norm.eps = 1e-3
    with pytest.raises(ConfigError, match="share GroupNorm"):
        kv_layout(unet)


def test_kv_forward_refuses_an_unsupported_block():
    cfg = DualUNetConfig.tiny()
    unet = build_dual_unet(cfg).eval()
    block = next(m for m in unet.modules() if hasattr(m, "norm_type") and hasattr(m, "attn2"))
    block.norm_type = "ada_norm"
    with pytest.raises(ConfigError, match="K/V-once forward expects"):
        kv_layout(unet)


# ----------------------------------------------------------------------------------------- --unet-graph kv


def run_cli(monkeypatch, main, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["recon", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


def test_export_of_the_pair_only_runs_as_the_folder_with_both(tiny2, tmp_path, monkeypatch):
    """`recon-export --unet-graph kv` writes no `unet`; recon-infer runs the folder on the pair and gives the images
    of the folder exported with both graphs; the plain UNet asked of it is a one-line error naming what is there."""
    from brainrecon.cli.deploy import export_main, infer_main
    from brainrecon.export.subject import stage2_names

    assert stage2_names("plain")[-1] == "unet" and "unet" not in stage2_names("kv")
    with pytest.raises(ConfigError, match="unet_graph"):
        stage2_names("fast")
    fitted = build_tiny_stage2(tiny2["model"].parent)["model"]  # the fixture's folder before its export
    model_dir = tmp_path / "kv-only"
    shutil.copytree(fitted, model_dir)
    assert run_cli(monkeypatch, export_main, "--model-dir", str(model_dir), "--unet-graph", "fast") == 2
    args = ("--model-dir", str(model_dir), "--stage", "all", "--precision", "fp32", "--unet-graph", "kv")
    assert run_cli(monkeypatch, export_main, *args) == 0
    manifest = load_manifest(model_dir)
    assert {a.model for a in manifest.artifacts if a.kind == "onnx"} == {
        "ridge",
        "vdvae_decoder",
        "clip_text",
        "clip_vision",
        "vae_encoder",
        "vae_decoder",
        "unet_context",
        "unet_kv",
    }
    assert not list((model_dir / "onnx").glob("unet.*"))

    finals = {}
    for name, folder in (("kv", model_dir), ("both", tiny2["model"])):
        out = tmp_path / f"infer-{name}"
        args = (str(tiny2["prep"] / "test_betas.npy"), "--model-dir", str(folder), "--out", str(out))
        args += ("--trials", "0-3", "--steps", str(FAST_STEPS), "--threads", "1")
        assert run_cli(monkeypatch, infer_main, *args) == 0
        finals[name] = np.load(out / "final_images.npy")
    # Two exports of one fitted model, run in separately created ONNX Runtime sessions: the same graphs, but not one
    # session run twice, so float32 rounding may move a pixel by one grey level (measured: equal, AMD EPYC and
    # Intel Xeon), as for the copies in tests/test_runtime_checks.py.
    assert finals["kv"].shape == finals["both"].shape and finals["kv"].shape[0] == 4
    assert np.abs(finals["kv"].astype(int) - finals["both"].astype(int)).max() <= 1
    assert _open(model_dir, "kv").pipeline.kv_once

    with pytest.raises(MissingFileError) as e:
        _open(model_dir, "plain")
    assert "unet fp32 entry (the plain UNet), found unet_context and unet_kv only" in str(e.value)
    assert "--unet-graph plain" in str(e.value) and "\n" not in str(e.value)
