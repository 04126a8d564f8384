"""The OpenVINO engine (runtime/backends/openvino.py): the exported fp32 ONNX files compiled by OpenVINO on the CPU,
at f32 (parity with ONNX Runtime) and bf16, on the tiny two-stage subject with the short schedule FAST_STEPS.

Tolerances, final pixels against ONNX Runtime fp32 over the 10 test trials (grey levels of 1/255):
- fp32: the runtime's fp32 pixel tolerance, mean ≤ 0.01, max ≤ 1 (measured mean 1.9e-4, max 1);
- bf16: mean ≤ 2.5 levels and ≥ 90 % of pixels within 4 levels (measured mean 1.33, max 17, 94 % within 4: an
  8-bit mantissa in every MatMul and convolution of both stages; stage 1's VDVAE decoder alone: mean 0.19,
  max 38 where its DmoL argmax flips). The demo-size figures are in benchmarks/results/stage2_runtime_bf16.json.
Skipped where openvino is not installed (`pip install "brainrecon[openvino]"`). OpenVINO computes in bf16 only on
CPUs that have it (AMX or AVX512_BF16: its CPU plugin then lists "BF16" in OPTIMIZATION_CAPABILITIES) and in f32
elsewhere, whatever the hint (tests/cpu_kinds.py): the checks that bf16 really ran skip on other CPUs, the tolerance
holds on all. Run on an Intel Xeon (AMX; the figures above) and an AMD EPYC (AVX512_BF16, no AMX).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from brainrecon.errors import InputError
from brainrecon.runtime.api import Reconstructor, RuntimeOptions
from tests.cpu_kinds import openvino_bf16
from tests.fixtures import FAST_STEPS

ov = pytest.importorskip("openvino")

BF16 = {"mean": 2.5, "within_4": 0.90}
FP32 = {"mean": 0.01, "max": 1}
BF16_MODE, BF16_WHY = openvino_bf16()  # "native", "f32" or "broken" (a forced ONEDNN_MAX_CPU_ISA below bf16)
BF16_PRECISION = "fp32" if BF16_MODE == "broken" else "bf16"  # for tests about something else


def _run(model_dir, betas, engine: str, precision: str):
    with Reconstructor.open(model_dir, RuntimeOptions(engine=engine, precision=precision, threads=1)) as rec:
        sampling = dataclasses.replace(rec.sampling, num_inference_steps=FAST_STEPS)
        return rec.reconstruct(betas, sampling=sampling)


@pytest.fixture(scope="module")
def runs(tiny2, betas):
    """ONNX Runtime fp32, OpenVINO f32, OpenVINO bf16 on the same betas and sampling."""
    pairs = {"ort": ("ort", "fp32"), "fp32": ("openvino", "fp32")}
    if BF16_MODE != "broken":
        pairs["bf16"] = ("openvino", "bf16")
    return {key: _run(tiny2["model"], betas, *pair) for key, pair in pairs.items()}


def _pixels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def test_engine_and_precision_pairs_are_checked():
    for bad in (
        {
            "engine": "openvino",
            "precision": "fp16",
        },  # no fp16 OpenVINO path: fp32 files, f32 or bf16 inference
        {"engine": "ort", "precision": "bf16"},
        {"engine": "openvino", "device": "cuda"},
    ):
        with pytest.raises(InputError):
            RuntimeOptions(**bad)
    RuntimeOptions(engine="openvino", precision="bf16")


def test_openvino_fp32_matches_onnx_runtime(runs):
    d = _pixels(runs["fp32"].images, runs["ort"].images)
    assert d.mean() <= FP32["mean"] and d.max() <= FP32["max"], (d.mean(), d.max())
    assert runs["fp32"].providers["unet"] == ["OpenVINO CPU f32"]


@pytest.mark.skipif(BF16_MODE == "broken", reason=BF16_WHY)
def test_openvino_bf16_is_within_its_stated_tolerance(runs):
    reference = runs["fp32"].images  # OpenVINO f32 (== ORT fp32 within one level, above)
    d = _pixels(runs["bf16"].images, reference)
    assert d.mean() <= BF16["mean"] and (d <= 4).mean() >= BF16["within_4"], (d.mean(), d.max())
    if BF16_MODE == "native":
        assert d.mean() > 0  # it really ran in bf16: an 8-bit mantissa cannot reproduce fp32 pixels exactly
    assert runs["bf16"].providers["unet"] == ["OpenVINO CPU bf16"]


@pytest.mark.skipif(BF16_MODE != "native", reason=BF16_WHY)
def test_bf16_is_what_openvino_compiled(tiny2, betas):
    rec = Reconstructor.open(tiny2["model"], RuntimeOptions(engine="openvino", precision="bf16", threads=1))
    with rec:
        compiled = rec.pipeline.backends["unet"].compiled
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("bf16", "<Type: 'bfloat16'>")
    rec32 = Reconstructor.open(tiny2["model"], RuntimeOptions(engine="openvino", precision="fp32", threads=1))
    with rec32:
        compiled = rec32.pipeline.backends["unet"].compiled
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")


def test_openvino_runtime_does_not_import_torch(tiny2):
    code = (
        "import json, sys, numpy as np\n"
        "from brainrecon.runtime.api import Reconstructor, RuntimeOptions\n"
        f"rec = Reconstructor.open({str(tiny2['model'])!r}, RuntimeOptions(engine='openvino', precision={BF16_PRECISION!r}))\n"
        "betas = np.random.default_rng(0).standard_normal((2, rec.n_voxels)).astype(np.float32)\n"
        "rec.reconstruct(betas)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_repeated_calls_give_the_same_result(tiny2):
    """The same input twice, another in between, gives the same output: a compiled model must not drift (OpenVINO
    2026.4.1 compiled at a static batch did, on the demo VDVAE decoder; runtime/backends/openvino.py)."""
    import onnxruntime as ort

    from brainrecon.runtime.backends.openvino import OpenVinoBackend

    for name in ("vdvae_decoder", "vae_decoder"):
        path = tiny2["model"] / f"onnx/{name}.fp32.onnx"
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        spec = session.get_inputs()[0]
        rng = np.random.default_rng(0)
        x1, x2 = (rng.standard_normal((4, *spec.shape[1:]), dtype=np.float32) for _ in range(2))
        backend = OpenVinoBackend(path, None, "fp32", threads=1)
        first = next(iter(backend.run({spec.name: x1}).values()))
        backend.run({spec.name: x2})
        again = next(iter(backend.run({spec.name: x1}).values()))
        ref = session.run(None, {spec.name: x1})[0]
        assert np.array_equal(first, again), name
        assert np.abs(first - ref).max() <= 1e-4 * np.abs(ref).max(), name
