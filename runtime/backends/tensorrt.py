"""TensorRT engines at run time: what an engine was built for (`EngineKey`, checked against this machine before any
bytes are deserialised) and the native engine backend (TensorRT 10/11 name-based tensor API, `execute_async_v3`).
Engines are built by `brainrecon.export.tensorrt`.

An engine runs only on the TensorRT version and GPU (compute capability) it was built with, and it is only valid
for the exact ONNX bytes (the .onnx and its external-data weight files), precision, shape profile and builder
settings it was built from (TensorRT developer guide, "Engine compatibility"). The key holds all of them; the
manifest records it beside the engine file. A recorded key of another layout (fields added or removed by another
version of this code) is no key: the engine is rebuilt, never loaded.

tensorrt and the CUDA runtime bindings (cuda-python: `cuda.bindings.runtime`, or `cuda.cudart` before 12.6) are
imported lazily, so this module imports anywhere. One execution context, CUDA stream and set of device buffers
per thread (an `IExecutionContext` must not be shared between threads running concurrently); buffers are sized
for the profile's max batch once per thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import threading
import weakref
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


WORKSPACE_BYTES = 4 << 30
OPTIMIZATION_LEVEL = 3  # TensorRT's default builder optimisation level


@dataclass(frozen=True)
class BuildRecipe:
    """Every builder setting that can change an engine's kernels; `brainrecon.export.tensorrt.build_engine` applies
    exactly these, so two engines with equal recipes (and equal sources and targets) are interchangeable."""

    workspace_bytes: int  # IBuilderConfig.set_memory_pool_limit(WORKSPACE): bounds the tactics tried
    tf32: bool  # BuilderFlag.TF32 (on by default in TensorRT): fp32 matmuls on 10-bit mantissas
    optimization_level: int  # IBuilderConfig.builder_optimization_level (TensorRT's default is 3)
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED: precision from the ONNX graph
    flags: tuple[str, ...] = ()  # any other BuilderFlag names set, sorted

    @classmethod
    def for_precision(cls, precision: str) -> BuildRecipe:
        """The recipe this code builds with: TF32 off for the fp32 engine (the faithful one), on otherwise."""
        return cls(
            workspace_bytes=WORKSPACE_BYTES,
            tf32=precision != "fp32",
            optimization_level=OPTIMIZATION_LEVEL,
            strongly_typed=True,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flags": sorted(self.flags)}


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built from (every byte of the ONNX and its external weights, the precision, the shape
    profile and the builder recipe) and for (TensorRT version, GPU name, compute capability)."""

    onnx_sha256: str
    external_data_sha256: tuple[str, ...]  # the ONNX file's external-data files, in the manifest's order
    precision: str
    profile: tuple[ProfileEntry, ...]
    recipe: BuildRecipe
    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    @classmethod
    def for_machine(
        cls,
        onnx_sha256: str,
        precision: str,
        profile: dict[str, Any],
        machine: MachineInfo,
        external_data_sha256: tuple[str, ...] | list[str] = (),
        recipe: BuildRecipe | None = None,
    ) -> EngineKey:
        return cls(
            onnx_sha256=onnx_sha256,
            external_data_sha256=tuple(external_data_sha256),
            precision=precision,
            profile=profile_tuple(profile),
            recipe=recipe or BuildRecipe.for_precision(precision),
            tensorrt_version=machine.tensorrt_version,
            gpu_name=machine.gpu_name,
            compute_capability=machine.compute_capability,
        )

    @property
    def machine(self) -> MachineInfo:
        return MachineInfo(self.tensorrt_version, self.gpu_name, self.compute_capability)

    def same_build(self, other: EngineKey) -> bool:
        """Built from the same bytes with the same recipe and profile (for any target)."""
        return all(
            getattr(self, f) == getattr(other, f)
            for f in ("onnx_sha256", "external_data_sha256", "precision", "profile", "recipe")
        )

    def digest(self) -> str:
        """sha256 of the canonical JSON; engine file names carry its first 12 characters."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx_sha256": self.onnx_sha256,
            "external_data_sha256": list(self.external_data_sha256),
            "precision": self.precision,
            "profile": [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in self.profile],
            "recipe": self.recipe.to_dict(),
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
        }

    @classmethod
    def from_dict(cls, data: Any) -> EngineKey | None:
        """The key a manifest recorded; None when it is not a key of this layout (other or missing fields, of its
        own or of its recipe, or malformed values: written by another version). Such an engine matches no
        expected key: it is rebuilt at export and never loaded, and adding a field later breaks no old folder."""
        names = {f.name for f in dataclasses.fields(cls)}
        recipe_names = {f.name for f in dataclasses.fields(BuildRecipe)}
        if not isinstance(data, dict) or set(data) != names:
            return None
        recipe = data["recipe"]
        if not isinstance(recipe, dict) or set(recipe) != recipe_names:
            return None
        try:
            key = cls(
                onnx_sha256=str(data["onnx_sha256"]),
                external_data_sha256=tuple(str(h) for h in data["external_data_sha256"]),
                precision=str(data["precision"]),
                profile=tuple(
                    (str(n), tuple(int(v) for v in lo), tuple(int(v) for v in opt), tuple(int(v) for v in hi))
                    for n, lo, opt, hi in data["profile"]
                ),
                recipe=BuildRecipe(
                    workspace_bytes=int(recipe["workspace_bytes"]),
                    tf32=bool(recipe["tf32"]),
                    optimization_level=int(recipe["optimization_level"]),
                    strongly_typed=bool(recipe["strongly_typed"]),
                    flags=tuple(str(f) for f in recipe["flags"]),
                ),
                tensorrt_version=str(data["tensorrt_version"]),
                gpu_name=str(data["gpu_name"]),
                compute_capability=str(data["compute_capability"]),
            )
        except (TypeError, ValueError, KeyError):
            return None
        return key if key.to_dict() == data else None  # types too: a string where a list was is no key


def expected_key(manifest: Any, onnx: Any, precision: str, machine: MachineInfo) -> EngineKey:
    """The key of an engine built here from the manifest's ONNX entry `onnx` (with `.sha256`, `.io`,
    `.external_data`) and the current recipe; its external-data hashes come from their manifest entries."""
    hashes = []
    for rel in onnx.external_data:
        entry = manifest.get(rel)
        if entry is None:
            raise EngineMismatchError(
                f"manifest: expected an entry for {rel} (external data of {onnx.path}), found none; "
                "re-export with recon-export"
            )
        hashes.append(entry.sha256)
    return EngineKey.for_machine(onnx.sha256, precision, onnx.io["profile"], machine, hashes)


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
        "external_data_sha256": ("ONNX external data", "manifest ONNX"),
        "precision": ("precision", "requested"),
        "profile": ("shape profile", "contract"),
        "recipe": ("build recipe", "current"),
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
            elif f == "external_data_sha256":
                a, b = [h[:12] + "…" for h in a], [h[:12] + "…" for h in b]
            elif f == "recipe":
                if (a, b) == tuple(BuildRecipe.for_precision(k.precision) for k in (recorded, expected)):
                    continue  # each the default of its precision: the precision line says it all
                a, b = a.to_dict(), b.to_dict()
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
    """Among manifest engine entries (objects with `.path` and `.engine_key`), the one whose key equals `expected`
    (built from the current ONNX bytes and recipe, for this GPU and TensorRT), never the first by path. None
    matching raises a one-line mismatch naming the closest entry (the fewest differing fields) and what differs;
    a key of another layout (`EngineKey.from_dict` None) matches nothing."""
    if not candidates:
        raise EngineMismatchError(
            f"{model_dir}: no TensorRT engine recorded; build one with: recon-export --model-dir {model_dir} --stage all"
        )
    parsed = [(candidate, EngineKey.from_dict(candidate.engine_key)) for candidate in candidates]
    for candidate, key in parsed:
        if key == expected:
            return candidate

    def distance(item: tuple[Any, EngineKey | None]) -> int:
        return len(key_mismatches(item[1], expected)) if item[1] is not None else 99

    closest, key = min(parsed, key=distance)
    problems = key_mismatches(key, expected) if key is not None else []
    raise EngineMismatchError(
        f"{Path(model_dir) / closest.path}: engine built for another target "
        f"({'; '.join(problems) or 'no engine key of this version recorded'}; {len(candidates)} engine(s) "
        f"recorded, none matches); rebuild it on this machine with: recon-export --model-dir {model_dir} --stage all"
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


def cuda_majors(version: Any = importlib.metadata.version) -> tuple[str | None, str | None]:
    """(CUDA major of the installed TensorRT wheel, from its name tensorrt-cuNN; cuda-python's major)."""
    found: list[str | None] = [None, None]
    for major in ("11", "12", "13", "14"):
        for dist in (f"tensorrt-cu{major}", f"tensorrt-cu{major}-bindings"):
            try:
                version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
            found[0] = major
    for dist in ("cuda-python", "cuda-bindings"):
        try:
            found[1] = str(version(dist)).split(".")[0]
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return found[0], found[1]


def tensorrt_status() -> tuple[bool, str]:
    """(True, machine description) when engines can be built and run here, else (False, the reason)."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "TensorRT is not installed (pip install brainrecon[trt])"
    trt_major, cuda_major = cuda_majors()
    if trt_major and cuda_major and trt_major != cuda_major:
        return False, (
            f"cuda-python: expected CUDA major {trt_major} (that of tensorrt-cu{trt_major}), found {cuda_major} "
            f'(pip install "cuda-python>={trt_major},<{int(trt_major) + 1}")'
        )
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
    """Run a serialized TensorRT engine the manifest vouches for (hash verified by the caller, key checked here).

    Device buffers and streams are freed by `close()`, or by a finaliser when the backend is garbage-collected."""

    def __init__(
        self,
        engine_path: str | Path,
        io: ModelIO,
        recorded_key: dict[str, Any],
        expected: EngineKey,
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
        if recorded is None:
            raise EngineMismatchError(
                f"{self.path}: expected an engine key of this version, found fields {sorted(recorded_key or {})}; "
                f"rebuild it with: recon-export --model-dir {model_dir} --stage all"
            )
        check_engine_key(recorded, expected, self.path, model_dir)
        self._states: list[_ThreadState] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        # frees what _state() allocated, once: at close() or when the backend is collected
        self._release = weakref.finalize(self, _release_states, self._states, self._lock)
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

    def _state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            rt = cudart()
            context = self.engine.create_execution_context()
            if context is None:  # IExecutionContext creation fails (None) when its memory cannot be allocated
                raise TrtError(
                    f"{self.path}: expected an execution context, found none (TensorRT could not create one: "
                    "out of GPU memory?)"
                )
            state = _ThreadState(context, _call(rt.cudaStreamCreate()), {})
            with self._lock:
                self._states.append(state)  # registered first: a failed cudaMalloc below is freed by close()
            for name in self.names:
                shape = self.engine.get_tensor_shape(name)
                dims = [self.io.max_batch if d < 0 else d for d in shape]
                nbytes = (
                    int(np.prod(dims))
                    * np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name))).itemsize
                )
                state.buffers[name] = (_call(rt.cudaMalloc(nbytes)), nbytes)
            self._local.state = state
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
        """Free every thread's device buffers, streams and execution contexts. Idempotent."""
        self._release()
        self._local = threading.local()


def _release_states(states: list[_ThreadState], lock: threading.Lock) -> None:
    rt = cudart()
    with lock:
        for state in states:
            for ptr, _ in state.buffers.values():
                rt.cudaFree(ptr)
            rt.cudaStreamDestroy(state.stream)
            state.context = None  # the context's own device memory goes with its last reference
        states.clear()
