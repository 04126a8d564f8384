"""TensorRT engines at run time: what an engine was built for (`EngineKey`, checked against this machine before any
bytes are deserialised) and the native engine backend (TensorRT 10/11 name-based tensor API, `execute_async_v3`).
Engines are built by `brainrecon.export.tensorrt`.

An engine runs only on the TensorRT version and GPU (compute capability) it was built with, and it is only valid
for the exact ONNX bytes, precision and shape profile it was built from (TensorRT developer guide, "Engine
compatibility"). The key holds all six; the manifest records it beside the engine file.

tensorrt and the CUDA runtime bindings (cuda-python: `cuda.bindings.runtime`, or `cuda.cudart` before 12.6) are
imported lazily, so this module imports anywhere. One execution context, CUDA stream and set of device buffers
per thread (an `IExecutionContext` must not be shared between threads running concurrently); buffers are sized
for the profile's max batch once per thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import BrainReconError
from brainrecon.runtime.backends.base import ModelIO

ProfileEntry = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (input, min, opt, max shape)


class EngineMismatchError(BrainReconError):
    """An engine built for another machine, TensorRT version, ONNX file, precision or profile."""


@dataclass(frozen=True)
class MachineInfo:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    precision: str
    profile: tuple[ProfileEntry, ...]
    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    @classmethod
    def for_machine(
        cls, onnx_sha256: str, precision: str, profile: dict[str, Any], machine: MachineInfo
    ) -> EngineKey:
        return cls(
            onnx_sha256=onnx_sha256,
            precision=precision,
            profile=profile_tuple(profile),
            tensorrt_version=machine.tensorrt_version,
            gpu_name=machine.gpu_name,
            compute_capability=machine.compute_capability,
        )

    def digest(self) -> str:
        """sha256 of the canonical JSON; engine file names carry its first 12 characters."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["profile"] = [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in self.profile]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineKey:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise EngineMismatchError(f"engine key: expected keys {sorted(names)}, found {sorted(data)}")
        profile = tuple((str(n), tuple(lo), tuple(opt), tuple(hi)) for n, lo, opt, hi in data["profile"])
        return cls(**{**data, "profile": profile})


def profile_tuple(profile: dict[str, Any]) -> tuple[ProfileEntry, ...]:
    """{input: {"min": [..], "opt": [..], "max": [..]}} -> sorted hashable tuple."""
    return tuple(
        (
            name,
            tuple(int(v) for v in s["min"]),
            tuple(int(v) for v in s["opt"]),
            tuple(int(v) for v in s["max"]),
        )
        for name, s in sorted(profile.items())
    )


def key_mismatches(recorded: EngineKey, expected: EngineKey) -> list[str]:
    """Human-readable differences, field by field ("compute capability: engine 8.0, this machine 9.0")."""
    labels = {
        "onnx_sha256": ("ONNX sha256", "manifest ONNX"),
        "precision": ("precision", "requested"),
        "profile": ("shape profile", "contract"),
        "tensorrt_version": ("TensorRT", "this machine"),
        "gpu_name": ("GPU", "this machine"),
        "compute_capability": ("compute capability", "this machine"),
    }
    out = []
    for f, (label, here) in labels.items():
        a, b = getattr(recorded, f), getattr(expected, f)
        if a != b:
            if f == "onnx_sha256":
                a, b = a[:12] + "…", b[:12] + "…"
            out.append(f"{label}: engine {a}, {here} {b}")
    return out


def check_engine_key(
    recorded: EngineKey, expected: EngineKey, engine_path: str | Path, model_dir: str | Path
) -> None:
    """Raise a one-line EngineMismatchError naming every mismatched field and how to rebuild."""
    problems = key_mismatches(recorded, expected)
    if problems:
        raise EngineMismatchError(
            f"{engine_path}: engine built for another target ({'; '.join(problems)}); rebuild it on this machine "
            f"with: recon-export --model-dir {model_dir} --stage all"
        )


def select_engine(candidates: list[Any], expected: EngineKey, model_dir: str | Path) -> Any:
    """Among manifest engine entries (objects with `.path` and `.engine_key`), the one built for `expected`;
    none matching raises the mismatch of the first, which names what differs."""
    if not candidates:
        raise EngineMismatchError(
            f"{model_dir}: no TensorRT engine recorded; build one with: recon-export --model-dir {model_dir} --stage all"
        )
    for candidate in candidates:
        if candidate.engine_key and EngineKey.from_dict(candidate.engine_key) == expected:
            return candidate
    first = candidates[0]
    problems = key_mismatches(EngineKey.from_dict(first.engine_key), expected) if first.engine_key else []
    raise EngineMismatchError(
        f"{Path(model_dir) / first.path}: engine built for another target "
        f"({'; '.join(problems) or 'no engine key recorded'}); rebuild it on this machine with: "
        f"recon-export --model-dir {model_dir} --stage all"
    )


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
