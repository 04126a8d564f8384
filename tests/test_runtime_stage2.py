"""Stage-2 runtime (runtime/stage2.py, recon-infer --stage 2): parity with the torch reference
`Stage2Model.reconstruct`, seeding, batching, strength 0, a single trial, overrides, bad inputs, manifest checks,
the CLI end to end, and the no-torch guarantee; on the tiny two-stage subject of tests/fixtures.py exported by
`recon-export --stage all --precision both`, with the short schedule FAST_STEPS (8 steps, strength 0.75 → 6 UNet
calls).

Tolerances, |ORT − torch| over the 10 test trials, the reference run with the fitted sampling shortened to
FAST_STEPS (pixels in grey levels of 1/255; latents are the scaled latents given to the VAE decoder, up to ~13 in
magnitude here). Stage 1 alone is tests/test_runtime.py's business; the stage-2 latent comparison refines the
runtime's own stage-1 images so that a stage-1 rounding tie does not count twice.
- fp32: final pixels mean ≤ 0.01 level, max ≤ 1 level (a rounding tie of `rint`); latents max ≤ 1e-4
  (measured: pixels mean 1.2e-4 level, max 1; latents max 2.3e-5, mean 3.4e-6: ORT's kernels, and DDIM steps taken
  in float64 by runtime/ddim.py vs float32 by diffusers, over 6 steps);
- fp16: final pixels mean ≤ 0.5 level and ≥ 98 % within 2 levels (measured: mean 0.24, max 4 levels, 98.4 % within
  1 level, 99.7 % within 2; latents max 0.022). Part of it is inherited: the fp16 stage 1 already differs by 0.06
  level on average and up to 37 levels where the VDVAE's DmoL argmax flips; the VAE encoder smooths that out.
Re-runs are bit-identical; batch splits allowed ≤ 1e-5 on latents and ≤ 1 level on pixels (measured: identical).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.manifest import load_manifest, write_manifest
from brainrecon.runtime import Reconstructor, RuntimeOptions
from brainrecon.runtime.ddim import DDIM_FIXED, DDIMConfig
from brainrecon.runtime.infer import run_inference
from brainrecon.runtime.model_folder import default_stage, load_scheduler
from tests.fixtures import FAST_STEPS

FINAL_TOLERANCE = {"fp32": {"mean": 0.01, "max": 1}, "fp16": {"mean": 0.5, "within_2": 0.98}}
LATENT_ATOL_FP32 = 1e-4
SAME_ATOL = 1e-5  # re-runs, batch splits: same kernels, possibly another blocking


@pytest.fixture(scope="module")
def rec(tiny2):
    with Reconstructor.open(tiny2["model"], RuntimeOptions(threads=1)) as r:
        yield r


def short(rec: Reconstructor, **changes):
    """The fitted sampling on the short schedule FAST_STEPS, with `changes`."""
    return dataclasses.replace(rec.sampling, num_inference_steps=FAST_STEPS, **changes)


@pytest.fixture(scope="module")
def fast(rec, betas):
    """The fp32 runtime on the test betas with the short schedule (shared by several tests)."""
    return rec.reconstruct(betas, short(rec))


@pytest.fixture(scope="module")
def reference(tiny2):
    import torch

    from brainrecon.train.reference import Stage2Model

    torch.set_num_threads(1)
    return Stage2Model.load(tiny2["model"])


def torch_latents(
    reference, stage1_images: np.ndarray, contexts: dict[str, np.ndarray], sampling
) -> np.ndarray:
    """The reference's denoised latents (what `img2img` hands to `decode_latents`), from its own pieces."""
    import torch

    from brainrecon.images import resize
    from brainrecon.noise import img2img_noise
    from brainrecon.train.stage2.img2img import denoise, encode_images, vd_scheduler

    init = encode_images(
        reference.vae, resize(stage1_images, reference.image_size), sampling.vae_scale_factor
    )
    cond = torch.cat([torch.from_numpy(contexts["vision"]), torch.from_numpy(contexts["text"])], dim=1)
    uncond = torch.cat(
        [torch.from_numpy(reference.uncond["vision"]), torch.from_numpy(reference.uncond["text"])], 1
    )
    noise = torch.from_numpy(img2img_noise(tuple(init.shape), sampling.seed))
    return denoise(reference.unet, vd_scheduler(), init, cond, uncond, sampling, noise).numpy()


def pixel_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


# ----------------------------------------------------------------------------------------- parity


def test_fp32_and_fp16_match_the_torch_reference(tiny2, reference, betas, fast):
    sampling = dataclasses.replace(reference.sampling, num_inference_steps=FAST_STEPS)  # the fitted, shorter
    expected = reference.reconstruct(betas, sampling, progress=False)
    d1 = pixel_diff(fast.stage1_images, expected["stage1"])  # stage 1 alone: tests/test_runtime.py
    assert d1.mean() <= FINAL_TOLERANCE["fp32"]["mean"] and d1.max() <= 1, (d1.mean(), d1.max())

    d = pixel_diff(fast.images, expected["final"])
    assert d.mean() <= FINAL_TOLERANCE["fp32"]["mean"] and d.max() <= FINAL_TOLERANCE["fp32"]["max"], (
        d.mean(),
        d.max(),
    )
    # stage 2 alone: the reference refines the runtime's stage-1 images (a rint tie there moves the latents)
    latents = torch_latents(reference, fast.stage1_images, reference.predict_contexts(betas), sampling)
    np.testing.assert_allclose(fast.latents, latents, rtol=0, atol=LATENT_ATOL_FP32)
    assert list(fast.timesteps) == [626, 501, 376, 251, 126, 1]  # 8 steps, strength 0.75, offset 1
    assert fast.renormalized == {"stage1": True, "clip": True}
    assert set(fast.timings) >= {"stage1_s", "clip_s", "vae_encode_s", "unet_s", "vae_decode_s", "total_s"}
    # stage 1's two models, the CLIP ridges, the VAE pair, the K/V-once UNet pair (unet_context, unet = unet_kv)
    assert all(p == ["CPUExecutionProvider"] for p in fast.providers.values()) and len(fast.providers) == 8

    with Reconstructor.open(tiny2["model"], RuntimeOptions(precision="fp16", threads=1)) as rec16:
        fp16 = rec16.reconstruct(betas, short(rec16))
    d16 = pixel_diff(fp16.images, expected["final"])
    tol = FINAL_TOLERANCE["fp16"]
    assert d16.mean() <= tol["mean"] and (d16 <= 2).mean() >= tol["within_2"], (d16.mean(), d16.max())


@pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)  # diffusers' DPM set_timesteps
@pytest.mark.parametrize(
    ("sampler", "steps", "guidance_stop"),
    [
        ("dpmpp_2m", FAST_STEPS, 1.0),
        ("dpmpp_2m", 5, 1.0),
        ("ddim", FAST_STEPS, 0.6),
        ("dpmpp_2m", FAST_STEPS, 0.6),
    ],
)
def test_samplers_and_guidance_stop_match_the_torch_reference(
    reference, rec, betas, fast, sampler, steps, guidance_stop
):
    """DPM-Solver++ and guidance_stop (runtime/samplers.py, stage2.py) against the torch reference's
    (train/stage2/img2img.py: diffusers' DPMSolverMultistepScheduler, the same guided-steps rule), with the fp32
    tolerances of the DDIM parity above (measured: pixels mean 1.1e-4 level, max 1; latents max 1.7e-5)."""
    sampling = dataclasses.replace(
        rec.sampling, num_inference_steps=steps, sampler=sampler, guidance_stop=guidance_stop
    )
    result = rec.reconstruct(betas, sampling)
    assert result.sampling == sampling  # what ran is recorded
    np.testing.assert_array_equal(
        result.timesteps, rec.pipeline.schedulers[sampler].timesteps(steps, sampling.strength)
    )
    expected = reference.reconstruct(betas, sampling, progress=False)
    d = pixel_diff(result.images, expected["final"])
    assert d.mean() <= FINAL_TOLERANCE["fp32"]["mean"] and d.max() <= FINAL_TOLERANCE["fp32"]["max"], (
        d.mean(),
        d.max(),
    )
    latents = torch_latents(reference, result.stage1_images, reference.predict_contexts(betas), sampling)
    np.testing.assert_allclose(result.latents, latents, rtol=0, atol=LATENT_ATOL_FP32)
    assert pixel_diff(result.images, fast.images).mean() > 0.05  # not the default path's images


def test_guidance_stop_runs_the_conditional_pass_alone(tiny2, rec, betas):
    """After ceil(guidance_stop × T) steps the UNet gets the chunk's rows once (cond), not twice; progress ticks
    once per UNet call; the plain UNet and the K/V-once pair agree."""
    sampling = short(rec, guidance_stop=0.5)  # 6 steps: the first 3 guided
    pipe = rec.pipeline
    workers = pipe.unet_workers
    rows, progress = [], []

    class Counting:
        def run(self, inputs):
            rows.append(len(inputs["sample"]))
            return workers[0].run(inputs)

    pipe.unet_workers = [Counting()]
    try:
        result = rec.reconstruct(betas, sampling, batch_size=5, progress=lambda *a: progress.append(a))
    finally:
        pipe.unet_workers = workers
    assert rows == ([10] * 3 + [5] * 3) * 2  # two chunks of 5 images
    assert [done for step, done, _ in progress if step == "unet"] == list(range(1, 13))
    assert result.timings["unet_s"] > 0
    whole = rec.reconstruct(betas, sampling)
    np.testing.assert_allclose(result.latents, whole.latents, rtol=0, atol=SAME_ATOL)
    with Reconstructor.open(tiny2["model"], RuntimeOptions(threads=1, unet_graph="plain")) as plain:
        assert plain.folder.stage2.unet_graph == "plain"
        other = plain.reconstruct(betas, sampling)
    np.testing.assert_allclose(other.latents, whole.latents, rtol=0, atol=LATENT_ATOL_FP32)


def test_same_seed_same_images_other_seed_other_images(rec, betas, fast):
    again = rec.reconstruct(betas, short(rec))
    np.testing.assert_array_equal(again.images, fast.images)
    other = rec.reconstruct(betas, short(rec, seed=1))
    np.testing.assert_array_equal(other.stage1_images, fast.stage1_images)  # stage 1 draws no noise
    assert other.sampling.seed == 1 and pixel_diff(other.images, fast.images).mean() > 1.0


def test_result_does_not_depend_on_batch_splitting(rec, betas, fast):
    split = rec.reconstruct(betas, short(rec), batch_size=3)  # 3 + 3 + 3 + 1; UNet batch 6
    assert split.batch_sizes["unet"] == 3
    np.testing.assert_allclose(split.latents, fast.latents, rtol=0, atol=SAME_ATOL)
    assert pixel_diff(split.images, fast.images).max() <= 1


def test_parallel_unet_sessions_give_the_single_session_result(tiny2, betas, fast):
    """On the CPU the UNet loop runs one 1-thread session per thread, each on its own chunk of images."""
    progress = []
    with Reconstructor.open(tiny2["model"], RuntimeOptions(threads=2)) as parallel:
        assert len(parallel.pipeline.unet_workers) == 2
        result = parallel.reconstruct(betas, short(parallel), progress=lambda *a: progress.append(a))
    np.testing.assert_allclose(result.latents, fast.latents, rtol=0, atol=SAME_ATOL)
    assert pixel_diff(result.images, fast.images).max() <= 1
    unet_calls = [done for step, done, _ in progress if step == "unet"]
    assert sorted(unet_calls) == list(range(1, 2 * len(result.timesteps) + 1))  # 2 chunks of 5 images


def test_strength_zero_is_the_vae_round_trip_of_stage1(rec, reference, betas):
    from brainrecon.images import resize
    from brainrecon.train.stage2.img2img import decode_latents, encode_images

    calls = []
    pipe = rec.pipeline
    unet = pipe.backends["unet"]

    class Counting:
        providers = unet.providers

        def run(self, inputs):
            calls.append(len(inputs["sample"]))
            return unet.run(inputs)

    pipe.backends["unet"] = Counting()
    try:
        result = rec.reconstruct(betas[:3], rec.sampling.with_overrides(strength=0.0))
    finally:
        pipe.backends["unet"] = unet
    assert calls == [] and len(result.timesteps) == 0
    scale = pipe.sampling.vae_scale_factor
    expected = decode_latents(
        reference.vae,
        encode_images(reference.vae, resize(result.stage1_images, pipe.image_size), scale),
        scale,
    )
    d = pixel_diff(result.images, expected)
    assert d.mean() <= FINAL_TOLERANCE["fp32"]["mean"] and d.max() <= 1


def test_single_trial_skips_the_renormalisation(rec, reference, betas):
    """The rule of both stages (stage 1's: tests/test_runtime.py): renormalize=None skips the re-normalisation for
    a single trial (a set of one has no statistics) and records it; renormalize=True refuses a single trial."""
    one = rec.reconstruct(betas[4:5], short(rec))
    size = rec.image_sizes["final"]
    assert one.images.shape == (1, size, size, 3)
    assert one.renormalized == {"stage1": False, "clip": False}
    # the reference with re-normalisation off (its regressors refuse a set of one otherwise)
    reference = dataclasses.replace(
        reference,
        stage1=dataclasses.replace(
            reference.stage1, config=dataclasses.replace(reference.stage1.config, renormalize=False)
        ),
    )
    contexts = {k: r.predict(betas[4:5], renormalize=False) for k, r in reference.clip.items()}
    expected = reference.reconstruct(
        betas[4:5],
        dataclasses.replace(reference.sampling, num_inference_steps=FAST_STEPS),
        contexts=contexts,
        progress=False,
    )
    assert pixel_diff(one.stage1_images, expected["stage1"]).max() <= 1
    assert pixel_diff(one.images, expected["final"]).max() <= 1
    off = rec.reconstruct(betas[4:5], short(rec), renormalize=False)
    np.testing.assert_array_equal(off.images, one.images)
    calls = []
    with pytest.raises(InputError, match="at least 2 trials") as e:
        rec.reconstruct(betas[4:5], short(rec), renormalize=True, progress=lambda *a: calls.append(a))
    assert "\n" not in str(e.value) and calls == []


# ----------------------------------------------------------------------------------------- refusals


def test_sampling_overrides_are_checked(rec, betas):
    fitted = rec.sampling
    same = dataclasses.replace(fitted, mix_ratio=fitted.mix_ratio)
    assert rec.check(betas, same).sampling.mix_ratio == fitted.mix_ratio
    with pytest.raises(ConfigError, match="mix_ratio .*baked into the exported UNet"):
        rec.reconstruct(betas, fitted.with_overrides(mix_ratio=0.5))
    with pytest.raises(ConfigError, match="strength in"):
        rec.reconstruct(betas, fitted.with_overrides(strength=1.5))
    with pytest.raises(ConfigError, match="num_inference_steps"):
        rec.reconstruct(betas, fitted.with_overrides(num_inference_steps=0))
    with pytest.raises(ConfigError, match="seed"):
        rec.reconstruct(betas, fitted.with_overrides(seed=-1))
    # a schedule the numpy DDIM cannot build is refused by `check`, before any model runs
    with pytest.raises(ConfigError, match="DDIM: expected num_inference_steps"):
        rec.check(betas, fitted.with_overrides(num_inference_steps=5000))
    with pytest.raises(
        ConfigError, match="DPM-Solver\\+\\+: expected num_inference_steps"
    ):  # DDIM's 999 would do
        rec.check(betas, fitted.with_overrides(num_inference_steps=999, sampler="dpmpp_2m"))
    with pytest.raises(ConfigError, match="sampler one of"):
        rec.check(betas, fitted.with_overrides(sampler="euler"))
    with pytest.raises(ConfigError, match="guidance_stop in"):
        rec.check(betas, fitted.with_overrides(guidance_stop=-0.1))
    unet_max = rec.pipeline.ios["unet"].max_batch // 2
    with pytest.raises(InputError, match="UNet runs 2 x batch"):
        rec.reconstruct(betas, batch_size=unet_max + 1)


def test_model_without_stage2_says_what_to_run(tiny2, tmp_path):
    from tests.fixtures import build_tiny_stage1

    stage1_only = build_tiny_stage1(tiny2["prep"].parent)["ridge"]  # the stage-1 half of the fixture
    with pytest.raises(MissingFileError, match="recon-train subject --stage clip"):
        Reconstructor.open(stage1_only, stage=2)
    assert default_stage(stage1_only) == 1 and default_stage(tiny2["model"]) == 2

    copy = tmp_path / "not-exported"
    shutil.copytree(tiny2["model"], copy)
    manifest = load_manifest(copy)
    kept = [a for a in manifest.artifacts if not a.path.startswith("stage2/") and a.model not in ("unet",)]
    (copy / "manifest.json").unlink()
    write_manifest(copy, kept, merge=False)
    with pytest.raises(MissingFileError, match="recon-export --model-dir .* --stage all"):
        Reconstructor.open(copy)


def test_tampered_stage2_file_is_refused(tiny2, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(tiny2["model"], copy)
    uncond = np.load(copy / "stage2" / "uncond_text.npy")
    np.save(copy / "stage2" / "uncond_text.npy", uncond + 1)
    with pytest.raises(InputError, match="uncond_text.npy.*modified file"):
        Reconstructor.open(copy)


def test_scheduler_tables_of_the_export_are_checked(tiny2, rec, tmp_path):
    """stage2/scheduler.json holds diffusers' DDIM tables; the numpy scheduler must reproduce them. DPM-Solver++
    is built on the DDIM read from it (the file records no table of its own, as from every export)."""
    data = json.loads((tiny2["model"] / "stage2" / "scheduler.json").read_text())
    fitted = rec.pipeline.schedulers["ddim"].timesteps(50, 0.75)  # the fitted sampling: 37 steps
    assert data["timesteps"] == fitted.tolist()
    ddim, dpm = rec.folder.stage2.schedulers["ddim"], rec.folder.stage2.schedulers["dpmpp_2m"]
    assert (
        dpm.config
        == ddim.config
        == DDIMConfig.from_dict({k: v for k, v in data["scheduler"].items() if k not in DDIM_FIXED})
    )
    assert dpm.config == DDIMConfig()  # the export records DDIM_SCHEDULER
    np.testing.assert_array_equal(dpm.alphas_cumprod, ddim.alphas_cumprod)
    np.testing.assert_allclose(dpm.alphas_cumprod[fitted], data["alpha_t"], rtol=0, atol=1e-6)
    for change, match in (
        ({"scheduler": {**data["scheduler"], "clip_sample": True}}, "clip_sample"),
        ({"scheduler": {**data["scheduler"], "steps_offset": 0}}, "expected timesteps"),
        ({"alpha_t": [a * 1.01 for a in data["alpha_t"]]}, "alpha_t within"),
        ({"version": 99}, "format/version"),
    ):
        (tmp_path / "stage2").mkdir(exist_ok=True)
        (tmp_path / "stage2" / "scheduler.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(ConfigError, match=match):
            load_scheduler(tmp_path, rec.sampling)


# ----------------------------------------------------------------------------------------- recon-infer


def run_cli(monkeypatch, *args: str) -> int:
    from brainrecon.cli.deploy import infer_main

    monkeypatch.setattr(sys, "argv", ["recon-infer", *args])
    with pytest.raises(SystemExit) as e:
        infer_main()
    return e.value.code


def test_recon_infer_stage2_with_stimuli(tiny2, fast, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    prep = tiny2["prep"]
    args = [str(prep / "test_betas.npy"), "--model-dir", str(tiny2["model"]), "--out", str(out)]
    args += ["--stimuli", str(prep / "test_images.npy"), "--steps", str(FAST_STEPS), "--threads", "1"]
    assert run_cli(monkeypatch, *args) == 0  # stage 2 by default
    printed = capsys.readouterr().out
    assert "recon-infer stage 2" in printed and "final PixCorr / SSIM" in printed
    n = len(fast.images)
    names = {p.name for p in out.iterdir()} - {".brainrecon-output"}  # io.OUTPUT_MARKER, test_data_safety.py
    assert names == {
        "contact_sheet.png",
        "summary.json",
        "timings.json",
        "metrics.json",
        "final_images.npy",
        "stage1_images.npy",
        *(f"stage1_{t:05d}.png" for t in range(n)),
        *(f"final_{t:05d}.png" for t in range(n)),
    }
    np.testing.assert_array_equal(np.load(out / "final_images.npy"), fast.images)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(out / "final_00003.png")), fast.images[3])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "stage1_00003.png")), fast.stage1_images[3])
    assert Image.open(out / "contact_sheet.png").size[1] > 3 * 90  # ground truth, stage 1, final
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == n and set(metrics) == {"n", "stage1", "final"}
    assert all(
        -1 <= metrics[k]["pixcorr"] <= 1 and -1 <= metrics[k]["ssim"] <= 1 for k in ("stage1", "final")
    )
    timings = json.loads((out / "timings.json").read_text())
    for key in ("stage1_s", "clip_s", "vae_encode_s", "unet_s", "vae_decode_s", "wall_s"):
        assert timings[key] >= 0, key
    assert (
        timings["unet_calls"] == 6 * -(-n // fast.batch_sizes["unet"])
        and timings["stage1_split"]["decoder_s"] > 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == 2 and summary["sampling"]["num_inference_steps"] == FAST_STEPS
    assert summary["metrics"] == metrics and summary["seed"] == 0
    assert (summary["sampling"]["sampler"], summary["sampling"]["guidance_stop"]) == ("ddim", 1.0)
    assert summary["sampling"]["guided_steps"] == 6


def test_recon_infer_sampler_and_guidance_stop(tiny2, rec, betas, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = [str(tiny2["prep"] / "test_betas.npy"), "--model-dir", str(tiny2["model"]), "--out", str(out)]
    args += ["--trials", "0-3", "--steps", str(FAST_STEPS), "--threads", "1"]
    assert run_cli(monkeypatch, *args, "--sampler", "dpmpp_2m", "--guidance-stop", "0.5") == 0
    assert "dpmpp_2m" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    sampling = short(rec, sampler="dpmpp_2m", guidance_stop=0.5)
    assert {k: summary["sampling"][k] for k in sampling.to_dict()} == sampling.to_dict()
    assert summary["sampling"]["guided_steps"] == 3 and len(summary["sampling"]["timesteps"]) == 6
    np.testing.assert_array_equal(
        np.load(out / "final_images.npy"), rec.reconstruct(betas[:4], sampling).images
    )
    assert run_cli(monkeypatch, *args, "--sampler", "euler", "--overwrite") == 2  # typer: not a choice
    assert "euler" in capsys.readouterr().err


def test_fast_preset_is_its_overrides_and_explicit_options_win(tiny2, rec, betas, tmp_path, monkeypatch):
    """--preset fast is exactly sampling.PRESETS["fast"] over the fitted sampling (the same images as the explicit
    options); an explicit option overrides the preset's value; "paper" overrides nothing."""
    from brainrecon.sampling import PRESETS, preset_overrides

    assert preset_overrides("paper") == {} and preset_overrides("paper", num_inference_steps=None) == {}
    assert preset_overrides("fast", num_inference_steps=6) == {**PRESETS["fast"], "num_inference_steps": 6}
    assert PRESETS["fast"]["sampler"] == "dpmpp_2m" and PRESETS["fast"]["num_inference_steps"] == 10
    out = tmp_path / "out"
    args = [str(tiny2["prep"] / "test_betas.npy"), "--model-dir", str(tiny2["model"]), "--out", str(out)]
    args += ["--trials", "0-3", "--threads", "1", "--preset", "fast"]
    assert run_cli(monkeypatch, *args) == 0
    summary = json.loads((out / "summary.json").read_text())
    expected = rec.sampling.with_overrides(**PRESETS["fast"])
    assert {k: summary["sampling"][k] for k in expected.to_dict()} == expected.to_dict()
    np.testing.assert_array_equal(
        np.load(out / "final_images.npy"), rec.reconstruct(betas[:4], expected).images
    )
    assert run_cli(monkeypatch, *args, "--steps", "4", "--overwrite") == 0
    assert json.loads((out / "summary.json").read_text())["sampling"]["num_inference_steps"] == 4


def test_recon_infer_stage1_still_runs_on_a_stage2_model(tiny2, fast, tmp_path):
    out = tmp_path / "out1"
    summary = run_inference(tiny2["prep"] / "test_betas.npy", tiny2["model"], out, stage=1, trials="0-3")
    assert summary["stage"] == 1 and not (out / "final_images.npy").exists()
    assert sorted(p.name for p in out.glob("stage1_*.png"))[-1] == "stage1_00003.png"
    with pytest.raises(InputError, match="--steps"):
        run_inference(
            tiny2["prep"] / "test_betas.npy",
            tiny2["model"],
            tmp_path / "x",
            stage=1,
            sampling={"num_inference_steps": 4},
        )
    with pytest.raises(InputError, match="--sampler, --guidance-stop"):
        run_inference(
            tiny2["prep"] / "test_betas.npy",
            tiny2["model"],
            tmp_path / "x",
            stage=1,
            sampling={"sampler": "dpmpp_2m", "guidance_stop": 0.5},
        )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "case, match",
    [
        ("nan", "NaN/Inf"),
        ("shape", "voxels per row"),
        ("int", "float32 or float64"),
        ("strength", "strength in [0, 1]"),
        ("strength nan", "expected strength in [0, 1], found nan"),
        ("guidance inf", "expected a finite guidance_scale, found inf"),
        ("guidance stop", "expected guidance_stop in [0, 1], found 1.5"),
        ("negative seed", "expected a seed in [0, 9223372036854775807], found -1"),
        ("float64 1e300", "voxel 5: 1e+300, beyond float32's range"),
        ("mix", None),
    ],
)
def test_bad_inputs_are_one_line_errors(tiny2, rec, betas, tmp_path, monkeypatch, capsys, case, match):
    path = tmp_path / "betas.npy"
    bad = {"nan": betas.copy(), "shape": betas[:, :-1], "int": betas.astype(np.int32)}.get(case, betas)
    if case == "nan":
        bad[2, 5] = np.nan
    if case == "float64 1e300":  # finite as float64, inf as float32: the cast comes before the check
        bad = betas.astype(np.float64)
        bad[2, 5] = 1e300
    np.save(path, bad)
    if case == "mix":  # no CLI option: the mix ratio is baked into the UNet, a change is refused by the API
        with pytest.raises(ConfigError, match="baked"):
            rec.reconstruct(betas, rec.sampling.with_overrides(mix_ratio=0.3))
        return
    out = tmp_path / "out"
    extra = {
        "strength": ["--strength", "1.5"],
        "strength nan": ["--strength", "nan"],
        "guidance inf": ["--guidance", "inf"],
        "guidance stop": ["--guidance-stop", "1.5"],
        "negative seed": ["--seed", "-1"],
    }.get(case, [])
    code = run_cli(monkeypatch, str(path), "--model-dir", str(tiny2["model"]), "--out", str(out), *extra)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("error:") and match in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


# ----------------------------------------------------------------------------------------- torch-free


def test_stage2_runtime_runs_with_torch_blocked(tiny2, tmp_path):
    """recon-infer --stage 2 in a fresh interpreter where importing torch, diffusers or transformers fails."""
    out = tmp_path / "out"
    prep = tiny2["prep"]
    code = f"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers"):
            raise ImportError(f"blocked: {{name}}")
        return None

sys.meta_path.insert(0, Block())
from brainrecon.cli.deploy import infer_main
sys.argv = ["recon-infer", {str(prep / "test_betas.npy")!r}, "--model-dir", {str(tiny2["model"])!r},
            "--out", {str(out)!r}, "--stage", "2", "--steps", "{FAST_STEPS}", "--precision", "fp16",
            "--stimuli", {str(prep / "test_images.npy")!r}, "--threads", "1"]
try:
    infer_main()
    code = 0
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "brainrecon.train", "brainrecon.export") if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": 0, "heavy": []}, proc.stderr
    assert (out / "final_images.npy").is_file() and (out / "metrics.json").is_file()


# ----------------------------------------------------------------------------------------- recon-serve, recon-batch


def test_recon_serve_and_recon_batch_pass_the_sampling_through(tiny2, rec, betas, tmp_path, monkeypatch):
    """--steps, --sampler and --guidance-stop reach the runtime's sampling: recon-serve's config parameters and its
    Python-backend model (a stand-in for Triton's `triton_python_backend_utils`), recon-batch's actor and run.json.
    Bad values are refused with one line naming the option. Triton and Ray themselves: tests/test_serve_triton.py,
    tests/test_ray_batch.py."""
    import types

    from brainrecon.serve import ray_batch
    from brainrecon.serve.triton_server import TEMPLATE, ServeOptions, model_config

    changes = {"num_inference_steps": FAST_STEPS, "sampler": "dpmpp_2m", "guidance_stop": 0.5}
    expected = short(rec, sampler="dpmpp_2m", guidance_stop=0.5)
    text = model_config(ServeOptions(model_dir=tiny2["model"], threads=1, **changes))
    params = dict(re.findall(r'key: "(\w+)"\n  value: \{ string_value: "([^"]*)" \}', text))
    assert (params["steps"], params["sampler"], params["guidance_stop"]) == (
        str(FAST_STEPS),
        "dpmpp_2m",
        "0.5",
    )
    monkeypatch.setitem(
        sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils")
    )
    namespace: dict = {}
    exec(compile(TEMPLATE.read_text(), str(TEMPLATE), "exec"), namespace)  # the model.py recon-serve writes
    model = namespace["TritonPythonModel"]()
    model.initialize(
        {"model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in params.items()}})}
    )
    try:
        assert model.sampling == expected
    finally:
        model.finalize()
    for option, value, message in (
        ("sampler", "euler", "--sampler: expected one of ('ddim', 'dpmpp_2m'), found 'euler'"),
        ("guidance_stop", 1.5, "--guidance-stop: expected a share of the steps in [0, 1], found 1.5"),
        (
            "guidance_stop",
            float("nan"),
            "--guidance-stop: expected a share of the steps in [0, 1], found nan",
        ),
    ):
        for make in (lambda **o: ServeOptions(model_dir=tmp_path, **o), ray_batch.BatchOptions):
            with pytest.raises(InputError) as refused:
                make(**{option: value})
            assert str(refused.value) == message

    options = ray_batch.BatchOptions(threads=1, **changes)
    worker = ray_batch.ShardWorker(str(tiny2["model"]), dataclasses.asdict(options))
    try:
        assert worker.sampling == expected
    finally:
        worker.rec.close()
    record = ray_batch.image_settings(tiny2["model"], options)["sampling"]
    assert {k: record[k] for k in changes} == changes
    # at their defaults the two fields are left out of run.json, as in a record written before they existed
    default = ray_batch.image_settings(
        tiny2["model"], ray_batch.BatchOptions(sampler="ddim", guidance_stop=1.0)
    )
    assert not {"sampler", "guidance_stop"} & set(default["sampling"])
    assert default == ray_batch.image_settings(tiny2["model"], ray_batch.BatchOptions())


# ----------------------------------------------------------------------------------------- recon-bench


def test_recon_bench_reports_speedups_and_enforces_floors(tiny2, tmp_path, monkeypatch):
    """recon-bench on the tiny subject: medians per stage for the three pipelines, pixel agreement, and --check."""
    from brainrecon.cli.deploy import bench_main

    def bench(*extra: str) -> int:
        args = [str(tiny2["prep"] / "test_betas.npy"), "--model-dir", str(tiny2["model"]), "--limit", "4"]
        args += ["--pipelines", "torch,ort_fp32_plain,ort_fp32,ort_fp32_fast"]
        monkeypatch.setattr(sys, "argv", ["recon-bench", *args, "--repeats", "1", "--threads", "1", *extra])
        with pytest.raises(SystemExit) as e:
            bench_main()
        return e.value.code

    out = tmp_path / "bench.json"
    assert bench("--out", str(out)) == 0
    results = json.loads(out.read_text())["inference"]
    assert set(results["median_s"]) == {"torch", "ort_fp32_plain", "ort_fp32", "ort_fp32_fast"}
    assert results["median_s"]["torch"]["unet_s"] > 0
    for name in ("ort_fp32_plain", "ort_fp32"):  # same models, seed and noise; K/V once or not
        assert results[name]["pixel_diff_vs_torch"]["max"] <= 1
    # the fast preset samples otherwise (DPM-Solver++, fewer steps): other pixels, but images of the same size
    assert results["ort_fp32_fast"]["pixel_diff_vs_torch"]["max"] > 1
    unreachable = tmp_path / "targets.json"
    unreachable.write_text(json.dumps({"stage2_speedup_floor": {"ort_fp32": {"total_s": 1000.0}}}))
    assert bench("--out", str(out), "--check", str(unreachable)) == 1
