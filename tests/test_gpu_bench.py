"""benchmarks/gpu_bench.py on the CPU: its plumbing with the tiny configs, and its K/V-once UNet against the plain one
(the GPU run itself needs a CUDA GPU)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")


def load_gpu_bench():
    from brainrecon.benchmarks import gpu_bench

    return gpu_bench


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
    # CUDA graphs are a GPU variant
    assert set(result["unet_step"]) == set(result["guided_loop"]) == {"b1/eager", "b1/kv_once"}
    assert all(r["median_s"] > 0 for r in result["unet_step"].values())
    for loops in result["guided_loop"].values():  # strength 0.75 of a 4- and an 8-step schedule
        assert set(loops) == {"3", "6"} and all(r["median_s"] > 0 for r in loops.values())
    assert (
        set(result["vdvae_decoder"]) == set(result["vae_decoder"]) == {"b1/float32"}
    )  # fp16 is a GPU figure


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    from brainrecon.train.device import DeviceError

    with pytest.raises(DeviceError, match="--device cuda: expected a CUDA GPU"):
        load_gpu_bench().main(["--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_kv_once_unet_matches_the_plain_unet_and_computes_the_kv_once_per_context(one_thread):
    """The kv_once variant is the same UNet: outputs within float32 rounding of the plain call; a new context
    tensor (a new guided loop) gets its own K/V, the same tensor (the next step) reuses them."""
    from brainrecon.train.foundations.dual_unet import DualUNetConfig, build_dual_unet

    torch.manual_seed(0)
    config = DualUNetConfig.tiny()
    unet = build_dual_unet(config).eval()
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size)
    t = torch.tensor([981.0, 501.0])
    with torch.no_grad():
        contexts = [torch.randn(2, config.context_tokens, config.cross_attention_dim) * 0.1 for _ in range(2)]
        plain = [unet(x, t, encoder_hidden_states=c).sample for c in contexts]
        kv_once = load_gpu_bench().KVOnceUNet(unet)
        for context, expected in zip(contexts, plain, strict=True):
            first = kv_once(x, t, encoder_hidden_states=context).sample
            kv = kv_once.kv
            assert kv_once(x, t, encoder_hidden_states=context).sample.equal(first) and kv_once.kv is kv
            assert torch.allclose(first, expected, atol=1e-5, rtol=1e-4)
