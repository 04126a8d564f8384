"""One execution of a `brainrecon` Triton Python-backend model (recon-serve's triton_models/runtime_model.py, the
exported repository's triton_models/bls_model.py): every request checked on its own by the runtime
(`Reconstructor.check`, the one scan of its betas), the valid ones run in one `run_checked` call, one response
per request. An invalid request (NaN/Inf betas, a negative seed) gets its own error (HTTP 400, one line) and its
neighbours are answered; a failed runtime call fails the requests it held, and the server goes on.

Requests: betas (b, V) FP32, optional seed (b, 1) INT64 (default: the sampling's seed). Row i's img2img noise
comes from its own seed and nothing is re-normalised over a batch, so a row's images never depend on what it was
batched with. `pb_utils` is the stub's `triton_python_backend_utils` (importable only inside Triton's stub, so the
models pass it in).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from brainrecon.errors import BrainReconError
from brainrecon.runtime import CheckedInputs, Reconstructor
from brainrecon.sampling import SamplingConfig


def invalid_argument(pb_utils: Any, message: str) -> Any:
    """A client error (HTTP 400): python_backend's TritonError takes a status code since Triton 23.xx."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def check_requests(
    pb_utils: Any, rec: Reconstructor, requests: list[Any], sampling: SamplingConfig | None = None
) -> tuple[list[Any], list[tuple[int, CheckedInputs]]]:
    """(responses, valid): an error response at the index of each refused request, None elsewhere; and each
    accepted request's index with its checked rows."""
    default_seed = (sampling or rec.sampling).seed if rec.stage == 2 else 0
    responses: list[Any] = [None] * len(requests)
    valid = []
    for i, request in enumerate(requests):
        betas = pb_utils.get_input_tensor_by_name(
            request, "betas"
        ).as_numpy()  # (b, V), shape checked by Triton
        seed = pb_utils.get_input_tensor_by_name(request, "seed")  # (b, 1) int64 or None
        try:
            if seed is not None and (seed.as_numpy() < 0).any():
                raise BrainReconError(
                    f"seed: expected a non-negative integer, found {int(seed.as_numpy().min())}"
                )
            seeds = None
            if rec.stage == 2:
                seeds = np.full(len(betas), default_seed, np.int64)
                if seed is not None:
                    seeds = seed.as_numpy().reshape(len(betas)).astype(np.int64)
            valid.append((i, rec.check(betas, sampling, seeds, renormalize=False)))
        except BrainReconError as e:
            responses[i] = pb_utils.InferenceResponse(error=invalid_argument(pb_utils, str(e)))
    return responses, valid


def run_requests(
    pb_utils: Any, rec: Reconstructor, responses: list[Any], valid: list[tuple[int, CheckedInputs]]
) -> list[Any]:
    """Fill `responses` from one runtime call on the rows of every valid request, split back per request."""
    if not valid:
        return responses
    try:
        out = rec.run_checked(CheckedInputs.concat([checked for _, checked in valid]))
    except Exception as e:  # a failed runtime call: the requests it held get the message; the server goes on
        error = pb_utils.TritonError(f"{type(e).__name__}: {e}")
        for i, _ in valid:
            responses[i] = pb_utils.InferenceResponse(error=error)
        return responses
    start = 0
    for i, checked in valid:
        part = slice(start, start + len(checked.betas))
        start = part.stop
        responses[i] = pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("final_image", np.ascontiguousarray(out.images[part])),
                pb_utils.Tensor("stage1_image", np.ascontiguousarray(out.stage1_images[part])),
            ]
        )
    return responses
