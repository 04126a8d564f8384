"""Triton Python-backend (BLS) model `brainrecon`: the two-stage reconstruction loop, calling the repository's models.

Written by `recon-export --format triton` as `brainrecon/1/model.py`, with `brainrecon/1/model_dir/` (the manifest
and the data files: latent and CLIP statistics, unconditional contexts, sampling, DDIM tables). A denoising loop
cannot be a Triton ensemble (ensembles are DAGs), so this model runs it with Business Logic Scripting
(triton-inference-server/python_backend README, "Business Logic Scripting": `pb_utils.InferenceRequest(...).exec()`).

The loop is brainrecon.runtime's own (`Reconstructor` over `Stage1Pipeline` / `Stage2Pipeline`, numpy DDIM and
guidance), with each model call going to a Triton model instead of an ONNX Runtime session (`BlsBackend`), so the
images are those of `recon-infer` on the same ONNX files. The config's parameter `unet_graph` says which UNet the
repository serves: "kv" (K/V once: `unet_context` on the unconditional context once, on each chunk's predicted
contexts once, `unet_kv` at every step, as recon-infer on a folder that has the pair), "plain" (`unet`) or "none"
(stage 1 only). Needs `brainrecon[runtime]` (numpy; onnxruntime is not imported) in the server's Python environment.

The pipelines are built at the first request, not in `initialize`: with K/V once, building Stage2Pipeline calls
`unet_context`, and python_backend refuses BLS calls outside `execute` ("BLS is only supported during the 'execute'
function", triton-inference-server/python_backend `src/infer_request.cc`, `InferRequest::Exec`). `initialize` still
verifies the copied data files, so a damaged repository fails to load.

Requests: betas (b, V) FP32, optional seed (b, 1) INT64 (default: the fitted seed); row i's img2img noise comes
from its own seed and nothing is re-normalised over the batch, as in recon-serve. An invalid request (NaN betas, a
negative seed) gets its own error response; the others of the batch are answered normally.
"""

import functools
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from brainrecon import model_dir as layout
from brainrecon.config import config_from_dict
from brainrecon.errors import BrainReconError
from brainrecon.io import load_npy, read_json
from brainrecon.manifest import load_manifest, verify_manifest
from brainrecon.runtime.api import Reconstructor, RuntimeOptions
from brainrecon.runtime.backends.base import ModelIO
from brainrecon.runtime.stage1 import Stage1Pipeline
from brainrecon.runtime.stage2 import Stage2Pipeline, load_scheduler
from brainrecon.sampling import SamplingConfig


class BlsBackend:
    """The runtime's Backend protocol (`run(dict) -> dict`, numpy in and out) over a BLS call to a Triton model."""

    def __init__(self, io: ModelIO):
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


# Stage2Pipeline's roles → the Triton models serving them, per UNet graph ("unet" is the UNet step either way)
UNET_ROLES = {"kv": {"unet": "unet_kv", "unet_context": "unet_context"}, "plain": {"unet": "unet"}}


def model_ios(model_dir: Path, models: list, precision: str) -> dict:
    """{Triton model: its ModelIO} from the manifest, after verifying the copied data files against it."""
    manifest = load_manifest(model_dir)
    data = [a.path for a in manifest.artifacts if a.kind == "data"]
    verify_manifest(model_dir, data)  # the copied data files are the ones the manifest vouches for
    ios = {}
    for name in models:
        artifact = manifest.find("onnx", name, precision) or manifest.find("engine", name, precision)
        ios[name] = ModelIO.from_spec(name, artifact.io)
    return ios


def open_reconstructor(model_dir: Path, models: list, precision: str, unet_graph: str) -> Reconstructor:
    """The runtime's pipelines on `model_dir`'s data files, every model a BlsBackend (ios from the manifest);
    stage 2 on the UNet graph `unet_graph` ("kv" | "plain"), stage 1 only for "none"."""
    ios = model_ios(model_dir, models, precision)
    backends = {name: BlsBackend(io) for name, io in ios.items()}
    stage1_summary = read_json(model_dir / layout.STAGE1_SUMMARY, "stage-1 summary")
    regressor = stage1_summary["config"]["regressor"]
    info = {"model_dir": str(model_dir), "engine": "triton", "precision": precision, "files": {}}
    stage1 = Stage1Pipeline(
        backends[regressor],
        backends[layout.VDVAE_DECODER],
        ios[regressor],
        ios[layout.VDVAE_DECODER],
        load_npy(model_dir / layout.LATENT_MEAN, "training-latent mean"),
        load_npy(model_dir / layout.LATENT_STD, "training-latent std"),
        renormalize=False,
        info={**info, "regressor": regressor},
    )
    options = RuntimeOptions(precision=precision)
    if unet_graph == "none":
        return Reconstructor(stage1, model_dir, options)
    summary = read_json(model_dir / layout.STAGE2_SUMMARY, "stage-2 summary")
    sampling = config_from_dict(SamplingConfig, summary["sampling"], str(model_dir / layout.STAGE2_SUMMARY))
    roles = {**{m: m for m in layout.STAGE2_MODELS if m != "unet"}, **UNET_ROLES[unet_graph]}
    pipeline = Stage2Pipeline(
        stage1,
        {role: backends[name] for role, name in roles.items()},
        {role: ios[name] for role, name in roles.items()},
        target_stats={
            t: tuple(
                load_npy(model_dir / layout.clip_target_stat(t, s), f"CLIP-{t} {s}") for s in ("mean", "std")
            )
            for t in layout.CLIP_TARGETS
        },
        uncond={
            t: load_npy(model_dir / layout.uncond_context(t), f"uncond CLIP-{t}") for t in layout.CLIP_TARGETS
        },
        sampling=sampling,
        scheduler=load_scheduler(model_dir, sampling),
        renormalize=False,
        info=info,
    )
    return Reconstructor(pipeline, model_dir, options)


def invalid_argument(message: str):
    """A client error (HTTP 400): python_backend's TritonError takes a status code since Triton 23.xx."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"] / "model_dir"
        models = params["models"].split(",")
        model_ios(folder, models, params["precision"])  # a damaged copy fails the load
        self.open = functools.partial(
            open_reconstructor, folder, models, params["precision"], params["unet_graph"]
        )
        self.rec = None  # built at the first request (see the module docstring)

    def reconstructor(self) -> Reconstructor:
        if self.rec is None:
            self.rec = self.open()
            self.default_seed = self.rec.sampling.seed if self.rec.sampling is not None else 0
        return self.rec

    def _checked(self, request):
        betas = pb_utils.get_input_tensor_by_name(request, "betas").as_numpy()  # (b, V) float32
        seed = pb_utils.get_input_tensor_by_name(request, "seed")
        seeds = None
        if self.rec.stage == 2:
            seeds = np.full(len(betas), self.default_seed, np.int64)
            if seed is not None:
                seeds = seed.as_numpy().reshape(len(betas)).astype(np.int64)
                if (seeds < 0).any():
                    raise BrainReconError(f"seed: expected a non-negative integer, found {int(seeds.min())}")
        self.rec.check(betas, seeds=seeds, renormalize=False)
        return betas, seeds

    def execute(self, requests):
        try:
            self.reconstructor()
        except Exception as e:  # the pipelines could not be built: every request is told why
            error = pb_utils.TritonError(f"{type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = [None] * len(requests)
        valid = []
        for i, request in enumerate(requests):
            try:
                valid.append((i, *self._checked(request)))
            except BrainReconError as e:
                responses[i] = pb_utils.InferenceResponse(error=invalid_argument(str(e)))
        if valid:
            betas = np.concatenate([b for _, b, _ in valid])
            seeds = None if self.rec.stage == 1 else np.concatenate([s for _, _, s in valid])
            try:
                out = self.rec.reconstruct(betas, seeds=seeds, renormalize=False)
            except Exception as e:  # a failed model call: every request of this batch gets the message
                error = pb_utils.TritonError(f"{type(e).__name__}: {e}")
                for i, _, _ in valid:
                    responses[i] = pb_utils.InferenceResponse(error=error)
                return responses
            start = 0
            for i, rows, _ in valid:
                part = slice(start, start + len(rows))
                start = part.stop
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("final_image", np.ascontiguousarray(out.images[part])),
                        pb_utils.Tensor("stage1_image", np.ascontiguousarray(out.stage1_images[part])),
                    ]
                )
        return responses

    def finalize(self):
        self.rec = None
