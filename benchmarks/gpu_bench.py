"""GPU benchmark of the real-size torch models (at most ~10 minutes on one CUDA GPU): where TensorRT and
onnxruntime-gpu are missing, torch is what it measures.

    python benchmarks/gpu_bench.py --out benchmarks/results/gpu_bench.json            # on a CUDA machine
    python benchmarks/gpu_bench.py --device cpu --tiny --out /tmp/gpu_bench.json      # the plumbing, on a CPU

Measured, with random weights (benchmarks/real_size.py builds the same models; speed does not depend on values):
    unet_step        one call of Versatile Diffusion's dual UNet (64x64x4 latents, 257 + 77 tokens of 768) on the
                     classifier-free-guidance batch 2B, B = 1 and 8, fp16, in three variants: eager; cuda_graphs
                     (the eager UNet captured once per shape with torch.cuda.CUDAGraph and replayed); and
                     torch.compile (mode "reduce-overhead": compiled and CUDA graphs) unless --no-compile
    guided_loop      Brain-Diffuser's stage-2 loop (train/stage2/img2img.py `denoise`: DDIM, strength 0.75,
                     guidance 7.5) for each schedule length of --steps-of (50 -> the paper's 37 steps; 20 -> 15,
                     14 -> 10), B = 1 and 8, each variant
    vdvae_decoder    the imagenet64 VDVAE decoder at K = 15 (train/foundations/vdvae.py VDVAEDecoder), B = 1 and 8, fp32
                     and fp16
    vae_decoder      Stable Diffusion's AutoencoderKL decoder (64x64x4 latents -> 512 px), B = 1 and 8, fp16
Each figure is the median of timed runs after warm-up, with torch.cuda.synchronize() around each; the results file
records the card, driver, torch/CUDA versions and which of TensorRT / onnxruntime-gpu were importable.
`--tiny` swaps in the tiny configs (seconds on a CPU) so the script's own plumbing is tested without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any, warmup: int, repeats: int, budget_s: float) -> dict[str, Any]:
    """Median seconds of `fn` over up to `repeats` runs (fewer when `budget_s` runs out), after `warmup` runs."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    first = time.perf_counter() - t0
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 5), "runs": len(times), "warmup_s": round(first, 3)}


def machine(device: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tensorrt_importable": importlib.util.find_spec("tensorrt") is not None,
        "onnxruntime_gpu": False,
    }
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        info["onnxruntime_gpu"] = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = list(torch.cuda.get_device_capability(device))
        info["memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown (nvidia-smi not runnable)"
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def build_unet(tiny: bool, device: Any, dtype: Any):
    from real_size import make_distinct, vd_unet_config

    from brainrecon.train.foundations.dual_unet import DualUNetConfig, build_dual_unet, set_mix_ratio

    config = DualUNetConfig.tiny() if tiny else vd_unet_config()
    unet = build_dual_unet(config).eval()
    make_distinct(unet, 0)
    set_mix_ratio(unet, config.mix_ratio)
    return unet.to(device, dtype).requires_grad_(False), config


def unet_call(model: Any, latents: Any, t: Any, context: Any) -> None:
    import torch

    with torch.no_grad():
        model(latents, t, encoder_hidden_states=context)


def guided_loop(model: Any, latents: Any, cond: Any, uncond: Any, sampling: Any) -> None:
    """train/stage2/img2img.py `denoise`: add noise at the strength's first step, then the guided DDIM steps."""
    import torch

    from brainrecon.train.stage2.img2img import denoise, vd_scheduler

    with torch.no_grad():
        denoise(model, vd_scheduler(), latents, cond, uncond, sampling, noise=torch.zeros_like(latents))


class GraphedUNet:
    """The eager UNet captured as one CUDA graph per input shape, replayed on static buffers.

    The timestep is copied into a device buffer before capture (a host-to-device copy cannot be captured); the
    output is cloned so the next replay does not overwrite what the caller holds (PyTorch docs, "CUDA Graphs").
    """

    def __init__(self, unet: Any):
        self.unet = unet
        self.graphs: dict[tuple, tuple[Any, dict[str, Any], Any]] = {}

    def __call__(self, latents: Any, t: Any, encoder_hidden_states: Any) -> Any:
        import torch

        key = (tuple(latents.shape), tuple(encoder_hidden_states.shape))
        if key not in self.graphs:
            static = {
                "latents": latents.clone(),
                "t": torch.zeros(latents.shape[0], device=latents.device),
                "context": encoder_hidden_states.clone(),
            }
            static["t"].copy_(torch.as_tensor(t, dtype=torch.float32).expand(latents.shape[0]))

            def call() -> Any:
                return self.unet(
                    static["latents"], static["t"], encoder_hidden_states=static["context"]
                ).sample

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(2):  # warm-up on a side stream before capture
                    call()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                out = call()
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        static["latents"].copy_(latents)
        static["t"].copy_(torch.as_tensor(t, dtype=torch.float32).expand(latents.shape[0]))
        static["context"].copy_(encoder_hidden_states)
        graph.replay()
        return types.SimpleNamespace(sample=out.clone())

    def parameters(self) -> Any:  # denoise reads the dtype and device from the model
        return self.unet.parameters()


def unet_variants(unet: Any, args: argparse.Namespace, device: Any) -> list[tuple[str, Any]]:
    import torch

    variants: list[tuple[str, Any]] = [("eager", unet)]
    if device.type == "cuda":
        variants.append(("cuda_graphs", GraphedUNet(unet)))
    if args.compile:
        mode = "reduce-overhead" if device.type == "cuda" else "default"  # reduce-overhead = CUDA graphs
        variants.append((f"compile:{mode}", torch.compile(unet, mode=mode, dynamic=False)))
    return variants


def bench_unet(args: argparse.Namespace, device: Any, out: dict[str, Any]) -> None:
    import torch

    from brainrecon.sampling import SamplingConfig

    dtype = (
        torch.float16 if device.type == "cuda" else torch.float32
    )  # CPU fp16 convolutions are slow or missing
    unet, config = build_unet(args.tiny, device, dtype)
    out["unet_parameters"] = sum(p.numel() for p in unet.parameters())
    out["unet_dtype"] = str(dtype).removeprefix("torch.")
    side, tokens = config.sample_size, config.context_tokens
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        latents = torch.randn(batch, config.in_channels, side, side, generator=gen).to(device, dtype)
        cond = torch.randn(batch, tokens, config.cross_attention_dim, generator=gen).to(device, dtype) * 0.036
        uncond = torch.randn(1, tokens, config.cross_attention_dim, generator=gen).to(device, dtype) * 0.036
        pair = torch.cat([uncond.expand(batch, -1, -1), cond])  # (2B, Nv + Nt, D): the guidance layout
        t = torch.full((2 * batch,), 981.0, device=device)
        for name, model in unet_variants(unet, args, device):
            key = f"b{batch}/{name}"
            pair_latents = torch.cat([latents, latents])  # (2B, C, h, w)
            try:
                step = functools.partial(unet_call, model, pair_latents, t, pair)
                out["unet_step"][key] = timed(step, device, args.warmup, args.repeats, args.budget_s)
                out["guided_loop"][key] = {}
                for steps_of in args.steps_of:
                    sampling = SamplingConfig(num_inference_steps=steps_of)
                    loop = functools.partial(guided_loop, model, latents, cond, uncond, sampling)
                    steps = int(sampling.num_inference_steps * sampling.strength)
                    timing = timed(loop, device, 1, max(1, args.repeats // 3), args.budget_s)
                    out["guided_loop"][key][str(steps)] = timing
            except Exception as e:  # a variant this torch or GPU cannot run: record it, measure the rest
                out["unet_step"][key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(
                f"[gpu-bench] unet {key}: step {out['unet_step'][key]}, loop {out['guided_loop'].get(key)}",
                flush=True,
            )
    del unet
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_vae(args: argparse.Namespace, device: Any, out: dict[str, Any]) -> None:
    """Stable Diffusion's VAE decoder (the last step of every stage-2 image), fp16 on a GPU."""
    import torch
    from diffusers import AutoencoderKL
    from real_size import make_distinct, vd_vae_config

    config = vd_vae_config()
    if args.tiny:
        config = {**config, "block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4, "sample_size": 32}
    vae = AutoencoderKL(**config).eval()
    make_distinct(vae, 0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    vae = vae.to(device, dtype).requires_grad_(False)
    side = config["sample_size"] // 8
    for batch in args.batches:
        latents = torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(batch)).to(
            device, dtype
        )

        def run(latents=latents) -> None:
            with torch.no_grad():
                vae.decode(latents)

        key = f"b{batch}/{str(dtype).removeprefix('torch.')}"
        out["vae_decoder"][key] = timed(run, device, args.warmup, args.repeats, args.budget_s)
        print(f"[gpu-bench] vae_decoder {key}: {out['vae_decoder'][key]}", flush=True)


def bench_vdvae(args: argparse.Namespace, device: Any, out: dict[str, Any]) -> None:
    import torch
    from real_size import make_distinct

    from brainrecon.train.foundations.vdvae import VDVAE, VDVAEDecoder, vdvae_config

    config = vdvae_config("small64" if args.tiny else "imagenet64")
    vdvae = VDVAE(config).eval()
    make_distinct(vdvae, 0)
    layers = 5 if args.tiny else 15
    dtypes = [torch.float32] + ([torch.float16] if device.type == "cuda" else [])
    for dtype in dtypes:
        decoder = VDVAEDecoder(vdvae, layers).eval().to(device, dtype).requires_grad_(False)
        for batch in args.batches:
            latents = torch.randn(batch, decoder.latent_dims, generator=torch.Generator().manual_seed(batch))
            latents = latents.to(device, dtype)

            def run(decoder=decoder, latents=latents, dtype=dtype) -> None:
                with torch.no_grad():
                    images = decoder(latents)
                if not torch.isfinite(images).all():
                    raise FloatingPointError(f"vdvae_decoder {dtype}: non-finite images (fp16 overflow)")

            key = f"b{batch}/{str(dtype).removeprefix('torch.')}"
            try:
                out["vdvae_decoder"][key] = timed(run, device, args.warmup, args.repeats, args.budget_s)
            except FloatingPointError as e:
                out["vdvae_decoder"][key] = {"error": str(e)}
            print(f"[gpu-bench] vdvae_decoder {key}: {out['vdvae_decoder'][key]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_bench.json")
    p.add_argument(
        "--device", default="cuda", help="cuda (the benchmark) or cpu (plumbing checks with --tiny)"
    )
    p.add_argument("--tiny", action="store_true", help="tiny configs: seconds on a CPU")
    p.add_argument("--batches", default="1,8", help="images per call (the UNet runs 2x rows: the CFG pair)")
    p.add_argument(
        "--steps-of",
        default="50,20,14",
        help="DDIM schedule lengths, comma-separated (strength 0.75 runs 3/4)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--budget-s", type=float, default=20.0, help="stop repeating a figure after this many seconds"
    )
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--only", default="unet,vdvae,vae", help="comma-separated: unet, vdvae, vae")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.steps_of = [int(n) for n in args.steps_of.split(",")]

    from brainrecon.io import write_json
    from brainrecon.train.device import resolve_device

    device = resolve_device(args.device)  # a missing GPU is a one-line DeviceError
    if device.type == "cpu" and not args.tiny:
        print("note: --device cpu without --tiny runs the real-size models on the CPU (tens of minutes)")
    t_start = time.perf_counter()
    out: dict[str, Any] = {
        "machine": machine(device),
        "tiny": args.tiny,
        "unet_step": {},
        "guided_loop": {},
        "vdvae_decoder": {},
        "vae_decoder": {},
    }
    only = set(args.only.split(","))
    if "unet" in only:
        bench_unet(args, device, out)
    if "vdvae" in only:
        bench_vdvae(args, device, out)
    if "vae" in only:
        bench_vae(args, device, out)
    if device.type == "cuda":
        import torch

        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(args.out, out)
    print(f"[gpu-bench] {args.out} ({out['wall_s']} s)")
    return 0


if __name__ == "__main__":
    from brainrecon.errors import BrainReconError

    try:
        sys.exit(main())
    except BrainReconError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
