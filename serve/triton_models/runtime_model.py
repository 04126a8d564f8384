"""Triton Python-backend model `brainrecon` of `recon-serve`: the runtime API (`Reconstructor`) in the backend's stub.

recon-serve (serve/triton_server.py) writes this file as `brainrecon/1/model.py` of a private model repository, with
a `config.pbtxt` whose parameters say what to open: `model_dir`, `engine`, `precision`, `device`, `threads`,
`steps`, `sampler`, `guidance_stop`, `cache_interval` (the stage-2 sampling's overrides, "" for the fitted value),
`verbose` ("1": one log line per execution). Each
instance (`instance_group` count) is its own stub process with its own loaded Reconstructor. The interface is the
python_backend README's (triton-inference-server/python_backend: `TritonPythonModel.initialize / execute`).

Requests: betas (b, V) FP32, optional seed (b, 1) INT64 (default: the fitted seed). Row i's img2img noise comes
from its own seed and nothing is re-normalised over a batch (`renormalize=False`), so a row's images never depend on
what it was batched with. An invalid request (NaN/Inf betas, a negative seed) gets its own error response (HTTP 400,
one line); the valid requests of the same batch run and are answered (serve/triton_requests.py, shared with
serve/triton_models/bls_model.py).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from brainrecon.runtime import Reconstructor, RuntimeOptions
from brainrecon.serve.triton_requests import check_requests, run_requests

# recon-serve's test hook for a load failure (tests/test_serve_triton.py): the parameter is written only into the
# config of the attempts the environment variable BRAINRECON_SERVE_FAIL_LOADS covers
FAIL_LOAD = "fail_load"


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
        if self.sampling is not None:  # the fitted sampling with recon-serve's overrides ("": fitted)
            self.sampling = self.sampling.with_overrides(
                num_inference_steps=int(params["steps"]) if params["steps"] else None,
                sampler=params.get("sampler") or None,
                guidance_stop=float(params["guidance_stop"]) if params.get("guidance_stop") else None,
                cache_interval=int(params["cache_interval"]) if params.get("cache_interval") else None,
            )
        self.verbose = params.get("verbose") == "1"
        self.executions = 0
        # the first call pays ONNX Runtime's lazy allocations, not the first client
        self.rec.reconstruct(
            np.zeros((1, self.rec.n_voxels), np.float32),
            sampling=self.sampling,
            seeds=None if self.rec.stage == 1 else np.zeros(1, np.int64),
            renormalize=False,
        )

    def execute(self, requests):
        responses, valid = check_requests(pb_utils, self.rec, requests, self.sampling)
        self.executions += 1
        if self.verbose:
            rows = sum(len(checked.betas) for _, checked in valid)
            pb_utils.Logger.log_info(  # benchmarks/bench_serve.py reads "runtime call N: R requests, K rows"
                f"runtime call {self.executions}: {len(requests)} requests, {rows} rows, {len(valid)} valid"
            )
        return run_requests(pb_utils, self.rec, responses, valid)

    def finalize(self):
        self.rec.close()
