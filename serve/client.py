"""A small client of `recon-serve` (tritonclient's HTTP or gRPC client, the KServe v2 protocol).

    from brainrecon.serve.client import ReconClient
    with ReconClient("127.0.0.1:8000") as client:
        final, stage1 = client.reconstruct(betas_row, seed=3)   # (V,) float32 → (S, S, 3), (s, s, 3) uint8

Error responses become `ServeError` with one line and the status (Triton's own message for a wrong shape or dtype;
the runtime's for NaN betas or a bad seed, both 400; 503 when the server's queue is full or the request waited past
its queue timeout: retry later). A bad request gets its own error: the requests batched with it are answered
(serve/triton_server.py). One client per thread: tritonclient's clients are not thread-safe.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

MODEL_NAME = "brainrecon"
_REQUEST_ERROR = re.compile(r"RequestError: (.+)")  # a PyTriton traceback's last line (older servers)


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
        self, betas: np.ndarray, seed: int | np.ndarray | None = None, queue_timeout_us: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One request → (final_image, stage1_image), each with the request's batch axis removed for a (V,) input.
        queue_timeout_us: refused (503) rather than run if it waits longer in the server's queue (Triton's
        per-request `timeout`; default the server's --queue-timeout-s)."""
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                result = self._client.infer(
                    MODEL_NAME,
                    self.inputs(betas, seed),
                    client_timeout=self.timeout_s,
                    timeout=queue_timeout_us,
                )
            else:
                result = self._client.infer(MODEL_NAME, self.inputs(betas, seed), timeout=queue_timeout_us)
        except InferenceServerException as e:
            raise ServeError(one_line(e.message() or str(e)), e.status()) from None
        final, stage1 = result.as_numpy("final_image"), result.as_numpy("stage1_image")
        if betas.ndim == 1:
            return final[0], stage1[0]
        return final, stage1

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


def _triton_dtype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)
