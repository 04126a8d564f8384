"""A small CLIP trained from scratch on image–caption pairs: the stage-2 feature model when no OpenAI CLIP is at hand.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", openai/CLIP):
a text transformer and a ViT trained with a symmetric InfoNCE loss so that matching image/caption pairs have the
highest cosine similarity in a batch. Here it is the Hugging Face `CLIPModel` at a toy size, with a word-level
tokenizer instead of CLIP's BPE: the captions of the procedural scenes (`brainrecon.data.scenes`) use a few dozen
words, so a word vocabulary is complete and tiny.

The output folder is exactly what `train/foundations/clip_features.py` loads (`CLIPFeatureExtractor.from_pretrained`):
config.json + model.safetensors + tokenizer.json + preprocessor_config.json, plus train.json (how it was made).
Training reuses the extractor's own tokenizer loader and image preprocessing on the folder being built, so the
pixels and token ids seen in training are the ones seen at extraction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from brainrecon.config import config_to_dict
from brainrecon.errors import ConfigError, InputError
from brainrecon.io import atomic_dir, atomic_path, write_json

# The extractor's loaders are used on purpose: one code path from pixels/words to model inputs, train and extract.
from brainrecon.train.foundations.clip_features import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPPreprocess,
    load_tokenizer,
)

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)  # ids 0..3 in this order
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100 to keep training stable


# ---------------------------------------------------------------- tokenizer


def _word_tokenizer(vocab: dict[str, int], max_length: int) -> Tokenizer:
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+: "blue," → "blue", ","
    # CLIP's text tower pools the EOS token, so the tokenizer itself must frame every caption with BOS … EOS.
    tok.post_processor = TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    # Truncation leaves room for BOS/EOS (tokenizers reserves the post-processor's added tokens), so EOS survives.
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=vocab[PAD], pad_token=PAD, length=max_length)
    return tok


def build_word_tokenizer(captions: list[str], path: str | Path, max_length: int = 77) -> None:
    """Word-level tokenizer over `captions` (lower-cased, split on whitespace and punctuation), saved atomically as a
    `tokenizers` tokenizer.json. Ids: BOS 0, EOS 1, PAD 2, UNK 3, then the words in sorted order (deterministic)."""
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise InputError("captions", "a list of strings", repr(type(captions)))
    if max_length < 3:
        raise ConfigError(f"max_length must be >= 3 (BOS, a word, EOS), found {max_length}")
    # Split with the very normaliser and pre-tokenizer the saved tokenizer uses, so every training word is in vocab.
    splitter = _word_tokenizer({t: i for i, t in enumerate(SPECIAL_TOKENS)}, max_length)
    words: set[str] = set()
    for caption in captions:
        normalised = splitter.normalizer.normalize_str(caption)
        words.update(w for w, _ in splitter.pre_tokenizer.pre_tokenize_str(normalised))
    words -= set(SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *sorted(words)])}
    with atomic_path(path) as tmp:
        _word_tokenizer(vocab, max_length).save(str(tmp))


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class SmallCLIPConfig:
    """Sizes of the small CLIP. The vocabulary comes from the tokenizer, not from here."""

    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_position: int = 77  # L: the text context, 77 like every OpenAI CLIP (stage-2 target shape)
    image_size: int = 64  # S
    patch_size: int = 8  # 1 + (S / patch)² = 65 vision tokens
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    projection_dim: int = 128  # D: shared embedding width
    mlp_ratio: int = 4  # intermediate_size = mlp_ratio × hidden, as CLIP

    def __post_init__(self) -> None:
        for name in ("text_hidden", "vision_hidden"):
            heads = getattr(self, name.replace("hidden", "heads"))
            if getattr(self, name) % heads:
                raise ConfigError(
                    f"SmallCLIPConfig: {name} {getattr(self, name)} not divisible by {heads} heads"
                )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"SmallCLIPConfig: image_size {self.image_size} not divisible by patch_size {self.patch_size}"
            )
        if min(dataclasses.astuple(self)) < 1:
            raise ConfigError(f"SmallCLIPConfig: every size must be >= 1, found {config_to_dict(self)}")


def build_small_clip(
    config: SmallCLIPConfig, vocab_size: int, eos_token_id: int, pad_token_id: int, bos_token_id: int = 0
) -> CLIPModel:
    """A randomly initialised CLIPModel (uses the global torch RNG) with the tokenizer's special-token ids."""
    if eos_token_id == 2:
        # transformers treats eos_token_id == 2 as the legacy config and pools the argmax id instead of the EOS.
        raise ConfigError(
            "build_small_clip: eos_token_id 2 selects CLIP's legacy argmax pooling; use another id"
        )
    if not all(0 <= i < vocab_size for i in (eos_token_id, pad_token_id, bos_token_id)):
        raise ConfigError(
            f"build_small_clip: special ids must lie in [0, {vocab_size}), "
            f"found bos {bos_token_id}, eos {eos_token_id}, pad {pad_token_id}"
        )
    c = config
    text = dict(
        vocab_size=vocab_size, hidden_size=c.text_hidden, intermediate_size=c.mlp_ratio * c.text_hidden,
        num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads, max_position_embeddings=c.max_position,
        projection_dim=c.projection_dim, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
    )  # fmt: skip
    vision = dict(
        image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.vision_hidden,
        intermediate_size=c.mlp_ratio * c.vision_hidden, num_hidden_layers=c.vision_layers,
        num_attention_heads=c.vision_heads, projection_dim=c.projection_dim,
    )  # fmt: skip
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=c.projection_dim))


# ---------------------------------------------------------------- training


def _check_pairs(images: np.ndarray, captions: list[list[str]]) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InputError(
            "images", "a numpy uint8 array (N, H, W, 3)", f"{type(images).__name__} {images.dtype}"
        )
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) < 2:
        raise InputError("images", "shape (N>=2, H, W, 3) (contrastive needs negatives)", str(images.shape))
    if not isinstance(captions, list) or len(captions) != len(images):
        raise InputError(
            "captions", f"a list of {len(images)} caption lists (one per image)", repr(type(captions))
        )
    for i, caps in enumerate(captions):
        if isinstance(caps, str) or not isinstance(caps, (list, tuple)) or not caps:
            raise InputError(f"captions[{i}]", "a non-empty list of strings", repr(caps)[:60])
        if not all(isinstance(c, str) for c in caps):
            raise InputError(f"captions[{i}]", "strings only", repr([type(c).__name__ for c in caps]))


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up then cosine decay to 0, CLIP's schedule."""
    warmup = max(1, min(100, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_small_clip(
    images: np.ndarray,
    captions: list[list[str]],
    out_dir: str | Path,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
    config: SmallCLIPConfig = SmallCLIPConfig(),
    weight_decay: float = 0.1,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Contrastive training on (image, caption) pairs; writes a CLIPFeatureExtractor folder atomically to `out_dir`.

    images: uint8 (N, H, W, 3) RGB; captions[i]: the captions of image i (one is drawn at random per step).
    Each step draws `min(batch_size, N)` distinct images, so no image is its own negative. Deterministic for a
    seed on the CPU. `device` trains there: inputs are prepared on the CPU and each batch is copied over; the batch
    draws are numpy's, so a GPU run sees the same batches as a CPU run. Returns the train.json record (config,
    steps, seed, losses, final loss).
    """
    from brainrecon.train.device import resolve_device

    device = resolve_device(device)
    _check_pairs(images, captions)
    if steps < 1 or batch_size < 2 or lr <= 0 or weight_decay < 0:
        raise ConfigError(
            f"train_small_clip: need steps >= 1, batch_size >= 2, lr > 0, weight_decay >= 0; "
            f"found steps {steps}, batch_size {batch_size}, lr {lr}, weight_decay {weight_decay}"
        )
    n_images = len(images)
    batch = min(batch_size, n_images)
    flat = [c for caps in captions for c in caps]
    first = np.cumsum([0] + [len(caps) for caps in captions])  # (N+1,) caption offsets per image

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        # 1. The folder's tokenizer and image processor first; training then reads inputs through them.
        build_word_tokenizer(flat, tmp / "tokenizer.json", max_length=config.max_position)
        s = config.image_size
        CLIPImageProcessor(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s},
            image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
        ).save_pretrained(tmp)  # fmt: skip
        tokenizer = load_tokenizer(tmp)
        preprocess = CLIPPreprocess(tmp, s)
        pixels = torch.cat([preprocess(images[i : i + 256]) for i in range(0, n_images, 256)])  # (N, 3, S, S)
        input_ids = tokenizer(
            flat, padding="max_length", max_length=config.max_position, truncation=True, return_tensors="pt"
        )["input_ids"]  # (M, L)
        eos_id, pad_id, bos_id = (tokenizer.convert_tokens_to_ids(t) for t in (EOS, PAD, BOS))
        # Last column a caption needs: the text tower pools EOS and is causal, so later pad columns change neither
        # the loss nor any gradient; dropping them per batch saves most of the text compute.
        eos_pos = (input_ids == eos_id).int().argmax(dim=1)  # (M,)

        # 2. Model and optimiser. fork_rng: seeding must not disturb the caller's global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_small_clip(config, tokenizer.vocab_size, eos_id, pad_id, bos_id).train()
        model.to(device)
        # Weight decay on matrices only: biases, LayerNorm gains and the temperature are not shrunk (CLIP practice).
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimiser = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _lr_factor(step, steps))
        rng = np.random.default_rng(seed)

        losses: list[float] = []
        bar = tqdm(range(steps), desc="clip", unit="step", disable=not progress)
        for _ in bar:
            idx = rng.choice(n_images, size=batch, replace=False)  # (B,) distinct images
            cap = first[idx] + rng.integers(0, first[idx + 1] - first[idx])  # (B,) one caption of each
            width = int(eos_pos[cap].max()) + 1
            out = model(
                input_ids=input_ids[cap, :width].to(device),
                pixel_values=pixels[idx].to(device),
                return_loss=True,
            )
            optimiser.zero_grad(set_to_none=True)
            out.loss.backward()
            optimiser.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
            losses.append(out.loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")

        # 3. Weights and the record; atomic_dir moves the whole folder into place only now.
        model.cpu().eval().save_pretrained(tmp)  # transformers 5 always writes model.safetensors
        record = {
            "type": type(config).__name__,
            "config": config_to_dict(config),
            "vocab_size": tokenizer.vocab_size,
            "n_images": n_images,
            "n_captions": len(flat),
            "steps": steps,
            "batch_size": batch,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": seed,
            "final_loss": losses[-1],
            "losses": losses,
        }
        write_json(tmp / "train.json", record)
    return record
