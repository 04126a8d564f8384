"""Triton Python-backend model `brainrecon` of `recon-serve`: the runtime API (`Reconstructor`) in the backend's stub.

recon-serve (serve/triton_server.py) writes this file as `brainrecon/1/model.py` of a private model repository, with
a `config.pbtxt` whose parameters say what to open: `model_dir`, `engine`, `precision`, `device`, `threads`,
`steps` (a shorter DDIM schedule, "" for the fitted one), `verbose` ("1": one log line per execution). Each
instance (`instance_group` count) is its own stub process with its own loaded Reconstructor. The interface is the
python_backend README's (triton-inference-server/python_backend: `TritonPythonModel.initialize / execute`).

Requests: betas (b, V) FP32, optional seed (b, 1) INT64 (default: the fitted seed). Row i's img2img noise comes
from its own seed and nothing is re-normalised over a batch (`renormalize=False`), so a row's images never depend on
what it was batched with. An invalid request (NaN/Inf betas, a negative seed) gets its own error response (HTTP 400,
one line); the valid requests of the same batch run and are answered, as in serve/triton_models/bls_model.py.
"""

import dataclasses
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from brainrecon.errors import BrainReconError
from brainrecon.runtime import Reconstructor, RuntimeOptions

# recon-serve's test hook for a load failure (tests/test_serve_triton.py): the parameter is written only into the
# config of the attempts the environment variable BRAINRECON_SERVE_FAIL_LOADS covers
FAIL_LOAD = "fail_load"


def invalid_argument(message: str):
    """A client error (HTTP 400): python_backend's TritonError takes a status code since Triton 23.xx."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if params.get(FAIL_LOAD):
            raise RuntimeError(f"model load failure injected ({params[FAIL_LOAD]})")
        options = RuntimeOptions(
            engine=params["engine"],
            precision=params["precision"],
            device=params["device"],
            threads=int(params["threads"]) if params["threads"] else None,
        )
        self.rec = Reconstructor.open(params["model_dir"], options)
        self.sampling = self.rec.sampling
        if self.sampling is not None and params["steps"]:
            self.sampling = dataclasses.replace(self.sampling, num_inference_steps=int(params["steps"]))
        self.default_seed = self.sampling.seed if self.sampling is not None else 0
        self.verbose = params.get("verbose") == "1"
        self.executions = 0
        # the first call pays ONNX Runtime's lazy allocations, not the first client
        self._run(
            np.zeros((1, self.rec.n_voxels), np.float32),
            None if self.rec.stage == 1 else np.zeros(1, np.int64),
        )

    def _run(self, betas, seeds):
        return self.rec.reconstruct(betas, sampling=self.sampling, seeds=seeds, renormalize=False)

    def _checked(self, request):
        """One request's rows and seeds, checked by the runtime; BrainReconError (one line) when refused."""
        betas = pb_utils.get_input_tensor_by_name(
            request, "betas"
        ).as_numpy()  # (b, V) float32, checked by Triton
        seed = pb_utils.get_input_tensor_by_name(request, "seed")  # (b, 1) int64 or None
        seeds = None
        if seed is not None and (seed.as_numpy() < 0).any():
            raise BrainReconError(
                f"seed: expected a non-negative integer, found {int(seed.as_numpy().min())}"
            )
        if self.rec.stage == 2:
            seeds = np.full(len(betas), self.default_seed, np.int64)
            if seed is not None:
                seeds = seed.as_numpy().reshape(len(betas)).astype(np.int64)
        self.rec.check(betas, sampling=self.sampling, seeds=seeds, renormalize=False)
        return betas, seeds

    def execute(self, requests):
        responses = [None] * len(requests)
        valid = []
        for i, request in enumerate(requests):
            try:
                valid.append((i, *self._checked(request)))
            except BrainReconError as e:
                responses[i] = pb_utils.InferenceResponse(error=invalid_argument(str(e)))
        self.executions += 1
        if self.verbose:
            rows = sum(len(b) for _, b, _ in valid)
            pb_utils.Logger.log_info(  # benchmarks/bench_serve.py reads "runtime call N: R requests, K rows"
                f"runtime call {self.executions}: {len(requests)} requests, {rows} rows, {len(valid)} valid"
            )
        if not valid:
            return responses
        betas = np.concatenate([b for _, b, _ in valid])  # (N, V)
        seeds = None if self.rec.stage == 1 else np.concatenate([s for _, _, s in valid])
        try:
            out = self._run(betas, seeds)
        except (
            Exception
        ) as e:  # a failed runtime call: the requests it held get the message; the server goes on
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
        self.rec.close()
