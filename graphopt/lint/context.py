"""The graph every lint check reads: shapes inferred, FLOPs per layer, and the walks they share.

Lint must judge any model the rest of graphopt accepts, raw exporter output included, so the
helpers here never assume a shape, a dtype or a constant is known: each returns None (or an
empty answer) when it is not, and the checks skip what they cannot judge. Weights that reach a
layer through Identity nodes (the TorchScript exporter's deduplication) count as constants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import flops, modelio
from graphopt.graphs import DEFAULT_DOMAINS, constant_value
from graphopt.precision import LayerPrecision, TargetPrecision, layer_precision
from graphopt.registry import get_pass

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
VIEW_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity")  # the same values in another shape
# ONNX activations the parser imports as one IActivationLayer (onnxOpImporters.cpp, activationHelper).
ACTIVATIONS = frozenset({
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Softsign", "Softplus",
    "HardSigmoid", "ThresholdedRelu", "ScaledTanh", "Gelu",
})
# Activations the parser builds from several layers (HardSwish = x * HardSigmoid(x), Mish) or
# from a ParametricReLU layer: they reach a Conv only through TensorRT's pointwise fusion.
COMPOSITE_ACTIVATIONS = frozenset({"HardSwish", "Mish", "PRelu"})
FLOAT_TYPES = frozenset({np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)})
_IDENTITY_HOPS = 16


@dataclass
class LintContext:
    graph: gs.Graph
    target: TargetPrecision  # what a float32 layer runs in (pad-channels' `precision` option)
    int8_align: int  # an int8 layer's channel multiple (pad-channels' `int8_align` option)
    layer_flops: dict[str, int]
    total_flops: int
    has_qdq: bool
    notes: list[str] = field(default_factory=list)
    precisions: dict[str, LayerPrecision] = field(default_factory=dict)  # of the layers asked about

    def precision_of(self, layer: gs.Node) -> LayerPrecision:
        """The precision `layer` (a dense layer) runs in, read from the graph as pad-channels reads it."""
        if layer.name not in self.precisions:
            self.precisions[layer.name] = layer_precision(layer, self.target)
        return self.precisions[layer.name]

    def alignment_of(self, layer: gs.Node) -> int:
        return self.precision_of(layer).alignment(self.int8_align)

    def share(self, nodes: Iterable[gs.Node]) -> float | None:
        """The nodes' part of the model's dense-layer FLOPs, or None when FLOPs are unknown."""
        if self.total_flops <= 0:
            return None
        return sum(self.layer_flops.get(name, 0) for name in {n.name for n in nodes}) / self.total_flops

    def flops_of(self, node: gs.Node) -> int:
        return self.layer_flops.get(node.name, 0)


def build_context(model: onnx.ModelProto, target: TargetPrecision, int8_align: int = 32) -> LintContext:
    """Infer shapes into `model` (lint_model's own copy, with named nodes) and index it.

    Types are inferred too: a layer's precision is read from its tensors' types.
    """
    _take_shapes(model, infer_shapes_lightly(model))
    per_layer = flops_by_node(infer_shapes_lightly(model, unit_dims=True))
    graph = gs.import_onnx(model)
    has_qdq = any(n.op in QDQ_OPS for n in graph.nodes)
    return LintContext(graph, target, int8_align, per_layer, sum(per_layer.values()), has_qdq)


def infer_shapes_lightly(model: onnx.ModelProto, unit_dims: bool = False) -> onnx.ModelProto:
    """Shapes inferred on a copy whose big weights are graph inputs of the same type and dims.

    Inference needs only the weights' types and dims; the values it propagates (Reshape targets,
    axes) are small and stay. So inference costs the same for a 100 MB model as for its graph.
    With `unit_dims`, dynamic input dims are 1 first: graphopt.flops counts an unknown dim as 1,
    and a token count that only inference over a static batch works out (ViT's Reshape to
    [batch * 197, 192]) would otherwise count as 1 too.
    """
    light = modelio.graph_only(model)
    if unit_dims:
        for tensor in light.graph.input:
            for dim in tensor.type.tensor_type.shape.dim:
                if not dim.HasField("dim_value"):
                    dim.dim_value = 1
    return modelio.infer_shapes(light)


def _take_shapes(model: onnx.ModelProto, inferred: onnx.ModelProto) -> None:
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    outputs = {t.name: t for t in inferred.graph.output}
    for output in model.graph.output:
        if output.name in outputs:
            output.CopyFrom(outputs[output.name])


def flops_by_node(model: onnx.ModelProto) -> dict[str, int]:
    """FLOPs of each dense layer whose shapes are known, with graphopt.flops' formulas."""
    shapes = flops._shapes(model)
    result: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        ins = [shapes.get(name) for name in node.input[:2]]
        out = shapes.get(node.output[0])
        if all(s is not None for s in ins) and out is not None:
            result[node.name] = flops._node_flops(node, ins[0], ins[1], out)
    return result


# -- tensors ------------------------------------------------------------------------------------


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def output_names(*nodes: gs.Node) -> tuple[str, ...]:
    """The nodes' output tensors: what a finding about them is about, however a pass renames them."""
    return tuple(t.name for node in nodes for t in node.outputs)


def view_source(tensor: gs.Tensor) -> gs.Tensor:
    """The tensor this one is a view of (through Flatten, Reshape, ...): what a layer really reads."""
    for _ in range(_IDENTITY_HOPS):
        node = producer(tensor)
        if node is None or node.op not in VIEW_OPS or not node.inputs:
            break
        tensor = node.inputs[0]
    return tensor


def view_target(tensor: gs.Tensor) -> gs.Tensor:
    """The last view of this tensor that alone reads it: what a layer's output becomes.

    fc-to-conv turns `Flatten -> Gemm -> y` into `Conv -> Flatten -> y`: seen through the views,
    both layers read the same map and write the same `y`.
    """
    for _ in range(_IDENTITY_HOPS):
        if len(tensor.outputs) != 1 or tensor.outputs[0].op not in VIEW_OPS:
            break
        tensor = tensor.outputs[0].outputs[0]
    return tensor


def resolved_constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The tensor's value if it is known before inference, looking through Identity nodes."""
    for _ in range(_IDENTITY_HOPS):
        value = constant_value(tensor)
        if value is not None:
            return value
        node = producer(tensor)
        if node is None or node.op != "Identity" or not node.inputs:
            return None
        tensor = node.inputs[0]
    return None


def is_weight(tensor: gs.Tensor) -> bool:
    """A constant, or a constant seen through DequantizeLinear (a Q/DQ model's weights)."""
    if resolved_constant(tensor) is not None:
        return True
    node = producer(tensor)
    return node is not None and node.op == "DequantizeLinear" and bool(node.inputs) and resolved_constant(node.inputs[0]) is not None


def is_float(tensor: gs.Tensor) -> bool:
    """Float data, or a tensor whose type was not inferred (judged as data, not as a shape)."""
    dtype = tensor.dtype
    if dtype is None:
        return True
    try:
        return np.dtype(dtype) in FLOAT_TYPES
    except TypeError:  # graphsurgeon keeps types numpy lacks (bfloat16, float8) as onnx enums
        return dtype in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN)


def data_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The inputs that carry activations: neither empty optional inputs nor weights."""
    return [t for t in node.inputs if t.name and not is_weight(t)]


def same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Known to be the same shape (symbolic dims compare by name)."""
    return a.shape is not None and b.shape is not None and list(a.shape) == list(b.shape)


def normalized_axes(axes: Iterable[int], rank: int) -> set[int]:
    return {a + rank if a < 0 else a for a in axes}


def int_attr(node: gs.Node, name: str, default: int) -> int:
    value = node.attrs.get(name, default)
    return int(value) if isinstance(value, (int, np.integer)) else default


# -- walks --------------------------------------------------------------------------------------


def is_weighted(node: gs.Node) -> bool:
    return node.op in WEIGHTED_OPS and node.domain in DEFAULT_DOMAINS


def silu_partner(node: gs.Node) -> gs.Node | None:
    """For a Sigmoid computing x * Sigmoid(x) (SiLU/swish): the Mul; else None."""
    if node.op != "Sigmoid" or not node.inputs or len(node.outputs[0].outputs) != 1:
        return None
    mul = node.outputs[0].outputs[0]
    if mul.op == "Mul" and {t.name for t in mul.inputs} == {node.inputs[0].name, node.outputs[0].name}:
        return mul
    return None


def epilogue_activation(layer: gs.Node) -> list[gs.Node]:
    """The activation a weighted layer's kernel can apply to its own output, if there is one.

    That is a sole consumer that is an activation, or the Sigmoid and Mul of a SiLU.
    """
    out = layer.outputs[0]
    consumers = list(out.outputs)
    if len(consumers) == 1 and consumers[0].op in ACTIVATIONS | COMPOSITE_ACTIVATIONS:
        return consumers
    if len(consumers) == 2:
        sigmoid = next((c for c in consumers if c.op == "Sigmoid" and c.inputs[0] is out), None)
        mul = silu_partner(sigmoid) if sigmoid is not None else None
        if mul is not None and any(c is mul for c in consumers):
            return [sigmoid, mul]
    return []


def reachability(graph: gs.Graph, anchors: set[str]) -> tuple[set[str], set[str]]:
    """Names of nodes with an anchor somewhere upstream, and with one somewhere downstream.

    ONNX graphs are stored in topological order (onnx.checker enforces it), so one forward and
    one backward sweep suffice. Nodes are keyed by name: graphsurgeon nodes are not hashable.
    """
    upstream: set[str] = set()
    for node in graph.nodes:
        if any(p.name in anchors or p.name in upstream for p in _neighbours(node.inputs, forward=False)):
            upstream.add(node.name)
    downstream: set[str] = set()
    for node in reversed(graph.nodes):
        if any(c.name in anchors or c.name in downstream for c in _neighbours(node.outputs, forward=True)):
            downstream.add(node.name)
    return upstream, downstream


def nearest(nodes: Iterable[gs.Node], is_target: Callable[[gs.Node], bool], forward: bool, max_hops: int) -> list[gs.Node]:
    """The target nodes met first walking data edges from `nodes`, at most `max_hops` nodes away."""
    found: dict[str, gs.Node] = {}
    frontier = list(nodes)
    seen = {n.name for n in frontier}
    for _ in range(max_hops):
        step = []
        for node in frontier:
            for nxt in _neighbours(node.outputs if forward else node.inputs, forward):
                if nxt.name in seen:
                    continue
                seen.add(nxt.name)
                if is_target(nxt):
                    found[nxt.name] = nxt
                else:
                    step.append(nxt)
        frontier = step
    return list(found.values())


def _neighbours(tensors: Iterable[gs.Tensor], forward: bool) -> Iterator[gs.Node]:
    """Nodes across data edges: activations (quantized ones too), not weights or shape arithmetic."""
    for tensor in tensors:
        if is_activation(tensor):
            yield from (tensor.outputs if forward else tensor.inputs)


def is_activation(tensor: gs.Tensor) -> bool:
    """A tensor computed at run time from the inputs: float, or quantized by QuantizeLinear."""
    source = producer(tensor)
    if isinstance(tensor, gs.Constant) or (source is not None and source.op == "Constant"):
        return False
    return is_float(tensor) or (source is not None and source.op == "QuantizeLinear")


def components(seeds: Iterable[gs.Node], joins: Callable[[gs.Node], bool]) -> list[list[gs.Node]]:
    """Groups of seed nodes connected to each other directly or through nodes that `joins`."""
    seeds = list(seeds)
    seed_names = {n.name for n in seeds}
    assigned: set[str] = set()
    groups = []
    for seed in seeds:
        if seed.name in assigned:
            continue
        group, frontier, seen = [], [seed], {seed.name}
        while frontier:
            node = frontier.pop()
            if node.name in seed_names:
                group.append(node)
                assigned.add(node.name)
            for nxt in [*_neighbours(node.outputs, True), *_neighbours(node.inputs, False)]:
                if nxt.name not in seen and (nxt.name in seed_names or joins(nxt)):
                    seen.add(nxt.name)
                    frontier.append(nxt)
        groups.append(group)
    return groups


def in_graph_order(graph: gs.Graph, nodes: Iterable[gs.Node]) -> list[gs.Node]:
    wanted = {n.name for n in nodes}
    return [n for n in graph.nodes if n.name in wanted]


def pass_default(pass_name: str, option: str) -> Any:
    """A registered pass's default for an option: the hints quote the pass, never a copy of it."""
    return getattr(get_pass(pass_name).Options(), option)
