"""Alignment: Conv and Gemm/MatMul layers whose channel counts Tensor Core kernels handle badly.

Tensor Core convolution and GEMM kernels read channels in fixed-width vectors. The rules, and
where each comes from:

- fp16, multiple of 8 (GO-ALIGN-001): TensorRT's engine lint (trex `lint.py`, alignment_lint)
  checks input and output channels of FP16 convolutions against 8.
- int8, multiple of 16 (GO-ALIGN-002): the same engine lint's rule for INT8.
- int8, multiple of 32 (GO-ALIGN-003): the rule the course teaches, after TensorRT's INT8
  vectorized format kCHW32. Both INT8 rules are reported, each under its own code.

Each finding gives the layer's share of the model's FLOPs and what padding it with
pad-channels would add. Measured on an H100 (shared/evidence/h100-conv-probe.md), padding
pays where a count is not a multiple of 8 and gains nothing beyond that, so layers carrying
under SMALL_LAYER_SHARE of the FLOPs are reported as info, not warnings.

Judged: Conv (C_in = weight dim 1 x group, C_out = weight dim 0) and Gemm/MatMul with a 2-D
constant weight (K and N). A MatMul of two activations (attention) is left alone: its sizes
are sequence lengths, which no pass changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt.graphs import nodes_with_op, static_shape
from graphopt.lint.context import LintContext, int_attr, producer, resolved_constant
from graphopt.lint.findings import Finding, Kind
from graphopt.lint.fusion import is_fc_head
from graphopt.lint.merging import reason_merge_convs_declines, sibling_groups

TREX_LINT = "https://github.com/NVIDIA/TensorRT/blob/main/tools/experimental/trt-engine-explorer/trex/lint.py"
TENSOR_FORMATS = "https://docs.nvidia.com/deeplearning/tensorrt/latest/reference/data-format-desc.html"
SMALL_LAYER_SHARE = 0.001
PAD_CHANNELS_MAX_OVERHEAD = 0.5  # pad-channels' default: it declines layers padding would grow more
_CHANNEL_WALK = 16  # channel-wise ops walked back to find the Conv that produced a layer's input
# Ops that pass channels through unchanged: a Conv's padded output channels reach the next layer.
CHANNEL_PRESERVING = frozenset({
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Mul", "Add", "Sub", "Div",
    "BatchNormalization", "MaxPool", "AveragePool", "Identity", "Dropout", "QuantizeLinear", "DequantizeLinear",
})


@dataclass(frozen=True)
class Rule:
    kind: Kind
    align: int
    name: str

    @property
    def fix_spec(self) -> str:
        return "pad-channels" if self.align == 8 else f"pad-channels(align={self.align})"


def _kind(code: str, name: str, why: str, reference: str) -> Kind:
    return Kind(code, name, "alignment", "warning", why, reference)


FP16_8 = Rule(_kind(
    "GO-ALIGN-001", "channels-not-multiple-of-8",
    "TensorRT's FP16 Tensor Core kernels read channels in vectors of 8, so a count that is not a "
    "multiple of 8 falls back to slower kernels or pays for reformatting and padding at run time.",
    TREX_LINT), 8, "fp16: multiple of 8 (TensorRT engine lint)")
INT8_16 = Rule(_kind(
    "GO-ALIGN-002", "channels-not-multiple-of-16",
    "TensorRT's INT8 Tensor Core kernels want channels in multiples of 16 (NVIDIA's engine lint "
    "rule); other counts fall back to slower kernels or padded reformats.",
    TREX_LINT), 16, "int8: multiple of 16 (TensorRT engine lint)")
INT8_32 = Rule(_kind(
    "GO-ALIGN-003", "channels-not-multiple-of-32",
    "TensorRT's fastest INT8 convolutions use the 32-channel vectorized format kCHW32, so a count "
    "that is not a multiple of 32 is padded at run time or takes a slower kernel (the course's rule).",
    TENSOR_FORMATS), 32, "int8: multiple of 32 (course, kCHW32)")
RULES = {"fp16": (FP16_8,), "int8": (INT8_16, INT8_32)}


@dataclass(frozen=True)
class Layer:
    node: gs.Node
    c_in: int  # input channels (K of a GEMM)
    c_out: int  # output channels (N of a GEMM)
    group: int = 1


def check(ctx: LintContext) -> list[Finding]:
    layers, unknown = dense_layers(ctx.graph)
    if unknown:
        ctx.notes.append(f"alignment: {len(unknown)} layers have channel counts that are not known statically: {', '.join(unknown[:5])}")
    # Siblings merge-convs will merge: pad-channels then aligns their merged total.
    siblings = {conv.name: group for group in sibling_groups(ctx.graph).values()
                if reason_merge_convs_declines(group) is None for conv in group}
    findings = []
    for rule in RULES[ctx.precision]:
        found = [f for layer in layers if (f := _judge(ctx, layer, rule, siblings.get(layer.node.name))) is not None]
        if found:
            share = sum(f.flops_share or 0.0 for f in found)
            fixable = [f for f in found if f.fix_pass]
            extra = sum(f.extra_flops_share or 0.0 for f in fixable)
            ctx.notes.append(f"alignment ({rule.name}): {len(found)} layers with {share:.1%} of the FLOPs; "
                             f"{len(fixable)} fixable, adding {extra:.2%} FLOPs")
        findings += found
    return findings


def dense_layers(graph: gs.Graph) -> tuple[list[Layer], list[str]]:
    """The Conv and constant-weight Gemm/MatMul layers, and the names of those not judged."""
    layers, unknown = [], []
    for node in nodes_with_op(graph, "Conv", "Gemm", "MatMul"):
        layer = _layer(node)
        if layer is not None:
            layers.append(layer)
        elif node.op == "Conv" or resolved_constant(node.inputs[1]) is not None:
            unknown.append(node.name)
    return layers, unknown


def _layer(node: gs.Node) -> Layer | None:
    weight = static_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.op == "Conv":
        if weight is None or len(weight) < 3:
            return None
        group = int_attr(node, "group", 1)
        return Layer(node, weight[1] * group, weight[0], group)
    if weight is None or len(weight) != 2 or resolved_constant(node.inputs[1]) is None:
        return None
    if node.op == "Gemm" and int_attr(node, "transB", 0):
        return Layer(node, weight[1], weight[0])
    return Layer(node, weight[0], weight[1])


def _judge(ctx: LintContext, layer: Layer, rule: Rule, siblings: list[gs.Node] | None) -> Finding | None:
    align = rule.align
    bad_in, bad_out = layer.c_in % align != 0, layer.c_out % align != 0
    if not (bad_in or bad_out):
        return None
    node = layer.node
    # Input channels get padded when the Conv producing them is (depthwise convs are carried along).
    padded_in = bad_in and _input_padded(node, align)
    parts = []
    if bad_in:
        parts.append(_channels(layer.c_in, "input") + ("" if padded_in else f" ({_input_origin(node)})"))
    if bad_out:
        parts.append(_channels(layer.c_out, "output"))
    detail = f"{node.op} {node.name!r} has {' and '.join(parts)}, not a multiple of {align}"
    fix, extra, why_not = _fix(ctx, layer, rule, siblings, padded_in, bad_out)
    if why_not:
        detail += f"; {why_not}"
    share = ctx.share([node])
    severity = "info" if share is None or share < SMALL_LAYER_SHARE else "warning"
    return rule.kind.at([node.name], detail, fix_pass=fix, severity=severity, flops_share=share, extra_flops_share=extra, rule=rule.name)


def _channels(count: int, side: str) -> str:
    return f"{count} {side} channel{'' if count == 1 else 's'}"


def _fix(ctx: LintContext, layer: Layer, rule: Rule, siblings: list[gs.Node] | None, padded_in: bool,
         bad_out: bool) -> tuple[str | None, float | None, str | None]:
    """The pipeline spec that aligns the layer, what it adds to the FLOPs, and why there is none."""
    align, node = rule.align, layer.node
    if node.op != "Conv" and not (bad_out and is_fc_head(node)):
        return None, None, None  # pad-channels pads Convs; fc-to-conv makes a classifier head one
    prefix = "" if node.op == "Conv" else "fc-to-conv,"
    if bad_out and layer.group != 1:
        return (rule.fix_spec, None, None) if padded_in else (None, None, "pad-channels does not pad grouped convs")
    if bad_out and siblings:
        # pad-channels aligns a merged Conv's channel total (merge-convs runs first in `all`);
        # the cost is the group's, shared among its unaligned members.
        widths = [int(c.inputs[1].shape[0]) for c in siblings]
        cost = _cost(ctx, siblings, [sum(widths)], align)
        unaligned = sum(w % align != 0 for w in widths)
        return f"merge-convs,{rule.fix_spec}", None if cost is None else cost / unaligned, None
    counts = ([layer.c_out] if bad_out else []) + ([layer.c_in] if padded_in else [])
    if not counts:
        return None, None, None
    overhead = _overhead(counts, align)
    if bad_out and overhead > PAD_CHANNELS_MAX_OVERHEAD:
        return None, None, f"padding adds {overhead:.0%} to the layer, over pad-channels' max_overhead {PAD_CHANNELS_MAX_OVERHEAD:g}"
    return prefix + rule.fix_spec, _cost(ctx, [node], counts, align), None


def _overhead(counts: list[int], align: int) -> float:
    """Extra FLOPs of a layer whose channel counts (each a factor of its FLOPs) are padded."""
    return math.prod(math.ceil(c / align) * align / c for c in counts) - 1.0


def _cost(ctx: LintContext, layers: list[gs.Node], counts: list[int], align: int) -> float | None:
    """What padding `counts` adds to the FLOPs of `layers`, as a share of the model's FLOPs."""
    flops = sum(ctx.flops_of(n) for n in layers)
    if ctx.total_flops <= 0 or flops == 0:
        return None
    return flops * _overhead(counts, align) / ctx.total_flops


def _input_padded(node: gs.Node, align: int) -> bool:
    """Whether pad-channels pads the Conv that produces this layer's input channels.

    It does for a plain Conv that padding grows by at most its max_overhead.
    """
    source = _input_conv(node)
    if source is None or int_attr(source, "group", 1) != 1:
        return False
    weight = static_shape(source.inputs[1])
    return weight is not None and _overhead([weight[0]], align) <= PAD_CHANNELS_MAX_OVERHEAD


def _input_conv(node: gs.Node) -> gs.Node | None:
    """The Conv whose output channels this layer reads, through channel-wise ops."""
    tensor = node.inputs[0]
    for _ in range(_CHANNEL_WALK):
        source = producer(tensor)
        if source is None or source.op == "Conv":
            return source
        if source.op not in CHANNEL_PRESERVING:
            return None
        tensor = source.inputs[0]
    return None


def _input_origin(node: gs.Node) -> str:
    source = _input_conv(node)
    if source is not None:
        return f"from Conv {source.name!r}, which pad-channels does not pad"
    source = producer(node.inputs[0])
    origin = f"graph input {node.inputs[0].name!r}" if source is None else f"{source.op} {source.name!r}"
    return f"from {origin}, which pad-channels leaves alone"
