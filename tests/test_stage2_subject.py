"""Stage 2 of a subject: CLIP regressors fitted from betas, and the two-stage torch reference reconstruction."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainrecon.errors import ConfigError, InputError
from brainrecon.images import resize
from brainrecon.sampling import SamplingConfig
from brainrecon.train.reference import Stage2Model
from brainrecon.train.stage2.fit import Stage2Config, fit_stage2
from brainrecon.train.stage2.img2img import decode_latents, encode_images
from tests.fixtures import FAST_STEPS, build_tiny_stage2, save_tiny_unet, tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_stage2(tmp_path_factory.getbasetemp() / "tiny-stage2")


@pytest.fixture(scope="module")
def model(tiny) -> Stage2Model:
    return Stage2Model.load(tiny["model"])


@pytest.fixture(scope="module")
def fast(model) -> SamplingConfig:
    """The fitted sampling settings (the VAE's own latent scale) on a short schedule."""
    return dataclasses.replace(model.sampling, num_inference_steps=FAST_STEPS)


def test_fit_writes_reduced_rank_regressors_and_contexts(tiny, model):
    info = json.loads((tiny["model"] / "stage2" / "stage2.json").read_text())
    n_voxels = info["n_voxels"]
    for name, tokens in (("text", 77), ("vision", 65)):
        ridge = info["clip_ridge"][name]
        assert ridge["rank"] == 16  # the fixture asks for 16
        assert ridge["parameters"] == n_voxels * 16 + 16 * tokens * 128 + tokens * 128
        assert ridge["parameters"] < ridge["full_rank_parameters"]
        mean = np.load(tiny["model"] / "stage2" / f"clip_{name}_target_mean.npy")
        assert mean.shape == (tokens, 128)
    assert model.uncond["text"].shape == (1, 77, 128) and model.uncond["vision"].shape == (1, 65, 128)
    # Brain-Diffuser's settings, with the latent scale of the VAE the UNet was trained on
    scale = model.vae.config.scaling_factor
    assert info["sampling"] == dataclasses.asdict(SamplingConfig(vae_scale_factor=scale))


def test_predicted_contexts_track_the_targets(tiny, model):
    """Betas carry the image: predicted CLIP-vision tokens correlate with the true ones of held-out images."""
    from brainrecon.train.foundations.loaders import load_clip
    from brainrecon.train.stage1.fit import load_prepared

    betas, images = load_prepared(tiny["prep"], "test")
    pred = model.predict_contexts(betas)
    extractor, _ = load_clip()
    true = extractor.vision_embeddings(np.asarray(images))
    assert pred["vision"].shape == true.shape and np.isfinite(pred["vision"]).all()
    r = np.corrcoef(pred["vision"].ravel(), true.ravel())[0, 1]
    assert r > 0.5, r


def test_reconstruct_is_seeded_and_independent_of_batching(tiny, model, fast):
    betas = np.load(tiny["prep"] / "test_betas.npy")[:5]
    a = model.reconstruct(betas, fast, batch_size=5, progress=False)
    b = model.reconstruct(betas, fast, batch_size=2, progress=False)
    c = model.reconstruct(betas, dataclasses.replace(fast, seed=1), batch_size=5, progress=False)
    assert a["final"].shape == (5, 64, 64, 3) and a["final"].dtype == np.uint8
    # same noise per image however the batch is split; only float rounding of batch-size-specific kernels differs
    split = np.abs(a["final"].astype(int) - b["final"])
    assert split.max() <= 1 and (split > 0).mean() < 0.01
    np.testing.assert_array_equal(
        a["final"], model.reconstruct(betas, fast, batch_size=5, progress=False)["final"]
    )
    assert np.abs(a["final"].astype(int) - c["final"]).mean() > 1.0


def test_strength_zero_returns_the_vae_round_trip_of_stage1(tiny, model, fast):
    betas = np.load(tiny["prep"] / "test_betas.npy")[:3]
    out = model.reconstruct(betas, dataclasses.replace(fast, strength=0.0), progress=False)
    init = resize(out["stage1"], model.image_size)
    scale = fast.vae_scale_factor
    round_trip = decode_latents(model.vae, encode_images(model.vae, init, scale), scale)
    np.testing.assert_array_equal(out["final"], round_trip)


def test_unet_with_other_tokens_is_refused(tiny, tmp_path):
    from brainrecon.config import save_config
    from brainrecon.train.foundations.dual_unet import build_dual_unet
    from brainrecon.train.foundations.ldm_train import DUAL_UNET_CONFIG

    config = dataclasses.replace(tiny_unet_config(), vision_tokens=257)
    build_dual_unet(config).save_pretrained(tmp_path / "unet")
    save_config(config, tmp_path / "unet" / DUAL_UNET_CONFIG)
    with pytest.raises(ConfigError, match="257"):
        fit_stage2(tiny["prep"], tmp_path / "model", Stage2Config(unet=str(tmp_path / "unet")))
    assert not (tmp_path / "model" / "stage2").exists()


def test_changed_foundation_is_refused(tiny, tmp_path):
    model_dir = shutil.copytree(tiny["model"], tmp_path / "model")
    unet_dir = save_tiny_unet(tmp_path / "unet", seed=0)
    info_path = model_dir / "stage2" / "stage2.json"
    info = json.loads(info_path.read_text())
    info["config"]["unet"] = str(unet_dir)
    info_path.write_text(json.dumps(info))
    Stage2Model.load(model_dir)  # the same seed gives the same weights: accepted
    save_tiny_unet(unet_dir, seed=1)
    with pytest.raises(InputError, match="unet stage 2 was fitted with"):
        Stage2Model.load(model_dir)


def _cli(name: str, *args) -> subprocess.CompletedProcess:
    cmd = [Path(sys.executable).parent / name, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})


def test_cli_train_clip_then_reconstruct_stage2(tiny, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny["model"], model_dir, ignore=shutil.ignore_patterns("stage2"))
    res = _cli(
        "recon-train",
        "subject",
        "--data",
        tiny["prep"],
        "--model-dir",
        model_dir,
        "--stage",
        "clip",
        "--unet",
        tiny["unet"],
        "--clip-rank",
        8,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((model_dir / "stage2" / "stage2.json").read_text())["clip_ridge"]["text"]["rank"] == 8
    out = tmp_path / "recon"
    res = _cli(
        "recon-reconstruct",
        "--model-dir",
        model_dir,
        "--data",
        tiny["prep"],
        "--out",
        out,
        "--stage",
        2,
        "--steps",
        FAST_STEPS,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]) == {"pixcorr", "ssim", "clip_2way"}
    assert (out / "contact_sheet.png").is_file() and len(list(out.glob("final_*.png"))) == metrics["n"]
    # A second run into the same folder is refused and leaves it as it was.
    res = _cli("recon-reconstruct", "--model-dir", model_dir, "--data", tiny["prep"], "--out", out)
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error:")
    assert (out / "metrics.json").is_file()


def test_compare_stage2_writes_the_results_table(tiny, tmp_path):
    from brainrecon.train.evaluation.stage2 import compare_stage2

    result = compare_stage2(tiny["model"], tiny["prep"], tmp_path / "results", sheet_images=4)
    runs = [r["run"] for r in result["rows"]]
    assert runs[0] == "stage 1" and "oracle: true CLIP contexts" in runs and len(runs) == 10
    assert runs[-1] == "control: VAE round trip of the ground truth"
    for row in result["rows"]:
        assert -1 <= row["pixcorr"] <= 1 and 0 <= row["clip_2way"] <= 1 and row["recurring_error"] >= 1
        # Brain-Diffuser's columns: without --weights PixCorr and SSIM, the same values as the row's own
        assert set(row["paper"]) == {"pixcorr", "ssim"}
        assert (
            abs(row["paper"]["pixcorr"] - row["pixcorr"]) <= 1e-4
            and abs(row["paper"]["ssim"] - row["ssim"]) <= 1e-4
        )
    paper = result["paper_metrics"]
    assert paper["computed"] == ["pixcorr", "ssim"] and "alexnet-owt" in paper["missing"]["alexnet2"]
    table = (tmp_path / "results" / "stage2.md").read_text()
    assert "| run | PixCorr ↑ | SSIM ↑ | AlexNet(2) ↑ |" in table and "- SwAV ↓ not computed: needs" in table
    ridge = {r["model"].split(",")[0]: r for r in result["sizes"] if "ridge," in r["model"]}
    assert ridge["CLIP-vision ridge"]["parameters"] < ridge["CLIP-vision ridge"]["full_rank_parameters"]
    assert result["real_size_clip_ridge"]["compression"] > 10
    for name in ("stage2.json", "stage2.md", "stage2_sheet.png"):
        assert (tmp_path / "results" / name).is_file()
