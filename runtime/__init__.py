"""brainrecon.runtime: the lean runtime (numpy + onnxruntime, optional TensorRT + cuda-python).

Never imports torch, diffusers or transformers (tests/test_runtime.py enforces it). The public API:

    from brainrecon.runtime import Reconstructor, RuntimeOptions

    with Reconstructor.open("engines/subj01", RuntimeOptions(engine="ort", precision="fp32")) as rec:
        out = rec.reconstruct(betas)  # out.images (N, S, S, 3) uint8, out.stage1_images, out.timings

Modules, in the order a call goes through them: api (Reconstructor), types (RuntimeOptions, CheckedInputs,
Reconstruction), model_folder (read_model_folder: the folder read and verified once), artifacts (load_model:
manifest entry → verified backend), inputs (check_betas; betas readers and recorded preprocessing), stage1
(Stage1Pipeline), stage2 (Stage2Pipeline: stage 1 + img2img refinement), ddim (DDIMScheduler, numpy), samplers
(DPMSolverScheduler, numpy; the step function of either), backends/
(base: Backend, ModelIO; ort: OrtBackend; openvino; tensorrt: EngineKey, TrtBackend), infer (recon-infer's output
folder). Imports are lazy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Reconstructor": "brainrecon.runtime.api",
    "RuntimeOptions": "brainrecon.runtime.types",
    "Reconstruction": "brainrecon.runtime.types",
    "CheckedInputs": "brainrecon.runtime.types",
    "read_model_folder": "brainrecon.runtime.model_folder",
    "default_stage": "brainrecon.runtime.model_folder",
    "SamplingConfig": "brainrecon.sampling",
    "Stage1Pipeline": "brainrecon.runtime.stage1",
    "Stage2Pipeline": "brainrecon.runtime.stage2",
    "DDIMScheduler": "brainrecon.runtime.ddim",
    "load_betas": "brainrecon.runtime.inputs",
    # one model file as a backend, outside a folder's pipelines (recon-eval int8 runs an INT8 IR in place of the UNet)
    "ModelIO": "brainrecon.runtime.backends.base",
    "OrtBackend": "brainrecon.runtime.backends.ort",
    "OpenVinoBackend": "brainrecon.runtime.backends.openvino",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'brainrecon.runtime' has no attribute {name!r}")
