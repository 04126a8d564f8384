"""One generic export routine for every contract: model directory → validated ONNX files (+ engines) + manifest.

    export_model_dir(model_dir, stage="all", precision="both")
      for each contract of the stage (contracts.py; stage-2 sources in stage2.py):
        fp32 ONNX     torch.onnx.export(dynamo=False) | build_ridge_onnx, build_clip_ridge_onnx        → staging dir
        fp16 ONNX     ORT float16 tool (fp16.py)      | the same builders at fp16                      → staging dir
        check         onnx.checker.check_model(path, full_check=True)
        validate      ORT vs torch/numpy (validate.py), on by default
      publish         os.replace staging → model_dir/onnx/<name>.<precision>.onnx (+ .data): all or nothing
      scheduler       stage 2 only: model_dir/stage2/scheduler.json (diffusers' DDIM tables, stage2.py)
      engines         TensorRT when present (tensorrt.py), else skipped with the reason
      manifest        model_dir/manifest.json (brainrecon/manifest.py), written last

Stages: "stage1" = the stage-1 regressor + vdvae_decoder; "gru", "ridge", "vdvae" = one of them; "stage2" = clip_text,
clip_vision, vae_encoder, vae_decoder, unet (needs model_dir/stage2/ from recon-train subject --stage clip);
"all" = stage 1, plus stage 2 when model_dir/stage2/stage2.json exists.

Nothing reaches `model_dir/onnx/` before every requested file has been exported, checked and validated: a killed
or failed export leaves the previous files (or none) in place and removes its staging directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import ConfigError, InputError, MissingFileError
from brainrecon.export.contracts import (
    PRECISIONS,
    ExportContract,
    gru_contract,
    ridge_contract,
    vdvae_decoder_contract,
)
from brainrecon.export.validate import Reference, validate_onnx
from brainrecon.io import read_json
from brainrecon.manifest import Artifact, describe_file, write_manifest

STAGES = ("stage1", "gru", "ridge", "vdvae", "stage2", "all")
STAGE2_MODELS = ("clip_text", "clip_vision", "vae_encoder", "vae_decoder", "unet")  # sources in stage2.py
PRECISION_CHOICES = ("fp32", "fp16", "both")
ONNX_DIR = "onnx"
# A protobuf cannot exceed 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
# Files the runtime reads beside the ONNX models; hashed into the manifest like them.
RUNTIME_DATA_FILES = (
    "preprocess.json",
    "voxel_mean.npy",
    "voxel_std.npy",
    "mask_indices.npy",
    "stage1/stage1.json",
    "stage1/latent_mean.npy",
    "stage1/latent_std.npy",
)
# ... and stage 2's, when a stage-2 model is exported (scheduler.json is written by the export itself).
STAGE2_DATA_FILES = (
    "stage2/stage2.json",
    "stage2/clip_text_target_mean.npy",
    "stage2/clip_text_target_std.npy",
    "stage2/clip_vision_target_mean.npy",
    "stage2/clip_vision_target_std.npy",
    "stage2/uncond_text.npy",
    "stage2/uncond_vision.npy",
)
STAGE2_SUMMARY = "stage2/stage2.json"
_EXTERNAL_ALIGN = 4096


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


# ----------------------------------------------------------------------------------------- sources


def stage1_summary(model_dir: Path) -> dict[str, Any]:
    return read_json(model_dir / "stage1" / "stage1.json", "stage-1 summary (run recon-train subject first)")


def contract_names(model_dir: Path, stage: str) -> list[str]:
    """Contracts exported for `stage` given what the model directory holds."""
    if stage not in STAGES:
        raise ConfigError(f"export stage: expected one of {STAGES}, found {stage!r}")
    has_stage2 = (model_dir / STAGE2_SUMMARY).is_file()
    if stage == "stage2":
        if not has_stage2:
            raise MissingFileError(
                model_dir / STAGE2_SUMMARY, "stage-2 summary", "run recon-train subject --stage clip first"
            )
        return list(STAGE2_MODELS)
    regressor = stage1_summary(model_dir)["config"]["regressor"]
    if stage in ("gru", "ridge") and stage != regressor:
        raise InputError(
            model_dir / "stage1" / "stage1.json",
            f"a {stage} stage-1 regressor (recon-train subject --regressor {stage})",
            f"a {regressor} regressor (export --stage {regressor} or stage1)",
        )
    if stage in ("gru", "ridge"):
        return [stage]
    if stage == "vdvae":
        return ["vdvae_decoder"]
    stage1 = [regressor, "vdvae_decoder"]
    return stage1 + list(STAGE2_MODELS) if stage == "all" and has_stage2 else stage1


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


def load_sources(model_dir: Path, names: list[str]) -> list[ExportSource]:
    """Build each contract's source from the torch references: stage 1 from `Stage1Model.load` (checks the VDVAE
    hash), stage 2 from `Stage2Model.load` (checks the VAE and UNet hashes), each loaded only when needed."""
    stage2 = [n for n in names if n in STAGE2_MODELS]
    stage1 = [n for n in names if n not in STAGE2_MODELS]
    sources: list[ExportSource] = []
    model1 = None
    if stage2:
        from brainrecon.export.stage2 import stage2_sources
        from brainrecon.train.stage2.fit import Stage2Model

        model2 = Stage2Model.load(model_dir)
        model1 = model2.stage1
        sources += stage2_sources(model2, stage2)
    if stage1:
        sources = load_stage1_sources(model_dir, stage1, model1) + sources
    return sources


def load_stage1_sources(model_dir: Path, names: list[str], model: Any = None) -> list[ExportSource]:
    """Stage-1 sources from `model` (a Stage1Model) or `Stage1Model.load(model_dir)`."""
    from brainrecon.train.foundations.vdvae import VDVAEDecoder
    from brainrecon.train.stage1.fit import Stage1Model
    from brainrecon.train.stage1.ridge import RidgeRegressor

    model = model if model is not None else Stage1Model.load(model_dir)
    latent_dims = int(model.latent_mean.shape[0])
    sources = []
    for name in names:
        if name == "gru":
            contract = gru_contract(model.n_voxels, latent_dims)
            module = model.regressor.eval()
            sources.append(
                ExportSource(
                    contract,
                    torch_reference(module, contract),
                    module=module,
                    weight_bytes=sum(p.numel() * 4 for p in module.parameters()),
                )
            )
        elif name == "ridge":
            reg: RidgeRegressor = model.regressor
            contract = ridge_contract(model.n_voxels, latent_dims)

            def build(
                path: Path,
                precision: str,
                external: bool,
                reg: RidgeRegressor = reg,
                opset: int = contract.opset,
            ) -> None:
                build_ridge_onnx(reg.coef, reg.intercept, path, precision, opset, external)

            sources.append(
                ExportSource(
                    contract,
                    lambda inputs, reg=reg: {"vdvae_latents": reg.predict(inputs["betas"])},
                    build=build,
                    weight_bytes=int(reg.coef.nbytes + reg.intercept.nbytes),
                )
            )
        elif name == "vdvae_decoder":
            decoder = VDVAEDecoder(model.vdvae, model.num_layers).eval()
            contract = vdvae_decoder_contract(decoder.latent_dims, model.vdvae.config.image_size)
            stats = {"vdvae_latents": (model.latent_mean, model.latent_std)}
            sources.append(
                ExportSource(
                    contract,
                    torch_reference(decoder, contract),
                    module=decoder,
                    stats=stats,
                    weight_bytes=sum(p.numel() * 4 for p in decoder.parameters()),
                )
            )
        else:  # pragma: no cover - contract_names only yields the names above
            raise ConfigError(f"no export source for {name!r}")
    return sources


# ----------------------------------------------------------------------------------------- writers


def _set_ir_version(model: Any) -> None:
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
    external-data policy (the exporter itself writes one file per tensor for models over 2 GB). Traced at batch 2
    with different rows (the UNet: two different timesteps), so nothing per-row is folded into a constant."""
    import onnx
    import torch

    sample = {k: torch.from_numpy(v) for k, v in contract.sample_input(2, pools=pools).items()}
    with warnings.catch_warnings():
        # the legacy-exporter deprecation notice and tracer warnings about the shape asserts in forward()
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(sample[n] for n in contract.input_names),
            str(path),
            dynamo=False,
            opset_version=contract.opset,
            input_names=contract.input_names,
            output_names=contract.output_names,
            dynamic_axes=contract.dynamic_axes(),
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    return save_onnx(model, path, _initializer_bytes(model) > external_threshold)


def build_ridge_onnx(
    coef: np.ndarray,
    intercept: np.ndarray,
    path: Path,
    precision: str,
    opset: int = 17,
    external: bool = False,
    chunk_rows: int = 2048,
) -> list[Path]:
    """betas (B, V) → MatMul(coef (V, D)) → Add(intercept (D,)) → vdvae_latents (B, D), written to `path`.

    fp16: betas → Cast(fp16) → MatMul(coef / scale in fp16) → Cast(fp32) → Mul(scale) → Add(intercept), with
    `scale` (D,) the power of two at or above each column's max |coef| (exact to apply and undo). Why not ORT's
    float16 tool here: with alpha 5e4 ridge weights are small (max ~1e-6 on the tiny test model), in or below
    fp16's subnormal range (< 6e-5), where rounding destroys them; per-column scaling puts them in [-1, 1]. The
    intercept stays fp32 and is added last: a prediction is the intercept plus a small trial-dependent part, and
    the transductive re-normalisation divides by that part's spread, so fp16 rounding of the sum would be
    amplified many-fold. With `external`, coef is streamed into `<file>.data` in row chunks (scaled and cast on
    the way), so a 5.7 GB matrix never exists twice and no protobuf holds it. Returns the data files.
    """
    from onnx import TensorProto, helper, numpy_helper

    if precision not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {PRECISIONS}, found {precision!r}")
    v, d = coef.shape
    fp16 = precision == "fp16"
    dtype, onnx_type = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    scale = np.ones(d, dtype=np.float32)  # (D,)
    initializers = [numpy_helper.from_array(np.asarray(intercept, dtype=np.float32), "intercept")]
    if fp16:
        col_max = np.zeros(d, dtype=np.float32)
        for start in range(0, v, chunk_rows):
            col_max = np.maximum(col_max, np.abs(coef[start : start + chunk_rows]).max(axis=0))
        scale = np.exp2(np.ceil(np.log2(np.where(col_max > 0, col_max, 1.0)))).astype(np.float32)
        initializers.append(numpy_helper.from_array(scale, "coef_scale"))
        nodes = [
            helper.make_node("Cast", ["betas"], ["betas_fp16"], to=TensorProto.FLOAT16, name="cast_in"),
            helper.make_node("MatMul", ["betas_fp16", "coef"], ["matmul_fp16"], name="matmul"),  # (B, D)
            helper.make_node(
                "Cast", ["matmul_fp16"], ["matmul_scaled"], to=TensorProto.FLOAT, name="cast_out"
            ),
            helper.make_node("Mul", ["matmul_scaled", "coef_scale"], ["matmul_out"], name="unscale"),
        ]
    else:
        nodes = [helper.make_node("MatMul", ["betas", "coef"], ["matmul_out"], name="matmul")]  # (B, D)
    nodes.append(
        helper.make_node("Add", ["matmul_out", "intercept"], ["vdvae_latents"], name="add_intercept")
    )

    def rows(start: int) -> np.ndarray:
        return np.ascontiguousarray(coef[start : start + chunk_rows] / scale, dtype=dtype)

    data_files: list[Path] = []
    if external:
        data = path.with_name(path.name + ".data")
        with open(data, "wb") as f:
            for start in range(0, v, chunk_rows):
                f.write(rows(start).tobytes())
        coef_tensor = TensorProto(name="coef", data_type=onnx_type, dims=[v, d])
        coef_tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", data.name),
            ("offset", "0"),
            ("length", str(v * d * np.dtype(dtype).itemsize)),
        ):
            entry = coef_tensor.external_data.add()
            entry.key, entry.value = key, value
        data_files.append(data)
    else:
        coef_tensor = numpy_helper.from_array(
            np.concatenate([rows(s) for s in range(0, v, chunk_rows)]), "coef"
        )
    initializers.insert(0, coef_tensor)
    graph = helper.make_graph(
        nodes,
        f"ridge_{precision}",
        [helper.make_tensor_value_info("betas", TensorProto.FLOAT, ["batch", v])],
        [helper.make_tensor_value_info("vdvae_latents", TensorProto.FLOAT, ["batch", d])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="brainrecon"
    )
    _set_ir_version(model)
    path.write_bytes(model.SerializeToString())  # external tensors only carry their location here
    return data_files


def pow2_column_scale(matrix: np.ndarray) -> np.ndarray:
    """(C,) float32: per column, the power of two at or above its max |value| (1 for an all-zero column)."""
    col_max = np.abs(matrix).max(axis=0)
    return np.exp2(np.ceil(np.log2(np.where(col_max > 0, col_max, 1.0)))).astype(np.float32)


def build_clip_ridge_onnx(
    A: np.ndarray,
    B: np.ndarray,
    intercept: np.ndarray,
    n_tokens: int,
    dim: int,
    output_name: str,
    path: Path,
    precision: str,
    opset: int = 17,
    external: bool = False,
) -> list[Path]:
    """Reduced-rank CLIP ridge (train/stage2/clip_ridge.py): betas (B, V) → MatMul A (V, r) → MatMul B (r, T·D) →
    Add intercept (T·D,) → Reshape (B, T, D), written to `path`. A·B is never formed (V × T·D weights).

    fp16: betas → Cast → MatMul(A / a) → MatMul(diag(a) B / b) → Cast(fp32) → Mul(b) → Add(intercept) → Reshape,
    with `a` (r,) and `b` (T·D,) the power-of-two column scales (exact to apply and undo) that bring both fp16
    factors into [-1, 1]: ridge weights at alpha 1e5 sit near fp16's subnormal range, as in `build_ridge_onnx`,
    whose reasons for the fp32 intercept (re-normalisation amplifies rounding of the sum) hold here too.
    """
    from onnx import TensorProto, helper, numpy_helper

    if precision not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {PRECISIONS}, found {precision!r}")
    v, r = A.shape
    if B.shape != (r, n_tokens * dim) or intercept.shape != (n_tokens * dim,):
        raise InputError(
            path.name,
            f"factors A (V, r), B (r, {n_tokens * dim}), intercept ({n_tokens * dim},)",
            f"A {A.shape}, B {B.shape}, intercept {intercept.shape}",
        )
    initializers = [
        numpy_helper.from_array(np.asarray(intercept, np.float32), "intercept"),
        numpy_helper.from_array(np.array([-1, n_tokens, dim], np.int64), "token_shape"),
    ]
    if precision == "fp16":
        a_scale = pow2_column_scale(A)  # (r,)
        b_scaled = B.astype(np.float64) * a_scale[:, None].astype(np.float64)  # (r, T·D) = diag(a) B
        b_scale = pow2_column_scale(b_scaled)  # (T·D,)
        initializers += [
            numpy_helper.from_array((A / a_scale).astype(np.float16), "A"),
            numpy_helper.from_array((b_scaled / b_scale).astype(np.float16), "B"),
            numpy_helper.from_array(b_scale, "B_scale"),
        ]
        nodes = [
            helper.make_node("Cast", ["betas"], ["betas_fp16"], to=TensorProto.FLOAT16, name="cast_in"),
            helper.make_node("MatMul", ["betas_fp16", "A"], ["low_rank"], name="matmul_A"),  # (B, r)
            helper.make_node("MatMul", ["low_rank", "B"], ["flat_fp16"], name="matmul_B"),  # (B, T·D)
            helper.make_node("Cast", ["flat_fp16"], ["flat_scaled"], to=TensorProto.FLOAT, name="cast_out"),
            helper.make_node("Mul", ["flat_scaled", "B_scale"], ["flat"], name="unscale"),
        ]
    else:
        initializers += [
            numpy_helper.from_array(np.asarray(A, np.float32), "A"),
            numpy_helper.from_array(np.asarray(B, np.float32), "B"),
        ]
        nodes = [
            helper.make_node("MatMul", ["betas", "A"], ["low_rank"], name="matmul_A"),  # (B, r)
            helper.make_node("MatMul", ["low_rank", "B"], ["flat"], name="matmul_B"),  # (B, T·D)
        ]
    nodes += [
        helper.make_node("Add", ["flat", "intercept"], ["flat_out"], name="add_intercept"),
        helper.make_node(
            "Reshape", ["flat_out", "token_shape"], [output_name], name="to_tokens"
        ),  # (B, T, D)
    ]
    graph = helper.make_graph(
        nodes,
        f"{output_name}_{precision}",
        [helper.make_tensor_value_info("betas", TensorProto.FLOAT, ["batch", v])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", n_tokens, dim])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="brainrecon"
    )
    _set_ir_version(model)
    return save_onnx(model, path, external)


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
) -> list[StagedFile]:
    """Export, convert, check and validate one contract into `staging`; nothing is published here."""
    contract = source.contract
    fp32_path = staging / f"{contract.name}.fp32.onnx"
    t0 = time.perf_counter()
    if contract.exporter == "torchscript":
        fp32_data = export_torchscript(source.module, contract, fp32_path, external_threshold, source.pools)
    else:
        assert source.build is not None
        external = source.weight_bytes > external_threshold
        source.build(fp32_path, "fp32", external)
        fp32_data = [fp32_path.with_name(fp32_path.name + ".data")] if external else []
    fp32_seconds = time.perf_counter() - t0
    staged = []
    for precision in precisions:
        t0 = time.perf_counter()
        if precision == "fp32":
            staged_file = StagedFile(contract, "fp32", fp32_path, fp32_data, fp32_seconds)
        else:
            path = staging / f"{contract.name}.fp16.onnx"
            external = source.weight_bytes // 2 > external_threshold
            if contract.exporter == "torchscript":
                from brainrecon.export.fp16 import convert_to_fp16

                model = convert_to_fp16(fp32_path, fp32_inputs=contract.fp32_inputs)
                data = save_onnx(model, path, external)
            else:
                assert source.build is not None
                source.build(path, "fp16", external)
                data = [path.with_name(path.name + ".data")] if external else []
            staged_file = StagedFile(contract, "fp16", path, data, time.perf_counter() - t0 + fp32_seconds)
        check_onnx(staged_file.path)
        if validate:
            staged_file.validation = validate_onnx(
                contract,
                staged_file.path,
                source.reference,
                precision,
                stats=source.stats,
                pools=source.pools,
            )
        staged.append(staged_file)
    return staged


@contextlib.contextmanager
def staging_dir(onnx_dir: Path) -> Iterator[Path]:
    """A scratch directory beside the final files (same filesystem: os.replace is atomic), always removed."""
    onnx_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", suffix=".tmp", dir=onnx_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: StagedFile, onnx_dir: Path) -> tuple[Path, list[Path]]:
    """Move a staged ONNX (data files first, the .onnx last) to its final name; drop a stale data file."""
    final = onnx_dir / staged.path.name
    stale = final.with_name(final.name + ".data")
    moved = []
    for data in staged.external_data:
        os.replace(data, onnx_dir / data.name)
        moved.append(onnx_dir / data.name)
    os.replace(staged.path, final)
    if not staged.external_data:
        stale.unlink(missing_ok=True)
    return final, moved


# ----------------------------------------------------------------------------------------- entry point


def _precisions(precision: str) -> tuple[str, ...]:
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"export precision: expected one of {PRECISION_CHOICES}, found {precision!r}")
    return PRECISIONS if precision == "both" else (precision,)


def export_model_dir(
    model_dir: str | Path,
    stage: str = "all",
    precision: str = "both",
    validate: bool = True,
    out_dir: str | Path | None = None,
    engines: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> dict[str, Any]:
    """Export the models of `stage` from `model_dir` to `<out_dir or model_dir/onnx>/<name>.<precision>.onnx`,
    validate them (unless `validate=False`), build TensorRT engines when TensorRT and a GPU are present (else say
    why not), and record everything in `model_dir/manifest.json`. Returns a JSON-able summary.

    `out_dir` must lie inside `model_dir` (the manifest holds relative paths). `external_data_threshold` (bytes of
    weights) decides when weights go to `<file>.data`; lower it to exercise that path on a small model.
    """
    model_dir = Path(model_dir)
    t_start = time.perf_counter()
    precisions = _precisions(precision)
    if not model_dir.is_dir():
        raise MissingFileError(model_dir, "model directory", "run recon-train subject first")
    onnx_dir = Path(out_dir) if out_dir is not None else model_dir / ONNX_DIR
    try:
        onnx_dir.resolve().relative_to(model_dir.resolve())
    except ValueError:
        raise InputError(
            onnx_dir, f"an output folder inside the model directory {model_dir}", "a folder outside it"
        ) from None
    names = contract_names(model_dir, stage)
    with_stage2 = any(n in STAGE2_MODELS for n in names)
    runtime_files = RUNTIME_DATA_FILES + (STAGE2_DATA_FILES if with_stage2 else ())
    for rel in runtime_files:
        if not (model_dir / rel).is_file():
            hint = (
                "run recon-train subject --stage clip"
                if rel.startswith("stage2/")
                else "run recon-train subject"
            )
            raise MissingFileError(model_dir / rel, "model directory file", f"{hint} first")
    sources = load_sources(model_dir, names)

    with staging_dir(onnx_dir) as staging:
        staged = [
            f
            for s in sources
            for f in stage_contract(s, staging, precisions, validate, external_data_threshold)
        ]
        published = [(f, *publish(f, onnx_dir)) for f in staged]

    if with_stage2:
        from brainrecon.export.stage2 import write_scheduler_json

        runtime_files += (write_scheduler_json(model_dir),)
    artifacts: list[Artifact] = [describe_file(model_dir, rel, "data") for rel in runtime_files]
    exported = []
    for f, final, data_files in published:
        rel = final.relative_to(model_dir).as_posix()
        data_rels = [p.relative_to(model_dir).as_posix() for p in data_files]
        artifacts += [
            describe_file(model_dir, r, "onnx_data", model=f.contract.name, precision=f.precision)
            for r in data_rels
        ]
        artifacts.append(
            describe_file(
                model_dir,
                rel,
                "onnx",
                model=f.contract.name,
                precision=f.precision,
                opset=f.contract.opset,
                exporter=f.contract.exporter,
                io=f.contract.io_spec(),
                validation=f.validation,
                external_data=tuple(data_rels),
            )
        )
        exported.append(
            {
                "model": f.contract.name,
                "precision": f.precision,
                "path": rel,
                "bytes": final.stat().st_size + sum(p.stat().st_size for p in data_files),
                "external_data": data_rels,
                "export_seconds": round(f.seconds, 2),
                "validation": f.validation if validate else "skipped (validate=False)",
            }
        )
    engine_summary: dict[str, Any] = {"built": [], "skipped": "not requested (engines=False)"}
    if engines:
        from brainrecon.export.tensorrt import build_engines_for

        onnx_artifacts = [a for a in artifacts if a.kind == "onnx"]
        engine_artifacts, engine_summary = build_engines_for(model_dir, onnx_artifacts)
        artifacts += engine_artifacts
    write_manifest(model_dir, artifacts)
    return {
        "model_dir": str(model_dir),
        "stage": stage,
        "exported": exported,
        "engines": engine_summary,
        "manifest": str(model_dir / "manifest.json"),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
