"""Stage-2 export sources: the five models of Versatile Diffusion img2img as ONNX contracts, plus the DDIM tables.

    Stage2Model.load(model_dir)                       (train/reference.py; checks the VAE/UNet sha256)
      clip["text"|"vision"]  ClipRidge            → clip_text, clip_vision   (onnx.helper graphs, two MatMuls)
      vae                    AutoencoderKL        → vae_encoder, vae_decoder (torch wrappers below, TorchScript)
      unet                   dual-attention UNet  → unet                     (mix ratio baked in)
                                                  → unet_context, unet_kv   (K/V once: the contexts' cross-attention
                                                                             K/V, and the step that takes them)
                                                  → unet_deep, unet_shallow (DeepCache: the full step with its deep
                                                                             feature, the shallow step taking it)
      sampling               SamplingConfig        → stage2/scheduler.json    (diffusers DDIMScheduler tables)

The wrappers reproduce `train/stage2/img2img.py` exactly on the graph side of the numpy boundary: `encode_images` after its
uint8 → [-1, 1] step, `decode_latents` before its rounding, and one UNet call of `denoise` (guidance, the DDIM step
and the noise stay in the numpy runtime).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainrecon.choices import FILE_PRECISIONS
from brainrecon.config import config_from_dict, config_to_dict
from brainrecon.errors import ConfigError, InputError
from brainrecon.export.contracts import (
    ExportContract,
    clip_ridge_contract,
    kv_names,
    unet_context_contract,
    unet_contract,
    unet_deep_contract,
    unet_kv_contract,
    unet_shallow_contract,
    vae_decoder_contract,
    vae_encoder_contract,
)
from brainrecon.export.kv_once import context_kv, kv_cross_attention_kwargs, kv_layout
from brainrecon.export.onnx_export import ExportSource, save_onnx, set_ir_version, torch_reference
from brainrecon.io import read_json, write_json
from brainrecon.model_dir import SCHEDULER, SCHEDULER_FORMAT, STAGE2_SUMMARY
from brainrecon.sampling import DDIM_SCHEDULER, SamplingConfig
from brainrecon.train.foundations.dual_unet import set_mix_ratio
from brainrecon.train.reference import Stage2Model
from brainrecon.train.stage2.clip_ridge import ClipRidge
from brainrecon.train.stage2.deepcache import feature_channels, unet_shallow, unet_with_feature
from brainrecon.train.stage2.img2img import denoising_timesteps, vae_downsampling, vd_scheduler

CONTEXT_POOL_SEED = 1234  # predicted contexts for validating the UNet (seeded, like every validation input)


class VAEEncoderGraph(torch.nn.Module):
    """images (B, 3, S, S) in [-1, 1] → latents (B, C, h, w): posterior mean × scale (train/stage2 encode_images)."""

    def __init__(self, vae: Any, scale: float):
        super().__init__()
        self.vae, self.scale = vae, scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.scale  # (B, C, h, w)


class VAEDecoderGraph(torch.nn.Module):
    """latents (B, C, h, w), scaled → images (B, 3, S, S) ~[-1, 1], unclipped (train/stage2 decode_latents)."""

    def __init__(self, vae: Any, scale: float):
        super().__init__()
        self.vae, self.scale = vae, scale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale).sample  # (B, 3, S, S)


class UNetGraph(torch.nn.Module):
    """(sample (B, C, h, w), timestep (B,), context (B, Nv + Nt, D)) → noise_pred (B, C, h, w); one UNet call of
    train/stage2 `denoise` with a per-row timestep (diffusers expands a (B,) tensor as is)."""

    def __init__(self, unet: Any):
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class UNetContextGraph(torch.nn.Module):
    """context (B, Nv + Nt, D) → (key_0, value_0, ...): the cross-attention K/V of every dual block
    (kv_once.context_kv), computed once per context instead of at every step."""

    def __init__(self, unet: Any):
        super().__init__()
        self.unet = unet
        kv_layout(unet)

    def forward(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(context_kv(self.unet, encoder_hidden_states))


class UNetKVGraph(torch.nn.Module):
    """(sample (B, C, h, w), timestep (B,), key_0, value_0, ...) → noise_pred (B, C, h, w): `UNetGraph` with the
    context's K/V precomputed by `UNetContextGraph`."""

    def __init__(self, unet: Any):
        super().__init__()
        self.unet = unet
        self.n_kv = 2 * len(kv_layout(unet))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        if len(kv) != self.n_kv:
            raise InputError("UNetKVGraph", f"{self.n_kv} K/V tensors (kv_layout)", f"{len(kv)}")
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=None,
            cross_attention_kwargs=kv_cross_attention_kwargs(list(kv)),
            return_dict=False,
        )[0]


class UNetDeepGraph(torch.nn.Module):
    """`UNetGraph`'s inputs → (noise_pred (B, C, h, w), feature (B, C_f, h, w)): a DeepCache full step
    (train/stage2/deepcache.py unet_with_feature)."""

    def __init__(self, unet: Any):
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return unet_with_feature(self.unet, sample, timestep, encoder_hidden_states)


class UNetShallowGraph(torch.nn.Module):
    """`UNetGraph`'s inputs and feature (B, C_f, h, w) → noise_pred (B, C, h, w): a DeepCache shallow step
    (deepcache.unet_shallow); the exporter drops what it does not reach (down_blocks[0]'s downsampler)."""

    def __init__(self, unet: Any):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        feature: torch.Tensor,
    ) -> torch.Tensor:
        return unet_shallow(self.unet, sample, timestep, encoder_hidden_states, feature)


def feature_pool(unet: Any, contexts: np.ndarray, seed: int = CONTEXT_POOL_SEED) -> np.ndarray:
    """(N, C_f, h, w) float32: the deep features of the context pool's rows at seeded N(0, 1) latents and
    timesteps, what `unet_shallow` is validated on (a feature at the scale it runs at)."""
    rng = np.random.default_rng(seed)
    size = int(unet.config.sample_size)
    sample = rng.standard_normal((len(contexts), int(unet.config.in_channels), size, size))
    timestep = rng.integers(1, DDIM_SCHEDULER["num_train_timesteps"], size=len(contexts))
    with torch.no_grad():
        _, feature = unet_with_feature(
            unet,
            torch.from_numpy(sample.astype(np.float32)),
            torch.from_numpy(timestep.astype(np.float32)),
            torch.from_numpy(contexts),
        )
    return feature.numpy().astype(np.float32)


def unet_kv_shapes(unet: Any) -> tuple[tuple[int, int, int], ...]:
    """(heads, head_dim, tokens) per cross-attention layer, in the K/V order of the contracts."""
    return tuple((layer.heads, layer.head_dim, layer.tokens) for layer in kv_layout(unet))


def kv_pool(unet: Any, contexts: np.ndarray) -> dict[str, np.ndarray]:
    """{key_j / value_j: (N, ...)} float32: the K/V of the context pool's rows, what `unet_kv` is validated on."""
    with torch.no_grad():
        kv = context_kv(unet, torch.from_numpy(contexts))
    return {name: t.numpy().astype(np.float32) for name, t in zip(kv_names(len(kv) // 2), kv, strict=True)}


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())


def _torch_source(
    module: torch.nn.Module, contract: ExportContract, pools: dict[str, np.ndarray] | None = None
) -> ExportSource:
    """A TorchScript export source: the module in eval mode is both what is exported and the reference."""
    module = module.eval()
    return ExportSource(
        contract,
        torch_reference(module, contract),
        module=module,
        pools=pools,
        weight_bytes=_param_bytes(module),
    )


def context_pool(model: Stage2Model, n_predicted: int = 7, seed: int = CONTEXT_POOL_SEED) -> np.ndarray:
    """(1 + n_predicted, Nv + Nt, D) float32: the unconditional context, then contexts predicted (and re-normalised,
    as the runtime will) from seeded heavy-tailed z-scored betas: what the UNet sees in both guidance halves."""
    betas = np.random.default_rng(seed).standard_t(
        5, size=(max(n_predicted, 2), model.clip["text"].A.shape[0])
    )
    predicted = model.predict_contexts(betas.astype(np.float32))
    cond = np.concatenate([predicted["vision"], predicted["text"]], axis=1)[:n_predicted]  # vision first
    uncond = np.concatenate([model.uncond["vision"], model.uncond["text"]], axis=1)
    return np.concatenate([uncond, cond]).astype(np.float32)


def _clip_source(name: str, ridge: ClipRidge) -> ExportSource:
    c = ridge.config
    contract = clip_ridge_contract(name.removeprefix("clip_"), c.n_features, c.n_tokens, c.dim)

    def build(path: Path, precision: str, external: bool) -> None:
        build_clip_ridge_onnx(
            ridge.A,
            ridge.B,
            ridge.intercept,
            c.n_tokens,
            c.dim,
            name,
            path,
            precision,
            contract.opset,
            external,
        )

    return ExportSource(
        contract,
        lambda inputs: {name: ridge.predict(inputs["betas"], renormalize=False)},
        build=build,
        weight_bytes=int(ridge.A.nbytes + ridge.B.nbytes + ridge.intercept.nbytes),
    )


def stage2_sources(model: Stage2Model, names: list[str]) -> list[ExportSource]:
    """One ExportSource per requested stage-2 contract, from the loaded torch reference."""
    vae, unet, sampling, dual = model.vae.eval(), model.unet.eval(), model.sampling, model.dual_config
    image_size = model.image_size
    latent_size = image_size // vae_downsampling(vae)
    channels = int(vae.config.latent_channels)
    if (unet.config.in_channels, unet.config.sample_size) != (channels, latent_size):
        raise ConfigError(
            f"stage 2: expected a UNet on the VAE's {channels}x{latent_size}x{latent_size} latents, found "
            f"{unet.config.in_channels}x{unet.config.sample_size}x{unet.config.sample_size}"
        )
    scale = float(sampling.vae_scale_factor)
    sources = []
    for name in names:
        if name in ("clip_text", "clip_vision"):
            sources.append(_clip_source(name, model.clip[name.removeprefix("clip_")]))
        elif name == "vae_encoder":
            contract = vae_encoder_contract(image_size, channels, latent_size, scale)
            sources.append(_torch_source(VAEEncoderGraph(vae, scale), contract))
        elif name == "vae_decoder":
            contract = vae_decoder_contract(image_size, channels, latent_size, scale)
            sources.append(_torch_source(VAEDecoderGraph(vae, scale), contract))
        elif name == "unet":
            set_mix_ratio(unet, sampling.mix_ratio)  # baked into the graph, as img2img sets it per call
            contract = unet_contract(
                channels,
                latent_size,
                dual.vision_tokens,
                dual.text_tokens,
                dual.cross_attention_dim,
                sampling.mix_ratio,
                image_size,
            )
            pools = {"encoder_hidden_states": context_pool(model)}
            sources.append(_torch_source(UNetGraph(unet), contract, pools))
        elif name in ("unet_context", "unet_kv"):
            set_mix_ratio(unet, sampling.mix_ratio)
            layers = unet_kv_shapes(unet)
            pool = context_pool(model)
            if name == "unet_context":
                contract = unet_context_contract(
                    layers, dual.vision_tokens, dual.text_tokens, dual.cross_attention_dim, image_size
                )
                sources.append(
                    _torch_source(UNetContextGraph(unet), contract, {"encoder_hidden_states": pool})
                )
            else:
                contract = unet_kv_contract(channels, latent_size, layers, sampling.mix_ratio, image_size)
                sources.append(_torch_source(UNetKVGraph(unet), contract, kv_pool(unet, pool)))
        elif name in ("unet_deep", "unet_shallow"):
            set_mix_ratio(unet, sampling.mix_ratio)
            args = (
                channels,
                latent_size,
                feature_channels(unet),
                dual.vision_tokens,
                dual.text_tokens,
                dual.cross_attention_dim,
                sampling.mix_ratio,
                image_size,
            )
            pool = context_pool(model)
            if name == "unet_deep":
                sources.append(
                    _torch_source(
                        UNetDeepGraph(unet), unet_deep_contract(*args), {"encoder_hidden_states": pool}
                    )
                )
            else:
                pools = {"encoder_hidden_states": pool, "feature": feature_pool(unet, pool)}
                sources.append(_torch_source(UNetShallowGraph(unet), unet_shallow_contract(*args), pools))
        else:  # pragma: no cover - contract_names only yields the stage-2 models of model_dir.py
            raise ConfigError(f"no stage-2 export source for {name!r}")
    return sources


# ----------------------------------------------------------------------------------------- scheduler tables


def pow2_column_scale(matrix: np.ndarray) -> np.ndarray:
    """(C,) float32: per column, the power of two at or above its max |value| (1 for an all-zero column)."""
    col_max = np.abs(matrix).max(axis=0)
    return np.exp2(np.ceil(np.log2(np.where(col_max > 0, col_max, 1.0)))).astype(np.float32)


def build_clip_ridge_onnx(
    A: np.ndarray,
    B: np.ndarray,
    intercept: np.ndarray,
    n_tokens: int,
    dim: int,
    output_name: str,
    path: Path,
    precision: str,
    opset: int = 17,
    external: bool = False,
) -> list[Path]:
    """Reduced-rank CLIP ridge (train/stage2/clip_ridge.py): betas (B, V) → MatMul A (V, r) → MatMul B (r, T·D) →
    Add intercept (T·D,) → Reshape (B, T, D), written to `path`. A·B is never formed (V × T·D weights).

    fp16: betas → Cast → MatMul(A / a) → MatMul(diag(a) B / b) → Cast(fp32) → Mul(b) → Add(intercept) → Reshape,
    with `a` (r,) and `b` (T·D,) the power-of-two column scales (exact to apply and undo) that bring both fp16
    factors into [-1, 1]: ridge weights at alpha 1e5 sit near fp16's subnormal range, as in `build_ridge_onnx`,
    whose reasons for the fp32 intercept (re-normalisation amplifies rounding of the sum) hold here too.
    """
    from onnx import TensorProto, helper, numpy_helper

    if precision not in FILE_PRECISIONS:
        raise ConfigError(f"precision: expected one of {FILE_PRECISIONS}, found {precision!r}")
    v, r = A.shape
    if B.shape != (r, n_tokens * dim) or intercept.shape != (n_tokens * dim,):
        raise InputError(
            path.name,
            f"factors A (V, r), B (r, {n_tokens * dim}), intercept ({n_tokens * dim},)",
            f"A {A.shape}, B {B.shape}, intercept {intercept.shape}",
        )
    initializers = [
        numpy_helper.from_array(np.asarray(intercept, np.float32), "intercept"),
        numpy_helper.from_array(np.array([-1, n_tokens, dim], np.int64), "token_shape"),
    ]
    if precision == "fp16":
        a_scale = pow2_column_scale(A)  # (r,)
        b_scaled = B.astype(np.float64) * a_scale[:, None].astype(np.float64)  # (r, T·D) = diag(a) B
        b_scale = pow2_column_scale(b_scaled)  # (T·D,)
        initializers += [
            numpy_helper.from_array((A / a_scale).astype(np.float16), "A"),
            numpy_helper.from_array((b_scaled / b_scale).astype(np.float16), "B"),
            numpy_helper.from_array(b_scale, "B_scale"),
        ]
        nodes = [
            helper.make_node("Cast", ["betas"], ["betas_fp16"], to=TensorProto.FLOAT16, name="cast_in"),
            helper.make_node("MatMul", ["betas_fp16", "A"], ["low_rank"], name="matmul_A"),  # (B, r)
            helper.make_node("MatMul", ["low_rank", "B"], ["flat_fp16"], name="matmul_B"),  # (B, T·D)
            helper.make_node("Cast", ["flat_fp16"], ["flat_scaled"], to=TensorProto.FLOAT, name="cast_out"),
            helper.make_node("Mul", ["flat_scaled", "B_scale"], ["flat"], name="unscale"),
        ]
    else:
        initializers += [
            numpy_helper.from_array(np.asarray(A, np.float32), "A"),
            numpy_helper.from_array(np.asarray(B, np.float32), "B"),
        ]
        nodes = [
            helper.make_node("MatMul", ["betas", "A"], ["low_rank"], name="matmul_A"),  # (B, r)
            helper.make_node("MatMul", ["low_rank", "B"], ["flat"], name="matmul_B"),  # (B, T·D)
        ]
    nodes += [
        helper.make_node("Add", ["flat", "intercept"], ["flat_out"], name="add_intercept"),
        helper.make_node(
            "Reshape", ["flat_out", "token_shape"], [output_name], name="to_tokens"
        ),  # (B, T, D)
    ]
    graph = helper.make_graph(
        nodes,
        f"{output_name}_{precision}",
        [helper.make_tensor_value_info("betas", TensorProto.FLOAT, ["batch", v])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", n_tokens, dim])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="brainrecon"
    )
    set_ir_version(model)
    return save_onnx(model, path, external)


def scheduler_tables(sampling: SamplingConfig) -> dict[str, Any]:
    """The DDIM constants and the fitted sampling run's per-step tables, from diffusers' DDIMScheduler (the
    reference the numpy runtime scheduler is checked against). Step i maps x_{t_i} to x_{t_i - k}."""
    import diffusers

    scheduler = vd_scheduler()
    timesteps = denoising_timesteps(scheduler, sampling.num_inference_steps, sampling.strength)  # sets them
    step_ratio = scheduler.config.num_train_timesteps // sampling.num_inference_steps
    alphas = scheduler.alphas_cumprod  # (1000,) float32
    final = float(scheduler.final_alpha_cumprod)
    t = [int(x) for x in timesteps]
    prev = [x - step_ratio for x in t]
    return {
        "format": SCHEDULER_FORMAT[0],
        "version": SCHEDULER_FORMAT[1],
        "source": f"diffusers {diffusers.__version__} DDIMScheduler",
        "scheduler": dict(DDIM_SCHEDULER),
        "sampling": config_to_dict(sampling),
        "step_ratio": step_ratio,
        "timesteps": t,  # (S,) what the UNet is called with; t[0] is also add_noise's timestep
        "alpha_t": [float(alphas[x]) for x in t],  # alphas_cumprod[t_i]
        "prev_timesteps": prev,  # t_i - step_ratio (< 0 on the last step)
        "alpha_prev": [float(alphas[x]) if x >= 0 else final for x in prev],
        "final_alpha_cumprod": final,
        "alphas_cumprod": [float(a) for a in alphas],  # (num_train_timesteps,) the whole table
    }


def fitted_sampling(model_dir: Path) -> SamplingConfig:
    """The sampling settings recorded in `model_dir/stage2/stage2.json` (what Stage2Model.load reads)."""
    path = Path(model_dir) / STAGE2_SUMMARY
    info = read_json(path, "stage-2 summary (recon-train subject --stage clip)")
    return config_from_dict(SamplingConfig, info["sampling"], str(path))


def write_scheduler_json(model_dir: Path, root: Path | None = None) -> str:
    """Write `stage2/scheduler.json` for the fitted sampling settings of `model_dir` under `root` (default the
    model directory; the export stages it elsewhere first), atomically; returns its relative path."""
    write_json(Path(root or model_dir) / SCHEDULER, scheduler_tables(fitted_sampling(model_dir)))
    return SCHEDULER
