"""Alignment: Conv and Gemm/MatMul layers whose channel counts Tensor Core kernels handle badly.

Tensor Core convolution and GEMM kernels read channels in fixed-width vectors, whose width
depends on the precision the layer runs in. Each layer is judged by its own precision, read from
the graph by graphopt.precision exactly as pad-channels reads it (Q/DQ on input and weight ->
int8 or fp8, float16 tensors -> fp16, float32 -> the target `precision`), and its finding says
which precision and how it was decided. The multiples, and where each comes from:

- 8 (GO-ALIGN-001), fp16/bf16: TensorRT's engine lint (trex `lint.py`, alignment_lint) checks
  input and output channels of FP16 convolutions against 8 (FP16's kHWC8 format).
- 16 (GO-ALIGN-002), fp8, and int8 with `int8_align=16`: the same engine lint's rule for INT8.
- 32 (GO-ALIGN-003), int8 by default: TensorRT's INT8 vectorized format kCHW32.

Each finding gives the layer's share of the model's FLOPs and what padding its unaligned counts
would add. Measured on an H100 (shared/evidence/h100-conv-probe.md), padding pays where a count
is not a multiple of 8 and gains nothing beyond that, so layers carrying under
SMALL_LAYER_SHARE of the FLOPs are reported as info, not warnings. Whether a pass aligns the
layer is not decided here: lint's forecast asks the passes (forecast.py), running pad-channels
with lint's own target precision and int8 alignment. The hints below only explain a layer the
forecast finds left unaligned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt.graphs import nodes_with_op, static_shape
from graphopt.lint.context import LintContext, int_attr, pass_default, producer, resolved_constant, view_source, view_target
from graphopt.lint.findings import Finding, Kind

TREX_LINT = "https://github.com/NVIDIA/TensorRT/blob/main/tools/experimental/trt-engine-explorer/trex/lint.py"
TENSOR_FORMATS = "https://docs.nvidia.com/deeplearning/tensorrt/latest/reference/data-format-desc.html"
SMALL_LAYER_SHARE = 0.001
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


def _kind(code: str, name: str, why: str, reference: str) -> Kind:
    return Kind(code, name, "alignment", "warning", why, reference)


ALIGN_8 = Rule(_kind(
    "GO-ALIGN-001", "channels-not-multiple-of-8",
    "TensorRT's FP16 Tensor Core kernels read channels in vectors of 8, so a count that is not a "
    "multiple of 8 falls back to slower kernels or pays for reformatting and padding at run time.",
    TREX_LINT), 8, "multiple of 8 (fp16/bf16: TensorRT engine lint, kHWC8)")
ALIGN_16 = Rule(_kind(
    "GO-ALIGN-002", "channels-not-multiple-of-16",
    "TensorRT's INT8 Tensor Core kernels want channels in multiples of 16 (NVIDIA's engine lint "
    "rule), as graphopt takes FP8's to be; other counts fall back to slower kernels or padded reformats.",
    TREX_LINT), 16, "multiple of 16 (int8 with int8-align=16: TensorRT engine lint; fp8)")
ALIGN_32 = Rule(_kind(
    "GO-ALIGN-003", "channels-not-multiple-of-32",
    "TensorRT's fastest INT8 convolutions use the 32-channel vectorized format kCHW32, so a count "
    "that is not a multiple of 32 is padded at run time or takes a slower kernel.",
    TENSOR_FORMATS), 32, "multiple of 32 (int8: kCHW32)")
RULES = {rule.align: rule for rule in (ALIGN_8, ALIGN_16, ALIGN_32)}  # by a layer's alignment


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
    findings = [f for layer in layers if (f := _judge(ctx, layer, RULES[ctx.alignment_of(layer.node)])) is not None]
    for rule in RULES.values():
        found = [f for f in findings if f.rule == rule.name]
        if found:
            share = sum(f.flops_share or 0.0 for f in found)
            ctx.notes.append(f"alignment ({rule.name}): {len(found)} layers with {share:.1%} of the FLOPs")
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


def _judge(ctx: LintContext, layer: Layer, rule: Rule) -> Finding | None:
    align = rule.align
    bad_in, bad_out = layer.c_in % align != 0, layer.c_out % align != 0
    if not (bad_in or bad_out):
        return None
    node = layer.node
    precision = ctx.precision_of(node)
    parts = ([_channels(layer.c_in, "input")] if bad_in else []) + ([_channels(layer.c_out, "output")] if bad_out else [])
    detail = (f"{node.op} {node.name!r} runs {precision.precision} ({precision.decided_by}) and has "
              f"{' and '.join(parts)}, not a multiple of {align}")
    share = ctx.share([node])
    severity = "info" if share is None or share < SMALL_LAYER_SHARE else "warning"
    counts = ([layer.c_in] if bad_in else []) + ([layer.c_out] if bad_out else [])
    return rule.kind.at(
        [node.name], detail, severity=severity, flops_share=share, extra_flops_share=_cost(ctx, [node], counts, align),
        rule=rule.name, subject=(view_source(node.inputs[0]).name, view_target(node.outputs[0]).name),
        likeness=f"{layer.c_in} in, {layer.c_out} out", hint=_hint(ctx, layer, align, bad_in, bad_out), precision=precision,
    )


def _channels(count: int, side: str) -> str:
    return f"{count} {side} channel{'' if count == 1 else 's'}"


def _hint(ctx: LintContext, layer: Layer, align: int, bad_in: bool, bad_out: bool) -> str | None:
    """Why pad-channels may leave the layer unaligned (shown only when the forecast says it does)."""
    node = layer.node
    if node.op != "Conv":
        return "pad-channels pads Conv layers, and fc-to-conv does not make this one a Conv"
    hints = []
    if bad_out and layer.group != 1:
        hints.append("pad-channels does not pad grouped convs")
    elif bad_out and (overhead := _overhead([layer.c_out], align)) > (limit := pad_default("max_overhead")):
        hints.append(f"padding adds {overhead:.0%} to the layer, over pad-channels' max-overhead {limit:g}")
    if bad_in and not _input_padded(ctx, node):
        hints.append(f"its input channels come from {_input_origin(node)}")
    return "; ".join(hints) or None


def pad_default(option: str) -> float:
    return pass_default("pad-channels", option)


def _overhead(counts: list[int], align: int) -> float:
    """Extra FLOPs of a layer whose channel counts (each a factor of its FLOPs) are padded."""
    return math.prod(math.ceil(c / align) * align / c for c in counts) - 1.0


def _cost(ctx: LintContext, layers: list[gs.Node], counts: list[int], align: int) -> float | None:
    """What padding `counts` adds to the FLOPs of `layers`, as a share of the model's FLOPs."""
    flops = sum(ctx.flops_of(n) for n in layers)
    if ctx.total_flops <= 0 or flops == 0:
        return None
    return flops * _overhead(counts, align) / ctx.total_flops


def _input_padded(ctx: LintContext, node: gs.Node) -> bool:
    """Whether pad-channels pads the Conv that produces this layer's input channels.

    It may for a plain Conv that padding to its own precision's multiple grows by at most its
    max_overhead.
    """
    source = _input_conv(node)
    if source is None or int_attr(source, "group", 1) != 1:
        return False
    weight = static_shape(source.inputs[1])
    return weight is not None and _overhead([weight[0]], ctx.alignment_of(source)) <= pad_default("max_overhead")


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
        return f"Conv {source.name!r}, which pad-channels does not pad"
    source = producer(node.inputs[0])
    if source is None:
        return f"graph input {node.inputs[0].name!r}, which pad-channels leaves alone by default"
    return f"{source.op} {source.name!r}, which pad-channels leaves alone"
