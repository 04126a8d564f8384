"""Stage-2 runtime (numpy): Brain-Diffuser's Versatile Diffusion img2img refinement of the stage-1 image.

The torch reference is `brainrecon.train.stage2.fit.Stage2Model.reconstruct` (and `train/stage2/img2img.py img2img`,
`denoise`, `encode_images`, `decode_latents`); this pipeline runs the exported ONNX files or TensorRT engines
listed in `model_dir/manifest.json`, after re-hashing every file it reads, with the numpy DDIM of `ddim.py`.
No torch, diffusers or transformers import, here or below (a test enforces it).

    betas (N, V) ──Stage1Pipeline──► stage-1 images (N, s, s, 3) uint8 ──resize (PIL bicubic)──► (N, S, S, 3)
      ──/127.5 − 1, NCHW──► vae_encoder ──► init latents (N, 4, h, w), already × vae_scale_factor
    betas ──clip_text / clip_vision──► (N, Nt, D), (N, Nv, D) ──renormalize over the set──► cond context
      (N, Nv + Nt, D), vision tokens first
    noise = img2img_noise((N, 4, h, w), seed), drawn once for the whole set ──add_noise(t0)──► x
      K/V once (when exported): unet_context(uncond) once at load, unet_context(cond chunk) once per chunk
      for t in timesteps: unet([x; x], t, K/V of [uncond × b; cond]) → eps_u, eps_c   (unet_kv; plain: the contexts)
                          eps = eps_u + guidance_scale (eps_c − eps_u); x = ddim.step(eps, t, x)
      ──vae_decoder──► (N, 3, S, S) ≈ [−1, 1] ──((x + 1) · 127.5).round().clip(0, 255)──► uint8 (N, S, S, 3)

Every image's noise and CLIP statistics are computed over the whole input set before any batching, so the result
does not depend on how the set is split into model calls (the UNet sees twice the image batch: [uncond; cond]).
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon import model_dir as layout
from brainrecon.config import config_from_dict
from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.images import resize
from brainrecon.io import load_npy, read_json
from brainrecon.manifest import MANIFEST_FILE, Manifest, load_manifest
from brainrecon.noise import img2img_noise, img2img_noise_per_row
from brainrecon.normalize import renormalize_predictions
from brainrecon.runtime.artifacts import check_engine, file_precision, load_model, verify_files
from brainrecon.runtime.backends.base import Backend, ModelIO
from brainrecon.runtime.backends.ort import OrtBackend
from brainrecon.runtime.ddim import DDIMConfig, DDIMScheduler
from brainrecon.runtime.stage1 import (
    Progress,
    Stage1Pipeline,
    Stage1Result,
    check_betas,
)
from brainrecon.sampling import SamplingConfig

CLIP_TARGETS = layout.CLIP_TARGETS
MODELS = layout.STAGE2_MODELS
KV_MODELS = layout.STAGE2_KV_MODELS  # unet_context + unet_kv: the K/V-once UNet (export/contracts.py)
# "kv": the cross-attention K/V of the contexts computed once (unet_context), the step on them (unet_kv);
# "plain": the context-taking `unet` at every step; "auto": kv when the model folder has it, else plain.
UNET_GRAPHS = ("auto", "kv", "plain")
SUMMARY = layout.STAGE2_SUMMARY
SCHEDULER = layout.SCHEDULER
SCHEDULER_FORMAT = ("brainrecon.ddim_tables", 1)
# What the pipeline reads besides the models (all hash-verified through the manifest first); scheduler.json is
# written by recon-export: diffusers' DDIM tables for the fitted sampling.
STAGE2_DATA = (*layout.STAGE2_FILES, SCHEDULER)
# A CPU UNet session holds its weights plus ONNX Runtime's pre-packed copies of them: budget twice the file size.
SESSION_MEMORY_FACTOR = 2
# diffusers DDIMScheduler settings that runtime/ddim.py implements and does not take as parameters
SCHEDULER_FIXED = {"clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "leading"}
# numpy's float32 table path lands within 6e-8 of diffusers' (runtime/ddim.py docstring)
ALPHA_ATOL = 1e-6


@dataclass(frozen=True)
class Stage2Result:
    stage1: Stage1Result  # .images (N, s, s, 3) uint8, .timings: the stage-1 split
    images: np.ndarray  # (N, S, S, 3) uint8, the final reconstructions
    latents: np.ndarray  # (N, 4, h, w) float32, scaled: what the VAE decoder got (init latents at strength 0)
    sampling: SamplingConfig  # as run (overrides applied)
    timesteps: np.ndarray  # (T,) int64, the UNet timesteps (empty at strength 0)
    timings: dict[str, float]  # seconds: stage1_s, clip_s, vae_encode_s, unet_s, vae_decode_s, total_s
    providers: dict[str, list[str]]  # model -> providers actually used
    renormalized: dict[str, bool]  # "stage1", "clip": whether the transductive re-normalisation ran
    batch_sizes: dict[str, int]  # images per call; the UNet gets twice its value
    fallback: dict[str, str]  # model -> GPU provider fallback, when allowed and it happened


def default_memory_budget() -> int:
    """Half of this machine's physical memory, in bytes: what the CPU UNet sessions may hold by default."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def model_bytes(manifest: Manifest, model: str, precision: str) -> int:
    """Bytes of an exported model's ONNX file and its external data, as recorded in the manifest."""
    onnx = manifest.find("onnx", model, precision)
    if onnx is None:
        return 0
    return onnx.size + sum(a.size for path in onnx.external_data if (a := manifest.get(path)) is not None)


def unet_session_count(cores: int, weight_bytes: int, budget_bytes: int) -> int:
    """How many 1-thread CPU UNet sessions to run side by side: one per core, each denoising its own chunk of
    images (on 2 cores 1.25x faster than one 2-thread session: small per-op work scales poorly across threads),
    but no more than the memory budget holds, since every session keeps its own copy of the weights (a Versatile
    Diffusion UNet is 3.4 GB in fp32). At least one."""
    per_session = max(1, SESSION_MEMORY_FACTOR * weight_bytes)
    return max(1, min(cores, budget_bytes // per_session))


def _not_exported(model_dir: Path, what: str) -> MissingFileError:
    return MissingFileError(
        model_dir / MANIFEST_FILE,
        what,
        f"stage 2 is not exported; export it with: recon-export --model-dir {model_dir} --stage all",
    )


def _shape(io: ModelIO, which: str, index: int = 0) -> tuple[int | str, ...]:
    return (io.inputs if which == "in" else io.outputs)[index][1]


class Stage2Pipeline:
    """Stage 1 + stage 2 over exported models. Build with `from_model_dir`; `run(betas)` → `Stage2Result`."""

    def __init__(
        self,
        stage1: Stage1Pipeline,
        backends: dict[str, Backend],
        ios: dict[str, ModelIO],
        target_stats: dict[str, tuple[np.ndarray, np.ndarray]],
        uncond: dict[str, np.ndarray],
        sampling: SamplingConfig,
        scheduler: DDIMScheduler,
        renormalize: bool = True,
        info: dict[str, Any] | None = None,
        unet_workers: list[Backend] | None = None,
    ):
        self.stage1 = stage1
        self.backends, self.ios = backends, ios
        # UNet sessions that denoise image chunks in parallel (see `from_model_dir`); one by default
        # backends["unet"] is the UNet step: the exported `unet_kv` when "unet_context" is loaded too (K/V once:
        # the contexts' cross-attention K/V computed once, see export/contracts.py), else the plain `unet`
        self.kv_once = "unet_context" in backends
        self.unet_workers = unet_workers or [backends["unet"]]
        self.sampling = sampling
        self.scheduler = scheduler
        self.renormalize = renormalize
        self.info = info or {}
        source = self.info.get("model_dir", "model directory")
        # geometry from the exported contracts; every pair of models must agree
        self.tokens = {name: int(_shape(ios[f"clip_{name}"], "out")[1]) for name in CLIP_TARGETS}
        self.clip_dim = int(_shape(ios["clip_text"], "out")[2])
        self.image_size = int(_shape(ios["vae_encoder"], "in")[2])  # S
        self.latent_shape = tuple(int(d) for d in _shape(ios["vae_encoder"], "out")[1:])  # (4, h, w)
        context = (self.tokens["vision"] + self.tokens["text"], self.clip_dim)
        # where the context enters: unet_context's only input, or the plain unet's third
        context_input = (ios["unet_context"], "in", 0) if self.kv_once else (ios["unet"], "in", 2)
        found = {
            "clip_vision dim": int(_shape(ios["clip_vision"], "out")[2]),
            "vae_decoder latents": tuple(int(d) for d in _shape(ios["vae_decoder"], "in")[1:]),
            "vae_decoder images": tuple(int(d) for d in _shape(ios["vae_decoder"], "out")[1:]),
            "unet sample": tuple(int(d) for d in _shape(ios["unet"], "in", 0)[1:]),
            "unet context": tuple(int(d) for d in _shape(*context_input)[1:]),
        }
        expected = {
            "clip_vision dim": self.clip_dim,
            "vae_decoder latents": self.latent_shape,
            "vae_decoder images": (3, self.image_size, self.image_size),
            "unet sample": self.latent_shape,
            "unet context": context,
        }
        for key, want in expected.items():
            if found[key] != want:
                raise ConfigError(
                    f"{source}: exported stage-2 models disagree: expected {key} {want}, found {found[key]}"
                )
        for name in CLIP_TARGETS:
            shape = (self.tokens[name], self.clip_dim)
            mean, std = target_stats[name]
            if mean.shape != shape or std.shape != shape:
                raise InputError(
                    f"{source}/stage2/clip_{name}_target_{{mean,std}}.npy",
                    f"shape {shape} (clip_{name} output)",
                    f"{mean.shape}, {std.shape}",
                )
            if uncond[name].shape != (1, *shape):
                raise InputError(
                    f"{source}/stage2/uncond_{name}.npy", f"shape {(1, *shape)}", f"{uncond[name].shape}"
                )
        # (T·D,) float32, the layout of train/stage2/clip_ridge.py's flattened predictions
        self.target_stats = {
            name: (np.asarray(m, np.float32).ravel(), np.asarray(s, np.float32).ravel())
            for name, (m, s) in target_stats.items()
        }
        # (1, Nv + Nt, D), vision tokens first as the UNet's dual blocks split them
        self.uncond_context = np.concatenate([uncond["vision"], uncond["text"]], axis=1, dtype=np.float32)
        if self.kv_once:
            context_outputs = [name for name, _, _ in ios["unet_context"].outputs]
            step_inputs = [name for name, _, _ in ios["unet"].inputs][2:]
            if context_outputs != step_inputs:
                raise ConfigError(
                    f"{source}: exported stage-2 models disagree: expected unet_kv K/V inputs {context_outputs} "
                    f"(unet_context outputs), found {step_inputs}"
                )
            # the unconditional context's K/V, (1, ...) each: computed once, repeated per chunk
            self.uncond_kv = backends["unet_context"].run({"encoder_hidden_states": self.uncond_context})

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        engine: str = "ort",
        precision: str = "fp32",
        device: str = "cpu",
        allow_cpu_fallback: bool = False,
        threads: int | None = None,
        manifest: Manifest | None = None,
        memory_budget_bytes: int | None = None,
        unet_graph: str = "auto",
    ) -> Stage2Pipeline:
        """Load stage 1 and the five stage-2 models of `model_dir` after verifying the hash of every file read
        (against `manifest` when the caller has parsed it already). On the CPU the UNet runs as several sessions
        (`unet_session_count`), as many as `memory_budget_bytes` allows (default: half the machine's memory).
        `unet_graph` (UNET_GRAPHS) picks the K/V-once UNet pair or the plain UNet."""
        model_dir = Path(model_dir)
        check_engine(engine, precision)
        if unet_graph not in UNET_GRAPHS:
            raise InputError("unet_graph", f"one of {UNET_GRAPHS}", repr(unet_graph))
        if not (model_dir / SUMMARY).is_file():
            raise MissingFileError(
                model_dir / SUMMARY,
                "stage-2 model (CLIP regressors)",
                f"fit it with: recon-train subject --stage clip, then export with: "
                f"recon-export --model-dir {model_dir} --stage all",
            )
        manifest = manifest or load_manifest(model_dir)
        # a UNet graph of any precision says stage 2 was exported: the plain unet, or the K/V-once pair alone
        # (recon-export --unet-graph kv)
        has_unet = manifest.find("onnx", "unet") is not None or all(
            manifest.find("onnx", name) is not None for name in KV_MODELS
        )
        if manifest.get(SUMMARY) is None or not has_unet:
            raise _not_exported(
                model_dir,
                "stage-2 entries (stage2/stage2.json, unet or unet_context + unet_kv, vae, clip models)",
            )
        has_kv = all(manifest.find("onnx", name, file_precision(precision)) is not None for name in KV_MODELS)
        if unet_graph == "kv" and not has_kv:
            raise _not_exported(
                model_dir, f"unet_context and unet_kv {precision} entries (the K/V-once UNet)"
            )
        if unet_graph == "plain" and manifest.find("onnx", "unet", file_precision(precision)) is None:
            raise MissingFileError(
                model_dir / MANIFEST_FILE,
                f"a unet {precision} entry (the plain UNet), found "
                + ("unet_context and unet_kv only" if has_kv else "none"),
                f"export it with: recon-export --model-dir {model_dir} --stage stage2 --unet-graph plain"
                + (", or run the pair: unet_graph auto or kv" if has_kv else ""),
            )
        use_kv = has_kv and unet_graph != "plain"
        unet = "unet_kv" if use_kv else "unet"  # the UNet step's file; its role is "unet" either way
        roles = {
            **{m: m for m in MODELS},
            **({"unet_context": "unet_context", "unet": unet} if use_kv else {}),
        }
        verify_files(manifest, model_dir, STAGE2_DATA)
        summary = read_json(model_dir / SUMMARY, "stage-2 summary")
        sampling = config_from_dict(SamplingConfig, summary["sampling"], str(model_dir / SUMMARY))
        scheduler = load_scheduler(model_dir, sampling)
        stage1 = Stage1Pipeline.from_model_dir(
            model_dir, engine, precision, device, allow_cpu_fallback, threads, manifest
        )
        unet_sessions = 1
        if engine in ("ort", "openvino") and device == "cpu":
            unet_sessions = unet_session_count(
                threads or len(os.sched_getaffinity(0)),
                model_bytes(manifest, unet, file_precision(precision)),
                memory_budget_bytes if memory_budget_bytes is not None else default_memory_budget(),
            )
        backends, ios, files = {}, {}, {}
        for name, artifact in roles.items():
            model_threads = 1 if name == "unet" and unet_sessions > 1 else threads
            backends[name], ios[name], files[name], constants = load_model(
                manifest, model_dir, artifact, engine, precision, device, allow_cpu_fallback, model_threads
            )
            # what a graph has baked in must be what stage2.json says the model samples with
            for key, value in constants.items():
                if key in ("mix_ratio", "vae_scale_factor") and not math.isclose(
                    value, getattr(sampling, key), rel_tol=1e-6
                ):
                    raise ConfigError(
                        f"{model_dir / files[name]}: expected {key} {getattr(sampling, key)} (stage2/stage2.json), "
                        f"found {value} baked in (re-export with: recon-export --model-dir {model_dir} --stage all)"
                    )

        # the file is verified once (load_model above); the further sessions open the same verified file
        def unet_worker() -> Backend:
            if engine == "openvino":
                from brainrecon.runtime.backends.openvino import OpenVinoBackend

                return OpenVinoBackend(model_dir / files["unet"], ios["unet"], precision, 1)
            return OrtBackend(model_dir / files["unet"], ios["unet"], device, allow_cpu_fallback, 1)

        workers = [backends["unet"]] + [unet_worker() for _ in range(unet_sessions - 1)]
        return cls(
            stage1,
            backends,
            ios,
            target_stats={
                name: tuple(
                    load_npy(model_dir / layout.clip_target_stat(name, stat), f"CLIP-{name} target {stat}")
                    for stat in ("mean", "std")
                )
                for name in CLIP_TARGETS
            },
            uncond={
                name: load_npy(model_dir / layout.uncond_context(name), f"unconditional CLIP-{name} context")
                for name in CLIP_TARGETS
            },
            sampling=sampling,
            scheduler=scheduler,
            renormalize=bool(summary.get("config", {}).get("renormalize", True)),
            info={**stage1.info, "files": {**stage1.info["files"], **files}, "model_dir": str(model_dir)},
            unet_workers=workers,
        )

    # ------------------------------------------------------------------------- checks

    def sampling_for(
        self,
        seed: int | None = None,
        num_inference_steps: int | None = None,
        strength: float | None = None,
        guidance_scale: float | None = None,
        mix_ratio: float | None = None,
    ) -> SamplingConfig:
        """The fitted sampling with overrides. The mix ratio is baked into the exported UNet: only its value."""
        if mix_ratio is not None and not math.isclose(mix_ratio, self.sampling.mix_ratio, abs_tol=1e-9):
            raise ConfigError(
                f"{self.info.get('files', {}).get('unet', 'unet')}: expected mix ratio "
                f"{self.sampling.mix_ratio} (baked into the exported UNet graph), found {mix_ratio} "
                "(a different ratio needs a re-export of the UNet)"
            )
        overrides = {
            "seed": seed,
            "num_inference_steps": num_inference_steps,
            "strength": strength,
            "guidance_scale": guidance_scale,
        }
        sampling = dataclasses.replace(self.sampling, **{k: v for k, v in overrides.items() if v is not None})
        # a schedule the scheduler cannot build (too many steps for the offset, ...) fails here, before any work
        self.scheduler.timesteps(sampling.num_inference_steps, sampling.strength)
        return sampling

    def batch_limits(self) -> dict[str, tuple[int, int]]:
        """Images per call allowed by each model's profile, [lo, hi]; the UNet sees twice the image batch."""
        limits = {
            "stage1": (
                max(self.stage1.regressor_io.min_batch, self.stage1.decoder_io.min_batch),
                self.stage1.max_batch(),
            ),
            **{
                name: (self.ios[name].min_batch, self.ios[name].max_batch)
                for name in MODELS
                if name != "unet"
            },
        }
        unet = self.ios["unet"]
        limits["unet"] = ((unet.min_batch + 1) // 2, unet.max_batch // 2)
        return limits

    def check_inputs(
        self,
        betas: Any,
        batch_size: int | None = None,
        renormalize: bool | None = None,
        source: str = "betas",
    ) -> tuple[np.ndarray, dict[str, int], dict[str, bool]]:
        """Validate before any work: betas, the batch against every profile, the set size for re-normalisation.

        `renormalize=None` applies what each stage was fitted with, except for a single trial, where the
        statistics over the set do not exist and it is skipped (as `--no-renormalize`; recorded in the result).
        """
        betas = check_betas(betas, self.stage1.n_voxels, source)
        limits = self.batch_limits()
        if batch_size is None:
            batches = {name: hi for name, (_, hi) in limits.items()}
            # The UNet at its profile's opt batch: per row, ONNX Runtime on the CPU was fastest at 16-64 rows
            # (4.2-4.5 ms) and slower at 128 (4.6 ms) on the demo UNet; a GPU engine is tuned for opt as well.
            unet = self.ios["unet"]
            opt_rows = unet.profile[unet.inputs[0][0]]["opt"][0]
            batches["unet"] = max(limits["unet"][0], min(limits["unet"][1], opt_rows // 2))
        else:
            lo = max(lo for lo, _ in limits.values())
            hi = min(hi for _, hi in limits.values())
            if not lo <= int(batch_size) <= hi:
                raise InputError(
                    "batch size",
                    f"{lo}..{hi} images (the engines' shape profiles; the UNet runs 2 x batch)",
                    f"{batch_size}",
                )
            batches = dict.fromkeys(limits, int(batch_size))
        if renormalize and len(betas) < 2:
            raise InputError(
                source,
                "at least 2 trials (re-normalisation takes statistics over the set; or disable it)",
                f"{len(betas)}",
            )
        single = len(betas) < 2
        renorm = {
            "stage1": (self.stage1.renormalize if renormalize is None else renormalize) and not single,
            "clip": (self.renormalize if renormalize is None else renormalize) and not single,
        }
        return betas, batches, renorm

    # ------------------------------------------------------------------------- run

    def run(
        self,
        betas: np.ndarray,
        seed: int | None = None,
        num_inference_steps: int | None = None,
        strength: float | None = None,
        guidance_scale: float | None = None,
        mix_ratio: float | None = None,
        batch_size: int | None = None,
        renormalize: bool | None = None,
        progress: Progress | None = None,
    ) -> Stage2Result:
        """(N, V) z-scored betas → stage-1 and final images. Sampling defaults to the fitted one (`stage2.json`);
        `progress(step, done, total)` is called for the steps regressor, decoder (stage 1), clip_text,
        clip_vision, vae_encoder, unet (one tick per UNet call), vae_decoder."""
        sampling = self.sampling_for(seed, num_inference_steps, strength, guidance_scale, mix_ratio)
        return self.run_checked(
            *self.check_inputs(betas, batch_size, renormalize), sampling, progress=progress
        )

    def run_checked(
        self,
        betas: np.ndarray,
        batches: dict[str, int],
        renorm: dict[str, bool],
        sampling: SamplingConfig,
        seeds: np.ndarray | None = None,
        progress: Progress | None = None,
    ) -> Stage2Result:
        """`run` on what `check_inputs` and `sampling_for` returned (nothing is checked again). The img2img noise
        is drawn once for the whole set from `sampling.seed`, or, with `seeds` (N,), per row from its own seed
        (`brainrecon.noise`): then a row's image does not depend on the other rows or on batching."""
        n = len(betas)
        timesteps = self.scheduler.timesteps(sampling.num_inference_steps, sampling.strength)  # (T,) int64
        timings: dict[str, float] = {}
        t_all = time.perf_counter()

        t0 = time.perf_counter()
        stage1 = self.stage1.run_checked(betas, batches["stage1"], renorm["stage1"], progress)
        timings["stage1_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        contexts = {
            name: self._predict_clip(name, betas, batches[f"clip_{name}"], renorm["clip"], progress)
            for name in CLIP_TARGETS
        }
        cond_context = np.concatenate([contexts["vision"], contexts["text"]], axis=1)  # (N, Nv + Nt, D)
        timings["clip_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        init_images = resize(stage1.images, self.image_size)  # (N, S, S, 3) uint8
        init_latents = self._encode(init_images, batches["vae_encoder"], progress)  # (N, 4, h, w)
        timings["vae_encode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        noise = (
            img2img_noise(init_latents.shape, sampling.seed)  # the whole set at once: batch-independent
            if seeds is None
            else img2img_noise_per_row(init_latents.shape, seeds)
        )
        latents = self._denoise(
            init_latents, noise, cond_context, sampling, timesteps, batches["unet"], progress
        )
        timings["unet_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        images = self._decode(latents, batches["vae_decoder"], progress)  # (N, S, S, 3) uint8
        timings["vae_decode_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_all
        timings["per_image_ms"] = 1000.0 * timings["total_s"] / n

        return Stage2Result(
            stage1=stage1,
            images=images,
            latents=latents,
            sampling=sampling,
            timesteps=timesteps,
            timings={k: round(v, 6) for k, v in timings.items()},
            providers={**stage1.providers, **{k: list(b.providers) for k, b in self.backends.items()}},
            renormalized=renorm,
            batch_sizes=batches,
            fallback={
                **stage1.fallback,
                **{k: fb for k, b in self.backends.items() if (fb := getattr(b, "fallback", None))},
            },
        )

    def _run_batched(self, name: str, x: np.ndarray, batch: int, progress: Progress | None) -> np.ndarray:
        io = self.ios[name]
        chunks = []
        for i in range(0, len(x), batch):
            chunks.append(self.backends[name].run({io.input_name: x[i : i + batch]})[io.output_name])
            if progress:
                progress(name, min(i + batch, len(x)), len(x))
        return np.concatenate(chunks)

    def _predict_clip(
        self, name: str, betas: np.ndarray, batch: int, renorm: bool, progress: Progress | None
    ) -> np.ndarray:
        """(N, V) → (N, T, D) float32, re-normalised over the set like `train/stage2/clip_ridge.py ClipRidge.predict`."""
        pred = self._run_batched(f"clip_{name}", betas, batch, progress)  # (N, T, D)
        if renorm:
            flat = renormalize_predictions(pred.reshape(len(pred), -1), *self.target_stats[name])  # (N, T·D)
            pred = flat.reshape(pred.shape)
        return np.ascontiguousarray(pred, dtype=np.float32)

    def _encode(self, images: np.ndarray, batch: int, progress: Progress | None) -> np.ndarray:
        """uint8 (N, S, S, 3) → scaled latents (N, 4, h, w), as `train/stage2/img2img.py encode_images` (float32 maths)."""
        pixels = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(127.5) - np.float32(1.0)
        return self._run_batched("vae_encoder", np.ascontiguousarray(pixels), batch, progress)

    def _decode(self, latents: np.ndarray, batch: int, progress: Progress | None) -> np.ndarray:
        """Scaled latents (N, 4, h, w) → uint8 (N, S, S, 3), as `train/stage2/img2img.py decode_latents`."""
        x = self._run_batched("vae_decoder", latents, batch, progress)  # (N, 3, S, S) ≈ [-1, 1]
        x = np.clip(np.rint((x + np.float32(1.0)) * np.float32(127.5)), 0, 255)  # rint: torch.round's ties
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1).astype(np.uint8))

    def _denoise(
        self,
        init_latents: np.ndarray,  # (N, 4, h, w)
        noise: np.ndarray,  # (N, 4, h, w)
        cond_context: np.ndarray,  # (N, Nv + Nt, D)
        sampling: SamplingConfig,
        timesteps: np.ndarray,  # (T,) int64
        batch: int,
        progress: Progress | None,
    ) -> np.ndarray:
        """`train/stage2/img2img.py denoise`: noise to timesteps[0], then eta-0 DDIM with classifier-free guidance.

        Image chunks of at most `batch` are denoised independently, in parallel over `self.unet_workers`."""
        if len(timesteps) == 0:  # strength 0: nothing is re-noised, the VAE round trip comes back
            return init_latents
        n = len(init_latents)
        latents = self.scheduler.add_noise(init_latents, noise, int(timesteps[0]))  # (N, 4, h, w)
        chunk = min(batch, math.ceil(n / len(self.unet_workers)))  # every worker gets work when n allows
        parts = [slice(i, i + chunk) for i in range(0, n, chunk)]
        free: queue.SimpleQueue[Backend] = queue.SimpleQueue()
        for worker in self.unet_workers:
            free.put(worker)
        lock, calls, total = threading.Lock(), [0], len(parts) * len(timesteps)

        def tick() -> None:
            with lock:
                calls[0] += 1
                if progress:
                    progress("unet", calls[0], total)

        def run(part: slice) -> np.ndarray:
            backend = free.get()
            try:
                return self._denoise_chunk(
                    backend, latents[part], cond_context[part], sampling, timesteps, tick
                )
            finally:
                free.put(backend)

        if len(self.unet_workers) == 1 or len(parts) == 1:
            return np.concatenate([run(part) for part in parts])
        with ThreadPoolExecutor(len(self.unet_workers)) as pool:  # ORT releases the GIL while it runs
            return np.concatenate(list(pool.map(run, parts)))

    def _denoise_chunk(
        self,
        backend: Backend,
        x: np.ndarray,  # (b, 4, h, w) noised latents
        cond_context: np.ndarray,  # (b, Nv + Nt, D)
        sampling: SamplingConfig,
        timesteps: np.ndarray,
        tick: Callable[[], None],
    ) -> np.ndarray:
        b = len(x)
        guidance = np.float32(sampling.guidance_scale)
        if self.kv_once:
            # K/V once: the chunk's contexts → K/V here, the unconditional K/V were computed at load
            cond_kv = self.backends["unet_context"].run({"encoder_hidden_states": cond_context})
            conditioning = {
                name: np.concatenate([np.repeat(self.uncond_kv[name], b, axis=0), kv])  # (2b, ...)
                for name, kv in cond_kv.items()
            }
        else:
            conditioning = {
                "encoder_hidden_states": np.concatenate(
                    [np.repeat(self.uncond_context, b, axis=0), cond_context]
                )  # (2b, Nv + Nt, D)
            }
        for t in timesteps:
            inputs = {
                "sample": np.concatenate([x, x]),  # (2b, 4, h, w), [uncond; cond]
                "timestep": np.full((2 * b,), t, dtype=np.float32),  # (2b,)
                **conditioning,
            }
            eps = backend.run(inputs)["noise_pred"]  # (2b, 4, h, w)
            eps_uncond, eps_cond = eps[:b], eps[b:]
            x = self.scheduler.step(
                eps_uncond + guidance * (eps_cond - eps_uncond), int(t), x, sampling.num_inference_steps
            )
            tick()
        return x


def load_scheduler(model_dir: Path, sampling: SamplingConfig) -> DDIMScheduler:
    """The numpy DDIM of `stage2/scheduler.json` (hash-verified by the caller), checked against the diffusers
    tables recorded there for the fitted sampling: same timesteps, alphas within ALPHA_ATOL."""
    path = model_dir / SCHEDULER
    data = read_json(path, "stage-2 DDIM tables (recon-export)")
    found = (data.get("format"), data.get("version"))
    if found != SCHEDULER_FORMAT:
        raise ConfigError(f"{path}: expected format/version {SCHEDULER_FORMAT}, found {found}")
    settings = dict(data["scheduler"])
    for key, want in SCHEDULER_FIXED.items():
        if settings.pop(key, want) != want:
            raise ConfigError(
                f"{path}: expected scheduler {key} {want!r} (what runtime/ddim.py implements), "
                f"found {data['scheduler'][key]!r}"
            )
    scheduler = DDIMScheduler(DDIMConfig.from_dict(settings, str(path)))
    recorded = config_from_dict(SamplingConfig, data["sampling"], str(path))
    if (recorded.num_inference_steps, recorded.strength) != (sampling.num_inference_steps, sampling.strength):
        raise ConfigError(
            f"{path}: expected the tables of stage2/stage2.json's sampling ({sampling.num_inference_steps} steps, "
            f"strength {sampling.strength}), found {recorded.num_inference_steps} steps, strength "
            f"{recorded.strength} (re-export with: recon-export --model-dir {model_dir} --stage all)"
        )
    tables = scheduler.tables(sampling.num_inference_steps, sampling.strength)
    if tables["timesteps"].tolist() != list(data["timesteps"]):
        raise ConfigError(
            f"{path}: expected timesteps {tables['timesteps'].tolist()} (runtime/ddim.py), found {data['timesteps']}"
        )
    for key in ("alpha_t", "alpha_prev"):
        diff = float(np.abs(tables[key] - np.asarray(data[key], np.float64)).max(initial=0.0))
        if diff > ALPHA_ATOL:
            raise ConfigError(
                f"{path}: expected {key} within {ALPHA_ATOL} of runtime/ddim.py's, found a difference of {diff:.3g}"
            )
    return scheduler
