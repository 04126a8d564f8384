"""Export layer: contracts, ONNX export + fp16 + checker + validation, atomic publication, external data, manifest,
engine keys (pure) and TensorRT builds (marked trt).

The model dirs are the tiny stage-1 subject's (conftest's `tiny`, built once per session by
tests/fixtures.py build_tiny_stage1: both regressors, exported with both precisions).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from brainrecon.errors import ConfigError, InputError
from brainrecon.export.contracts import Tolerance, gru_contract, ridge_contract, vdvae_decoder_contract
from brainrecon.export.onnx_export import check_onnx
from brainrecon.export.stage1 import build_ridge_onnx
from brainrecon.export.subject import export_model_dir
from brainrecon.export.validate import (
    GraphCheckError,
    ParityError,
    check_gru_linear_before_reset,
    ort_session,
    validate_onnx,
)
from brainrecon.manifest import MANIFEST_FILE, load_manifest, verify_manifest
from brainrecon.runtime.backends.tensorrt import (
    EngineKey,
    EngineMismatchError,
    MachineInfo,
    check_engine_key,
    key_mismatches,
    select_engine,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def copy_model_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------- contracts


def test_contract_shapes_profiles_and_sample_inputs():
    c = gru_contract(n_voxels=300, latent_dims=50)
    assert c.input_names == ["betas"] and c.output_names == ["vdvae_latents"]
    assert c.dynamic_axes() == {"betas": {0: "batch"}, "vdvae_latents": {0: "batch"}}
    assert c.trt_profile() == {"betas": {"min": [1, 300], "opt": [64, 300], "max": [256, 300]}}
    assert c.exporter == "torchscript" and c.opset == 17
    x = c.sample_input(5, "realistic", seed=3)["betas"]
    assert x.shape == (5, 300) and x.dtype == np.float32
    np.testing.assert_array_equal(x, c.sample_input(5, "realistic", seed=3)["betas"])  # seeded
    assert np.abs(x).max() > 1.5  # heavy-tailed z-scored betas, unlike uniform(-1, 1)
    assert np.abs(c.sample_input(5, "random")["betas"]).max() <= 1.0
    d = vdvae_decoder_contract(latent_dims=324, image_size=64)
    assert d.outputs[0].concrete(3) == (3, 64, 64, 3)
    mean, std = np.full(324, 5.0, np.float32), np.full(324, 0.01, np.float32)
    z = d.sample_input(4, "realistic", stats={"vdvae_latents": (mean, std)})["vdvae_latents"]
    assert abs(z.mean() - 5.0) < 0.01
    assert ridge_contract(300, 50).exporter == "onnx_helper"
    spec = c.io_spec()
    assert spec["max_batch"] == 256 and spec["inputs"][0]["shape"] == ["batch", 300]


def test_tolerance_max_median_and_outliers():
    ref = np.linspace(-1, 1, 1000)
    ok, stats = Tolerance(atol=1e-5, rtol=1e-4).check(ref, ref + 5e-5)
    assert ok and stats["scale"] == 1.0
    assert not Tolerance(atol=1e-5, rtol=1e-5).check(ref, ref + 5e-5)[0]
    flipped = ref.copy()
    flipped[:3] += 100.0  # three argmax-like outliers
    assert not Tolerance(atol=0.1).check(ref, flipped)[0]
    assert Tolerance(atol=0.1, outlier_fraction=1e-2).check(ref, flipped)[0]
    # every value moved a little: the max bound allows it, the median bound does not
    assert not Tolerance(atol=1.0, median_rtol=1e-3).check(ref, ref + 0.01)[0]


# ----------------------------------------------------------------------------------------- export


def test_export_writes_checked_validated_files_and_manifest(tiny):
    for regressor in ("gru", "ridge"):
        model_dir = tiny[regressor]
        manifest = verify_manifest(model_dir)  # every hash matches
        assert manifest.manifest_version == 1
        assert manifest.preprocess == json.loads((model_dir / "preprocess.json").read_text())
        assert manifest.producer["torch"] and manifest.producer["onnx"] and manifest.producer["onnxruntime"]
        for model in (regressor, "vdvae_decoder"):
            for precision in ("fp32", "fp16"):
                entry = manifest.find("onnx", model, precision)
                assert entry is not None and entry.path == f"onnx/{model}.{precision}.onnx"
                assert entry.opset == 17 and entry.io["max_batch"] >= 64
                assert entry.validation["max_abs"] >= 0 and entry.validation["batches"]
                check_onnx(model_dir / entry.path)
        assert {a.path for a in manifest.artifacts if a.kind == "data"} >= {
            "preprocess.json",
            "stage1/latent_mean.npy",
            "mask_indices.npy",
        }
        assert not list(model_dir.glob(".export-*.tmp"))  # staging (export/subject.py staging_root) removed


def test_export_summary_says_engines_were_skipped(tiny, tmp_path):
    model_dir = copy_model_dir(tiny["ridge"], tmp_path / "m")
    summary = export_model_dir(model_dir, stage="ridge", precision="fp32", validate=False)
    assert [e["model"] for e in summary["exported"]] == ["ridge"]
    assert summary["exported"][0]["validation"].startswith("skipped")
    engines = summary["engines"]
    if not engines["built"]:
        assert "skipped" in engines["skipped"] and "TensorRT" in engines["skipped"]
    # the other models' entries survive a partial re-export
    assert load_manifest(model_dir).find("onnx", "vdvae_decoder", "fp16") is not None


def test_gru_graph_semantics_and_parity_at_two_scales(tiny):
    """The GRU gets extra scrutiny: structure, random and realistic-scale inputs, batches 1/2/5/17, input dependence."""
    from brainrecon.train.stage1.gru import load_gru

    model_dir = tiny["gru"]
    graph = onnx.load(str(model_dir / "onnx/gru.fp32.onnx"))
    grus = [n for n in graph.graph.node if n.op_type == "GRU"]
    assert len(grus) == 2 and all(
        next(a.i for a in n.attribute if a.name == "linear_before_reset") == 1 for n in grus
    )
    module = load_gru(model_dir / "stage1", "gru")
    session = ort_session(model_dir / "onnx/gru.fp32.onnx")
    contract = gru_contract(module.config.n_voxels, module.config.n_outputs)
    for kind in ("random", "realistic"):
        for batch in (1, 2, 5, 17):
            x = contract.sample_input(batch, kind, seed=batch)["betas"]
            with torch.no_grad():
                ref = module(torch.from_numpy(x)).numpy()
            out = session.run(None, {"betas": x})[0]
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
            if batch > 1:  # a constant graph would pass the comparison if the model barely moves
                assert np.abs(out - out[:1]).max() > 1e-3 * np.abs(out).max()
    report = load_manifest(model_dir).find("onnx", "gru", "fp32").validation
    assert report["input_kinds"] == ["random", "realistic"] and report["max_abs"] < 1e-4


def test_fp16_graph_keeps_normalisations_and_output_layer_fp32(tiny):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny["gru"] / "onnx/gru.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    types |= {t.name: t.data_type for t in model.graph.initializer}
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    norms = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "BatchNormalization")]
    assert norms and all(types[n.input[0]] == F32 for n in norms)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = producer["vdvae_latents"]  # keep_io_types' fp16 → fp32 output cast pair is gone: no fp16 rounding
    assert out.op_type == "Identity", out.op_type
    last = producer[out.input[0]]
    assert last.op_type == "Gemm" and all(types[i] == F32 for i in last.input)
    assert any(t.data_type == F16 for t in model.graph.initializer)  # the GRU weights did convert
    assert model.graph.input[0].type.tensor_type.elem_type == F32  # keep_io_types


def test_parity_error_reports_max_median_model_precision_batch(tiny):
    model_dir = tiny["ridge"]
    contract = ridge_contract(int(np.load(model_dir / "voxel_mean.npy").shape[0]), 324)
    from brainrecon.train.stage1.ridge import RidgeRegressor

    reg = RidgeRegressor.load(model_dir / "stage1", "ridge")
    wrong = lambda inputs: {"vdvae_latents": reg.predict(inputs["betas"]) + 0.5}  # noqa: E731
    with pytest.raises(ParityError) as err:
        validate_onnx(contract, model_dir / "onnx/ridge.fp32.onnx", wrong, "fp32")
    msg = str(err.value)
    assert (
        "\n" not in msg and "ridge fp32 batch 1" in msg and "max abs diff 0.5" in msg and "median 0.5" in msg
    )


def test_constant_graph_is_caught(tmp_path):
    """Zero weights: ORT and the reference agree exactly, but the outputs ignore the input."""
    coef, intercept = np.zeros((20, 6), np.float32), np.arange(6, dtype=np.float32)
    build_ridge_onnx(coef, intercept, tmp_path / "r.onnx", "fp32")
    reference = lambda inputs: {"vdvae_latents": np.tile(intercept, (len(inputs["betas"]), 1))}  # noqa: E731
    with pytest.raises(GraphCheckError, match="identical outputs"):
        validate_onnx(ridge_contract(20, 6), tmp_path / "r.onnx", reference, "fp32")


def test_wrong_gru_semantics_are_caught(tiny):
    graph = onnx.load(str(tiny["gru"] / "onnx/gru.fp32.onnx"))
    for node in graph.graph.node:
        for attr in node.attribute:
            if attr.name == "linear_before_reset":
                attr.i = 0
    with pytest.raises(GraphCheckError, match="linear_before_reset=1"):
        check_gru_linear_before_reset(graph, "gru.fp32.onnx")


def test_ridge_fp16_survives_tiny_weights(tmp_path):
    """alpha 5e4 ridge weights sit below fp16's normal range; per-column power-of-two scaling keeps them."""
    rng = np.random.default_rng(0)
    coef = (rng.normal(size=(300, 40)) * 1e-7).astype(np.float32)
    intercept = (rng.normal(size=40) * 1e-6).astype(np.float32)  # same scale: float32 sums stay exact enough
    x = rng.standard_t(5, size=(8, 300)).astype(np.float32)
    build_ridge_onnx(coef, intercept, tmp_path / "r16.onnx", "fp16")
    check_onnx(tmp_path / "r16.onnx")
    out = ort_session(tmp_path / "r16.onnx").run(None, {"betas": x})[0]
    signal = x @ coef  # the trial-dependent part, ~1e-6, that re-normalisation will magnify
    np.testing.assert_allclose(out - intercept, signal, rtol=0, atol=2e-3 * np.abs(signal).max())
    plain_cast_error = np.abs(coef.astype(np.float16).astype(np.float32) - coef).mean() / np.abs(coef).mean()
    assert plain_cast_error > 0.1  # what a plain fp16 cast of these weights would have done


def test_external_data_path_for_both_exporters(tiny, tmp_path):
    """Real ridge (1.43 B weights) exceeds 2 GB; a threshold of 0 forces the same path on the tiny models."""
    for regressor in ("ridge", "gru"):
        model_dir = copy_model_dir(tiny[regressor], tmp_path / regressor)
        summary = export_model_dir(model_dir, stage=regressor, precision="both", external_data_threshold=0)
        for exported in summary["exported"]:
            onnx_file = model_dir / exported["path"]
            data = onnx_file.with_name(onnx_file.name + ".data")
            assert exported["external_data"] == [data.relative_to(model_dir).as_posix()]
            assert data.stat().st_size > 10 * onnx_file.stat().st_size  # weights live outside the protobuf
            assert exported["validation"]["max_abs"] >= 0  # ORT loaded and validated it
        manifest = verify_manifest(model_dir)
        assert manifest.find("onnx_data", regressor, "fp16") is not None
        # back below the threshold: the stale data file goes
        export_model_dir(model_dir, stage=regressor, precision="fp32")
        assert not (model_dir / f"onnx/{regressor}.fp32.onnx.data").exists()


def test_the_exporters_per_tensor_files_do_not_stay_beside_the_onnx(tiny, tmp_path, monkeypatch):
    """Above 2 GB torch.onnx.export writes one file per tensor beside the .onnx (about 760 for the real UNet);
    the export keeps only `<file>.onnx` + `<file>.onnx.data`. The 2 GB switch is inside torch's C++ exporter and
    cannot be lowered, so the exporter is wrapped: the real export, then its model re-saved with onnx's
    one-file-per-tensor layout at the same path, which is what torch itself writes above 2 GB."""
    import brainrecon.export.onnx_export as onnx_export
    from brainrecon.export.subject import load_sources

    real_export = torch.onnx.export

    def export_like_above_2gb(module, args, f, *a, **kw):
        real_export(module, args, f, *a, **kw)
        model = onnx.load(f)
        onnx.save_model(model, f, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)

    monkeypatch.setattr(torch.onnx, "export", export_like_above_2gb)
    (source,) = load_sources(tiny["gru"], ["gru"])
    staging = tmp_path / "staging"
    staging.mkdir()
    staged = onnx_export.stage_contract(source, staging, ("fp32", "fp16"), True, external_threshold=0)
    assert sorted(p.name for p in staging.iterdir()) == [
        "gru.fp16.onnx",
        "gru.fp16.onnx.data",
        "gru.fp32.onnx",
        "gru.fp32.onnx.data",
    ]
    assert [f.validation["max_abs"] >= 0 for f in staged] == [True, True]  # loadable without the tensor files


def test_failed_validation_leaves_previous_files_and_no_partial_file(tiny, tmp_path, monkeypatch):
    import brainrecon.export.onnx_export as onnx_export

    model_dir = copy_model_dir(tiny["gru"], tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (model_dir / "onnx").iterdir()}
    manifest_before = (model_dir / MANIFEST_FILE).read_bytes()
    calls = []
    real = onnx_export.validate_onnx

    def fail_on_fp16(contract, path, *args, **kwargs):
        calls.append(path.name)
        if "fp16" in path.name:
            raise ParityError(
                contract.name,
                "fp16",
                1,
                "x",
                "random",
                dict.fromkeys(("max_abs", "max_abs_kept", "median_abs", "scale"), 1.0),
                "test",
            )
        return real(contract, path, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "validate_onnx", fail_on_fp16)
    with pytest.raises(ParityError):
        export_model_dir(model_dir, stage="gru", precision="both")
    assert calls == ["gru.fp32.onnx", "gru.fp16.onnx"]  # fp32 passed; nothing published before fp16 failed
    assert {p.name: p.read_bytes() for p in (model_dir / "onnx").iterdir()} == before
    assert (model_dir / MANIFEST_FILE).read_bytes() == manifest_before

    fresh = tmp_path / "fresh"
    shutil.copytree(tiny["gru"], fresh, ignore=shutil.ignore_patterns("onnx", MANIFEST_FILE))
    import brainrecon.export.fp16 as fp16

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # an export killed midway

    monkeypatch.setattr(fp16, "convert_to_fp16", killed)
    with pytest.raises(KeyboardInterrupt):
        export_model_dir(fresh, stage="gru", precision="both")
    assert not (fresh / "onnx").exists() and not (fresh / MANIFEST_FILE).exists()
    assert not list(fresh.glob(".export-*"))  # the staging folder is gone too


def test_failed_engine_build_leaves_the_previous_export_loadable(tiny, tmp_path, monkeypatch):
    """A failure after the ONNX files and scheduler are staged (here: the TensorRT build) publishes nothing."""
    import brainrecon.export.tensorrt as tensorrt
    from brainrecon.export.tensorrt import EngineBuildError
    from brainrecon.runtime import Reconstructor

    model_dir = copy_model_dir(tiny["gru"], tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (model_dir / "onnx").iterdir()}
    manifest_before = (model_dir / MANIFEST_FILE).read_bytes()

    def failing_build(root, model_dir_, onnx_artifacts):
        assert (root / onnx_artifacts[0].path).is_file()  # the new ONNX files exist, staged
        raise EngineBuildError("TensorRT could not parse the ONNX model (test)")

    monkeypatch.setattr(tensorrt, "build_engines_for", failing_build)
    with pytest.raises(EngineBuildError):
        export_model_dir(model_dir, stage="gru", precision="both", validate=False)
    assert {p.name: p.read_bytes() for p in (model_dir / "onnx").iterdir()} == before
    assert (model_dir / MANIFEST_FILE).read_bytes() == manifest_before
    assert not list(model_dir.glob(".export-*"))
    Reconstructor.open(model_dir, stage=1).close()  # verifies every hash: the old export still loads


def test_crash_while_publishing_leaves_no_manifest_not_a_mixed_export(tiny, tmp_path, monkeypatch):
    import brainrecon.export.subject as subject
    from brainrecon.errors import MissingFileError
    from brainrecon.runtime import Reconstructor

    model_dir = copy_model_dir(tiny["gru"], tmp_path / "m")
    real_replace, moved = subject.os.replace, []

    def crash_after_first_move(src, dst):
        if Path(dst).parent == model_dir / "onnx":  # a staged ONNX file being published
            if moved:
                raise KeyboardInterrupt  # killed in the middle of publishing
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(subject.os, "replace", crash_after_first_move)
    with pytest.raises(KeyboardInterrupt):
        export_model_dir(model_dir, stage="gru", precision="both", validate=False)
    assert moved and not (model_dir / MANIFEST_FILE).exists()
    with pytest.raises(MissingFileError, match="recon-export"):
        Reconstructor.open(model_dir, stage=1)


def test_reexport_drops_entries_of_files_that_are_gone_and_keeps_the_others(tiny, tmp_path):
    model_dir = copy_model_dir(tiny["gru"], tmp_path / "m")
    (model_dir / "onnx" / "vdvae_decoder.fp16.onnx").unlink()
    export_model_dir(model_dir, stage="gru", precision="fp32", validate=False)
    paths = {a.path for a in load_manifest(model_dir).artifacts}
    assert "onnx/vdvae_decoder.fp16.onnx" not in paths  # its file is gone
    assert {"onnx/vdvae_decoder.fp32.onnx", "onnx/gru.fp16.onnx", "onnx/gru.fp32.onnx"} <= paths  # kept
    verify_manifest(model_dir)


def test_an_unreadable_old_manifest_is_replaced_with_a_warning(tiny, tmp_path):
    from brainrecon.manifest import ManifestWarning

    model_dir = copy_model_dir(tiny["gru"], tmp_path / "m")
    (model_dir / MANIFEST_FILE).write_text('{"manifest_version": 0, "artifacts": []}')
    with pytest.warns(ManifestWarning, match="manifest_version"):
        export_model_dir(model_dir, stage="gru", precision="fp32", validate=False)
    assert {a.model for a in load_manifest(model_dir).artifacts if a.kind == "onnx"} == {"gru"}


def test_export_refuses_bad_stage_and_precision(tiny):
    with pytest.raises(InputError, match="a ridge stage-1 regressor"):
        export_model_dir(tiny["gru"], stage="ridge")
    with pytest.raises(ConfigError):
        export_model_dir(tiny["gru"], precision="int8")
    with pytest.raises(ConfigError):
        export_model_dir(tiny["gru"], stage="stage3")


def test_recon_export_cli_verify_and_export(tiny, tmp_path, monkeypatch, capsys):
    from brainrecon.cli.deploy import export_main

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["recon-export", *args])
        with pytest.raises(SystemExit) as e:
            export_main()
        return e.value.code

    assert run("--model-dir", str(tiny["ridge"]), "--verify") == 0
    model_dir = copy_model_dir(tiny["ridge"], tmp_path / "m")
    assert run("--model-dir", str(model_dir), "--stage", "vdvae", "--precision", "fp32", "--no-validate") == 0
    assert "vdvae_decoder fp32" in capsys.readouterr().out
    with open(model_dir / "onnx/ridge.fp16.onnx", "ab") as f:
        f.write(b"\0")
    assert run("--model-dir", str(model_dir), "--verify") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sha256" in err and "recon-export --model-dir" in err
    assert run("--model-dir", str(model_dir), "--stage", "nope") == 2


# ----------------------------------------------------------------------------------------- engine keys (pure)

MACHINE = MachineInfo(tensorrt_version="10.13.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
PROFILE = {"betas": {"min": [1, 300], "opt": [64, 300], "max": [256, 300]}}


def test_engine_key_roundtrip_digest_and_mismatch_message():
    key = EngineKey.for_machine("ab" * 32, "fp16", PROFILE, MACHINE)
    assert EngineKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key
    assert key.digest() == EngineKey.for_machine("ab" * 32, "fp16", PROFILE, MACHINE).digest()
    other = EngineKey.for_machine(
        "ab" * 32, "fp16", PROFILE, MachineInfo("10.9.0", "NVIDIA A100-SXM4-80GB", "8.0")
    )
    assert key.digest() != other.digest()
    problems = key_mismatches(other, key)
    assert problems == [
        "TensorRT: engine 10.9.0, this machine 10.13.0",
        "GPU: engine NVIDIA A100-SXM4-80GB, this machine NVIDIA H100 80GB HBM3",
        "compute capability: engine 8.0, this machine 9.0",
    ]
    check_engine_key(key, key, "e.plan", "engines/subj01")  # same key: fine
    with pytest.raises(EngineMismatchError) as err:
        check_engine_key(other, key, "e.plan", "engines/subj01")
    msg = str(err.value)
    assert "\n" not in msg and "compute capability: engine 8.0" in msg
    assert "recon-export --model-dir engines/subj01 --stage all" in msg


def test_engine_key_detects_stale_onnx_precision_and_profile():
    key = EngineKey.for_machine("ab" * 32, "fp16", PROFILE, MACHINE)
    bigger = {"betas": {"min": [1, 300], "opt": [64, 300], "max": [512, 300]}}
    for changed in (
        EngineKey.for_machine("cd" * 32, "fp16", PROFILE, MACHINE),
        EngineKey.for_machine("ab" * 32, "fp32", PROFILE, MACHINE),
        EngineKey.for_machine("ab" * 32, "fp16", bigger, MACHINE),
    ):
        assert len(key_mismatches(changed, key)) == 1


def test_select_engine_prefers_the_matching_entry():
    from brainrecon.manifest import Artifact

    here = EngineKey.for_machine("ab" * 32, "fp16", PROFILE, MACHINE)
    there = EngineKey.for_machine("ab" * 32, "fp16", PROFILE, MachineInfo("10.13.0", "NVIDIA L4", "8.9"))

    def entry(key: EngineKey) -> Artifact:
        return Artifact(
            f"trt/gru.fp16.{key.digest()[:12]}.plan",
            "0" * 64,
            1,
            "engine",
            model="gru",
            precision="fp16",
            engine_key=key.to_dict(),
        )

    assert select_engine([entry(there), entry(here)], here, "m") == entry(here)
    with pytest.raises(EngineMismatchError, match="GPU: engine NVIDIA L4"):
        select_engine([entry(there)], here, "m")
    with pytest.raises(EngineMismatchError, match="no TensorRT engine"):
        select_engine([], here, "m")


# ----------------------------------------------------------------------------------------- TensorRT (GPU only)


@pytest.mark.trt
def test_tensorrt_engines_build_and_match_onnx_runtime(tiny, tmp_path):
    from brainrecon.runtime import Reconstructor, RuntimeOptions

    model_dir = copy_model_dir(tiny["gru"], tmp_path / "m")
    summary = export_model_dir(model_dir, stage="all", precision="both")
    assert len(summary["engines"]["built"]) == 4 and summary["engines"]["skipped"] is None
    betas = np.load(tiny["prep"] / "test_betas.npy")
    for precision, mean_tol in (("fp32", 0.05), ("fp16", 0.5)):
        ort = Reconstructor.open(model_dir, RuntimeOptions(precision=precision), stage=1).reconstruct(betas)
        trt = Reconstructor.open(model_dir, RuntimeOptions("trt", precision), stage=1).reconstruct(betas)
        assert np.abs(ort.images.astype(int) - trt.images.astype(int)).mean() <= mean_tol
    again = export_model_dir(model_dir, stage="all", precision="both")  # reused: same key, intact bytes
    assert again["engines"]["reused"] == summary["engines"]["built"] and again["engines"]["built"] == []
