"""DeepCache step reuse (issue 23): the full and shallow UNet steps in torch (train/stage2/deepcache.py), the
torch reference loop with `cache_interval` (train/stage2/img2img.py denoise), the exported `unet_deep` and
`unet_shallow` graphs (export/stage2.py) and the runtime loop on them (runtime/stage2.py).

Tolerances:
- torch full step vs `unet(...).sample`: bit-identical (the same operations in the same order);
- torch shallow step fed the feature of its own (sample, timestep, context) vs the full step: bit-identical (the
  shallow branch recomputes conv_in and down_blocks[0] with the same operations);
- denoise at cache_interval 1: bit-identical to the loop before DeepCache (written out below);
- exported unet_deep / unet_shallow vs the torch functions: the `unet` contract's bounds, fp32 max ≤ 1e-5 +
  1e-4·scale (measured max 1.6e-6 / 1.0e-6 absolute on the tiny UNet), fp16 max ≤ 1e-3 + 2e-2·scale and median ≤
  1e-3·scale (measured max 2.7e-3 / 2.0e-3, median 3.9e-4 / 2.9e-4);
- the runtime with cache_interval 2 and 3 vs the torch reference at the same settings: the fp32 tolerances of
  tests/test_runtime_stage2.py's sampler parity (pixels mean ≤ 0.01 level, max ≤ 1; latents max ≤ 1e-4; measured:
  pixels mean ≤ 1.3e-4 level, max 1; latents max 2.2e-5).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import UNet2DConditionModel

from brainrecon import model_dir as layout
from brainrecon.errors import ConfigError, MissingFileError
from brainrecon.export.subject import stage2_names
from brainrecon.manifest import load_manifest
from brainrecon.runtime import Reconstructor, RuntimeOptions
from brainrecon.sampling import SamplingConfig
from brainrecon.train.foundations.dual_unet import DualUNetConfig, build_dual_unet
from brainrecon.train.stage2 import deepcache
from brainrecon.train.stage2.deepcache import feature_channels, is_full_step, unet_shallow, unet_with_feature
from brainrecon.train.stage2.img2img import denoise, denoising_timesteps, vd_scheduler
from tests.fixtures import FAST_STEPS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    """The tiny dual UNet with every parameter perturbed (zero-initialised output layers would hide a wrong head)."""
    torch.manual_seed(0)
    unet = build_dual_unet(DualUNetConfig.tiny()).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def _inputs(batch: int, side: int = 32, seed: int = 0):
    cfg = DualUNetConfig.tiny()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    t = torch.randint(1, 1000, (batch,), generator=g).float()
    context = torch.randn(batch, cfg.context_tokens, cfg.cross_attention_dim, generator=g)
    return x, t, context


# side 30 is no multiple of the tiny UNet's 2^2 upsampling: forward's upsample_size path
@pytest.mark.parametrize("side", [32, 30])
@torch.no_grad()
def test_full_step_is_the_unet_forward_bit_for_bit(unet, side):
    x, t, context = _inputs(3, side)
    noise_pred, feature = unet_with_feature(unet, x, t, context)
    assert torch.equal(noise_pred, unet(x, t, encoder_hidden_states=context).sample)
    # the hidden state entering the last up block: the second up block's channels, at the latent side
    assert tuple(feature.shape) == (3, feature_channels(unet), side, side)


@pytest.mark.parametrize("side", [32, 30])
@torch.no_grad()
def test_shallow_step_with_its_own_feature_is_the_full_step(unet, side):
    x, t, context = _inputs(2, side)
    noise_pred, feature = unet_with_feature(unet, x, t, context)
    assert torch.equal(unet_shallow(unet, x, t, context, feature), noise_pred)
    # a feature of another step gives another prediction: the feature is used
    _, other = unet_with_feature(unet, *_inputs(2, side, seed=1)[:2], context)
    assert not torch.allclose(unet_shallow(unet, x, t, context, other), noise_pred, atol=1e-3)


def test_unsupported_unet_options_are_refused(unet):
    odd = UNet2DConditionModel(**{**DualUNetConfig.tiny().unet_kwargs(), "center_input_sample": True})
    with pytest.raises(ConfigError, match="center_input_sample"):
        unet_with_feature(odd, *_inputs(1))


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", None])
def test_cache_interval_is_checked(value):
    with pytest.raises(ConfigError, match="^sampling: expected cache_interval >= 1, found "):
        SamplingConfig(cache_interval=value)


def test_full_steps_are_every_kth_from_the_first():
    for k in (1, 2, 3, 5):
        for steps in (1, 6, 7, 37):
            full = [i for i in range(steps) if is_full_step(i, k)]
            assert full[0] == 0 and len(full) == math.ceil(steps / k)


# ----------------------------------------------------------------------------------------- the torch loop


def _denoise_inputs(batch: int = 2):
    cfg = DualUNetConfig.tiny()
    g = torch.Generator().manual_seed(3)
    init = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    cond = torch.randn(batch, cfg.context_tokens, cfg.cross_attention_dim, generator=g)
    uncond = torch.randn(1, cfg.context_tokens, cfg.cross_attention_dim, generator=g)
    noise = torch.randn(init.shape, generator=g)
    return init, cond, uncond, noise


@torch.no_grad()
def _loop_before_deepcache(unet, init, cond_ctx, uncond_ctx, config, noise):
    """train/stage2/img2img.py denoise as it was before cache_interval (DDIM), written out."""
    scheduler = vd_scheduler()
    timesteps = denoising_timesteps(scheduler, config.num_inference_steps, config.strength)
    latents = scheduler.add_noise(init, noise, timesteps[:1])
    batch = latents.shape[0]
    context = torch.cat([uncond_ctx.expand(batch, -1, -1), cond_ctx])
    guided = config.guided_steps(len(timesteps))
    for i, t in enumerate(timesteps):
        if i < guided:
            out = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample
            uncond_pred, cond_pred = out.chunk(2)
            noise_pred = uncond_pred + config.guidance_scale * (cond_pred - uncond_pred)
        else:
            noise_pred = unet(latents, t, encoder_hidden_states=cond_ctx).sample
        latents = scheduler.step(noise_pred, t, latents, eta=config.eta).prev_sample
    return latents


@pytest.mark.parametrize("guidance_stop", [1.0, 0.6])
def test_denoise_at_cache_interval_1_is_unchanged(unet, guidance_stop):
    init, cond, uncond, noise = _denoise_inputs()
    config = SamplingConfig(num_inference_steps=10, guidance_stop=guidance_stop)
    latents = denoise(unet, vd_scheduler(), init, cond, uncond, config, noise)
    assert torch.equal(latents, _loop_before_deepcache(unet, init, cond, uncond, config, noise))


@pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)  # diffusers' DPM set_timesteps
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("cache_interval", [2, 3])
def test_denoise_with_cache_interval_runs_full_steps_every_kth(unet, monkeypatch, sampler, cache_interval):
    """10 steps at strength 0.75 = 7 UNet steps, guidance on the first ceil(0.6 × 7) = 5: ceil(7 / k) full steps
    (2B rows while guided, B after), the others shallow on the rows of their step; the result differs from the
    uncached loop's but stays near it (the tiny random UNet's deep features change fast, so 'near' is loose)."""
    rows: dict[str, list[int]] = {"full": [], "shallow": []}
    full, shallow = deepcache.unet_with_feature, deepcache.unet_shallow

    def counted_full(unet, sample, *args):
        rows["full"].append(len(sample))
        return full(unet, sample, *args)

    def counted_shallow(unet, sample, t, context, feature):
        assert len(feature) == len(sample) == len(context)
        rows["shallow"].append(len(sample))
        return shallow(unet, sample, t, context, feature)

    monkeypatch.setattr(deepcache, "unet_with_feature", counted_full)
    monkeypatch.setattr(deepcache, "unet_shallow", counted_shallow)
    init, cond, uncond, noise = _denoise_inputs()
    config = SamplingConfig(num_inference_steps=10, sampler=sampler, guidance_stop=0.6)
    cached = denoise(
        unet, vd_scheduler(), init, cond, uncond, config.with_overrides(cache_interval=cache_interval), noise
    )
    plain = denoise(unet, vd_scheduler(), init, cond, uncond, config, noise)
    steps, guided = 7, 5
    expected = ["full" if is_full_step(i, cache_interval) else "shallow" for i in range(steps)]
    for kind in ("full", "shallow"):
        assert rows[kind] == [4 if i < guided else 2 for i, k in enumerate(expected) if k == kind]
    assert len(rows["full"]) == math.ceil(steps / cache_interval)
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    assert (cached - plain).abs().max() < 0.5 * plain.abs().max()


# ----------------------------------------------------------------------------------------- export


def run_cli(monkeypatch, main, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["recon", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


@pytest.fixture(scope="module")
def dc_model(tiny2, tmp_path_factory):
    """The tiny two-stage model re-exported with `recon-export --stage stage2 --unet-graph kv --deepcache`."""
    from brainrecon.cli.deploy import export_main

    model_dir = tmp_path_factory.mktemp("deepcache") / "model"
    shutil.copytree(tiny2["model"], model_dir)
    monkeypatch = pytest.MonkeyPatch()
    args = (
        "--model-dir",
        str(model_dir),
        "--stage",
        "stage2",
        "--unet-graph",
        "kv",
        "--deepcache",
        "--no-engines",
    )
    try:
        assert run_cli(monkeypatch, export_main, *args) == 0
    finally:
        monkeypatch.undo()
    return model_dir


@pytest.fixture(scope="module")
def reference(dc_model):
    from brainrecon.train.reference import Stage2Model

    return Stage2Model.load(dc_model)


def test_the_pair_is_exported_on_request_only(tiny2, dc_model):
    assert not set(layout.STAGE2_DEEPCACHE_MODELS) & set(stage2_names("both"))
    assert stage2_names("kv", deepcache=True)[-2:] == list(layout.STAGE2_DEEPCACHE_MODELS)
    assert not any(a.model in layout.STAGE2_DEEPCACHE_MODELS for a in load_manifest(tiny2["model"]).artifacts)
    manifest = load_manifest(dc_model)
    for model in layout.STAGE2_DEEPCACHE_MODELS:
        for precision in ("fp32", "fp16"):
            assert manifest.find("onnx", model, precision).io["constants"]["mix_ratio"] == 0.6
    deep, shallow = (manifest.find("onnx", m, "fp32").io for m in layout.STAGE2_DEEPCACHE_MODELS)
    assert [o["name"] for o in deep["outputs"]] == ["noise_pred", "feature"]
    assert [i["name"] for i in shallow["inputs"]] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "feature",
    ]
    assert deep["outputs"][1]["shape"] == shallow["inputs"][3]["shape"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_exported_pair_matches_the_torch_functions(dc_model, reference, precision):
    """ORT on unet_deep and unet_shallow against deepcache.unet_with_feature / unet_shallow on seeded inputs (the
    contracts' draws: realistic latents, timesteps, pool contexts, pool features), at the contracts' tolerances;
    then ORT's own deep feature fed to ORT's shallow step gives the deep step's noise_pred (fp32)."""
    from brainrecon.export.stage2 import context_pool, feature_pool, stage2_sources

    sources = {s.contract.name: s for s in stage2_sources(reference, list(layout.STAGE2_DEEPCACHE_MODELS))}
    sessions = {
        name: ort.InferenceSession(
            str(dc_model / layout.onnx_file(name, precision)), providers=["CPUExecutionProvider"]
        )
        for name in sources
    }
    for name, source in sources.items():
        contract = source.contract
        inputs = contract.sample_input(4, "realistic", seed=7, pools=source.pools)
        expected = source.reference(inputs)
        found = dict(
            zip(contract.output_names, sessions[name].run(contract.output_names, inputs), strict=True)
        )
        for output in contract.output_names:
            ok, stats = contract.tolerance(precision).check(expected[output], found[output])
            assert ok, (name, output, stats)
    if precision == "fp32":
        pool = context_pool(reference)
        assert feature_pool(reference.unet, pool).shape[0] == len(pool)
        inputs = sources["unet_deep"].contract.sample_input(
            3, "realistic", seed=8, pools=sources["unet_deep"].pools
        )
        noise_pred, feature = sessions["unet_deep"].run(["noise_pred", "feature"], inputs)
        (shallow,) = sessions["unet_shallow"].run(["noise_pred"], {**inputs, "feature": feature})
        np.testing.assert_allclose(shallow, noise_pred, rtol=0, atol=1e-5 * np.abs(noise_pred).max())


# ----------------------------------------------------------------------------------------- runtime


@pytest.fixture(scope="module")
def rec(dc_model):
    with Reconstructor.open(dc_model, RuntimeOptions(threads=1)) as r:
        yield r


@pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)  # diffusers' DPM set_timesteps
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("cache_interval", [2, 3])
def test_runtime_matches_the_torch_reference(reference, rec, betas, sampler, cache_interval):
    """The runtime's DeepCache loop (runtime/stage2.py) against train/stage2/img2img.py's at FAST_STEPS (6 UNet
    steps), guidance_stop 0.6 (guidance on 4): images and latents within the sampler parity's fp32 tolerances;
    per chunk, unet_deep runs ceil(6 / k) times, unet_shallow the other steps, the plain UNet never."""
    from tests.test_runtime_stage2 import FINAL_TOLERANCE, LATENT_ATOL_FP32, pixel_diff, torch_latents

    sampling = dataclasses.replace(
        rec.sampling,
        num_inference_steps=FAST_STEPS,
        sampler=sampler,
        guidance_stop=0.6,
        cache_interval=cache_interval,
    )
    calls = {"unet_deep": [], "unet_shallow": [], "unet": []}
    pair = rec.pipeline.deepcache_workers()[0]
    counted = {"unet_deep": pair.deep, "unet_shallow": pair.shallow, "unet": rec.pipeline.backends["unet"]}
    runs = {name: backend.run for name, backend in counted.items()}
    for name, backend in counted.items():
        backend.run = lambda inputs, name=name: (
            calls[name].append(len(inputs["sample"])),
            runs[name](inputs),
        )[1]
    try:
        result = rec.reconstruct(betas, sampling)
    finally:
        for backend in counted.values():
            del backend.run
    chunks = math.ceil(len(betas) / rec.pipeline.batch_sizes(None)["unet"])
    steps, full = 6, math.ceil(6 / cache_interval)
    assert chunks == 1 and len(result.timesteps) == steps
    assert (
        len(calls["unet_deep"]) == full and len(calls["unet_shallow"]) == steps - full and not calls["unet"]
    )
    rows = [2 * len(betas) if i < 4 else len(betas) for i in range(steps)]  # guided: [uncond; cond]
    assert calls["unet_deep"] + calls["unet_shallow"] == [
        rows[i] for i in range(steps) if i % cache_interval == 0
    ] + [rows[i] for i in range(steps) if i % cache_interval]
    assert result.sampling == sampling and {"unet_deep", "unet_shallow"} <= set(result.providers)

    expected = reference.reconstruct(betas, sampling, progress=False)
    d = pixel_diff(result.images, expected["final"])
    assert d.mean() <= FINAL_TOLERANCE["fp32"]["mean"] and d.max() <= FINAL_TOLERANCE["fp32"]["max"], (
        d.mean(),
        d.max(),
    )
    latents = torch_latents(reference, result.stage1_images, reference.predict_contexts(betas), sampling)
    np.testing.assert_allclose(result.latents, latents, rtol=0, atol=LATENT_ATOL_FP32)
    plain = rec.reconstruct(betas, dataclasses.replace(sampling, cache_interval=1))
    assert pixel_diff(result.images, plain.images).mean() > 0.05  # the shallow steps changed something


def test_chunks_and_parallel_pairs_give_the_single_call_result(dc_model, rec, betas):
    """Each image chunk keeps its own feature: batch splits and two session pairs in parallel (threads 2) give the
    one-call result within the re-run tolerance of tests/test_runtime_stage2.py (1e-5 on latents)."""
    sampling = dataclasses.replace(
        rec.sampling, num_inference_steps=FAST_STEPS, guidance_stop=0.6, cache_interval=2
    )
    whole = rec.reconstruct(betas, sampling)
    split = rec.reconstruct(betas, sampling, batch_size=3)
    np.testing.assert_allclose(split.latents, whole.latents, rtol=0, atol=1e-5)
    with Reconstructor.open(dc_model, RuntimeOptions(threads=2)) as two:
        parallel = two.reconstruct(betas, sampling)
        assert len(two.pipeline.deepcache_workers()) == 2
    np.testing.assert_allclose(parallel.latents, whole.latents, rtol=0, atol=1e-5)


def test_a_folder_without_the_pair_refuses_before_running(tiny2, betas):
    """cache_interval > 1 on a folder exported without --deepcache: a one-line MissingFileError naming the re-export,
    from `check`, before any model runs; cache_interval 1 runs as ever."""
    with Reconstructor.open(tiny2["model"], RuntimeOptions(threads=1)) as rec:
        assert not rec.folder.stage2.deepcache
        sampling = dataclasses.replace(rec.sampling, cache_interval=2)
        with pytest.raises(
            MissingFileError,
            match=r"unet_deep and unet_shallow .*\(re-export with: recon-export .* --deepcache\)$",
        ):
            rec.check(betas, sampling)
        with pytest.raises(MissingFileError, match="--deepcache"):
            rec.pipeline.deepcache_workers()


def test_recon_infer_cache_interval(tiny2, dc_model, rec, betas, tmp_path, monkeypatch, capsys):
    """--cache-interval K runs the DeepCache loop and records it (sampling.cache_interval, full_steps); on a folder
    without the pair recon-infer exits 1 with the re-export hint; 0 is a usage error."""
    from brainrecon.cli.deploy import infer_main

    out = tmp_path / "out"
    args = [str(tiny2["prep"] / "test_betas.npy"), "--model-dir", str(dc_model), "--out", str(out)]
    args += ["--trials", "0-3", "--steps", str(FAST_STEPS), "--threads", "1"]
    assert run_cli(monkeypatch, infer_main, *args, "--cache-interval", "3") == 0
    assert "DeepCache every 3 (2 full UNet steps)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampling"]["cache_interval"] == 3 and summary["sampling"]["full_steps"] == 2
    sampling = dataclasses.replace(rec.sampling, num_inference_steps=FAST_STEPS, cache_interval=3)
    np.testing.assert_array_equal(
        np.load(out / "final_images.npy"), rec.reconstruct(betas[:4], sampling).images
    )

    args[2] = str(tiny2["model"])
    assert run_cli(monkeypatch, infer_main, *args, "--cache-interval", "2", "--overwrite") == 1
    assert "--deepcache" in capsys.readouterr().err
    assert run_cli(monkeypatch, infer_main, *args, "--cache-interval", "0", "--overwrite") in (1, 2)
    assert "cache_interval" in capsys.readouterr().err


def test_recon_serve_and_recon_batch_pass_cache_interval_through(dc_model, rec, tmp_path, monkeypatch):
    """--cache-interval reaches recon-serve's config parameters and its Python-backend model (a stand-in for
    Triton's `triton_python_backend_utils`), recon-batch's actor and run.json (left out at 1, as in a record written
    before it existed); 0 is refused with one line naming the option."""
    import re
    import types

    from brainrecon.errors import InputError
    from brainrecon.serve import ray_batch
    from brainrecon.serve.triton_server import TEMPLATE, ServeOptions, model_config

    expected = rec.sampling.with_overrides(num_inference_steps=FAST_STEPS, cache_interval=2)
    changes = {"num_inference_steps": FAST_STEPS, "cache_interval": 2}
    text = model_config(ServeOptions(model_dir=dc_model, threads=1, **changes))
    params = dict(re.findall(r'key: "(\w+)"\n  value: \{ string_value: "([^"]*)" \}', text))
    assert params["cache_interval"] == "2"
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

    options = ray_batch.BatchOptions(threads=1, **changes)
    worker = ray_batch.ShardWorker(str(dc_model), dataclasses.asdict(options))
    try:
        assert worker.sampling == expected
    finally:
        worker.rec.close()
    assert ray_batch.image_settings(dc_model, options)["sampling"]["cache_interval"] == 2
    default = ray_batch.image_settings(dc_model, ray_batch.BatchOptions(cache_interval=1))
    assert "cache_interval" not in default["sampling"]
    assert default == ray_batch.image_settings(dc_model, ray_batch.BatchOptions())
    for make in (lambda **o: ServeOptions(model_dir=tmp_path, **o), ray_batch.BatchOptions):
        with pytest.raises(InputError) as refused:
            make(cache_interval=0)
        assert str(refused.value) == "--cache-interval: expected an integer >= 1, found 0"
