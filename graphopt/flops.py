"""Multiply-accumulate work of the dense layers, from inferred shapes (per inference, batch 1).

Counts Conv, ConvTranspose, Gemm and MatMul (2 FLOPs per multiply-accumulate): the layers whose
cost pad-channels and merge-convs change. A symbolic dimension (batch, sequence) counts as 1.
Layers whose ranks are not known count 0 and are listed, so a FLOP figure never silently claims
more precision than it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx


@dataclass
class FlopCount:
    total: int = 0
    unknown: list[str] = field(default_factory=list)  # nodes whose shapes were not static


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    shapes: dict[str, tuple[int, ...] | None] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def count_flops(model: onnx.ModelProto) -> FlopCount:
    """FLOPs of the model's dense layers; `model` must carry inferred value_info."""
    shapes = _shapes(model)
    count = FlopCount()
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        ins = [shapes.get(name) for name in node.input[:2]]
        out = shapes.get(node.output[0])
        if any(s is None for s in ins) or out is None:
            count.unknown.append(node.name)
            continue
        count.total += _node_flops(node, ins[0], ins[1], out)
    return count


def _node_flops(node: onnx.NodeProto, x: tuple[int, ...], w: tuple[int, ...], out: tuple[int, ...]) -> int:
    if node.op_type == "Conv":
        # every output element reads Cin/group * kernel inputs
        return 2 * math.prod(out) * math.prod(w[1:])
    if node.op_type == "ConvTranspose":
        return 2 * math.prod(x) * math.prod(w[1:])
    # Gemm / MatMul: each output element is a dot product over the reduction dimension.
    trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
    k = x[-2] if (node.op_type == "Gemm" and trans_a) else x[-1]
    return 2 * math.prod(out) * k
