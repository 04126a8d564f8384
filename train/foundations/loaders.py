"""Where the foundation models come from: the shipped small weights, a local folder, or one whole Versatile
Diffusion folder (stage 2); the VDVAE of stage 1 also from an openai checkpoint file.

Each loader takes a spec and returns the model with a provenance dict that the subject's model folder records, so
a later run can refuse a foundation that changed under it:

    {"source": spec, "sha256": ..., "files": {relative path: sha256 of that file}}

"files" lists every file the model was read from (weights, and for CLIP the tokenizer and image-processor files
too, since they shape the features). "sha256" is that file's own sha256 when there is one file (as before), else
the sha256 of the lines `<sha256>  <relative path>\\n` sorted by path: `sha256sum` of the files, run from the
folder on the paths in sorted order and piped through `sha256sum` again, gives the same digest.

    clip: "builtin:small" | a local Hugging Face CLIPModel folder (ViT-L/14 or ours) | a Versatile Diffusion folder
          (its text_encoder/, image_encoder/, tokenizer/, image_feature_extractor/)
    vae:  "builtin:small" | an AutoencoderKL folder | a Versatile Diffusion folder (its vae/)
    unet: "builtin:small" | a recon-train foundation unet folder | a Versatile Diffusion folder (image_unet/ +
          text_unet/; its scheduler/ is checked against the DDIM settings the runtime implements)
    vdvae: "builtin:small64" | a recon-train foundation vdvae folder | an openai checkpoint file
           (`imagenet64-iter-1600000-model-ema.th`); its provenance also records the model's config

A diffusers Versatile Diffusion folder (shi-labs/versatile-diffusion layout, `model_index.json` naming
`VersatileDiffusionPipeline`) can be given for all three: `recon-train subject --clip VD --vae VD --unet VD`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

import brainrecon
from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.io import sha256_file
from brainrecon.train.foundations.clip_features import (
    CLIPFeatureExtractor,
    is_versatile_diffusion_folder,
    versatile_diffusion_clip_files,
    versatile_diffusion_clip_shapes,
    weight_files,
)
from brainrecon.train.foundations.dual_unet import (
    DualUNetConfig,
    load_versatile_diffusion_unet,
    versatile_diffusion_unet_files,
)
from brainrecon.train.foundations.vdvae import (
    VDVAE,
    VDVAE_CONFIGS,
    WEIGHTS_FILE,
    load_openai_checkpoint,
    load_vdvae,
)

BUILTIN_WEIGHTS = Path(brainrecon.__file__).resolve().parent / "weights"  # shipped in the core package
DEFAULTS = {"clip": "builtin:small", "vae": "builtin:small", "unet": "builtin:small"}
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# Scheduler settings that must be present (explicitly or as the class default): they define the noise schedule
# and what the UNet predicts. The others are DDIM sampling settings, checked when the folder's class has them.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


def resolve(spec: str, kind: str) -> Path:
    """'builtin:<name>' -> the shipped brainrecon/weights/<kind>-<name> folder; anything else -> that path."""
    if spec.startswith("builtin:"):
        path = BUILTIN_WEIGHTS / f"{kind}-{spec.removeprefix('builtin:')}"
        if not path.is_dir():
            raise MissingFileError(path, f"shipped {kind} weights for {spec}", "re-install brainrecon")
        return path
    path = Path(spec)
    if not path.exists():
        raise MissingFileError(path, f"{kind} foundation model folder")
    return path


def _weights_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise MissingFileError(folder, what, f"expected one of {', '.join(names)}")


def resolve_vdvae(spec: str) -> tuple[VDVAE, dict]:
    """Foundation VDVAE from 'builtin:<name>', a save_vdvae folder or an openai checkpoint file."""
    if spec.startswith("builtin:"):
        path = BUILTIN_WEIGHTS / f"vdvae-{spec.removeprefix('builtin:')}"
        if not path.is_dir():
            raise MissingFileError(
                path, f"shipped VDVAE weights for {spec}", "re-install brainrecon or pass --vdvae"
            )
        model, weights = load_vdvae(path), path / WEIGHTS_FILE
    elif Path(spec).is_dir():
        model, weights = load_vdvae(spec), Path(spec) / WEIGHTS_FILE
    elif Path(spec).is_file():
        model, weights = load_openai_checkpoint(spec, VDVAE_CONFIGS["imagenet64"]), Path(spec)
    else:
        raise MissingFileError(
            spec, "VDVAE weights (a folder from recon-train foundation vdvae, or an openai .th file)"
        )
    info = {"source": spec, "sha256": sha256_file(weights), "config": dataclasses.asdict(model.config)}
    return model.eval(), info


def load_clip(
    spec: str = DEFAULTS["clip"], batch_size: int = 64, device: str | torch.device = "cpu"
) -> tuple[CLIPFeatureExtractor, dict]:
    """The CLIP feature extractor of `spec` on `device`, `batch_size` images or captions per call (ViT-L/14 in
    fp32: ~20 MB of activations per image; 64 fits an 8 GB GPU)."""
    folder = resolve(spec, "clip")
    if is_versatile_diffusion_folder(folder):
        files = versatile_diffusion_clip_files(folder)
    else:
        files = weight_files(folder)
    extractor = CLIPFeatureExtractor.from_pretrained(folder, batch_size=batch_size, device=device)
    return extractor, _info(spec, folder, files)


def load_vae(spec: str = DEFAULTS["vae"]) -> tuple[AutoencoderKL, dict]:
    root = folder = resolve(spec, "vae")
    if (folder / "vae").is_dir():  # a whole Versatile Diffusion / Stable Diffusion folder
        folder = folder / "vae"
    weights = _weights_file(
        folder, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), "VAE weights"
    )
    with quiet_diffusers():
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    return vae.eval(), _info(spec, root, [weights])


def load_unet(
    spec: str = DEFAULTS["unet"],
) -> tuple[UNet2DConditionModel, DualUNetConfig, dict]:
    """The dual-guided UNet and its token layout (vision tokens first, then text)."""
    from brainrecon.config import load_config
    from brainrecon.train.foundations.ldm_train import DUAL_UNET_CONFIG, load_dual_unet

    folder = resolve(spec, "unet")
    if (folder / "image_unet").is_dir():
        return _load_versatile_diffusion_unet(spec, folder)
    unet = load_dual_unet(folder)
    config = load_config(DualUNetConfig, folder / DUAL_UNET_CONFIG)
    return unet, config, _info(spec, folder, [folder / "diffusion_pytorch_model.safetensors"])


def _load_versatile_diffusion_unet(
    spec: str, folder: Path
) -> tuple[UNet2DConditionModel, DualUNetConfig, dict]:
    """image_unet/ + text_unet/ as one dual-guided UNet. Cheap checks first: the scheduler settings, the token
    counts (from the folder's own CLIP encoders: 257 vision + 77 text for ViT-L/14) and the weight files."""
    check_versatile_diffusion_scheduler(folder)
    shapes = versatile_diffusion_clip_shapes(folder)
    files = versatile_diffusion_unet_files(folder)
    with quiet_diffusers():
        unet = load_versatile_diffusion_unet(
            folder, vision_tokens=shapes.vision_tokens, text_tokens=shapes.text_tokens
        ).eval()
    cfg = unet.config
    config = DualUNetConfig(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        text_tokens=shapes.text_tokens,
        vision_tokens=shapes.vision_tokens,
    )
    return unet, config, _info(spec, folder, list(files.values()))


def expected_scheduler_settings() -> dict[str, Any]:
    """The scheduler settings stage 2 implements: brainrecon.sampling.DDIM_SCHEDULER (the torch reference, the
    exported scheduler.json and the numpy runtime's DDIM: epsilon prediction, "leading" spacing, no clipping), and
    no settings it does not implement."""
    from brainrecon.sampling import DDIM_SCHEDULER

    return {
        **DDIM_SCHEDULER,
        "trained_betas": None,  # the betas come from beta_start/beta_end/beta_schedule
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }


def check_versatile_diffusion_scheduler(folder: str | Path) -> dict[str, Any]:
    """Read `scheduler/scheduler_config.json` of a Versatile Diffusion folder and refuse, with a one-line
    ConfigError, any setting that differs from `expected_scheduler_settings()`.

    The folder's scheduler class does not matter (the runtime always samples with DDIM, as Brain-Diffuser does);
    its settings do: a key the file omits takes the default of the class it names, as diffusers does when it loads
    it. Returns the settings read (with `_class_name`).
    """
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    path = Path(folder) / SCHEDULER_CONFIG
    if not path.is_file():
        raise MissingFileError(
            path, "Versatile Diffusion scheduler config", "expected scheduler/ beside image_unet/"
        )
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(path, "a JSON scheduler config", f"invalid JSON ({exc.msg})") from exc
    name = raw.get("_class_name") if isinstance(raw, dict) else None
    scheduler_cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (inspect.isclass(scheduler_cls) and issubclass(scheduler_cls, SchedulerMixin)):
        raise ConfigError(f"{path}: expected `_class_name` naming a diffusers scheduler, found {name!r}")
    defaults = {
        key: p.default
        for key, p in inspect.signature(scheduler_cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    settings = {**defaults, **raw}
    for key, want in expected_scheduler_settings().items():
        if key not in settings:
            if key in SCHEDULE_KEYS:
                raise ConfigError(f"{path}: expected scheduler {key} {want!r}, found no {key} ({name})")
            continue
        found = settings[key]
        if not _same_setting(found, want):
            raise ConfigError(
                f"{path}: expected scheduler {key} {want!r} (the DDIM settings the runtime implements), "
                f"found {found!r}"
            )
    return {"_class_name": name, **{k: settings[k] for k in expected_scheduler_settings() if k in settings}}


def _same_setting(found: Any, want: Any) -> bool:
    if isinstance(want, bool) or want is None or isinstance(want, str):
        return found is want or (type(found) is type(want) and found == want)
    if isinstance(want, int):
        return isinstance(found, int) and not isinstance(found, bool) and found == want
    if isinstance(want, float):
        return isinstance(found, (int, float)) and not isinstance(found, bool) and math.isclose(found, want)
    return found == want


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers warns on every load that `accelerate` is absent; loading is small and CPU-side here."""
    old = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(old)


def files_digest(file_sha256: dict[str, str]) -> str:
    """One sha256 for several files: of the `sha256sum` lines `<sha256>  <path>\\n`, sorted by path."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(file_sha256.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _info(spec: str, root: Path, files: list[Path]) -> dict:
    """Provenance of a foundation read from `files` (module doc): one file keeps its own sha256."""
    root = root if root.is_dir() else root.parent
    digests = {f.relative_to(root).as_posix(): sha256_file(f) for f in files}
    sha256 = next(iter(digests.values())) if len(digests) == 1 else files_digest(digests)
    return {"source": spec, "sha256": sha256, "files": digests}
