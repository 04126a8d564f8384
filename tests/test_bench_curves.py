"""recon-bench (benchmarks/runtime_vs_torch.py): its record helpers on made-up numbers (the floors check, the UNet
GFLOP/s arithmetic, the curves plot), its torch reference against the reference's own reconstruction, and its
--check defaults on the tiny subject. The benchmark's speedups and floors run in tests/test_runtime_stage2.py."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
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


def test_torch_reference_runs_the_reference_loop_part_by_part(tiny2, betas, one_thread):
    """TorchReference is Stage2Model.reconstruct (train/stage2/img2img.py `img2img`, one loop) with its time split
    by part: the same images, byte for byte, at the runtime's batch; a single trial skips the re-normalisation."""
    from brainrecon.benchmarks.runtime_vs_torch import PARTS, TorchReference

    reference = TorchReference(tiny2["model"])
    images, timings = reference.run(betas[:5], 2)
    expected = reference.model.reconstruct(betas[:5], batch_size=2, progress=False)["final"]
    assert images.dtype == np.uint8 and np.array_equal(images, expected)
    assert set(timings) == set(PARTS) and sum(timings[k] for k in PARTS[:-1]) <= timings["total_s"] * 1.01
    single, _ = reference.run(betas[:1], 1)
    m = reference.model
    contexts = {k: ridge.predict(betas[:1], renormalize=False) for k, ridge in m.clip.items()}
    stage1 = dataclasses.replace(m.stage1, config=dataclasses.replace(m.stage1.config, renormalize=False))
    expected = dataclasses.replace(m, stage1=stage1).reconstruct(betas[:1], contexts=contexts, progress=False)
    assert np.array_equal(single, expected["final"])


def test_recon_bench_check_runs_the_floors_pipelines_and_records_the_note(tiny2, tmp_path, monkeypatch):
    """With --check and no --pipelines, recon-bench runs what the floors name (CI's `make bench-check`); --note and
    the machine (date, CPU, cores) are recorded with the results."""
    from brainrecon.benchmarks.runtime_vs_torch import CI_PIPELINES
    from brainrecon.cli.deploy import bench_main

    out, targets = tmp_path / "bench.json", tmp_path / "targets.json"
    targets.write_text(json.dumps({"stage2_speedup_floor": {"ort_fp32": {"total_s": 0.01}}}))
    args = [str(tiny2["prep"] / "test_betas.npy"), "--model-dir", str(tiny2["model"]), "--limit", "2"]
    args += ["--repeats", "1", "--threads", "1", "--out", str(out), "--check", str(targets), "--note", "tiny"]
    monkeypatch.setattr(sys, "argv", ["recon-bench", *args])
    with pytest.raises(SystemExit) as e:
        bench_main()
    assert e.value.code == 0
    results = json.loads(out.read_text())
    assert tuple(results["inference"]["median_s"]) == CI_PIPELINES
    assert results["note"] == "tiny" and results["machine"]["cores"] > 0 and results["machine"]["date"]
