"""Native TensorRT engine backend (TensorRT 10/11 name-based tensor API, `execute_async_v3`).

tensorrt and the CUDA runtime bindings (cuda-python: `cuda.bindings.runtime`, or `cuda.cudart` before 12.6) are
imported lazily, so this module imports anywhere. The engine key recorded in the manifest is compared with this
machine (runtime/engine_key.py) before the engine bytes are deserialised. One execution context, CUDA stream and
set of device buffers per thread (an `IExecutionContext` must not be shared between threads running concurrently);
buffers are sized for the profile's max batch once per thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import BrainReconError
from brainrecon.runtime.backends import ModelIO
from brainrecon.runtime.engine_key import EngineKey, MachineInfo, check_engine_key


class TrtError(BrainReconError):
    """TensorRT or CUDA missing, or a CUDA/TensorRT call failed."""


def cudart() -> Any:
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise TrtError(
                "cuda-python: expected the CUDA runtime bindings, found none (pip install brainrecon[trt])"
            ) from None
    return runtime


def _call(result: Any) -> Any:
    """cuda-python calls return (err, *values); raise on any error, return the value(s)."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise TrtError(f"CUDA runtime call failed: expected cudaSuccess, found {err}")
    return values[0] if len(values) == 1 else tuple(values)


def tensorrt_status() -> tuple[bool, str]:
    """(True, machine description) when engines can be built and run here, else (False, the reason)."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "TensorRT is not installed (pip install brainrecon[trt])"
    try:
        rt = cudart()
    except TrtError as e:
        return False, str(e)
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count < 1:
        return (
            False,
            f"no CUDA GPU visible (cudaGetDeviceCount: {err}, {count if err == rt.cudaError_t.cudaSuccess else 0})",
        )
    machine = current_machine()
    return (
        True,
        f"TensorRT {trt.__version__} on {machine.gpu_name} (compute capability {machine.compute_capability})",
    )


def current_machine(device: int = 0) -> MachineInfo:
    import tensorrt as trt

    props = _call(cudart().cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return MachineInfo(trt.__version__, name.rstrip("\x00").strip(), f"{props.major}.{props.minor}")


@dataclass
class _ThreadState:
    context: Any
    stream: Any
    buffers: dict[str, tuple[int, int]]  # name -> (device pointer, bytes)


class TrtBackend:
    """Run a serialized TensorRT engine the manifest vouches for (hash verified by the caller, key checked here)."""

    def __init__(
        self,
        engine_path: str | Path,
        io: ModelIO,
        recorded_key: dict[str, Any],
        onnx_sha256: str,
        precision: str,
        model_dir: str | Path,
    ):
        ok, reason = tensorrt_status()
        if not ok:
            raise TrtError(f"{engine_path}: cannot run a TensorRT engine here: {reason}")
        import tensorrt as trt

        self._trt = trt
        self.path = Path(engine_path)
        self.io = io
        recorded = EngineKey.from_dict(recorded_key)
        expected = EngineKey.for_machine(onnx_sha256, precision, io.profile, current_machine())
        check_engine_key(recorded, expected, self.path, model_dir)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise TrtError(
                f"{self.path}: TensorRT could not deserialise the engine (rebuild with recon-export)"
            )
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in self.names if n not in self.input_names]
        self.providers = [f"TensorRT {trt.__version__} (native engine)"]
        self._local = threading.local()
        self._states: list[_ThreadState] = []
        self._lock = threading.Lock()

    def _state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            rt = cudart()
            context = self.engine.create_execution_context()
            stream = _call(rt.cudaStreamCreate())
            buffers = {}
            for name in self.names:
                shape = self.engine.get_tensor_shape(name)
                dims = [self.io.max_batch if d < 0 else d for d in shape]
                nbytes = (
                    int(np.prod(dims))
                    * np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name))).itemsize
                )
                buffers[name] = (_call(rt.cudaMalloc(nbytes)), nbytes)
            state = _ThreadState(context, stream, buffers)
            self._local.state = state
            with self._lock:
                self._states.append(state)
        return state

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.io.check(inputs)
        rt = cudart()
        state = self._state()
        ctx = state.context
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host_inputs = {}
        for name in self.input_names:
            x = np.ascontiguousarray(inputs[name], dtype=self._trt.nptype(self.engine.get_tensor_dtype(name)))
            host_inputs[name] = x  # keep alive until the copy has run
            if not ctx.set_input_shape(name, x.shape):
                raise TrtError(f"{self.path}: input {name}: shape {x.shape} rejected by the engine profile")
            ptr, _ = state.buffers[name]
            _call(rt.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, h2d, state.stream))
        outputs = {}
        for name in self.names:
            ctx.set_tensor_address(name, state.buffers[name][0])
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=self._trt.nptype(self.engine.get_tensor_dtype(name)))
        if not ctx.execute_async_v3(int(state.stream)):
            raise TrtError(f"{self.path}: execute_async_v3 failed")
        for name, out in outputs.items():
            _call(rt.cudaMemcpyAsync(out.ctypes.data, state.buffers[name][0], out.nbytes, d2h, state.stream))
        _call(rt.cudaStreamSynchronize(state.stream))
        return {name: out.astype(np.float32, copy=False) for name, out in outputs.items()}

    def close(self) -> None:
        rt = cudart()
        with self._lock:
            for state in self._states:
                for ptr, _ in state.buffers.values():
                    rt.cudaFree(ptr)
                rt.cudaStreamDestroy(state.stream)
            self._states.clear()
        self._local = threading.local()
