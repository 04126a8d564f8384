"""The OpenVINO backend (CPU): the same exported fp32 ONNX files, compiled by OpenVINO, numpy in and out. torch-free;
openvino is imported when a backend is created (`pip install "brainrecon[openvino]"`).

OpenVINO reads ONNX directly (`Core.compile_model("x.onnx", "CPU")`) and keeps the dynamic batch. Compiling per
static batch size instead (`Model.reshape`) ran the demo UNet step 1.4-1.8× faster, but OpenVINO 2026.4.1's CPU
plugin then returned drifting results on repeated calls of the same compiled model (the demo VDVAE decoder, same
input: max error 3e-5, then 15, then 22 against ONNX Runtime), so the dynamic batch stays
(`tests/test_openvino.py` checks that repeated calls agree). Its CPU plugin
picks the inference precision itself: on CPUs with AMX or AVX-512 BF16 it runs in bf16 unless told otherwise
(`INFERENCE_PRECISION_HINT`, OpenVINO docs "Precision Control"), so both are set explicitly here:

    precision "fp32" → INFERENCE_PRECISION_HINT f32   (parity with ONNX Runtime fp32)
    precision "bf16" → INFERENCE_PRECISION_HINT bf16  (AMX bf16 matmuls/convolutions; 8-bit mantissa)

Each call is checked against the model's I/O spec from the manifest, as the ONNX Runtime backend does. The path
may also be an OpenVINO IR (`.xml` beside its `.bin`), e.g. the INT8 UNet written by `recon-eval int8`
(train/experiments/int8.py, NNCF post-training quantization); a model folder's manifest lists only ONNX files.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from brainrecon.errors import BrainReconError, InputError
from brainrecon.runtime.backends.base import ModelIO

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


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
        if self.path.suffix not in (".onnx", ".xml"):
            raise InputError(
                self.path, "an ONNX file (.onnx) or an OpenVINO IR (.xml)", repr(self.path.suffix)
            )
        if self.path.suffix == ".xml" and not self.path.with_suffix(".bin").is_file():
            raise InputError(self.path, f"its weights {self.path.with_suffix('.bin').name} beside it", "none")
        try:
            self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        except RuntimeError as exc:  # many lines, "Exception from <source file>" before the one that says why
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            why = next((ln for ln in lines if not ln.startswith("Exception from")), type(exc).__name__)
            raise OpenVinoError(f"{self.path}: OpenVINO could not read or compile it: {why}") from None
        self.request = self.compiled.create_infer_request()
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

    def close(self) -> None:
        """Drop the compiled model; later runs fail clearly."""
        self.request = None
        self.compiled = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.request is None:
            raise OpenVinoError(f"{self.path}: the compiled model was closed (Reconstructor.close)")
        if self.io is not None:
            self.io.check(inputs)
        with self._lock:
            results = self.request.infer(inputs)  # copies the outputs out (share_outputs=False)
            return {
                name: np.asarray(results[port])
                for name, port in zip(self.output_names, self.outputs, strict=True)
            }
