"""The ONNX Runtime backend (CPU, CUDA or TensorRT execution provider): one session per exported model; native
TensorRT engines are in `tensorrt.py`. numpy in, numpy out; onnxruntime is imported when a backend is created.

Both check every call against the model's I/O spec from the manifest (names, shapes, dtype, and the batch against
the contract's shape profile), so ONNX Runtime refuses exactly what a TensorRT engine could not run.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.choices import DEVICES
from brainrecon.errors import BrainReconError, InputError
from brainrecon.runtime.backends.base import ModelIO

log = logging.getLogger(__name__)

_GPU_PROVIDER = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_WARNED: set[str] = set()


class ProviderError(BrainReconError):
    """A requested ONNX Runtime execution provider is not active (ORT would silently run on the CPU)."""


def ort_providers(device: str, trt_cache_dir: str | Path | None = None) -> list[Any]:
    """Provider list for `device`, most preferred first; CPU last so unsupported nodes can still run."""
    if device not in DEVICES:
        raise InputError("device", f"one of {DEVICES}", repr(device))
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    trt_options: dict[str, Any] = {}
    if trt_cache_dir is not None:
        trt_options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache_dir)}
    return [("TensorrtExecutionProvider", trt_options), "CUDAExecutionProvider", "CPUExecutionProvider"]


class OrtBackend:
    """One ONNX Runtime session. After creation, the active providers are checked: ORT falls back from a GPU
    provider to the CPU with only a log line (onnxruntime's `InferenceSession` logs a provider it could not load and continues); here that is an error unless `allow_cpu_fallback`, in
    which case it warns once per provider and records it in `fallback`."""

    def __init__(
        self,
        onnx_path: str | Path,
        io: ModelIO | None = None,
        device: str = "cpu",
        allow_cpu_fallback: bool = False,
        threads: int | None = None,
        trt_cache_dir: str | Path | None = None,
    ):
        import onnxruntime as ort

        self.path = Path(onnx_path)
        self.io = io
        self.device = device
        requested = ort_providers(device, trt_cache_dir)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        with warnings.catch_warnings():
            # ORT warns when a provider is not installed; the check below turns that into a clear decision
            warnings.simplefilter("ignore")
            self.session = ort.InferenceSession(str(self.path), options, providers=requested)
        self.providers: list[str] = list(self.session.get_providers())
        self.fallback: str | None = None
        wanted = _GPU_PROVIDER.get(device)
        if wanted is not None and wanted not in self.providers:
            msg = (
                f"{self.path}: asked for ONNX Runtime provider {wanted}, active {self.providers} "
                f"(installed: {ort.get_available_providers()})"
            )
            if not allow_cpu_fallback:
                raise ProviderError(
                    f"{msg}; install onnxruntime-gpu with a matching CUDA/TensorRT, or allow the CPU fallback"
                )
            self.fallback = f"{wanted} not active, ran on {self.providers[0]}"
            if wanted not in _WARNED:
                _WARNED.add(wanted)
                warnings.warn(f"{msg}; running on the CPU (allow_cpu_fallback)", RuntimeWarning, stacklevel=2)
            log.warning("%s", self.fallback)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees its memory with the last reference); later runs fail clearly."""
        self.session = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            raise ProviderError(f"{self.path}: the session was closed (Reconstructor.close)")
        if self.io is not None:
            self.io.check(inputs)
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))
