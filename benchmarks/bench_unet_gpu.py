"""The guided UNet loop on a GPU in torch fp16 (issue 13): eager, CUDA graphs and torch.compile, at batch 1, 8 and
32 images, for the demo-size and the Versatile-Diffusion-size dual UNet (random weights: speed only), each with the
plain UNet at every step and with K/V once (the contexts' cross-attention K/V computed before the loop,
export/kv_once.py `context_kv`). Run it wherever a CUDA GPU is at hand:

    python benchmarks/bench_unet_gpu.py --out benchmarks/results/stage2_unet_gpu.json

Without a GPU it runs nothing unless asked: `--device cpu --sizes tiny --modes eager --batches 1,2 --steps 2` is
the smoke test (tests/test_kv_once.py). Per configuration: seconds per loop (median of --repeats after a warm-up;
CUDA synchronised), images/s, the K/V-once speedup over plain, and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

SIZES = ("tiny", "demo", "real")
MODES = ("eager", "cuda_graphs", "compile")


def unet_config(size: str) -> Any:
    from brainrecon.train.foundations.dual_unet import DualUNetConfig

    if size == "tiny":
        return DualUNetConfig.tiny()
    if size == "demo":  # the shipped small UNet: 8x8x4 latents (64 px), 65 vision + 77 text tokens of 128
        return DualUNetConfig(sample_size=8, vision_tokens=65, cross_attention_dim=128)
    # Versatile Diffusion's image UNet (SD 1.x layout): 64x64x4 latents (512 px), 257 + 77 tokens of 768
    return DualUNetConfig(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def guided_loop(
    size: str, mode: str, batch: int, kv_once: bool, steps: int, repeats: int, device: str
) -> dict[str, Any]:
    """Seconds for `steps` guided UNet calls on 2 x `batch` rows, [uncond; cond], DDIM-like update in torch."""
    import torch

    from brainrecon.export.kv_once import context_kv, kv_cross_attention_kwargs
    from brainrecon.train.foundations.dual_unet import build_dual_unet

    torch.manual_seed(0)
    cfg = unet_config(size)
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = build_dual_unet(cfg).eval().to(device, dtype)
    rows = 2 * batch
    x0 = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device, dtype=dtype)
    context = 0.1 * torch.randn(rows, cfg.context_tokens, cfg.cross_attention_dim, device=device, dtype=dtype)
    t = torch.full((rows,), 501.0, device=device)

    def step(x: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        eps = unet(torch.cat([x, x]), t, return_dict=False, **extra)[0]
        uncond, cond = eps.chunk(2)
        return 0.98 * x - 0.02 * (uncond + 7.5 * (cond - uncond))

    call = step
    if mode == "compile":
        call = torch.compile(step)

    def loop() -> torch.Tensor:
        with torch.no_grad():
            extra: dict[str, Any] = (
                {
                    "encoder_hidden_states": None,
                    "cross_attention_kwargs": kv_cross_attention_kwargs(context_kv(unet, context)),
                }
                if kv_once
                else {"encoder_hidden_states": context}
            )
            x = x0
            if mode == "cuda_graphs":
                static_x = x0.clone()
                graph = torch.cuda.CUDAGraph()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    step(static_x, extra)  # warm-up on a side stream before capture
                torch.cuda.current_stream().wait_stream(stream)
                with torch.cuda.graph(graph):
                    static_out = step(static_x, extra)
                for _ in range(steps):
                    graph.replay()
                    static_x.copy_(static_out)
                return static_x
            for _ in range(steps):
                x = call(x, extra)
            return x

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loop()
    sync()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {
        "median_s": round(med, 5),
        "images_per_second": round(batch / med, 2),
        "first_call_s": round(first_s, 3),
    }
    if device == "cuda":
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def run(
    sizes: list[str], modes: list[str], batches: list[int], steps: int, repeats: int, device: str
) -> dict[str, Any]:
    import torch

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": steps,
        "repeats": repeats,
        "dtype": "float16" if device == "cuda" else "float32",
        "runs": {},
    }
    for size in sizes:
        for mode in modes:
            for batch in batches:
                key = f"{size}/{mode}/b{batch}"
                try:
                    plain = guided_loop(size, mode, batch, False, steps, repeats, device)
                    kv = guided_loop(size, mode, batch, True, steps, repeats, device)
                    results["runs"][key] = {
                        "plain": plain,
                        "kv_once": kv,
                        "kv_speedup": round(plain["median_s"] / kv["median_s"], 3),
                    }
                except Exception as e:  # an OOM at real size / batch 32, a mode this torch cannot run
                    results["runs"][key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    if device == "cuda":
                        torch.cuda.empty_cache()
                print(key, results["runs"][key], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--sizes", default="demo,real")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=37)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "stage2_unet_gpu.json"
    )
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: nothing measured (use --device cpu for the smoke run)")
    results = run(
        [s for s in args.sizes.split(",") if s],
        [m for m in args.modes.split(",") if m],
        [int(b) for b in args.batches.split(",") if b],
        args.steps,
        args.repeats,
        args.device,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
