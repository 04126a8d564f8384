"""Dual-guided latent UNet of Versatile Diffusion (Xu et al. 2023), as used by Brain-Diffuser, built on diffusers.

Versatile Diffusion (VD) ships two UNets: `image_unet` (cross-attends to 257 CLIP-vision tokens) and `text_unet`
(cross-attends to 77 CLIP-text tokens). For dual guidance diffusers'
`VersatileDiffusionDualGuidedPipeline._convert_to_dual_attention` replaces every `Transformer2DModel` of the image
UNet with a `DualTransformer2DModel` whose `transformers[0]` is the image-UNet block and `transformers[1]` the
text-UNet block at the same module path. The UNet then takes one context holding both token sets; each dual block
splits it by `condition_lengths`, routes each part with `transformer_index_for_condition`, and mixes the two
residuals as `first * mix_ratio + second * (1 - mix_ratio)`.

Context layout here (fixed, checked by `check_context`): vision tokens first, then text tokens,

    encoder_hidden_states = torch.cat([vision_ctx, text_ctx], dim=1)  # (B, vision_tokens + text_tokens, D)

so `mix_ratio` is the vision weight; Brain-Diffuser's 0.6 vision / 0.4 text is `mix_ratio=0.6`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from brainrecon.errors import ConfigError, InputError, MissingFileError

VISION_TRANSFORMER = 0  # index in DualTransformer2DModel.transformers of the image-UNet block
TEXT_TRANSFORMER = 1  # index of the text-UNet block


class DualAttentionTransformer(DualTransformer2DModel):
    """`DualTransformer2DModel` that accepts the keywords current diffusers UNet blocks pass.

    diffusers 0.42 `CrossAttnDownBlock2D` & co. call their attention with `encoder_attention_mask=...`, which the
    parent's `forward` does not accept (TypeError). This subclass only widens the signature.
    """

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,  # (B, C, h, w)
        encoder_hidden_states: torch.Tensor | None = None,  # (B, sum(condition_lengths), D)
        timestep: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        **ignored: Any,
    ) -> Any:
        # encoder_attention_mask is ignored: VD's contexts are fixed-length CLIP token sets (257 vision, 77 text,
        # no padding), so there is nothing to mask, and the parent (like VD itself) never masks its conditions.
        # `ignored` swallows any other keyword future blocks may pass (e.g. `added_cond_kwargs`), for the same
        # reason: the dual block has no use for them.
        if cross_attention_kwargs and KV_KWARG in cross_attention_kwargs:
            # K/V once: the context's keys and values come precomputed (`context_kv`), the context is unused
            out = _dual_forward_kv(self, hidden_states, cross_attention_kwargs[KV_KWARG])
            return (out,) if not return_dict else Transformer2DModelOutput(sample=out)
        if encoder_hidden_states is None:
            raise InputError("DualAttentionTransformer", "encoder_hidden_states (dual context)", "None")
        return super().forward(
            hidden_states,
            encoder_hidden_states,
            timestep=timestep,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=return_dict,  # blocks pass False and take `[0]`: the parent returns a 1-tuple then
        )


@dataclass(frozen=True)
class DualUNetConfig:
    """`UNet2DConditionModel` kwargs of the latent UNet plus the dual-guidance layout."""

    sample_size: int = 32  # latent side (image side / 8)
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    cross_attention_dim: int = 128  # CLIP embedding dim, shared by vision and text tokens
    attention_head_dim: int = 8  # diffusers' legacy naming: this is the number of heads
    norm_num_groups: int = 32
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    text_tokens: int = 77
    vision_tokens: int = 257
    mix_ratio: float = 0.6  # vision weight

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"DualUNetConfig: expected {n} down and up block types (one per block_out_channels), "
                f"found {len(self.down_block_types)} down, {len(self.up_block_types)} up"
            )
        if not any("CrossAttn" in t for t in self.down_block_types + self.up_block_types):
            raise ConfigError("DualUNetConfig: expected at least one CrossAttn block, found none")
        if not 0.0 <= self.mix_ratio <= 1.0:
            raise ConfigError(f"DualUNetConfig: expected mix_ratio in [0, 1], found {self.mix_ratio}")
        if self.text_tokens < 1 or self.vision_tokens < 1:
            raise ConfigError(
                f"DualUNetConfig: expected positive token counts, found vision {self.vision_tokens}, "
                f"text {self.text_tokens}"
            )

    @property
    def context_tokens(self) -> int:
        return self.vision_tokens + self.text_tokens

    def unet_kwargs(self) -> dict[str, Any]:
        return {
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": tuple(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "cross_attention_dim": self.cross_attention_dim,
            "attention_head_dim": self.attention_head_dim,
            "norm_num_groups": self.norm_num_groups,
            "down_block_types": tuple(self.down_block_types),
            "up_block_types": tuple(self.up_block_types),
        }

    @classmethod
    def tiny(cls) -> DualUNetConfig:
        """Seconds-scale CPU tests: 8x8 latents, 7 vision + 5 text tokens of dim 32."""
        return cls(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            text_tokens=5,
            vision_tokens=7,
        )

    @classmethod
    def small(cls, clip_dim: int = 128) -> DualUNetConfig:
        """Simulated stimuli: 32x32x4 latents (256 px images), a small CLIP of `clip_dim`, VD token counts."""
        return cls(cross_attention_dim=clip_dim)


def check_context(
    encoder_hidden_states: torch.Tensor, config: DualUNetConfig, source: str = "encoder_hidden_states"
) -> None:
    """Raise a one-line InputError unless the context is (B, vision_tokens + text_tokens, cross_attention_dim)."""
    expected = (config.context_tokens, config.cross_attention_dim)
    shape = tuple(encoder_hidden_states.shape)
    if encoder_hidden_states.ndim != 3 or shape[1:] != expected:
        raise InputError(
            source,
            f"(B, {config.vision_tokens} vision + {config.text_tokens} text = {config.context_tokens}, "
            f"{config.cross_attention_dim}) with vision tokens first",
            str(shape),
        )


def dual_context(vision_ctx: torch.Tensor, text_ctx: torch.Tensor, config: DualUNetConfig) -> torch.Tensor:
    """Concatenate the two token sets in the layout the dual blocks split: vision first, then text."""
    context = torch.cat([vision_ctx, text_ctx], dim=1)  # (B, vision_tokens + text_tokens, D)
    check_context(
        context,
        config,
        source=f"dual context (vision {tuple(vision_ctx.shape)}, text {tuple(text_ctx.shape)})",
    )
    return context


def set_mix_ratio(unet: torch.nn.Module, ratio: float) -> None:
    """Set the vision weight of every dual block (text weight = 1 - ratio)."""
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"set_mix_ratio: expected ratio in [0, 1], found {ratio}")
    blocks = [m for m in unet.modules() if isinstance(m, DualTransformer2DModel)]
    if not blocks:
        raise ConfigError("set_mix_ratio: expected a UNet converted to dual attention, found no dual blocks")
    for block in blocks:
        block.mix_ratio = ratio


def _subtree_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def convert_to_dual_attention(
    unet: UNet2DConditionModel,
    text_unet_state: Mapping[str, torch.Tensor] | None = None,
    *,
    vision_tokens: int = 257,
    text_tokens: int = 77,
    mix_ratio: float = 0.6,
    source: str = "text_unet state",
) -> UNet2DConditionModel:
    """In place: each `Transformer2DModel` of `unet` -> `DualAttentionTransformer(image block, text block)`.

    The text block is the block at the same module path of the text UNet (`text_unet_state`, keyed like the
    text UNet's `state_dict()`), or a deep copy of the image block when no state is given.
    """
    # Collect first: replacing modules while iterating named_modules() would also visit the new blocks.
    paths = [name for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    if not paths:
        raise ConfigError(
            "convert_to_dual_attention: expected a UNet with cross-attention blocks, found none"
        )
    for path in paths:
        parent_path, index = path.rsplit(".", 1)
        parent = unet.get_submodule(parent_path)  # an nn.ModuleList, e.g. down_blocks.0.attentions
        image_block: Transformer2DModel = parent[int(index)]
        text_block = copy.deepcopy(image_block)
        if text_unet_state is not None:
            block_state = _subtree_state(text_unet_state, path)
            if not block_state:
                raise InputError(source, f"weights under '{path}.' (text-UNet block)", "none")
            try:
                text_block.load_state_dict(block_state, strict=True)
            except RuntimeError as exc:
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise InputError(
                    source, f"text-UNet block '{path}' matching the image block", first_line
                ) from exc
        cfg = image_block.config
        # Build with the image block's config (as diffusers does), then swap in the two real blocks; the
        # randomly initialised inner blocks are discarded.
        dual = DualAttentionTransformer(
            num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=cfg.attention_head_dim,
            in_channels=cfg.in_channels,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout,
            norm_num_groups=cfg.norm_num_groups,
            cross_attention_dim=cfg.cross_attention_dim,
            attention_bias=cfg.attention_bias,
            sample_size=cfg.sample_size,
            num_vector_embeds=cfg.num_vector_embeds,
            activation_fn=cfg.activation_fn,
            num_embeds_ada_norm=cfg.num_embeds_ada_norm,
        )
        dual.transformers[VISION_TRANSFORMER] = image_block
        dual.transformers[TEXT_TRANSFORMER] = text_block
        # Context layout: condition 0 = vision tokens -> image block, condition 1 = text tokens -> text block.
        # The parent weights condition 0 by mix_ratio, so mix_ratio is the vision weight.
        dual.condition_lengths = [vision_tokens, text_tokens]
        dual.transformer_index_for_condition = [VISION_TRANSFORMER, TEXT_TRANSFORMER]
        dual.mix_ratio = mix_ratio
        dual.to(dtype=next(image_block.parameters()).dtype)
        parent[int(index)] = dual
    unet.register_to_config(dual_cross_attention=True)
    return unet


def build_dual_unet(
    config: DualUNetConfig, text_unet_state: Mapping[str, torch.Tensor] | None = None
) -> UNet2DConditionModel:
    """A fresh (randomly initialised) image UNet converted to dual attention; see `convert_to_dual_attention`."""
    unet = UNet2DConditionModel(**config.unet_kwargs())
    return convert_to_dual_attention(
        unet,
        text_unet_state,
        vision_tokens=config.vision_tokens,
        text_tokens=config.text_tokens,
        mix_ratio=config.mix_ratio,
    )


# diffusers' order of preference for a model subfolder's weights
UNET_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def unet_weights_file(subfolder: Path) -> Path:
    """The weight file diffusers reads from a UNet subfolder: safetensors first, else the pickled .bin."""
    for name in UNET_WEIGHT_NAMES:
        if (subfolder / name).is_file():
            return subfolder / name
    raise MissingFileError(
        subfolder,
        " or ".join(UNET_WEIGHT_NAMES),
        "expected a diffusers Versatile Diffusion folder with image_unet/ and text_unet/ weights",
    )


def versatile_diffusion_unet_files(folder: str | Path) -> dict[str, Path]:
    """{"image_unet": file, "text_unet": file}: every weight file `load_versatile_diffusion_unet` reads."""
    folder = Path(folder)
    for sub in ("image_unet", "text_unet"):
        if not (folder / sub).is_dir():
            raise MissingFileError(
                folder / sub, "Versatile Diffusion UNet subfolder", "expected image_unet/ and text_unet/"
            )
    return {sub: unet_weights_file(folder / sub) for sub in ("image_unet", "text_unet")}


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # a foreign pickle: tensors only


def load_versatile_diffusion_unet(
    folder: str | Path, *, mix_ratio: float = 0.6, vision_tokens: int = 257, text_tokens: int = 77
) -> UNet2DConditionModel:
    """Dual-guided UNet from a local diffusers Versatile Diffusion folder (`image_unet/` + `text_unet/`), in fp32.

    The text UNet is a `UNetFlatConditionModel` (diffusers' deprecated VD package); only its `Transformer2DModel`
    weights are needed, and they sit at the same module paths as in `image_unet`, so its state dict is read
    directly rather than through the deprecated class. The files read are `versatile_diffusion_unet_files(folder)`.
    """
    folder = Path(folder)
    files = versatile_diffusion_unet_files(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "image_unet", torch_dtype=torch.float32)
    text_state = _load_state_file(files["text_unet"])
    return convert_to_dual_attention(
        unet,
        text_state,
        vision_tokens=vision_tokens,
        text_tokens=text_tokens,
        mix_ratio=mix_ratio,
        source=str(files["text_unet"]),
    )


# ----------------------------------------------------------------------------------------- K/V once
#
# The contexts are constant over the denoising loop, so the cross-attention keys and values of every dual block
# are too: `context_kv` computes them once per context (the exported `unet_context` graph) and the UNet step takes
# them (`unet_kv`, through `kv_cross_attention_kwargs`) instead of the context. Same weights and state dict as the
# plain UNet; the K/V path is a second forward of the dual blocks, chosen per call.
#
#   context_kv(unet, context (B, Nv + Nt, D)) → [key_0, value_0, key_1, value_1, ...], per cross-attention layer
#     key_j   (B, heads, head_dim, N_j)  = to_k(tokens)ᵀ · head_dim^-0.5   (transposed and pre-scaled for Q·K)
#     value_j (B, heads, N_j, head_dim)  = to_v(tokens)
#   layers in module order of the dual blocks; within a block, condition 0 (vision) then 1 (text), then the
#   transformer's BasicTransformerBlocks in order.

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
    """The cross-attention layers of a dual UNet in K/V order; numbers each dual block's first layer (`kv_offset`)."""
    layers: list[KVLayer] = []
    for path, module in unet.named_modules():
        if not isinstance(module, DualTransformer2DModel):
            continue
        if not isinstance(module, DualAttentionTransformer):
            raise ConfigError(f"{path}: expected a DualAttentionTransformer, found {type(module).__name__}")
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


def _dual_forward_kv(dual: DualAttentionTransformer, x: torch.Tensor, kv: list[torch.Tensor]) -> torch.Tensor:
    """The dual block on precomputed K/V: x + mix · vision(x) + (1 − mix) · text(x), the residual added once;
    fused as the section note says."""
    offset = getattr(dual, "kv_offset", None)
    if offset is None:
        raise ConfigError("dual block without a K/V slot: call kv_layout(unet) before a K/V forward")
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
