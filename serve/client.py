"""A small client of `recon-serve` (tritonclient's HTTP or gRPC client, the KServe v2 protocol).

    from brainrecon.serve.client import ReconClient
    with ReconClient("127.0.0.1:8000") as client:
        final, stage1 = client.reconstruct(betas_row, seed=3)   # (V,) float32 → (S, S, 3), (s, s, 3) uint8

Error responses become `ServeError` with one line (Triton's own message for a wrong shape or dtype; the runtime's
for NaN betas or a bad seed, out of PyTriton's traceback). A valid request that was batched with an invalid one
is resent once (see serve/triton_server.py). One client per thread: tritonclient's clients are not thread-safe.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

MODEL_NAME = "brainrecon"
RESEND_MARKER = "not run: resend"  # serve/triton_server.py RESEND_MARKER (that module needs PyTriton)
_REQUEST_ERROR = re.compile(r"RequestError: (.+)")


class ServeError(Exception):
    """The server refused or failed a request; `str(e)` is one line."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


def one_line(message: str) -> str:
    """The runtime's one-line message out of PyTriton's traceback, or the first line of Triton's own message."""
    found = _REQUEST_ERROR.findall(message)
    if found:
        return found[-1].strip()
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    line = lines[0] if lines else message
    return line.split(". NOTE: ")[0]  # Triton appends a general note on max_batch_size to shape errors


class ReconClient:
    def __init__(self, url: str = "127.0.0.1:8000", protocol: str = "http", timeout_s: float = 120.0):
        if protocol == "http":
            import tritonclient.http as triton

            self._client = triton.InferenceServerClient(
                url, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        elif protocol == "grpc":
            import tritonclient.grpc as triton

            self._client = triton.InferenceServerClient(url)
        else:
            raise ValueError(f"protocol: expected http or grpc, found {protocol!r}")
        self._triton = triton
        self.timeout_s = timeout_s
        self.protocol = protocol

    def inputs(self, betas: np.ndarray, seed: int | np.ndarray | None = None) -> list[Any]:
        """betas (V,) or (b, V) as sent (no dtype conversion: the server checks it); seed: one int or (b,)."""
        betas = betas[None] if betas.ndim == 1 else betas
        tensor = self._triton.InferInput("betas", list(betas.shape), _triton_dtype(betas.dtype))
        tensor.set_data_from_numpy(betas)
        inputs = [tensor]
        if seed is not None:
            seeds = np.broadcast_to(np.asarray(seed, np.int64).reshape(-1, 1), (len(betas), 1)).copy()
            tensor = self._triton.InferInput("seed", list(seeds.shape), "INT64")
            tensor.set_data_from_numpy(seeds)
            inputs.append(tensor)
        return inputs

    def reconstruct(
        self, betas: np.ndarray, seed: int | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One request → (final_image, stage1_image), each with the request's batch axis removed for a (V,) input."""
        from tritonclient.utils import InferenceServerException

        for attempt in (0, 1):
            try:
                kwargs = {"timeout": int(self.timeout_s * 1e6)} if self.protocol == "grpc" else {}
                result = (
                    self._client.infer(
                        MODEL_NAME, self.inputs(betas, seed), client_timeout=self.timeout_s, **kwargs
                    )
                    if self.protocol == "grpc"
                    else self._client.infer(MODEL_NAME, self.inputs(betas, seed))
                )
            except InferenceServerException as e:
                message = e.message() or str(e)
                if RESEND_MARKER in message and attempt == 0 and not _is_own_error(message, betas, seed):
                    continue
                raise ServeError(one_line(message), e.status()) from None
            final, stage1 = result.as_numpy("final_image"), result.as_numpy("stage1_image")
            if betas.ndim == 1:
                return final[0], stage1[0]
            return final, stage1
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(MODEL_NAME))
        except Exception:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ReconClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_own_error(message: str, betas: np.ndarray, seed: Any) -> bool:
    """Whether this request itself is invalid (then resending cannot help)."""
    return not np.isfinite(betas).all() or (seed is not None and (np.asarray(seed) < 0).any())


def _triton_dtype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)
