"""The one generic export routine: an export contract and its source → checked, validated ONNX files (fp32, fp16).

    stage_contract(source, staging, precisions, validate, external_threshold)
      fp32 ONNX     torch.onnx.export(dynamo=False) for a torch module | the source's own graph builder
      fp16 ONNX     ORT float16 tool (fp16.py)                         | the same builder at fp16
      check         onnx.checker.check_model(path, full_check=True); TensorRT 10 operator table (trt_support.py)
      validate      ORT vs the torch/numpy reference (validate.py), on by default

Sources per model family: `stage1.py` (regressors, VDVAE decoder) and `stage2.py` (CLIP ridges, VAE, UNet).
`subject.py` exports a whole subject model folder with them and publishes the result in one step.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import InputError
from brainrecon.export.contracts import ExportContract
from brainrecon.export.trt_support import require_trt_support
from brainrecon.export.validate import Reference, validate_onnx
from brainrecon.model_dir import onnx_file

# A protobuf cannot exceed 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27


@dataclass
class ExportSource:
    """What one contract is exported from: a torch module (TorchScript exporter) or a graph builder."""

    contract: ExportContract
    reference: Reference
    module: Any = None  # torch.nn.Module for "torchscript"
    build: Callable[[Path, str, bool], None] | None = None  # (path, precision, external) for "onnx_helper"
    stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # realistic input statistics
    pools: dict[str, np.ndarray] | None = (
        None  # rows that "contexts" inputs are drawn from (contracts.INPUT_DRAWS)
    )
    weight_bytes: int = 0  # fp32 parameter bytes, for the external-data decision


@dataclass
class StagedFile:
    contract: ExportContract
    precision: str
    path: Path  # in the staging directory
    external_data: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    validation: dict[str, Any] | None = None


def torch_reference(module: Any, contract: ExportContract) -> Reference:
    """The torch module as a validation reference: inputs passed positionally in the contract's order, outputs
    (a tensor or a tuple) named as the contract's."""
    import torch

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(inputs[n]) for n in contract.input_names))
        outs = out if isinstance(out, tuple) else (out,)
        return {n: o.numpy() for n, o in zip(contract.output_names, outs, strict=True)}

    return run


# ----------------------------------------------------------------------------------------- writers


def set_ir_version(model: Any) -> None:
    # onnx.helper stamps the newest IR version, which an older ONNX Runtime refuses; opset 17 is IR 8.
    model.ir_version = 8


def save_onnx(model: Any, path: Path, external: bool) -> list[Path]:
    """Save a ModelProto, its weights in `<file>.data` beside it when `external`. Returns the data files."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        return [data] if data.exists() else []
    onnx.save_model(model, str(path))
    return []


def _initializer_bytes(model: Any) -> int:
    return sum(len(t.raw_data) if t.raw_data else t.ByteSize() for t in model.graph.initializer)


def export_torchscript(
    module: Any,
    contract: ExportContract,
    path: Path,
    external_threshold: int,
    pools: dict[str, np.ndarray] | None = None,
) -> list[Path]:
    """torch.onnx.export(dynamo=False) at the contract's opset with a dynamic batch; then re-save with our
    external-data policy. Above 2 GB the exporter writes one file per tensor beside its .onnx (hundreds for the
    UNet), so it writes into a scratch folder beside `path` that is removed once the model is re-saved: only
    `path` (and its `.data`) remain. Traced at batch 2 with different rows (the UNet: two different timesteps), so
    nothing per-row is folded into a constant."""
    import onnx
    import torch

    sample = {k: torch.from_numpy(v) for k, v in contract.sample_input(2, pools=pools).items()}
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".export", dir=path.parent) as scratch:
        raw = Path(scratch) / path.name
        # Without no_grad the trace runs with autograd on and keeps every activation for a backward pass that
        # never comes: the SD-size VAE decoder (335 MB of weights) peaked at 12.6 GB traced at 512 px, 2.6 GB without.
        with warnings.catch_warnings(), torch.no_grad():
            # the legacy-exporter deprecation notice and tracer warnings about the shape asserts in forward()
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(sample[n] for n in contract.input_names),
                str(raw),
                dynamo=False,
                opset_version=contract.opset,
                input_names=contract.input_names,
                output_names=contract.output_names,
                dynamic_axes=contract.dynamic_axes(),
                do_constant_folding=True,
            )
        model = onnx.load(str(raw))  # with the exporter's per-tensor files, if any, read into memory
    return save_onnx(model, path, _initializer_bytes(model) > external_threshold)


def export_fp16(
    contract: ExportContract,
    fp32_path: Path,
    path: Path,
    external: bool,
    check: Callable[[Path], dict[str, Any] | None] | None = None,
    feeds: list[dict[str, np.ndarray]] | None = None,
) -> tuple[list[Path], dict[str, Any]]:
    """fp32 ONNX → fp16 ONNX at `path` (ORT's float16 tool, fp16.py), checked by `check` (which raises ParityError
    on inf/NaN or errors beyond the contract's fp16 tolerance).

    With `feeds`, overflow is found first from the fp32 graph (`fp16.activation_peaks`, validation inputs): the nodes
    reading or writing values beyond fp16's range (with a margin) stay fp32. ONNX Runtime's CPU provider would not
    show that overflow itself (it computes many fp16 nodes in fp32), a GPU would. Then, on a ParityError, the
    conversion is retried with the contract's `FP16_FALLBACKS` kept fp32, mildest first; the last error is raised
    when none passes. Returns the data files and {"activation_peak": the largest |value| in the fp32 graph,
    "fp32_overflow_nodes": the nodes kept fp32 for range, "fp32_prefixes": the fallback kept fp32 ([] = none),
    "check": check's result, "fallbacks_tried": [{"fp32_prefixes", "error"}]}."""
    from brainrecon.export.fp16 import FP16_FALLBACKS, activation_peaks, convert_to_fp16, overflow_nodes
    from brainrecon.export.validate import ParityError

    range_nodes: list[str] = []
    range_info: dict[str, Any] = {"activation_peak": None}
    if feeds:
        peaks = activation_peaks(fp32_path, feeds)
        range_nodes = overflow_nodes(fp32_path, peaks)
        range_info = {"activation_peak": float(f"{max(peaks.values(), default=0.0):.4g}")}
    tried: list[dict[str, Any]] = []
    levels: tuple[tuple[str, ...], ...] = ((), *FP16_FALLBACKS.get(contract.name, ()))
    for n, prefixes in enumerate(levels):
        model = convert_to_fp16(
            fp32_path, fp32_inputs=contract.fp32_inputs, fp32_prefixes=prefixes, fp32_nodes=tuple(range_nodes)
        )
        data = save_onnx(model, path, external)
        del model
        try:
            report = check(path) if check is not None else None
        except ParityError as e:
            tried.append({"fp32_prefixes": list(prefixes), "error": str(e)})
            if n == len(levels) - 1:
                raise
            warnings.warn(f"{contract.name} fp16: {e}; retrying with more layers kept fp32", stacklevel=2)
            continue
        return data, {
            **range_info,
            "fp32_overflow_nodes": range_nodes,
            "fp32_prefixes": list(prefixes),
            "check": report,
            "fallbacks_tried": tried,
        }
    raise AssertionError("unreachable: the last level re-raises")  # pragma: no cover


# ----------------------------------------------------------------------------------------- staging


def check_onnx(path: Path) -> None:
    """Full ONNX checker (with shape inference); the path form reads external data and models over 2 GB."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(path, "a valid ONNX model (onnx.checker, full_check)", first) from None


def stage_contract(
    source: ExportSource,
    staging: Path,
    precisions: tuple[str, ...],
    validate: bool,
    external_threshold: int,
    on_step: Callable[[str, str], None] = lambda step, precision: None,
) -> list[StagedFile]:
    """Export, convert, check and validate one contract into `staging`; nothing is published here.
    `on_step(step, precision)` is called after each file is written ("export"; an fp16 conversion is checked and
    validated inside it) and after each check and validation ("validate"): benchmarks/real_size.py times the steps
    and measures their peak memory between the calls."""
    contract = source.contract
    fp32_path = staging / Path(onnx_file(contract.name, "fp32")).name  # staging: the onnx/ folder, staged
    t0 = time.perf_counter()
    if contract.exporter == "torchscript":
        fp32_data = export_torchscript(source.module, contract, fp32_path, external_threshold, source.pools)
    else:
        assert source.build is not None
        external = source.weight_bytes > external_threshold
        source.build(fp32_path, "fp32", external)
        fp32_data = [fp32_path.with_name(fp32_path.name + ".data")] if external else []
    fp32_seconds = time.perf_counter() - t0
    on_step("export", "fp32")
    staged = []
    for precision in precisions:
        t0 = time.perf_counter()
        if precision == "fp32":
            staged_file = StagedFile(contract, "fp32", fp32_path, fp32_data, fp32_seconds)
        else:
            path = staging / Path(onnx_file(contract.name, "fp16")).name
            external = source.weight_bytes // 2 > external_threshold
            if contract.exporter == "torchscript":
                # checked and validated inside, so that an overflowing conversion is retried with fp32 layers
                # The activation-range probe (export_fp16's `feeds`) is not run here: at real size ONNX Runtime held
                # every probed tensor at once (the imagenet64 VDVAE decoder's probe was OOM-killed at 20 GB), so
                # overflow is caught by parity (inf/NaN fail it) and handled by the fallbacks until the probe is
                # memory-bounded.
                feeds = None
                data, info = export_fp16(
                    contract,
                    fp32_path,
                    path,
                    external,
                    lambda p: _check_and_validate(source, p, "fp16", validate),
                    feeds,
                )
                staged_file = StagedFile(
                    contract, "fp16", path, data, time.perf_counter() - t0 + fp32_seconds
                )
                if validate:
                    staged_file.validation = {
                        **info["check"],
                        "fp16_activation_peak": info["activation_peak"],
                        "fp16_fp32_overflow_nodes": len(info["fp32_overflow_nodes"]),
                        "fp16_fp32_prefixes": info["fp32_prefixes"],
                    }
                staged.append(staged_file)
                on_step("export", "fp16")
                continue
            assert source.build is not None
            source.build(path, "fp16", external)
            data = [path.with_name(path.name + ".data")] if external else []
            staged_file = StagedFile(contract, "fp16", path, data, time.perf_counter() - t0 + fp32_seconds)
            on_step("export", "fp16")
        staged_file.validation = _check_and_validate(source, staged_file.path, precision, validate)
        on_step("validate", precision)
        staged.append(staged_file)
    return staged


def _check_and_validate(
    source: ExportSource, path: Path, precision: str, validate: bool
) -> dict[str, Any] | None:
    """ONNX checker, TensorRT operator table, and (when `validate`) parity against the source's reference."""
    check_onnx(path)
    require_trt_support(path)  # what TensorRT's ONNX parser would refuse fails here, by node
    if not validate:
        return None
    return validate_onnx(
        source.contract, path, source.reference, precision, stats=source.stats, pools=source.pools
    )
