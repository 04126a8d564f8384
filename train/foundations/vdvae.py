"""VDVAE: the very deep hierarchical VAE whose latents stage 1 predicts from brain data.

Mirrors openai/vdvae (Child 2021, "Very Deep VAEs Generalize Autoregressive Models and Can Outperform
Them on Images", `vae.py`, `vae_helpers.py`, `hps.py`, `data.py`): same module tree, same parameter
names and same forward semantics, so the official `imagenet64-iter-1600000-model-ema.th` state dict loads
with `load_state_dict(strict=True)`. The code is a rewrite, not a copy.

Data flow (B batch, S image size, L latent layers = number of decoder blocks):

    images (B,S,S,3) in [0,255] --normalise--> Encoder --> activations {res: (B,w,res,res)}
    Decoder, block i at resolution r:  x (B,w,r,r) --prior--> pm, pv (B,zdim,r,r), x += xpp
                                       posterior q(z | x, acts[r]) --> qm, qv  (encode / train only)
                                       z --z_proj--> x += ..., x = resnet(x)
    x at S --gain/bias--> out_net (1x1 conv) --> DmoL logits (B,S,S,10*num_mixtures)

`pv` and `qv` are log standard deviations (openai's naming). Latents of layer i have shape (zdim, r, r).

Choices that differ from Brain-Diffuser (ozcelikfu/brain-diffuser), which uses the same checkpoint:
- `encode_latents` returns the posterior mean `qm` of each layer and feeds `qm` on to the next layer, so
  that features are reproducible; Brain-Diffuser stores the `z` sampled from the posterior.
- `decode_latents(deterministic=True)` takes the prior mean `pm` for the layers after K (temperature 0)
  and the DmoL mode (below); Brain-Diffuser samples both at temperature 1.
- Deterministic DmoL output: per pixel, the component with the largest mixture logit, and its logistic
  means with the channel coupling of openai's sampler (G += c0*R, B += c1*R + c2*G) but without the
  logistic noise (its mode), clipped to [-1, 1] and mapped to [0, 255] as float (no uint8 truncation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainrecon.config import load_config, save_config
from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.io import atomic_path

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Output channels per DmoL mixture component (RGB): 1 mixture logit + 3 x (mean, log-scale, coupling coeff).
_DMOL_PARAMS_PER_MIXTURE = 10
_MIN_LOG_SCALE = -7.0


# --------------------------------------------------------------------------------------------------- config


def parse_block_string(spec: str) -> list[tuple[int, int | None]]:
    """`"64x2,64d2,32m16,8"` -> [(64, None), (64, None), (64, 2), (32, 16), (8, None)].

    `RxN`: N blocks at resolution R; `RdK`: one block at R that average-pools by K (encoder);
    `RmM`: one block at R that mixes in the upsampled state of resolution M (decoder); `R`: one block.
    """
    blocks: list[tuple[int, int | None]] = []
    for item in spec.split(","):
        item = item.strip()
        try:
            if "x" in item:
                res, count = (int(v) for v in item.split("x"))
                blocks += [(res, None)] * count
            elif "m" in item or "d" in item:
                res, other = (int(v) for v in item.replace("m", "d").split("d"))
                blocks.append((res, other))
            else:
                blocks.append((int(item), None))
        except ValueError:
            raise ConfigError(
                f"block string {spec!r}: cannot parse {item!r} (expected RxN, RdK, RmM or R)"
            ) from None
    return blocks


@dataclass(frozen=True)
class VDVAEConfig:
    """Architecture hyper-parameters, named as in openai/vdvae `hps.py` (ImageNet-64 values by default)."""

    name: str = "imagenet64"
    width: int = 512
    zdim: int = 16
    bottleneck_multiple: float = 0.25
    num_mixtures: int = 10
    no_bias_above: int = 64
    enc_blocks: str = "64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5"
    dec_blocks: str = "1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12"
    # "res:width,..." overrides `width` at some resolutions (openai `custom_width_str`).
    custom_width_str: str = ""
    image_size: int = 64
    image_channels: int = 3
    # Encoder input normalisation (x - shift) / scale on values in [0, 255] (openai data.py, imagenet64).
    input_shift: float = 115.92961967
    input_scale: float = 69.37404

    def __post_init__(self) -> None:
        where = f"VDVAEConfig {self.name!r}"
        if self.image_channels != 3:
            raise ConfigError(
                f"{where}: image_channels must be 3 (the DmoL head is RGB), found {self.image_channels}"
            )
        for field in ("width", "zdim", "num_mixtures", "image_size"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{where}: {field} must be >= 1, found {getattr(self, field)}")
        if not 0 < self.bottleneck_multiple <= 4:
            raise ConfigError(
                f"{where}: bottleneck_multiple must be in (0, 4], found {self.bottleneck_multiple}"
            )
        if self.input_scale <= 0:
            raise ConfigError(f"{where}: input_scale must be > 0, found {self.input_scale}")
        enc, dec = self.enc_layers, self.dec_layers
        if not enc or enc[0][0] != self.image_size:
            raise ConfigError(
                f"{where}: enc_blocks must start at image_size {self.image_size}, found {self.enc_blocks!r}"
            )
        res = self.image_size
        for r, down in enc:
            if r != res:
                raise ConfigError(
                    f"{where}: encoder block at {r} follows resolution {res} in {self.enc_blocks!r}"
                )
            if down is not None:
                if res % down:
                    raise ConfigError(
                        f"{where}: {r}d{down} does not divide the resolution in {self.enc_blocks!r}"
                    )
                res //= down
        enc_resolutions = {self.image_size} | {r for r, _ in enc} | {r // d for r, d in enc if d}
        seen: set[int] = set()
        for r, mixin in dec:
            if r not in enc_resolutions:
                raise ConfigError(
                    f"{where}: decoder resolution {r} has no encoder activations ({self.enc_blocks!r})"
                )
            if mixin is not None and (mixin not in seen or r % mixin):
                raise ConfigError(
                    f"{where}: {r}m{mixin} mixes in a resolution not decoded before or not dividing {r}"
                )
            seen.add(r)
        if dec[-1][0] != self.image_size:
            raise ConfigError(
                f"{where}: dec_blocks must end at image_size {self.image_size}, found {self.dec_blocks!r}"
            )
        resolutions = sorted(enc_resolutions)
        for coarse, fine in zip(resolutions, resolutions[1:], strict=False):
            if self.width_at(coarse) < self.width_at(fine):
                raise ConfigError(
                    f"{where}: width at {coarse} is below the width at {fine} (widths may only grow as maps shrink)"
                )
        if self.width_at(self.image_size) != self.width:
            raise ConfigError(
                f"{where}: the width at image_size must equal width {self.width} (gain, bias, out_net)"
            )

    @property
    def enc_layers(self) -> list[tuple[int, int | None]]:
        """(resolution, down_rate or None) per encoder block."""
        return parse_block_string(self.enc_blocks)

    @property
    def dec_layers(self) -> list[tuple[int, int | None]]:
        """(resolution, mixin resolution or None) per decoder block; each block owns one latent layer."""
        return parse_block_string(self.dec_blocks)

    @property
    def num_latent_layers(self) -> int:
        return len(self.dec_layers)

    def width_at(self, res: int) -> int:
        return self._custom_widths().get(res, self.width)

    def _custom_widths(self) -> dict[int, int]:
        try:
            pairs = (item.split(":") for item in self.custom_width_str.split(",") if item.strip())
            return {int(r): int(w) for r, w in pairs}
        except ValueError:
            raise ConfigError(
                f"custom_width_str {self.custom_width_str!r}: expected 'res:width,...'"
            ) from None


VDVAE_CONFIGS: dict[str, VDVAEConfig] = {
    # openai/vdvae hps.py `imagenet64`: 75 latent layers, 125,005,860 parameters.
    "imagenet64": VDVAEConfig(),
    # 64x64 simulated stimuli, trainable on 2 CPU cores in minutes. 21 latent layers at 1, 4, 8, 16, 32, 64;
    # K = 5 / 10 / 15 ends at the 4 / 8 / 16 resolution. Narrow where the maps are large (convolutions over
    # 64x64 maps cost most of a CPU step): 32 channels at 64x64, 64 at 32 and 16, 128 below.
    "small64": VDVAEConfig(
        name="small64",
        width=32,
        zdim=16,
        bottleneck_multiple=0.25,
        num_mixtures=10,
        no_bias_above=64,
        enc_blocks="64d2,32x1,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x2",
        dec_blocks="1x2,4m1,4x3,8m4,8x5,16m8,16x5,32m16,32x1,64m32",
        custom_width_str="32:64,16:64,8:128,4:128,1:128",
    ),
}


def vdvae_config(name: str) -> VDVAEConfig:
    if name not in VDVAE_CONFIGS:
        raise ConfigError(f"unknown VDVAE config {name!r} (expected one of {sorted(VDVAE_CONFIGS)})")
    return VDVAE_CONFIGS[name]


def latent_shapes(config: VDVAEConfig, num_layers: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of the first `num_layers` decoder latent layers, in decoding order."""
    _check_num_layers(config, num_layers)
    return [(config.zdim, res, res) for res, _ in config.dec_layers[:num_layers]]


def latent_dims(config: VDVAEConfig, num_layers: int) -> int:
    """Length of the flattened latent vector of the first `num_layers` layers (imagenet64: K=31 -> 91,168)."""
    return sum(c * h * w for c, h, w in latent_shapes(config, num_layers))


def _check_num_layers(config: VDVAEConfig, num_layers: int) -> None:
    if not 0 <= num_layers <= config.num_latent_layers:
        raise InputError(
            f"VDVAE {config.name}", f"num_layers in [0, {config.num_latent_layers}]", str(num_layers)
        )


# --------------------------------------------------------------------------------------------------- model


def _conv(in_ch: int, out_ch: int, kernel: int, zero_weights: bool = False) -> nn.Conv2d:
    """Conv with openai's init: PyTorch default weights, zero bias, optionally zero weights."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=1, padding=kernel // 2)
    with torch.no_grad():
        conv.bias.zero_()
        if zero_weights:
            conv.weight.zero_()
    return conv


class Block(nn.Module):
    """Bottleneck block: gelu -> 1x1 -> gelu -> 3x3 -> gelu -> 3x3 -> gelu -> 1x1, optional residual, avg-pool.

    At resolutions <= 2 the 3x3 convolutions are 1x1 (openai: no 3x3 on 1x1 and 2x2 maps).
    """

    def __init__(
        self,
        in_width: int,
        middle_width: int,
        out_width: int,
        down_rate: int | None = None,
        residual: bool = False,
        use_3x3: bool = True,
        zero_last: bool = False,
    ):
        super().__init__()
        self.down_rate = down_rate
        self.residual = residual
        k = 3 if use_3x3 else 1
        self.c1 = _conv(in_width, middle_width, 1)
        self.c2 = _conv(middle_width, middle_width, k)
        self.c3 = _conv(middle_width, middle_width, k)
        self.c4 = _conv(middle_width, out_width, 1, zero_weights=zero_last)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(F.gelu(x))
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        h = self.c4(F.gelu(h))
        out = x + h if self.residual else h
        if self.down_rate is not None:
            out = F.avg_pool2d(out, kernel_size=self.down_rate, stride=self.down_rate)
        return out


class Encoder(nn.Module):
    """Bottom-up ResNet: normalised NHWC image -> {resolution: last activation at that resolution}."""

    def __init__(self, config: VDVAEConfig):
        super().__init__()
        self.config = config
        self.in_conv = _conv(config.image_channels, config.width_at(config.image_size), 3)
        layers = config.enc_layers
        blocks = []
        for res, down_rate in layers:
            w = config.width_at(res)
            blocks.append(
                Block(w, int(w * config.bottleneck_multiple), w, down_rate, residual=True, use_3x3=res > 2)
            )
        with torch.no_grad():
            for b in blocks:
                b.c4.weight.mul_(math.sqrt(1 / len(layers)))
        self.enc_blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        x = x.permute(0, 3, 1, 2).contiguous()  # (B,S,S,3) -> (B,3,S,S)
        x = self.in_conv(x)
        activations = {x.shape[2]: x}
        for block in self.enc_blocks:
            x = block(x)
            res = x.shape[2]
            w = self.config.width_at(res)
            if x.shape[1] < w:  # a wider resolution below: zero-pad the channels (openai pad_channels)
                x = F.pad(x, (0, 0, 0, 0, 0, w - x.shape[1]))
            activations[res] = x
        return activations


class DecBlock(nn.Module):
    """One top-down block = one latent layer at resolution `res`.

    enc:   [x, acts] (B,2w,r,r) -> qm, qv (B,zdim,r,r)      posterior
    prior: x (B,w,r,r)          -> pm, pv (B,zdim,r,r), xpp (B,w,r,r)
    then x = resnet(x + xpp + z_proj(z)).
    """

    def __init__(self, config: VDVAEConfig, res: int, mixin: int | None, n_blocks: int):
        super().__init__()
        self.res = res
        self.mixin = mixin
        self.zdim = config.zdim
        self.width = width = config.width_at(res)
        cond_width = int(width * config.bottleneck_multiple)
        use_3x3 = res > 2
        self.enc = Block(width * 2, cond_width, config.zdim * 2, residual=False, use_3x3=use_3x3)
        self.prior = Block(
            width, cond_width, config.zdim * 2 + width, residual=False, use_3x3=use_3x3, zero_last=True
        )
        self.z_proj = _conv(config.zdim, width, 1)
        self.resnet = Block(width, cond_width, width, residual=True, use_3x3=use_3x3)
        with torch.no_grad():
            self.z_proj.weight.mul_(math.sqrt(1 / n_blocks))
            self.resnet.c4.weight.mul_(math.sqrt(1 / n_blocks))

    def posterior(self, x: Tensor, acts: Tensor) -> tuple[Tensor, Tensor]:
        qm, qv = self.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        return qm, qv

    def prior_step(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> pm, pv, x + xpp."""
        feats = self.prior(x)
        pm, pv, xpp = feats[:, : self.zdim], feats[:, self.zdim : 2 * self.zdim], feats[:, 2 * self.zdim :]
        return pm, pv, x + xpp

    def apply_latent(self, x: Tensor, z: Tensor) -> Tensor:
        return self.resnet(x + self.z_proj(z))


class DmolNet(nn.Module):
    """Output head: 1x1 conv to the discretised mixture of logistics parameters, NHWC."""

    def __init__(self, config: VDVAEConfig):
        super().__init__()
        self.out_conv = _conv(config.width, config.num_mixtures * _DMOL_PARAMS_PER_MIXTURE, 1)

    def forward(self, px_z: Tensor) -> Tensor:
        return self.out_conv(px_z).permute(0, 2, 3, 1)  # (B,w,S,S) -> (B,S,S,10*M)


class Decoder(nn.Module):
    def __init__(self, config: VDVAEConfig):
        super().__init__()
        self.config = config
        layers = config.dec_layers
        self.dec_blocks = nn.ModuleList(DecBlock(config, res, mixin, len(layers)) for res, mixin in layers)
        self.resolutions = sorted({res for res, _ in layers})
        self.bias_resolutions = [r for r in self.resolutions if r <= config.no_bias_above]
        # Learned initial state per resolution; index k is the k-th smallest resolution (openai order).
        self.bias_xs = nn.ParameterList(
            nn.Parameter(torch.zeros(1, config.width_at(r), r, r)) for r in self.bias_resolutions
        )
        self.out_net = DmolNet(config)
        self.gain = nn.Parameter(torch.ones(1, config.width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, config.width, 1, 1))

    def initial_state(self, batch: int) -> dict[int, Tensor]:
        return {
            r: b.expand(batch, -1, -1, -1) for r, b in zip(self.bias_resolutions, self.bias_xs, strict=True)
        }

    def block_input(self, block: DecBlock, xs: dict[int, Tensor], batch: int) -> Tensor:
        """The running state at the block's resolution, plus the upsampled coarser state for `RmM` blocks."""
        x = xs.get(block.res)
        if x is None:
            ref = self.gain
            x = torch.zeros(batch, block.width, block.res, block.res, dtype=ref.dtype, device=ref.device)
        if block.mixin is not None:
            coarse = xs[block.mixin][:, : x.shape[1]]
            x = x + F.interpolate(coarse, scale_factor=block.res // block.mixin)  # nearest
        return x

    def logits(self, xs: dict[int, Tensor]) -> Tensor:
        """Final state at image_size -> DmoL parameters (B,S,S,10*M)."""
        px_z = xs[self.config.image_size] * self.gain + self.bias
        return self.out_net(px_z)

    def forward_posterior(
        self,
        activations: dict[int, Tensor],
        sample: bool,
        num_layers: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[int, Tensor], list[Tensor], list[Tensor]]:
        """Top-down pass with the posterior: -> (states, z per layer, KL per layer (B,zdim,r,r)).

        `sample=False` uses z = qm (posterior mean); otherwise z = qm + exp(qv) * eps (reparameterised).
        Stops after `num_layers` blocks when given (enough for encoding the first K latents).
        """
        batch = activations[self.config.image_size].shape[0]
        xs = self.initial_state(batch)
        zs: list[Tensor] = []
        kls: list[Tensor] = []
        for block in self.dec_blocks[:num_layers]:
            x = self.block_input(block, xs, batch)
            qm, qv = block.posterior(x, activations[block.res])
            pm, pv, x = block.prior_step(x)
            if sample:
                eps = torch.randn(qm.shape, generator=generator, dtype=qm.dtype, device=qm.device)
                z = qm + torch.exp(qv) * eps
            else:
                z = qm
            kls.append(gaussian_kl(qm, pm, qv, pv))
            zs.append(z)
            xs[block.res] = block.apply_latent(x, z)
        return xs, zs, kls

    def forward_latents(
        self, given: list[Tensor], noise: list[Tensor] | None, temperature: float, batch: int
    ) -> dict[int, Tensor]:
        """Top-down pass with z fixed for the first len(given) layers and from the prior for the rest.

        Prior layers: z = pm + exp(pv) * temperature * noise[i] when `noise` is given, else z = pm. No random
        ops and no data-dependent control flow, so this path traces to ONNX.
        """
        xs = self.initial_state(batch)
        k = len(given)
        for i, block in enumerate(self.dec_blocks):
            x = self.block_input(block, xs, batch)
            pm, pv, x = block.prior_step(x)
            if i < k:
                z = given[i]
            elif noise is not None:
                z = pm + torch.exp(pv) * temperature * noise[i - k]
            else:
                z = pm
            xs[block.res] = block.apply_latent(x, z)
        return xs


class VDVAE(nn.Module):
    """Encoder + decoder; `forward(images)` is openai's training loss (nats per dim)."""

    def __init__(self, config: VDVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """images (B,S,S,3) in [0,255] -> {"elbo", "distortion", "rate"}: batch means, nats per dim."""
        x = normalize_images(images, self.config)
        target = images.float() / 127.5 - 1.0  # (B,S,S,3) in [-1,1]
        xs, _, kls = self.decoder.forward_posterior(self.encoder(x), sample=True, generator=generator)
        distortion = dmol_nll(self.decoder.logits(xs), target)  # (B,)
        ndims = target[0].numel()
        rate = torch.stack([kl.sum(dim=(1, 2, 3)) for kl in kls]).sum(0) / ndims  # (B,)
        return {"elbo": (distortion + rate).mean(), "distortion": distortion.mean(), "rate": rate.mean()}


# --------------------------------------------------------------------------------------------------- maths


def gaussian_kl(mu1: Tensor, mu2: Tensor, logsigma1: Tensor, logsigma2: Tensor) -> Tensor:
    """KL(N(mu1, sigma1) || N(mu2, sigma2)) elementwise, with log standard deviations."""
    return (
        -0.5
        + logsigma2
        - logsigma1
        + 0.5 * (logsigma1.exp() ** 2 + (mu1 - mu2) ** 2) / (logsigma2.exp() ** 2)
    )


def normalize_images(images: Tensor, config: VDVAEConfig) -> Tensor:
    """(B,S,S,3) values in [0,255] -> encoder input (x - shift) / scale, float32."""
    return (images.float() - config.input_shift) / config.input_scale


def _unpack_dmol(logits: Tensor, num_mixtures: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B,S,S,10M) -> mixture logits (B,S,S,M), means, log_scales, coeffs (B,S,S,3,M) (openai layout)."""
    m = num_mixtures
    mix_logits = logits[..., :m]
    params = logits[..., m:].reshape(-1, logits.shape[1], logits.shape[2], 3, 3 * m)
    means = params[..., :m]
    log_scales = params[..., m : 2 * m].clamp(min=_MIN_LOG_SCALE)
    coeffs = torch.tanh(params[..., 2 * m : 3 * m])
    return mix_logits, means, log_scales, coeffs


def dmol_nll(logits: Tensor, target: Tensor, num_mixtures: int | None = None) -> Tensor:
    """Discretised mixture of logistics NLL (PixelCNN++ / openai, 8-bit bins) -> (B,) nats per dim.

    logits (B,S,S,10M); target (B,S,S,3) in [-1,1]. Green and blue means depend on the true red (and green).
    """
    m = num_mixtures or logits.shape[-1] // _DMOL_PARAMS_PER_MIXTURE
    mix_logits, means, log_scales, coeffs = _unpack_dmol(logits, m)
    x = target.unsqueeze(-1)  # (B,S,S,3,1)
    r, g = x[..., 0, :], x[..., 1, :]
    mean_r = means[..., 0, :]
    mean_g = means[..., 1, :] + coeffs[..., 0, :] * r
    mean_b = means[..., 2, :] + coeffs[..., 1, :] * r + coeffs[..., 2, :] * g
    centered = x - torch.stack([mean_r, mean_g, mean_b], dim=3)  # (B,S,S,3,M)
    inv_s = torch.exp(-log_scales)
    plus_in = inv_s * (centered + 1.0 / 255.0)
    min_in = inv_s * (centered - 1.0 / 255.0)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # x = 0 edge bin
    log_one_minus_cdf_min = -F.softplus(min_in)  # x = 255 edge bin
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)  # density approximation for tiny bins
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(
            x > 0.999,
            log_one_minus_cdf_min,
            torch.where(
                cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - math.log(127.5)
            ),
        ),
    )
    log_probs = log_probs.sum(dim=3) + torch.log_softmax(mix_logits, dim=-1)  # (B,S,S,M)
    return -torch.logsumexp(log_probs, dim=-1).sum(dim=(1, 2)) / target[0].numel()


def dmol_mode(logits: Tensor, num_mixtures: int) -> Tensor:
    """Deterministic image in [-1,1] (B,S,S,3): most likely component, logistic noise at its mode (0)."""
    mix_logits, means, _, coeffs = _unpack_dmol(logits, num_mixtures)
    best = mix_logits.argmax(dim=-1, keepdim=True).unsqueeze(3).expand(-1, -1, -1, 3, 1)  # (B,S,S,3,1)
    return _couple_channels(means.gather(4, best).squeeze(4), coeffs.gather(4, best).squeeze(4))


def dmol_sample(logits: Tensor, num_mixtures: int, generator: torch.Generator | None = None) -> Tensor:
    """Random image in [-1,1] (B,S,S,3) as openai's sampler: Gumbel-max component, logistic noise."""
    mix_logits, means, log_scales, coeffs = _unpack_dmol(logits, num_mixtures)
    u = torch.rand(mix_logits.shape, generator=generator, device=logits.device).clamp(1e-5, 1 - 1e-5)
    best = (
        (mix_logits - torch.log(-torch.log(u)))
        .argmax(dim=-1, keepdim=True)
        .unsqueeze(3)
        .expand(-1, -1, -1, 3, 1)
    )
    mean, log_scale = means.gather(4, best).squeeze(4), log_scales.gather(4, best).squeeze(4)
    u = torch.rand(mean.shape, generator=generator, device=logits.device).clamp(1e-5, 1 - 1e-5)
    x = mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
    return _couple_channels(x, coeffs.gather(4, best).squeeze(4))


def _couple_channels(x: Tensor, coeffs: Tensor) -> Tensor:
    """x, coeffs (B,S,S,3): R, then G += c0*R, B += c1*R + c2*G, each clipped to [-1,1]."""
    r = x[..., 0].clamp(-1, 1)
    g = (x[..., 1] + coeffs[..., 0] * r).clamp(-1, 1)
    b = (x[..., 2] + coeffs[..., 1] * r + coeffs[..., 2] * g).clamp(-1, 1)
    return torch.stack([r, g, b], dim=-1)


def _to_pixels(x: Tensor) -> Tensor:
    return ((x + 1.0) * 127.5).clamp(0.0, 255.0)


# --------------------------------------------------------------------------------------------------- latents


def _check_images(images: Tensor, config: VDVAEConfig) -> None:
    s = config.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (s, s, 3):
        raise InputError("images", f"(B, {s}, {s}, 3) NHWC", str(tuple(images.shape)))
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise InputError("images", "uint8 or float values in [0, 255]", str(images.dtype))
        lo, hi = float(images.min()), float(images.max())
        if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0.0 and hi <= 255.0):
            raise InputError("images", "float values in [0, 255]", f"range [{lo:g}, {hi:g}]")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_latents(model: VDVAE, images_uint8_nhwc: Tensor, num_layers: int) -> Tensor:
    """Images (B,S,S,3) in [0,255] -> (B, latent_dims(config, num_layers)) posterior means, float32.

    Layer order; each layer flattened as (C, H, W). Deterministic: z = qm at every layer (Brain-Diffuser
    sampled z from the posterior instead).
    """
    config = model.config
    _check_images(images_uint8_nhwc, config)
    _check_num_layers(config, num_layers)
    x = normalize_images(images_uint8_nhwc.to(_model_device(model)), config)
    if num_layers == 0:
        return x.new_zeros(x.shape[0], 0)
    _, zs, _ = model.decoder.forward_posterior(model.encoder(x), sample=False, num_layers=num_layers)
    return torch.cat([z.flatten(1) for z in zs], dim=1)


def split_latents(latents: Tensor, config: VDVAEConfig, num_layers: int) -> list[Tensor]:
    """(B, D) -> per layer (B, C, H, W), the inverse of the flattening in `encode_latents`."""
    dims = latent_dims(config, num_layers)
    if latents.ndim != 2 or latents.shape[1] != dims:
        raise InputError(
            "latents", f"(B, {dims}) for {num_layers} layers of {config.name}", str(tuple(latents.shape))
        )
    return _split(latents, latent_shapes(config, num_layers))


def _split(latents: Tensor, shapes: list[tuple[int, int, int]]) -> list[Tensor]:
    sizes = [c * h * w for c, h, w in shapes]  # static slices: traces to ONNX with a dynamic batch
    return [part.reshape(-1, *shape) for part, shape in zip(latents.split(sizes, dim=1), shapes, strict=True)]


def prior_noise_shapes(config: VDVAEConfig, num_layers: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of the `noise` tensors decode_latents takes: one per layer after the first `num_layers`."""
    return [(config.zdim, res, res) for res, _ in config.dec_layers[num_layers:]]


@torch.no_grad()
def decode_latents(
    model: VDVAE,
    latents: Tensor,
    num_layers: int,
    temperature: float = 1.0,
    noise: list[Tensor] | None = None,
    deterministic: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, D) latents of the first `num_layers` layers -> images (B,S,S,3) float in [0,255].

    Remaining layers come from the prior: z = pm + exp(pv) * temperature * noise[i] with the given `noise`
    (shapes: `prior_noise_shapes`), else z = pm when `deterministic`, else noise ~ N(0, 1) from `generator`.
    `deterministic` also selects the DmoL mode over a DmoL sample for the pixels.
    """
    config = model.config
    device = _model_device(model)
    latents = latents.to(device=device, dtype=torch.float32)
    _check_num_layers(config, num_layers)
    expected = prior_noise_shapes(config, num_layers)
    if noise is not None:
        found = [tuple(n.shape) for n in noise]
        want = [(latents.shape[0], *s) for s in expected]
        if found != want:
            raise InputError(
                "noise", f"{len(want)} tensors of shapes {want[:2]}...", f"{len(found)} of {found[:2]}..."
            )
        noise = [n.to(device=device, dtype=torch.float32) for n in noise]
    elif not deterministic:
        noise = [torch.randn((latents.shape[0], *s), generator=generator, device=device) for s in expected]
    given = split_latents(latents, config, num_layers)  # per layer (B,zdim,r,r)
    xs = model.decoder.forward_latents(given, noise, temperature, latents.shape[0])
    logits = model.decoder.logits(xs)  # (B,S,S,10M)
    if deterministic:
        return _to_pixels(dmol_mode(logits, config.num_mixtures))
    return _to_pixels(dmol_sample(logits, config.num_mixtures, generator))


class VDVAEDecoder(nn.Module):
    """Export wrapper: vdvae_latents (B, D) -> images (B,S,S,3) float in [0,255], deterministic decode.

    The layers after `num_layers` take the prior mean; the pixels the DmoL mode. No random ops.
    """

    input_names = ("vdvae_latents",)
    output_names = ("images",)

    def __init__(self, model: VDVAE, num_layers: int):
        super().__init__()
        _check_num_layers(model.config, num_layers)
        if num_layers < 1:
            raise InputError("VDVAEDecoder", "num_layers >= 1 (the batch size comes from the latents)", "0")
        self.config = model.config
        self.num_layers = num_layers
        self.decoder = model.decoder
        self.shapes = latent_shapes(model.config, num_layers)
        self.latent_dims = latent_dims(model.config, num_layers)

    def forward(self, latents: Tensor) -> Tensor:
        given = _split(latents, self.shapes)  # per layer (B,zdim,r,r); no checks, they would not trace
        xs = self.decoder.forward_latents(given, None, 0.0, latents.shape[0])
        return _to_pixels(dmol_mode(self.decoder.logits(xs), self.config.num_mixtures))  # (B,S,S,3)

    def sample_input(self, batch: int = 2) -> Tensor:
        return torch.zeros(batch, self.latent_dims, device=self.decoder.gain.device)


# --------------------------------------------------------------------------------------------------- files


def load_openai_checkpoint(path: str | Path, config: VDVAEConfig | None = None) -> VDVAE:
    """An openai/vdvae state dict (e.g. `imagenet64-iter-1600000-model-ema.th`) -> VDVAE in eval mode.

    Loaded with `weights_only=True`; a `module.` prefix (DistributedDataParallel) is stripped. Keys and
    shapes must match `config` (default imagenet64) exactly.
    """
    config = config or VDVAE_CONFIGS["imagenet64"]
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            path, "openai VDVAE checkpoint", "e.g. imagenet64-iter-1600000-model-ema.th from openai/vdvae"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors come in many types; the message names the file
        raise InputError(
            path, "a torch state dict loadable with weights_only=True", f"{type(e).__name__}: {e}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(path, "a state dict of tensors", type(state).__name__)
    state = {k.removeprefix("module."): v.float() for k, v in state.items()}
    with torch.device("meta"):
        model = VDVAE(config)
    _check_state_dict(state, model, path, config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _check_state_dict(
    state: dict[str, Tensor], model: nn.Module, source: str | Path, config: VDVAEConfig
) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(
            source,
            f"the {len(expected)} keys of VDVAE config {config.name!r}",
            f"{len(missing)} missing (e.g. {missing[:3]}) and {len(unexpected)} unexpected (e.g. {unexpected[:3]})",
        )
    wrong = [(k, expected[k], tuple(v.shape)) for k, v in state.items() if tuple(v.shape) != expected[k]]
    if wrong:
        k, want, got = wrong[0]
        raise InputError(
            source,
            f"shapes of VDVAE config {config.name!r}",
            f"{len(wrong)} mismatches (e.g. {k}: {got}, expected {want})",
        )


def save_vdvae(model: VDVAE, config: VDVAEConfig, directory: str | Path, fp16: bool = False) -> None:
    """Write `model.safetensors` (fp32, or fp16 storage) and `config.json` into `directory`, atomically each."""
    from safetensors.torch import save_file

    if model.config != config:
        raise ConfigError(
            f"save_vdvae: the model was built for {model.config.name!r}, not the given {config.name!r}"
        )
    directory = Path(directory)
    dtype = torch.float16 if fp16 else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "model": "vdvae", "config": config.name})
    save_config(config, directory / CONFIG_FILE)


def load_vdvae(directory: str | Path, device: str | torch.device = "cpu") -> VDVAE:
    """Read a `save_vdvae` directory -> VDVAE (float32, eval mode)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = load_config(VDVAEConfig, directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingFileError(weights, "VDVAE weights", "write them with save_vdvae or train_vdvae")
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    with torch.device("meta"):
        model = VDVAE(config)
    _check_state_dict(state, model, weights, config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()
