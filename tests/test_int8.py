"""INT8 through NNCF (train/experiments/int8.py, `recon-eval int8`) on the tiny exported two-stage subject (conftest
`tiny2`): the UNet quantized on inputs recorded from the runtime on training trials, checked on calls recorded from
other training trials, then run by the runtime in place of the fp32 UNet.

Tolerances, the UNet's noise prediction against ONNX Runtime fp32 on held-out recorded calls (mean |error| over
mean |eps|; measured on the tiny UNet when chosen):
- weights and activations (the experiment's recipe): ≤ 0.10 (measured 0.037, worst call 0.072);
- weight-only INT8: ≤ 0.04 (measured 0.015, worst call 0.021).
Final pixels of the tiny subject (10 test trials, FAST_STEPS) with the INT8 UNet against ONNX Runtime fp32: mean ≤ 4
grey levels (measured 1.66, max 26; weight-only: 0.39, max 5). Measured on an AMD EPYC (AVX512_VNNI, no AMX).
Skipped where nncf or openvino is not installed (`pip install "brainrecon[int8]"`; `make test` installs it).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from brainrecon.errors import InputError
from tests.fixtures import FAST_STEPS

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from brainrecon.runtime.backends.openvino import OpenVinoBackend, OpenVinoError  # noqa: E402
from brainrecon.train.experiments import int8  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPS_TOLERANCE = {"int8": 0.10, "w8": 0.04}
PIXEL_MEAN_TOLERANCE = 4.0


def _sampling(model_dir):
    from brainrecon.runtime import Reconstructor

    with Reconstructor.open(model_dir) as rec:
        return dataclasses.replace(rec.sampling, num_inference_steps=FAST_STEPS)


@pytest.fixture(scope="module")
def quantized(tiny2, tmp_path_factory):
    """The tiny UNet as INT8 (weights and activations, calibrated on 4 training trials) and weight-only INT8 IR,
    with UNet calls recorded from 3 other training trials."""
    out = tmp_path_factory.mktemp("int8")
    sampling = _sampling(tiny2["model"])
    betas, rows = int8.calibration_betas(tiny2["prep"], 4)
    calls = int8.record_inputs(tiny2["model"], betas, sampling)
    train = np.load(tiny2["prep"] / "train_betas.npy")
    held_out = [r for r in range(len(train)) if r not in rows][:3]
    held = int8.record_inputs(tiny2["model"], np.ascontiguousarray(train[held_out]), sampling)
    onnx, io = int8.folder_onnx(tiny2["model"], "unet")
    irs = {"int8": out / "unet.int8.xml", "w8": out / "unet.w8.xml"}
    info = {
        "int8": int8.quantize_onnx(onnx, calls["unet"], irs["int8"]),
        "w8": int8.quantize_onnx(onnx, None, irs["w8"]),
    }
    return {"irs": irs, "info": info, "calls": calls["unet"], "held": held["unet"], "onnx": onnx, "io": io,
            "sampling": sampling}  # fmt: skip


@pytest.mark.parametrize("variant", ["int8", "w8"])
def test_quantized_unet_is_close_to_fp32_on_held_out_calls(quantized, variant):
    from brainrecon.runtime.backends.ort import OrtBackend

    ir = quantized["irs"][variant]
    assert ir.is_file() and ir.with_suffix(".bin").is_file()
    assert not list(ir.parent.glob(".*tmp*"))  # written under a temporary name, then renamed
    assert quantized["info"][variant]["calibration_items"] == (
        0 if variant == "w8" else len(quantized["calls"])
    )
    ort = OrtBackend(quantized["onnx"], quantized["io"], "cpu")
    backend = OpenVinoBackend(ir, quantized["io"], "fp32")
    errors = []
    for call in quantized["held"]:
        ref, got = ort.run(call)["noise_pred"], backend.run(call)["noise_pred"]
        assert got.shape == ref.shape and got.dtype == np.float32
        errors.append(np.abs(got - ref).mean() / np.abs(ref).mean())
    assert 0 < float(np.mean(errors)) <= EPS_TOLERANCE[variant], errors


def test_runtime_runs_the_int8_unet(tiny2, betas, quantized):
    from brainrecon.runtime import Reconstructor, RuntimeOptions

    sampling = quantized["sampling"]
    with Reconstructor.open(tiny2["model"], RuntimeOptions(engine="ort", precision="fp32")) as rec:
        reference = rec.reconstruct(betas, sampling).images
    with int8.open_reconstructor(
        tiny2["model"], "openvino", "fp32", {"unet": quantized["irs"]["int8"]}
    ) as rec:
        assert all(w.path == quantized["irs"]["int8"] for w in rec.pipeline.unet_workers)
        images = rec.reconstruct(betas, sampling).images
    diff = np.abs(images.astype(np.int16) - reference.astype(np.int16))
    assert images.shape == reference.shape and 0 < diff.mean() <= PIXEL_MEAN_TOLERANCE, diff.mean()


def test_backend_refuses_a_bad_ir_in_one_line(quantized, tmp_path):
    io = quantized["io"]
    no_bin = tmp_path / "alone.xml"
    no_bin.write_text(quantized["irs"]["int8"].read_text())
    garbage = tmp_path / "garbage.xml"
    garbage.write_text("<net>not an IR")
    garbage.with_suffix(".bin").write_bytes(b"\0" * 16)
    for path, error in [(no_bin, InputError), (garbage, OpenVinoError), (tmp_path / "x.txt", InputError)]:
        with pytest.raises(error) as exc:
            OpenVinoBackend(path, io, "fp32")
        assert "\n" not in str(exc.value) and str(path) in str(exc.value), str(exc.value)


def test_runtime_does_not_import_nncf():
    code = (
        "import sys; import brainrecon.runtime, brainrecon.runtime.backends.openvino; "
        "print('nncf' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_the_command_writes_its_files(tiny2, tmp_path):
    out = tmp_path / "int8"
    cmd = [sys.executable, "-c", "from brainrecon.cli.train import eval_main; eval_main()", "int8"]
    args = ["--model-dir", tiny2["model"], "--data", tiny2["prep"], "--out", out, "--images", 4]
    args += ["--calibration", 3, "--recipe", "fast"]
    proc = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "int8.json").read_text())
    assert result["n_test"] == 4 and len(result["calibration"]["rows"]) == 3
    names = [r["name"] for r in result["settings"]]
    assert names[0] == result["reference"] == "fast ort-fp32" and "fast ov-int8" in names
    reference = result["settings"][0]
    assert reference["vs_reference"]["mean_abs"] == 0 and reference["within_bounds"]
    unet = next(m for m in result["per_call_seconds"] if m.startswith("unet"))  # unet, or unet_kv (K/V once)
    assert set(result["per_call_seconds"][unet]) >= {"ort fp32", "openvino int8", "openvino w8"}
    static = result["static_shape"]["models"]
    assert set(static) == {unet, "vae_decoder", "vdvae_decoder"}
    for key in ("f32 static", "bf16 dynamic"):
        assert len(static[unet][key]["max_error_vs_ort"]) == int8.STATIC_CALLS
    assert "| fast | ov-int8 |" in (out / "int8.md").read_text()
    assert (out / "int8_sheet.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "models" / f"{unet}.int8.xml").is_file()
