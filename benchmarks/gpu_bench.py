"""GPU benchmark of the real-size torch models (at most ~10 minutes on one CUDA GPU): where TensorRT and
onnxruntime-gpu are missing, torch is what it measures. benchmarks/gpu_run.sh runs it on a lent GPU machine.

    python benchmarks/gpu_bench.py --out benchmarks/results/gpu/gpu_bench.json         # on a CUDA machine
    python benchmarks/gpu_bench.py --device cpu --tiny --out /tmp/gpu_bench.json      # the plumbing, on a CPU

Measured, with random weights (benchmarks/real_size.py builds the same models; speed does not depend on values):
    unet_step        one call of Versatile Diffusion's dual UNet (64x64x4 latents, 257 + 77 tokens of 768) on the
                     classifier-free-guidance batch 2B, B = --batches, fp16, in these variants: eager; kv_once (the
                     contexts' cross-attention K/V computed once per context, export/kv_once.py, as the runtime's
                     unet_context + unet_kv pair does); cuda_graphs (the eager UNet captured once per shape with
                     torch.cuda.CUDAGraph and replayed); torch.compile (mode "reduce-overhead": compiled and CUDA
                     graphs) unless --no-compile; with each variant's peak GPU memory
    guided_loop      Brain-Diffuser's stage-2 loop (train/stage2/img2img.py `denoise`: DDIM, strength 0.75,
                     guidance 7.5) for each schedule length of --steps-of (50 -> the paper's 37 steps; 20 -> 15,
                     14 -> 10), each variant
    vdvae_decoder    the imagenet64 VDVAE decoder at K = 15 (train/foundations/vdvae.py VDVAEDecoder), fp32 and fp16
    vae_decoder      Stable Diffusion's AutoencoderKL decoder (64x64x4 latents -> 512 px), fp16
Each figure is the median of timed runs after warm-up, with torch.cuda.synchronize() around each; the results file
records the card, driver, torch/CUDA versions and which of TensorRT / onnxruntime-gpu were importable. `--size demo`
times the shipped demo-size UNet instead (8x8x4 latents, 65 + 77 tokens of 128); `--tiny` swaps in the tiny configs
(seconds on a CPU) so the script's own plumbing is tested without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

from brainrecon.benchmarks.common import machine, timed
from brainrecon.benchmarks.real_size import make_distinct, vd_unet_config, vd_vae_config


def gpu_machine(device: Any) -> dict[str, Any]:
    """`common.machine` plus the device, torch/CUDA, the card and driver, and TensorRT / onnxruntime-gpu presence."""
    import torch

    info: dict[str, Any] = machine() | {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    info["tensorrt_importable"] = importlib.util.find_spec("tensorrt") is not None
    info["onnxruntime_gpu"] = False
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        info["onnxruntime_gpu"] = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "capability": [props.major, props.minor]}
        info["memory_gb"] = round(props.total_memory / 2**30, 1)
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        try:
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown (nvidia-smi not runnable)"
    return info


def gpu_timed(fn: Any, device: Any, args: argparse.Namespace, repeats: int | None = None) -> dict[str, Any]:
    """common.timed with the device synchronised after every call."""
    import torch

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return timed(call, repeats or args.repeats, args.budget_s, warmup=args.warmup)


class KVOnceUNet:
    """The UNet with the cross-attention K/V of a context computed once per context tensor (export/kv_once.py), as
    the runtime's unet_context + unet_kv pair: `denoise` passes the same context at every step."""

    def __init__(self, unet: Any):
        self.unet, self.context, self.kv = unet, None, None

    def __call__(self, latents: Any, t: Any, encoder_hidden_states: Any) -> Any:
        from brainrecon.export.kv_once import context_kv, kv_cross_attention_kwargs

        if encoder_hidden_states is not self.context:
            self.context = encoder_hidden_states
            self.kv = kv_cross_attention_kwargs(context_kv(self.unet, encoder_hidden_states))
        return self.unet(latents, t, encoder_hidden_states=None, cross_attention_kwargs=self.kv)

    def parameters(self) -> Any:
        return self.unet.parameters()


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
            static = {"latents": latents.clone(), "context": encoder_hidden_states.clone()}
            static["t"] = torch.zeros(latents.shape[0], device=latents.device)
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

    def parameters(self) -> Any:
        return self.unet.parameters()


def unet_variants(unet: Any, args: argparse.Namespace, device: Any) -> list[tuple[str, Any]]:
    """The UNet variants; kv_once last, since its K/V form rewrites the dual blocks in place (same weights)."""
    import torch

    variants: list[tuple[str, Any]] = [("eager", unet)]
    if device.type == "cuda":
        variants.append(("cuda_graphs", GraphedUNet(unet)))
    if args.compile:
        mode = "reduce-overhead" if device.type == "cuda" else "default"  # reduce-overhead = CUDA graphs
        variants.append((f"compile:{mode}", torch.compile(unet, mode=mode, dynamic=False)))
    return [*variants, ("kv_once", KVOnceUNet(unet))]


def bench_unet(args: argparse.Namespace, device: Any, out: dict[str, Any]) -> None:
    import torch

    from brainrecon.sampling import SamplingConfig
    from brainrecon.train.foundations.dual_unet import DualUNetConfig, build_dual_unet, set_mix_ratio
    from brainrecon.train.stage2.img2img import denoise, vd_scheduler

    # CPU fp16 convolutions are slow or missing
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    # the shipped demo UNet: 8x8x4 latents (64 px), 65 vision + 77 text tokens of 128
    demo = functools.partial(DualUNetConfig, sample_size=8, vision_tokens=65, cross_attention_dim=128)
    config = {"tiny": DualUNetConfig.tiny, "demo": demo}.get(args.size, vd_unet_config)()
    unet = build_dual_unet(config).eval()
    make_distinct(unet, 0)
    set_mix_ratio(unet, config.mix_ratio)
    unet = unet.to(device, dtype).requires_grad_(False)
    out |= {"unet_parameters": sum(p.numel() for p in unet.parameters()), "unet_dtype": str(dtype)[6:]}
    side, tokens = config.sample_size, config.context_tokens
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        latents = torch.randn(batch, config.in_channels, side, side, generator=gen).to(device, dtype)
        cond = torch.randn(batch, tokens, config.cross_attention_dim, generator=gen).to(device, dtype) * 0.036
        uncond = torch.randn(1, tokens, config.cross_attention_dim, generator=gen).to(device, dtype) * 0.036
        pair = torch.cat([uncond.expand(batch, -1, -1), cond])  # (2B, Nv + Nt, D): the guidance layout
        pair_latents, t = torch.cat([latents, latents]), torch.full((2 * batch,), 981.0, device=device)
        for name, model in unet_variants(unet, args, device):
            key = f"b{batch}/{name}"
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                with torch.no_grad():
                    step = functools.partial(model, pair_latents, t, encoder_hidden_states=pair)
                    out["unet_step"][key] = gpu_timed(step, device, args)
                    out["guided_loop"][key] = {}
                    for steps_of in args.steps_of:
                        sampling = SamplingConfig(num_inference_steps=steps_of)
                        noise = torch.zeros_like(latents)
                        loop = functools.partial(
                            denoise, model, vd_scheduler(), latents, cond, uncond, sampling, noise
                        )
                        steps = int(sampling.num_inference_steps * sampling.strength)
                        out["guided_loop"][key][str(steps)] = gpu_timed(
                            loop, device, args, max(1, args.repeats // 3)
                        )
            except Exception as e:  # a variant this torch or GPU cannot run: record it, measure the rest
                out["unet_step"][key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            if device.type == "cuda":
                out["unet_step"][key]["peak_gpu_gb"] = round(
                    torch.cuda.max_memory_allocated(device) / 2**30, 2
                )
            print(
                f"[gpu-bench] unet {key}: step {out['unet_step'][key]}, loop {out['guided_loop'].get(key)}",
                flush=True,
            )
    del unet
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_decoders(args: argparse.Namespace, device: Any, out: dict[str, Any]) -> None:
    """The imagenet64 VDVAE decoder at K = 15 (fp32, and fp16 on a GPU: non-finite images are an error, fp16
    overflow) and Stable Diffusion's VAE decoder (fp16 on a GPU), per batch."""
    import torch
    from diffusers import AutoencoderKL

    from brainrecon.train.foundations.vdvae import VDVAE, VDVAEDecoder, vdvae_config

    tiny = args.size == "tiny"
    half = [torch.float16] if device.type == "cuda" else []
    models = []
    if "vdvae" in args.only:
        vdvae = VDVAE(vdvae_config("small64" if tiny else "imagenet64")).eval()
        make_distinct(vdvae, 0)
        decoder = VDVAEDecoder(vdvae, 5 if tiny else 15).eval()
        models += [
            ("vdvae_decoder", decoder, (decoder.latent_dims,), dtype) for dtype in [torch.float32, *half]
        ]
    if "vae" in args.only:
        config = vd_vae_config() | (
            {"block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4, "sample_size": 32} if tiny else {}
        )
        vae = AutoencoderKL(**config).eval()
        make_distinct(vae, 0)
        side = config["sample_size"] // 8
        models += [("vae_decoder", vae, (4, side, side), (half or [torch.float32])[0])]
    for name, module, shape, dtype in models:
        module = module.to(device, dtype).requires_grad_(False)
        for batch in args.batches:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch)).to(device, dtype)

            def run(module: Any = module, x: Any = x, name: str = name, dtype: Any = dtype) -> None:
                with torch.no_grad():
                    images = module(x) if name == "vdvae_decoder" else module.decode(x).sample
                if not torch.isfinite(images).all():
                    raise FloatingPointError(f"{name} {dtype}: non-finite images (fp16 overflow)")

            key = f"b{batch}/{str(dtype)[6:]}"
            try:
                out[name][key] = gpu_timed(run, device, args)
            except FloatingPointError as e:
                out[name][key] = {"error": str(e)}
            print(f"[gpu-bench] {name} {key}: {out[name][key]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu/gpu_bench.json"))
    p.add_argument(
        "--device", default="cuda", help="cuda (the benchmark) or cpu (plumbing checks with --tiny)"
    )
    p.add_argument(
        "--size", default="real", choices=("real", "demo", "tiny"), help="model sizes (demo: the UNet)"
    )
    p.add_argument(
        "--tiny", action="store_const", const="tiny", dest="size", help="= --size tiny: seconds on a CPU"
    )
    p.add_argument("--batches", default="1,8", help="images per call (the UNet runs 2x rows: the CFG pair)")
    p.add_argument("--steps-of", default="50,20,14", help="DDIM schedule lengths (strength 0.75 runs 3/4)")
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
    args.only = set(args.only.split(","))

    from brainrecon.io import write_json
    from brainrecon.train.device import resolve_device

    device = resolve_device(args.device)  # a missing GPU is a one-line DeviceError
    if device.type == "cpu" and args.size != "tiny":
        print("note: --device cpu without --tiny runs the real-size models on the CPU (tens of minutes)")
    t_start = time.perf_counter()
    out: dict[str, Any] = {"machine": gpu_machine(device), "size": args.size, "tiny": args.size == "tiny"}
    out |= {"unet_step": {}, "guided_loop": {}, "vdvae_decoder": {}, "vae_decoder": {}}
    if "unet" in args.only:
        bench_unet(args, device, out)
    bench_decoders(args, device, out)
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
