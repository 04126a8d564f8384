"""recon-bench's record helpers (benchmarks/runtime_vs_torch.py) on made-up numbers: the floors check, the UNet
GFLOP/s arithmetic and the curves plot. The benchmark itself runs in tests/test_runtime_stage2.py."""

from __future__ import annotations

import json

import pytest

from brainrecon.benchmarks.runtime_vs_torch import check, plot, unet_throughput


def _inference(unet_s: dict[str, float]) -> dict:
    return {
        "median_s": {name: {"unet_s": s, "total_s": s * 1.1} for name, s in unet_s.items()},
        **{name: {"speedup_vs_torch": {"unet_s": unet_s["torch"] / s}} for name, s in unet_s.items()},
    }


def test_check_names_misses_and_unbenchmarked_pipelines(tmp_path):
    targets = tmp_path / "targets.json"
    targets.write_text(
        json.dumps({"stage2_speedup_floor": {"ort_fp32": {"unet_s": 2.0}, "openvino_bf16": {"unet_s": 1.0}}})
    )
    results = {"inference": _inference({"torch": 4.0, "ort_fp32": 2.5})}
    misses = check(results, targets)
    assert misses == [
        "ort_fp32 unet_s: speedup vs torch 1.6 < floor 2.0",
        "openvino_bf16: not benchmarked (run it with --pipelines including openvino_bf16)",
    ]
    results = {"inference": _inference({"torch": 4.0, "ort_fp32": 1.0, "openvino_bf16": 2.0})}
    assert check(results, targets) == []


def test_check_floors_over_another_pipeline(tmp_path):
    """The K/V-once graph's floor over the plain UNet, a ratio of two ONNX Runtime pipelines of one run."""
    targets = tmp_path / "targets.json"
    floors = {
        "stage2_speedup_floor": {},
        "stage2_speedup_over": {"ort_fp32": {"over": "ort_fp32_plain", "unet_s": 1.1}},
    }
    targets.write_text(json.dumps(floors))
    results = {"inference": _inference({"torch": 4.0, "ort_fp32_plain": 2.0, "ort_fp32": 1.9})}
    assert check(results, targets) == ["ort_fp32 unet_s: speedup vs ort_fp32_plain 1.05 < floor 1.1"]
    results = {"inference": _inference({"torch": 4.0, "ort_fp32_plain": 2.0, "ort_fp32": 1.6})}
    assert check(results, targets) == []
    results = {"inference": _inference({"torch": 4.0, "ort_fp32": 1.6})}
    assert check(results, targets) == [
        "ort_fp32_plain: not benchmarked (run it with --pipelines including ort_fp32_plain)"
    ]


def test_unet_throughput_counts_useful_and_executed_flops():
    inference = _inference({"torch": 2.0, "ort_fp32_plain": 1.0, "ort_fp32": 0.5})
    out = unet_throughput(inference, {"plain": 1e9, "kv_step": 0.8e9}, 4, 5, {"fp32": 200.0, "bf16": 800.0})
    rows = 2 * 4 * 5  # CFG pairs x images x steps
    assert out["torch"]["useful_gflops"] == pytest.approx(rows / 2.0)
    assert out["ort_fp32_plain"]["executed_gflops"] == pytest.approx(rows / 1.0)
    assert out["ort_fp32"]["useful_gflops"] == pytest.approx(rows / 0.5)
    assert out["ort_fp32"]["executed_gflops"] == pytest.approx(0.8 * rows / 0.5)
    assert out["ort_fp32"]["executed_fraction_of_fp32_ceiling"] == pytest.approx(
        0.8 * rows / 0.5 / 200, abs=1e-3
    )


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    stages = {"total_s": {"p50": 1.0, "p95": 1.2}}
    curve = {
        "batches": [1, 4],
        "pipelines": {
            name: {str(b): {"stages_s": stages, "images_per_second": b / 1.0} for b in (1, 4)}
            for name in ("torch", "ort_fp32")
        },
    }
    path = tmp_path / "curves.png"
    plot(curve, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
