"""Triton Python-backend (BLS) model `brainrecon`: the two-stage reconstruction loop, calling the repository's models.

Written by `recon-export --format triton` as `brainrecon/1/model.py`, with `brainrecon/1/model_dir/` (the manifest
and the data files: latent and CLIP statistics, unconditional contexts, sampling, DDIM tables). A denoising loop
cannot be a Triton ensemble (ensembles are DAGs), so this model runs it with Business Logic Scripting
(triton-inference-server/python_backend README, "Business Logic Scripting": `pb_utils.InferenceRequest(...).exec()`).

The loop is brainrecon.runtime's own (`Reconstructor` over `Stage1Pipeline` / `Stage2Pipeline` on the copied
folder read by `read_model_folder`, the numpy sampler and guidance of the folder's fitted sampling: stage2.json's
`sampler` and `guidance_stop` as well), with each model call going to a Triton model instead of
an ONNX Runtime session (`BlsBackend`), so the images are those of `recon-infer` on the same ONNX files. The
config's parameter `unet_graph` says which UNet the repository serves: "kv" (K/V once: `unet_context` on the
unconditional context once, on each chunk's predicted contexts once, `unet_kv` at every step, as recon-infer on a
folder that has the pair), "plain" (`unet`) or "none" (stage 1 only). Needs `brainrecon[runtime]` (numpy; onnxruntime is not imported) in the server's Python environment.

`initialize` reads and verifies the copied folder (a damaged repository fails to load) and builds the pipelines,
which runs no model: the unconditional K/V of K/V once are computed at the first request, inside `execute`, where
python_backend allows BLS calls ("BLS is only supported during the 'execute' function",
triton-inference-server/python_backend `src/infer_request.cc`, `InferRequest::Exec`).

Requests: betas (b, V) FP32, optional seed (b, 1) INT64 (default: the fitted seed); each is checked and answered as
in recon-serve (serve/triton_requests.py): an invalid request (NaN betas, a negative seed) gets its own error
response, the others of the batch are answered from one runtime call.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from brainrecon import model_dir as layout
from brainrecon.errors import BrainReconError
from brainrecon.runtime import (
    Reconstructor,
    RuntimeOptions,
    Stage1Pipeline,
    Stage2Pipeline,
    read_model_folder,
)
from brainrecon.sampling import PRESETS
from brainrecon.serve.triton_requests import check_requests, run_requests


class BlsBackend:
    """The runtime's Backend protocol (`run(dict) -> dict`, numpy in and out, `io` the model's ModelIO from the
    manifest) over a BLS call to a Triton model."""

    def __init__(self, io):
        self.io = io
        self.name = io.model
        self.providers = [f"triton:{io.model}"]
        self.outputs = [name for name, _, _ in io.outputs]

    def run(self, inputs):
        self.io.check(
            inputs
        )  # the contract's names, shapes, dtypes and batch range, as ONNX Runtime's backend
        tensors = []
        for name, shape, _ in self.io.inputs:
            x = np.ascontiguousarray(inputs[name])
            if len(shape) == 1:  # (batch,) → (batch, 1): the config's dims [1] with reshape []
                x = x.reshape(-1, 1)
            tensors.append(pb_utils.Tensor(name, x))
        request = pb_utils.InferenceRequest(
            model_name=self.name, requested_output_names=self.outputs, inputs=tensors
        )
        response = request.exec()
        if response.has_error():
            raise BrainReconError(f"Triton model {self.name}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.outputs}


def open_reconstructor(model_dir: Path, precision: str, unet_graph: str) -> Reconstructor:
    """The runtime's pipelines on the copied folder `model_dir`, every model a BlsBackend (I/O from the manifest);
    stage 2 on the UNet graph `unet_graph` ("kv" | "plain"), stage 1 only for "none"."""
    stage1_only = unet_graph == "none"
    options = RuntimeOptions(precision=precision, unet_graph="auto" if stage1_only else unet_graph)
    folder = read_model_folder(model_dir, 1 if stage1_only else 2, options.precision, options.unet_graph)

    def backend(name: str) -> BlsBackend:
        return BlsBackend(folder.model_io(name))

    stage1 = Stage1Pipeline(folder, backend(folder.stage1.regressor), backend(layout.VDVAE_DECODER))
    if folder.stage2 is None:
        return Reconstructor(folder, stage1, options)
    backends = {role: backend(name) for role, name in folder.stage2.models.items()}
    return Reconstructor(folder, Stage2Pipeline(folder, stage1, backends), options)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"] / "model_dir"
        self.rec = open_reconstructor(folder, params["precision"], params["unet_graph"])
        # the repository's preset over the fitted sampling (recon-export --preset; "paper" overrides nothing)
        preset = PRESETS[params.get("preset", "paper")]
        self.sampling = self.rec.sampling.with_overrides(**preset) if self.rec.stage == 2 else None

    def execute(self, requests):
        return run_requests(pb_utils, self.rec, *check_requests(pb_utils, self.rec, requests, self.sampling))

    def finalize(self):
        self.rec = None
