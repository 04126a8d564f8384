"""Every file of a subject model folder that training, export and runtime share (as `data/layout.py` does for NSD).

    model_dir/
      preprocess.json voxel_mean.npy voxel_std.npy mask_indices.npy    recon-prepare's record, copied by recon-train
      stage1/stage1.json latent_mean.npy latent_std.npy <regressor>/ vdvae/   recon-train subject (stage 1)
      stage2/stage2.json clip_{text,vision}_target_{mean,std}.npy uncond_{text,vision}.npy ...   (stage 2)
      stage2/scheduler.json                                             recon-export: diffusers' DDIM tables
      onnx/<model>.<precision>.onnx [.data]                             recon-export
      trt/<model>.<precision>.<key>.plan                                recon-export on a TensorRT machine
      manifest.json                                                     recon-export, written last: sha256 of all

Paths are POSIX, relative to the model folder (the manifest's form).
"""

from __future__ import annotations

# recon-prepare's preprocessing record, which inference applies to raw betas
PREPROCESS = "preprocess.json"
VOXEL_MEAN = "voxel_mean.npy"
VOXEL_STD = "voxel_std.npy"
MASK_INDICES = "mask_indices.npy"
PREPROCESS_FILES = (PREPROCESS, VOXEL_MEAN, VOXEL_STD, MASK_INDICES)

STAGE1_DIR = "stage1"
STAGE1_SUMMARY = f"{STAGE1_DIR}/stage1.json"
LATENT_MEAN = f"{STAGE1_DIR}/latent_mean.npy"
LATENT_STD = f"{STAGE1_DIR}/latent_std.npy"
STAGE1_FILES = (STAGE1_SUMMARY, LATENT_MEAN, LATENT_STD)

STAGE2_DIR = "stage2"
STAGE2_SUMMARY = f"{STAGE2_DIR}/stage2.json"
SCHEDULER = f"{STAGE2_DIR}/scheduler.json"  # written by the export, read by the runtime
SCHEDULER_FORMAT = ("brainrecon.ddim_tables", 1)  # scheduler.json's (format, version)
CLIP_TARGETS = ("text", "vision")


def clip_target_stat(target: str, stat: str) -> str:
    """The training statistics ("mean" | "std") of the CLIP-`target` ("text" | "vision") regressor's outputs."""
    return f"{STAGE2_DIR}/clip_{target}_target_{stat}.npy"


def uncond_context(target: str) -> str:
    """The unconditional CLIP-`target` context of classifier-free guidance (CLIP of "" / of the blank image)."""
    return f"{STAGE2_DIR}/uncond_{target}.npy"


STAGE2_FILES = (
    STAGE2_SUMMARY,
    *(clip_target_stat(t, s) for t in CLIP_TARGETS for s in ("mean", "std")),
    *(uncond_context(t) for t in CLIP_TARGETS),
)

# exported models: contract names, stage by stage; stage 1's regressor is named as its kind
# (brainrecon.choices.REGRESSORS: gru | ridge)
VDVAE_DECODER = "vdvae_decoder"
STAGE2_MODELS = ("clip_text", "clip_vision", "vae_encoder", "vae_decoder", "unet")
# The K/V-once pair (export/contracts.py): the cross-attention K/V of a context, and the UNet step taking them.
# Exported beside `unet` or instead of it (recon-export --unet-graph); the runtime and the Triton repository use
# the pair when present.
STAGE2_KV_MODELS = ("unet_context", "unet_kv")
# The two forms of the UNet step: "kv" (the pair, preferred) and "plain" (the context in, `unet`)
UNET_GRAPH_MODELS = {"kv": STAGE2_KV_MODELS, "plain": ("unet",)}
# DeepCache step reuse (train/stage2/deepcache.py): the full step that also returns the deep feature, and the
# shallow step that takes it; exported on request (recon-export --deepcache), used by runs with cache_interval > 1.
STAGE2_DEEPCACHE_MODELS = ("unet_deep", "unet_shallow")

ONNX_DIR = "onnx"
ENGINE_DIR = "trt"
MANIFEST = "manifest.json"


def onnx_file(model: str, precision: str) -> str:
    return f"{ONNX_DIR}/{model}.{precision}.onnx"


def engine_file(model: str, precision: str, key_digest: str) -> str:
    """A TensorRT plan; its name carries the first 12 hex digits of its build key."""
    return f"{ENGINE_DIR}/{model}.{precision}.{key_digest[:12]}.plan"
