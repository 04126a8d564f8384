"""Triton Python-backend model: one exported ONNX file run by ONNX Runtime on the CPU.

Written by `recon-export --format triton --variant cpu` as `<model>/1/model.py` beside `<model>/1/model.onnx`, in
place of the `onnxruntime_onnx` platform of the GPU variant, for a server that has only the Python backend (the
tritonserver bundled with PyTriton). The interface is the python_backend README's (`TritonPythonModel` with
`initialize` / `execute`; triton-inference-server/python_backend). Needs numpy and onnxruntime in the server's
Python environment.

The dynamic batcher hands `execute` several requests: their rows are concatenated into one session call and the
outputs split back per request. An input configured as `dims: [1]` + `reshape: { shape: [] }` (a per-row scalar)
arrives as (b,) or (b, 1) and is given to the graph at the graph's rank.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a functional stand-in for the GPU platform: one core per instance
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        try:
            feeds = {name: [] for name in self.ranks}
            sizes = []
            for request in requests:
                for name, rank in self.ranks.items():
                    x = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                    if x.ndim != rank:  # (b, 1) per-row scalars → (b,)
                        x = x.reshape(x.shape[0], *x.shape[2:]) if rank < x.ndim else x
                    feeds[name].append(x)
                sizes.append(len(feeds[next(iter(self.ranks))][-1]))
            batch = {name: np.concatenate(parts) for name, parts in feeds.items()}
            results = self.session.run(self.outputs, batch)
        except Exception as e:  # one error response per request; the server keeps serving
            error = pb_utils.TritonError(f"{type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(values[start : start + size]))
                for name, values in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
