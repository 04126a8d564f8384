"""Small CLIP (train/foundations/clip_small.py): tokenizer framing, loss going down, seeded determinism, atomic output, and the
written folder loading in CLIPFeatureExtractor with the expected shapes and VD normalisation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from brainrecon.data.scenes import draw_scene, render_scene, scene_captions
from brainrecon.errors import ConfigError, InputError
from brainrecon.train.foundations import clip_small
from brainrecon.train.foundations.clip_features import CLIPFeatureExtractor, CLIPPreprocess
from brainrecon.train.foundations.clip_small import (
    BOS,
    EOS,
    PAD,
    UNK,
    SmallCLIPConfig,
    build_small_clip,
    build_word_tokenizer,
    train_small_clip,
)

N, SIZE, STEPS, BATCH = 32, 32, 15, 16
TINY = SmallCLIPConfig(
    text_hidden=32, text_layers=1, text_heads=2, vision_hidden=32, vision_layers=1, vision_heads=2,
    image_size=SIZE, patch_size=8, projection_dim=16,
)  # fmt: skip
NORM_ATOL = 1e-5  # float32 division by a norm
PIXEL_ATOL = 1e-5  # processor vs hand-written preprocessing: same PIL resize, float32 arithmetic order only


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, list[list[str]]]:
    rng = np.random.default_rng(0)
    scenes = [draw_scene(rng) for _ in range(N)]
    images = np.stack([render_scene(s, SIZE) for s in scenes])  # (N, S, S, 3) uint8
    return images, [scene_captions(s, rng) for s in scenes]


def _train(pairs, out: Path, seed: int = 0) -> dict:
    images, captions = pairs
    return train_small_clip(
        images, captions, out, steps=STEPS, batch_size=BATCH, lr=2e-3, seed=seed, progress=False, config=TINY
    )


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clip_small") / "model"
    return out, _train(pairs, out)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_frames_with_bos_eos_and_maps_unknown_words(tmp_path):
    path = tmp_path / "tokenizer.json"
    build_word_tokenizer(["A red circle on stripes.", "two blue squares"], path, max_length=12)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    vocab = tok.get_vocab()
    assert [vocab[t] for t in (BOS, EOS, PAD, UNK)] == [0, 1, 2, 3]
    assert {"a", "red", "circle", "on", "stripes", ".", "two", "blue", "squares"} <= set(vocab)

    expected = [BOS, "red", UNK, UNK, "circle", EOS]  # lower-cased; "zebra" and "," never seen
    ids = tok("RED zebra, circle")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == expected
    # The raw tokenizer pads to max_length itself (transformers applies its own per-call padding instead).
    assert Tokenizer.from_file(str(path)).encode("RED zebra, circle").tokens == [*expected, *[PAD] * 6]

    long = tok(" ".join(["red"] * 50), padding="max_length", max_length=12, truncation=True)["input_ids"]
    assert len(long) == 12 and long[0] == vocab[BOS] and long[-1] == vocab[EOS]  # truncation keeps EOS


def test_build_small_clip_ids_and_checks():
    model = build_small_clip(TINY, vocab_size=20, eos_token_id=1, pad_token_id=2, bos_token_id=0)
    text = model.config.text_config
    assert (text.eos_token_id, text.pad_token_id, text.bos_token_id) == (1, 2, 0)
    assert model.config.vision_config.image_size == SIZE
    with pytest.raises(ConfigError, match="legacy"):
        build_small_clip(TINY, vocab_size=20, eos_token_id=2, pad_token_id=1)
    with pytest.raises(ConfigError, match="divisible"):
        dataclasses.replace(TINY, image_size=30)


# ---------------------------------------------------------------- training


def test_loss_decreases(trained):
    _, record = trained
    losses = record["losses"]
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    assert record["final_loss"] == losses[-1]


def test_seeded_runs_are_identical(pairs, trained, tmp_path):
    out, record = trained
    again = _train(pairs, tmp_path / "again")
    assert again["losses"] == record["losses"]
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_written_folder_loads_with_expected_shapes_and_norms(pairs, trained):
    out, _ = trained
    images, captions = pairs
    assert {p.name for p in out.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "train.json"
    }  # fmt: skip
    extractor = CLIPFeatureExtractor.from_pretrained(out)
    P = (SIZE // 8) ** 2
    text = extractor.text_embeddings(captions[:4])
    vision = extractor.vision_embeddings(images[:4])
    assert text.shape == (4, 77, 16) and vision.shape == (4, 1 + P, 16)
    np.testing.assert_allclose(np.linalg.norm(vision[:, 0], axis=-1), 1.0, atol=NORM_ATOL)  # CLS row

    one = [[c[0]] for c in captions[:4]]  # one caption each: the EOS row is exactly unit norm
    ids = extractor.tokenizer([c[0] for c in one], padding="max_length", max_length=77)["input_ids"]
    eos = extractor.tokenizer.convert_tokens_to_ids(EOS)
    eos_pos = [row.index(eos) for row in ids]
    single = extractor.text_embeddings(one)
    np.testing.assert_allclose(np.linalg.norm(single[np.arange(4), eos_pos], axis=-1), 1.0, atol=NORM_ATOL)


def test_processor_config_matches_hand_preprocessing(trained, tmp_path, pairs):
    """Training reads pixels through preprocessor_config.json; a folder without it must give the same pixels."""
    out, _ = trained
    images = np.stack(
        [render_scene(draw_scene(np.random.default_rng(i)), 48) for i in range(3)]
    )  # resize path
    with_processor = CLIPPreprocess(out, SIZE)
    assert with_processor.processor is not None
    np.testing.assert_allclose(
        with_processor(images), CLIPPreprocess(tmp_path, SIZE)(images), atol=PIXEL_ATOL
    )


# ---------------------------------------------------------------- errors and atomicity


def test_existing_output_refused_and_crash_leaves_nothing(pairs, trained, tmp_path, monkeypatch):
    out, _ = trained
    with pytest.raises(InputError, match="existing path"):
        _train(pairs, out)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(clip_small.CLIPModel, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _train(pairs, tmp_path / "crashed")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary build directory


def test_bad_inputs(pairs, tmp_path):
    images, captions = pairs
    with pytest.raises(InputError, match="caption lists"):
        train_small_clip(images, captions[:-1], tmp_path / "x", steps=1, progress=False, config=TINY)
    with pytest.raises(InputError, match="uint8"):
        train_small_clip(
            images.astype(np.float32), captions, tmp_path / "x", steps=1, progress=False, config=TINY
        )
    with pytest.raises(ConfigError, match="steps"):
        train_small_clip(images, captions, tmp_path / "x", steps=0, progress=False, config=TINY)
    assert not (tmp_path / "x").exists()
