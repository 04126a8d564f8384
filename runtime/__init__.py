"""brainrecon.runtime: the lean runtime (numpy + onnxruntime, optional TensorRT + cuda-python).

Never imports torch, diffusers or transformers (tests/test_runtime.py enforces it). The public API:

    from brainrecon.runtime import Reconstructor, RuntimeOptions

    with Reconstructor.open("engines/subj01", RuntimeOptions(engine="ort", precision="fp32")) as rec:
        out = rec.reconstruct(betas)  # out.images (N, S, S, 3) uint8, out.stage1_images, out.timings

Modules: api (Reconstructor, RuntimeOptions, Reconstruction), stage1 (Stage1Pipeline), stage2 (Stage2Pipeline:
stage 1 + img2img refinement), ddim (DDIMScheduler, numpy), inputs (betas readers and recorded preprocessing),
artifacts (manifest entries → verified backends), backends/ (base: Backend, ModelIO; ort: OrtBackend;
tensorrt: EngineKey, TrtBackend), infer (recon-infer's output folder). Imports are lazy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Reconstructor": "brainrecon.runtime.api",
    "RuntimeOptions": "brainrecon.runtime.api",
    "Reconstruction": "brainrecon.runtime.api",
    "SamplingConfig": "brainrecon.sampling",
    "Stage1Pipeline": "brainrecon.runtime.stage1",
    "Stage2Pipeline": "brainrecon.runtime.stage2",
    "DDIMScheduler": "brainrecon.runtime.ddim",
    "load_betas": "brainrecon.runtime.inputs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'brainrecon.runtime' has no attribute {name!r}")
