"""fp32 ONNX → fp16 ONNX with ONNX Runtime's float16 tool, fp32 inputs/outputs and fp32 normalisations.

facts §5: onnxconverter-common 1.16 produced a model ORT could not load; `onnxruntime.transformers.float16`
works. TensorRT ≥ 10.12 takes precision from the graph (strongly typed networks), so this file *is* the fp16
engine's precision plan: whatever stays fp32 here stays fp32 on the GPU.
"""

from __future__ import annotations

from pathlib import Path

# Kept in fp32: normalisations and reductions (their sums of squares overflow or lose the mean in fp16), soft-
# maxes, plus ORT's default list (ops without fp16 kernels). `BatchNormalization` is cheap in eval mode and its
# running variance can sit below fp16's normal range.
NORMALISATION_AND_REDUCTION_OPS = (
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "BatchNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
)


def fp16_op_block_list() -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return sorted({*DEFAULT_OP_BLOCK_LIST, *NORMALISATION_AND_REDUCTION_OPS})


def output_node_names(fp32_path: str | Path) -> list[str]:
    """Names of the nodes that write a graph output (structure only; external weights are not read)."""
    import onnx

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    return [n.name for n in graph.node if n.name and outputs.intersection(n.output)]


def convert_to_fp16(fp32_path: str | Path, output_nodes_fp32: bool = True):
    """fp32 ONNX file → fp16 ModelProto (keep_io_types: the graph still takes and returns float32).

    `output_nodes_fp32` keeps the node(s) writing each graph output in fp32 (for the GRU: the last Linear with its
    bias). Why: the regressors' outputs are a large per-dimension offset plus a small trial-dependent part, and the
    transductive re-normalisation divides by that part's spread across trials; rounding the sum to fp16 would be
    amplified many-fold. The cost is one small layer. The path form runs shape inference with
    `infer_shapes_path` (works over 2 GB) and resolves external data relative to the file.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(
        str(fp32_path),
        keep_io_types=True,
        op_block_list=fp16_op_block_list(),
        node_block_list=output_node_names(fp32_path) if output_nodes_fp32 else None,
    )
    # The tool appends its input/output Casts at the end of the node list; ORT does not mind, but the ONNX
    # checker (and TensorRT's parser) require topological order.
    OnnxModel.graph_topological_sort(model.graph, is_deterministic=True)
    return model
