"""Quantization continuity: where INT8 regions are, and where they break.

TensorRT runs a layer in INT8 only when its inputs arrive quantized (Q/DQ models) or when it has
an INT8 implementation (calibrated float models). Every op without one ends the INT8 region
before it and starts a new one after it, with a reformat at each edge, and the dense layers on
either side lose INT8 input or output there.

Which dense layers run INT8 is each layer's own precision, read from the graph by
graphopt.precision as pad-channels reads it: Q/DQ on input and weight, or a float32 layer when
the target precision is int8 (a model to be calibrated). Nothing is judged when no layer runs INT8.

Ops are judged in three classes:
- INT8-capable: dense layers (Conv, Gemm, MatMul), pooling, Relu/Clip, residual Add, Concat.
- transparent: layout ops, Q/DQ, and elementwise ops with a constant operand (scales).
- float-only: the rest (Sigmoid, Softmax, LayerNormalization, Erf, a Mul or Div of two
  activations, ...), except an activation a dense layer applies in its own epilogue (the sole
  consumer of its output, or a SiLU), which TensorRT fuses into the layer.

A break is a group of float-only ops connected through transparent ops that has dense layers
both upstream and downstream (in the middle of the network, not in a pre- or post-processing
tail). A dense layer that does not run INT8 between INT8 ones is a break as well, and for Q/DQ
models the INT8 regions themselves are listed: INT8 dense layers joined by paths that cross no
float-only op. A region's and a float layer's findings name the precision and how it was decided.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_graphsurgeon as gs

from graphopt.lint.context import (
    QDQ_OPS, LintContext, components, data_inputs, epilogue_activation, in_graph_order, is_activation,
    is_weighted, nearest, output_names, reachability, resolved_constant,
)
from graphopt.lint.findings import Finding, Kind

QDQ_PLACEMENT = "https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html"

INT8_REGION = Kind(
    "GO-QUANT-001", "int8-region", "quantization", "info",
    "Layers in one INT8 region hand INT8 tensors to each other without reformatting.",
    QDQ_PLACEMENT,
)
FLOAT_DENSE_LAYER = Kind(
    "GO-QUANT-002", "dense-layer-not-quantized", "quantization", "warning",
    "This dense layer does not run in INT8 (no Q/DQ on its input and weight), so TensorRT runs it in "
    "floating point between INT8 layers, with a reformat on each side.",
    QDQ_PLACEMENT,
)
FLOAT_ONLY_OPS = Kind(
    "GO-QUANT-003", "float-op-breaks-int8", "quantization", "warning",
    "TensorRT has no INT8 implementation for these ops, so the INT8 region ends before them and "
    "restarts after them, with a reformat at each edge.",
    QDQ_PLACEMENT,
)

INT8_CAPABLE = frozenset({
    "Relu", "Clip", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    "Add", "Sub", "Concat", "BatchNormalization",
})
LAYOUT_OPS = frozenset({
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split", "Gather",
    "Pad", "Resize", "Dropout", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", *QDQ_OPS,
})
SCALE_OPS = frozenset({"Mul", "Div", "Add", "Sub"})
AROUND_HOPS = 3  # how far from a break its neighbouring dense layers are looked for


def check(ctx: LintContext) -> list[Finding]:
    graph = ctx.graph
    anchors = [n for n in graph.nodes if is_weighted(n) and runs_int8(ctx, n)]
    if not anchors:
        return []
    epilogues = {n.name for layer in graph.nodes if is_weighted(layer) for n in epilogue_activation(layer)}
    upstream, downstream = reachability(graph, {n.name for n in anchors})
    in_middle = lambda nodes: any(n.name in upstream for n in nodes) and any(n.name in downstream for n in nodes)  # noqa: E731

    def is_float_only(node: gs.Node) -> bool:
        return node.name not in epilogues and _op_class(node) == "float-only"

    findings: list[Finding] = []
    if ctx.has_qdq:
        findings += _regions(ctx, anchors, joins=lambda n: n.name in epilogues or (
            not is_weighted(n) and _op_class(n) in ("transparent", "int8-capable")))
    for layer in graph.nodes:
        if is_weighted(layer) and not runs_int8(ctx, layer) and in_middle([layer]):
            precision = ctx.precision_of(layer)
            detail = f"{layer.op} {layer.name!r} runs {precision.precision} ({precision.decided_by}) between INT8 layers"
            subject = tuple(t.name for t in data_inputs(layer))
            findings.append(FLOAT_DENSE_LAYER.at([layer.name], detail, flops_share=ctx.share([layer]), subject=subject,
                                                 precision=precision))
    seeds = [n for n in graph.nodes if is_float_only(n)]
    for group in components(seeds, joins=lambda n: _op_class(n) == "transparent"):
        if not in_middle(group):
            continue
        # An epilogue activation that only feeds the group (the Sigmoid of an SE gate) is part of the break.
        names = {n.name for n in group}
        feeding = [p for n in group for t in n.inputs for p in t.inputs
                   if p.name in epilogues and all(c.name in names for o in p.outputs for c in o.outputs)]
        group = in_graph_order(graph, [*group, *feeding])
        around = [*nearest(group, is_weighted, forward=False, max_hops=AROUND_HOPS),
                  *nearest(group, is_weighted, forward=True, max_hops=AROUND_HOPS)]
        listed = ", ".join(f"{n.op} {n.name!r}" for n in group)
        share = ctx.share(around)
        detail = f"{listed} run in floating point between INT8 layers"
        if share is not None:
            layers = "dense layer" if len(around) == 1 else "dense layers"
            detail += f"; the {len(around)} {layers} next to them carry {share:.1%} of the FLOPs"
        findings.append(FLOAT_ONLY_OPS.at([n.name for n in group], detail, flops_share=share, subject=tuple(sorted(output_names(*group)))))
    return findings


def runs_int8(ctx: LintContext, layer: gs.Node) -> bool:
    return ctx.precision_of(layer).precision == "int8"


def _op_class(node: gs.Node) -> str:
    """int8-capable, transparent (precision-neutral), float-only, or off the data path."""
    if node.op == "Constant" or not any(is_activation(t) for t in node.outputs):
        return "off-path"  # constants and shape arithmetic on integer tensors
    if node.op in LAYOUT_OPS:
        return "transparent"
    if node.op in SCALE_OPS and any(resolved_constant(t) is not None for t in node.inputs):
        return "transparent"
    if is_weighted(node) or node.op in INT8_CAPABLE:
        return "int8-capable"
    return "float-only"


def _regions(ctx: LintContext, quantized: list[gs.Node], joins: Callable[[gs.Node], bool]) -> list[Finding]:
    """INT8 regions of a Q/DQ model: quantized dense layers joined through ops that `joins`."""
    findings = []
    for region in components(quantized, joins=joins):
        region = in_graph_order(ctx.graph, region)
        names = [n.name for n in region]
        layers = "dense layer" if len(names) == 1 else "dense layers"
        # Its layers run int8 for one reason or several: the first layer's is the region's, and any other is said.
        reasons = list(dict.fromkeys(ctx.precision_of(n).decided_by for n in region))
        detail = f"INT8 region of {len(names)} {layers} from {names[0]!r} to {names[-1]!r}, int8 ({'; '.join(reasons)})"
        # Likeness: a pass that rewrites a layer in place (pad-channels' Slice) renames its output, not the layer.
        findings.append(INT8_REGION.at(names, detail, flops_share=ctx.share(region), subject=tuple(sorted(output_names(*region))),
                                       likeness=" ".join(names), precision=ctx.precision_of(region[0])))
    return findings
