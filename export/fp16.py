"""fp32 ONNX → fp16 ONNX with ONNX Runtime's float16 tool, fp32 inputs/outputs and fp32 normalisations.

Seen here: onnxconverter-common 1.16 produced a model ORT could not load; `onnxruntime.transformers.float16`
works. TensorRT ≥ 10.12 takes precision from the graph (strongly typed networks), so this file *is* the fp16
engine's precision plan: whatever stays fp32 here stays fp32 on the GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


# The fp16 fallbacks: when the plain conversion overflows (inf/NaN) or misses the contract's fp16 tolerance, the export
# retries with these node-name prefixes (TorchScript exporter names: module path) kept fp32, mildest first, and
# records which one it used. Stable Diffusion-family VAE decoders are known to overflow in fp16 with real weights
# (huggingface/diffusers `upcast_vae` / `force_upcast`; madebyollin/sdxl-vae-fp16-fix: activations in the up blocks
# exceed fp16's 65504), so the VAE decoder keeps its two highest-resolution up blocks and output layers, then all of
# itself, in fp32; the VAE encoder and the imagenet64 VDVAE decoder go to fp32 whole. Prefixes are TorchScript
# scope names (a module called as a submodule: `/decoder/up_blocks.3/resnets.0/conv1/Conv`).
FP16_FALLBACKS: dict[str, tuple[tuple[str, ...], ...]] = {
    "vae_decoder": (
        (
            "/decoder/up_blocks.2/",
            "/decoder/up_blocks.3/",
            "/decoder/conv_norm_out",
            "/decoder/conv_act",
            "/decoder/conv_out",
        ),
        ("/",),
    ),
    "vae_encoder": (("/",),),
    "vdvae_decoder": (("/",),),
}
FP16_MAX = 65504.0  # the largest finite fp16
# A node is kept fp32 when a float tensor it reads or writes reached FP16_MAX / FP16_OVERFLOW_MARGIN on the
# validation inputs: other inputs (and a GPU's other summation order) can go further than the ones seen.
FP16_OVERFLOW_MARGIN = 4.0


def activation_peaks(fp32_path: str | Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """max |value| of every float tensor a node writes, over `feeds`, from the fp32 graph on ORT CPU.

    Why from the fp32 graph: ONNX Runtime's CPU provider runs many fp16 nodes by casting to fp32 and drops the
    cast pairs between them, so an fp16 graph that would overflow on a GPU (TensorRT, CUDA) passes on the CPU;
    where fp16 overflows is where the fp32 graph's values leave fp16's range. Every float node output gets an
    Abs → ReduceMax (scalar) graph output; the probe file sits beside `fp32_path` (same external data) and is
    removed afterwards. Memory: ONNX Runtime kept the probed tensors alive together (the imagenet64 VDVAE decoder at
    batch 2 reached 20 GB and was OOM-killed), so this is for small graphs until it probes in bounded chunks."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    fp32_path = Path(fp32_path)
    model = onnx.load(str(fp32_path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.output)}
    graph = model.graph
    probes: dict[str, str] = {}
    for node in list(graph.node):
        for out in node.output:
            if out and dtypes.get(out) == TensorProto.FLOAT and out not in probes:
                peak = f"peak__{len(probes)}"
                graph.node.extend(
                    [
                        helper.make_node("Abs", [out], [f"{peak}_abs"], name=f"{peak}_Abs"),
                        helper.make_node(
                            "ReduceMax", [f"{peak}_abs"], [peak], keepdims=0, name=f"{peak}_Max"
                        ),
                    ]
                )
                graph.output.append(helper.make_tensor_value_info(peak, TensorProto.FLOAT, []))
                probes[out] = peak
    probe_path = fp32_path.with_name(f".{fp32_path.stem}.peaks.onnx")
    probe_path.write_bytes(model.SerializeToString())  # external initializers keep their relative location
    del model, inferred
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(str(probe_path), options, providers=["CPUExecutionProvider"])
        names = list(probes.values())
        peaks = dict.fromkeys(probes, 0.0)
        for feed in feeds:
            values = session.run(names, feed)
            for tensor, value in zip(probes, values, strict=True):
                peaks[tensor] = max(peaks[tensor], float(value))  # inf/NaN stay visible
        return peaks
    finally:
        probe_path.unlink(missing_ok=True)


def overflow_nodes(
    fp32_path: str | Path, peaks: dict[str, float], limit: float = FP16_MAX / FP16_OVERFLOW_MARGIN
) -> list[str]:
    """Nodes that read or write a float tensor whose peak is beyond `limit` (or not finite): kept fp32, so the
    value is produced and consumed in fp32 (a consumer that brings it back into range, e.g. a GroupNorm or the
    next residual scale, then feeds fp16 nodes again)."""
    import onnx

    graph = onnx.load(str(fp32_path), load_external_data=False).graph

    def big(name: str) -> bool:
        value = peaks.get(name)
        return value is not None and not value <= limit  # NaN counts as big

    return [n.name for n in graph.node if any(big(t) for t in (*n.input, *n.output))]


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
    between a graph input and a blocked node, or between a blocked node and a graph output (keep_io_types): it
    wraps each blocked node on its own, so a chain of them would round to fp16 at every link. The consumers read
    the fp32 tensor directly; a graph output gets it through an Identity. Returns the casts removed."""
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
    identities = 0
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or cast_to(first) != TensorProto.FLOAT16 or not is_fp32_source(first.input[0]):
            continue
        if node.output[0] in graph_outputs:  # the output keeps its name: an Identity of the fp32 tensor
            node.op_type = "Identity"
            node.input[0] = first.input[0]
            del node.attribute[:]
            identities += 1
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
    removed = len(graph.node) - len(keep) + identities
    del graph.node[:]
    graph.node.extend(keep)
    return removed


def nodes_with_prefix(fp32_path: str | Path, prefixes: tuple[str, ...]) -> list[str]:
    """Names of the nodes whose name starts with one of `prefixes` (structure only; weights are not read)."""
    import onnx

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.name and n.name.startswith(prefixes)]


def convert_to_fp16(
    fp32_path: str | Path,
    output_nodes_fp32: bool = True,
    fp32_inputs: tuple[str, ...] = (),
    fp32_prefixes: tuple[str, ...] = (),
    fp32_nodes: tuple[str, ...] = (),
):
    """fp32 ONNX file → fp16 ModelProto (keep_io_types: the graph still takes and returns float32).

    `output_nodes_fp32` keeps the node(s) writing each graph output in fp32 (for the GRU: the last Linear with its
    bias). Why: the regressors' outputs are a large per-dimension offset plus a small trial-dependent part, and the
    transductive re-normalisation divides by that part's spread across trials; rounding the sum to fp16 would be
    amplified many-fold. The cost is one small layer. `fp32_inputs` keeps the subgraph of those inputs in fp32
    (`input_subgraph_nodes`; the UNet's timestep embedding). The path form runs shape inference with
    `infer_shapes_path` (works over 2 GB) and resolves external data relative to the file. `fp32_prefixes` keeps
    the nodes named under those module paths in fp32 (`FP16_FALLBACKS`), `fp32_nodes` the nodes named (those
    `overflow_nodes` finds).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    blocked_ops = fp16_op_block_list()
    blocked_nodes = output_node_names(fp32_path) if output_nodes_fp32 else []
    if fp32_inputs:
        blocked_nodes += input_subgraph_nodes(fp32_path, fp32_inputs)
    if fp32_prefixes:
        blocked_nodes += nodes_with_prefix(fp32_path, fp32_prefixes)
    blocked_nodes += list(fp32_nodes)
    model = convert_float_to_float16(
        str(fp32_path),
        keep_io_types=True,
        op_block_list=blocked_ops,
        node_block_list=blocked_nodes or None,
    )
    drop_fp16_round_trips(model, set(blocked_ops), set(blocked_nodes))
    # The tool appends its input/output Casts at the end of the node list; ORT does not mind, but the ONNX
    # checker (and TensorRT's parser) require topological order.
    OnnxModel.graph_topological_sort(model.graph, is_deterministic=True)
    return model
