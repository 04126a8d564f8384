"""benchmarks/bench_bf16.py on a tiny ONNX file: ORT fp32, OpenVINO f32 and bf16 timed and compared, and --section
writing one section of a results file while keeping the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
onnx = pytest.importorskip("onnx")

from tests.cpu_kinds import openvino_bf16  # noqa: E402  (needs openvino)

ROOT = Path(__file__).resolve().parents[1]
BF16_MODE, BF16_WHY = openvino_bf16()  # "native", "f32" or "broken" (a forced ONEDNN_MAX_CPU_ISA below bf16)


def _tiny_onnx(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["sample", "w"], ["y"]), helper.make_node("Relu", ["y"], ["out"])],
        "tiny",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.skipif(BF16_MODE == "broken", reason=BF16_WHY)
def test_section_keeps_the_other_sections(tmp_path):
    model = tmp_path / "tiny.fp32.onnx"
    _tiny_onnx(model)
    out = tmp_path / "bf16.json"
    out.write_text(json.dumps({"_comment": "kept", "demo": {"models": {"a": 1}}}))
    cmd = [sys.executable, "benchmarks/bench_bf16.py", "--onnx", f"{model}:1,3", "--repeats", "1"]
    subprocess.run(
        [*cmd, "--out", str(out), "--section", "real_size", "--threads", "1"], check=True, cwd=ROOT
    )
    saved = json.loads(out.read_text())
    assert saved["_comment"] == "kept" and saved["demo"] == {"models": {"a": 1}}
    assert saved["threads"] == 1 and "openvino" in saved["versions"]
    row = saved["real_size"]["models"]["tiny.fp32.onnx"]["batches"]
    assert sorted(row) == ["1", "3"]
    for r in row.values():
        assert set(r["median_s"]) == {"ort_fp32", "openvino_f32", "openvino_bf16"}
        assert r["error_vs_ort_fp32"]["openvino_f32"]["max_over_scale"] < 1e-5  # same fp32 arithmetic
        bf16_error = r["error_vs_ort_fp32"]["openvino_bf16"]["max_over_scale"]
        assert bf16_error < 0.05  # bf16 rounds, a little
        if BF16_MODE == "native":  # elsewhere OpenVINO computes in f32 whatever the hint
            assert bf16_error > 0
