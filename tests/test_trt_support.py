"""Static TensorRT operator check (export/trt_support.py): graphs built with onnx.helper, and the real exported
tiny models of both stages (fp32 and fp16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from brainrecon.export.trt_support import (
    OPSET_RANGE,
    SUPPORTED_TYPES,
    UNSUPPORTED,
    TensorRTSupportError,
    cast_round_trips,
    check_trt_support,
    operator_inventory,
    require_trt_support,
)
from brainrecon.manifest import load_manifest

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _value(name: str, dtype: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _gru(name: str = "gru", **attrs) -> onnx.ModelProto:
    """A bidirectional GRU over a (T=1, B, 8) sequence, hidden 4, as torch exports the stage-1 mapper."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 12, 8)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.standard_normal((2, 12, 4)).astype(np.float32), "R")
    b = numpy_helper.from_array(rng.standard_normal((2, 24)).astype(np.float32), "B")
    node = helper.make_node(
        "GRU",
        ["x", "W", "R", "B"],
        ["y", "y_h"],
        name=name,
        hidden_size=4,
        direction="bidirectional",
        **{"linear_before_reset": 1, **attrs},
    )
    return _model(
        [node],
        [_value("x", F32, [1, "batch", 8])],
        [_value("y", F32, [1, 2, "batch", 4]), _value("y_h", F32, [2, "batch", 4])],
        [w, r, b],
    )


def _one_line(problems: list[str], node: str, *words: str) -> None:
    hits = [p for p in problems if p.startswith(f"{node} (")]
    assert hits, problems
    assert all(w in hits[0] for w in words), hits[0]
    assert all("\n" not in p for p in problems)


# ----------------------------------------------------------------------------------------- the table


def test_table_transcription_spot_checks():
    assert OPSET_RANGE == (9, 20)
    assert SUPPORTED_TYPES["MatMul"] == {"FP32", "FP16", "BF16"}  # no integer matmul
    assert SUPPORTED_TYPES["Cast"] == {"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"}
    assert SUPPORTED_TYPES["ConstantOfShape"] >= {"INT64"}  # the table's "INF64" typo
    assert {"GRU", "LayerNormalization", "InstanceNormalization", "Resize", "Erf"} <= SUPPORTED_TYPES.keys()
    assert {"Unique", "Det", "MatMulInteger", "STFT"} <= UNSUPPORTED
    assert not UNSUPPORTED & SUPPORTED_TYPES.keys()


# ----------------------------------------------------------------------------------------- helper-built graphs


def test_supported_graph_with_an_fp16_cast_chain_passes():
    """fp32 input -> Cast fp16 -> Conv -> Relu -> Unsqueeze/Squeeze (constant axes) -> Cast fp32 output."""
    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float16), "w")
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], name="to_fp16", to=F16),
        helper.make_node("Conv", ["x16", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Constant", [], ["axes"], name="axes", value=_ints("axes_value", [0])),
        helper.make_node("Unsqueeze", ["r", "axes"], ["u"], name="unsqueeze"),
        helper.make_node("Squeeze", ["u", "axes"], ["s"], name="squeeze"),
        helper.make_node("Cast", ["s"], ["y"], name="to_fp32", to=F32),
    ]
    model = _model(nodes, [_value("x", F32, ["b", 3, 8, 8])], [_value("y", F32, ["b", 4, 8, 8])], [weight])
    onnx.checker.check_model(model, full_check=True)
    assert check_trt_support(model) == []
    assert cast_round_trips(model) == []  # fp16 in between does work: no wasted round trip
    assert check_trt_support(_gru()) == []  # linear_before_reset 1, as torch exports it
    assert check_trt_support(_gru(linear_before_reset=0)) == []  # the parser imports both


def test_unsupported_operators_fail_naming_the_node():
    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="dedupe"),
        helper.make_node("Relu", ["x"], ["y"], name="fine"),
        helper.make_node("FusedGemm", ["x", "x"], ["z"], name="ort_fused", domain="com.microsoft"),
    ]
    model = _model(
        nodes,
        [_value("x", F32, [4])],
        [_value("u", F32, None), _value("y", F32, [4]), _value("z", F32, None)],
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    problems = check_trt_support(model)
    _one_line(problems, "dedupe", "Unique", "unsupported")
    _one_line(problems, "ort_fused", "com.microsoft", "plugin")
    assert not any(p.startswith("fine (") for p in problems)


@pytest.mark.parametrize(
    "dtype, np_dtype",
    [(TensorProto.INT32, np.int32), (TensorProto.DOUBLE, np.float64)],
)
def test_unsupported_dtype_fails_naming_the_node(dtype, np_dtype):
    b = numpy_helper.from_array(np.ones((4, 2), np_dtype), "b")
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="int_matmul")
    model = _model([node], [_value("a", dtype, [3, 4])], [_value("y", dtype, [3, 2])], [b])
    problems = check_trt_support(model)
    _one_line(problems, "int_matmul", "MatMul", TensorProto.DataType.Name(dtype), "FP16, FP32")


def test_cast_chain_through_double_fails_at_both_casts():
    """An fp16 conversion that detours through DOUBLE: TensorRT has no DOUBLE tensors (Cast lists none)."""
    nodes = [
        helper.make_node("Cast", ["x"], ["x64"], name="up_to_double", to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["x64"], ["y"], name="down_to_half", to=F16),
    ]
    model = _model(nodes, [_value("x", F32, [4])], [_value("y", F16, [4])])
    problems = check_trt_support(model)
    _one_line(problems, "up_to_double", "casts to DOUBLE")
    _one_line(problems, "down_to_half", "input 0", "DOUBLE")


def test_cast_round_trip_is_reported_not_refused():
    """fp32 result -> Cast fp16 -> Cast fp32 (what keep_io_types adds after an op kept in fp32): supported, but
    the fp32 value is rounded to fp16 on its way out."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="kept_fp32"),
        helper.make_node("Cast", ["r"], ["r16"], name="narrow", to=F16),
        helper.make_node("Cast", ["r16"], ["y"], name="widen", to=F32),
    ]
    model = _model(nodes, [_value("x", F32, [4])], [_value("y", F32, [4])])
    assert check_trt_support(model) == []
    assert cast_round_trips(model) == ["narrow -> widen: 'r' FLOAT -> FLOAT16 -> FLOAT"]


def test_mixed_precision_inputs_fail_type_inference():
    """A strongly typed network cannot add fp16 to fp32: a missing Cast in an fp16 chain is caught."""
    node = helper.make_node("Add", ["a", "b"], ["y"], name="mixed_add")
    model = _model([node], [_value("a", F16, [4]), _value("b", F32, [4])], [_value("y", F16, [4])])
    problems = check_trt_support(model)
    assert any(p.startswith("model: ONNX type inference fails") for p in problems), problems


@pytest.mark.parametrize(
    "attrs, words",
    [
        ({"layout": 1}, ("layout 1", "must be 0")),
        ({"activations": ["Sigmoid", "Tanh", "Sigmoid", "Relu"]}, ("activations", "same for both")),
        ({"linear_before_reset": 2}, ("linear_before_reset 2",)),
    ],
)
def test_gru_attributes_the_parser_restricts(attrs, words):
    _one_line(check_trt_support(_gru(name="mapper_gru", **attrs)), "mapper_gru", "GRU", *words)


def test_attribute_and_constant_input_restrictions():
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], name="bicubic_up", mode="cubic"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Constant", [], ["one"], name="one", value=_ints("one_value", [1])),
        helper.make_node("Gather", ["shape", "one"], ["axes"], name="dyn_axes"),  # axes computed at run time
        helper.make_node("Constant", [], ["starts"], name="starts", value=_ints("s", [0])),
        helper.make_node("Constant", [], ["ends"], name="ends", value=_ints("e", [2])),
        helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["sl"], name="dyn_slice"),
        helper.make_node("Constant", [], ["k"], name="k", value=_ints("k_value", [2])),
        helper.make_node("TopK", ["sl", "k"], ["tv", "ti"], name="unsorted_topk", sorted=0),
        helper.make_node(
            "LayerNormalization", ["x", "gamma"], ["ln", "ln_mean", "ln_inv_std"], name="ln_stats", axis=-1
        ),
    ]
    scales = numpy_helper.from_array(np.asarray([1, 1, 2, 2], np.float32), "scales")
    gamma = numpy_helper.from_array(np.ones(8, np.float32), "gamma")
    outputs = [_value(n, t, None) for n, t in (("r", F32), ("tv", F32), ("ti", TensorProto.INT64))]
    outputs += [_value(n, F32, None) for n in ("ln", "ln_mean", "ln_inv_std")]
    model = _model(nodes, [_value("x", F32, [1, 3, 8, 8])], outputs, [scales, gamma])
    problems = check_trt_support(model)
    _one_line(problems, "bicubic_up", "Resize", "mode 'cubic'")
    _one_line(problems, "dyn_slice", "Slice", "axes", "must be an initializer")
    _one_line(problems, "unsorted_topk", "TopK", "sorted must be 1")
    _one_line(problems, "ln_stats", "LayerNormalization", "only the first output")
    for fine in ("shape", "dyn_axes", "starts", "one"):
        assert not any(p.startswith(f"{fine} (") for p in problems), problems


def test_opset_outside_the_table_and_require_raises_one_line(tmp_path):
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [_value("x", F32, [2])],
        [_value("y", F32, [2])],
    )
    assert check_trt_support(model) == []
    newer = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [_value("x", F32, [2])],
        [_value("y", F32, [2])],
        opset=21,
    )
    assert check_trt_support(newer) == ["model: default-domain opset 21 outside TensorRT 10's 9..20"]
    path = tmp_path / "unique.onnx"
    onnx.save(
        _model(
            [helper.make_node("Unique", ["x"], ["u"], name="dedupe")],
            [_value("x", F32, [4])],
            [_value("u", F32, None)],
        ),
        str(path),
    )
    with pytest.raises(TensorRTSupportError) as err:
        require_trt_support(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "dedupe (Unique)" in message
    assert "10.1-GA" in message and err.value.problems == check_trt_support(path)
    require_trt_support(model)  # nothing to raise


# ----------------------------------------------------------------------------------------- exported graphs


@pytest.fixture(scope="module")
def exported_graphs(tmp_path_factory) -> dict[str, Path]:
    """The tiny two-stage subject exported with --stage all --precision both (the test_export_stage2 fixture's
    folders, so one session builds it once), plus the GRU variant of its stage 1."""
    import torch

    from brainrecon.export.subject import export_model_dir
    from brainrecon.manifest import MANIFEST_FILE
    from tests.fixtures import build_tiny_stage1, build_tiny_stage2

    base = tmp_path_factory.getbasetemp()
    paths = build_tiny_stage2(base / "tiny-stage2")
    model_dir = base / "tiny-stage2-exported"
    if not (model_dir / MANIFEST_FILE).is_file():
        shutil.copytree(paths["model"], model_dir, dirs_exist_ok=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            summary = export_model_dir(model_dir, stage="all", precision="both")
        finally:
            torch.set_num_threads(threads)
        (model_dir / "summary.json").write_text(json.dumps(summary, default=str))
    gru_dir = build_tiny_stage1(base / "tiny-stage2" / "stage1")["gru"]
    files = sorted((model_dir / "onnx").glob("*.onnx")) + sorted((gru_dir / "onnx").glob("gru.*.onnx"))
    return {f"{f.parent.parent.name}/{f.name}": f for f in files}


def test_every_exported_graph_passes_the_tensorrt_table(exported_graphs):
    names = {name.split("/")[-1] for name in exported_graphs}
    for model in (
        "gru",
        "ridge",
        "vdvae_decoder",
        "clip_text",
        "clip_vision",
        "vae_encoder",
        "vae_decoder",
        "unet",
    ):
        assert {f"{model}.fp32.onnx", f"{model}.fp16.onnx"} <= names, names
    for name, path in exported_graphs.items():
        inventory = operator_inventory(path)
        print(f"{name}: {inventory}")
        assert check_trt_support(path) == [], name
        assert cast_round_trips(path) == [], name  # export/fp16.py drops every fp32 → fp16 → fp32 pair
        if ".fp16." in name:
            assert inventory.get("Cast", 0) >= 2, name  # keep_io_types: fp32 at both ends
    gru = onnx.load(str(next(p for n, p in exported_graphs.items() if n.endswith("gru.fp16.onnx"))))
    grus = [n for n in gru.graph.node if n.op_type == "GRU"]
    assert len(grus) == 2  # the seed paper's two bi-GRUs
    for node in grus:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["linear_before_reset"] == 1 and attrs["direction"] == b"bidirectional"
        assert attrs.get("layout", 0) == 0


# ----------------------------------------------------------------------------------------- TensorRT (GPU only)


def _random_inputs(io, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the contract's I/O spec at `batch` rows; integer inputs (the UNet's timestep) in 1..999."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape, dtype in io.inputs:
        dims = [batch if d == "batch" else int(d) for d in shape]
        if np.dtype(dtype).kind in "iu":
            out[name] = rng.integers(1, 1000, dims).astype(dtype)
        else:
            out[name] = rng.standard_normal(dims).astype(dtype)
    return out


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_stage2_graph_builds_and_matches_onnx_runtime(exported_graphs, tmp_path, precision):
    """Each graph of both stages (the regressors, VDVAE decoder, CLIP ridges, VAE, the UNet graphs) built into a
    TensorRT engine with the export's recipe, loaded through the runtime backend (key checked) and compared with
    ONNX Runtime (CPU) on the same random inputs at batch 2.

    Tolerances, relative to the output's largest magnitude (not measured here: no GPU with TensorRT was at hand
    when written): fp32 1e-3 (TF32 off; kernels sum in other orders), fp16 5e-2 (diffusers' fp16 tolerance)."""
    from brainrecon.export.tensorrt import build_engine
    from brainrecon.runtime.backends.base import ModelIO
    from brainrecon.runtime.backends.ort import OrtBackend
    from brainrecon.runtime.backends.tensorrt import TrtBackend, current_machine, expected_key

    model_dir = next(p.parent.parent for p in exported_graphs.values() if "tiny-stage2-exported" in str(p))
    manifest = load_manifest(model_dir)
    machine = current_machine()
    tolerance = 1e-3 if precision == "fp32" else 5e-2
    onnx_entries = [a for a in manifest.artifacts if a.kind == "onnx" and a.precision == precision]
    assert {"clip_text", "clip_vision", "vae_encoder", "vae_decoder", "unet"} <= {
        a.model for a in onnx_entries
    }
    for entry in onnx_entries:
        io = ModelIO.from_spec(entry.model, entry.io)
        key = expected_key(manifest, entry, precision, machine)
        plan = tmp_path / f"{entry.model}.{precision}.plan"
        build_engine(
            model_dir / entry.path, entry.io["profile"], plan, recipe=key.recipe, precision=precision
        )
        engine = TrtBackend(plan, io, key.to_dict(), key, model_dir)
        try:
            inputs = _random_inputs(io, batch=2)
            want = OrtBackend(model_dir / entry.path, io).run(inputs)
            got = engine.run(inputs)
        finally:
            engine.close()
        for name, ref in want.items():
            scale = max(float(np.abs(ref).max()), 1e-6)
            err = float(np.abs(got[name].astype(np.float64) - ref).max())
            assert err <= tolerance * scale, (
                f"{entry.model} {precision} {name}: max diff {err}, scale {scale}"
            )


@pytest.mark.trt
def test_two_stage_reconstruction_on_tensorrt_matches_onnx_runtime(tiny2, tmp_path):
    """recon-export builds every engine of the tiny two-stage subject on this GPU; the runtime then runs both
    stages on them. Images compared with ONNX Runtime's: mean absolute difference at most 2 grey levels (fp32
    engines, TF32 off; 37 DDIM steps amplify small differences; not measured here, see above)."""
    from brainrecon.export.subject import export_model_dir
    from brainrecon.runtime import Reconstructor, RuntimeOptions

    model_dir = shutil.copytree(tiny2["model"], tmp_path / "m")
    summary = export_model_dir(model_dir, stage="all", precision="fp32")
    assert summary["engines"]["skipped"] is None and summary["engines"]["built"]
    again = export_model_dir(model_dir, stage="all", precision="fp32")  # same bytes, recipe, GPU: reused
    assert again["engines"]["built"] == [] and again["engines"]["pruned"] == []
    betas = np.load(tiny2["prep"] / "test_betas.npy")[:2]
    with Reconstructor.open(model_dir, RuntimeOptions(engine="ort", precision="fp32")) as rec:
        ort = rec.reconstruct(betas)
    with Reconstructor.open(model_dir, RuntimeOptions(engine="trt", precision="fp32")) as rec:
        trt = rec.reconstruct(betas)
    assert all("TensorRT" in p[0] for p in trt.providers.values()), trt.providers
    assert np.abs(ort.images.astype(int) - trt.images.astype(int)).mean() <= 2.0
    assert np.abs(ort.stage1_images.astype(int) - trt.stage1_images.astype(int)).mean() <= 2.0
