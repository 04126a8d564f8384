"""Validation of an exported ONNX file against its reference (torch, or numpy for the ridge), on by default.

Like huggingface/optimum's `validate_model_outputs`: run ONNX Runtime (CPU, all graph optimisations: what the
runtime runs) and the reference on the same seeded inputs at several batch sizes, compare every output with the
contract's per-precision tolerance, raise a typed error that reports the differences. Three more checks, because a
silently wrong graph is the failure that matters (GRU `linear_before_reset`, ONNX operator spec):
- both input distributions the contract names ("random" and "realistic" scale);
- the outputs must differ across different inputs: a graph that ignores its input would pass a lazy test on a
  model whose outputs barely move;
- structural checks on the graph itself (every GRU node has `linear_before_reset=1`, PyTorch's semantics).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import BrainReconError
from brainrecon.export.contracts import ExportContract

Reference = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class ParityError(BrainReconError):
    """ONNX Runtime output differs from the reference beyond the contract's tolerance."""

    def __init__(
        self,
        model: str,
        precision: str,
        batch: int,
        output: str,
        kind: str,
        stats: dict[str, float],
        tol: str,
    ):
        self.model, self.precision, self.batch, self.stats = model, precision, batch, stats
        super().__init__(
            f"{model} {precision} batch {batch} ({kind} inputs), output {output}: ONNX Runtime vs reference max abs "
            f"diff {stats['max_abs']:.3g} (kept {stats['max_abs_kept']:.3g}), median {stats['median_abs']:.3g}, "
            f"scale {stats['scale']:.3g}; tolerance: {tol}"
        )


class GraphCheckError(BrainReconError):
    """The exported graph has a known-wrong structure or ignores its inputs."""


def check_gru_linear_before_reset(model: Any, name: str) -> None:
    """PyTorch's GRU applies the reset gate after the recurrent linear map: ONNX `linear_before_reset=1`."""
    grus = [n for n in model.graph.node if n.op_type == "GRU"]
    if not grus:
        raise GraphCheckError(f"{name}: expected GRU nodes in the exported graph, found none")
    for node in grus:
        value = next((a.i for a in node.attribute if a.name == "linear_before_reset"), 0)
        if value != 1:
            raise GraphCheckError(
                f"{name}: GRU node {node.name!r} expected linear_before_reset=1 (PyTorch semantics), found {value}"
            )


STRUCTURAL_CHECKS: dict[str, Callable[[Any, str], None]] = {
    "gru_linear_before_reset": check_gru_linear_before_reset
}


def ort_session(onnx_path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: ORT's fp16 cast-insertion notices are expected
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def check_outputs_vary(contract: ExportContract, precision: str, outputs: dict[str, np.ndarray]) -> float:
    """Largest spread across the batch relative to the output scale; a constant graph raises GraphCheckError."""
    spread = 0.0
    for out in outputs.values():
        scale = float(np.abs(out).max()) or 1.0
        spread = max(spread, float(np.abs(out - out[:1]).max()) / scale)
    if spread <= 1e-6:
        raise GraphCheckError(
            f"{contract.name} {precision}: expected outputs that change with the input, found identical outputs for "
            f"{len(next(iter(outputs.values())))} different inputs (relative spread {spread:.1g}): a constant graph"
        )
    return spread


def validate_onnx(
    contract: ExportContract,
    onnx_path: str | Path,
    reference: Reference,
    precision: str,
    batches: tuple[int, ...] | None = None,
    stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    seed: int = 0,
    pools: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Compare ONNX Runtime with `reference` for every input kind and batch; raise ParityError or GraphCheckError.

    Returns a JSON-able report (worst max/median differences, batches, kinds, tolerance) for the manifest.
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    for check in contract.structural_checks:
        STRUCTURAL_CHECKS[check](graph, f"{onnx_path}")
    del graph
    session = ort_session(onnx_path)
    tol = contract.tolerance(precision)
    batches = batches or contract.validate_batches
    worst = {"max_abs": 0.0, "median_abs": 0.0, "max_abs_kept": 0.0}
    spreads: list[float] = []
    for k, kind in enumerate(contract.input_kinds):
        for b, batch in enumerate(batches):
            inputs = contract.sample_input(batch, kind, seed=seed + 1000 * k + b, stats=stats, pools=pools)
            expected = reference(inputs)
            found = dict(zip(contract.output_names, session.run(contract.output_names, inputs), strict=True))
            for name in contract.output_names:
                if found[name].shape != expected[name].shape:
                    raise ParityError(
                        contract.name, precision, batch, name, kind,
                        {"max_abs": np.inf, "max_abs_kept": np.inf, "median_abs": np.inf, "scale": 0.0},
                        f"shape {expected[name].shape}, found {found[name].shape}",
                    )  # fmt: skip
                ok, s = tol.check(expected[name], found[name])
                if not ok:
                    raise ParityError(contract.name, precision, batch, name, kind, s, tol.describe())
                for key in worst:
                    worst[key] = max(worst[key], s[key])
            if batch >= 2:
                spreads.append(check_outputs_vary(contract, precision, found))
    if not spreads:
        raise GraphCheckError(f"{contract.name}: expected a validation batch ≥ 2 to test input dependence")
    return {
        "reference": "torch" if contract.exporter == "torchscript" else "numpy",
        "provider": "CPUExecutionProvider",
        "batches": list(batches),
        "input_kinds": list(contract.input_kinds),
        "tolerance": tol.describe(),
        **{k: float(f"{v:.4g}") for k, v in worst.items()},
        "min_relative_spread": float(f"{min(spreads):.4g}"),
    }
