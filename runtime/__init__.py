"""brainrecon.runtime: the lean runtime (numpy + onnxruntime, optional TensorRT + cuda-python).

Never imports torch, diffusers or transformers (tests/test_runtime.py enforces it). Imports are lazy so that
`import brainrecon.runtime` costs only what is used:

    from brainrecon.runtime import Stage1Pipeline
    pipe = Stage1Pipeline.from_model_dir("engines/subj01", engine="ort", precision="fp32")
    result = pipe.run(betas)  # result.images (N, 64, 64, 3) uint8, result.timings, result.providers

    from brainrecon.runtime import Stage2Pipeline
    pipe = Stage2Pipeline.from_model_dir("engines/subj01", engine="ort", precision="fp32")
    result = pipe.run(betas, seed=0)  # result.stage1.images, result.images (final), result.timings per stage

Modules: backends (Backend, OrtBackend, ModelIO), trt_backend (TrtBackend), engine_key (EngineKey, checks),
stage1 (Stage1Pipeline), ddim (DDIMScheduler, numpy), stage2 (Stage2Pipeline: stage 1 + img2img refinement),
inputs (betas readers and recorded preprocessing), infer (run_inference = recon-infer).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Backend": "backends",
    "ModelIO": "backends",
    "OrtBackend": "backends",
    "ProviderError": "backends",
    "TrtBackend": "trt_backend",
    "EngineKey": "engine_key",
    "EngineMismatchError": "engine_key",
    "Stage1Pipeline": "stage1",
    "Stage1Result": "stage1",
    "DDIMConfig": "ddim",
    "DDIMScheduler": "ddim",
    "Stage2Pipeline": "stage2",
    "Stage2Result": "stage2",
    "SamplingConfig": "brainrecon.sampling",
    "load_betas": "inputs",
    "run_inference": "infer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"brainrecon.runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'brainrecon.runtime' has no attribute {name!r}")
