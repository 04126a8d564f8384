"""Dual-guided Versatile Diffusion UNet (train/foundations/dual_unet.py): tiny seeded configs on the CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.train.foundations.dual_unet import (
    DualAttentionTransformer,
    DualUNetConfig,
    check_context,
    convert_to_dual_attention,
    dual_context,
    load_versatile_diffusion_unet,
    set_mix_ratio,
)

ATOL_MIX = 1e-5  # dual block at mix 1 / 0 vs a plain UNet: same ops plus one `* 0` branch
ATOL_ONNX = 1e-4

CFG = DualUNetConfig.tiny()


def _text_unet(seed: int = 1) -> torch.nn.Module:
    """A tiny real `UNetFlatConditionModel` (VD's text UNet), so its state dict has the real naming."""
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    torch.manual_seed(seed)
    kw = CFG.unet_kwargs()
    kw["down_block_types"] = tuple(t.replace("2D", "Flat") for t in CFG.down_block_types)
    kw["up_block_types"] = tuple(t.replace("2D", "Flat") for t in CFG.up_block_types)
    return UNetFlatConditionModel(**kw).eval()


@pytest.fixture(scope="module")
def unets() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    plain = UNet2DConditionModel(**CFG.unet_kwargs()).eval()  # the image UNet
    text_unet = _text_unet()
    text_state = text_unet.state_dict()
    attn_paths = [n for n, m in plain.named_modules() if isinstance(m, Transformer2DModel)]
    # Reference for mix 0: the image UNet with each attention block replaced by the text UNet's.
    text_attn = {k: v for k, v in text_state.items() if any(k.startswith(p + ".") for p in attn_paths)}
    plain_text = copy.deepcopy(plain)
    plain_text.load_state_dict({**plain.state_dict(), **text_attn}, strict=True)
    dual = convert_to_dual_attention(
        copy.deepcopy(plain),
        text_state,
        vision_tokens=CFG.vision_tokens,
        text_tokens=CFG.text_tokens,
        mix_ratio=CFG.mix_ratio,
    ).eval()
    return {"plain": plain, "plain_text": plain_text, "dual": dual, "text_unet": text_unet}


def _inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(
        batch, CFG.in_channels, CFG.sample_size, CFG.sample_size, generator=g
    )  # (B, 4, h, w)
    timestep = torch.full((batch,), 500.0)  # (B,)
    vision = torch.randn(batch, CFG.vision_tokens, CFG.cross_attention_dim, generator=g)  # (B, Nv, D)
    text = torch.randn(batch, CFG.text_tokens, CFG.cross_attention_dim, generator=g)  # (B, Nt, D)
    return sample, timestep, vision, text


def _run(unet: torch.nn.Module, sample, timestep, context, **kw) -> torch.Tensor:
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=context, return_dict=False, **kw)[0]


def test_every_attention_block_is_dual(unets):
    dual = unets["dual"]
    assert not [m for m in dual.modules() if type(m) is Transformer2DModel and not _inside_dual(dual, m)]
    blocks = [m for m in dual.modules() if isinstance(m, DualAttentionTransformer)]
    n_plain = sum(isinstance(m, Transformer2DModel) for m in unets["plain"].modules())
    assert len(blocks) == n_plain == 4  # tiny config: 1 down + 1 mid + 2 up (layers_per_block + 1) blocks
    for b in blocks:
        assert b.condition_lengths == [CFG.vision_tokens, CFG.text_tokens]
        assert b.transformer_index_for_condition == [0, 1]
        assert b.mix_ratio == pytest.approx(0.6)


def _inside_dual(root: torch.nn.Module, module: torch.nn.Module) -> bool:
    return any(
        module is t for b in root.modules() if isinstance(b, DualAttentionTransformer) for t in b.transformers
    )


def test_forward_shape_and_determinism(unets):
    sample, t, vision, text = _inputs()
    ctx = dual_context(vision, text, CFG)  # (B, Nv + Nt, D)
    out = _run(unets["dual"], sample, t, ctx)
    assert out.shape == sample.shape
    assert torch.isfinite(out).all()
    assert torch.equal(out, _run(unets["dual"], sample, t, ctx))


def test_mix_ratio_extremes_match_plain_unets(unets):
    dual, sample_t = unets["dual"], _inputs()
    sample, t, vision, text = sample_t
    ctx = dual_context(vision, text, CFG)
    try:
        set_mix_ratio(dual, 1.0)
        only_vision = _run(dual, sample, t, ctx)
        set_mix_ratio(dual, 0.0)
        only_text = _run(dual, sample, t, ctx)
        set_mix_ratio(dual, 0.6)
        mixed = _run(dual, sample, t, ctx)
    finally:
        set_mix_ratio(dual, CFG.mix_ratio)
    ref_vision = _run(unets["plain"], sample, t, vision)
    ref_text = _run(unets["plain_text"], sample, t, text)
    assert (only_vision - ref_vision).abs().max() < ATOL_MIX
    assert (only_text - ref_text).abs().max() < ATOL_MIX
    # The blocks really differ, and the 0.6 mix is neither extreme.
    assert (ref_vision - ref_text).abs().max() > 1e-3
    assert (mixed - ref_vision).abs().max() > 1e-4 and (mixed - ref_text).abs().max() > 1e-4


def test_encoder_attention_mask_keyword_is_accepted(unets):
    sample, t, vision, text = _inputs()
    ctx = dual_context(vision, text, CFG)
    mask = torch.ones(ctx.shape[:2])  # (B, Nv + Nt)
    out = _run(unets["dual"], sample, t, ctx, encoder_attention_mask=mask)
    assert torch.allclose(out, _run(unets["dual"], sample, t, ctx), atol=1e-6)


def test_build_without_text_state_copies_image_blocks():
    from brainrecon.train.foundations.dual_unet import build_dual_unet

    torch.manual_seed(0)
    a = build_dual_unet(CFG)
    torch.manual_seed(0)
    b = build_dual_unet(CFG)
    for sa, sb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(sa, sb)  # determinism for a seed
    block = next(m for m in a.modules() if isinstance(m, DualAttentionTransformer))
    for p0, p1 in zip(block.transformers[0].parameters(), block.transformers[1].parameters(), strict=True):
        assert torch.equal(p0, p1) and p0 is not p1


def test_bad_context_raises_one_line_input_error():
    _, _, vision, text = _inputs()
    with pytest.raises(InputError) as err:
        dual_context(vision, text[:, :-1], CFG)
    assert "\n" not in str(err.value) and "7 vision + 5 text = 12" in str(err.value)
    with pytest.raises(InputError):
        check_context(torch.zeros(2, CFG.context_tokens, CFG.cross_attention_dim + 1), CFG)
    check_context(torch.zeros(2, CFG.context_tokens, CFG.cross_attention_dim), CFG)


def test_config_validation_and_presets():
    with pytest.raises(ConfigError):
        DualUNetConfig(mix_ratio=1.5)
    with pytest.raises(ConfigError):
        DualUNetConfig(down_block_types=("DownBlock2D",))
    small = DualUNetConfig.small(clip_dim=256)
    assert (small.cross_attention_dim, small.vision_tokens, small.text_tokens) == (256, 257, 77)
    with pytest.raises(ConfigError):
        set_mix_ratio(torch.nn.Linear(1, 1), 0.5)


def test_text_state_with_wrong_shapes_raises():
    torch.manual_seed(0)
    plain = UNet2DConditionModel(**CFG.unet_kwargs())
    bad = {k: v[..., :1] if v.ndim > 1 else v for k, v in plain.state_dict().items()}
    with pytest.raises(InputError):
        convert_to_dual_attention(plain, bad)


def test_load_versatile_diffusion_folder(unets, tmp_path):
    vd = tmp_path / "versatile-diffusion"
    unets["plain"].save_pretrained(vd / "image_unet")
    unets["text_unet"].save_pretrained(vd / "text_unet")  # real UNetFlatConditionModel naming, safetensors
    loaded = load_versatile_diffusion_unet(
        vd, vision_tokens=CFG.vision_tokens, text_tokens=CFG.text_tokens
    ).eval()
    sample, t, vision, text = _inputs()
    ctx = dual_context(vision, text, CFG)
    assert (_run(loaded, sample, t, ctx) - _run(unets["dual"], sample, t, ctx)).abs().max() < 1e-6

    (vd / "text_unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingFileError):
        load_versatile_diffusion_unet(vd)


class _UNetStep(torch.nn.Module):
    """One denoising step as a plain-tensor function, for the ONNX exporter."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):  # (B,4,h,w), (B,), (B,Nv+Nt,D) -> (B,4,h,w)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def test_onnx_export_matches_onnxruntime(unets, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    sample, t, vision, text = _inputs(batch=2)
    path = tmp_path / "dual_unet.onnx"
    batch = {0: "batch"}
    torch.onnx.export(
        _UNetStep(unets["dual"]),
        (sample, t, dual_context(vision, text, CFG)),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["sample", "timestep", "encoder_hidden_states"],
        output_names=["noise_pred"],
        dynamic_axes={
            "sample": batch,
            "timestep": batch,
            "encoder_hidden_states": batch,
            "noise_pred": batch,
        },
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # A batch size other than the traced one exercises the dynamic axis.
    sample, t, vision, text = _inputs(batch=3, seed=1)
    ctx = dual_context(vision, text, CFG)
    (onnx_out,) = session.run(
        None, {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()}
    )
    torch_out = _run(unets["dual"], sample, t, ctx).numpy()
    assert onnx_out.shape == torch_out.shape
    max_diff = float(np.abs(onnx_out - torch_out).max())
    print(f"dual UNet ONNX (opset 17) vs torch, batch 3: max abs diff {max_diff:.2e}")
    assert max_diff < ATOL_ONNX
