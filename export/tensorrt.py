"""ONNX → TensorRT engine (TensorRT 10.12+ / 11 Python API), keyed by what it was built for.

Strongly typed networks: precision comes from the ONNX graph (the fp16 file from fp16.py), never from a builder
flag (TensorRT 10.12 deprecated and 11 removed `BuilderFlag.FP16`; on 11 every network is strongly typed and the
creation flag is accepted and ignored, so setting it is right for both). The optimization profile is the
contract's min/opt/max batch; a timing cache per machine makes rebuilds fast. Engine files are named
`<model>.<precision>.<key digest[:12]>.plan` and recorded in the manifest with their full key: a file's existence is
not a cache hit (TensorRT demo/Diffusion's weakness); only a manifest entry with a matching key and hash is.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from brainrecon.errors import BrainReconError, InputError, MissingFileError
from brainrecon.io import atomic_path, sha256_file
from brainrecon.manifest import MANIFEST_FILE, Artifact, describe_file, load_manifest, verify_artifact
from brainrecon.model_dir import ENGINE_DIR, engine_file
from brainrecon.runtime.backends.tensorrt import (
    WORKSPACE_BYTES,
    BuildRecipe,
    EngineKey,
    MachineInfo,
    current_machine,
    tensorrt_status,
)

__all__ = ["WORKSPACE_BYTES", "build_engine", "build_engines_for", "superseded_engines"]


class EngineBuildError(BrainReconError):
    """TensorRT could not parse the ONNX or build an engine from it."""


def timing_cache_path(model_dir: Path, machine: MachineInfo) -> Path:
    safe = "".join(c if c.isalnum() else "-" for c in machine.gpu_name)
    return (
        model_dir
        / ENGINE_DIR
        / f"timing.{safe}.sm{machine.compute_capability}.trt{machine.tensorrt_version}.cache"
    )


def build_engine(
    onnx_path: str | Path,
    profile: dict[str, dict[str, list[int]]],
    out_path: str | Path,
    timing_cache: str | Path | None = None,
    recipe: BuildRecipe | None = None,
    precision: str = "fp16",
) -> None:
    """Parse `onnx_path` (external data resolved beside it), build with one optimization profile and `recipe`
    (default: `BuildRecipe.for_precision(precision)`, the one the engine key records), write the serialized
    engine atomically; read and update the timing cache when given."""
    import tensorrt as trt

    recipe = recipe or BuildRecipe.for_precision(precision)
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    creation = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if recipe.strongly_typed else 0
    network = builder.create_network(creation)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT could not parse the ONNX model ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, recipe.workspace_bytes)
    config.builder_optimization_level = recipe.optimization_level
    if hasattr(trt.BuilderFlag, "TF32"):
        # TF32 matmuls (on by default) round inputs to 10-bit mantissas; the fp32 engine is the faithful one
        if recipe.tf32:
            config.set_flag(trt.BuilderFlag.TF32)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)
    for flag in recipe.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    trt_profile = builder.create_optimization_profile()
    for name, shapes in profile.items():
        trt_profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(trt_profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"{onnx_path}: TensorRT build_serialized_network returned nothing (see the log above)"
        )
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))


def _reusable(model_dir: Path, rel: str, key: EngineKey) -> Artifact | None:
    """The existing manifest entry for this engine if its key matches and its bytes are intact, else None: then
    the engine is built again. An engine file that its manifest entry no longer vouches for is rebuilt with a
    warning, as is one whose key is of another layout; an unreadable manifest is reported when the new one
    replaces it (`write_manifest`)."""
    if not (model_dir / MANIFEST_FILE).is_file():
        return None
    try:
        entry = load_manifest(model_dir).get(rel)
    except BrainReconError:
        return None
    if entry is None or EngineKey.from_dict(entry.engine_key) != key:
        return None
    try:
        verify_artifact(model_dir, entry)
    except (InputError, MissingFileError) as e:
        warnings.warn(f"rebuilding a TensorRT engine: {e}", RuntimeWarning, stacklevel=2)
        return None
    return entry


def source_key(root: Path, onnx_artifact: Artifact, machine: MachineInfo) -> EngineKey:
    """The key of an engine built here from the staged ONNX file: its sha256 and its external-data files' (hashed
    from the bytes under `root`, which the parser reads), precision, profile and the current recipe."""
    assert onnx_artifact.io is not None and onnx_artifact.precision is not None
    data = [sha256_file(root / rel) for rel in onnx_artifact.external_data]
    return EngineKey.for_machine(
        onnx_artifact.sha256, onnx_artifact.precision, onnx_artifact.io["profile"], machine, data
    )


def superseded_engines(model_dir: str | Path, artifacts: list[Artifact]) -> list[str]:
    """Engine entries of `model_dir`'s manifest that an export writing `artifacts` makes stale: for a (model,
    precision) whose ONNX it writes, every engine not built from those exact bytes (ONNX sha256, external-data
    sha256s from their `artifacts` entries), that profile and the current recipe, or whose key is of another
    layout. Engines of the same build for other GPUs or TensorRT versions stay (valid there); so do engines of
    models this export does not touch. `write_manifest(drop=...)` leaves them out of the new manifest."""
    model_dir = Path(model_dir)
    if not (model_dir / MANIFEST_FILE).is_file():
        return []
    try:
        old = load_manifest(model_dir)
    except BrainReconError:
        return []  # write_manifest replaces it whole, with a warning
    hashes = {a.path: a.sha256 for a in artifacts}
    anywhere = MachineInfo("", "", "")
    current: dict[tuple[str | None, str | None], EngineKey] = {}
    for a in artifacts:
        if a.kind == "onnx" and a.io is not None and a.precision is not None:
            data = [hashes[rel] for rel in a.external_data]
            current[(a.model, a.precision)] = EngineKey.for_machine(
                a.sha256, a.precision, a.io["profile"], anywhere, data
            )
    new_paths = set(hashes)
    stale = []
    for entry in old.artifacts:
        if entry.kind != "engine" or entry.path in new_paths or (entry.model, entry.precision) not in current:
            continue
        key = EngineKey.from_dict(entry.engine_key)
        if key is None or not key.same_build(current[(entry.model, entry.precision)]):
            stale.append(entry.path)
    return stale


def build_engines_for(
    root: Path, model_dir: Path, onnx_artifacts: list[Artifact]
) -> tuple[list[Artifact], dict[str, Any]]:
    """One engine per exported ONNX file (`onnx_artifacts`, paths relative to `root`, the export's staging folder):
    an engine of `model_dir` with the same key is reused in place, others are built into `root`. Without TensorRT
    or a GPU, build nothing and say why. The summary lists `built` (paths staged under `root`) and `reused`."""
    ok, reason = tensorrt_status()
    if not ok:
        return [], {
            "built": [],
            "reused": [],
            "skipped": (
                f"TensorRT engines skipped: {reason}. The ONNX files are complete; run "
                f"`recon-export --model-dir {model_dir} --stage all` on a machine with TensorRT and a GPU"
            ),
        }
    machine = current_machine()
    artifacts, built, reused = [], [], []
    for onnx_artifact in onnx_artifacts:
        assert onnx_artifact.io is not None and onnx_artifact.precision is not None and onnx_artifact.model
        key = source_key(root, onnx_artifact, machine)
        rel = engine_file(onnx_artifact.model, onnx_artifact.precision, key.digest())
        entry = _reusable(model_dir, rel, key)
        if entry is not None:
            reused.append(rel)
        else:
            build_engine(
                root / onnx_artifact.path,
                onnx_artifact.io["profile"],
                root / rel,
                timing_cache_path(model_dir, machine),
                recipe=key.recipe,
                precision=onnx_artifact.precision,
            )
            entry = describe_file(
                root,
                rel,
                "engine",
                model=onnx_artifact.model,
                precision=onnx_artifact.precision,
                io=onnx_artifact.io,
                engine_key=key.to_dict(),
                source=onnx_artifact.path,
            )
            built.append(rel)
        artifacts.append(entry)
    return artifacts, {"built": built, "reused": reused, "skipped": None, "machine": reason}
