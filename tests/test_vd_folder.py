"""A whole Versatile Diffusion folder as the stage-2 foundation: CLIP, VAE and UNet read from one diffusers folder.

The folder is written by the libraries' own classes (diffusers' `VersatileDiffusionPipeline.save_pretrained` over
transformers' CLIP towers, tokenizer and image processor, diffusers' UNets, VAE and DDIM scheduler), tiny and
seeded; its tokenizer/ is then given the slow BPE files a real shi-labs/versatile-diffusion folder has (vocab.json +
merges.txt, no tokenizer.json), since transformers 5's `save_pretrained` writes tokenizer.json instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.io import sha256_file
from brainrecon.sampling import DDIM_SCHEDULER
from brainrecon.train.foundations.clip_features import CLIPFeatureExtractor, unconditional_image
from brainrecon.train.foundations.dual_unet import (
    DualUNetConfig,
    convert_to_dual_attention,
    dual_context,
    set_mix_ratio,
)
from brainrecon.train.foundations.loaders import (
    check_versatile_diffusion_scheduler,
    files_digest,
    load_clip,
    load_unet,
    load_vae,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TEXT_TOKENS, IMAGE, PATCH, DIM = 16, 32, 8, 32  # tiny CLIP: 16 text tokens, 1 + 4x4 = 17 vision tokens of 32
VISION_TOKENS = 1 + (IMAGE // PATCH) ** 2
ATOL = 1e-5  # the same float32 model run by two code paths: summation order at most
UNET = dataclasses.replace(DualUNetConfig.tiny(), text_tokens=TEXT_TOKENS, vision_tokens=VISION_TOKENS)
CAPTIONS = ["a cat sits", "red car", "", "man with hat"]  # within 16 tokens (char-level BPE)


def _bpe_files(folder: Path) -> tuple[Path, Path]:
    """Character-level CLIP BPE vocabulary (no merges): enough for CLIPTokenizer to tokenise lower-case words."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = list(letters) + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def _perturb(module: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    with torch.no_grad():  # zero-initialised output layers would make every UNet prediction 0
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


def write_tiny_versatile_diffusion(folder: Path, seed: int = 0) -> Path:
    """A tiny seeded Versatile Diffusion folder in diffusers' layout, saved by the libraries themselves."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion import VersatileDiffusionPipeline
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    vocab, merges = _bpe_files(folder.parent / f"{folder.name}-bpe")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=TEXT_TOKENS)
    ids = tokenizer.get_vocab()
    torch.manual_seed(seed)
    tower = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=DIM
    )
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(ids),
            max_position_embeddings=TEXT_TOKENS,
            bos_token_id=ids["<|startoftext|>"],
            eos_token_id=ids["<|endoftext|>"],
            pad_token_id=ids["<|endoftext|>"],
            **tower,
        )
    ).eval()
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, **tower)
    ).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    image_unet = _perturb(UNet2DConditionModel(**UNET.unet_kwargs()))
    flat = UNET.unet_kwargs()  # VD's text UNet: the same blocks with "Flat" resnets
    flat["down_block_types"] = tuple(t.replace("2D", "Flat") for t in UNET.down_block_types)
    flat["up_block_types"] = tuple(t.replace("2D", "Flat") for t in UNET.up_block_types)
    text_unet = _perturb(UNetFlatConditionModel(**flat))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=2 * UNET.sample_size,  # 16 px images -> 8x8x4 latents
    ).eval()
    VersatileDiffusionPipeline(
        tokenizer=tokenizer,
        image_feature_extractor=processor,
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        image_unet=image_unet,
        text_unet=text_unet,
        vae=vae,
        scheduler=DDIMScheduler(**DDIM_SCHEDULER),
    ).save_pretrained(folder)
    return folder


def _with_slow_tokenizer(saved: Path, folder: Path) -> Path:
    """The tokenizer/ of a real VD folder: the slow BPE files beside tokenizer_config.json, no tokenizer.json."""
    shutil.copytree(saved, folder)
    (folder / "tokenizer" / "tokenizer.json").unlink()
    for f in _bpe_files(saved.parent / f"{saved.name}-bpe"):
        shutil.copy(f, folder / "tokenizer" / f.name)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """As `save_pretrained` wrote it (transformers 5 writes tokenizer.json, not vocab.json + merges.txt)."""
    return write_tiny_versatile_diffusion(tmp_path_factory.mktemp("vd") / "versatile-diffusion")


@pytest.fixture(scope="module")
def vd(saved) -> Path:
    return _with_slow_tokenizer(saved, saved.parent / "versatile-diffusion-slow-tokenizer")


@pytest.fixture(scope="module")
def clip(vd) -> tuple[CLIPFeatureExtractor, dict]:
    return load_clip(str(vd), batch_size=3)


@pytest.fixture(scope="module")
def reference(vd):
    """diffusers' own dual-guided pipeline over components loaded by their own classes from the folder: its
    `_encode_text_prompt` / `_encode_image_prompt` are the features Versatile Diffusion conditions on."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion import VersatileDiffusionDualGuidedPipeline
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    return VersatileDiffusionDualGuidedPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(vd / "tokenizer"),
        image_feature_extractor=CLIPImageProcessor.from_pretrained(vd / "image_feature_extractor"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(vd / "text_encoder").eval(),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(vd / "image_encoder").eval(),
        image_unet=UNet2DConditionModel.from_pretrained(vd / "image_unet"),
        text_unet=None,  # only the prompt encoders are used
        vae=AutoencoderKL.from_pretrained(vd / "vae"),
        scheduler=DDIMScheduler.from_pretrained(vd / "scheduler"),
    )


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 40, 48, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------- the folder


def test_folder_has_the_real_versatile_diffusion_layout(saved, vd):
    index = json.loads((vd / "model_index.json").read_text())
    assert index["_class_name"] == "VersatileDiffusionPipeline"
    assert index["text_encoder"][1] == "CLIPTextModelWithProjection"
    assert index["image_encoder"][1] == "CLIPVisionModelWithProjection"
    assert index["text_unet"][1] == "UNetFlatConditionModel"
    assert {p.name for p in (vd / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    assert not (vd / "tokenizer" / "tokenizer.json").exists()
    assert (saved / "tokenizer" / "tokenizer.json").is_file()  # what CLIPTokenizer.save_pretrained writes


# ----------------------------------------------------------------------------------------- CLIP


def test_clip_features_equal_diffusers_versatile_diffusion_encoders(clip, reference):
    extractor, info = clip
    assert extractor.shapes == type(extractor.shapes)(TEXT_TOKENS, VISION_TOKENS, DIM)
    with torch.no_grad():
        text_ref = reference._encode_text_prompt(CAPTIONS, "cpu", 1, False).numpy()  # (4, 16, 32)
        images = _images(3)
        vision_ref = reference._encode_image_prompt(list(images), "cpu", 1, False).numpy()  # (3, 17, 32)
    text = extractor.text_embeddings([[c] for c in CAPTIONS])
    vision = extractor.vision_embeddings(images)
    assert text.shape == text_ref.shape and vision.shape == vision_ref.shape
    np.testing.assert_allclose(text, text_ref, atol=ATOL)
    np.testing.assert_allclose(vision, vision_ref, atol=ATOL)
    assert np.abs(text[0] - text[1]).max() > 1e-2  # the captions really differ
    # provenance: both encoders, the tokenizer's BPE files and the processor config
    assert sorted(info["files"]) == [
        "image_encoder/model.safetensors",
        "image_feature_extractor/preprocessor_config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
    ]


def test_tokenizer_json_only_folder_gives_the_same_features(saved, clip, tmp_path):
    """The loader copes with the tokenizer/ transformers 5 writes (tokenizer.json, no vocab.json/merges.txt)."""
    extractor, _ = clip
    json_only = shutil.copytree(saved, tmp_path / "vd")
    for name in ("vocab.json", "merges.txt"):
        (json_only / "tokenizer" / name).unlink(missing_ok=True)
    other, info = load_clip(str(json_only), batch_size=3)
    assert "tokenizer/tokenizer.json" in info["files"]
    captions = [[c] for c in CAPTIONS]
    padded = dict(padding="max_length", max_length=TEXT_TOKENS, truncation=True)
    np.testing.assert_array_equal(
        other.tokenizer(CAPTIONS, **padded)["input_ids"], extractor.tokenizer(CAPTIONS, **padded)["input_ids"]
    )
    np.testing.assert_allclose(
        other.text_embeddings(captions), extractor.text_embeddings(captions), atol=ATOL
    )


@pytest.mark.parametrize(
    "remove, named",
    [
        ("image_feature_extractor", "image_feature_extractor"),
        ("text_encoder/model.safetensors", "text_encoder"),
        ("tokenizer/merges.txt", "tokenizer.json"),  # neither the slow pair nor a tokenizer.json left
    ],
)
def test_a_missing_clip_part_is_a_one_line_missing_file_error(vd, tmp_path, remove, named):
    broken = shutil.copytree(vd, tmp_path / "vd", ignore=shutil.ignore_patterns("*unet*", "vae"))
    target = broken / remove
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(MissingFileError) as err:
        load_clip(str(broken))
    assert "\n" not in str(err.value) and named in str(err.value)


def test_unconditional_vision_context_is_brain_diffusers_black_image(clip, reference, vd):
    """Brain-Diffuser's unconditional image (a black one), checked against the transformers classes directly;
    diffusers' float 0.5 "grey" is rescaled by 1/255 by current transformers, so it lands next to black."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    extractor, _ = clip
    uncond_text, uncond_vision = extractor.unconditional_contexts()
    assert uncond_text.shape == (1, TEXT_TOKENS, DIM) and uncond_vision.shape == (1, VISION_TOKENS, DIM)
    processor = CLIPImageProcessor.from_pretrained(vd / "image_feature_extractor")
    encoder = CLIPVisionModelWithProjection.from_pretrained(vd / "image_encoder").eval()

    def direct(image: np.ndarray) -> np.ndarray:  # VD's normalisation, written out on the transformers model
        pixels = processor(images=[image], return_tensors="pt").pixel_values
        with torch.no_grad():
            hidden = encoder(pixels).last_hidden_state
            tokens = encoder.visual_projection(encoder.vision_model.post_layernorm(hidden))
        return (tokens / tokens[:, :1].norm(dim=-1, keepdim=True)).numpy()

    black = unconditional_image(IMAGE)[0]
    assert black.dtype == np.uint8 and black.max() == 0
    np.testing.assert_allclose(uncond_vision, direct(black), atol=ATOL)
    grey = direct(np.full((IMAGE, IMAGE, 3), 128, np.uint8))
    assert np.abs(uncond_vision - grey).max() > 1e-2  # a real mid-grey is a different context

    with torch.no_grad():  # diffusers' unconditional halves come first in its CFG batch
        text_cfg = reference._encode_text_prompt(["a cat"], "cpu", 1, True).numpy()
        vision_cfg = reference._encode_image_prompt([black], "cpu", 1, True).numpy()
    np.testing.assert_allclose(uncond_text, text_cfg[:1], atol=ATOL)  # CLIP-text of "": the same
    diffusers_uncond = vision_cfg[:1]
    assert np.abs(uncond_vision - diffusers_uncond).max() < np.abs(grey - diffusers_uncond).max()
    half = processor(images=[np.zeros((IMAGE, IMAGE, 3)) + 0.5], return_tensors="pt").pixel_values
    zero = processor(images=[black], return_tensors="pt").pixel_values
    assert float((half - zero).abs().max()) < 0.01  # 0.5 / 255 / std


# ----------------------------------------------------------------------------------------- VAE and UNet


def test_unet_and_vae_load_from_the_folder_with_its_token_layout(vd):
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    unet, config, info = load_unet(str(vd))
    assert (config.vision_tokens, config.text_tokens, config.cross_attention_dim) == (VISION_TOKENS, 16, DIM)
    assert config.unet_kwargs() == UNET.unet_kwargs()
    # the same dual UNet, built from the two UNets loaded by diffusers' own classes
    image_unet = UNet2DConditionModel.from_pretrained(vd / "image_unet")
    text_unet = UNetFlatConditionModel.from_pretrained(vd / "text_unet")
    expected = convert_to_dual_attention(
        image_unet, text_unet.state_dict(), vision_tokens=VISION_TOKENS, text_tokens=TEXT_TOKENS
    ).eval()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)  # (B, 4, h, w)
    context = dual_context(
        torch.randn(2, VISION_TOKENS, DIM, generator=g), torch.randn(2, TEXT_TOKENS, DIM, generator=g), config
    )
    set_mix_ratio(unet, 0.6)
    with torch.no_grad():
        out = unet(sample, torch.tensor([981, 21]), encoder_hidden_states=context).sample
        ref = expected(sample, torch.tensor([981, 21]), encoder_hidden_states=context).sample
    assert float((out - ref).abs().max()) < 1e-6 and float(out.abs().max()) > 1e-3
    vae, vae_info = load_vae(str(vd))
    assert vae.config.sample_size == 16 and list(vae_info["files"]) == [
        "vae/diffusion_pytorch_model.safetensors"
    ]
    assert vae_info["sha256"] == sha256_file(vd / "vae" / "diffusion_pytorch_model.safetensors")


def test_unet_sha256_covers_image_unet_and_text_unet(vd, tmp_path):
    _, _, info = load_unet(str(vd))
    names = [
        "image_unet/diffusion_pytorch_model.safetensors",
        "text_unet/diffusion_pytorch_model.safetensors",
    ]
    assert sorted(info["files"]) == names
    # the documented digest: sha256 of the sorted `sha256sum` lines of the files
    lines = "".join(f"{sha256_file(vd / n)}  {n}\n" for n in names)
    assert info["sha256"] == hashlib.sha256(lines.encode()).hexdigest() == files_digest(info["files"])

    from safetensors.torch import load_file, save_file

    changed = shutil.copytree(vd, tmp_path / "vd")
    weights = changed / names[1]
    state = load_file(str(weights))
    key = next(k for k in sorted(state) if "attn2.to_k" in k)  # a cross-attention weight the dual UNet uses
    state[key] = state[key] + 1e-3
    save_file(state, str(weights), metadata={"format": "pt"})
    _, _, after = load_unet(str(changed))
    assert after["files"][names[0]] == info["files"][names[0]]
    assert after["files"][names[1]] != info["files"][names[1]]
    assert after["sha256"] != info["sha256"]


# ----------------------------------------------------------------------------------------- scheduler


def _scheduler_folder(vd: Path, root: Path, **changes) -> Path:
    config = json.loads((vd / "scheduler" / "scheduler_config.json").read_text())
    config.update(changes)
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize(
    "key, value",
    [
        ("beta_schedule", "linear"),
        ("beta_end", 0.02),
        ("prediction_type", "v_prediction"),
        ("steps_offset", 0),
        ("set_alpha_to_one", True),
        ("clip_sample", True),
        ("timestep_spacing", "trailing"),
        ("rescale_betas_zero_snr", True),
    ],
)
def test_scheduler_setting_the_runtime_does_not_implement_is_a_one_line_config_error(
    vd, tmp_path, key, value
):
    folder = _scheduler_folder(vd, tmp_path, **{key: value})
    with pytest.raises(ConfigError) as err:
        check_versatile_diffusion_scheduler(folder)
    message = str(err.value)
    assert "\n" not in message and "scheduler_config.json" in message and key in message
    assert repr(value) in message


def test_scheduler_check_reads_the_folder_and_class_defaults(vd, tmp_path):
    from diffusers import PNDMScheduler

    settings = check_versatile_diffusion_scheduler(vd)
    assert settings["_class_name"] == "DDIMScheduler" and settings["beta_schedule"] == "scaled_linear"
    # another scheduler class with Versatile Diffusion's schedule is fine: the runtime samples with DDIM anyway
    pndm = tmp_path / "pndm"
    PNDMScheduler(
        **{k: v for k, v in DDIM_SCHEDULER.items() if k != "clip_sample"}, skip_prk_steps=True
    ).save_pretrained(pndm / "scheduler")
    assert check_versatile_diffusion_scheduler(pndm)["_class_name"] == "PNDMScheduler"
    # a key the file omits takes the class default, as in diffusers (DDIMScheduler: beta_schedule "linear")
    config = json.loads((vd / "scheduler" / "scheduler_config.json").read_text())
    del config["beta_schedule"]
    (tmp_path / "omitted" / "scheduler").mkdir(parents=True)
    (tmp_path / "omitted" / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="found 'linear'"):
        check_versatile_diffusion_scheduler(tmp_path / "omitted")
    with pytest.raises(ConfigError, match="_class_name"):
        check_versatile_diffusion_scheduler(
            _scheduler_folder(vd, tmp_path / "bad", _class_name="NoSuchScheduler")
        )
    (tmp_path / "none").mkdir()
    with pytest.raises(MissingFileError):
        check_versatile_diffusion_scheduler(tmp_path / "none")


def test_load_unet_refuses_a_changed_scheduler_before_loading(vd, tmp_path):
    changed = shutil.copytree(vd, tmp_path / "vd", ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((changed / "scheduler" / "scheduler_config.json").read_text())
    (changed / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "beta_start": 0.0001}))
    with pytest.raises(ConfigError, match="beta_start"):  # not MissingFileError: no weights were looked for
        load_unet(str(changed))


# ----------------------------------------------------------------------------------------- end to end


def test_fit_and_reconstruct_with_every_foundation_from_one_folder(vd, tmp_path_factory, tmp_path):
    """recon-train subject --stage clip with --clip/--vae/--unet all pointing at the VD folder, then the torch
    reference reconstruction; a later change to text_unet/ is refused when the subject is loaded."""
    from brainrecon.train.reference import Stage2Model
    from brainrecon.train.stage2.fit import Stage2Config, fit_stage2
    from tests.fixtures import build_tiny_stage1

    # the stage-1 half of tests/fixtures.py build_tiny_stage2 (shared when both run in one session)
    stage1 = build_tiny_stage1(tmp_path_factory.getbasetemp() / "tiny-stage2" / "stage1")
    folder = shutil.copytree(vd, tmp_path / "vd")
    model_dir = shutil.copytree(
        stage1["ridge"], tmp_path / "model", ignore=shutil.ignore_patterns("onnx", "manifest.json")
    )
    spec = str(folder)
    summary = fit_stage2(stage1["prep"], model_dir, Stage2Config(clip=spec, vae=spec, unet=spec, rank=4))
    assert (summary["vision_tokens"], summary["text_tokens"], summary["clip_dim"]) == (17, 16, 32)
    assert "text_unet/diffusion_pytorch_model.safetensors" in summary["foundation"]["unet"]["files"]

    model = Stage2Model.load(model_dir)
    extractor, _ = load_clip(spec)
    for name, context in zip(("text", "vision"), extractor.unconditional_contexts(), strict=True):
        np.testing.assert_allclose(model.uncond[name], context, atol=ATOL)  # "" and the black image
    betas = np.load(stage1["prep"] / "test_betas.npy")[:2]
    fast = dataclasses.replace(model.sampling, num_inference_steps=8)
    recon = model.reconstruct(betas, fast, progress=False)
    assert recon["final"].shape == (2, 16, 16, 3) and recon["final"].dtype == np.uint8

    weights = folder / "text_unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    key = sorted(state)[0]
    state[key] = state[key] + 1.0
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(InputError, match="unet"):
        Stage2Model.load(model_dir)
