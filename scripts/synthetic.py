#!/usr/bin/env python
"""Synthetic CNN-like ONNX graphs of a chosen node count, for measuring how optimizers scale.

    python scripts/synthetic.py 5000 -o bench-cache/synthetic-5k.onnx

The graph is a chain of residual blocks (x + branch(x)) of the kinds real exporters emit and
graphopt's passes target:

  residual   Conv3x3 -> Relu -> Conv3x3 -> Add(x) -> Clip(0, 6)
  se         Conv1x1, gated by ReduceMean(H, W) -> Conv1x1 -> Relu -> Conv1x1 -> Sigmoid -> Mul,
             -> Add(x)                                                   (SE-ResNet squeeze-excite)
  identity   Mul by a constant of ones, then Add of zeros                (exporter leftovers)
  siblings   two Conv1x1 reading x -> Concat -> Conv1x1 -> Add(x) -> Relu (merge candidates)
  routed     Identity(weight) -> Conv3x3 -> Relu -> Conv1x1 -> Add(x)   (TorchScript weight dedup)
  bn         Conv3x3 -> BatchNormalization -> Add(x) -> Relu             (unfolded BN)
  odd        Conv1x1 to c + 3 channels -> Relu -> Conv1x1 back -> Add(x) (pad candidates)
  aux head   ReduceMean -> runtime-computed Reshape (Shape/Gather/Unsqueeze/Concat) -> Gemm ->
             Relu -> Gemm, summed into an auxiliary output               (fc-to-conv, folding)

and ends in a classifier head of the same form. Channel counts and the spatial size are small
(8 channels, 8x8 by default), so ONNX Runtime runs even the 50k-node graph in well under a
second and the benchmark measures the tools, not the convolutions. Weights are seeded. Every
branch ends in a linear op scaled by alpha = 1/sqrt(blocks) (Fixup-style), so activations grow
by at most about e over the whole chain and the outputs still depend on the input at 50k nodes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# Bump when the generated graphs change, so benchmark caches keyed on it are rebuilt.
GENERATOR_VERSION = 1

# One aux head per this many blocks (plus the final head); the rest cycle through BLOCK_CYCLE.
AUX_HEAD_EVERY = 40
BLOCK_CYCLE = ("residual", "se", "residual", "siblings", "identity", "routed", "residual", "bn", "odd")
CLASSES = 10


@dataclass(frozen=True)
class SyntheticSpec:
    nodes: int  # target node count; the graph has this many nodes, give or take one block
    channels: int = 8
    size: int = 8  # spatial height and width of the input
    seed: int = 0

    @property
    def name(self) -> str:
        return f"synthetic-{format_count(self.nodes)}"


def format_count(nodes: int) -> str:
    """5000 -> '5k', 200 -> '200' (the names `--models` accepts)."""
    return f"{nodes // 1000}k" if nodes % 1000 == 0 and nodes >= 1000 else str(nodes)


def parse_count(text: str) -> int:
    """'5k' -> 5000, '200' -> 200."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1000) if text.endswith("k") else int(text)


@dataclass
class _GraphBuilder:
    """Accumulates nodes and initializers; every name it hands out is unique."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _counter: int = 0

    def fresh(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}_{self._counter}"

    def const(self, stem: str, values: np.ndarray) -> str:
        name = self.fresh(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(values), name))  # 0-d stays 0-d
        return name

    def op(self, op_type: str, inputs: list[str], n_outputs: int = 1, **attrs) -> str:
        """Append a node and return its (first) output's name."""
        name = self.fresh(op_type.lower())
        outputs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def conv_weights(self, c_out: int, c_in: int, k: int, gain: float) -> tuple[np.ndarray, np.ndarray]:
        fan_in = c_in * k * k
        weight = self.rng.standard_normal((c_out, c_in, k, k), dtype=np.float32) * np.float32(gain * np.sqrt(2.0 / fan_in))
        bias = self.rng.standard_normal(c_out, dtype=np.float32) * np.float32(0.05 * gain)
        return weight, bias

    def conv(self, x: str, c_out: int, c_in: int, k: int, gain: float = 1.0, weight_name: str | None = None) -> str:
        weight, bias = self.conv_weights(c_out, c_in, k, gain)
        w = weight_name or self.const("w", weight)
        return self.op("Conv", [x, w, self.const("b", bias)], kernel_shape=[k, k], pads=[k // 2] * 4)


def _residual(g: _GraphBuilder, x: str, c: int, alpha: float) -> str:
    y = g.op("Relu", [g.conv(x, c, c, 3)])
    y = g.conv(y, c, c, 3, gain=alpha)
    return g.op("Clip", [g.op("Add", [x, y]), g.const("lo", np.float32(0)), g.const("hi", np.float32(6))])


def _squeeze_excite(g: _GraphBuilder, x: str, c: int, alpha: float) -> str:
    """SE-ResNet style: the gate scales the residual branch (a gate of ~0.5, hence 2 * alpha)."""
    y = g.conv(x, c, c, 1, gain=2 * alpha)
    s = g.op("ReduceMean", [y], axes=[2, 3], keepdims=1)
    s = g.op("Relu", [g.conv(s, max(c // 2, 1), c, 1)])
    gate = g.op("Sigmoid", [g.conv(s, c, max(c // 2, 1), 1)])
    return g.op("Add", [x, g.op("Mul", [y, gate])])


def _identity_scale(g: _GraphBuilder, x: str, c: int, alpha: float) -> str:
    y = g.op("Mul", [x, g.const("one", np.ones((1, c, 1, 1), np.float32))])
    return g.op("Add", [y, g.const("zero", np.zeros((1,), np.float32))])


def _siblings(g: _GraphBuilder, x: str, c: int, alpha: float) -> str:
    a = g.conv(x, c, c, 1)
    b = g.conv(x, c, c, 1)
    joined = g.op("Concat", [a, b], axis=1)
    return g.op("Relu", [g.op("Add", [x, g.conv(joined, c, 2 * c, 1, gain=alpha)])])


def _routed_weight(g: _GraphBuilder, x: str, c: int, alpha: float) -> str:
    weight, _ = g.conv_weights(c, c, 3, 1.0)
    routed = g.op("Identity", [g.const("w", weight)])
    y = g.op("Relu", [g.conv(x, c, c, 3, weight_name=routed)])
    return g.op("Add", [x, g.conv(y, c, c, 1, gain=alpha)])


def _batchnorm(g: _GraphBuilder, x: str, c: int, alpha: float) -> str:
    y = g.conv(x, c, c, 3)
    scale = (alpha * g.rng.uniform(0.8, 1.2, c)).astype(np.float32)
    bias = (alpha * g.rng.standard_normal(c) * 0.05).astype(np.float32)
    mean = (g.rng.standard_normal(c) * 0.05).astype(np.float32)
    var = g.rng.uniform(0.8, 1.2, c).astype(np.float32)
    y = g.op("BatchNormalization", [y, *(g.const(s, v) for s, v in zip(("scale", "bias", "mean", "var"), (scale, bias, mean, var)))])
    return g.op("Relu", [g.op("Add", [x, y])])


def _odd_channels(g: _GraphBuilder, x: str, c: int, alpha: float) -> str:
    odd = c + 3  # 11 for c=8: not a multiple of TensorRT's preferred 8
    y = g.op("Relu", [g.conv(x, odd, c, 1)])
    return g.op("Add", [x, g.conv(y, c, odd, 1, gain=alpha)])


def _fc_head(g: _GraphBuilder, x: str, c: int) -> str:
    """Pool, flatten through a runtime-computed shape (as exporters write it), two Gemms."""
    pooled = g.op("ReduceMean", [x], axes=[2, 3], keepdims=1)
    batch = g.op("Gather", [g.op("Shape", [pooled]), g.const("idx", np.array(0, np.int64))], axis=0)
    shape = g.op("Concat", [g.op("Unsqueeze", [batch, g.const("axes", np.array([0], np.int64))]),
                            g.const("minus1", np.array([-1], np.int64))], axis=0)
    flat = g.op("Reshape", [pooled, shape])
    hidden = 2 * c
    w1 = g.rng.standard_normal((hidden, c), dtype=np.float32) * np.float32(np.sqrt(2.0 / c))
    h = g.op("Relu", [g.op("Gemm", [flat, g.const("fc_w", w1), g.const("fc_b", np.zeros(hidden, np.float32))], transB=1)])
    w2 = g.rng.standard_normal((CLASSES, hidden), dtype=np.float32) * np.float32(np.sqrt(1.0 / hidden))
    return g.op("Gemm", [h, g.const("fc_w", w2), g.const("fc_b", np.zeros(CLASSES, np.float32))], transB=1)


BLOCKS = {
    "residual": _residual, "se": _squeeze_excite, "identity": _identity_scale, "siblings": _siblings,
    "routed": _routed_weight, "bn": _batchnorm, "odd": _odd_channels,
}
HEAD_NODES = 9  # nodes _fc_head emits (checked in make_synthetic)


def make_synthetic(spec: SyntheticSpec) -> onnx.ModelProto:
    """A checked, shape-annotated model with `spec.nodes` nodes, give or take one block."""
    g = _GraphBuilder(np.random.default_rng(spec.seed))
    c = spec.channels
    # Every block adds a branch scaled by alpha to its input. With alpha^2 * blocks = 1 the
    # activations grow by at most e over the whole chain and still depend on the input at the end.
    alpha = float(1.0 / np.sqrt(max(spec.nodes / 6, 1)))
    x = g.conv("input", c, 3, 3)
    aux: str | None = None
    target = spec.nodes - HEAD_NODES
    blocks = 0
    while len(g.nodes) < target:
        if blocks and blocks % AUX_HEAD_EVERY == 0 and len(g.nodes) + HEAD_NODES + 1 < target:
            logits = _fc_head(g, x, c)
            aux = logits if aux is None else g.op("Add", [aux, logits])
        else:
            x = BLOCKS[BLOCK_CYCLE[blocks % len(BLOCK_CYCLE)]](g, x, c, alpha)
        blocks += 1
    before_head = len(g.nodes)
    outputs = [(_fc_head(g, x, c), "output")]
    assert len(g.nodes) - before_head == HEAD_NODES
    if aux is not None:
        outputs.append((aux, "aux"))
    for produced, name in outputs:  # graph outputs get stable names, like an exporter's
        for node in g.nodes:
            if node.output[0] == produced:
                node.output[0] = name
        for node in g.nodes:
            node.input[:] = [name if t == produced else t for t in node.input]

    graph = helper.make_graph(
        g.nodes, spec.name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, spec.size, spec.size])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", CLASSES]) for _, name in outputs],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graphopt-synthetic")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("nodes", help="target node count, e.g. 5000 or 5k")
    parser.add_argument("-o", "--output", required=True, help="where to write the .onnx file")
    parser.add_argument("--channels", type=int, default=SyntheticSpec.channels)
    parser.add_argument("--size", type=int, default=SyntheticSpec.size, help="input height and width")
    parser.add_argument("--seed", type=int, default=SyntheticSpec.seed)
    args = parser.parse_args()
    spec = SyntheticSpec(parse_count(args.nodes), args.channels, args.size, args.seed)
    model = make_synthetic(spec)
    onnx.save_model(model, args.output)
    print(f"wrote {args.output}: {len(model.graph.node)} nodes")


if __name__ == "__main__":
    main()
