"""K/V once: the dual UNet's cross-attention keys and values computed once per context, and the UNet step that
takes them, as the export writes them (the `unet_context` and `unet_kv` graphs of export/stage2.py).

The contexts are constant over the denoising loop, so the cross-attention keys and values of every dual block
(train/foundations/dual_unet.py) are too: `context_kv` computes them once per context and the UNet step takes them
(through `kv_cross_attention_kwargs`) instead of the context. Same weights and state dict as the plain UNet; the K/V
path is a second forward of the dual blocks, chosen per call. `kv_layout(unet)` prepares a UNet for it in place.

  context_kv(unet, context (B, Nv + Nt, D)) → [key_0, value_0, key_1, value_1, ...], per cross-attention layer
    key_j   (B, heads, head_dim, N_j)  = to_k(tokens)ᵀ · head_dim^-0.5   (transposed and pre-scaled for Q·K)
    value_j (B, heads, N_j, head_dim)  = to_v(tokens)
  layers in module order of the dual blocks; within a block, condition 0 (vision) then 1 (text), then the
  transformer's BasicTransformerBlocks in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel

from brainrecon.errors import ConfigError
from brainrecon.train.foundations.dual_unet import DualAttentionTransformer

KV_KWARG = "brainrecon_kv"  # the cross_attention_kwargs key that carries the K/V list down to the dual blocks


@dataclass(frozen=True)
class KVLayer:
    """One cross-attention layer of the K/V layout: which dual block and condition, and its tensor shapes."""

    block: str  # module path of the dual block
    condition: int  # 0 vision, 1 text
    heads: int
    head_dim: int
    tokens: int

    @property
    def key_shape(self) -> tuple[int, int, int]:
        return (self.heads, self.head_dim, self.tokens)

    @property
    def value_shape(self) -> tuple[int, int, int]:
        return (self.heads, self.tokens, self.head_dim)


class KVDualAttentionTransformer(DualAttentionTransformer):
    """A dual block that also runs on precomputed K/V: given `cross_attention_kwargs[KV_KWARG]` it takes the
    fused K/V forward (`_dual_forward_kv`), else the plain dual forward. `kv_layout` turns a UNet's dual blocks
    into this class in place: no new parameters, the same state dict."""

    kv_offset: int  # index in the K/V list of this block's first key (set by kv_layout)

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,  # (B, C, h, w)
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        **ignored: Any,
    ) -> Any:
        if cross_attention_kwargs and KV_KWARG in cross_attention_kwargs:
            # the context's keys and values come precomputed (`context_kv`), the context is unused
            out = _dual_forward_kv(self, hidden_states, cross_attention_kwargs[KV_KWARG])
            return (out,) if not return_dict else Transformer2DModelOutput(sample=out)
        return super().forward(
            hidden_states,
            encoder_hidden_states,
            timestep=timestep,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=encoder_attention_mask,
            return_dict=return_dict,
            **ignored,
        )


def _check_kv_block(path: str, block: Any) -> None:
    """The K/V forward re-implements diffusers' BasicTransformerBlock for its plain layer-norm form only."""
    found: dict[str, Any] = {
        "norm_type": block.norm_type,
        "only_cross_attention": block.only_cross_attention,
        "pos_embed": block.pos_embed is not None,
        "chunked feed-forward": block._chunk_size is not None,
    }
    for name in ("attn1", "attn2"):
        attn = getattr(block, name)
        found[f"{name}.residual_connection"] = attn.residual_connection
        found[f"{name}.rescale_output_factor"] = attn.rescale_output_factor
        found[f"{name}.extra norms"] = any(
            getattr(attn, n) is not None
            for n in ("norm_cross", "group_norm", "spatial_norm", "norm_q", "norm_k")
        )
        found[f"{name}.added_kv_proj_dim"] = attn.added_kv_proj_dim
    expected: dict[str, Any] = {
        "norm_type": "layer_norm",
        "only_cross_attention": False,
        "pos_embed": False,
        "chunked feed-forward": False,
    }
    for name in ("attn1", "attn2"):
        expected |= {
            f"{name}.residual_connection": False,
            f"{name}.rescale_output_factor": 1.0,
            f"{name}.extra norms": False,
            f"{name}.added_kv_proj_dim": None,
        }
    if found != expected:
        diff = {k: v for k, v in found.items() if expected[k] != v}
        raise ConfigError(f"{path}: the K/V-once forward expects {expected}, found {diff}")


def _check_kv_pair(path: str, first: Any, second: Any) -> None:
    """The fused dual-block forward normalises x once for both transformers: same GroupNorm groups and eps."""
    found = [(t.norm.num_groups, t.norm.eps, t.norm.affine) for t in (first, second)]
    if found[0] != found[1] or not found[0][2]:
        raise ConfigError(
            f"{path}: the K/V-once forward expects both transformers to share GroupNorm (groups, eps) with "
            f"affine weights, found {found}"
        )


def kv_layout(unet: torch.nn.Module) -> list[KVLayer]:
    """The cross-attention layers of a dual UNet in K/V order. Prepares the UNet for the K/V forward in place: each
    dual block becomes a `KVDualAttentionTransformer` (same parameters) and records its first layer (`kv_offset`)."""
    layers: list[KVLayer] = []
    for path, module in unet.named_modules():
        if not isinstance(module, DualTransformer2DModel):
            continue
        if not isinstance(module, DualAttentionTransformer):
            raise ConfigError(f"{path}: expected a DualAttentionTransformer, found {type(module).__name__}")
        module.__class__ = KVDualAttentionTransformer  # a subclass that only adds the K/V forward
        module.kv_offset = 2 * len(layers)
        _check_kv_pair(path, *module.transformers)
        for condition in range(2):
            transformer = module.transformers[module.transformer_index_for_condition[condition]]
            if not transformer.is_input_continuous:
                raise ConfigError(f"{path}: the K/V-once forward expects continuous (latent image) inputs")
            for i, block in enumerate(transformer.transformer_blocks):
                _check_kv_block(f"{path}.transformers.{condition}.transformer_blocks.{i}", block)
                attn = block.attn2
                layers.append(
                    KVLayer(
                        path,
                        condition,
                        attn.heads,
                        attn.to_q.out_features // attn.heads,
                        module.condition_lengths[condition],
                    )
                )
    if not layers:
        raise ConfigError("kv_layout: expected a UNet converted to dual attention, found no dual blocks")
    return layers


def context_kv(unet: torch.nn.Module, encoder_hidden_states: torch.Tensor) -> list[torch.Tensor]:
    """context (B, Nv + Nt, D), vision first → [key_0, value_0, ...] in `kv_layout` order (see the section note)."""
    kv: list[torch.Tensor] = []
    batch = encoder_hidden_states.shape[0]
    kv_layout(unet)  # checks the blocks
    for module in unet.modules():
        if not isinstance(module, DualAttentionTransformer):
            continue
        start = 0
        for condition in range(2):
            n = module.condition_lengths[condition]
            tokens = encoder_hidden_states[:, start : start + n]  # (B, N, D)
            start += n
            transformer = module.transformers[module.transformer_index_for_condition[condition]]
            for block in transformer.transformer_blocks:
                attn = block.attn2
                heads = attn.heads
                key = attn.to_k(tokens).view(batch, n, heads, -1)  # (B, N, h, d)
                value = attn.to_v(tokens).view(batch, n, heads, -1)  # (B, N, h, d)
                kv.append(key.permute(0, 2, 3, 1) * attn.scale)  # (B, h, d, N)
                kv.append(value.transpose(1, 2))  # (B, h, N, d)
    return kv


def kv_cross_attention_kwargs(kv: list[torch.Tensor]) -> dict[str, Any]:
    """What to pass as the UNet's `cross_attention_kwargs` to run the dual blocks on precomputed K/V."""
    return {KV_KWARG: list(kv)}


# The step forward of a dual block on precomputed K/V is written for what ONNX Runtime runs fastest on a CPU (each
# rewrite measured on the demo UNet step, 32 rows, one thread): the same arithmetic, regrouped.
#   - Both transformers read the same x: its GroupNorm statistics are taken once and each transformer's norm
#     affine is folded into its proj_in; both proj_ins are one matmul (weights stacked).
#   - Tokens stay 2-D, (B·L, C), so every linear layer with a bias exports as one Gemm (ORT fuses MatMul + Add into
#     Gemm for 2-D inputs only; on (B, L, C) the bias is a separate Add).
#   - Self-attention's q, k, v are one matmul, with the softmax scale folded into the q weights.
#   - The mix is folded into the output projections: mix·proj_out₀(h₀) + (1 − mix)·proj_out₁(h₁) is one matmul
#     of [h₀, h₁] with [mix·W₀, (1 − mix)·W₁].
# Against the straightforward per-transformer forward, on the demo UNet step (ORT, one thread, 32 rows): 1.12-1.18×
# for one session alone, 1.06× with two sessions side by side, 1.03-1.08× on the UNet loop of a 32-image run.


def _linear_weight(layer: Any) -> torch.Tensor:
    """(out, in) weight of a Linear or a 1×1 Conv2d (a Transformer2DModel's proj_in / proj_out)."""
    return layer.weight.reshape(layer.weight.shape[0], -1)


def _bias(layer: Any) -> torch.Tensor:
    return layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.weight.shape[0])


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: int) -> torch.Tensor:
    """query (B, h, L, d) pre-scaled, key (B, h, d, N), value (B, h, N, d) → (B·L, h·d)."""
    out = torch.softmax(query @ key, dim=-1) @ value  # (B, h, L, d)
    return out.transpose(1, 2).reshape(batch * query.shape[2], -1)


def _self_attention(attn: Any, x: torch.Tensor, batch: int) -> torch.Tensor:
    """diffusers `Attention` (attn1, no mask) on tokens x (B·L, C) → (B·L, C); q, k, v as one matmul."""
    heads, length = attn.heads, x.shape[0] // batch
    weight = torch.cat([attn.to_q.weight * attn.scale, attn.to_k.weight, attn.to_v.weight])
    bias = None
    if attn.to_q.bias is not None:
        bias = torch.cat([attn.to_q.bias * attn.scale, attn.to_k.bias, attn.to_v.bias])
    qkv = torch.nn.functional.linear(x, weight, bias).reshape(batch, length, 3, heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, L, d)
    return attn.to_out[0](_attention(q, k.transpose(-1, -2), v, batch))


def _cross_attention_kv(attn: Any, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """diffusers `Attention` (attn2, no mask) on tokens x (B·L, C) with K/V given (key pre-scaled) → (B·L, C)."""
    batch = key.shape[0]
    query = attn.to_q(x).reshape(batch, x.shape[0] // batch, attn.heads, -1).transpose(1, 2)  # (B, h, L, d)
    return attn.to_out[0](_attention(query, key, value, batch))


def _feed_forward(ff: Any, x: torch.Tensor) -> torch.Tensor:
    """diffusers `FeedForward`; a GEGLU projection runs as two MatMuls (value, gate), not one MatMul and a split."""
    from diffusers.models.activations import GEGLU

    first, rest = ff.net[0], ff.net[1:]
    if isinstance(first, GEGLU):
        w, b = first.proj.weight, first.proj.bias
        inner = w.shape[0] // 2
        hidden = torch.nn.functional.linear(x, w[:inner], None if b is None else b[:inner])
        gate = torch.nn.functional.linear(x, w[inner:], None if b is None else b[inner:])
        x = hidden * first.gelu(gate)
    else:
        x = first(x)
    for module in rest:
        x = module(x)
    return x


def _blocks_kv(transformer: Any, h: torch.Tensor, kv: list[torch.Tensor]) -> torch.Tensor:
    """A `Transformer2DModel`'s BasicTransformerBlocks on tokens h (B·L, C) with precomputed K/V."""
    batch = kv[0].shape[0]
    for i, block in enumerate(transformer.transformer_blocks):
        h = _self_attention(block.attn1, block.norm1(h), batch) + h
        h = _cross_attention_kv(block.attn2, block.norm2(h), kv[2 * i], kv[2 * i + 1]) + h
        h = _feed_forward(block.ff, block.norm3(h)) + h
    return h


def _dual_forward_kv(
    dual: KVDualAttentionTransformer, x: torch.Tensor, kv: list[torch.Tensor]
) -> torch.Tensor:
    """The dual block on precomputed K/V: x + mix · vision(x) + (1 − mix) · text(x), the residual added once;
    fused as the section note says."""
    offset = dual.kv_offset
    transformers = [dual.transformers[dual.transformer_index_for_condition[c]] for c in range(2)]
    batch, channels, height, width = x.shape
    norm = transformers[0].norm
    tokens = torch.nn.functional.group_norm(x, norm.num_groups, None, None, norm.eps)  # affine folded below
    tokens = tokens.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # (B·L, C)
    proj_in = [_linear_weight(t.proj_in) for t in transformers]  # (inner, C) each
    weight = torch.cat([w * t.norm.weight for w, t in zip(proj_in, transformers, strict=True)])
    bias = torch.cat([w @ t.norm.bias + _bias(t.proj_in) for w, t in zip(proj_in, transformers, strict=True)])
    hidden = torch.nn.functional.linear(tokens, weight, bias).chunk(2, dim=1)  # 2 × (B·L, inner)
    outs = []
    for transformer, h in zip(transformers, hidden, strict=True):
        n = 2 * len(transformer.transformer_blocks)
        outs.append(_blocks_kv(transformer, h, kv[offset : offset + n]))
        offset += n
    mix = (dual.mix_ratio, 1 - dual.mix_ratio)
    weight = torch.cat(
        [m * _linear_weight(t.proj_out) for m, t in zip(mix, transformers, strict=True)], dim=1
    )
    bias = mix[0] * _bias(transformers[0].proj_out) + mix[1] * _bias(transformers[1].proj_out)
    out = torch.nn.functional.linear(torch.cat(outs, dim=1), weight, bias)  # (B·L, C)
    return out.reshape(batch, height, width, channels).permute(0, 3, 1, 2) + x
