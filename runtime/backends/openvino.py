"""The OpenVINO backend (CPU): the same exported fp32 ONNX files, compiled by OpenVINO, numpy in and out. torch-free;
openvino is imported when a backend is created (`pip install "brainrecon[openvino]"`).

OpenVINO reads ONNX directly (`Core.read_model("x.onnx")`). The exported graphs have a dynamic batch axis; compiled
that way, OpenVINO's CPU plugin runs the demo UNet step 1.6-1.8× slower than compiled for one static batch
(measured here: 64 rows, f32 0.382 → 0.236 s, bf16 0.264 → 0.144 s), so the backend compiles the model once per
batch size it is called with (`Model.reshape`, OpenVINO docs "Changing Input Shapes") and keeps the last
`STATIC_COMPILES` of them; a pipeline calls each model at one or two batch sizes. The first call at a new batch
size pays the compilation. Its CPU plugin picks the inference precision itself: on CPUs with AMX or AVX-512 BF16 it runs in bf16 unless told otherwise
(`INFERENCE_PRECISION_HINT`, OpenVINO docs "Precision Control"), so both are set explicitly here:

    precision "fp32" → INFERENCE_PRECISION_HINT f32   (parity with ONNX Runtime fp32)
    precision "bf16" → INFERENCE_PRECISION_HINT bf16  (AMX bf16 matmuls/convolutions; 8-bit mantissa)

Each call is checked against the model's I/O spec from the manifest, as the ONNX Runtime backend does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from brainrecon.errors import BrainReconError, InputError
from brainrecon.runtime.backends.base import ModelIO

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
STATIC_COMPILES = 3  # compiled batch sizes kept per model (each holds its own repacked weights)


class OpenVinoError(BrainReconError):
    """OpenVINO is not installed, or cannot run here."""


def openvino_status() -> tuple[bool, str]:
    """(available, reason): whether `import openvino` works and it sees a CPU device."""
    try:
        import openvino as ov
    except ImportError as e:
        return False, f"openvino is not installed ({e}); install it with: pip install 'brainrecon[openvino]'"
    devices = ov.Core().available_devices
    if "CPU" not in devices:
        return False, f"OpenVINO sees no CPU device (devices: {devices})"
    return True, f"openvino {ov.__version__}"


class OpenVinoBackend:
    """One compiled model with one infer request (calls are serialised by a lock: a request is not re-entrant)."""

    def __init__(
        self,
        onnx_path: str | Path,
        io: ModelIO | None = None,
        precision: str = "fp32",
        threads: int | None = None,
    ):
        if precision not in PRECISION_HINTS:
            raise InputError("OpenVINO precision", f"one of {tuple(PRECISION_HINTS)}", repr(precision))
        ok, reason = openvino_status()
        if not ok:
            raise OpenVinoError(reason)
        import openvino as ov

        self.path = Path(onnx_path)
        self.io = io
        self.precision = precision
        config: dict[str, str | int] = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",  # one stream: every thread on each call, as one ORT session
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._core, self._config = ov.Core(), config
        self._model = self._core.read_model(str(self.path))
        self._static: OrderedDict[int, tuple[object, object]] = OrderedDict()  # batch → (compiled, request)
        self.compiled, self.request = self._compile(1)  # a broken file fails here, at load
        # a tensor may carry several names in OpenVINO (an output that is also an intermediate): take the ONNX
        # output names, which every output port has among its names
        self.outputs = list(self.compiled.outputs)
        self.output_names = [
            next(
                (n for n in port.get_names() if io is None or n in {o[0] for o in io.outputs}),
                port.get_any_name(),
            )
            for port in self.outputs
        ]
        self.providers: list[str] = [f"OpenVINO CPU {PRECISION_HINTS[precision]}"]
        self._lock = threading.Lock()

    def _compile(self, batch: int) -> tuple[object, object]:
        """The model compiled for `batch` rows (cached, least recently used dropped beyond STATIC_COMPILES)."""
        if batch in self._static:
            self._static.move_to_end(batch)
            return self._static[batch]
        import openvino as ov

        model = self._model.clone()
        model.reshape(
            {
                port.get_any_name(): ov.PartialShape([batch, *list(port.get_partial_shape())[1:]])
                for port in model.inputs
            }
        )
        compiled = self._core.compile_model(model, "CPU", self._config)
        self._static[batch] = (compiled, compiled.create_infer_request())
        while len(self._static) > STATIC_COMPILES:
            self._static.popitem(last=False)
        return self._static[batch]

    def close(self) -> None:
        """Drop the compiled models; later runs fail clearly."""
        self.request = None
        self.compiled = None
        self._static.clear()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.request is None:
            raise OpenVinoError(f"{self.path}: the compiled model was closed (Reconstructor.close)")
        if self.io is not None:
            self.io.check(inputs)
        batch = len(next(iter(inputs.values())))
        with self._lock:
            compiled, request = self._compile(batch)
            results = request.infer(inputs)  # copies the outputs out (share_outputs=False)
            return {
                name: np.asarray(results[port])
                for name, port in zip(self.output_names, compiled.outputs, strict=True)
            }
