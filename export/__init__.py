"""brainrecon.export: trained models → validated ONNX (fp32, fp16) → TensorRT engines, recorded in a manifest.

    contracts.py    one ExportContract per exportable model (names, dynamic axes, profiles, tolerances, exporter)
    onnx_export.py  the one generic export routine: contract + source → checked, validated fp32/fp16 ONNX
    stage1.py       sources of stage 1: GRU, ridge (graph builder), VDVAE decoder
    stage2.py       sources of stage 2: CLIP ridges (graph builder), VAE encoder/decoder, UNet; DDIM tables
    fp16.py         fp32 → fp16 ONNX with ONNX Runtime's float16 tool
    validate.py     ONNX Runtime vs torch/numpy parity (ParityError), graph checks
    tensorrt.py     engine builds (strongly typed, timing cache), keyed per machine
    subject.py      export_model_dir: a subject model folder → all of the above + manifest, published all or nothing

Importing the package is cheap; torch is imported by `export_model_dir` when it runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "export_model_dir": "subject",
    "ExportContract": "contracts",
    "Tolerance": "contracts",
    "ParityError": "validate",
    "validate_onnx": "validate",
    "build_engine": "tensorrt",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"brainrecon.export.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'brainrecon.export' has no attribute {name!r}")
