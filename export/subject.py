"""Export one subject model folder: every model of a stage → validated ONNX (+ engines) + manifest, all or nothing.

    export_model_dir(model_dir, stage="all", precision="both", unet_graph="both", deepcache=False)
      sources         stage1.py (regressor, VDVAE decoder), stage2.py (CLIP ridges, VAE, UNet)
      stage           onnx_export.stage_contract per contract (export, fp16, check, validate)  → staging/onnx/
      scheduler       stage 2 only: diffusers' DDIM tables (stage2.py)                        → staging/stage2/
      engines         TensorRT when present (tensorrt.py), else skipped with the reason       → staging/trt/
      manifest        every file hashed, merged with the old manifest's still-valid entries   → staging/
      publish         old manifest set aside, staged files moved into place, new manifest moved last

One export at a time per folder: a second one is refused while the first holds `model_dir/.export.lock`
(fcntl.flock; the kernel releases it when the holder dies, however it dies). Under the lock, staging folders
(`model_dir/.export-*.tmp`) left by killed exports are removed first.

A failure before `publish` (a parity error, a TensorRT build error, a crash) leaves the previous export whole and
loadable, and removes the staging folder. `publish` is a handful of renames on one filesystem, each file fsynced
before its rename and each directory after. The old manifest goes aside first (`manifest.previous.json`) and the new
one comes in last, so even a crash inside it leaves either the old export or no manifest (the runtime then says to
re-export), never new files under an old manifest; the kept-aside manifest is deleted only once the new one is in
place, and a re-export after such a crash merges its still-intact entries (brainrecon/manifest.py write_manifest).

Test hook: with BRAINRECON_EXPORT_PAUSE_AT=staged (everything staged, lock held) or =publishing (old manifest aside,
new files moved, new manifest not yet in), the export prints `paused at <point>` and waits for a line on stdin, so
tests/test_data_safety.py can kill it at exactly that point.

Stages: "stage1" = the stage-1 regressor + vdvae_decoder; "gru", "ridge", "vdvae" = one of them; "stage2" = clip_text,
clip_vision, vae_encoder, vae_decoder and the UNet graphs of `unet_graph` (needs model_dir/stage2/ from recon-train
subject --stage clip); "all" = stage 1, plus stage 2 when model_dir/stage2/stage2.json exists. UNet graphs: "both"
= the plain `unet` and the K/V-once pair `unet_context` + `unet_kv` (the UNet weights twice on disk), "kv" = the
pair only (what the runtime and the Triton repository use when present), "plain" = `unet` only. `deepcache` adds
the DeepCache pair `unet_deep` + `unet_shallow` to stage 2 (runs with cache_interval > 1 need it; the UNet weights
twice more on disk, so only on request).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from brainrecon import model_dir as layout
from brainrecon.choices import (
    EXPORT_PRECISIONS,
    EXPORT_STAGES,
    EXPORT_UNET_GRAPHS,
    FILE_PRECISIONS,
    REGRESSORS,
)
from brainrecon.errors import BrainReconError, ConfigError, InputError, MissingFileError
from brainrecon.export.onnx_export import EXTERNAL_DATA_THRESHOLD, ExportSource, StagedFile, stage_contract
from brainrecon.io import fsync_dir, fsync_file, read_json
from brainrecon.manifest import MANIFEST_PREVIOUS, Artifact, describe_file, write_manifest

# Files the runtime reads beside the models; hashed into the manifest like them (scheduler.json is written here).
STAGE1_DATA_FILES = layout.PREPROCESS_FILES + layout.STAGE1_FILES
STAGE2_DATA_FILES = layout.STAGE2_FILES


def stage1_summary(model_dir: Path) -> dict[str, Any]:
    return read_json(model_dir / layout.STAGE1_SUMMARY, "stage-1 summary (run recon-train subject first)")


def stage2_names(unet_graph: str, deepcache: bool = False) -> list[str]:
    """The stage-2 contracts: the CLIP ridges, the VAE, and the UNet graphs of `unet_graph` (EXPORT_UNET_GRAPHS:
    "both" = the plain `unet`, then the K/V-once pair), then with `deepcache` the DeepCache pair."""
    if unet_graph not in EXPORT_UNET_GRAPHS:
        raise ConfigError(f"export unet_graph: expected one of {EXPORT_UNET_GRAPHS}, found {unet_graph!r}")
    graphs = ("plain", "kv") if unet_graph == "both" else (unet_graph,)
    unets = [m for graph in graphs for m in layout.UNET_GRAPH_MODELS[graph]]
    deep = layout.STAGE2_DEEPCACHE_MODELS if deepcache else ()
    return [*(m for m in layout.STAGE2_MODELS if m != "unet"), *unets, *deep]


def contract_names(
    model_dir: Path, stage: str, unet_graph: str = "both", deepcache: bool = False
) -> list[str]:
    """Contracts exported for `stage` given what the model directory holds."""
    if stage not in EXPORT_STAGES:
        raise ConfigError(f"export stage: expected one of {EXPORT_STAGES}, found {stage!r}")
    stage2 = stage2_names(unet_graph, deepcache)
    has_stage2 = (model_dir / layout.STAGE2_SUMMARY).is_file()
    if stage == "stage2":
        if not has_stage2:
            raise MissingFileError(
                model_dir / layout.STAGE2_SUMMARY,
                "stage-2 summary",
                "run recon-train subject --stage clip first",
            )
        return stage2
    regressor = stage1_summary(model_dir)["config"]["regressor"]
    if stage in REGRESSORS and stage != regressor:
        raise InputError(
            model_dir / layout.STAGE1_SUMMARY,
            f"a {stage} stage-1 regressor (recon-train subject --regressor {stage})",
            f"a {regressor} regressor (export --stage {regressor} or stage1)",
        )
    if stage in REGRESSORS:
        return [stage]
    if stage == "vdvae":
        return [layout.VDVAE_DECODER]
    stage1 = [regressor, layout.VDVAE_DECODER]
    return stage1 + stage2 if stage == "all" and has_stage2 else stage1


def load_sources(model_dir: Path, names: list[str]) -> list[ExportSource]:
    """Each contract's source from the torch references: stage 1 from `Stage1Model.load` (checks the VDVAE hash),
    stage 2 from `Stage2Model.load` (checks the VAE and UNet hashes), each loaded only when needed."""
    from brainrecon.export.stage1 import load_stage1_sources

    stage2_names = (*layout.STAGE2_MODELS, *layout.STAGE2_KV_MODELS, *layout.STAGE2_DEEPCACHE_MODELS)
    stage2 = [n for n in names if n in stage2_names]
    stage1 = [n for n in names if n not in stage2_names]
    sources: list[ExportSource] = []
    model1 = None
    if stage2:
        from brainrecon.export.stage2 import stage2_sources
        from brainrecon.train.reference import Stage2Model

        model2 = Stage2Model.load(model_dir)
        model1 = model2.stage1
        sources += stage2_sources(model2, stage2)
    if stage1:
        sources = load_stage1_sources(model_dir, stage1, model1) + sources
    return sources


def _precisions(precision: str) -> tuple[str, ...]:
    if precision not in EXPORT_PRECISIONS:
        raise ConfigError(f"export precision: expected one of {EXPORT_PRECISIONS}, found {precision!r}")
    return FILE_PRECISIONS if precision == "both" else (precision,)


LOCK_FILE = ".export.lock"  # in the model folder; kept (removing a lock file others may hold open races)
STAGING_GLOB = ".export-*.tmp"
PAUSE_ENV = "BRAINRECON_EXPORT_PAUSE_AT"


class ExportLockedError(BrainReconError):
    """Another export is writing the same model folder."""


@contextlib.contextmanager
def export_lock(model_dir: Path) -> Iterator[None]:
    """Hold `model_dir/.export.lock` exclusively (or refuse, naming the holder's pid) and, under it, remove the
    staging folders of exports that died: no live export can own one while this lock is held."""
    path = model_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ExportLockedError(
                f"{model_dir}: expected no other export writing this folder, found one running (pid {holder}, "
                f"holding {path}); wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for stale in model_dir.glob(STAGING_GLOB):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def _pause_point(name: str) -> None:
    """The test hook of the module docstring (PAUSE_ENV)."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"paused at {name}", flush=True)
        sys.stdin.readline()


@contextlib.contextmanager
def staging_root(model_dir: Path) -> Iterator[Path]:
    """A scratch folder inside the model folder (same filesystem: os.replace is atomic), always removed."""
    tmp = Path(tempfile.mkdtemp(prefix=".export-", suffix=".tmp", dir=model_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _onnx_artifact(root: Path, f: StagedFile, rel_dir: str) -> tuple[list[Artifact], dict[str, Any]]:
    """The manifest entries of one staged ONNX file (and its external data), hashed where they are staged."""
    rel = f"{rel_dir}/{f.path.name}"
    data_rels = [f"{rel_dir}/{p.name}" for p in f.external_data]
    entries = [
        describe_file(root, r, "onnx_data", model=f.contract.name, precision=f.precision) for r in data_rels
    ]
    entries.append(
        describe_file(
            root,
            rel,
            "onnx",
            model=f.contract.name,
            precision=f.precision,
            opset=f.contract.opset,
            exporter=f.contract.exporter,
            io=f.contract.io_spec(),
            validation=f.validation,
            external_data=tuple(data_rels),
        )
    )
    summary = {
        "model": f.contract.name,
        "precision": f.precision,
        "path": rel,
        "bytes": sum(e.size for e in entries),
        "external_data": data_rels,
        "export_seconds": round(f.seconds, 2),
    }
    return entries, summary


def publish(root: Path, model_dir: Path, staged: list[str]) -> None:
    """Move the staged files (relative paths under `root`) into `model_dir`, the manifest aside first and in last.

    Every staged file is fsynced before the first rename, and every directory renamed into after. The old manifest
    is kept aside as MANIFEST_PREVIOUS until the new one is in place (a re-export after a crash merges from it).
    The ONNX file that an external-data file belongs to moves after it; a stale `.data` file next to a re-exported
    ONNX that no longer has external data is removed."""
    manifest, previous = model_dir / layout.MANIFEST, model_dir / MANIFEST_PREVIOUS
    for rel in (*staged, layout.MANIFEST):
        fsync_file(root / rel)
    if manifest.is_file():  # else: no export yet, or a crashed publish whose previous manifest is still aside
        os.replace(manifest, previous)
        fsync_dir(model_dir)
    targets = set()
    for rel in sorted(staged, key=lambda r: not r.endswith(".data")):  # data files first
        target = model_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(root / rel, target)
        targets.add(target.parent)
        if rel.endswith(".onnx") and f"{rel}.data" not in staged:
            target.with_name(target.name + ".data").unlink(missing_ok=True)
    for directory in targets:
        fsync_dir(directory)
    _pause_point("publishing")
    os.replace(root / layout.MANIFEST, manifest)
    fsync_dir(model_dir)
    previous.unlink(missing_ok=True)
    fsync_dir(model_dir)


def export_model_dir(
    model_dir: str | Path,
    stage: str = "all",
    precision: str = "both",
    validate: bool = True,
    engines: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    unet_graph: str = "both",
    deepcache: bool = False,
) -> dict[str, Any]:
    """Export the models of `stage` from `model_dir` to `model_dir/onnx/<name>.<precision>.onnx`, validate them
    (unless `validate=False`), build TensorRT engines when TensorRT and a GPU are present (else say why not), and
    record everything in `model_dir/manifest.json`; nothing is published unless all of it succeeded. Returns a
    JSON-able summary. `external_data_threshold` (bytes of weights) decides when weights go to `<file>.data`; lower
    it to exercise that path on a small model. `unet_graph` (EXPORT_UNET_GRAPHS) picks the stage-2 UNet graphs,
    `deepcache` adds the DeepCache pair (unet_deep, unet_shallow) to them; entries of an earlier export that this
    one does not rewrite stay in the manifest (as for every model).
    """
    model_dir = Path(model_dir)
    t_start = time.perf_counter()
    precisions = _precisions(precision)
    if not model_dir.is_dir():
        raise MissingFileError(model_dir, "model directory", "run recon-train subject first")
    names = contract_names(model_dir, stage, unet_graph, deepcache)
    with_stage2 = any(n in layout.STAGE2_MODELS for n in names)
    data_files = STAGE1_DATA_FILES + (STAGE2_DATA_FILES if with_stage2 else ())
    for rel in data_files:
        if not (model_dir / rel).is_file():
            hint = (
                "run recon-train subject --stage clip"
                if rel in STAGE2_DATA_FILES
                else "run recon-train subject"
            )
            raise MissingFileError(model_dir / rel, "model directory file", f"{hint} first")
    with export_lock(model_dir), staging_root(model_dir) as root:
        sources = load_sources(model_dir, names)
        onnx_staging = root / layout.ONNX_DIR
        onnx_staging.mkdir()
        staged_files = [
            f
            for s in sources
            for f in stage_contract(s, onnx_staging, precisions, validate, external_data_threshold)
        ]
        artifacts: list[Artifact] = [describe_file(model_dir, rel, "data") for rel in data_files]
        staged: list[str] = []
        exported = []
        for f in staged_files:
            entries, summary = _onnx_artifact(root, f, layout.ONNX_DIR)
            artifacts += entries
            staged += [e.path for e in entries]
            exported.append(
                {**summary, "validation": f.validation if validate else "skipped (validate=False)"}
            )
        if with_stage2:
            from brainrecon.export.stage2 import write_scheduler_json

            rel = write_scheduler_json(model_dir, root)
            artifacts.append(describe_file(root, rel, "data"))
            staged.append(rel)
        engine_summary: dict[str, Any] = {
            "built": [],
            "reused": [],
            "skipped": "not requested (engines=False)",
        }
        if engines:
            from brainrecon.export.tensorrt import build_engines_for

            onnx_artifacts = [a for a in artifacts if a.kind == "onnx"]
            engine_artifacts, engine_summary = build_engines_for(root, model_dir, onnx_artifacts)
            artifacts += engine_artifacts
            staged += engine_summary["built"]
        from brainrecon.export.tensorrt import superseded_engines  # engines not built from these bytes

        engine_summary["pruned"] = superseded_engines(model_dir, artifacts)
        write_manifest(model_dir, artifacts, out=root / layout.MANIFEST, drop=engine_summary["pruned"])
        _pause_point("staged")
        publish(root, model_dir, staged)
    return {
        "model_dir": str(model_dir),
        "stage": stage,
        "unet_graph": unet_graph,
        "deepcache": deepcache,
        "exported": exported,
        "engines": engine_summary,
        "manifest": str(model_dir / layout.MANIFEST),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
