"""fp32 ONNX → fp16 ONNX with ONNX Runtime's float16 tool, fp32 inputs/outputs and fp32 normalisations.

Seen here: onnxconverter-common 1.16 produced a model ORT could not load; `onnxruntime.transformers.float16`
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


def input_subgraph_nodes(fp32_path: str | Path, input_names: tuple[str, ...]) -> list[str]:
    """Names of the nodes computed from `input_names` and weights only (structure only; weights are not read).

    A node belongs when one of its inputs does and every other input does too, is an initializer, or is not a
    float tensor (shapes read from other inputs: the UNet's `timestep.expand(sample.shape[0])`); the Constant
    nodes feeding only such nodes belong with them. For the UNet's `timestep` this is the sinusoidal projection
    and the time-embedding MLPs down to each ResNet's `time_emb_proj`: per-row vectors, negligible work.
    """
    import onnx

    model = onnx.load(str(fp32_path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)  # dtypes of the intermediate tensors
    graph = inferred.graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    dtypes |= {t.name: t.data_type for t in graph.initializer}
    weights = {t.name for t in graph.initializer}
    constants = {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    member = set(input_names)
    nodes: list[str] = []
    for node in graph.node:  # the exporter writes nodes in topological order
        inputs = [i for i in node.input if i]
        if not any(i in member for i in inputs):
            continue
        floats = [i for i in inputs if dtypes.get(i) == onnx.TensorProto.FLOAT]
        if all(i in member or i in weights or i in constants for i in floats):
            member.update(node.output)
            nodes.append(node.name)  # the TorchScript exporter names every node
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node.name)
    chosen = set(nodes)
    nodes += [
        n.name
        for n in graph.node
        if n.op_type == "Constant" and all(c in chosen for o in n.output for c in consumers.get(o, [None]))
    ]
    if not all(nodes):
        raise ValueError(
            f"{fp32_path}: expected named nodes in the subgraph of {input_names}, found unnamed ones"
        )
    return nodes


def drop_fp16_round_trips(model, blocked_ops: set[str], blocked_nodes: set[str]) -> int:
    """Remove the lossy Cast(fp16) → Cast(fp32) pairs the float16 tool puts between two fp32 (blocked) nodes,
    or between a graph input and a blocked node: it wraps each blocked node on its own, so a chain of them would
    round to fp16 at every link. The consumers read the fp32 tensor directly. Returns the casts removed."""
    from onnx import TensorProto

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    fp32_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    graph_outputs = {o.name for o in graph.output}

    def cast_to(node) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    def is_fp32_source(name: str) -> bool:
        src = producer.get(name)
        if src is None:
            return name in fp32_inputs
        return src.op_type in blocked_ops or src.name in blocked_nodes

    rename: dict[str, str] = {}
    dead: set[int] = set()
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT or node.output[0] in graph_outputs:
            continue
        first = producer.get(node.input[0])
        if first is None or cast_to(first) != TensorProto.FLOAT16 or not is_fp32_source(first.input[0]):
            continue
        rename[node.output[0]] = first.input[0]
        dead.add(id(node))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {i for n in graph.node if id(n) not in dead for i in n.input} | graph_outputs
    dead |= {
        id(n)
        for n in graph.node
        if cast_to(n) == TensorProto.FLOAT16 and n.output[0] not in used and is_fp32_source(n.input[0])
    }
    keep = [n for n in graph.node if id(n) not in dead]
    removed = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(keep)
    return removed


def convert_to_fp16(fp32_path: str | Path, output_nodes_fp32: bool = True, fp32_inputs: tuple[str, ...] = ()):
    """fp32 ONNX file → fp16 ModelProto (keep_io_types: the graph still takes and returns float32).

    `output_nodes_fp32` keeps the node(s) writing each graph output in fp32 (for the GRU: the last Linear with its
    bias). Why: the regressors' outputs are a large per-dimension offset plus a small trial-dependent part, and the
    transductive re-normalisation divides by that part's spread across trials; rounding the sum to fp16 would be
    amplified many-fold. The cost is one small layer. `fp32_inputs` keeps the subgraph of those inputs in fp32
    (`input_subgraph_nodes`; the UNet's timestep embedding). The path form runs shape inference with
    `infer_shapes_path` (works over 2 GB) and resolves external data relative to the file.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    blocked_ops = fp16_op_block_list()
    blocked_nodes = output_node_names(fp32_path) if output_nodes_fp32 else []
    if fp32_inputs:
        blocked_nodes += input_subgraph_nodes(fp32_path, fp32_inputs)
    model = convert_float_to_float16(
        str(fp32_path),
        keep_io_types=True,
        op_block_list=blocked_ops,
        node_block_list=blocked_nodes or None,
    )
    if fp32_inputs:
        drop_fp16_round_trips(model, set(blocked_ops), set(blocked_nodes))
    # The tool appends its input/output Casts at the end of the node list; ORT does not mind, but the ONNX
    # checker (and TensorRT's parser) require topological order.
    OnnxModel.graph_topological_sort(model.graph, is_deterministic=True)
    return model
