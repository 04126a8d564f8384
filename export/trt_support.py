"""Static TensorRT check: would TensorRT 10's ONNX parser accept every node of an exported graph?

TensorRT cannot run where most exports happen (no GPU), so this reads the graph instead: each node's operator,
the dtypes of its data tensors and the attributes the parser restricts are compared with the parser's own
documented support table,

    onnx/onnx-tensorrt, docs/operators.md, release branch 10.1-GA (commit 96e7811, June 2024; its header:
    "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20")

transcribed below (`SUPPORTED_TYPES`, `UNSUPPORTED`, the restrictions in `_check_restrictions`). 10.1 is the oldest
10.x table the package accepts (`tensorrt>=10.0`), so it is the conservative one: later 10.x tables (10.15 was
read too) only add operators (Attention, RMSNormalization, RotaryEmbedding, ...) and drop restrictions (the
"`axes` must be an initializer" of Slice and Pad, for example). One check comes from the parser's source rather
than the table: its GRU importer (onnxOpImporters.cpp, `DEFINE_BUILTIN_OP_IMPORTER(GRU)`, same release) reads
`linear_before_reset` (both 0 and 1 are imported) but never reads `layout`, so a batch-first GRU would be misread.

Conventions of the table, as applied here:
- "Supported Types" are the types of an operator's data tensors; indices, shapes, axes and flags (e.g. Gather's
  indices, Reshape's shape) have types fixed by the ONNX spec and are not checked (`NON_DATA_INPUTS`). Constant,
  ConstantOfShape and the Random* generators are checked on their output. A Cast is checked on both ends, so a
  fp16 conversion that casts through a type TensorRT lacks (DOUBLE, INT8 outside Q/DQ) is caught.
- "must be an initializer" / "a constant tensor" is met by an initializer or the output of a Constant node (the
  parser imports both as weights).
- TensorRT 10 networks from fp16 ONNX are strongly typed: every node's inputs must have the types its ONNX schema
  ties together, so the graph must pass ONNX's strict type inference.

`check_trt_support(model)` returns one line per problem ("node (op): what"); `require_trt_support` raises
`TensorRTSupportError` naming the file, the count and the first problems.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from brainrecon.errors import BrainReconError

TRT_TABLE = "onnx/onnx-tensorrt docs/operators.md @ 10.1-GA (96e7811)"
OPSET_RANGE = (9, 20)  # the table's header: "opset 9 to opset 20"

# Operator -> the types the table lists as supported (FP32 FP16 BF16 INT32 INT64 INT8 UINT8 BOOL FP8 INT4).
# Transcribed from the table above; its one typo ("INF64" for ConstantOfShape) read as INT64.
_TABLE = {
    "Abs": "FP32 FP16 BF16 INT32 INT64",
    "Acos": "FP32 FP16 BF16",
    "Acosh": "FP32 FP16 BF16",
    "Add": "FP32 FP16 BF16 INT32 INT64",
    "And": "BOOL",
    "ArgMax": "FP32 FP16 BF16 INT32 INT64",
    "ArgMin": "FP32 FP16 BF16 INT32 INT64",
    "Asin": "FP32 FP16 BF16",
    "Asinh": "FP32 FP16 BF16",
    "Atan": "FP32 FP16 BF16",
    "Atanh": "FP32 FP16 BF16",
    "AveragePool": "FP32 FP16 BF16",
    "BatchNormalization": "FP32 FP16 BF16",
    "Cast": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",
    "CastLike": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",
    "Ceil": "FP32 FP16 BF16",
    "Celu": "FP32 FP16 BF16",
    "Clip": "FP32 FP16 BF16",
    "Concat": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Constant": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "ConstantOfShape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Conv": "FP32 FP16 BF16",
    "ConvTranspose": "FP32 FP16 BF16",
    "Cos": "FP32 FP16 BF16",
    "Cosh": "FP32 FP16 BF16",
    "CumSum": "FP32 FP16 BF16",
    "DeformConv": "FP32 FP16",
    "DepthToSpace": "FP32 FP16 BF16 INT32 INT64",
    "DequantizeLinear": "INT8 FP8 INT4",
    "Div": "FP32 FP16 BF16 INT32 INT64",
    "Dropout": "FP32 FP16 BF16",
    "Einsum": "FP32 FP16 BF16",
    "Elu": "FP32 FP16 BF16",
    "Equal": "FP32 FP16 BF16 INT32 INT64",
    "Erf": "FP32 FP16 BF16",
    "Exp": "FP32 FP16 BF16",
    "Expand": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "EyeLike": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Flatten": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Floor": "FP32 FP16 BF16",
    "Gather": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "GatherElements": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "GatherND": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Gelu": "FP32 FP16 BF16 INT8 INT32 INT64",
    "Gemm": "FP32 FP16 BF16",
    "GlobalAveragePool": "FP32 FP16 BF16",
    "GlobalLpPool": "FP32 FP16 BF16",
    "GlobalMaxPool": "FP32 FP16 BF16",
    "Greater": "FP32 FP16 BF16 INT32 INT64",
    "GreaterOrEqual": "FP32 FP16 BF16 INT32 INT64",
    "GridSample": "FP32 FP16",
    "GroupNormalization": "FP32 FP16 BF16",
    "GRU": "FP32 FP16 BF16",
    "HardSigmoid": "FP32 FP16 BF16",
    "HardSwish": "FP32 FP16 BF16",
    "Hardmax": "FP32 FP16 BF16",
    "Identity": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "If": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "ImageScaler": "FP32 FP16 BF16",
    "InstanceNormalization": "FP32 FP16 BF16",
    "IsInf": "FP32 FP16 BF16",
    "IsNaN": "FP32 FP16 BF16 INT32 INT64",
    "LayerNormalization": "FP32 FP16 BF16",
    "LeakyRelu": "FP32 FP16 BF16",
    "Less": "FP32 FP16 BF16 INT32 INT64",
    "LessOrEqual": "FP32 FP16 BF16 INT32 INT64",
    "Log": "FP32 FP16 BF16",
    "LogSoftmax": "FP32 FP16 BF16",
    "Loop": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "LRN": "FP32 FP16 BF16",
    "LSTM": "FP32 FP16 BF16",
    "LpNormalization": "FP32 FP16 BF16",
    "LpPool": "FP32 FP16 BF16",
    "MatMul": "FP32 FP16 BF16",
    "Max": "FP32 FP16 BF16 INT32 INT64",
    "MaxPool": "FP32 FP16 BF16",
    "Mean": "FP32 FP16 BF16 FP8 INT32 INT64",
    "MeanVarianceNormalization": "FP32 FP16 BF16",
    "Min": "FP32 FP16 BF16 INT32 INT64",
    "Mish": "FP32 FP16",
    "Mod": "FP32 FP16 BF16 INT32 INT64",
    "Mul": "FP32 FP16 BF16 INT32 INT64",
    "Neg": "FP32 FP16 BF16 INT32 INT64",
    "NonMaxSuppression": "FP32 FP16",
    "NonZero": "FP32 FP16",
    "Not": "BOOL",
    "OneHot": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Or": "BOOL",
    "Pad": "FP32 FP16 BF16 INT32 INT64",
    "ParametricSoftplus": "FP32 FP16 BF16",
    "Pow": "FP32 FP16 BF16",
    "PRelu": "FP32 FP16 BF16",
    "QuantizeLinear": "FP32 FP16 BF16",
    "RandomNormal": "FP32 FP16 BF16",
    "RandomNormalLike": "FP32 FP16 BF16",
    "RandomUniform": "FP32 FP16 BF16",
    "RandomUniformLike": "FP32 FP16 BF16",
    "Range": "FP32 FP16 BF16 INT32 INT64",
    "Reciprocal": "FP32 FP16 BF16",
    "ReduceL1": "FP32 FP16 BF16 INT32 INT64",
    "ReduceL2": "FP32 FP16 BF16 INT32 INT64",
    "ReduceLogSum": "FP32 FP16 BF16 INT32 INT64",
    "ReduceLogSumExp": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMax": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMean": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMin": "FP32 FP16 BF16 INT32 INT64",
    "ReduceProd": "FP32 FP16 BF16 INT32 INT64",
    "ReduceSum": "FP32 FP16 BF16 INT32 INT64",
    "ReduceSumSquare": "FP32 FP16 BF16 INT32 INT64",
    "Relu": "FP32 FP16 BF16 INT32 INT64",
    "Reshape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Resize": "FP32 FP16 BF16",
    "ReverseSequence": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "RNN": "FP32 FP16 BF16",
    "RoiAlign": "FP32 FP16",
    "Round": "FP32 FP16 BF16",
    "ScaledTanh": "FP32 FP16 BF16",
    "Scan": "FP32 FP16 BF16",
    "Scatter": "FP32 FP16 BF16 INT32 INT64",
    "ScatterElements": "FP32 FP16 BF16 INT32 INT64",
    "ScatterND": "FP32 FP16 BF16 INT32 INT64",
    "Selu": "FP32 FP16 BF16",
    "Shape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Shrink": "FP32 FP16 BF16 INT32 INT64",
    "Sigmoid": "FP32 FP16 BF16",
    "Sign": "FP32 FP16 BF16 INT32 INT64",
    "Sin": "FP32 FP16 BF16",
    "Sinh": "FP32 FP16 BF16",
    "Size": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Slice": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Softmax": "FP32 FP16 BF16",
    "Softplus": "FP32 FP16 BF16",
    "Softsign": "FP32 FP16 BF16",
    "SpaceToDepth": "FP32 FP16 BF16 INT32 INT64",
    "Split": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Sqrt": "FP32 FP16 BF16",
    "Squeeze": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Sub": "FP32 FP16 BF16 INT32 INT64",
    "Sum": "FP32 FP16 BF16 INT32 INT64",
    "Tan": "FP32 FP16 BF16",
    "Tanh": "FP32 FP16 BF16",
    "ThresholdedRelu": "FP32 FP16 BF16",
    "Tile": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "TopK": "FP32 FP16 BF16 INT32 INT64",
    "Transpose": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Trilu": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Unsqueeze": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Upsample": "FP32 FP16 BF16",
    "Where": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Xor": "BOOL",
}
SUPPORTED_TYPES: dict[str, frozenset[str]] = {op: frozenset(types.split()) for op, types in _TABLE.items()}
# Listed in the table as not supported ("N").
UNSUPPORTED = frozenset(
    [
        "AffineGrid",
        "Bernoulli",
        "BitShift",
        "BitwiseAnd",
        "BitwiseNot",
        "BitwiseOr",
        "BitwiseXor",
        "BlackmanWindow",
        "Col2Im",
        "CenterCropPad",
        "Compress",
        "ConcatFromSequence",
        "ConvInteger",
        "DFT",
        "Det",
        "DynamicQuantizeLinear",
        "HammingWindow",
        "HannWindow",
        "ImageDecoder",
        "MatMulInteger",
        "MaxRoiPool",
        "MaxUnpool",
        "MelWeightMatrix",
        "Multinomial",
        "NegativeLogLikelihoodLoss",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
        "QLinearConv",
        "QLinearMatMul",
        "RegexFullMatch",
        "STFT",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SequenceMap",
        "SoftmaxCrossEntropyLoss",
        "SplitToSequence",
        "StringConcat",
        "StringNormalizer",
        "StringSplit",
        "TfIdfVectorizer",
        "Unique",
    ]
)
# The table's type names for ONNX element types; anything else (DOUBLE, STRING, UINT16, ...) is no TensorRT type.
TYPE_NAMES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.INT4: "INT4",
}
NETWORK_IO_TYPES = frozenset({"FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL", "FP8"})
_REDUCE = ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")
# Inputs whose dtype the ONNX spec fixes (indices, shapes, axes, flags): not what "Supported Types" describes.
NON_DATA_INPUTS: dict[str, frozenset[int]] = {
    **{op: frozenset({1}) for op in ("Reshape", "Expand", "Tile", "Squeeze", "Unsqueeze", "Split", "TopK")},
    **{op: frozenset({1}) for op in ("Gather", "GatherElements", "GatherND", "Scatter", "ScatterElements")},
    **{op: frozenset({1}) for op in ("ScatterND", "CumSum", "Trilu", "ReverseSequence", "Upsample")},
    **{f"Reduce{r}": frozenset({1}) for r in _REDUCE},
    "Slice": frozenset({1, 2, 3, 4}),
    "Resize": frozenset({1, 2, 3}),
    "Pad": frozenset({1, 3}),
    "Where": frozenset({0}),
    "OneHot": frozenset({0, 1}),
    "Dropout": frozenset({1, 2}),
    "GRU": frozenset({4}),
    "LSTM": frozenset({4}),
    "RNN": frozenset({4}),
    "RoiAlign": frozenset({2}),
    "NonMaxSuppression": frozenset({2, 3, 4}),
    "QuantizeLinear": frozenset({1, 2}),
    "DequantizeLinear": frozenset({1, 2}),
    "ConstantOfShape": frozenset({0}),
    "If": frozenset({0}),
    "Loop": frozenset({0, 1}),
}
OUTPUT_TYPED = frozenset({"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"})
RESIZE_COORDINATE_MODES = (
    "half_pixel",
    "pytorch_half_pixel",
    "tf_half_pixel_for_nn",
    "asymmetric",
    "align_corners",
)
RESIZE_MODES = ("nearest", "linear")
RESIZE_NEAREST_MODES = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")
TOPK_MAX_K = 3840


class TensorRTSupportError(BrainReconError):
    """An exported graph holds a node TensorRT's ONNX parser would refuse (static check, `check_trt_support`)."""

    def __init__(self, source: str | Path, problems: list[str]):
        self.problems = problems
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        super().__init__(
            f"{source}: expected every node supported by TensorRT 10's ONNX parser ({TRT_TABLE}), "
            f"found {len(problems)} unsupported: {shown}"
        )


def require_trt_support(model: str | Path | onnx.ModelProto) -> None:
    """Raise TensorRTSupportError (one line) unless `check_trt_support` finds nothing."""
    problems = check_trt_support(model)
    if problems:
        source = str(model) if isinstance(model, (str, Path)) else (model.graph.name or "ONNX model")
        raise TensorRTSupportError(source, problems)


def check_trt_support(model: str | Path | onnx.ModelProto) -> list[str]:
    """One line per problem TensorRT 10's ONNX parser would meet (module doc); [] when there is none.

    A path is read without its external data (only the graph, dtypes and shapes are needed).
    """
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    problems: list[str] = []
    opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    opset = opsets.get("ai.onnx")
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(
            f"model: default-domain opset {opset} outside TensorRT 10's {OPSET_RANGE[0]}..{OPSET_RANGE[1]}"
        )
    try:  # strongly typed networks: the types an operator's schema ties together must agree
        inferred = shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problems.append(f"model: ONNX type inference fails (a strongly typed network would too): {first}")
        inferred = shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = _tensor_types(graph)
    for value in [*graph.input, *graph.output]:
        name = TYPE_NAMES.get(value.type.tensor_type.elem_type)
        if name not in NETWORK_IO_TYPES:
            problems.append(f"model: network input/output {value.name!r} has type {_type_name(value)}")
    problems += _check_graph(graph, types, _constants(graph))
    return problems


def _type_name(value: onnx.ValueInfoProto) -> str:
    return TensorProto.DataType.Name(value.type.tensor_type.elem_type)


def _tensor_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every named tensor: inputs, outputs, inferred value_info, initializers, Constant outputs."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return {name: t for name, t in types.items() if t != TensorProto.UNDEFINED}


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | None]:
    """Tensors known when the engine is built: initializers and Constant outputs (value when it is a tensor)."""
    constants: dict[str, onnx.TensorProto | None] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            constants[node.output[0]] = value
    return constants


def _check_graph(
    graph: onnx.GraphProto, types: dict[str, int], constants: dict[str, onnx.TensorProto | None]
) -> list[str]:
    problems = []
    for index, node in enumerate(graph.node):
        label = f"{node.name or f'<unnamed node {index}>'} ({node.op_type})"
        for what in _check_node(node, types, constants):
            problems.append(f"{label}: {what}")
        for attr in node.attribute:  # If / Loop / Scan bodies, each in its own scope
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                sub_types = {**types, **_tensor_types(sub)}
                problems += [
                    f"{label} / {p}" for p in _check_graph(sub, sub_types, {**constants, **_constants(sub)})
                ]
    return problems


def _check_node(
    node: onnx.NodeProto, types: dict[str, int], constants: dict[str, onnx.TensorProto | None]
) -> Iterable[str]:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        yield f"operator of domain {node.domain!r}: not an ONNX operator (TensorRT would need a plugin)"
        return
    if op in UNSUPPORTED:
        yield "operator listed as unsupported"
        return
    if op not in SUPPORTED_TYPES:
        yield "operator not in the table"
        return
    allowed = SUPPORTED_TYPES[op]
    skip = NON_DATA_INPUTS.get(op, frozenset())
    tensors = (
        [(f"output {o!r}", o) for o in node.output[:1]]
        if op in OUTPUT_TYPED
        else [(f"input {i} {name!r}", name) for i, name in enumerate(node.input) if name and i not in skip]
    )
    if op in ("Cast", "CastLike"):
        target = _attr(node, "to")
        if target is not None and TYPE_NAMES.get(target) not in allowed:
            yield f"casts to {TensorProto.DataType.Name(target)}, supported: {_names(allowed)}"
    for where, name in tensors:
        if name not in types:
            yield f"{where} has no inferred type (cannot check it against {_names(allowed)})"
        elif TYPE_NAMES.get(types[name]) not in allowed:
            yield f"{where} is {TensorProto.DataType.Name(types[name])}, supported: {_names(allowed)}"
    yield from _check_restrictions(node, constants)


def _names(allowed: frozenset[str]) -> str:
    return ", ".join(sorted(allowed))


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _check_restrictions(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto | None]) -> Iterable[str]:
    """The table's "Restrictions" column, for what a graph shows statically."""
    op = node.op_type

    def constant_input(index: int, what: str) -> Iterable[str]:
        name = _input(node, index)
        if name and name not in constants:
            yield f"{what} (input {index} {name!r}) must be an initializer or Constant"

    if op in ("AveragePool", "MaxPool", "LpPool"):
        if any(d != 1 for d in _attr(node, "dilations", [])):
            yield f"dilations {_attr(node, 'dilations')} must be empty or all ones"
        kernel = _attr(node, "kernel_shape", [])
        if op != "LpPool" and len(kernel) not in (2, 3):
            yield f"{len(kernel)}D pooling: only 2D or 3D pooling is supported"
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            yield "the Indices output is unsupported"
    elif op == "Constant":
        bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
        if bad:
            yield f"attribute {bad[0]} is unsupported"
    elif op == "CumSum":
        yield from constant_input(1, "axis")
    elif op in ("DequantizeLinear", "QuantizeLinear"):
        zero_point = _input(node, 2)
        what = "x_zero_point" if op == "DequantizeLinear" else "y_zero_point"
        if zero_point and not _is_zero(constants.get(zero_point, False)):
            yield f"{what} must be zero"
    elif op == "Dropout":
        training = _input(node, 2)
        if training and _is_zero(constants.get(training, False)) is not True:
            yield "training_mode must be an initializer evaluating to False"
    elif op in ("GRU", "LSTM", "RNN"):
        activations = _attr(node, "activations")
        if _attr(node, "direction", "forward") == "bidirectional" and activations:
            half = len(activations) // 2
            if [a.lower() for a in activations[:half]] != [a.lower() for a in activations[half:]]:
                yield f"bidirectional activations {activations} must be the same for both directions"
        if _attr(node, "layout", 0) != 0:
            # LSTM: the table; GRU/RNN: the importers never read `layout` and would misread a batch-first graph
            yield f"layout {_attr(node, 'layout')} must be 0 (sequence first)"
        if op == "LSTM" and _attr(node, "input_forget", 0) != 0:
            yield "input_forget must be 0"
        if op == "GRU" and _attr(node, "linear_before_reset", 0) not in (0, 1):
            yield f"linear_before_reset {_attr(node, 'linear_before_reset')} must be 0 or 1"
    elif op == "LayerNormalization":
        if len([o for o in node.output if o]) > 1:
            yield "only the first output Y is supported (Mean / InvStdDev requested)"
    elif op == "OneHot":
        yield from constant_input(1, "depth")
    elif op == "Pad":
        yield from constant_input(3, "axes")
    elif op.startswith("Reduce"):
        yield from constant_input(1, "axes")
    elif op == "Resize":
        coordinate = _attr(node, "coordinate_transformation_mode", "half_pixel")
        mode = _attr(node, "mode", "nearest")
        if coordinate not in RESIZE_COORDINATE_MODES:
            yield f"coordinate_transformation_mode {coordinate!r} unsupported ({', '.join(RESIZE_COORDINATE_MODES)})"
        if mode not in RESIZE_MODES:
            yield f"mode {mode!r} unsupported ({', '.join(RESIZE_MODES)})"
        nearest = _attr(node, "nearest_mode", "round_prefer_floor")
        if mode == "nearest" and nearest not in RESIZE_NEAREST_MODES:
            yield f"nearest_mode {nearest!r} unsupported ({', '.join(RESIZE_NEAREST_MODES)})"
        if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
            yield f"keep_aspect_ratio_policy {_attr(node, 'keep_aspect_ratio_policy')!r} unsupported (stretch)"
        if _attr(node, "antialias", 0):
            yield "antialiasing is unsupported"
        axes = _attr(node, "axes")
        if axes is not None and list(axes) != list(range(len(axes))):
            yield f"axes {list(axes)} must be 0..rank-1 in order"
    elif op == "ScatterND":
        if _attr(node, "reduction", "none") != "none":
            yield f"reduction {_attr(node, 'reduction')!r} is unsupported"
    elif op in ("Slice", "Squeeze", "Unsqueeze"):
        yield from constant_input(3 if op == "Slice" else 1, "axes")
    elif op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            yield "sorted must be 1"
        k = constants.get(_input(node, 1))
        if k is None:
            yield f"K must be a constant below {TOPK_MAX_K}"
        elif int(numpy_helper.to_array(k).max()) >= TOPK_MAX_K:
            yield f"K {int(numpy_helper.to_array(k).max())} must be below {TOPK_MAX_K}"


def _is_zero(tensor: onnx.TensorProto | None | bool) -> bool | None:
    """True when a constant tensor is all zeros / False; None when it is not a known constant."""
    if not isinstance(tensor, onnx.TensorProto):
        return None
    return not numpy_helper.to_array(tensor).any()


NARROW_FLOATS = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def cast_round_trips(model: str | Path | onnx.ModelProto) -> list[str]:
    """Cast chains that narrow a wider float and widen it straight back (x -> Cast fp16 -> Cast fp32): supported by
    TensorRT (strongly typed networks keep both casts), but the value is rounded to the narrow type on the way, so
    whatever computed x in fp32 was kept in fp32 for nothing. A report, not a failure."""
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    graph = shape_inference.infer_shapes(model).graph
    types = _tensor_types(graph)
    producer = {o: n for n in graph.node for o in n.output}
    found = []
    for node in graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if first is None or first.op_type != "Cast" or not first.input:
            continue
        source, middle, target = types.get(first.input[0]), _attr(first, "to"), _attr(node, "to")
        if middle in NARROW_FLOATS and source == target and source not in NARROW_FLOATS | {None}:
            name = TensorProto.DataType.Name
            found.append(
                f"{first.name} -> {node.name}: {first.input[0]!r} {name(source)} -> {name(middle)} -> {name(target)}"
            )
    return found


def operator_inventory(model: str | Path | onnx.ModelProto) -> dict[str, int]:
    """{op_type: count} of a graph's top-level nodes (what a report of the exported graphs lists)."""
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
