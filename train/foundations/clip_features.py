"""Stage-2 targets: CLIP token embeddings in Versatile Diffusion's normalisation.

Versatile Diffusion (Xu et al. 2023, SHI-Labs/Versatile-Diffusion `lib/model_zoo/clip.py`, `FrozenCLIP.encode_text`
/ `encode_vision`; diffusers `VersatileDiffusionDualGuidedPipeline._encode_text_prompt` / `_encode_image_prompt`)
conditions its UNet on every CLIP token, not only the pooled one. Brain-Diffuser (ozcelikfu/brain-diffuser
`scripts/cliptext_extract_features.py`, `scripts/clipvision_extract_features.py`) regresses these tokens from fMRI:

  text   (L=77, D=768):  text_projection(last_hidden_state) / ‖text_embeds‖, text_embeds = projected EOS token;
                          the (up to 5) captions of an image are averaged after normalisation.
  vision (1+P=257, D):   visual_projection(post_layernorm(last_hidden_state)) on ALL tokens / ‖CLS row‖.

Only the pooled token is normalised; all other tokens keep their scale relative to it, so the UNet sees the same
magnitudes it was trained with.

Input convention: images are uint8 RGB in [0, 255] and go through the CLIP image processor as such. Brain-Diffuser
passed float tensors in [-1, 1] to the processor; transformers 4.19 turned floats into uint8 by ×255 (wrapping
negatives), while ≥ 4.2x rescales floats by 1/255: this is one way its CLIP-vision features changed between 4.19.2
and 4.33 (Brain-Diffuser's reproduction notes, ozcelikfu/brain-diffuser README). uint8 input means the same thing
to every transformers version.

Two folder layouts load (`CLIPFeatureExtractor.from_pretrained`):

    a CLIPModel folder (openai/clip-vit-large-patch14, or the shipped small CLIP):
        config.json (text_config + vision_config), model.safetensors | pytorch_model.bin, tokenizer files,
        [preprocessor_config.json]
    a diffusers Versatile Diffusion folder (shi-labs/versatile-diffusion layout), CLIP kept apart:
        text_encoder/            CLIPTextModelWithProjection  (config.json + weights)
        image_encoder/           CLIPVisionModelWithProjection
        tokenizer/               CLIPTokenizer: vocab.json + merges.txt (slow BPE files; a tokenizer.json also works)
        image_feature_extractor/ CLIPImageProcessor (preprocessor_config.json)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from brainrecon.errors import ConfigError, InputError, MissingFileError

# OpenAI CLIP's pixel statistics: the defaults of CLIPImageProcessor, used when the folder has no processor config.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "[PAD]", "<eos>", "</s>")
# Where a diffusers Versatile Diffusion folder keeps each CLIP part (VersatileDiffusionPipeline's component names).
VD_CLIP_PARTS = {
    "text": "text_encoder",
    "vision": "image_encoder",
    "tokenizer": "tokenizer",
    "processor": "image_feature_extractor",
}


@dataclass(frozen=True)
class ClipFeatureShapes:
    """What `text_embeddings` / `vision_embeddings` return per image: (text_tokens, dim) and (vision_tokens, dim)."""

    text_tokens: int  # L = max_position_embeddings (77 for ViT-L/14)
    vision_tokens: int  # 1 + P = 1 + (image_size / patch_size)² (257 for ViT-L/14 at 224)
    dim: int  # D = projection_dim (768)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Each tower loaded from a CLIPModel checkpoint reports the other tower's keys as unexpected: expected here,
    and missing keys are checked explicitly instead."""
    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a per-tower "Loading weights" bar says nothing useful here
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def is_versatile_diffusion_folder(folder: str | Path) -> bool:
    """A diffusers Versatile Diffusion folder: CLIP split into text_encoder/ and image_encoder/ (module doc)."""
    folder = Path(folder)
    return (folder / VD_CLIP_PARTS["text"]).is_dir() and (folder / VD_CLIP_PARTS["vision"]).is_dir()


def clip_shapes(text_config: CLIPTextConfig, vision_config: CLIPVisionConfig) -> ClipFeatureShapes:
    """Token counts and width of the features, from the two towers' configs (what the UNet must be built for)."""
    return ClipFeatureShapes(
        text_tokens=text_config.max_position_embeddings,
        vision_tokens=1 + (vision_config.image_size // vision_config.patch_size) ** 2,
        dim=text_config.projection_dim,
    )


def versatile_diffusion_clip_shapes(folder: str | Path) -> ClipFeatureShapes:
    """The CLIP feature shapes of a Versatile Diffusion folder, from its encoders' config.json only (no weights)."""
    folder = Path(folder)
    configs = []
    for part, config_cls in (("text", CLIPTextConfig), ("vision", CLIPVisionConfig)):
        path = folder / VD_CLIP_PARTS[part] / "config.json"
        if not path.is_file():
            raise MissingFileError(path, f"Versatile Diffusion {VD_CLIP_PARTS[part]} config")
        with _quiet_transformers():
            configs.append(config_cls.from_pretrained(path.parent))
    return clip_shapes(*configs)


def versatile_diffusion_clip_files(folder: str | Path) -> list[Path]:
    """Every file the CLIP features of a Versatile Diffusion folder depend on: both encoders' weights (all shards),
    the tokenizer's vocabulary files and the image processor's config. Raises MissingFileError for a missing part."""
    folder = Path(folder)
    parts = {key: folder / name for key, name in VD_CLIP_PARTS.items()}
    for key, path in parts.items():
        if not path.is_dir():
            raise MissingFileError(
                path,
                f"Versatile Diffusion {VD_CLIP_PARTS[key]}/ folder",
                f"expected {', '.join(v + '/' for v in VD_CLIP_PARTS.values())}",
            )
    files = weight_files(parts["text"]) + weight_files(parts["vision"])
    tokenizer = [parts["tokenizer"] / n for n in ("vocab.json", "merges.txt")]
    if not all(f.is_file() for f in tokenizer):
        tokenizer = [parts["tokenizer"] / "tokenizer.json"]
    processor = parts["processor"] / "preprocessor_config.json"
    for f in [*tokenizer, processor]:
        if not f.is_file():
            raise MissingFileError(f, f"Versatile Diffusion {f.parent.name} file")
    return files + tokenizer + [processor]


def weight_files(folder: Path) -> list[Path]:
    """The transformers weight file(s) of a model folder, in WEIGHT_FILES' order of preference; a sharded
    checkpoint gives its index and every shard it names."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise InputError(
                path, "a sharded-checkpoint index with a weight_map", type(exc).__name__
            ) from exc
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise MissingFileError(folder / missing[0], f"weight shard named in {name}")
        return [path, *(folder / s for s in shards)]
    raise MissingFileError(folder, "CLIP weights", f"expected one of {', '.join(WEIGHT_FILES)}")


def _load_tower(model_cls: type, folder: Path):
    """One CLIP tower in fp32; a missing or mis-shaped key (a randomly initialised layer) is refused."""
    weight_files(folder)  # a one-line MissingFileError before transformers' own message
    with _quiet_transformers():
        model, info = model_cls.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    if info["missing_keys"] or info["mismatched_keys"]:
        bad = sorted(info["missing_keys"]) + sorted(str(k[0]) for k in info["mismatched_keys"])
        raise MissingFileError(folder, f"{model_cls.__name__} weights", f"absent or mis-shaped: {bad[:5]}")
    return model


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MissingFileError(config_path, "CLIP config", "expected a Hugging Face CLIPModel folder")
    cfg = json.loads(config_path.read_text())
    for key in ("text_config", "vision_config"):
        if key not in cfg:
            raise ConfigError(
                f"{config_path}: expected a CLIPModel config with `{key}`, found keys {sorted(cfg)}"
            )
    return cfg


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """CLIP's BPE tokenizer when its files are there; else a `tokenizers` tokenizer.json (the small trained CLIP)."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(folder)
    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise MissingFileError(folder, "tokenizer", "expected vocab.json + merges.txt or tokenizer.json")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))
    if tokenizer.pad_token is None:
        # Padding to the full context needs a pad id; CLIP pads with its EOS token, a word-level vocab with <pad>.
        vocab = tokenizer.get_vocab()
        pad = next((t for t in PAD_CANDIDATES if t in vocab), None)
        if pad is None:
            raise InputError(
                tokenizer_json, f"a pad token (one of {', '.join(PAD_CANDIDATES)})", "none in vocab"
            )
        tokenizer.pad_token = pad
    return tokenizer


class CLIPPreprocess:
    """uint8 (N, H, W, 3) → pixel_values (N, 3, S, S) float32.

    With the folder's CLIPImageProcessor when it has one; otherwise CLIP's own recipe by hand: bicubic resize of the
    short side to S, centre crop S×S, /255, normalise with OpenAI CLIP's mean/std.
    """

    def __init__(self, folder: Path, image_size: int):
        self.processor: CLIPImageProcessor | None = None
        if (folder / "preprocessor_config.json").is_file():
            # Without torchvision, transformers 5 falls back to the PIL backend (a printed notice): the same
            # bicubic resize as transformers 4.x and as the hand-written path below.
            with _quiet_transformers():
                self.processor = CLIPImageProcessor.from_pretrained(folder)
        self.image_size = image_size
        self.mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)
        self.std = np.asarray(OPENAI_CLIP_STD, np.float32)

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        if self.processor is not None:
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            return pixels.to(torch.float32)
        return torch.from_numpy(np.stack([self._one(im) for im in images]))

    def _one(self, image: np.ndarray) -> np.ndarray:
        s = self.image_size
        h, w = image.shape[:2]
        # Short side to S, long side floored: transformers' `get_resize_output_image_size` rounding.
        new_h, new_w = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        resized = Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC)
        top, left = (new_h - s) // 2, (new_w - s) // 2
        crop = np.asarray(resized, np.float32)[top : top + s, left : left + s] / 255.0  # (S, S, 3)
        return ((crop - self.mean) / self.std).transpose(2, 0, 1).copy()  # (3, S, S)


class CLIPFeatureExtractor:
    """CLIP text/vision token embeddings for stage 2, normalised as Versatile Diffusion expects (module doc)."""

    def __init__(
        self,
        text_model: CLIPTextModelWithProjection,
        vision_model: CLIPVisionModelWithProjection,
        tokenizer: PreTrainedTokenizerBase,
        preprocess: CLIPPreprocess,
        source: str = "CLIP",
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ):
        text_dim = text_model.config.projection_dim
        vision_dim = vision_model.config.projection_dim
        if text_dim != vision_dim:
            raise ConfigError(
                f"{source}: text and vision projection_dim must match (one UNet context width), "
                f"found text {text_dim}, vision {vision_dim}"
            )
        if batch_size < 1:
            raise ConfigError(f"{source}: batch_size must be >= 1, found {batch_size}")
        self.device = torch.device(device)
        self.text_model = text_model.eval().to(self.device)
        self.vision_model = vision_model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.source = source
        self.batch_size = batch_size
        self.shapes = clip_shapes(text_model.config, vision_model.config)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, batch_size: int = 32, device: str | torch.device = "cpu"
    ) -> CLIPFeatureExtractor:
        """Load a local CLIPModel folder or a Versatile Diffusion folder (module doc), detected by its layout."""
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFileError(folder, "CLIP model folder")
        if is_versatile_diffusion_folder(folder):
            return cls.from_versatile_diffusion(folder, batch_size, device)
        cfg = _read_config(folder)
        if not any((folder / name).is_file() for name in WEIGHT_FILES):
            raise MissingFileError(folder, "CLIP weights", f"expected one of {', '.join(WEIGHT_FILES)}")
        text_proj = cfg["text_config"].get("projection_dim", cfg.get("projection_dim"))
        vision_proj = cfg["vision_config"].get("projection_dim", cfg.get("projection_dim"))
        if text_proj != vision_proj:
            raise ConfigError(
                f"{folder / 'config.json'}: text_config and vision_config projection_dim must match, "
                f"found {text_proj} and {vision_proj}"
            )
        # Each tower reads its half of the CLIPModel checkpoint (the other half is reported unexpected: quiet).
        text_model = _load_tower(CLIPTextModelWithProjection, folder)
        vision_model = _load_tower(CLIPVisionModelWithProjection, folder)
        preprocess = CLIPPreprocess(folder, vision_model.config.image_size)
        return cls(
            text_model, vision_model, load_tokenizer(folder), preprocess, str(folder), batch_size, device
        )

    @classmethod
    def from_versatile_diffusion(
        cls, folder: str | Path, batch_size: int = 32, device: str | torch.device = "cpu"
    ) -> CLIPFeatureExtractor:
        """The CLIP of a diffusers Versatile Diffusion folder: text_encoder/, image_encoder/, tokenizer/,
        image_feature_extractor/ (what diffusers' VersatileDiffusionDualGuidedPipeline encodes prompts with)."""
        folder = Path(folder)
        versatile_diffusion_clip_files(folder)  # every part present, before loading any
        parts = {key: folder / name for key, name in VD_CLIP_PARTS.items()}
        text_model = _load_tower(CLIPTextModelWithProjection, parts["text"])
        vision_model = _load_tower(CLIPVisionModelWithProjection, parts["vision"])
        preprocess = CLIPPreprocess(parts["processor"], vision_model.config.image_size)
        tokenizer = load_tokenizer(parts["tokenizer"])
        return cls(text_model, vision_model, tokenizer, preprocess, str(folder), batch_size, device)

    # ---------------------------------------------------------------- text
    def _check_captions(self, captions: list[list[str]]) -> None:
        if not isinstance(captions, list) or not captions:
            raise InputError(
                "captions", "a non-empty list (one list of captions per image)", repr(type(captions))
            )
        for i, caps in enumerate(captions):
            if isinstance(caps, str) or not isinstance(caps, (list, tuple)) or not caps:
                raise InputError(f"captions[{i}]", "a non-empty list of strings", repr(caps)[:60])
            if not all(isinstance(c, str) for c in caps):
                raise InputError(f"captions[{i}]", "strings only", repr([type(c).__name__ for c in caps]))

    @torch.no_grad()
    def _encode_captions(self, texts: list[str]) -> torch.Tensor:
        """Captions → (B, L, D): projected tokens / ‖projected pooled (EOS) token‖, one caption each."""
        L = self.shapes.text_tokens
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=L, truncation=True, return_tensors="pt"
        )
        input_ids = tokens["input_ids"].to(self.device)  # (B, L)
        eos = self.text_model.config.eos_token_id
        # eos_token_id == 2 is the legacy config (argmax pooling, e.g. openai ViT-L/14); any other id is pooled at
        # its first occurrence, and a row without it would silently pool token 0.
        if eos != 2 and not bool((input_ids == eos).any(dim=1).all()):
            raise InputError(
                self.source, f"every tokenised caption to contain eos_token_id {eos}", "a row without it"
            )
        # No attention mask, as CLIP/VD: the causal mask already hides the padding from the EOS token.
        out = self.text_model(input_ids=input_ids)
        tokens_proj = self.text_model.text_projection(out.last_hidden_state)  # (B, L, D)
        pooled_norm = out.text_embeds.norm(dim=-1)[:, None, None]  # (B, 1, 1)
        return tokens_proj / pooled_norm

    def text_embeddings(self, captions: list[list[str]]) -> np.ndarray:
        """captions[i] = the captions of image i → (N, L, D) float32, the mean of each image's normalised captions."""
        self._check_captions(captions)
        flat = [c for caps in captions for c in caps]
        owner = np.repeat(
            np.arange(len(captions)), [len(caps) for caps in captions]
        )  # image index per caption
        sums = np.zeros((len(captions), self.shapes.text_tokens, self.shapes.dim), np.float64)  # (N, L, D)
        for start in range(0, len(flat), self.batch_size):
            emb = self._encode_captions(flat[start : start + self.batch_size]).cpu().numpy()  # (B, L, D)
            np.add.at(sums, owner[start : start + self.batch_size], emb)
        counts = np.asarray([len(caps) for caps in captions], np.float64)[:, None, None]
        return (sums / counts).astype(np.float32)

    # ---------------------------------------------------------------- vision
    def _check_images(self, images: np.ndarray) -> None:
        if not isinstance(images, np.ndarray):
            raise InputError("images", "a numpy uint8 array (N, H, W, 3)", repr(type(images)))
        if images.dtype != np.uint8:
            raise InputError("images", "dtype uint8 (RGB in [0, 255])", str(images.dtype))
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0 or min(images.shape[1:3]) == 0:
            raise InputError("images", "shape (N>0, H, W, 3)", str(images.shape))

    @torch.no_grad()
    def _encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) → (B, 1+P, D): projected post-LN tokens / ‖CLS row‖."""
        hidden = self.vision_model.vision_model(pixel_values=pixel_values.to(self.device)).last_hidden_state
        # post_layernorm on ALL tokens: the model's own pooled output applies it to the CLS token only.
        tokens_proj = self.vision_model.visual_projection(
            self.vision_model.vision_model.post_layernorm(hidden)
        )
        return tokens_proj / tokens_proj[:, :1].norm(dim=-1, keepdim=True)  # (B, 1+P, D)

    def vision_embeddings(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB → (N, 1+P, D) float32."""
        self._check_images(images)
        out = np.empty((len(images), self.shapes.vision_tokens, self.shapes.dim), np.float32)
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size])  # (B, 3, S, S)
            out[start : start + len(pixels)] = self._encode_pixels(pixels).cpu().numpy()
        return out

    # ---------------------------------------------------------------- guidance
    def unconditional_contexts(self) -> tuple[np.ndarray, np.ndarray]:
        """Classifier-free-guidance contexts: text of "" (1, L, D) and vision of `unconditional_image` (1, 1+P, D).

        The image is Brain-Diffuser's black image, not diffusers' grey one. Brain-Diffuser
        (`scripts/versatilediffusion_reconstruct_images.py`) encodes `torch.zeros((1, 3, 224, 224))` with VD's
        `FrozenCLIP.encode_vision` (`versatile_diffusion/lib/model_zoo/clip.py`), which hands it to the CLIP
        processor as is. Under transformers 4.19 the float zeros became uint8 0 (x255); under current versions
        they are rescaled by 1/255, still 0. Either way the model saw pixel value 0 normalised by CLIP's mean/std,
        i.e. a black image, not "zeros after normalisation". diffusers' `VersatileDiffusionDualGuidedPipeline.
        _encode_image_prompt` passes the float image `np.zeros((512, 512, 3)) + 0.5`, meant as mid-grey; current
        transformers rescale it by 1/255 to 0.002, so it too ends up nearly black (its pixel values differ from
        black's by 0.007 after normalisation; tests/test_vd_folder.py). We follow Brain-Diffuser exactly.
        """
        black = unconditional_image(self.preprocess.image_size)  # (1, S, S, 3) uint8
        return self.text_embeddings([[""]]), self.vision_embeddings(black)


def unconditional_image(size: int) -> np.ndarray:
    """The image whose CLIP-vision tokens are the unconditional context: all black, uint8 (1, size, size, 3)."""
    return np.zeros((1, size, size, 3), np.uint8)
