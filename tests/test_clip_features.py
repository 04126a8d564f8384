"""CLIP features: shapes, VD normalisation, caption averaging, hand-computed parity, loading paths, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.train.foundations.clip_features import CLIPFeatureExtractor

WORDS = ["a", "cat", "dog", "sits", "on", "the", "mat", "red", "car", "in", "street", "man", "with", "hat"]
MAX_POS, IMAGE, PATCH, DIM = 77, 32, 8, 16
ATOL = 1e-5  # float32 forward passes of the same model: only summation order differs


def _bpe_vocab() -> dict[str, int]:
    """Character-level CLIP BPE vocab (no merges): enough for CLIPTokenizer to tokenise lower-case words."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = list(letters) + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def _save_clip(folder: Path, vocab_size: int, eos: int, bos: int, pad: int) -> None:
    torch.manual_seed(0)
    common = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=DIM
    )
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, max_position_embeddings=MAX_POS, eos_token_id=eos, bos_token_id=bos,
            pad_token_id=pad, **common,
        ),
        vision_config=dict(image_size=IMAGE, patch_size=PATCH, **common),
        projection_dim=DIM,
    )  # fmt: skip
    CLIPModel(cfg).eval().save_pretrained(folder)


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory) -> Path:
    """CLIPModel + CLIPTokenizer (vocab.json/merges.txt) + CLIPImageProcessor: the openai/clip-vit-* layout."""
    folder = tmp_path_factory.mktemp("clip_bpe")
    vocab = _bpe_vocab()
    _save_clip(
        folder,
        len(vocab),
        eos=vocab["<|endoftext|>"],
        bos=vocab["<|startoftext|>"],
        pad=vocab["<|endoftext|>"],
    )
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wordlevel_folder(tmp_path_factory) -> Path:
    """CLIPModel + only a word-level tokenizer.json, no processor config: what `foundation clip` saves."""
    folder = tmp_path_factory.mktemp("clip_wordlevel")
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    tok.save(str(folder / "tokenizer.json"))
    _save_clip(folder, len(vocab), eos=vocab["<eos>"], bos=vocab["<bos>"], pad=vocab["<pad>"])
    return folder


@pytest.fixture(scope="module")
def extractor(bpe_folder) -> CLIPFeatureExtractor:
    return CLIPFeatureExtractor.from_pretrained(bpe_folder, batch_size=3)


def _images(n: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *size, 3), dtype=np.uint8)


def _eos_rows(ex: CLIPFeatureExtractor, captions: list[str]) -> np.ndarray:
    ids = ex.tokenizer(captions, padding="max_length", max_length=MAX_POS, truncation=True)["input_ids"]
    return np.asarray([row.index(ex.text_model.config.eos_token_id) for row in ids])


def test_shapes(extractor):
    text = extractor.text_embeddings([["a cat"], ["a dog", "the mat"]])
    vision = extractor.vision_embeddings(_images(4))
    assert text.shape == (2, MAX_POS, DIM) and text.dtype == np.float32
    assert vision.shape == (4, 1 + (IMAGE // PATCH) ** 2, DIM) and vision.dtype == np.float32
    assert (extractor.shapes.text_tokens, extractor.shapes.vision_tokens) == (MAX_POS, 17)


def test_text_eos_token_has_unit_norm(extractor):
    captions = ["a cat sits on the mat", "red car", "man with hat in street", ""]
    emb = extractor.text_embeddings([[c] for c in captions])  # (4, L, D)
    eos = _eos_rows(extractor, captions)
    norms = np.linalg.norm(emb[np.arange(4), eos], axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=ATOL)
    # Only the pooled token is normalised: other tokens keep their own scale.
    assert not np.allclose(np.linalg.norm(emb[:, 0], axis=-1), 1.0, atol=1e-3)


def test_caption_averaging_is_mean_of_single_captions(extractor):
    caps = ["a cat", "a dog sits", "the red car", "a man", "hat"]
    averaged = extractor.text_embeddings([caps, caps[:2]])
    singles = extractor.text_embeddings([[c] for c in caps])
    np.testing.assert_allclose(averaged[0], singles.mean(axis=0), atol=ATOL)
    np.testing.assert_allclose(averaged[1], singles[:2].mean(axis=0), atol=ATOL)


def test_vision_cls_unit_norm_and_hand_computation(extractor, bpe_folder):
    images = _images(5, seed=1)
    emb = extractor.vision_embeddings(images)
    np.testing.assert_allclose(np.linalg.norm(emb[:, 0], axis=-1), 1.0, atol=ATOL)

    # Independent path: a fresh CLIPModel and processor, VD's recipe written out.
    model = CLIPModel.from_pretrained(bpe_folder).eval()
    pixels = CLIPImageProcessor.from_pretrained(bpe_folder)(images=list(images), return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixels).last_hidden_state
        proj = model.visual_projection(model.vision_model.post_layernorm(hidden))
        expected = (proj / proj[:, :1].norm(dim=-1, keepdim=True)).numpy()
        # The CLS row, before normalisation, is CLIP's pooled image embedding (post_layernorm(CLS) projected).
        pooled = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        np.testing.assert_allclose(proj[:, 0].numpy(), pooled.numpy(), atol=ATOL)
    np.testing.assert_allclose(emb, expected, atol=ATOL)


def test_text_matches_clipmodel(extractor, bpe_folder):
    """Loading the text tower alone from a CLIPModel folder gives CLIPModel's weights (not a fresh init)."""
    model = CLIPModel.from_pretrained(bpe_folder).eval()
    ids = extractor.tokenizer(["a cat"], padding="max_length", max_length=MAX_POS, return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        out = model.text_model(input_ids=ids)
        proj = model.text_projection(out.last_hidden_state)
        pooled = model.text_projection(out.pooler_output)  # the EOS token
    expected = (proj / pooled.norm(dim=-1)[:, None, None]).numpy()
    np.testing.assert_allclose(extractor.text_embeddings([["a cat"]]), expected, atol=ATOL)


def test_batching_and_determinism(bpe_folder, extractor):
    images = _images(7, seed=2)
    captions = [["a cat", "a dog"], ["the mat"], ["red car", "a man", "hat"], ["street"]]
    one_by_one = CLIPFeatureExtractor.from_pretrained(bpe_folder, batch_size=1)
    np.testing.assert_allclose(
        extractor.vision_embeddings(images), one_by_one.vision_embeddings(images), atol=1e-4
    )
    np.testing.assert_allclose(
        extractor.text_embeddings(captions), one_by_one.text_embeddings(captions), atol=1e-4
    )
    np.testing.assert_array_equal(extractor.vision_embeddings(images), extractor.vision_embeddings(images))
    np.testing.assert_array_equal(extractor.text_embeddings(captions), extractor.text_embeddings(captions))


def test_unconditional_contexts(extractor):
    text_u, vision_u = extractor.unconditional_contexts()
    np.testing.assert_array_equal(text_u, extractor.text_embeddings([[""]]))
    black = np.zeros(
        (1, 50, 60, 3), np.uint8
    )  # any size: a constant image stays constant through resize/crop
    np.testing.assert_allclose(vision_u, extractor.vision_embeddings(black), atol=ATOL)
    assert vision_u.shape == (1, 17, DIM)


def test_wordlevel_tokenizer_json_only(wordlevel_folder):
    ex = CLIPFeatureExtractor.from_pretrained(wordlevel_folder)
    captions = ["a cat sits on the mat", "red car in street"]
    emb = ex.text_embeddings([[c] for c in captions])
    assert emb.shape == (2, MAX_POS, DIM)
    np.testing.assert_allclose(
        np.linalg.norm(emb[np.arange(2), _eos_rows(ex, captions)], axis=-1), 1.0, atol=ATOL
    )
    # No preprocessor_config.json: the hand-written resize/crop/normalise path.
    vision = ex.vision_embeddings(_images(2))
    assert vision.shape == (2, 17, DIM)
    np.testing.assert_allclose(np.linalg.norm(vision[:, 0], axis=-1), 1.0, atol=ATOL)


def test_fallback_preprocess_matches_processor(extractor, wordlevel_folder):
    fallback = CLIPFeatureExtractor.from_pretrained(wordlevel_folder).preprocess
    images = _images(3, seed=3, size=(37, 53))
    expected = extractor.preprocess(images)  # CLIPImageProcessor with CLIP's default mean/std
    # Without torchvision, transformers runs the PIL backend, the same bicubic resize as the fallback: exact.
    # The torchvision backend resizes differently by a few uint8 levels (≈ 0.05 after /std).
    pil_backend = "Pil" in type(extractor.preprocess.processor).__name__
    np.testing.assert_allclose(fallback(images).numpy(), expected.numpy(), atol=ATOL if pil_backend else 0.1)


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((2, 32, 32, 3), np.float32),  # float: ambiguous range
        np.zeros((32, 32, 3), np.uint8),  # no batch axis
        np.zeros((2, 32, 32, 4), np.uint8),  # RGBA
        np.zeros((0, 32, 32, 3), np.uint8),  # empty
    ],
)
def test_bad_images_raise(extractor, images):
    with pytest.raises(InputError):
        extractor.vision_embeddings(images)


@pytest.mark.parametrize("captions", [[], [[]], ["a cat"], [["a cat"], []], [[1]]])
def test_bad_captions_raise(extractor, captions):
    with pytest.raises(InputError):
        extractor.text_embeddings(captions)


def test_loading_errors(tmp_path, bpe_folder):
    with pytest.raises(MissingFileError, match="missing CLIP model folder"):
        CLIPFeatureExtractor.from_pretrained(tmp_path / "nope")

    no_weights = tmp_path / "no_weights"
    shutil.copytree(bpe_folder, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="weights"):
        CLIPFeatureExtractor.from_pretrained(no_weights)

    mismatched = tmp_path / "mismatched"
    shutil.copytree(bpe_folder, mismatched)
    cfg = json.loads((mismatched / "config.json").read_text())
    cfg["vision_config"]["projection_dim"] = DIM * 2
    (mismatched / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="projection_dim"):
        CLIPFeatureExtractor.from_pretrained(mismatched)

    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(bpe_folder, no_tokenizer)
    (no_tokenizer / "vocab.json").unlink()
    with pytest.raises(MissingFileError, match="tokenizer"):
        CLIPFeatureExtractor.from_pretrained(no_tokenizer)
