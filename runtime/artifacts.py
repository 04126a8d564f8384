"""The exported models of a model folder as backends: the manifest entry of a model (ONNX, or the TensorRT engine
built for this machine), hash-verified, opened by the engine the `RuntimeOptions` name, with its I/O spec.
The folder's data files are read by `model_folder.py`. No torch import (the runtime never loads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from brainrecon.errors import MissingFileError
from brainrecon.manifest import MANIFEST_FILE, Artifact, Manifest, ManifestError, regenerate_hint
from brainrecon.runtime.backends.base import Backend, ModelIO
from brainrecon.runtime.backends.ort import OrtBackend
from brainrecon.runtime.model_folder import ModelFolder, file_precision, verify_files

if TYPE_CHECKING:
    from brainrecon.runtime.types import RuntimeOptions


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


def load_model(folder: ModelFolder, name: str, options: RuntimeOptions) -> Backend:
    """One hash-verified backend (ONNX Runtime, OpenVINO or TensorRT, as `options` say) for the exported model
    `name`, checking every call against its I/O spec (`backend.io`)."""
    manifest, model_dir, precision = folder.manifest, folder.path, options.precision
    onnx = model_artifact(manifest, model_dir, "onnx", name, file_precision(precision))
    chosen = engine_for(manifest, model_dir, name, precision, onnx) if options.engine == "trt" else onnx
    verify_files(
        manifest, model_dir, [chosen.path] if options.engine == "trt" else [chosen.path, *onnx.external_data]
    )
    io = ModelIO.from_spec(name, chosen.io or onnx.io or {})
    if options.engine == "ort":
        return OrtBackend(
            model_dir / chosen.path, io, options.device, options.allow_cpu_fallback, options.threads
        )
    if options.engine == "openvino":
        from brainrecon.runtime.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(model_dir / chosen.path, io, precision, options.threads)
    from brainrecon.runtime.backends.tensorrt import TrtBackend, current_machine, expected_key

    expected = expected_key(manifest, onnx, precision, current_machine())
    return TrtBackend(model_dir / chosen.path, io, chosen.engine_key or {}, expected, model_dir)
