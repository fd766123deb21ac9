"""Fusion blockers: what stops TensorRT from running a layer and its neighbour as one kernel.

TensorRT fuses a Conv with the activation, residual Add or pooling that consumes its output
(TensorRT layer fusion catalog), and Q/DQ into the ops around them. Each finding here is a
pattern that defeats one of those fusions, or that a graphopt pass rewrites into a form
TensorRT runs better (which pass does is the forecast's answer, forecast.py):

1. A layout or type op (Reshape, Transpose, Cast, ...) between a Conv and its partner.
2. An activation the parser builds from several layers (HardSwish, Mish, PRelu, SiLU) after a
   dense layer (Conv, Gemm, MatMul).
3. A Pad before a Conv: foldable into the Conv (simplify does it) or not (reflect mode, ...).
4. A Q/DQ pair between a Conv and its activation or residual Add.
5. A ReduceMean/ReduceMax over H and W, which reduce-to-pool turns into pooling.
6. A classifier-head Gemm after a flattened feature map, which fc-to-conv turns into a Conv.
7. A Mul/Div by one or Add/Sub of zero, which remove-identity-scale deletes.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graphs import is_graph_output, nodes_with_op, static_shape
from graphopt.lint.context import (
    ACTIVATIONS, COMPOSITE_ACTIVATIONS, LintContext, epilogue_activation, int_attr, is_float, is_weighted, normalized_axes,
    output_names, producer, resolved_constant, same_shape,
)
from graphopt.lint.findings import Finding, Kind

FUSION_CATALOG = "https://docs.nvidia.com/deeplearning/tensorrt/latest/performance/fusion-catalog.html"
QDQ_PLACEMENT = "https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html"
PARSER_IMPORTERS = "https://github.com/onnx/onnx-tensorrt/blob/96e781103cfc4adf4a6bb557e94bac8e693f6f4c/onnxOpImporters.cpp"

SPLIT_FUSION = Kind(
    "GO-FUSE-001", "op-splits-conv-fusion", "fusion", "warning",
    "TensorRT fuses an activation, residual Add or pooling into a Conv only when it reads the Conv's "
    "output directly; the op in between makes the Conv write its whole output to memory and the "
    "partner run as a kernel of its own.",
    FUSION_CATALOG,
)
COMPOSITE_ACTIVATION = Kind(
    "GO-FUSE-002", "activation-not-fused", "fusion", "info",
    "The parser builds this activation from several layers (or a ParametricReLU layer), so it joins "
    "the layer before it only through TensorRT's pointwise fusion, which only some GPUs and precisions "
    "have; elsewhere it runs as a separate kernel (NVIDIA/TensorRT#2572).",
    "https://github.com/NVIDIA/TensorRT/issues/2572",
)
PAD_FOLDABLE = Kind(
    "GO-FUSE-003", "pad-foldable-into-conv", "fusion", "info",
    "The parser imports Pad as a Slice layer in fill mode that writes the padded tensor to memory "
    "before the Conv reads it; a zero pad belongs in the Conv's own pads, where it costs nothing.",
    PARSER_IMPORTERS,
)
PAD_NOT_FOLDABLE = Kind(
    "GO-FUSE-004", "pad-not-foldable", "fusion", "warning",
    "The parser imports Pad as a Slice layer that writes the padded tensor to memory before the "
    "Conv reads it, and a Conv's own padding is zeros only, so this pad stays a layer of its own.",
    PARSER_IMPORTERS,
)
QDQ_SPLITS = Kind(
    "GO-FUSE-005", "qdq-splits-conv", "fusion", "warning",
    "A Q/DQ pair on the edge between a Conv and its activation or residual Add makes TensorRT end the "
    "Conv's fused kernel at the quantization, so the activation or Add runs as a layer of its own.",
    QDQ_PLACEMENT,
)
REDUCE_AS_POOL = Kind(
    "GO-FUSE-006", "reduce-over-spatial-axes", "fusion", "info",
    "The parser imports a ReduceMean/ReduceMax as a Reduce layer; over some of the spatial axes "
    "reduce-to-pool makes it a Pooling layer, over all of them a global pool, which the parser "
    "imports as the same Reduce layer (a canonical form, not a speed-up).",
    PARSER_IMPORTERS,
)
FC_AS_CONV = Kind(
    "GO-FUSE-007", "fc-head-as-gemm", "fusion", "info",
    "The parser imports Gemm as a MatrixMultiply plus a separate bias ElementWise layer; as a 1x1 "
    "Conv the bias and the following activation fuse into the convolution kernel.",
    PARSER_IMPORTERS,
)
IDENTITY_SCALE = Kind(
    "GO-FUSE-008", "identity-scale", "fusion", "info",
    "An elementwise op that leaves its input unchanged is still a layer TensorRT must build, and it "
    "sits where it can keep the layers around it from fusing.",
)

FUSION_PARTNERS = ACTIVATIONS | COMPOSITE_ACTIVATIONS | {"Add", "Sum", "Max", "Min", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
LAYOUT_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Cast")
_MAX_LAYOUT_CHAIN = 3
_HEAD_DEPTH = 8  # layers of a classifier head walked back to find its Flatten
IDENTITY_ELEMENT = {"Mul": 1.0, "Div": 1.0, "Add": 0.0, "Sub": 0.0}


def check(ctx: LintContext) -> list[Finding]:
    graph = ctx.graph
    findings: list[Finding] = []
    for conv in nodes_with_op(graph, "Conv"):
        findings += _layout_op_between(graph, conv)
        findings += _qdq_after(ctx, conv)
    for layer in graph.nodes:
        if is_weighted(layer):
            findings += _composite_activation(layer)
    for pad in nodes_with_op(graph, "Pad"):
        findings += _pad_before_conv(pad)
    for reduce in nodes_with_op(graph, "ReduceMean", "ReduceMax"):
        findings += _reduce_over_spatial_axes(reduce)
    for fc in nodes_with_op(graph, "Gemm", "MatMul"):
        if is_fc_head(fc):
            findings.append(FC_AS_CONV.at([fc.name], f"{fc.op} {fc.name!r} reads a flattened feature map", subject=output_names(fc)))
    for op in nodes_with_op(graph, *IDENTITY_ELEMENT):
        findings += _identity_scale(op)
    return findings


# -- 1. layout op between a Conv and its partner --------------------------------------------------


def _layout_op_between(graph: gs.Graph, conv: gs.Node) -> list[Finding]:
    chain: list[gs.Node] = []
    tensor = conv.outputs[0]
    while len(tensor.outputs) == 1 and tensor.outputs[0].op in LAYOUT_OPS and len(chain) < _MAX_LAYOUT_CHAIN:
        if is_graph_output(graph, tensor):
            return []
        chain.append(tensor.outputs[0])
        tensor = chain[-1].outputs[0]
    partners = [c for c in tensor.outputs if c.op in FUSION_PARTNERS]
    if not chain or not partners or is_graph_output(graph, tensor):
        return []
    between = ", ".join(f"{n.op} {n.name!r}" for n in chain)
    detail = f"{between} sits between Conv {conv.name!r} and {partners[0].op} {partners[0].name!r}"
    if all(_is_no_op(n) for n in chain):
        detail += " and changes nothing"
    nodes = [conv.name, *(n.name for n in chain), partners[0].name]
    return [SPLIT_FUSION.at(nodes, detail, subject=(tensor.name, *output_names(partners[0])))]


def _is_no_op(node: gs.Node) -> bool:
    """What simplify removes: a layout op that keeps the shape, or a Cast to the same type."""
    x, y = node.inputs[0], node.outputs[0]
    if node.op == "Cast":
        return x.dtype is not None and x.dtype == y.dtype
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and list(perm) == sorted(perm)
    shape_in, shape_out = static_shape(x), static_shape(y)
    return shape_in is not None and shape_in == shape_out


# -- 2. activation built from several layers ------------------------------------------------------


def _composite_activation(layer: gs.Node) -> list[Finding]:
    """Also after a Gemm: fc-to-conv makes a classifier head's Gemm a Conv, and its HardSwish stays."""
    activation = epilogue_activation(layer)
    if len(activation) == 2:
        sigmoid, mul = activation
        detail = f"SiLU (Sigmoid {sigmoid.name!r} * Mul {mul.name!r}) after {layer.op} {layer.name!r}"
    elif len(activation) == 1 and activation[0].op in COMPOSITE_ACTIVATIONS:
        detail = f"{activation[0].op} {activation[0].name!r} after {layer.op} {layer.name!r}"
    else:
        return []
    # Likeness: fc-to-conv carries a head's activation into 4-D, where its output has a new name.
    return [COMPOSITE_ACTIVATION.at([layer.name, *(n.name for n in activation)], detail, subject=output_names(activation[-1]),
                                    likeness=" ".join(n.op for n in activation))]


# -- 3. Pad before a Conv -------------------------------------------------------------------------


def _pad_before_conv(pad: gs.Node) -> list[Finding]:
    convs = [c for c in pad.outputs[0].outputs if c.op == "Conv" and c.inputs[0] is pad.outputs[0]]
    if not convs:
        return []
    reason = _reason_pad_stays(pad)
    nodes = [pad.name, *(c.name for c in convs)]
    target = f"Pad {pad.name!r} before Conv {convs[0].name!r}"
    if reason is None:
        return [PAD_FOLDABLE.at(nodes, f"{target} pads with zeros", subject=output_names(pad))]
    return [PAD_NOT_FOLDABLE.at(nodes, f"{target} {reason}", subject=output_names(pad))]


def _reason_pad_stays(pad: gs.Node) -> str | None:
    """Why the pad cannot become the Conv's pads attribute, or None when it can."""
    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return f"uses mode={mode}"
    pads = _pads(pad)
    if pads is None:
        return "has pads computed at run time"
    value = _pad_value(pad)
    if value is None:
        return "pads with a value computed at run time"
    if value != 0:
        return f"pads with the value {value:g}, not zero"
    if any(p < 0 for p in pads.values()):
        return "has negative pads (it crops)"
    if any(pads.get(axis, 0) for axis in (0, 1)):
        return "pads the batch or channel axis"
    return None


def _pads(pad: gs.Node) -> dict[int, int] | None:
    """Pad amount per axis (begin and end summed by sign), or None when not constant."""
    if "pads" in pad.attrs:  # opset < 11
        values = np.asarray(pad.attrs["pads"])
    elif len(pad.inputs) > 1:
        values = resolved_constant(pad.inputs[1])
        if values is None:
            return None
    else:
        return None
    values = values.astype(np.int64).ravel()
    half = len(values) // 2
    axes = list(range(half))
    if len(pad.inputs) > 3 and pad.inputs[3].name:  # opset 18: pads apply to these axes only
        given = resolved_constant(pad.inputs[3])
        rank = len(pad.inputs[0].shape) if pad.inputs[0].shape is not None else None
        if given is None or rank is None:
            return None
        axes = sorted(normalized_axes(given.astype(np.int64).ravel().tolist(), rank))
    result: dict[int, int] = {}
    for axis, begin, end in zip(axes, values[:half], values[half:]):
        if begin < 0 or end < 0:
            result[axis] = min(int(begin), int(end))
        else:
            result[axis] = int(begin) + int(end)
    return result


def _pad_value(pad: gs.Node) -> float | None:
    if "value" in pad.attrs:  # opset < 11
        return float(pad.attrs["value"])
    if len(pad.inputs) > 2 and pad.inputs[2].name:
        value = resolved_constant(pad.inputs[2])
        return None if value is None or value.size != 1 else float(value.ravel()[0])
    return 0.0


# -- 4. Q/DQ between a Conv and its activation or residual Add ------------------------------------


def _qdq_after(ctx: LintContext, conv: gs.Node) -> list[Finding]:
    """The finding names the Conv's precision: an int8 Conv keeps int8 output only through the Q/DQ."""
    out = conv.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "QuantizeLinear":
        return []
    quantize = out.outputs[0]
    for dequantize in quantize.outputs[0].outputs:
        if dequantize.op != "DequantizeLinear":
            continue
        for partner in dequantize.outputs[0].outputs:
            if _is_conv_epilogue_partner(partner, dequantize.outputs[0]):
                precision = ctx.precision_of(conv)
                detail = (f"{quantize.name!r}/{dequantize.name!r} quantize the edge from Conv {conv.name!r}, which runs "
                          f"{precision.precision} ({precision.decided_by}), to {partner.op} {partner.name!r}")
                return [QDQ_SPLITS.at([conv.name, quantize.name, dequantize.name, partner.name], detail, subject=output_names(dequantize),
                                      precision=precision)]
    return []


def _is_conv_epilogue_partner(node: gs.Node, tensor: gs.Tensor) -> bool:
    if node.op in ACTIVATIONS | COMPOSITE_ACTIVATIONS:
        return True
    if node.op == "Add":  # a residual Add: the other operand is another activation
        others = [t for t in node.inputs if t is not tensor]
        return bool(others) and all(resolved_constant(t) is None for t in others)
    return False


# -- 5. Reduce over the spatial axes --------------------------------------------------------------


def _reduce_over_spatial_axes(reduce: gs.Node) -> list[Finding]:
    """What reduce-to-pool rewrites: a 3-D to 5-D [N, C, spatial...] tensor reduced over spatial axes only."""
    shape = reduce.inputs[0].shape
    axes = _reduce_axes(reduce)
    if shape is None or not 3 <= len(shape) <= 5 or not axes:
        return []
    axes = normalized_axes(axes, len(shape))
    if not axes <= set(range(2, len(shape))):
        return []
    scope = "every spatial axis" if len(axes) == len(shape) - 2 else f"spatial axes {sorted(axes)}"
    detail = f"{reduce.op} {reduce.name!r} reduces {scope} of a {len(shape)}-D tensor"
    return [REDUCE_AS_POOL.at([reduce.name], detail, subject=output_names(reduce))]


def _reduce_axes(reduce: gs.Node) -> list[int] | None:
    if "axes" in reduce.attrs:  # before opset 18
        return [int(a) for a in reduce.attrs["axes"]]
    if len(reduce.inputs) > 1 and reduce.inputs[1].name:
        axes = resolved_constant(reduce.inputs[1])
        return None if axes is None else axes.astype(np.int64).ravel().tolist()
    return None  # no axes: reduces everything, not a pooling


# -- 6. classifier-head Gemm ----------------------------------------------------------------------


def is_fc_head(fc: gs.Node) -> bool:
    """A Gemm (or MatMul with a 2-D constant weight) computing a classifier head of a CNN.

    Its input is a 4-D feature map flattened per sample, possibly through activations and
    earlier layers of the same head: what fc-to-conv rewrites into convolutions. A Reshape that
    folds tokens into the batch ([B, 197, 3, 64] -> [B * 197, 192], onnxsim's form of a
    transformer's linear) is not one: fc-to-conv leaves token-wise linears alone.
    """
    if not _is_dense_with_constant_weight(fc):
        return False
    tensor = fc.inputs[0]
    for _ in range(_HEAD_DEPTH):
        node = producer(tensor)
        if node is None:
            return False
        if node.op in ("Flatten", "Reshape"):
            return _flattens_a_map_per_sample(node)
        if not (node.op in ACTIVATIONS or node.op in ("Dropout", "Identity") or _is_dense_with_constant_weight(node)):
            return False
        tensor = node.inputs[0]
    return False


def _flattens_a_map_per_sample(node: gs.Node) -> bool:
    """A 4-D [B, C, H, W] map to [B, C*H*W]: the batch dim stays (same size, or same name)."""
    source, flat = node.inputs[0].shape, node.outputs[0].shape
    if source is None or flat is None or len(source) != 4 or len(flat) != 2:
        return False
    if node.op == "Flatten" and int_attr(node, "axis", 1) == 1:
        return True
    return source[0] == flat[0] and source[0] not in (None, "")


def _is_dense_with_constant_weight(node: gs.Node) -> bool:
    if node.op not in ("Gemm", "MatMul") or len(node.inputs) < 2:
        return False
    weight = resolved_constant(node.inputs[1])
    x = node.inputs[0].shape
    return weight is not None and weight.ndim == 2 and x is not None and len(x) == 2 and not int_attr(node, "transA", 0)


# -- 7. identity scale ----------------------------------------------------------------------------


def _identity_scale(node: gs.Node) -> list[Finding]:
    if len(node.inputs) != 2:
        return []
    identity = IDENTITY_ELEMENT[node.op]
    # Div and Sub are the identity only with the constant on the right.
    candidates = [(0, 1), (1, 0)] if node.op in ("Mul", "Add") else [(0, 1)]
    for data_index, const_index in candidates:
        value = resolved_constant(node.inputs[const_index])
        data = node.inputs[data_index]
        if value is None or value.size == 0 or resolved_constant(data) is not None or not is_float(data):
            continue
        if not np.all(value == identity):
            continue
        if value.size != 1 and not same_shape(data, node.outputs[0]):
            continue  # the constant may broadcast the data to a bigger shape: not a no-op
        operand = "one" if identity == 1.0 else "zero"
        return [IDENTITY_SCALE.at([node.name], f"{node.op} {node.name!r} by a constant {operand}", subject=output_names(node))]
    return []
