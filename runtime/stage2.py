"""Stage-2 runtime (numpy): Brain-Diffuser's Versatile Diffusion img2img refinement of the stage-1 image.

The torch reference is `brainrecon.train.reference.Stage2Model.reconstruct` (and `train/stage2/img2img.py img2img`,
`denoise`, `encode_images`, `decode_latents`); this pipeline runs the exported ONNX files or TensorRT engines
listed in `model_dir/manifest.json`, after re-hashing every file it reads, with the numpy DDIM of `ddim.py` or
DPM-Solver++(2M) of `samplers.py` (`sampling.sampler`).
No torch, diffusers or transformers import, here or below (a test enforces it).

    betas (N, V) ──Stage1Pipeline──► stage-1 images (N, s, s, 3) uint8 ──resize (PIL bicubic)──► (N, S, S, 3)
      ──/127.5 − 1, NCHW──► vae_encoder ──► init latents (N, 4, h, w), already × vae_scale_factor
    betas ──clip_text / clip_vision──► (N, Nt, D), (N, Nv, D) ──renormalize over the set──► cond context
      (N, Nv + Nt, D), vision tokens first (`dual_context`)
    noise = img2img_noise((N, 4, h, w), seed), drawn once for the whole set ──add_noise(t0)──► x
      K/V once (when exported): unet_context(uncond) once, at the first run; unet_context(cond chunk) once per chunk
      for t in timesteps, the first sampling.guided_steps(T) of them:
                          unet([x; x], t, K/V of [uncond × b; cond]) → eps_u, eps_c   (unet_kv; plain: the contexts)
                          eps = eps_u + guidance_scale (eps_c − eps_u)
                      the rest (guidance_stop < 1): eps = unet(x, t, K/V of cond)     (b rows: the cond pass alone)
                      x = step(eps, t, x)      (DDIM, or the chunk's own DPM-Solver++ chain: samplers.chain)
      DeepCache (sampling.cache_interval k > 1; train/stage2/deepcache.py): every k-th step, the first always,
                      eps, feature = unet_deep(rows, t, contexts)           (the plain contexts, no K/V once)
                      the others: eps = unet_shallow(rows, t, contexts, feature)   (the cond half of a guided
                      step's feature once guidance stops)
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
from typing import TYPE_CHECKING

import numpy as np

from brainrecon import model_dir as layout
from brainrecon.errors import ConfigError, InputError
from brainrecon.images import resize
from brainrecon.manifest import Manifest
from brainrecon.noise import img2img_noise, img2img_noise_per_row
from brainrecon.normalize import renormalize_predictions
from brainrecon.runtime.artifacts import load_model
from brainrecon.runtime.backends.base import Backend, ModelIO
from brainrecon.runtime.backends.ort import OrtBackend
from brainrecon.runtime.ddim import DDIMScheduler
from brainrecon.runtime.model_folder import ModelFolder
from brainrecon.runtime.samplers import DPMSolverScheduler, chain
from brainrecon.runtime.stage1 import Stage1Pipeline
from brainrecon.runtime.types import CheckedInputs, Progress, Reconstruction
from brainrecon.sampling import SamplingConfig

if TYPE_CHECKING:
    from brainrecon.runtime.types import RuntimeOptions

CLIP_TARGETS = layout.CLIP_TARGETS
MODELS = layout.STAGE2_MODELS
# A CPU UNet session holds its weights plus ONNX Runtime's pre-packed copies of them: budget twice the file size.
SESSION_MEMORY_FACTOR = 2


def dual_context(vision: np.ndarray, text: np.ndarray) -> np.ndarray:
    """(N, Nv, D), (N, Nt, D) → (N, Nv + Nt, D) float32: vision tokens first, then text, as the UNet's dual
    cross-attention blocks split the context (train/foundations/dual_unet.py)."""
    return np.concatenate([vision, text], axis=1, dtype=np.float32)


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


def _shape(io: ModelIO, which: str, index: int = 0) -> tuple[int | str, ...]:
    return (io.inputs if which == "in" else io.outputs)[index][1]


@dataclasses.dataclass(frozen=True)
class DeepCachePair:
    """One session pair of the DeepCache graphs (export/contracts.py): `deep` the full step that also returns the
    feature, `shallow` the step that takes it."""

    deep: Backend
    shallow: Backend


class Stage2Pipeline:
    """Stage 1 + stage 2 over exported models. Build with `open`; `run(checked)` → `Reconstruction`.

    `backends` maps each role (clip_text, clip_vision, vae_encoder, vae_decoder, unet, and unet_context for K/V
    once) to a Backend; "unet" is the UNet step, the exported `unet_kv` when "unet_context" is there too (K/V
    once: the contexts' cross-attention K/V computed once, export/contracts.py), else the plain `unet`. Runs with
    sampling.cache_interval > 1 use the DeepCache pairs that `load_deepcache` opens (`deepcache_workers`) instead.
    Building one runs no model."""

    def __init__(
        self,
        folder: ModelFolder,
        stage1: Stage1Pipeline,
        backends: dict[str, Backend],
        unet_workers: list[Backend] | None = None,
        load_deepcache: Callable[[], list[DeepCachePair]] | None = None,
    ):
        assert folder.stage2 is not None
        data = folder.stage2
        self.folder = folder
        self.stage1 = stage1
        self.backends = backends
        self.ios = {role: backend.io for role, backend in backends.items()}
        ios = self.ios
        self.kv_once = "unet_context" in backends
        # UNet sessions that denoise image chunks in parallel (see `open`); one by default
        self.unet_workers = unet_workers or [backends["unet"]]
        self.sampling = data.sampling
        self.schedulers = data.schedulers  # sampler → numpy scheduler, on the folder's one noise schedule
        source = folder.path
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
            mean, std = data.target_stats[name]
            if mean.shape != shape or std.shape != shape:
                raise InputError(
                    f"{source}/stage2/clip_{name}_target_{{mean,std}}.npy",
                    f"shape {shape} (clip_{name} output)",
                    f"{mean.shape}, {std.shape}",
                )
            if data.uncond[name].shape != (1, *shape):
                raise InputError(
                    f"{source}/stage2/uncond_{name}.npy", f"shape {(1, *shape)}", f"{data.uncond[name].shape}"
                )
        # (T·D,) float32, the layout of train/stage2/clip_ridge.py's flattened predictions
        self.target_stats = {
            name: (np.asarray(m, np.float32).ravel(), np.asarray(s, np.float32).ravel())
            for name, (m, s) in data.target_stats.items()
        }
        self.uncond_context = dual_context(data.uncond["vision"], data.uncond["text"])  # (1, Nv + Nt, D)
        if self.kv_once:
            context_outputs = [name for name, _, _ in ios["unet_context"].outputs]
            step_inputs = [name for name, _, _ in ios["unet"].inputs][2:]
            if context_outputs != step_inputs:
                raise ConfigError(
                    f"{source}: exported stage-2 models disagree: expected unet_kv K/V inputs {context_outputs} "
                    f"(unet_context outputs), found {step_inputs}"
                )
        self._uncond_kv: dict[str, np.ndarray] | None = None
        self._uncond_kv_lock = threading.Lock()
        # DeepCache session pairs (`deepcache_workers`), loaded at the first run with cache_interval > 1: a run
        # without it never pays for their memory (the UNet's weights once more)
        self._load_deepcache = load_deepcache
        self._deepcache: list[DeepCachePair] = []
        self._deepcache_lock = threading.Lock()

    @classmethod
    def open(cls, folder: ModelFolder, options: RuntimeOptions) -> Stage2Pipeline:
        """Load stage 1 and the stage-2 models of `folder` (each file hash-verified first) as `options` say. On the
        CPU the UNet runs as several sessions (`unet_session_count`), as many as `options.memory_budget_bytes`
        allows (default: half the machine's memory). The DeepCache pairs, when the folder has them, are loaded at
        the first run that asks for them (`deepcache_workers`)."""
        assert folder.stage2 is not None
        models = folder.stage2.models
        stage1 = Stage1Pipeline.open(folder, options)
        unet_sessions = 1
        budget = options.memory_budget_bytes
        budget = default_memory_budget() if budget is None else budget
        unet_bytes = model_bytes(folder.manifest, models["unet"], folder.precision)
        if options.engine in ("ort", "openvino") and options.device == "cpu":
            unet_sessions = unet_session_count(
                options.threads or len(os.sched_getaffinity(0)), unet_bytes, budget
            )
        unet_options = dataclasses.replace(options, threads=1) if unet_sessions > 1 else options
        backends = {
            role: load_model(folder, name, unet_options if role == "unet" else options)
            for role, name in models.items()
        }
        unet = backends["unet"]

        # the file is verified once (load_model); the further sessions open the same verified file
        def worker(first: Backend) -> Backend:
            if options.engine == "openvino":
                from brainrecon.runtime.backends.openvino import OpenVinoBackend

                return OpenVinoBackend(first.path, first.io, options.precision, 1)
            return OrtBackend(first.path, first.io, options.device, options.allow_cpu_fallback, 1)

        load_deepcache = None
        if folder.stage2.deepcache:

            def load_deepcache() -> list[DeepCachePair]:
                """As many pairs as the UNet sessions, within what the memory budget leaves beside them."""
                weights = sum(
                    model_bytes(folder.manifest, m, folder.precision) for m in layout.STAGE2_DEEPCACHE_MODELS
                )
                left = max(0, budget - SESSION_MEMORY_FACTOR * unet_sessions * unet_bytes)
                pairs = unet_session_count(unet_sessions, weights, left) if unet_sessions > 1 else 1
                first = DeepCachePair(
                    *(load_model(folder, m, unet_options) for m in layout.STAGE2_DEEPCACHE_MODELS)
                )
                return [first] + [
                    DeepCachePair(worker(first.deep), worker(first.shallow)) for _ in range(pairs - 1)
                ]

        unet_workers = [unet] + [worker(unet) for _ in range(unet_sessions - 1)]
        return cls(folder, stage1, backends, unet_workers, load_deepcache)

    def batch_limits(self) -> dict[str, tuple[int, int]]:
        """Images per call allowed by each model's profile, [lo, hi]; the UNet sees twice the image batch."""
        limits = {
            "stage1": self.stage1.batch_limits(),
            **{
                name: (self.ios[name].min_batch, self.ios[name].max_batch)
                for name in MODELS
                if name != "unet"
            },
        }
        unet = self.ios["unet"]
        limits["unet"] = ((unet.min_batch + 1) // 2, unet.max_batch // 2)
        return limits

    def batch_sizes(self, batch_size: int | None) -> dict[str, int]:
        """Images per call of each model: `batch_size` for all, within every profile (else a one-line InputError),
        or by default each model's profile max, and the UNet's at its profile's opt."""
        limits = self.batch_limits()
        if batch_size is None:
            batches = {name: hi for name, (_, hi) in limits.items()}
            # The UNet at its profile's opt batch: per row, ONNX Runtime on the CPU was fastest at 16-64 rows
            # (4.2-4.5 ms) and slower at 128 (4.6 ms) on the demo UNet; a GPU engine is tuned for opt as well.
            unet = self.ios["unet"]
            opt_rows = unet.profile[unet.inputs[0][0]]["opt"][0]
            batches["unet"] = max(limits["unet"][0], min(limits["unet"][1], opt_rows // 2))
            return batches
        lo = max(lo for lo, _ in limits.values())
        hi = min(hi for _, hi in limits.values())
        if not lo <= int(batch_size) <= hi:
            raise InputError(
                "batch size",
                f"{lo}..{hi} images (the engines' shape profiles; the UNet runs 2 x batch)",
                f"{batch_size}",
            )
        return dict.fromkeys(limits, int(batch_size))

    def uncond_kv(self) -> dict[str, np.ndarray]:
        """The unconditional context's cross-attention K/V (K/V once), (1, ...) each: computed by `unet_context` at
        the first run that needs it, not when the pipeline is built (so building runs no model: Triton's BLS calls
        work only inside `execute`), then repeated per chunk by every run."""
        with self._uncond_kv_lock:
            if self._uncond_kv is None:
                self._uncond_kv = self.backends["unet_context"].run(
                    {"encoder_hidden_states": self.uncond_context}
                )
            return self._uncond_kv

    def deepcache_workers(self) -> list[DeepCachePair]:
        """The DeepCache session pairs, loaded (hash-verified) at the first call; a one-line MissingFileError
        when the folder has no DeepCache graphs at this precision."""
        with self._deepcache_lock:
            if not self._deepcache:
                if self._load_deepcache is None:
                    # no pair in the folder (one line saying how to export it), or a pipeline built without `open`
                    self.folder.stage2.check_cache_interval(2, self.folder.path)
                    raise ConfigError(f"{self.folder.path}: expected a DeepCache loader, found none")
                self._deepcache = self._load_deepcache()
            return self._deepcache

    def loaded_backends(self) -> list[Backend]:
        """Every session this pipeline holds (for `Reconstructor.close`): stage 2's, its UNet workers, the
        DeepCache pairs once loaded."""
        return [
            *self.backends.values(),
            *self.unet_workers,
            *(b for pair in self._deepcache for b in (pair.deep, pair.shallow)),
        ]

    # ------------------------------------------------------------------------- run

    def run(self, checked: CheckedInputs, progress: Progress | None = None) -> Reconstruction:
        """Stage 1 and 2 on what `Reconstructor.check` accepted (nothing is checked again). The img2img noise is
        drawn once for the whole set from `sampling.seed`, or, with `seeds` (N,), per row from its own seed
        (`brainrecon.noise`): then a row's image does not depend on the other rows or on batching.
        `progress(step, done, total)` is called for the steps regressor, decoder (stage 1), clip_text,
        clip_vision, vae_encoder, unet (one tick per UNet call), vae_decoder."""
        betas, batches, renorm = checked.betas, checked.batch_sizes, checked.renormalize
        sampling, seeds = checked.sampling, checked.seeds
        assert sampling is not None
        # nothing runs for a cache_interval the folder cannot serve
        self.folder.stage2.check_cache_interval(sampling.cache_interval, self.folder.path)
        n = len(betas)
        scheduler = self.schedulers[sampling.sampler]
        timesteps = scheduler.timesteps(sampling.num_inference_steps, sampling.strength)  # (T,) int64
        timings: dict[str, float] = {}
        t_all = time.perf_counter()

        t0 = time.perf_counter()
        stage1 = self.stage1.run(checked, progress)
        timings["stage1_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        contexts = {
            name: self._predict_clip(name, betas, batches[f"clip_{name}"], renorm["clip"], progress)
            for name in CLIP_TARGETS
        }
        cond_context = dual_context(contexts["vision"], contexts["text"])  # (N, Nv + Nt, D)
        timings["clip_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        init_images = resize(stage1.stage1_images, self.image_size)  # (N, S, S, 3) uint8
        init_latents = self._encode(init_images, batches["vae_encoder"], progress)  # (N, 4, h, w)
        timings["vae_encode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        noise = (
            img2img_noise(init_latents.shape, sampling.seed)  # the whole set at once: batch-independent
            if seeds is None
            else img2img_noise_per_row(init_latents.shape, seeds)
        )
        latents = self._denoise(
            init_latents, noise, cond_context, sampling, scheduler, timesteps, batches["unet"], progress
        )
        timings["unet_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        images = self._decode(latents, batches["vae_decoder"], progress)  # (N, S, S, 3) uint8
        timings["vae_decode_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_all
        timings["per_image_ms"] = 1000.0 * timings["total_s"] / n

        used = dict(self.backends)
        if sampling.cache_interval > 1:
            pair = self.deepcache_workers()[0]
            used |= {"unet_deep": pair.deep, "unet_shallow": pair.shallow}

        return Reconstruction(
            stage1_images=stage1.stage1_images,
            final_images=images,
            latents=latents,
            timings={**{k: round(v, 6) for k, v in timings.items()}, "stage1_split": stage1.timings},
            providers={**stage1.providers, **{k: list(b.providers) for k, b in used.items()}},
            sampling=sampling,
            timesteps=timesteps,
            renormalized=renorm,
            batch_sizes=batches,
            fallback={
                **stage1.fallback,
                **{k: fb for k, b in used.items() if (fb := getattr(b, "fallback", None))},
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
        scheduler: DDIMScheduler | DPMSolverScheduler,  # self.schedulers[sampling.sampler]
        timesteps: np.ndarray,  # (T,) int64
        batch: int,
        progress: Progress | None,
    ) -> np.ndarray:
        """`train/stage2/img2img.py denoise`: noise to timesteps[0], then the sampler's steps with classifier-free
        guidance for the first `sampling.guided_steps(T)`.

        Image chunks of at most `batch` are denoised independently, in parallel over `self.unet_workers` (the
        DeepCache pairs for cache_interval > 1)."""
        if len(timesteps) == 0:  # strength 0: nothing is re-noised, the VAE round trip comes back
            return init_latents
        n = len(init_latents)
        latents = scheduler.add_noise(init_latents, noise, int(timesteps[0]))  # (N, 4, h, w)
        workers = self.deepcache_workers() if sampling.cache_interval > 1 else self.unet_workers
        chunk = min(batch, math.ceil(n / len(workers)))  # every worker gets work when n allows
        parts = [slice(i, i + chunk) for i in range(0, n, chunk)]
        free: queue.SimpleQueue[Backend | DeepCachePair] = queue.SimpleQueue()
        for worker in workers:
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
                    backend, latents[part], cond_context[part], sampling, scheduler, timesteps, tick
                )
            finally:
                free.put(backend)

        if len(workers) == 1 or len(parts) == 1:
            return np.concatenate([run(part) for part in parts])
        with ThreadPoolExecutor(len(workers)) as pool:  # ORT releases the GIL while it runs
            return np.concatenate(list(pool.map(run, parts)))

    def _denoise_chunk(
        self,
        worker: Backend | DeepCachePair,  # the UNet step's session, or a DeepCache pair (cache_interval > 1)
        x: np.ndarray,  # (b, 4, h, w) noised latents
        cond_context: np.ndarray,  # (b, Nv + Nt, D)
        sampling: SamplingConfig,
        scheduler: DDIMScheduler | DPMSolverScheduler,
        timesteps: np.ndarray,
        tick: Callable[[], None],
    ) -> np.ndarray:
        b = len(x)
        guidance = np.float32(sampling.guidance_scale)
        guided = sampling.guided_steps(len(timesteps))  # the first `guided` steps run both passes
        step = chain(scheduler, sampling.num_inference_steps, sampling.strength)  # this chunk's own chain
        cached = isinstance(worker, DeepCachePair)
        if self.kv_once and not cached:
            # K/V once: the unconditional K/V computed once for all runs, the chunk's contexts → K/V here
            uncond = self.uncond_kv() if guided else {}  # (1, ...) each
            cond = self.backends["unet_context"].run({"encoder_hidden_states": cond_context})  # (b, ...) each
        else:
            uncond = {"encoder_hidden_states": self.uncond_context}  # (1, Nv + Nt, D)
            cond = {"encoder_hidden_states": cond_context}  # (b, Nv + Nt, D)
        conditioning = {}  # the guided steps' [uncond; cond], (2b, ...) each
        if guided:
            conditioning = {
                name: np.concatenate([np.repeat(uncond[name], b, axis=0), kv]) for name, kv in cond.items()
            }
        feature = None  # DeepCache: the last full step's, (2b or b, C_f, h, w)

        def unet(step_index: int, inputs: dict[str, np.ndarray]) -> np.ndarray:
            nonlocal feature
            if not cached:
                return worker.run(inputs)["noise_pred"]
            # deepcache.is_full_step: every cache_interval-th step, the first always
            if step_index % sampling.cache_interval == 0:
                out = worker.deep.run(inputs)
                feature = out["feature"]
                return out["noise_pred"]
            return worker.shallow.run({**inputs, "feature": feature})["noise_pred"]

        for i, t in enumerate(timesteps):
            if i < guided:
                inputs = {
                    "sample": np.concatenate([x, x]),  # (2b, 4, h, w), [uncond; cond]
                    "timestep": np.full((2 * b,), t, dtype=np.float32),  # (2b,)
                    **conditioning,
                }
                eps = unet(i, inputs)  # (2b, 4, h, w)
                eps_uncond, eps_cond = eps[:b], eps[b:]
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            else:  # guidance stopped: the conditional pass alone, half the rows
                if i == guided and feature is not None:
                    feature = feature[b:]  # the cond rows of the guided steps' feature
                inputs = {"sample": x, "timestep": np.full((b,), t, dtype=np.float32), **cond}
                eps = unet(i, inputs)  # (b, 4, h, w)
            x = step(eps, int(t), x)
            tick()
        return x
