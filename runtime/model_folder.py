"""One model folder, read and verified once into a frozen `ModelFolder`: everything the runtime, the Triton BLS
model, the benchmarks and the report take from a folder besides the model files themselves (which
`artifacts.load_model` opens). numpy only; no session is created here and no model runs.

    read_model_folder(model_dir, stage, precision, unet_graph) → ModelFolder
      manifest.json                 parsed once; every file below hash-verified against it before it is read
      stage1/stage1.json            the fitted regressor and its re-normalisation; latent_{mean,std}.npy
      stage2/stage2.json            the fitted sampling and CLIP re-normalisation; CLIP target statistics;
                                    the unconditional contexts of classifier-free guidance
      stage2/scheduler.json         → the numpy DDIM, checked against the diffusers tables recorded there, and
                                    DPM-Solver++ on the same noise schedule (runtime/samplers.py)
      the manifest's UNet entries   which UNet graphs were exported ("kv" pair, "plain"), the one this run uses;
                                    whether the DeepCache pair (unet_deep, unet_shallow) was (cache_interval > 1)
      the graphs' constants         mix_ratio, vae_scale_factor baked in at export == stage2.json's, checked here once

File names come from `brainrecon/model_dir.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainrecon import model_dir as layout
from brainrecon.choices import (
    STAGES,
    FilePrecision,
    Precision,
    ResolvedUnetGraph,
    Sampler,
    Stage,
    UnetGraph,
    check_choice,
)
from brainrecon.config import config_from_dict
from brainrecon.errors import ConfigError, MissingFileError
from brainrecon.io import load_npy, read_json
from brainrecon.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    load_manifest,
    regenerate_hint,
    verify_artifact,
)
from brainrecon.runtime.backends.base import ModelIO
from brainrecon.runtime.ddim import DDIM_FIXED, DDIMConfig, DDIMScheduler
from brainrecon.runtime.samplers import DPMSolverScheduler, schedulers
from brainrecon.sampling import SamplingConfig

# The sampling fields that recon-export bakes into the graphs as constants (the UNet's dual mix, the VAE's scale):
# stage2.json must agree with the graphs, and a run cannot change them. Value: which graphs hold it.
BAKED_IN = {"mix_ratio": "the exported UNet graph", "vae_scale_factor": "the exported VAE graphs"}
BAKED_IN_RTOL = 1e-6  # stage2.json's value against the graph's (both written from one float)
# numpy's float32 table path lands within 6e-8 of diffusers' (runtime/ddim.py docstring)
ALPHA_ATOL = 1e-6


def file_precision(precision: Precision) -> FilePrecision:
    """The precision of the exported files a run reads: OpenVINO's bf16 compiles the fp32 ONNX."""
    return "fp32" if precision == "bf16" else precision


def default_stage(model_dir: str | Path) -> Stage:
    """2 when the model folder has a fitted stage 2 (then it must be exported too), else 1."""
    return 2 if (Path(model_dir) / layout.STAGE2_SUMMARY).is_file() else 1


def verify_files(manifest: Manifest, model_dir: Path, paths: Iterable[str]) -> None:
    """Re-hash the listed files against the already-parsed manifest (each must have an entry)."""
    for path in paths:
        artifact = manifest.get(path)
        if artifact is None:
            raise ManifestError(
                f"{Path(model_dir) / MANIFEST_FILE}: expected an entry for {path}, found none "
                f"({regenerate_hint(model_dir)})"
            )
        verify_artifact(model_dir, artifact)


@dataclass(frozen=True)
class Stage1Data:
    regressor: str  # the fitted regressor's exported contract ("gru" | "ridge")
    renormalize: bool  # fitted: re-normalise the predicted latents over the input set
    latent_mean: np.ndarray  # (D,) training-latent statistics, as saved
    latent_std: np.ndarray  # (D,)


@dataclass(frozen=True)
class Stage2Data:
    sampling: SamplingConfig  # the fitted sampling (stage2.json)
    renormalize: bool  # fitted: re-normalise the predicted CLIP contexts over the input set
    target_stats: dict[str, tuple[np.ndarray, np.ndarray]]  # "text" | "vision" → (mean, std), each (T, D)
    uncond: dict[str, np.ndarray]  # "text" | "vision" → (1, T, D) unconditional context
    # sampler → its numpy scheduler: "ddim" the DDIM of scheduler.json, "dpmpp_2m" DPM-Solver++ on its noise schedule
    schedulers: dict[Sampler, DDIMScheduler | DPMSolverScheduler]
    unet_graph: ResolvedUnetGraph  # the UNet step this run uses
    # role → exported model: clip_text, clip_vision, vae_encoder, vae_decoder; "unet" the step (unet_kv for "kv",
    # else the plain unet); "unet_context" the K/V of a context (for "kv" only)
    models: dict[str, str]
    # the DeepCache pair unet_deep + unet_shallow exported at this precision (recon-export --deepcache)
    deepcache: bool = False

    def check_cache_interval(self, cache_interval: int, model_dir: Path) -> None:
        """A run with `cache_interval` > 1 needs the DeepCache pair: else a one-line MissingFileError saying how
        to export it, before any model runs."""
        if cache_interval > 1 and not self.deepcache:
            raise MissingFileError(
                model_dir / MANIFEST_FILE,
                f"unet_deep and unet_shallow entries (the DeepCache pair) for cache_interval {cache_interval}",
                f"re-export with: recon-export --model-dir {model_dir} --stage stage2 --deepcache",
            )


@dataclass(frozen=True)
class ModelFolder:
    """What one model folder holds for a run of `stage` on the files of `precision`, read and verified once."""

    path: Path
    manifest: Manifest
    stage: Stage
    precision: FilePrecision  # of the exported files the run reads
    stage1: Stage1Data
    stage2: Stage2Data | None  # None for a stage-1 run
    unet_graphs: tuple[ResolvedUnetGraph, ...]  # exported at `precision`: "kv" (the pair), "plain"

    def model_io(self, model: str) -> ModelIO:
        """An exported model's I/O spec and shape profile, as the manifest records it."""
        artifact = self.manifest.find("onnx", model, self.precision) or self.manifest.find(
            "engine", model, self.precision
        )
        if artifact is None or not artifact.io:
            raise ManifestError(
                f"{self.path / MANIFEST_FILE}: expected the I/O spec of {model} {self.precision}, found none "
                f"({regenerate_hint(self.path)})"
            )
        return ModelIO.from_spec(model, artifact.io)


def read_model_folder(
    model_dir: str | Path,
    stage: Stage | None = None,
    precision: Precision = "fp32",
    unet_graph: UnetGraph = "auto",
    manifest: Manifest | None = None,
) -> ModelFolder:
    """Read `model_dir` for a run of `stage` (default: 2 when stage 2 is fitted) on the `precision` files with the
    UNet graph `unet_graph`; every file read is hash-verified against the manifest (parsed here unless given)."""
    model_dir = Path(model_dir)
    stage = default_stage(model_dir) if stage is None else stage
    check_choice("stage", stage, STAGES)
    files = file_precision(precision)
    if stage == 2 and not (model_dir / layout.STAGE2_SUMMARY).is_file():
        raise MissingFileError(
            model_dir / layout.STAGE2_SUMMARY,
            "stage-2 model (CLIP regressors)",
            f"fit it with: recon-train subject --stage clip, then export with: "
            f"recon-export --model-dir {model_dir} --stage all",
        )
    manifest = manifest or load_manifest(model_dir)
    graphs = tuple(
        graph
        for graph, models in layout.UNET_GRAPH_MODELS.items()
        if all(manifest.find("onnx", m, files) is not None for m in models)
    )
    stage2 = _read_stage2(model_dir, manifest, files, unet_graph, graphs) if stage == 2 else None
    verify_files(manifest, model_dir, layout.STAGE1_FILES)
    summary = read_json(model_dir / layout.STAGE1_SUMMARY, "stage-1 summary")
    stage1 = Stage1Data(
        regressor=summary["config"]["regressor"],
        renormalize=bool(summary["config"].get("renormalize", True)),
        latent_mean=load_npy(model_dir / layout.LATENT_MEAN, "training-latent mean"),
        latent_std=load_npy(model_dir / layout.LATENT_STD, "training-latent std"),
    )
    return ModelFolder(model_dir, manifest, stage, files, stage1, stage2, graphs)


def _not_exported(model_dir: Path, what: str) -> MissingFileError:
    return MissingFileError(
        model_dir / MANIFEST_FILE,
        what,
        f"stage 2 is not exported; export it with: recon-export --model-dir {model_dir} --stage all",
    )


def _read_stage2(
    model_dir: Path,
    manifest: Manifest,
    precision: FilePrecision,
    unet_graph: UnetGraph,
    graphs: tuple[ResolvedUnetGraph, ...],
) -> Stage2Data:
    # a UNet graph of any precision says stage 2 was exported: the plain unet, or the K/V-once pair alone
    # (recon-export --unet-graph kv)
    exported = any(
        all(manifest.find("onnx", m) is not None for m in models)
        for models in layout.UNET_GRAPH_MODELS.values()
    )
    if manifest.get(layout.STAGE2_SUMMARY) is None or not exported:
        raise _not_exported(
            model_dir,
            "stage-2 entries (stage2/stage2.json, unet or unet_context + unet_kv, vae, clip models)",
        )
    if unet_graph == "kv" and "kv" not in graphs:
        raise _not_exported(model_dir, f"unet_context and unet_kv {precision} entries (the K/V-once UNet)")
    if unet_graph == "plain" and "plain" not in graphs:
        has_kv = "kv" in graphs
        raise MissingFileError(
            model_dir / MANIFEST_FILE,
            f"a unet {precision} entry (the plain UNet), found "
            + ("unet_context and unet_kv only" if has_kv else "none"),
            f"export it with: recon-export --model-dir {model_dir} --stage stage2 --unet-graph plain"
            + (", or run the pair: unet_graph auto or kv" if has_kv else ""),
        )
    graph: ResolvedUnetGraph = "kv" if "kv" in graphs and unet_graph != "plain" else "plain"
    models = {m: m for m in layout.STAGE2_MODELS}
    if graph == "kv":
        models |= {"unet": "unet_kv", "unet_context": "unet_context"}
    deepcache = all(manifest.find("onnx", m, precision) is not None for m in layout.STAGE2_DEEPCACHE_MODELS)

    verify_files(manifest, model_dir, (*layout.STAGE2_FILES, layout.SCHEDULER))
    path = model_dir / layout.STAGE2_SUMMARY
    summary = read_json(path, "stage-2 summary")
    sampling = config_from_dict(SamplingConfig, summary["sampling"], str(path))
    # what a graph has baked in must be what stage2.json says the model samples with
    for name in (*models.values(), *(layout.STAGE2_DEEPCACHE_MODELS if deepcache else ())):
        onnx = manifest.find("onnx", name, precision)
        for key, value in ((onnx.io or {}).get("constants") or {}).items() if onnx else ():
            if key in BAKED_IN and not math.isclose(value, getattr(sampling, key), rel_tol=BAKED_IN_RTOL):
                raise ConfigError(
                    f"{model_dir / onnx.path}: expected {key} {getattr(sampling, key)} (stage2/stage2.json), "
                    f"found {value} baked in (re-export with: recon-export --model-dir {model_dir} --stage all)"
                )
    return Stage2Data(
        sampling=sampling,
        renormalize=bool(summary.get("config", {}).get("renormalize", True)),
        target_stats={
            t: tuple(
                load_npy(model_dir / layout.clip_target_stat(t, stat), f"CLIP-{t} target {stat}")
                for stat in ("mean", "std")
            )
            for t in layout.CLIP_TARGETS
        },
        uncond={
            t: load_npy(model_dir / layout.uncond_context(t), f"unconditional CLIP-{t} context")
            for t in layout.CLIP_TARGETS
        },
        schedulers=schedulers(load_scheduler(model_dir, sampling)),
        unet_graph=graph,
        models=models,
        deepcache=deepcache,
    )


def load_scheduler(model_dir: Path, sampling: SamplingConfig) -> DDIMScheduler:
    """The numpy DDIM of `stage2/scheduler.json` (hash-verified by the caller), checked against the diffusers
    tables recorded there for the fitted sampling: same timesteps, alphas within ALPHA_ATOL. The file records
    DDIM's tables only (a folder exported before DPM-Solver++ existed is the same): `samplers.schedulers` builds
    DPM-Solver++ from this DDIM's config, i.e. from the checked ᾱ table."""
    path = model_dir / layout.SCHEDULER
    data = read_json(path, "stage-2 DDIM tables (recon-export)")
    found = (data.get("format"), data.get("version"))
    if found != layout.SCHEDULER_FORMAT:
        raise ConfigError(f"{path}: expected format/version {layout.SCHEDULER_FORMAT}, found {found}")
    settings = dict(data["scheduler"])
    for key, want in DDIM_FIXED.items():
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
