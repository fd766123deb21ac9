"""Merging TensorRT will not do itself: sibling Convs that read the same tensor.

TensorRT merges sibling convolutions of identical shape on its own (the `A || B` layers in its
build log), but not siblings whose kernel sizes differ (NVIDIA/TensorRT#501: "When I change the
kernel size of one of the path, TensorRT will not merge them") and not siblings quantized with
Q/DQ (NVIDIA/TensorRT#1602: "Parallel Convolution won't merge in tensor merge step while using
QDQ method"). merge-convs merges both into one wider Conv. Groups of identical siblings in a
float model are left to TensorRT and not reported.

Siblings must be plain (group 1) Convs with constant weights, the same strides and dilations,
and outputs of the same spatial size, so that one Conv can compute them all. Which pass takes a
group (merge-convs; reparameterize, for branches summed by an Add) is the forecast's answer:
the passes decide, with their own rules.
"""

from __future__ import annotations

import math
from collections import defaultdict

import onnx_graphsurgeon as gs

from graphopt.graphs import nodes_with_op, static_shape
from graphopt.lint.context import LintContext, int_attr, is_weight, pass_default, producer
from graphopt.lint.findings import Finding, Kind

DIFFERENT_KERNELS = Kind(
    "GO-MERGE-001", "siblings-with-different-kernels", "merging", "warning",
    "TensorRT merges sibling Convs only when their kernels match, so these run as separate kernels "
    "that each read the shared input (NVIDIA/TensorRT#501).",
    "https://github.com/NVIDIA/TensorRT/issues/501",
)
QUANTIZED_SIBLINGS = Kind(
    "GO-MERGE-002", "quantized-siblings", "merging", "warning",
    "TensorRT does not merge sibling Convs quantized with Q/DQ, even with identical kernels, so these "
    "run as separate kernels that each read the shared input (NVIDIA/TensorRT#1602).",
    "https://github.com/NVIDIA/TensorRT/issues/1602",
)


def check(ctx: LintContext) -> list[Finding]:
    findings = []
    for source, convs in sibling_groups(ctx.graph).items():
        quantized = any(_reads_dequantized(c) for c in convs)
        if not quantized and len({_kernel(c) for c in convs}) == 1:
            continue  # identical siblings: TensorRT merges them itself
        shapes = ", ".join(f"{c.name!r} {'x'.join(map(str, _kernel(c)))}x{_out_channels(c)}" for c in convs)
        detail = f"{len(convs)} Convs read {source!r}: {shapes}"
        kind = QUANTIZED_SIBLINGS if quantized else DIFFERENT_KERNELS
        subject = (source, *sorted(c.outputs[0].name for c in convs))
        findings.append(kind.at([c.name for c in convs], detail, flops_share=ctx.share(convs), subject=subject, hint=_hint(convs)))
    return findings


def _hint(convs: list[gs.Node]) -> str | None:
    """Why merge-convs may leave the group alone (shown only when the forecast says it does)."""
    if any(_reads_dequantized(c) for c in convs):
        return ("merge-convs merges Q/DQ siblings only when their weights are quantized alike and one output "
                "quantization serves them all; else merge them in the float model before quantizing")
    if (growth := flop_growth(convs)) > (limit := pass_default("merge-convs", "max_flop_growth")):
        return f"zero-padding the kernels to one window grows their FLOPs {growth:.1f}x, over merge-convs' max-flop-growth {limit:g}"
    return None


def flop_growth(convs: list[gs.Node]) -> float:
    """FLOPs of the merged Conv over the siblings' own: every kernel grows to the common window."""
    window = [max(k) for k in zip(*(_kernel(c) for c in convs))]
    own = sum(_out_channels(c) * math.prod(_kernel(c)) for c in convs)
    return sum(_out_channels(c) for c in convs) * math.prod(window) / own


def sibling_groups(graph: gs.Graph) -> dict[str, list[gs.Node]]:
    """Mergeable Convs by the tensor they read (for Q/DQ models: the tensor before quantization)."""
    groups: dict[tuple, list[gs.Node]] = defaultdict(list)
    for conv in nodes_with_op(graph, "Conv"):
        if _reason_not_mergeable(conv) is None:
            groups[(_source(conv).name, _geometry(conv))].append(conv)
    return {source: convs for (source, _), convs in groups.items() if len(convs) > 1}


def _reason_not_mergeable(conv: gs.Node) -> str | None:
    if int_attr(conv, "group", 1) != 1:
        return "grouped"
    if len(conv.inputs) < 2 or not is_weight(conv.inputs[1]):
        return "weights computed at run time"
    if len(conv.inputs) > 2 and conv.inputs[2].name and not is_weight(conv.inputs[2]):
        return "bias computed at run time"
    if conv.outputs[0].shape is None or static_shape(conv.inputs[1]) is None:
        return "shapes unknown"
    return None


def _source(conv: gs.Node) -> gs.Tensor:
    """The float tensor a Conv reads; through DequantizeLinear and QuantizeLinear for Q/DQ models."""
    tensor = conv.inputs[0]
    dequantize = producer(tensor)
    if dequantize is not None and dequantize.op == "DequantizeLinear":
        quantize = producer(dequantize.inputs[0])
        return quantize.inputs[0] if quantize is not None and quantize.op == "QuantizeLinear" else dequantize.inputs[0]
    return tensor


def _reads_dequantized(conv: gs.Node) -> bool:
    source = producer(conv.inputs[0])
    return source is not None and source.op == "DequantizeLinear"


def _geometry(conv: gs.Node) -> tuple:
    """What siblings must share to be one Conv: strides, dilations and output size."""
    rank = len(conv.inputs[1].shape) - 2
    out = conv.outputs[0].shape
    return (
        tuple(conv.attrs.get("strides", [1] * rank)),
        tuple(conv.attrs.get("dilations", [1] * rank)),
        tuple(out[2:]),
    )


def _kernel(conv: gs.Node) -> tuple[int, ...]:
    return tuple(int(d) for d in conv.inputs[1].shape[2:])


def _out_channels(conv: gs.Node) -> int:
    return int(conv.inputs[1].shape[0])
