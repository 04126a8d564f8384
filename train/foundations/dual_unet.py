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
