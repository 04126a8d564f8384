"""Model artifacts of a model directory, as both runtime pipelines load them: the manifest entry of a model (ONNX,
or the TensorRT engine built for this machine), hash-verified, wrapped in a backend with its I/O spec.
No torch import (the runtime never loads it).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from brainrecon.errors import InputError, MissingFileError
from brainrecon.manifest import (
    MANIFEST_FILE,
    Artifact,
    Manifest,
    ManifestError,
    regenerate_hint,
    verify_artifact,
)
from brainrecon.runtime.backends.base import Backend, ModelIO
from brainrecon.runtime.backends.ort import OrtBackend

ENGINES = ("ort", "trt", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16")
# What each engine runs: bf16 is OpenVINO's inference precision on the fp32 files (AMX CPUs), not a file of its own.
ENGINE_PRECISIONS = {"ort": ("fp32", "fp16"), "trt": ("fp32", "fp16"), "openvino": ("fp32", "bf16")}


def check_engine(engine: str, precision: str) -> None:
    """One-line InputError for an unknown engine or precision, or a pair that does not run, before anything is read."""
    if engine not in ENGINES:
        raise InputError("engine", f"one of {ENGINES}", repr(engine))
    if precision not in PRECISIONS:
        raise InputError("precision", f"one of {PRECISIONS}", repr(precision))
    if precision not in ENGINE_PRECISIONS[engine]:
        raise InputError(
            "precision", f"one of {ENGINE_PRECISIONS[engine]} for engine {engine!r}", repr(precision)
        )


def file_precision(precision: str) -> str:
    """The precision of the exported files a run reads: OpenVINO's bf16 compiles the fp32 ONNX."""
    return "fp32" if precision == "bf16" else precision


def model_artifact(manifest: Manifest, model_dir: Path, kind: str, model: str, precision: str) -> Artifact:
    found = manifest.find(kind, model, precision)
    if found is None:
        raise MissingFileError(
            Path(model_dir) / "manifest.json",
            f"{model} {precision} {'ONNX' if kind == 'onnx' else 'TensorRT engine'} entry",
            regenerate_hint(model_dir).replace("--stage all", f"--stage all --precision {precision}")
            if kind == "onnx"
            else f"build it on this machine with: recon-export --model-dir {model_dir} --stage all",
        )
    return found


def engine_for(manifest: Manifest, model_dir: Path, model: str, precision: str, onnx: Artifact) -> Artifact:
    """The engine entry for (model, precision) built for this machine and this ONNX; else a one-line error."""
    from brainrecon.runtime.backends.tensorrt import (
        TrtError,
        current_machine,
        expected_key,
        select_engine,
        tensorrt_status,
    )

    candidates = [
        a for a in manifest.artifacts if a.kind == "engine" and a.model == model and a.precision == precision
    ]
    if not candidates:
        model_artifact(manifest, model_dir, "engine", model, precision)  # raises MissingFileError
    ok, reason = tensorrt_status()
    if not ok:
        raise TrtError(f"{model_dir / candidates[0].path}: cannot run a TensorRT engine here: {reason}")
    if not onnx.io or "profile" not in onnx.io:
        raise ManifestError(
            f"{model_dir / MANIFEST_FILE}: expected the I/O spec and shape profile of {onnx.path}, found none "
            f"({regenerate_hint(model_dir)})"
        )
    return select_engine(candidates, expected_key(manifest, onnx, precision, current_machine()), model_dir)


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


def load_model(
    manifest: Manifest,
    model_dir: Path,
    name: str,
    engine: str,
    precision: str,
    device: str,
    allow_cpu_fallback: bool,
    threads: int | None,
) -> tuple[Backend, ModelIO, str, dict[str, Any]]:
    """One hash-verified backend (ONNX Runtime, OpenVINO or TensorRT) for `name`; returns (backend, io, the file's path in
    the model dir, the contract's baked-in constants)."""
    onnx = model_artifact(manifest, model_dir, "onnx", name, file_precision(precision))
    chosen = engine_for(manifest, model_dir, name, precision, onnx) if engine == "trt" else onnx
    verify_files(
        manifest, model_dir, [chosen.path] if engine == "trt" else [chosen.path, *onnx.external_data]
    )
    spec = chosen.io or onnx.io or {}
    io = ModelIO.from_spec(name, spec)
    constants = dict(spec.get("constants") or {})
    if engine == "ort":
        backend: Backend = OrtBackend(model_dir / chosen.path, io, device, allow_cpu_fallback, threads)
    elif engine == "openvino":
        from brainrecon.runtime.backends.openvino import OpenVinoBackend

        backend = OpenVinoBackend(model_dir / chosen.path, io, precision, threads)
    else:
        from brainrecon.runtime.backends.tensorrt import TrtBackend, current_machine, expected_key

        expected = expected_key(manifest, onnx, precision, current_machine())
        backend = TrtBackend(model_dir / chosen.path, io, chosen.engine_key or {}, expected, model_dir)
    return backend, io, chosen.path, constants
