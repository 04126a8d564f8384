"""Stage-2 export: the five contracts (clip_text, clip_vision, vae_encoder, vae_decoder, unet), their parity with the
torch reference at explicit tolerances, the fp16 time embedding, scheduler.json against diffusers, the manifest,
`recon-export --stage stage2`, and the refusals (no stage 2, tampered foundation).

One tiny two-stage subject (tests/fixtures.py) is exported once per session with `--stage all`.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch

from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.export.contracts import TRAIN_TIMESTEPS, unet_contract, vae_encoder_contract
from brainrecon.export.stage2 import context_pool
from brainrecon.export.subject import STAGE2_DATA_FILES, export_model_dir
from brainrecon.export.validate import ort_session
from brainrecon.manifest import MANIFEST_FILE, verify_manifest
from brainrecon.model_dir import SCHEDULER as SCHEDULER_FILE
from brainrecon.model_dir import STAGE2_KV_MODELS, STAGE2_MODELS
from brainrecon.train.foundations.dual_unet import set_mix_ratio
from brainrecon.train.reference import Stage2Model
from brainrecon.train.stage1.ridge import renormalize_predictions
from brainrecon.train.stage2.img2img import decode_latents, denoising_timesteps, encode_images, vd_scheduler
from tests.fixtures import build_tiny_stage2, export_tiny_stage2

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TIMESTEPS = (1, 21, 481, 721, 981)  # both ends of the 50-step schedule, and the noisiest step of 1000


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict:
    """The tiny subject's model dir exported with --stage all --precision both (stage 1 + the five stage-2 models)."""
    root = tmp_path_factory.getbasetemp() / "tiny-stage2"
    paths = build_tiny_stage2(root)
    model_dir = export_tiny_stage2(root)
    model = Stage2Model.load(model_dir)
    set_mix_ratio(model.unet, model.sampling.mix_ratio)
    return {"dir": model_dir, "model": model, "paths": paths}


def session(exported: dict, name: str, precision: str):
    return ort_session(exported["dir"] / f"onnx/{name}.{precision}.onnx", threads=1)


def betas(model: Stage2Model, n: int, seed: int = 0) -> np.ndarray:
    return (
        np.random.default_rng(seed).standard_t(5, size=(n, model.clip["text"].A.shape[0])).astype(np.float32)
    )


# ----------------------------------------------------------------------------------------- contracts


def test_unet_contract_layout_profile_and_draws():
    c = unet_contract(4, 8, vision_tokens=65, text_tokens=77, dim=128, mix_ratio=0.6, image_size=64)
    assert c.input_names == ["sample", "timestep", "encoder_hidden_states"] and c.output_names == [
        "noise_pred"
    ]
    assert c.trt_profile() == {
        "sample": {"min": [1, 4, 8, 8], "opt": [32, 4, 8, 8], "max": [128, 4, 8, 8]},
        "timestep": {"min": [1], "opt": [32], "max": [128]},
        "encoder_hidden_states": {"min": [1, 142, 128], "opt": [32, 142, 128], "max": [128, 142, 128]},
    }
    vae = vae_encoder_contract(64, 4, 8, 0.18215)
    assert c.profile.max_batch == 2 * vae.profile.max_batch == 128  # both guidance halves in one call
    big = unet_contract(4, 64, 257, 77, 768, 0.6, image_size=512)
    assert big.profile.max_batch == 2 * vae_encoder_contract(512, 4, 64, 0.18215).profile.max_batch == 32
    spec = c.io_spec()
    assert spec["constants"]["mix_ratio"] == 0.6 and spec["constants"]["vision_tokens"] == 65
    assert "[uncond x B; cond x B]" in spec["constants"]["guidance_layout"]
    pool = np.random.default_rng(0).normal(size=(3, 142, 128)).astype(np.float32)
    x = c.sample_input(6, "realistic", seed=1, pools={"encoder_hidden_states": pool})
    t = x["timestep"]
    assert t.shape == (6,) and t.dtype == np.float32 and np.all(t == np.round(t))
    assert t.min() >= 1 and t.max() < TRAIN_TIMESTEPS and len(set(t.tolist())) > 1
    assert all(any(np.array_equal(row, p) for p in pool) for row in x["encoder_hidden_states"])
    images = vae.sample_input(3, "realistic")["images"]
    assert images.shape == (3, 3, 64, 64) and images.min() >= -1.0 and images.max() <= 1.0
    assert np.abs(np.diff(images, axis=-1)).mean() < 0.1  # smooth, unlike uniform noise (mean |diff| ~ 0.67)
    with pytest.raises(ConfigError, match="pools"):
        c.sample_input(2, "realistic")


# ----------------------------------------------------------------------------------------- export + manifest


def test_export_all_lists_stage2_models_data_and_io_specs(exported):
    model_dir = exported["dir"]
    manifest = verify_manifest(model_dir)  # every hash matches
    summary = json.loads((model_dir / "summary.json").read_text())
    assert [e["model"] for e in summary["exported"]][::2] == [
        "ridge",
        "vdvae_decoder",
        *STAGE2_MODELS,
        *STAGE2_KV_MODELS,
    ]
    model = exported["model"]
    nv, nt, d = (
        model.dual_config.vision_tokens,
        model.dual_config.text_tokens,
        model.dual_config.cross_attention_dim,
    )
    expected_io = {
        "clip_text": ([("betas", ["batch", model.stage1.n_voxels])], [("clip_text", ["batch", nt, d])]),
        "clip_vision": ([("betas", ["batch", model.stage1.n_voxels])], [("clip_vision", ["batch", nv, d])]),
        "vae_encoder": ([("images", ["batch", 3, 64, 64])], [("latents", ["batch", 4, 8, 8])]),
        "vae_decoder": ([("latents", ["batch", 4, 8, 8])], [("images", ["batch", 3, 64, 64])]),
        "unet": (
            [
                ("sample", ["batch", 4, 8, 8]),
                ("timestep", ["batch"]),
                ("encoder_hidden_states", ["batch", nv + nt, d]),
            ],
            [("noise_pred", ["batch", 4, 8, 8])],
        ),
    }
    for name, (inputs, outputs) in expected_io.items():
        for precision in ("fp32", "fp16"):
            entry = manifest.find("onnx", name, precision)
            assert entry is not None and entry.path == f"onnx/{name}.{precision}.onnx" and entry.opset == 17
            assert [(s["name"], s["shape"]) for s in entry.io["inputs"]] == inputs
            assert [(s["name"], s["shape"]) for s in entry.io["outputs"]] == outputs
            assert set(entry.io["profile"]) == {n for n, _ in inputs}
            assert entry.validation["max_abs"] <= entry.validation["max_abs_kept"] + 1e-12
    assert manifest.find("onnx", "unet", "fp32").io["constants"]["mix_ratio"] == model.sampling.mix_ratio
    assert (
        manifest.find("onnx", "vae_decoder", "fp32").io["constants"]["vae_scale_factor"]
        == model.sampling.vae_scale_factor
    )
    assert (
        manifest.find("onnx", "unet", "fp32").io["max_batch"]
        == 2 * manifest.find("onnx", "vae_decoder", "fp32").io["max_batch"]
    )
    data = {a.path for a in manifest.artifacts if a.kind == "data"}
    assert data >= {*STAGE2_DATA_FILES, SCHEDULER_FILE, "preprocess.json", "stage1/latent_mean.npy"}


def test_scheduler_json_matches_diffusers(exported):
    tables = json.loads((exported["dir"] / SCHEDULER_FILE).read_text())
    sampling = exported["model"].sampling
    scheduler = vd_scheduler()
    timesteps = denoising_timesteps(scheduler, sampling.num_inference_steps, sampling.strength)
    assert tables["format"] == "brainrecon.ddim_tables" and tables["version"] == 1
    assert tables["sampling"]["guidance_scale"] == sampling.guidance_scale and tables["step_ratio"] == 20
    assert (
        tables["scheduler"]["beta_schedule"] == "scaled_linear" and tables["scheduler"]["steps_offset"] == 1
    )
    assert tables["scheduler"]["prediction_type"] == "epsilon"
    assert tables["timesteps"] == timesteps.tolist() and tables["timesteps"][:2] == [721, 701]
    assert len(tables["timesteps"]) == 37 and tables["timesteps"][-1] == 1
    alphas = scheduler.alphas_cumprod.numpy()
    np.testing.assert_array_equal(np.float32(tables["alphas_cumprod"]), alphas)
    np.testing.assert_array_equal(np.float32(tables["alpha_t"]), alphas[timesteps.numpy()])
    # what scheduler.step uses for the previous alpha, step by step
    for t, prev_t, alpha_prev in zip(
        timesteps.tolist(), tables["prev_timesteps"], tables["alpha_prev"], strict=True
    ):
        assert prev_t == t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        expected = alphas[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod.item()
        assert np.float32(alpha_prev) == np.float32(expected)
    assert np.float32(tables["final_alpha_cumprod"]) == alphas[0]  # set_alpha_to_one=False


# ----------------------------------------------------------------------------------------- parity


def test_clip_ridges_match_numpy_raw_and_renormalised(exported):
    """fp32 ≤ 1e-5·scale raw. fp16: the runtime re-normalises over the set, which divides by each dimension's
    spread; after it, fp16 must stay within 2% of the target std (measured 0.24%)."""
    model = exported["model"]
    x = betas(model, 12, seed=3)
    for target in ("text", "vision"):
        ridge = model.clip[target]
        ref = ridge.predict(x, renormalize=False)  # (N, T, D)
        scale = np.abs(ref).max()
        out32 = session(exported, f"clip_{target}", "fp32").run(None, {"betas": x})[0]
        assert out32.shape == ref.shape and np.abs(out32 - ref).max() <= 1e-5 * scale
        out16 = session(exported, f"clip_{target}", "fp16").run(None, {"betas": x})[0]
        assert np.abs(out16 - ref).max() <= 1e-3 + 1e-3 * scale
        flat = (len(x), -1)
        renorm_ref = renormalize_predictions(ref.reshape(flat), ridge.target_mean, ridge.target_std)
        renorm16 = renormalize_predictions(out16.reshape(flat), ridge.target_mean, ridge.target_std)
        assert np.abs(renorm16 - renorm_ref).max() <= 2e-2 * ridge.target_std.max()


def test_vae_encoder_matches_encode_images(exported):
    model = exported["model"]
    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    ref = encode_images(model.vae, images, model.sampling.vae_scale_factor).numpy()  # (3, 4, 8, 8)
    x = (images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0).astype(
        np.float32
    )  # the runtime's step
    scale = np.abs(ref).max()
    out32 = session(exported, "vae_encoder", "fp32").run(None, {"images": x})[0]
    assert np.abs(out32 - ref).max() <= 1e-4 * scale
    out16 = session(exported, "vae_encoder", "fp16").run(None, {"images": x})[0]
    assert np.abs(out16 - ref).max() <= 1e-2 * scale and np.median(np.abs(out16 - ref)) <= 1e-3 * scale


def test_vae_decoder_matches_decode_latents_in_uint8(exported):
    """The runtime rounds as decode_latents: fp32 may differ by one level where a value sits on a rounding edge."""
    model = exported["model"]
    scale_factor = model.sampling.vae_scale_factor
    latents = np.random.default_rng(1).standard_normal((4, 4, 8, 8)).astype(np.float32)
    ref = decode_latents(model.vae, torch.from_numpy(latents), scale_factor).astype(int)  # (4, 64, 64, 3)

    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.clip(np.round((x + 1.0) * 127.5), 0, 255).transpose(0, 2, 3, 1).astype(int)

    out32 = to_uint8(session(exported, "vae_decoder", "fp32").run(None, {"latents": latents})[0])
    assert np.abs(out32 - ref).max() <= 1 and (out32 != ref).mean() < 1e-3
    out16 = to_uint8(session(exported, "vae_decoder", "fp16").run(None, {"latents": latents})[0])
    assert np.abs(out16 - ref).max() <= 3 and np.abs(out16 - ref).mean() < 0.2


def test_unet_matches_torch_at_several_timesteps_and_batches(exported):
    """Each timestep is a graph input, not a traced constant: ORT follows torch at t = 1 ... 981, batch 1 and 4
    (four different timesteps in one call, as rows of one batch), and its output moves with t."""
    model = exported["model"]
    pool = context_pool(model)  # uncond + predicted contexts, vision tokens first
    rng = np.random.default_rng(2)
    sample = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    context = pool[[0, 3, 0, 5]]
    sessions = {p: session(exported, "unet", p) for p in ("fp32", "fp16")}

    def both(x: np.ndarray, t: np.ndarray, ctx: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with torch.no_grad():
            ref = model.unet(
                torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)
            ).sample
        feeds = {"sample": x, "timestep": t, "encoder_hidden_states": ctx}
        return ref.numpy(), {p: s.run(None, feeds)[0] for p, s in sessions.items()}

    outputs = {}
    for t in TIMESTEPS:
        for batch in (1, 4):
            ref, out = both(sample[:batch], np.full(batch, t, np.float32), context[:batch])
            scale = np.abs(ref).max()
            assert np.abs(out["fp32"] - ref).max() <= 1e-4 * scale, (t, batch)
            diff16 = np.abs(out["fp16"] - ref)
            assert diff16.max() <= 2e-2 * scale and np.median(diff16) <= 1e-3 * scale, (t, batch)
        outputs[t] = out["fp32"]
    # per-row timesteps in one call equal the rows computed alone
    mixed_t = np.array([1, 981, 481, 21], np.float32)
    ref, out = both(sample, mixed_t, context)
    assert np.abs(out["fp32"] - ref).max() <= 1e-4 * np.abs(ref).max()
    for row, t in enumerate(mixed_t):
        np.testing.assert_allclose(out["fp32"][row], outputs[int(t)][row], atol=1e-5 * np.abs(ref).max())
    assert np.abs(outputs[1] - outputs[981]).max() > 100 * 1e-4 * np.abs(outputs[1]).max()


def test_fp16_unet_keeps_the_timestep_embedding_fp32(exported):
    """sin/cos(t·f) at t = 981 in fp16 would be off by up to 0.5 rad; the timestep's subgraph stays fp32 and has no
    fp16 round trip between its nodes."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(exported["dir"] / "onnx/unet.fp16.onnx")))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types |= {t.name: t.data_type for t in graph.initializer}
    trig = [n for n in graph.node if n.op_type in ("Sin", "Cos")]
    assert len(trig) == 2 and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in trig)
    producer = {o: n for n in graph.node for o in n.output}
    reached_input = False
    for node in trig:  # back along the float tensors to the timestep input: never through fp16
        frontier = list(node.input)
        while frontier:
            name = frontier.pop()
            assert types.get(name) != onnx.TensorProto.FLOAT16, name
            reached_input |= name == "timestep"
            if name in producer and types.get(name) == onnx.TensorProto.FLOAT:
                frontier += list(producer[name].input)
    assert reached_input
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)  # the rest did convert


# ----------------------------------------------------------------------------------------- CLI and refusals


def run_cli(monkeypatch, *args: str) -> int:
    from brainrecon.cli.deploy import export_main

    monkeypatch.setattr(sys, "argv", ["recon-export", *args])
    with pytest.raises(SystemExit) as e:
        export_main()
    return e.value.code


def test_recon_export_stage2_cli(exported, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "m"
    shutil.copytree(exported["paths"]["model"], model_dir)
    assert (
        run_cli(monkeypatch, "--model-dir", str(model_dir), "--stage", "stage2", "--precision", "fp32") == 0
    )
    out = capsys.readouterr().out
    assert all(f"{name} fp32" in out for name in (*STAGE2_MODELS, *STAGE2_KV_MODELS))
    manifest = verify_manifest(model_dir)
    onnx_models = {a.model for a in manifest.artifacts if a.kind == "onnx"}
    assert onnx_models == {*STAGE2_MODELS, *STAGE2_KV_MODELS}  # no stage 1
    assert (model_dir / SCHEDULER_FILE).is_file()


def test_stage2_export_without_stage2_is_a_one_line_error(exported, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "stage1-only"
    shutil.copytree(exported["paths"]["model"], model_dir, ignore=shutil.ignore_patterns("stage2"))
    with pytest.raises(MissingFileError, match="recon-train subject --stage clip"):
        export_model_dir(model_dir, stage="stage2")
    assert run_cli(monkeypatch, "--model-dir", str(model_dir), "--stage", "stage2") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stage2/stage2.json" in err
    assert not (model_dir / MANIFEST_FILE).exists()


def test_tampered_stage2_foundation_is_refused(exported, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "tampered"
    shutil.copytree(exported["dir"], model_dir)
    summary_path = model_dir / "stage2/stage2.json"
    summary = json.loads(summary_path.read_text())
    summary["foundation"]["vae"]["sha256"] = "0" * 64
    summary_path.write_text(json.dumps(summary))
    manifest_before = (model_dir / MANIFEST_FILE).read_bytes()
    with pytest.raises(InputError, match="sha256"):
        export_model_dir(model_dir, stage="stage2")
    assert run_cli(monkeypatch, "--model-dir", str(model_dir), "--stage", "all") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sha256 000000000000" in err
    assert (model_dir / MANIFEST_FILE).read_bytes() == manifest_before  # nothing exported


def test_missing_stage2_data_file_is_named(exported, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(exported["paths"]["model"], model_dir)
    (model_dir / "stage2/uncond_text.npy").unlink()
    with pytest.raises(MissingFileError, match="uncond_text.npy"):
        export_model_dir(model_dir, stage="all")
