"""`recon-bench`, the two-stage benchmark: the torch-free runtime against the torch reference on the same exported
model directory, betas and sampling, with the per-part split, in one process.

Pipelines (PIPELINES; every chosen one runs once per repeat, interleaved, so that they share the machine's load):
    torch            the torch reference (train/stage2/img2img.py `img2img`, the loop `Stage2Model.reconstruct`
                     runs), eager fp32
    torch_best       the same in torch's fastest CPU mode found by `torch_modes` (bf16 autocast, channels-last,
                     torch.compile and combinations, measured on the UNet first; recorded with its pixel error)
    ort_fp32_plain   ONNX Runtime fp32, the plain UNet at every step (the runtime before K/V once)
    ort_fp32         ONNX Runtime fp32, the K/V-once UNet pair (the default runtime)
    ort_fp16         ONNX Runtime fp16 files (slower than fp32 on CPUs without fp16 matmuls)
    openvino_fp32    OpenVINO at f32 on the fp32 files, K/V once
    openvino_bf16    OpenVINO at bf16 (AMX) on the fp32 files, K/V once

Medians and their ratios are reported (compare ratios, not seconds: the machines here are shared). `curves` does the
same per batch size (one reconstruction of B images per call, B per model call) with p50/p95 per part, images/s and
the peak resident memory added during a call; `plot` draws latency and throughput against B. `check` compares
speedups with the floors of a targets file (CI's regression check, `make bench-check`). Both frameworks get the same
thread count and images per UNet call.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.benchmarks.common import machine, peak_gb, reset_peak
from brainrecon.io import read_json
from brainrecon.model_dir import STAGE2_SUMMARY

PARTS = ("stage1_s", "clip_s", "vae_encode_s", "unet_s", "vae_decode_s", "total_s")
# name -> RuntimeOptions keywords of the runtime pipelines (and "preset": a sampling preset of brainrecon/sampling.py
# PRESETS, against the torch reference's fitted sampling: what the preset saves end to end)
RUNTIME_PIPELINES: dict[str, dict[str, str]] = {
    "ort_fp32_plain": {"engine": "ort", "precision": "fp32", "unet_graph": "plain"},
    "ort_fp32": {"engine": "ort", "precision": "fp32", "unet_graph": "auto"},
    "ort_fp16": {"engine": "ort", "precision": "fp16", "unet_graph": "auto"},
    "openvino_fp32": {"engine": "openvino", "precision": "fp32", "unet_graph": "auto"},
    "openvino_bf16": {"engine": "openvino", "precision": "bf16", "unet_graph": "auto"},
    "ort_fp32_fast": {"engine": "ort", "precision": "fp32", "unet_graph": "auto", "preset": "fast"},
}
PIPELINES = ("torch", "torch_best", *RUNTIME_PIPELINES)
DEFAULT_PIPELINES = ("torch", "torch_best", "ort_fp32_plain", "ort_fp32", "openvino_fp32", "openvino_bf16")
# make bench-check: quick, and what the floors name
CI_PIPELINES = ("torch", "ort_fp32_plain", "ort_fp32", "ort_fp32_fast")
TORCH_MODES = ("eager", "channels_last", "bf16", "compile", "compile_bf16")
Run = Callable[
    [np.ndarray, int | None], tuple[np.ndarray, dict[str, float]]
]  # (betas, batch) → images, timings

# ----------------------------------------------------------------------------------------- torch


class _ModeUNet:
    """The UNet in a torch CPU mode, called as `denoise` calls it: unet(x, t, encoder_hidden_states=c).sample."""

    def __init__(self, unet: Any, mode: str):
        import torch

        if mode not in TORCH_MODES:
            raise ValueError(f"torch mode: expected one of {TORCH_MODES}, found {mode!r}")
        self.bf16, self.channels_last = mode.endswith("bf16"), mode == "channels_last"
        self.inner = unet.to(memory_format=torch.channels_last) if self.channels_last else unet
        self.unet = torch.compile(self.inner) if mode.startswith("compile") else self.inner
        self.config, self.parameters, self.modules = unet.config, self.inner.parameters, self.inner.modules

    def __call__(self, x: Any, t: Any, encoder_hidden_states: Any) -> Any:
        from types import SimpleNamespace

        import torch

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return SimpleNamespace(sample=out.float().contiguous())


class _AutocastVAE:
    """The VAE under bf16 autocast, for the bf16 torch modes. `encode_images` scales the posterior mean in bf16 and
    the loop gets it in float32 (`_Bf16Mean`), so that only the VAE and the UNet calls run in bf16."""

    def __init__(self, vae: Any):
        self.vae, self.config, self.parameters = vae, vae.config, vae.parameters

    def encode(self, x: Any) -> Any:
        from types import SimpleNamespace

        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean = self.vae.encode(x).latent_dist.mean
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=_Bf16Mean(mean)))

    def decode(self, z: Any) -> Any:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.vae.decode(z)


class _Bf16Mean:
    def __init__(self, mean: Any):
        self.mean = mean

    def __mul__(self, scale: float) -> Any:
        return (self.mean * scale).float()


class TorchReference:
    """The torch reference, part by part so that its time splits like the runtime's: stage 1, the CLIP ridges, then
    train/stage2/img2img.py `img2img` (the loop `Stage2Model.reconstruct` runs; it times its VAE and UNet phases),
    with the UNet and the VAE in torch CPU mode `mode` (TORCH_MODES; "eager" is the reference itself)."""

    def __init__(self, model_dir: Path, mode: str = "eager", model: Any = None):
        from brainrecon.train.reference import Stage2Model

        self.model = model if model is not None else Stage2Model.load(model_dir)
        self.unet = self.model.unet if mode == "eager" else _ModeUNet(self.model.unet, mode)
        self.vae = _AutocastVAE(self.model.vae) if mode.endswith("bf16") else self.model.vae

    def run(self, betas: np.ndarray, batch: int) -> tuple[np.ndarray, dict[str, float]]:
        """`batch` images per VAE/UNet call (the UNet sees 2 x batch rows), as the runtime splits them."""
        import torch

        from brainrecon.images import resize
        from brainrecon.train.stage2.img2img import img2img, vd_scheduler

        m, t = self.model, {}
        with torch.no_grad():
            t_all = t0 = time.perf_counter()
            # a single trial has no set to re-normalise over: skipped, as the runtime does
            renorm = None if len(betas) > 1 else False
            stage1 = m.stage1.reconstruct(betas, renorm)
            t["stage1_s"], t0 = time.perf_counter() - t0, time.perf_counter()
            ctx = {k: ridge.predict(betas, renormalize=renorm) for k, ridge in m.clip.items()}
            t["clip_s"], t0 = time.perf_counter() - t0, time.perf_counter()
            init, resize_s = resize(stage1, m.image_size), time.perf_counter() - t0
            images = img2img(
                self.unet, self.vae, vd_scheduler(), init,
                *(torch.from_numpy(x) for x in (ctx["vision"], ctx["text"], m.uncond["vision"], m.uncond["text"])),
                m.sampling, dual_config=m.dual_config, batch_size=batch, timings=t,
            )  # fmt: skip
            t["vae_encode_s"] += resize_s  # the runtime's encode part resizes too
            t["total_s"] = time.perf_counter() - t_all
        return images, t


def torch_modes(
    model_dir: Path, rows: int, threads: int, repeats: int = 5, modes: tuple[str, ...] = TORCH_MODES
) -> dict[str, Any]:
    """One UNet call of `rows` rows (a CFG batch) in each torch CPU mode, interleaved: median seconds, the max
    |difference| from eager fp32 over its scale, and the first call's seconds (torch.compile's compile time)."""
    import torch

    from brainrecon.train.reference import Stage2Model

    torch.set_num_threads(threads)
    model = Stage2Model.load(model_dir)
    unet, cfg, g = model.unet.eval(), model.dual_config, torch.Generator().manual_seed(0)
    x = torch.randn(
        rows, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g
    )
    t = torch.full((rows,), 501.0)
    ctx = torch.randn(rows, cfg.context_tokens, cfg.cross_attention_dim, generator=g) * 0.1
    out: dict[str, Any] = {"rows": rows, "threads": threads, "modes": {}}
    calls: dict[str, Callable[[], Any]] = {}
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=ctx).sample
        scale = float(reference.abs().max())
        for mode in modes:
            try:
                wrapped = _ModeUNet(unet, mode) if mode != "eager" else unet
                call = lambda w=wrapped: w(x, t, encoder_hidden_states=ctx).sample  # noqa: E731
                t0 = time.perf_counter()
                first = call()
                first_s = time.perf_counter() - t0
                call()
                err = float((first.float() - reference).abs().max()) / scale
                out["modes"][mode] = {"first_call_s": round(first_s, 3), "max_rel_err": float(f"{err:.3g}")}
                calls[mode] = call
            except Exception as e:  # a mode this torch/CPU cannot run is reported, not fatal
                out["modes"][mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            finally:
                unet.to(memory_format=torch.contiguous_format)
        times: dict[str, list[float]] = {m: [] for m in calls}
        for _ in range(repeats):
            for mode, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[mode].append(time.perf_counter() - t0)
    medians = {mode: statistics.median(ts) for mode, ts in times.items()}
    for mode, median in medians.items():
        out["modes"][mode] |= {
            "median_s": round(median, 5),
            "speedup_vs_eager": round(medians["eager"] / median, 3),
        }
    return out | {"best": min(medians, key=medians.__getitem__)}


# ----------------------------------------------------------------------------------------- runtime


def _open_pipelines(model_dir: Path, names: tuple[str, ...], threads: int, torch_best: str) -> dict[str, Run]:
    """name -> run(betas, batch) → (final images, part timings)."""
    from brainrecon.runtime import Reconstructor, RuntimeOptions

    runs: dict[str, Run] = {}
    reference = None
    for name in names:
        if name in ("torch", "torch_best"):
            mode = "eager" if name == "torch" else torch_best
            ref = TorchReference(model_dir, mode, model=None if reference is None else reference.model)
            reference = reference or ref
            runs[name] = lambda b, n, ref=ref: ref.run(b, n or 16)
        else:
            from brainrecon.sampling import PRESETS

            spec = dict(RUNTIME_PIPELINES[name])
            preset = PRESETS[spec.pop("preset", "paper")]
            rec = Reconstructor.open(model_dir, RuntimeOptions(threads=threads, **spec), stage=2)
            sampling = rec.sampling.with_overrides(**preset)

            def run(
                b: np.ndarray, n: int | None, rec: Any = rec, sampling: Any = sampling
            ) -> tuple[np.ndarray, dict[str, float]]:
                r = rec.reconstruct(b, sampling, batch_size=n)
                return r.images, {k: r.timings[k] for k in PARTS} | {"unet_batch": r.batch_sizes["unet"]}

            runs[name] = run
    return runs


def unet_flops(model_dir: Path) -> dict[str, float]:
    """FLOPs of one UNet row (one image of one CFG half, one step), torch's FlopCounterMode: the plain UNet and the
    K/V-once step (the contexts' K/V projections excluded: they run once per image, not per step)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from brainrecon.export.kv_once import context_kv, kv_cross_attention_kwargs
    from brainrecon.train.reference import Stage2Model

    model = Stage2Model.load(model_dir)
    unet, cfg = model.unet.eval(), model.dual_config
    x = torch.zeros(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    t, ctx = torch.full((1,), 501.0), torch.zeros(1, cfg.context_tokens, cfg.cross_attention_dim)
    with torch.no_grad():
        with FlopCounterMode(display=False) as plain:
            unet(x, t, encoder_hidden_states=ctx)
        kv = context_kv(unet, ctx)
        with FlopCounterMode(display=False) as step:
            unet(x, t, encoder_hidden_states=None, cross_attention_kwargs=kv_cross_attention_kwargs(kv))
    return {"plain": float(plain.get_total_flops()), "kv_step": float(step.get_total_flops())}


def matmul_ceilings(threads: int, n: int = 2048, repeats: int = 5, budget_s: float = 1.0) -> dict[str, float]:
    """GFLOP/s of a large square matmul in torch on `threads` threads, fp32 and bf16 (AMX where present).

    A CPU without native bf16 (or oneDNN capped below it, ONEDNN_MAX_CPU_ISA=AVX2) runs bf16 through a reference
    path hundreds of times slower: a 256 probe first picks the largest size (<= n) whose call fits `budget_s`.
    """
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        size = 256
        probe = torch.randn(size, size, dtype=dtype)
        probe @ probe  # the first call pays for kernel selection
        t0 = time.perf_counter()
        probe @ probe
        seconds_per_flop = (time.perf_counter() - t0) / (2 * size**3)
        while size < n and 2 * (2 * size) ** 3 * seconds_per_flop < budget_s:
            size *= 2
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t0)
        out[name] = round(2 * size**3 / min(ts) / 1e9, 1)
    return out


def bench(
    model_dir: Path,
    betas: np.ndarray,
    repeats: int,
    threads: int,
    pipelines: tuple[str, ...] = DEFAULT_PIPELINES,
    torch_best: str = "eager",
) -> dict[str, Any]:
    """Every pipeline on `betas` once per repeat, interleaved, after one warm-up round: medians, speedups against
    torch eager (and torch_best when run), pixel differences from torch eager, images/s."""
    import torch

    torch.set_num_threads(threads)
    runs = _open_pipelines(model_dir, pipelines, threads, torch_best)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    images: dict[str, np.ndarray] = {}
    batch = None
    for i in range(
        repeats + 1
    ):  # the first round warms up (sessions, caches, compilation) and is not counted
        for name in sorted(
            runs, key=lambda n: n.startswith("torch")
        ):  # the runtime first: torch gets its batch
            images[name], t = runs[name](betas, batch if name.startswith("torch") else None)
            batch = t.pop("unet_batch", batch)  # the runtime's images per UNet call
            if i:
                times[name].append(t)
    medians = {
        name: {k: round(statistics.median(r[k] for r in ts), 4) for k in PARTS} for name, ts in times.items()
    }
    out: dict[str, Any] = {"median_s": medians, "unet_images_per_call": batch, "torch_best_mode": torch_best}
    for name in runs:
        diff = np.abs(images[name].astype(int) - images["torch"].astype(int))
        out[name] = {
            "speedup_vs_torch": {
                k: round(medians["torch"][k] / max(medians[name][k], 1e-9), 2) for k in PARTS
            },
            "pixel_diff_vs_torch": {
                "mean": round(float(diff.mean()), 4),
                "max": int(diff.max()),
                "within_1": round(float((diff <= 1).mean()), 5),
                "mean_over_255": round(float(diff.mean()) / 255, 6),
            },
        }
        if "torch_best" in runs:
            best = medians["torch_best"]
            speedup = {k: round(best[k] / max(medians[name][k], 1e-9), 2) for k in ("unet_s", "total_s")}
            out[name]["speedup_vs_torch_best"] = speedup
    out["images_per_second"] = {name: round(len(betas) / medians[name]["total_s"], 2) for name in runs}
    return out


def unet_throughput(
    inference: dict[str, Any], flops: dict[str, float], n_images: int, steps: int, ceilings: dict[str, float]
) -> dict[str, Any]:
    """GFLOP/s of each pipeline's UNet loop: useful work (the plain UNet's FLOPs for 2 rows per image and step,
    whatever the graph does) and, for the K/V-once pipelines, the FLOPs their step graph executes; as fractions of
    the fp32 and bf16 matmul ceilings measured in the same run."""
    out = {}
    for name, med in inference["median_s"].items():
        rows = 2 * n_images * steps
        plain = name in ("torch", "torch_best", "ort_fp32_plain")
        executed = (flops["plain"] if plain else flops["kv_step"]) * rows / med["unet_s"] / 1e9
        out[name] = {
            "useful_gflops": round(flops["plain"] * rows / med["unet_s"] / 1e9, 1),
            "executed_gflops": round(executed, 1),
            "executed_fraction_of_fp32_ceiling": round(executed / ceilings["fp32"], 3),
            "executed_fraction_of_bf16_ceiling": round(executed / ceilings["bf16"], 3),
        }
    return out


# ----------------------------------------------------------------------------------------- curves


def curves(
    model_dir: Path,
    betas: np.ndarray,
    batches: tuple[int, ...],
    repeats: int,
    threads: int,
    pipelines: tuple[str, ...],
    torch_best: str = "eager",
) -> dict[str, Any]:
    """Per batch size B: B images reconstructed in one call (B images per model call), every pipeline once per
    repeat, interleaved, after a warm-up round (at the first B; at every B for torch.compile): p50/p95 per part,
    images/s at p50, peak resident memory added per call (VmHWM after the call over the resident memory before)."""
    import torch

    torch.set_num_threads(threads)
    runs = _open_pipelines(model_dir, pipelines, threads, torch_best)
    out: dict[str, Any] = {"batches": list(batches), "pipelines": {name: {} for name in runs}}
    for b in batches:
        if b > len(betas):
            raise ValueError(f"curves: batch {b} needs {b} betas, found {len(betas)}")
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        for i in range(repeats + 1):
            for name, run in runs.items():
                # one warm-up round at the first batch size; torch.compile also re-specialises on a new batch
                compiled = name == "torch_best" and torch_best.startswith("compile")
                if i == 0 and b != batches[0] and not compiled:
                    continue
                reset_peak()
                base = peak_gb()
                _, t = run(betas[:b], b)
                t["peak_added_gb"] = peak_gb() - base
                if i:
                    samples[name].append(t)
        for name, ts in samples.items():
            parts = {
                k: {q: round(float(np.percentile([s[k] for s in ts], q)), 4) for q in (50, 95)} for k in PARTS
            }
            out["pipelines"][name][str(b)] = {
                "stages_s": {k: {"p50": v[50], "p95": v[95]} for k, v in parts.items()},
                "images_per_second": round(b / parts["total_s"][50], 2),
                "peak_added_rss_mb": round(max(s["peak_added_gb"] for s in ts) * 1024, 1),
            }
    return out


def label_axes(axes_labels: tuple[tuple[Any, str], ...], batches: list[int], xlabel: str) -> None:
    """Batch-size axes of a curve plot: log2 x with a tick per batch size, a y label per axis, a light grid."""
    for ax, ylabel in axes_labels:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)


def plot(curve: dict[str, Any], path: Path, title: str) -> None:
    """Latency (p50 end to end, p95 as a band) and images/s against the batch size, one line per pipeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = curve["batches"]
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, per_batch in curve["pipelines"].items():
        p50, p95 = ([per_batch[str(b)]["stages_s"]["total_s"][q] for b in batches] for q in ("p50", "p95"))
        (line,) = ax_lat.plot(batches, p50, marker="o", label=name)
        ax_lat.fill_between(batches, p50, p95, color=line.get_color(), alpha=0.15)
        ax_thr.plot(
            batches, [per_batch[str(b)]["images_per_second"] for b in batches], marker="o", label=name
        )
    axes = ((ax_lat, "end-to-end latency, s (p50; band to p95)"), (ax_thr, "images / s (at p50)"))
    label_axes(axes, batches, "batch size (images per call)")
    ax_lat.set_yscale("log")
    ax_thr.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- records


def check(results: dict[str, Any], targets_path: Path) -> list[str]:
    """Speedup floors -> the list of misses (empty = pass). Two kinds, both ratios of the same run:
    "stage2_speedup_floor": {"ort_fp32": {"total_s": 2.0, ...}, ...}, over the torch reference;
    "stage2_speedup_over": {"ort_fp32": {"over": "ort_fp32_plain", "unet_s": 1.1}, ...}, over another runtime
    pipeline (both run as independent ONNX Runtime sessions, so the ratio does not swing with how torch's threads
    fare on a shared machine)."""
    targets = json.loads(targets_path.read_text())
    inference = results["inference"]
    misses = []

    def benchmarked(name: str) -> bool:
        if name not in inference:
            misses.append(f"{name}: not benchmarked (run it with --pipelines including {name})")
        return name in inference

    for name, floors in targets["stage2_speedup_floor"].items():
        if benchmarked(name):
            for part, floor in floors.items():
                found = inference[name]["speedup_vs_torch"][part]
                if found < floor:
                    misses.append(f"{name} {part}: speedup vs torch {found} < floor {floor}")
    for name, spec in targets.get("stage2_speedup_over", {}).items():
        base = spec["over"]
        if benchmarked(name) and benchmarked(base):
            for part, floor in ((p, f) for p, f in spec.items() if p != "over"):
                found = round(inference["median_s"][base][part] / inference["median_s"][name][part], 2)
                if found < floor:
                    misses.append(f"{name} {part}: speedup vs {base} {found} < floor {floor}")
    return misses


def _unet_steps(sampling: dict[str, Any]) -> int:
    from brainrecon.runtime.ddim import DDIMConfig, DDIMScheduler

    return len(DDIMScheduler(DDIMConfig()).timesteps(sampling["num_inference_steps"], sampling["strength"]))


def bench_and_write(
    model_dir: Path,
    betas_path: Path,
    out: Path,
    limit: int | None = None,
    repeats: int = 3,
    threads: int | None = None,
    targets: Path | None = None,
    note: str = "",
    pipelines: tuple[str, ...] = DEFAULT_PIPELINES,
    curve_batches: tuple[int, ...] = (),
    curve_repeats: int = 3,
    modes_record: dict[str, Any] | None = None,
    torch_candidates: tuple[str, ...] = TORCH_MODES,
    curve_pipelines: tuple[str, ...] | None = None,
) -> tuple[str, list[str]]:
    """What `recon-bench` does: the results record (machine, sampling, torch modes measured here or `modes_record`
    from an earlier `torch_modes` on this machine, medians, speedups, pixel differences, UNet GFLOP/s against the
    matmul ceilings) written to `out`; with `curve_batches` the curves into it and a PNG beside it; the floors of
    `targets` checked when given. Returns (summary line, floor misses)."""
    from brainrecon.io import load_npy, write_json

    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        raise ValueError(f"pipelines: expected names from {PIPELINES}, found {unknown}")
    all_betas = load_npy(betas_path, "z-scored betas")
    betas, threads = all_betas[:limit], threads or len(os.sched_getaffinity(0))
    sampling = read_json(model_dir / STAGE2_SUMMARY, "stage-2 summary")["sampling"]
    results: dict[str, Any] = {"machine": machine(threads), "model_dir": str(model_dir), "note": note}
    results |= {"betas": {"shape": list(betas.shape), "path": str(betas_path)}, "sampling": sampling}
    results |= {"repeats": repeats}
    torch_best = "eager"
    if "torch_best" in pipelines:
        results["torch_modes"] = modes_record or torch_modes(model_dir, 32, threads, modes=torch_candidates)
        torch_best = results["torch_modes"]["best"]
    results["inference"] = bench(model_dir, betas, repeats, threads, pipelines, torch_best)
    results["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    results["unet_flops_per_row"] = unet_flops(model_dir)
    results["matmul_ceiling_gflops"] = ceilings = matmul_ceilings(threads)
    flops, steps = results["unet_flops_per_row"], _unet_steps(sampling)
    results["unet_loop_gflops"] = unet_throughput(results["inference"], flops, len(betas), steps, ceilings)
    write_json(out, results)  # the main run is kept if the curves are interrupted
    if curve_batches:
        curve = curves(
            model_dir,
            all_betas,
            curve_batches,
            curve_repeats,
            threads,
            curve_pipelines or pipelines,
            torch_best,
        )
        png = out.with_name(out.stem + "_curves.png")
        title = f"two-stage reconstruction, {threads} threads, {steps} guided UNet steps (torch_best = {torch_best})"
        plot(curve, png, title)
        results["curves"] = curve | {"plot": png.name}
        write_json(out, results)
    med, inf = results["inference"]["median_s"], results["inference"]
    line = [f"{len(betas)} images: torch {med['torch']['total_s']:.2f} s"]
    line += [
        f"{n} {m['total_s']:.2f} s ({inf[n]['speedup_vs_torch']['total_s']}x)"
        for n, m in med.items()
        if n != "torch"
    ]
    return f"{' | '.join(line)} -> {out}", check(results, targets) if targets is not None else []
