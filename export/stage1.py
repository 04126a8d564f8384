"""Export sources of stage 1: the GRU (TorchScript exporter), the ridge (an ONNX graph built directly: MatMul +
Add, weights streamed to external data above 2 GB) and the VDVAE decoder, from `train/reference.py Stage1Model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.choices import FILE_PRECISIONS
from brainrecon.errors import ConfigError
from brainrecon.export.contracts import gru_contract, ridge_contract, vdvae_decoder_contract
from brainrecon.export.onnx_export import ExportSource, set_ir_version, torch_reference


def load_stage1_sources(model_dir: Path, names: list[str], model: Any = None) -> list[ExportSource]:
    """Stage-1 sources from `model` (a Stage1Model) or `Stage1Model.load(model_dir)`."""
    from brainrecon.train.foundations.vdvae import VDVAEDecoder
    from brainrecon.train.reference import Stage1Model
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

    if precision not in FILE_PRECISIONS:
        raise ConfigError(f"precision: expected one of {FILE_PRECISIONS}, found {precision!r}")
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
    set_ir_version(model)
    path.write_bytes(model.SerializeToString())  # external tensors only carry their location here
    return data_files
