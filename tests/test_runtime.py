"""Lean runtime: parity with the torch reference, recon-infer end to end (npy, NIfTI, HDF5), bad inputs, manifest
verification, provider fallback, and the no-torch guarantee.

Pixel parity tolerances (uint8 images, |ORT − torch| per pixel, in grey levels of 1/255), on the tiny model dirs
of tests/fixtures.py, test and train betas of both regressors:
- fp32: mean ≤ 0.01 level and ≥ 99.99 % of pixels within 1 level (measured: mean 0 to 7e-6, max 1 level: a
  rounding tie of `rint`);
- fp16: mean ≤ 0.25 level and ≥ 99 % of pixels within 1 level (measured: mean 0.056–0.060, 99.9 % within 1
  level; the rest are DmoL argmax near-ties that pick another mixture component, up to 52 levels).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from brainrecon.errors import InputError, MissingFileError
from brainrecon.manifest import MANIFEST_FILE, ManifestError, load_manifest, verify_manifest
from brainrecon.runtime import Reconstructor, RuntimeOptions
from brainrecon.runtime.backends.base import ModelIO
from brainrecon.runtime.backends.ort import OrtBackend, ProviderError
from brainrecon.runtime.backends.tensorrt import EngineKey, EngineMismatchError, MachineInfo
from brainrecon.runtime.infer import run_inference
from brainrecon.runtime.inputs import parse_trials
from tests.fixtures import build_tiny_stage1

PIXEL_TOLERANCE = {"fp32": (0.01, 0.9999), "fp16": (0.25, 0.99)}  # (mean |diff| levels, share within 1 level)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_stage1(tmp_path_factory.getbasetemp() / "tiny-stage1")


@pytest.fixture(scope="module")
def test_betas(tiny) -> np.ndarray:
    return np.load(tiny["prep"] / "test_betas.npy")


def stage1(model_dir: Path, engine: str = "ort", precision: str = "fp32") -> Reconstructor:
    """The runtime's stage 1 on `model_dir` (a stage-1 folder, or the stage-1 half of a stage-2 one)."""
    return Reconstructor.open(model_dir, RuntimeOptions(engine=engine, precision=precision), stage=1)


def run_cli(monkeypatch, *args: str) -> int:
    from brainrecon.cli.deploy import infer_main

    monkeypatch.setattr(sys, "argv", ["recon-infer", *args])
    with pytest.raises(SystemExit) as e:
        infer_main()
    return e.value.code


def assert_one_line_failure(monkeypatch, capsys, out: Path, *args: str, match: str) -> str:
    """CLI exit 1, a one-line error containing `match`, and nothing at --out."""
    code = run_cli(monkeypatch, *args, "--out", str(out))
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("error:") and match in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return err


# ----------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("regressor", ["gru", "ridge"])
def test_pipeline_matches_torch_reference(tiny, regressor):
    import torch

    from brainrecon.train.reference import Stage1Model

    torch.set_num_threads(1)
    reference = Stage1Model.load(tiny[regressor])
    sets = [np.load(tiny["prep"] / f"{split}_betas.npy") for split in ("test", "train")]
    expected = [reference.reconstruct(b) for b in sets]
    for precision, (mean_tol, within_tol) in PIXEL_TOLERANCE.items():
        rec = stage1(tiny[regressor], "ort", precision)
        for betas, ref in zip(sets, expected, strict=True):
            result = rec.reconstruct(betas, batch_size=7)  # several batches, a ragged last one
            assert result.images.shape == ref.shape and result.images.dtype == np.uint8
            assert result.images is result.stage1_images and result.final_images is None
            diff = np.abs(result.images.astype(int) - ref.astype(int))
            assert diff.mean() <= mean_tol and (diff <= 1).mean() >= within_tol, (precision, diff.mean())
            assert result.renormalized == {"stage1": True}
            assert result.providers[regressor] == ["CPUExecutionProvider"]
            assert result.batch_sizes == {"regressor": 7, "decoder": 7}
            assert set(result.timings) >= {"regressor_s", "renormalize_s", "decoder_s", "total_s"}


def test_single_trial_skips_the_renormalisation(tiny, test_betas):
    """The rule of both stages (stage 2's: tests/test_runtime_stage2.py): renormalize=None skips the
    re-normalisation for a single trial (a set of one has no statistics) and records it, giving the images of
    renormalize=False; renormalize=True refuses a single trial in one line, before any model runs."""
    rec = stage1(tiny["gru"])
    one = rec.reconstruct(test_betas[4:5])
    assert one.renormalized == {"stage1": False}
    np.testing.assert_array_equal(one.images, rec.reconstruct(test_betas[4:5], renormalize=False).images)
    calls = []
    with pytest.raises(InputError, match="at least 2 trials") as e:
        rec.reconstruct(test_betas[4:5], renormalize=True, progress=lambda *a: calls.append(a))
    assert "\n" not in str(e.value) and calls == []
    assert rec.reconstruct(test_betas[4:6]).renormalized == {"stage1": True}


def test_recon_infer_npy_with_stimuli_and_trial_selection(tiny, test_betas, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = [str(tiny["prep"] / "test_betas.npy"), "--model-dir", str(tiny["gru"]), "--out", str(out)]
    args += ["--stimuli", str(tiny["prep"] / "test_images.npy"), "--trials", "0,2-4", "--batch-size", "3"]
    assert run_cli(monkeypatch, *args) == 0
    assert "recon-infer stage 1" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir() if p.name != ".brainrecon-output")  # io.OUTPUT_MARKER
    assert names == [
        "contact_sheet.png",
        *[f"stage1_{t:05d}.png" for t in (0, 2, 3, 4)],
        "stage1_images.npy",
        "summary.json",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == [0, 2, 3, 4] and summary["batch_size"] == 3
    assert summary["providers"] == {
        "gru": ["CPUExecutionProvider"],
        "vdvae_decoder": ["CPUExecutionProvider"],
    }
    assert summary["timings"]["decoder_s"] > 0 and summary["cpu_fallback"] is None
    expected = stage1(tiny["gru"]).reconstruct(test_betas[[0, 2, 3, 4]]).images
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(out / "stage1_00003.png")), expected[2])
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] > 2 * 90  # two rows: ground truth and reconstruction


def _session_file(tiny) -> Path:
    return next((tiny["sim"] / "nsddata_betas").rglob("betas_session01.nii.gz"))


def test_recon_infer_nifti_and_hdf5_apply_the_recorded_preprocessing(tiny, tmp_path):
    from brainrecon.data.nsd import zscore_session

    session = _session_file(tiny)
    raw = np.asarray(nib.load(session).dataobj)  # (X, Y, Z, T) int16
    model_dir = tiny["ridge"]
    mask = np.load(model_dir / "mask_indices.npy")
    masked = raw.reshape(-1, raw.shape[-1])[mask].T / np.float32(300.0)  # (T, V) percent signal change
    voxel_mean, voxel_std = np.load(model_dir / "voxel_mean.npy"), np.load(model_dir / "voxel_std.npy")
    expected_betas = (zscore_session(masked) - voxel_mean) / voxel_std
    trials = [1, 4, 5, 6, 9]
    expected = stage1(model_dir).reconstruct(expected_betas[trials].astype(np.float32)).images

    h5_txyz, h5_tzyx = tmp_path / "betas_txyz.hdf5", tmp_path / "betas_session01.hdf5"
    with h5py.File(h5_txyz, "w") as f:
        f.create_dataset("betas", data=np.moveaxis(raw, -1, 0))  # trials x X x Y x Z
    with h5py.File(h5_tzyx, "w") as f:
        # trials x Z x Y x X: how NSD's MATLAB-written files read in h5py
        f.create_dataset("betas", data=np.moveaxis(raw, -1, 0).transpose(0, 3, 2, 1))
    for name, path in (("nifti", session), ("h5_txyz", h5_txyz), ("h5_tzyx", h5_tzyx)):
        out = tmp_path / f"out-{name}"
        summary = run_inference(path, model_dir, out, trials="1,4-6,9")
        assert (
            summary["input"]["format"] in ("nifti", "hdf5")
            and summary["input"]["trials_in_file"] == raw.shape[-1]
        )
        from PIL import Image

        got = np.stack([np.asarray(Image.open(out / f"stage1_{t:05d}.png")) for t in trials])
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_parse_trials():
    np.testing.assert_array_equal(parse_trials("0,5,10-12", 20), [0, 5, 10, 11, 12])
    np.testing.assert_array_equal(parse_trials(None, 3), [0, 1, 2])
    for bad, match in (("3-1", "ranges"), ("x", "ranges"), ("25", "indices in"), ("1,1", "each trial once")):
        with pytest.raises(InputError, match=match):
            parse_trials(bad, 20)


# ----------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "case, match",
    [
        ("voxels", "voxels per row"),
        ("nan", "finite betas"),
        ("inf", "finite betas"),
        ("int", "float32 or float64"),
        ("rank1", "rank 2"),
        ("rank3", "rank 2"),
        ("pickled", "pickled object array (refused)"),
        ("float64 1e300", "voxel 7: 1e+300, beyond float32's range"),  # finite as float64, inf as float32
        ("complex", "float32 or float64"),
        ("0 rows", "at least one row of betas, found none"),
    ],
)
def test_bad_betas_are_refused(tiny, test_betas, tmp_path, monkeypatch, capsys, case, match):
    path = tmp_path / "betas.npy"
    betas = test_betas.copy()
    if case == "voxels":
        betas = np.concatenate([betas, betas[:, :1]], axis=1)
    elif case in ("nan", "inf"):
        betas[3, 7] = np.nan if case == "nan" else np.inf
    elif case == "int":
        betas = np.rint(betas).astype(np.int32)
    elif case == "rank1":
        betas = betas[0]
    elif case == "rank3":
        betas = betas[None]
    elif case == "float64 1e300":
        betas = betas.astype(np.float64)
        betas[3, 7] = 1e300
    elif case == "complex":
        betas = betas.astype(np.complex64)
    elif case == "0 rows":
        betas = betas[:0]
    if case == "pickled":
        np.save(path, np.array([{"betas": 1}], dtype=object), allow_pickle=True)
    else:
        np.save(path, betas)
    assert_one_line_failure(
        monkeypatch, capsys, tmp_path / "out", str(path), "--model-dir", str(tiny["gru"]), match=match
    )


def test_batch_outside_the_engine_profile(tiny, test_betas, tmp_path, monkeypatch, capsys):
    args = [str(tiny["prep"] / "test_betas.npy"), "--model-dir", str(tiny["gru"])]
    err = assert_one_line_failure(
        monkeypatch, capsys, tmp_path / "out", *args, "--batch-size", "65", match="shape profiles"
    )
    assert "1..64" in err
    assert_one_line_failure(
        monkeypatch, capsys, tmp_path / "out", *args, "--batch-size", "0", match="batch size"
    )
    pipe = stage1(tiny["gru"]).pipeline
    with pytest.raises(InputError, match=r"a batch in \[1, 64\]"):  # the backend itself refuses too
        pipe.decoder.run({"vdvae_latents": np.zeros((65, pipe.latent_dims), np.float32)})
    with pytest.raises(InputError, match="dtype float32"):
        pipe.regressor.run({"betas": test_betas[:2].astype(np.float64)})


def test_missing_artifact(tiny, tmp_path, monkeypatch, capsys):
    model_dir = shutil.copytree(tiny["gru"], tmp_path / "m")
    (model_dir / "onnx/vdvae_decoder.fp32.onnx").unlink()
    args = [str(tiny["prep"] / "test_betas.npy"), "--model-dir", str(model_dir)]
    assert_one_line_failure(monkeypatch, capsys, tmp_path / "out", *args, match="recon-export --model-dir")
    with pytest.raises(MissingFileError, match="missing onnx artifact listed in manifest.json"):
        verify_manifest(model_dir)
    (model_dir / MANIFEST_FILE).unlink()
    assert_one_line_failure(monkeypatch, capsys, tmp_path / "out", *args, match="missing deployment manifest")


def test_tampered_onnx_is_refused(tiny, tmp_path, monkeypatch, capsys):
    model_dir = shutil.copytree(tiny["ridge"], tmp_path / "m")
    path = model_dir / "onnx/ridge.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    args = [str(tiny["prep"] / "test_betas.npy"), "--model-dir", str(model_dir)]
    err = assert_one_line_failure(monkeypatch, capsys, tmp_path / "out", *args, match="sha256")
    assert "ridge.fp32.onnx" in err and f"recon-export --model-dir {model_dir} --stage all" in err
    with pytest.raises(InputError, match="modified file"):
        stage1(model_dir)


def test_unknown_manifest_version_is_refused(tiny, tmp_path):
    model_dir = shutil.copytree(tiny["gru"], tmp_path / "m")
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    manifest["manifest_version"] = 2
    (model_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="expected manifest_version 1, found 2"):
        load_manifest(model_dir)


def test_engine_built_for_another_machine(tiny, tmp_path, monkeypatch, capsys):
    """A manifest engine entry whose key names another GPU/TensorRT: refused before any deserialisation."""
    import brainrecon.runtime.backends.tensorrt as trt_backend
    from brainrecon.manifest import Artifact, describe_file, write_manifest

    model_dir = shutil.copytree(tiny["gru"], tmp_path / "m")
    manifest = load_manifest(model_dir)
    there = MachineInfo("10.9.0", "NVIDIA A100-SXM4-80GB", "8.0")
    engines: list[Artifact] = []
    for model in ("gru", "vdvae_decoder"):
        onnx = manifest.find("onnx", model, "fp16")
        key = EngineKey.for_machine(onnx.sha256, "fp16", onnx.io["profile"], there)
        rel = f"trt/{model}.fp16.{key.digest()[:12]}.plan"
        (model_dir / "trt").mkdir(exist_ok=True)
        (model_dir / rel).write_bytes(b"not an engine")
        engines.append(
            describe_file(
                model_dir,
                rel,
                "engine",
                model=model,
                precision="fp16",
                io=onnx.io,
                engine_key=key.to_dict(),
                source=onnx.path,
            )
        )
    write_manifest(model_dir, engines)
    monkeypatch.setattr(trt_backend, "tensorrt_status", lambda: (True, "TensorRT 10.13.0 on NVIDIA H100"))
    monkeypatch.setattr(
        trt_backend,
        "current_machine",
        lambda device=0: MachineInfo("10.13.0", "NVIDIA H100 80GB HBM3", "9.0"),
    )
    args = [
        str(tiny["prep"] / "test_betas.npy"),
        "--model-dir",
        str(model_dir),
        "--engine",
        "trt",
        "--precision",
        "fp16",
    ]
    err = assert_one_line_failure(
        monkeypatch, capsys, tmp_path / "out", *args, match="engine built for another target"
    )
    assert "compute capability: engine 8.0, this machine 9.0" in err and "TensorRT: engine 10.9.0" in err
    assert "rebuild it on this machine with: recon-export" in err
    with pytest.raises(EngineMismatchError):
        stage1(model_dir, "trt", "fp16")


def test_trt_engine_missing_or_tensorrt_absent(tiny, tmp_path, monkeypatch, capsys):
    args = [str(tiny["prep"] / "test_betas.npy"), "--model-dir", str(tiny["gru"]), "--engine", "trt"]
    assert_one_line_failure(monkeypatch, capsys, tmp_path / "out", *args, match="TensorRT engine entry")


def test_stimuli_count_mismatch_and_existing_out(tiny, tmp_path, monkeypatch, capsys):
    stimuli = tmp_path / "stimuli.npy"
    np.save(stimuli, np.load(tiny["prep"] / "test_images.npy")[:3])
    args = [str(tiny["prep"] / "test_betas.npy"), "--model-dir", str(tiny["gru"]), "--stimuli", str(stimuli)]
    assert_one_line_failure(monkeypatch, capsys, tmp_path / "out", *args, match="one image per row")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code = run_cli(
        monkeypatch,
        str(tiny["prep"] / "test_betas.npy"),
        "--model-dir",
        str(tiny["gru"]),
        "--out",
        str(existing),
    )
    assert code == 1 and (existing / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------- backends


def test_ort_gpu_provider_missing_is_an_error_unless_fallback_allowed(tiny):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is installed here")
    path = tiny["gru"] / "onnx/gru.fp32.onnx"
    io = ModelIO.from_spec("gru", load_manifest(tiny["gru"]).find("onnx", "gru", "fp32").io)
    with pytest.raises(ProviderError, match="asked for ONNX Runtime provider CUDAExecutionProvider"):
        OrtBackend(path, io, device="cuda")
    with pytest.warns(RuntimeWarning, match="running on the CPU"):
        backend = OrtBackend(path, io, device="cuda", allow_cpu_fallback=True)
    assert backend.providers == ["CPUExecutionProvider"] and "not active" in backend.fallback
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per provider, not per session
        OrtBackend(path, io, device="cuda", allow_cpu_fallback=True)


@pytest.mark.trt
def test_trt_pipeline_runs_on_this_gpu(tiny, tmp_path, test_betas):
    from brainrecon.export.subject import export_model_dir

    model_dir = shutil.copytree(tiny["ridge"], tmp_path / "m")
    export_model_dir(model_dir, stage="all", precision="fp32")
    ort = stage1(model_dir, "ort").reconstruct(test_betas)
    trt = stage1(model_dir, "trt").reconstruct(test_betas)
    assert np.abs(ort.images.astype(int) - trt.images.astype(int)).mean() <= 0.05
    assert "TensorRT" in trt.providers["ridge"][0]


# ----------------------------------------------------------------------------------------- torch-free


def test_recon_infer_never_imports_torch(tiny, tmp_path):
    """Run the recon-infer app in a fresh interpreter and inspect sys.modules afterwards."""
    out = tmp_path / "out"
    code = f"""
import json, sys
from brainrecon.cli.deploy import infer_main
import brainrecon.runtime
sys.argv = ["recon-infer", {str(tiny["prep"] / "test_betas.npy")!r}, "--model-dir", {str(tiny["gru"])!r},
            "--out", {str(out)!r}, "--precision", "fp16", "--stimuli", {str(tiny["prep"] / "test_images.npy")!r}]
try:
    infer_main()
    code = 0
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "brainrecon.train", "brainrecon.export") if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, proc.stderr
    assert (out / "contact_sheet.png").is_file()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda info: info.update(format_version=99), "format_version 1"),
        (lambda info: info["config"].pop("session_zscore"), "session_zscore"),
    ],
)
def test_raw_betas_take_every_step_from_the_recorded_preprocessing(tiny, tmp_path, change, match):
    """recon-prepare z-scores sessions by default; the runtime must never assume a step the record lacks."""
    from brainrecon.errors import ConfigError
    from brainrecon.manifest import describe_file, write_manifest

    model_dir = tmp_path / "model"
    shutil.copytree(tiny["ridge"], model_dir)
    info = json.loads((model_dir / "preprocess.json").read_text())
    change(info)
    (model_dir / "preprocess.json").write_text(json.dumps(info))
    kept = [a for a in load_manifest(model_dir).artifacts if a.path != "preprocess.json"]
    write_manifest(model_dir, [*kept, describe_file(model_dir, "preprocess.json", "data")], merge=False)
    with pytest.raises(ConfigError, match=match):
        run_inference(_session_file(tiny), model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
