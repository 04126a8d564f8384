"""What every backend shares: the `Backend` protocol (numpy in, numpy out) and `ModelIO`, one exported model's
I/O spec as the manifest records it. Each call is checked against it (names, shapes, dtype, and the batch against
the contract's shape profile), so ONNX Runtime refuses exactly what a TensorRT engine could not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from brainrecon.errors import InputError


class Backend(Protocol):
    """One exported model, runnable: numpy in, numpy out, each call checked against `io`."""

    io: ModelIO
    providers: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class ModelIO:
    """I/O spec of one exported model (the contract's `io_spec()`, as recorded in the manifest)."""

    model: str
    inputs: tuple[tuple[str, tuple[int | str, ...], str], ...]  # (name, shape with "batch", dtype)
    outputs: tuple[tuple[str, tuple[int | str, ...], str], ...]
    min_batch: int
    max_batch: int
    profile: dict[str, dict[str, list[int]]]

    @classmethod
    def from_spec(cls, model: str, spec: dict[str, Any]) -> ModelIO:
        def specs(items: list[dict[str, Any]]) -> tuple[tuple[str, tuple[int | str, ...], str], ...]:
            return tuple((s["name"], tuple(s["shape"]), s["dtype"]) for s in items)

        return cls(
            model=model,
            inputs=specs(spec["inputs"]),
            outputs=specs(spec["outputs"]),
            min_batch=int(spec["min_batch"]),
            max_batch=int(spec["max_batch"]),
            profile=spec["profile"],
        )

    @property
    def input_name(self) -> str:
        return self.inputs[0][0]

    @property
    def output_name(self) -> str:
        return self.outputs[0][0]

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Names, rank, fixed dims, dtype and the batch within [min_batch, max_batch]; one-line InputError."""
        names = [n for n, _, _ in self.inputs]
        if sorted(inputs) != sorted(names):
            raise InputError(f"{self.model} inputs", f"{names}", f"{sorted(inputs)}")
        for name, shape, dtype in self.inputs:
            x = inputs[name]
            fixed = tuple(d for d in shape if not isinstance(d, str))
            if (
                x.ndim != len(shape)
                or tuple(d for d, s in zip(x.shape, shape, strict=True) if not isinstance(s, str)) != fixed
            ):
                raise InputError(f"{self.model} input {name}", f"shape {list(shape)}", f"{list(x.shape)}")
            if x.dtype != np.dtype(dtype):
                raise InputError(f"{self.model} input {name}", f"dtype {dtype}", f"{x.dtype}")
            batch = x.shape[0]
            if not self.min_batch <= batch <= self.max_batch:
                raise InputError(
                    f"{self.model} input {name}",
                    f"a batch in [{self.min_batch}, {self.max_batch}] (the engine's shape profile)",
                    f"{batch}",
                )
