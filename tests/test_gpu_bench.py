"""benchmarks/gpu_bench.py on the CPU: its plumbing with the tiny configs (the GPU run itself needs a CUDA GPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_on_the_cpu_writes_every_figure(tmp_path, one_thread):
    bench = load_gpu_bench()
    out = tmp_path / "gpu_bench.json"
    args = [
        "--device",
        "cpu",
        "--tiny",
        "--no-compile",
        "--batches",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "0",
    ]
    assert bench.main([*args, "--steps-of", "4,8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["device"] == "cpu" and result["tiny"] is True
    assert set(result["unet_step"]) == set(result["guided_loop"]) == {"b1/eager"}
    assert all(r["median_s"] > 0 for r in result["unet_step"].values())
    # strength 0.75 of a 4- and an 8-step schedule; CUDA graphs are a GPU variant
    assert set(result["guided_loop"]["b1/eager"]) == {"3", "6"}
    assert all(r["median_s"] > 0 for r in result["guided_loop"]["b1/eager"].values())
    assert (
        set(result["vdvae_decoder"]) == set(result["vae_decoder"]) == {"b1/float32"}
    )  # fp16 is a GPU figure


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    from brainrecon.train.device import DeviceError

    with pytest.raises(DeviceError, match="--device cuda: expected a CUDA GPU"):
        load_gpu_bench().main(["--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
