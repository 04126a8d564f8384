"""DeepCache step reuse for the stage-2 UNet: the deep features of one step stand in for those of the next ones.

DeepCache (Ma, Fang & Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024; github
horseee/DeepCache) observes that a UNet's deep features change little between adjacent denoising steps. Every k-th
step ("full") runs the whole UNet and keeps the hidden state entering its last (shallowest) up block; the k − 1
steps after it ("shallow") run only the shallow branch around that feature:

    full      sample ─conv_in─► h0 ─down_blocks[0]─► h1, skips ─down_blocks[1:]─ mid ─up_blocks[:-1]─► feature
              [feature, skips of conv_in and down_blocks[0]] ─up_blocks[-1]─ norm, act, conv_out─► noise_pred
    shallow   sample ─conv_in─► h0 ─down_blocks[0]─► skips (fresh)
              [cached feature, skips] ─up_blocks[-1]─ norm, act, conv_out─► noise_pred

Written against the module attributes of diffusers' `UNet2DConditionModel` and following its `forward` (diffusers
0.42, models/unets/unet_2d_condition.py) operation for operation, so that `unet_with_feature`'s noise_pred is
bit-identical to `unet(...).sample`. The UNet options this project's dual UNet does not use (class or added
embeddings, ControlNet/adapter residuals, attention masks, center_input_sample) are refused, not silently dropped.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from brainrecon.errors import ConfigError

UNSUPPORTED = ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "center_input_sample")


def check_unet(unet: UNet2DConditionModel) -> None:
    """One-line ConfigError for a UNet whose forward does more than these functions mirror."""
    used = [name for name in UNSUPPORTED if unet.config.get(name)]
    if used or len(unet.up_blocks) < 2:
        raise ConfigError(
            f"deepcache: expected a UNet2DConditionModel without {', '.join(UNSUPPORTED)} and with at least two "
            f"up blocks, found {', '.join(used) or f'{len(unet.up_blocks)} up block'}"
        )


def feature_channels(unet: UNet2DConditionModel) -> int:
    """C_f of the feature: the output channels of up_blocks[-2] (diffusers' up block i outputs
    reversed(block_out_channels)[i]), at the latent side (its upsampler doubles back to it)."""
    return int(unet.config.block_out_channels[1])


def _embed(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The time embedding `emb` every resnet takes, as `forward` computes it."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


def _block(
    block: torch.nn.Module, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, **kwargs
) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One down/up block called as `forward` calls it (the context only where the block cross-attends)."""
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=hidden, temb=emb, encoder_hidden_states=context, **kwargs)
    return block(hidden_states=hidden, temb=emb, **kwargs)


def _shallow(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    emb: torch.Tensor,
    context: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """conv_in and down_blocks[0]: (down_blocks[0]'s output, every skip so far: conv_in's, then the block's)."""
    hidden = unet.conv_in(sample)  # (B, C0, h, w)
    skips: tuple[torch.Tensor, ...] = (hidden,)
    hidden, res = _block(unet.down_blocks[0], hidden, emb, context)
    return hidden, skips + res


def _head(
    unet: UNet2DConditionModel,
    feature: torch.Tensor,
    skips: tuple[torch.Tensor, ...],
    emb: torch.Tensor,
    context: torch.Tensor,
) -> torch.Tensor:
    """up_blocks[-1] on `feature` with the first len(resnets) skips (conv_in's and down_blocks[0]'s resnets':
    the ones forward's bookkeeping leaves for the last up block), then the output head."""
    last = unet.up_blocks[-1]
    hidden = _block(last, feature, emb, context, res_hidden_states_tuple=skips[: len(last.resnets)])
    if unet.conv_norm_out:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)  # (B, C, h, w)


def unet_with_feature(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,  # (B, C, h, w)
    timestep: torch.Tensor,  # () or (B,)
    context: torch.Tensor,  # (B, Nv + Nt, D)
) -> tuple[torch.Tensor, torch.Tensor]:
    """A full step: (noise_pred (B, C, h, w), bit-identical to `unet(sample, timestep, context).sample`; feature,
    the hidden state entering up_blocks[-1], (B, C_f, h, w))."""
    check_unet(unet)
    # forward passes each non-final up block the size of the skip it will meet when the latent side is not a
    # multiple of 2^upsamplers; otherwise None (the upsamplers double)
    factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % factor for dim in sample.shape[-2:])
    emb = _embed(unet, sample, timestep)
    hidden, skips = _shallow(unet, sample, emb, context)
    for block in unet.down_blocks[1:]:
        hidden, res = _block(block, hidden, emb, context)
        skips += res
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=context)
        else:
            hidden = unet.mid_block(hidden, emb)
    remaining = skips
    for block in unet.up_blocks[:-1]:
        res, remaining = remaining[-len(block.resnets) :], remaining[: -len(block.resnets)]
        upsample_size = remaining[-1].shape[2:] if forward_upsample_size else None
        hidden = _block(block, hidden, emb, context, res_hidden_states_tuple=res, upsample_size=upsample_size)
    return _head(unet, hidden, remaining, emb, context), hidden


def unet_shallow(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,  # (B, C, h, w)
    timestep: torch.Tensor,  # () or (B,)
    context: torch.Tensor,  # (B, Nv + Nt, D)
    feature: torch.Tensor,  # (B, C_f, h, w), `unet_with_feature`'s of an earlier step
) -> torch.Tensor:
    """A shallow step: noise_pred (B, C, h, w) from conv_in, down_blocks[0] and the last up block around the
    cached `feature`. With the feature of the same (sample, timestep, context) it is the full step's noise_pred."""
    check_unet(unet)
    emb = _embed(unet, sample, timestep)
    _, skips = _shallow(unet, sample, emb, context)
    return _head(unet, feature, skips, emb, context)


def is_full_step(step: int, cache_interval: int) -> bool:
    """Step `step` (0-based) of a denoising loop runs the whole UNet: every `cache_interval`-th, the first always;
    ceil(T / cache_interval) of T steps. 1: every step (no caching)."""
    return step % cache_interval == 0


def unet_step(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,  # (B, C, h, w)
    timestep: torch.Tensor,
    context: torch.Tensor,  # (B, Nv + Nt, D)
    step: int,  # 0-based index in the denoising loop
    cache_interval: int,  # SamplingConfig.cache_interval
    feature: torch.Tensor | None,  # the last full step's, (B, C_f, h, w); None before the first
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One UNet evaluation of a denoising loop → (noise_pred, the feature to keep for the next steps): the plain
    `unet(...)` call at cache_interval 1 (feature None), else a full step or a shallow one (`is_full_step`)."""
    if cache_interval == 1:
        return unet(sample, timestep, encoder_hidden_states=context).sample, None
    if is_full_step(step, cache_interval):
        return unet_with_feature(unet, sample, timestep, context)
    assert feature is not None and len(feature) == len(sample), "a shallow step needs the feature of its rows"
    return unet_shallow(unet, sample, timestep, context, feature), feature
