"""fc-to-conv: run fully connected layers as convolutions.

Matches a *linear*: a Gemm (transA=0, transB 0 or 1, any alpha/beta, bias C of shape [N], [1, N],
one element, or none) or a MatMul followed, optionally, by an Add of a constant per-channel bias; the weight
is a constant 2-D matrix and the input a 2-D [B, K] tensor of float32 or float16. An inference
BatchNormalization right after it is part of the linear too (see "BatchNormalization" below).
Linears joined only by elementwise, shape-preserving ops (Relu, LeakyRelu, Clip, Sigmoid, Tanh,
HardSwish, Identity, inference Dropout, BatchNormalization, a scalar Add/Mul, ...) form one
*chain*, and a chain is one site.

Emits, for a chain:

1. the first linear as a Conv over a 4-D view of its input:
   a. when the input is Flatten(axis=1), or a Reshape that provably flattens to [B, C*H*W], of a
      4-D [B, C, H, W] map with static C, H, W: a Conv with an HxW kernel over that map, its
      weight the [N, K] matrix reshaped to [N, C, H, W] (Flatten is C-major, and so is NumPy's
      reshape). No flatten is left in front of it. A Squeeze of axes 2 and 3 (an attribute
      before opset 13, an input from 13, negative axes allowed) of a [B, C, 1, 1] map, as
      reduce-to-pool leaves a ReduceMean(keepdims=0), is such a flatten too, with H = W = 1;
   b. otherwise: Reshape(x, [0, K, 1, 1]) and a 1x1 Conv;
2. every later linear as a 1x1 Conv, and the ops between linears on the 4-D tensors themselves;
3. one Flatten(axis=1) at the end, writing the chain's original output tensor, so its name,
   dtype and shape (a graph output's too) stay as they were. A tensor inside the chain that
   something else also reads, or that is a graph output, gets its own Flatten. Where only
   Reshapes to a constant shape read the 2-D tensor (a head reshaped to [B, anchors, classes]),
   they read the 4-D one instead, with no Flatten: onnxsim would fold Flatten -> Reshape into one
   Reshape the next time `simplify` runs.

alpha is folded into the weight and beta into the bias. The batch dimension is never spelled
out (Reshape copies it with 0, Flatten keeps axis 0), so a symbolic batch works.

BatchNormalization. A BatchNormalization that reads a linear's output as its only reader
(inference form: training_mode 0, one output, spatial 1; scale, B, mean and var constants of
shape [N] in the weight's dtype, finite, var + epsilon > 0) is folded into that linear:
with s = scale / sqrt(var + epsilon), row n of the weight is scaled by s[n] and the bias becomes
(b - mean) * s + B, computed in float64 and stored in the weight's dtype. Carried into 4-D
instead, it would sit right after a Conv, where onnxsim's fuse_bn_into_conv folds it the next
time `simplify` runs: `all` would change the graph again on its own output. For TensorRT the
fold saves at most one layer: the ONNX parser imports a BatchNormalization with initializer
statistics as one IScaleLayer in kCHANNEL mode (onnx/onnx-tensorrt onnxOpImporters.cpp, commit
0137504e, `batchnormWeightHelper`); the sources found here do not say whether the builder fuses
that layer into the convolution before it. After a chain's last linear the BatchNormalization
would follow the Flatten, out of reach of any convolution fusion. The fold is for a canonical,
idempotent graph; no speed-up was measured. A BatchNormalization that cannot be folded is
counted by reason and stays where it is (carried in 4-D when it is between two linears).

Why TensorRT benefits: TensorRT's FullyConnected layer is gone. NvInfer.h deprecated
`addFullyConnected` in 8.4 ("Superseded by addMatrixMultiply()": NVIDIA/TensorRT include/NvInfer.h
at the 8.6 release, commit 3d979324), and the TensorRT 10.0 header (commit 147005ff) no longer
declares `IFullyConnectedLayer`. The ONNX parser stopped using it in its 8.4 GA release
(onnx/onnx-tensorrt commit 1da7332). Since then a Gemm is imported as an IMatrixMultiplyLayer, with
separate elementwise layers for alpha, beta and the bias (onnxOpImporters.cpp, 10.1 GA, commit
96e7811). Before that, the parser chose the FC layer for exactly this pattern because "FC can be
fused with later activation and bias layers" (builtin_op_importers.cpp, 8.2 release, commit
85e79f6). A Convolution layer keeps those fusions: TensorRT fuses a convolution with the activation
after it (its "Layer Fusion Catalog",
docs.nvidia.com/deeplearning/tensorrt/latest/performance/fusion-catalog.html), and Conv takes its
bias as a weight. In NVIDIA/TensorRT#1015 (2021) an NVIDIA engineer says the BERT demo used 1x1
convolutions instead of FC layers because they performed better, and that TensorRT of that time
made this replacement itself. The sources found here do not say whether TensorRT 10 does anything
similar for a matrix multiply with constant weights. No speed-up was measured for this pass, and
TensorRT was not at hand to verify on: the pass manager checks its outputs with ONNX Runtime.

Token-wise linears (option `token_linears`, default False). After onnxsim, each linear of a
transformer is Reshape([B, T, C] -> [B*T, C]) -> Gemm -> Reshape back. Its rows are tokens, not
samples, and the layer sits among LayerNorm, GELU, attention and residual Adds, not in a CNN head
with a Relu-like activation after it. No source found here says that a Conv runs a transformer's
linears faster than the matrix-multiply layer, and each one would gain a Reshape and a Flatten.
So by default they are left alone; `token_linears=true` rewrites them like any 2-D linear (a 1x1
Conv over [B*T, C, 1, 1]), for you to measure. A linear counts as token-wise when its 2-D input comes from a Reshape or Flatten
of a rank-3-or-more tensor that is not a per-sample flatten (rows are not samples), or when its
output is reshaped to rank 3 and its input is not a per-sample flatten.

Declines, counting each reason: Gemm with transA=1; a weight that is not a constant (runtime
weight, or a MatMul of two activations as in attention); a constant input; an input of unknown
rank or of a rank other than 2; a dtype other than float32/float16, or weight and input dtypes
that differ; a Gemm bias that is not a constant or not per-channel ([B, N] with B != 1,
[M, 1]); a linear whose output is read inside a subgraph; token-wise linears unless
`token_linears`; opsets below 7. An elementwise op is carried in 4-D only when it does not
depend on the rank; a chain stops before any tensor read inside a subgraph. A BatchNormalization
after a linear is not folded when the linear's output has other readers or is a graph output,
when it is not in inference form, when its output is read inside a subgraph, or when its
parameters are not constants, not [N], of another dtype, not finite, or var + epsilon <= 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graphs import (
    constant_value,
    is_graph_output,
    make_constant,
    rank,
    replace_input,
    unique_name,
    used_in_subgraph,
)
from graphopt.passbase import GraphPass, PassStats, Site

FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float16))

# Elementwise ops that read only their first input per element and keep its shape, whatever its
# rank: carried unchanged from [B, N] to [B, N, 1, 1]. Clip's bounds are scalars by definition.
RANK_FREE_UNARY = frozenset({
    "Abs", "Celu", "Ceil", "Clip", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
    "HardSwish", "Identity", "LeakyRelu", "Log", "Mish", "Neg", "Reciprocal", "Relu", "Round",
    "Selu", "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu",
})
# Binary elementwise ops, carried when the other operand is a one-element constant of rank <= 2
# (it then broadcasts the same way against [B, N] and [B, N, 1, 1]; PRelu's slope is its second).
SCALAR_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"})
# Ops that can turn a per-sample tensor into the [B, K] input of a linear (see flattens_per_sample).
FLATTENING_OPS = ("Flatten", "Reshape", "Squeeze")


@dataclass(frozen=True)
class FcToConvOptions:
    # Also rewrite token-wise linears of transformers; off by default (see the module docstring).
    token_linears: bool = False


@dataclass(frozen=True)
class FeatureMap:
    """A 4-D [B, C, H, W] map whose per-sample flatten is the first linear's input."""

    tensor: gs.Tensor
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class Linear:
    """One fully connected layer: output = input @ weight.T + bias, weight [N, K]."""

    name: str  # the Gemm/MatMul node's name
    op: str
    nodes: tuple[gs.Node, ...]  # the Gemm/MatMul, then the bias Add and BatchNormalization it absorbed
    input: gs.Tensor  # [B, K]
    output: gs.Tensor  # [B, N], after the bias and BatchNormalization
    weight: np.ndarray  # [N, K], alpha and BatchNormalization folded in, in the input's dtype
    bias: np.ndarray | None  # [N], beta and BatchNormalization folded in

    def describe(self) -> str:
        return f"{self.op} {self.name} {self.weight.shape[1]}->{self.weight.shape[0]}"


@dataclass(frozen=True)
class Chain:
    """A site: linears joined by elementwise ops that run in 4-D, and how the first is fed."""

    source: FeatureMap | None  # None: the first linear's 2-D input, viewed as [B, K, 1, 1]
    linears: tuple[Linear, ...]
    carried: tuple[tuple[gs.Node, ...], ...]  # carried[i]: the ops between linears i and i+1

    @property
    def key(self) -> str:
        return "+".join(linear.name for linear in self.linears)


class FcToConv(GraphPass[FcToConvOptions]):
    name = "fc-to-conv"
    summary = "Run Gemm/MatMul linears with constant weights as Conv, keeping FC chains 4-D."
    Options = FcToConvOptions
    order = 40

    # -- match -------------------------------------------------------------------------------------

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        if int(graph.opset) < 7:
            stats.skip("opset below 7")
            return []
        linears: dict[str, Linear] = {}
        for node in graph.nodes:
            if node.op not in ("Gemm", "MatMul") or not in_default_domain(node):
                continue
            linear = self.match_linear(graph, node, stats)
            if linear is not None:
                linears[node.name] = linear

        successors = {name: next_in_chain(graph, linear, linears) for name, linear in linears.items()}
        has_predecessor = {follow[1].name for follow in successors.values() if follow is not None}
        sites = []
        for name, linear in linears.items():
            if name in has_predecessor:
                continue
            chain_linears, carried = [linear], []
            while (follow := successors[chain_linears[-1].name]) is not None:
                ops, following = follow
                carried.append(ops)
                chain_linears.append(following)
            chain = Chain(feature_map_source(linear), tuple(chain_linears), tuple(carried))
            sites.append(Site(chain.key, chain))
        return sites

    def match_linear(self, graph: gs.Graph, node: gs.Node, stats: PassStats) -> Linear | None:
        """The linear computed by a Gemm/MatMul, absorbing a bias Add and a BatchNormalization after it.

        Counts why a Gemm/MatMul is no linear, and why a BatchNormalization reading it stays.
        """
        x, weight = node.inputs[0], constant_value(node.inputs[1])
        reason = (
            gemm_transposes_input(node)
            or weight_not_constant(node, x, weight)
            or input_is_constant(x)
            or input_not_a_matrix(x)
            or unsupported_dtype(x, weight)
            or weight_shape_mismatch(node, x, weight)
            or gemm_bias_not_per_channel(node)
            or output_in_subgraph(graph, node.outputs[0])
        )
        if reason is not None:
            stats.skip(reason)
            return None
        linear = absorb_bias_add(graph, fc_linear(node, weight))
        if (batchnorm := reading_batchnorm(linear)) is not None:
            if (reason := reason_not_to_fold(graph, linear, batchnorm)) is not None:
                stats.skip(f"BatchNormalization not folded: {reason}")
            else:
                linear = fold_batchnorm(linear, batchnorm)
        if not self.options.token_linears and is_token_linear(linear):
            stats.skip("token-wise linear (token_linears=false)")
            return None
        return linear

    # -- rewrite -----------------------------------------------------------------------------------

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        chain: Chain = site.payload
        first = chain.linears[0]
        if chain.source is not None:
            source = chain.source
            x4 = source.tensor
            kernel = (source.height, source.width)
            weight_shape = (source.channels, source.height, source.width)
        else:
            x4 = view_as_map(graph, first.input, first.name)
            kernel, weight_shape = (1, 1), (first.weight.shape[1], 1, 1)

        flattens = 0
        for index, linear in enumerate(chain.linears):
            for node in linear.nodes:
                node.outputs.clear()
            weight = linear.weight.reshape((linear.weight.shape[0], *weight_shape))
            y4 = emit_conv(graph, x4, weight, linear.bias, kernel, linear.name)
            last = index == len(chain.linears) - 1
            next_node = None if last else (chain.carried[index] or (chain.linears[index + 1].nodes[0],))[0]
            if last or read_outside_chain(graph, linear.output, next_node):
                flattens += emit_flatten(graph, y4, linear.output)
            if not last:
                x4, extra = carry_in_4d(graph, chain.carried[index], linear.output, y4, chain.linears[index + 1].nodes[0])
                flattens += extra
            # Every later linear reads the previous Conv's [B, N, 1, 1] output.
            kernel, weight_shape = (1, 1), (linear.weight.shape[0], 1, 1)

        stats.counters["linears_converted"] += len(chain.linears)
        stats.counters["ops_carried_in_4d"] += sum(len(ops) for ops in chain.carried)
        if chain.source is not None:
            stats.counters["flattens_folded_into_kernel"] += 1
        batchnorms = [node.name for linear in chain.linears for node in linear.nodes if node.op == "BatchNormalization"]
        if batchnorms:
            stats.counters["batchnorms_folded"] += len(batchnorms)
        stats.details.append({
            "site": chain.key,
            "linears": [linear.describe() for linear in chain.linears],
            "input": (
                f"{chain.source.channels}x{chain.source.height}x{chain.source.width} feature map"
                if chain.source is not None else "2-D matrix viewed as [B, K, 1, 1]"
            ),
            "carried_in_4d": [node.op for ops in chain.carried for node in ops],
            "batchnorms_folded": batchnorms,
            "flattens": flattens,
        })


# -- named checks: each returns why a Gemm/MatMul is not a linear, or None ------------------------


def gemm_transposes_input(node: gs.Node) -> str | None:
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA=1"
    return None


def weight_not_constant(node: gs.Node, x: gs.Tensor, weight: np.ndarray | None) -> str | None:
    if weight is not None:
        return None
    if node.op == "MatMul" and constant_value(x) is None:
        return "MatMul of two activations"
    return "weight is not a constant"


def input_is_constant(x: gs.Tensor) -> str | None:
    return "input is a constant" if constant_value(x) is not None else None


def input_not_a_matrix(x: gs.Tensor) -> str | None:
    r = rank(x)
    if r is None:
        return "input rank unknown"
    return None if r == 2 else f"input has rank {r}"


def unsupported_dtype(x: gs.Tensor, weight: np.ndarray) -> str | None:
    dtype = tensor_dtype(x)
    if dtype not in FLOAT_TYPES:
        return "dtype is not float32/float16"
    return None if weight.dtype == dtype else "weight dtype differs from input dtype"


def weight_shape_mismatch(node: gs.Node, x: gs.Tensor, weight: np.ndarray) -> str | None:
    if weight.ndim != 2:
        return "weight is not 2-D"
    transposed = node.op == "Gemm" and node.attrs.get("transB", 0)
    k = weight.shape[1] if transposed else weight.shape[0]
    input_k = x.shape[1]
    if isinstance(input_k, (int, np.integer)) and input_k >= 0 and input_k != k:
        return "weight does not match the input"
    return None


def gemm_bias_not_per_channel(node: gs.Node) -> str | None:
    if node.op != "Gemm" or len(node.inputs) < 3 or node.inputs[2].name == "":
        return None
    values = constant_value(node.inputs[2])
    if values is None:
        return "Gemm bias is not a constant"
    transposed = node.attrs.get("transB", 0)
    n = constant_value(node.inputs[1]).shape[0 if transposed else 1]
    if per_channel(values, n) is None:
        return f"Gemm bias of shape {list(values.shape)} is not per-channel"
    return None


def output_in_subgraph(graph: gs.Graph, output: gs.Tensor) -> str | None:
    return "output is read inside a subgraph" if used_in_subgraph(graph, output) else None


# -- named checks: each returns why a BatchNormalization after a linear is not folded into it, or None


def linear_output_read_elsewhere(graph: gs.Graph, linear: Linear) -> str | None:
    if len(linear.output.outputs) != 1:
        return "the linear's output has other readers"
    if is_graph_output(graph, linear.output):
        return "the linear's output is a graph output"
    return None


def batchnorm_not_in_inference_form(batchnorm: gs.Node) -> str | None:
    if batchnorm.attrs.get("training_mode", 0):
        return "training mode"
    if len(batchnorm.outputs) != 1:
        return "more than one output"
    if batchnorm.attrs.get("spatial", 1) != 1 or len(batchnorm.inputs) != 5:
        return "not the per-channel form (spatial=1, five inputs)"
    return None


def batchnorm_parameters_not_foldable(batchnorm: gs.Node, weight: np.ndarray) -> str | None:
    values = [constant_value(t) for t in batchnorm.inputs[1:5]]
    if any(v is None for v in values):
        return "scale, bias, mean or variance is not a constant"
    if any(v.shape != (weight.shape[0],) for v in values):
        return "parameters are not one value per output channel"
    if any(v.dtype != weight.dtype for v in values):
        return "parameter dtype differs from the weight's"
    variance = values[3].astype(np.float64)
    if not all(np.all(np.isfinite(v)) for v in values) or np.any(variance + float(batchnorm.attrs.get("epsilon", 1e-5)) <= 0):
        return "parameters are not finite, or variance + epsilon is not positive"
    return None


# -- matching helpers -------------------------------------------------------------------------------


def in_default_domain(node: gs.Node) -> bool:
    # graphsurgeon imports the default domain as None (graphs.nodes_with_op expects "" and misses it).
    return node.domain in (None, "", "ai.onnx")


def tensor_dtype(tensor: gs.Tensor) -> np.dtype | None:
    try:
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:  # an ONNX-only type (bfloat16, float8...) that NumPy cannot name
        return None


def per_channel(values: np.ndarray, n: int) -> np.ndarray | None:
    """`values` as an [N] bias if it broadcasts over a [B, N] output the same way for every row."""
    if values.ndim > 2 or (values.ndim == 2 and values.shape[0] != 1) or values.size not in (1, n):
        return None
    return np.broadcast_to(values.reshape(-1), (n,))


def fc_linear(node: gs.Node, weight: np.ndarray) -> Linear:
    """The [N, K] weight and [N] bias of a Gemm/MatMul (alpha and beta folded in)."""
    dtype = weight.dtype
    if node.op == "MatMul":
        return Linear(node.name, node.op, (node,), node.inputs[0], node.outputs[0], weight.T.astype(dtype), None)
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    matrix = weight if node.attrs.get("transB", 0) else weight.T
    folded = (matrix.astype(np.float64) * alpha).astype(dtype)
    bias = None
    if len(node.inputs) >= 3 and node.inputs[2].name != "":
        values = per_channel(constant_value(node.inputs[2]), folded.shape[0])
        bias = (values.astype(np.float64) * beta).astype(dtype)
    return Linear(node.name, node.op, (node,), node.inputs[0], node.outputs[0], folded, bias)


def absorb_bias_add(graph: gs.Graph, linear: Linear) -> Linear:
    """Fold an Add of a constant per-channel bias that is the linear's only reader into it."""
    y = linear.output
    add = y.outputs[0] if len(y.outputs) == 1 else None
    if add is None or add.op != "Add" or not in_default_domain(add) or is_graph_output(graph, y):
        return linear
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    values = constant_value(other)
    if values is None or values.dtype != linear.weight.dtype or used_in_subgraph(graph, add.outputs[0]):
        return linear
    bias = per_channel(values, linear.weight.shape[0])
    if bias is None:
        return linear
    total = bias.astype(np.float64) + (0.0 if linear.bias is None else linear.bias.astype(np.float64))
    return replace(linear, nodes=(*linear.nodes, add), output=add.outputs[0], bias=total.astype(linear.weight.dtype))


def reading_batchnorm(linear: Linear) -> gs.Node | None:
    """A default-domain BatchNormalization that reads the linear's output as its data, if any."""
    return next(
        (c for c in linear.output.outputs if c.op == "BatchNormalization" and in_default_domain(c) and c.inputs[0] is linear.output),
        None,
    )


def reason_not_to_fold(graph: gs.Graph, linear: Linear, batchnorm: gs.Node) -> str | None:
    """Why `batchnorm` cannot be folded into the linear it reads, or None."""
    return (
        linear_output_read_elsewhere(graph, linear)
        or batchnorm_not_in_inference_form(batchnorm)
        or output_in_subgraph(graph, batchnorm.outputs[0])
        or batchnorm_parameters_not_foldable(batchnorm, linear.weight)
    )


def fold_batchnorm(linear: Linear, batchnorm: gs.Node) -> Linear:
    """y = s (x - mean) + beta with s = scale / sqrt(var + eps), x = W v + b: W' = s W (per row), b' = s (b - mean) + beta."""
    scale, beta, mean, var = (constant_value(t).astype(np.float64) for t in batchnorm.inputs[1:5])
    s = scale / np.sqrt(var + float(batchnorm.attrs.get("epsilon", 1e-5)))
    dtype = linear.weight.dtype
    bias = np.zeros_like(s) if linear.bias is None else linear.bias.astype(np.float64)
    weight = linear.weight.astype(np.float64) * s[:, None]
    return replace(
        linear, nodes=(*linear.nodes, batchnorm), output=batchnorm.outputs[0],
        weight=weight.astype(dtype), bias=((bias - mean) * s + beta).astype(dtype),
    )


def flattens_per_sample(node: gs.Node) -> bool:
    """Whether a Flatten/Reshape/Squeeze provably turns [B, d1, ..., dk] into [B, d1*...*dk]."""
    data = node.inputs[0]
    data_rank = rank(data)
    if data_rank is None or data_rank < 2:
        return False
    if node.op == "Squeeze":
        return squeezes_unit_spatial_axes(node)
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        return axis == 1 or axis + data_rank == 1
    if node.op != "Reshape" or len(node.inputs) < 2:
        return False
    shape = constant_value(node.inputs[1])
    if shape is None or shape.ndim != 1 or shape.size != 2:
        return False
    first, second = (int(v) for v in shape)
    batch = data.shape[0]
    rest_dims = data.shape[1:]
    rest = math.prod(rest_dims) if all(isinstance(d, (int, np.integer)) and d >= 0 for d in rest_dims) else None
    copies_batch = first == 0 and not node.attrs.get("allowzero", 0)
    static_batch = isinstance(batch, (int, np.integer)) and batch > 0 and first == batch
    if second == -1:
        return copies_batch or static_batch
    if rest is None or rest == 0 or second != rest:
        return False
    return copies_batch or static_batch or first == -1


def squeezes_unit_spatial_axes(node: gs.Node) -> bool:
    """Whether a Squeeze drops exactly axes 2 and 3 of a [B, C, 1, 1] tensor (a pooled map's flatten).

    Its axes are an attribute before opset 13 and an input from 13; with none, it would drop a
    batch of 1 too.
    """
    data = node.inputs[0]
    if rank(data) != 4 or any(not isinstance(d, (int, np.integer)) or d != 1 for d in data.shape[2:]):
        return False
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = constant_value(node.inputs[1])
    else:
        axes = node.attrs.get("axes")
    if axes is None:
        return False
    return sorted(int(a) + 4 if int(a) < 0 else int(a) for a in np.ravel(axes)) == [2, 3]


def feature_map_source(linear: Linear) -> FeatureMap | None:
    """The 4-D map behind a Flatten/Reshape/Squeeze feeding the linear, when its kernel can cover it."""
    x = linear.input
    producer = x.inputs[0] if len(x.inputs) == 1 else None
    if producer is None or producer.op not in FLATTENING_OPS or not in_default_domain(producer):
        return None
    data = producer.inputs[0]
    if rank(data) != 4 or constant_value(data) is not None or not flattens_per_sample(producer):
        return None
    dims = data.shape[1:]
    if not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
        return None
    channels, height, width = (int(d) for d in dims)
    if channels * height * width != linear.weight.shape[1] or tensor_dtype(data) != linear.weight.dtype:
        return None
    return FeatureMap(data, channels, height, width)


def is_token_linear(linear: Linear) -> bool:
    """A transformer's per-token linear: rows of its input are tokens, not samples."""
    x = linear.input
    producer = x.inputs[0] if len(x.inputs) == 1 else None
    from_flatten = producer is not None and producer.op in ("Flatten", "Reshape") and (rank(producer.inputs[0]) or 0) >= 3
    if from_flatten and not flattens_per_sample(producer):
        return True
    reshaped_to_tokens = any(c.op == "Reshape" and rank(c.outputs[0]) == 3 for c in linear.output.outputs)
    return reshaped_to_tokens and not (from_flatten and flattens_per_sample(producer))


def carries_in_4d(graph: gs.Graph, node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether `node`, reading the 2-D `tensor`, computes the same when fed [B, N, 1, 1]."""
    if not in_default_domain(node) or not node.inputs or not node.outputs:
        return False
    if any(t.outputs or is_graph_output(graph, t) for t in node.outputs[1:]):
        return False  # Dropout's mask or BatchNormalization's running statistics are read
    if node.op in SCALAR_BINARY:
        operands = [t for t in node.inputs if t is not tensor]
        values = constant_value(operands[0]) if len(node.inputs) == 2 and len(operands) == 1 else None
        in_place = node.op != "PRelu" or node.inputs[0] is tensor
        return in_place and values is not None and values.size == 1 and values.ndim <= 2
    if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
        return False
    if node.op in RANK_FREE_UNARY:
        return all(t.name == "" or rank(t) == 0 for t in node.inputs[1:])
    if node.op == "Dropout":  # an identity unless training_mode is set
        training = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.array(False)
        return training is not None and not bool(training)
    if node.op == "BatchNormalization":  # per channel on axis 1, of [B, N] and [B, N, 1, 1] alike
        return not node.attrs.get("training_mode", 0) and node.attrs.get("spatial", 1) == 1
    return False


def next_in_chain(graph: gs.Graph, linear: Linear, linears: dict[str, Linear]) -> tuple[tuple[gs.Node, ...], Linear] | None:
    """The ops after `linear` and the linear they lead to, if the chain goes on.

    The walk follows a tensor's one reader that can be carried in 4-D or is a linear; readers that
    cannot are kept on the 2-D tensor. Two carriable readers would fork the chain: it stops.
    """
    ops: list[gs.Node] = []
    tensor = linear.output
    while not used_in_subgraph(graph, tensor):
        following = [c for c in tensor.outputs if c.name in linears and linears[c.name].input is tensor]
        carriable = [c for c in tensor.outputs if carries_in_4d(graph, c, tensor)]
        if len(following) + len(carriable) != 1:
            return None
        if following:
            return tuple(ops), linears[following[0].name]
        ops.append(carriable[0])
        tensor = carriable[0].outputs[0]
    return None


# -- rewrite helpers --------------------------------------------------------------------------------


def read_outside_chain(graph: gs.Graph, tensor: gs.Tensor, next_node: gs.Node | None) -> bool:
    return is_graph_output(graph, tensor) or any(c is not next_node for c in tensor.outputs)


def view_as_map(graph: gs.Graph, x: gs.Tensor, stem: str) -> gs.Variable:
    """Reshape [B, K] to [B, K, 1, 1]; the 0 copies the batch, so a symbolic batch works.

    Linears that read one tensor share one view (the first site rewritten makes it), so their
    Convs read one tensor too and merge-convs, later in `all`, sees them as siblings.
    """
    k = x.shape[1] if isinstance(x.shape[1], (int, np.integer)) and x.shape[1] >= 0 else -1
    for reader in x.outputs:
        if reader.op == "Reshape" and reader.inputs[0] is x and len(reader.inputs) == 2 and len(reader.outputs) == 1:
            target = constant_value(reader.inputs[1])
            if target is not None and target.tolist() == [0, k, 1, 1] and not reader.attrs.get("allowzero", 0):
                return reader.outputs[0]
    shape = make_constant(graph, f"{stem}/as_map_shape", np.array([0, k, 1, 1], dtype=np.int64))
    x4 = gs.Variable(unique_name(graph, f"{stem}/as_map"), dtype=x.dtype)
    graph.nodes.append(gs.Node("Reshape", unique_name(graph, f"{stem}/as_map"), inputs=[x, shape], outputs=[x4]))
    return x4


def emit_conv(
    graph: gs.Graph, x4: gs.Tensor, weight: np.ndarray, bias: np.ndarray | None, kernel: tuple[int, int], stem: str
) -> gs.Variable:
    inputs = [x4, make_constant(graph, f"{stem}/conv_weight", weight)]
    if bias is not None:
        inputs.append(make_constant(graph, f"{stem}/conv_bias", bias))
    y4 = gs.Variable(unique_name(graph, f"{stem}/conv"), dtype=x4.dtype)
    attrs = {"kernel_shape": list(kernel), "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1}
    graph.nodes.append(gs.Node("Conv", unique_name(graph, f"{stem}/conv"), attrs=attrs, inputs=inputs, outputs=[y4]))
    return y4


def emit_flatten(graph: gs.Graph, x4: gs.Tensor, output: gs.Tensor) -> int:
    """[B, N, 1, 1] -> the original [B, N] tensor object (its name, dtype and shape are kept).

    When only Reshapes with a constant shape read `output` (and it is no graph output), they read
    the 4-D tensor instead and no Flatten is emitted: onnxsim would fold a Flatten -> Reshape pair
    into one Reshape the next time `simplify` runs. Returns the number of Flattens emitted.
    """
    readers = list(output.outputs)
    reshaped_only = readers and all(reshapes_as_data(reader, output) for reader in readers)
    if reshaped_only and not is_graph_output(graph, output) and not used_in_subgraph(graph, output):
        for reader in readers:
            replace_input(reader, output, x4)
        return 0
    name = unique_name(graph, f"{output.name}/flatten")
    graph.nodes.append(gs.Node("Flatten", name, attrs={"axis": 1}, inputs=[x4], outputs=[output]))
    return 1


def reshapes_as_data(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether `node` reshapes the 2-D `tensor` to a constant shape that reads the same from [B, N, 1, 1].

    A 0 copies the input's dim at its index: the same for indices 0 and 1, which is all a valid
    shape for a 2-D input can copy. -1 infers the same size from the same element count.
    """
    if node.op != "Reshape" or not in_default_domain(node) or len(node.inputs) != 2 or node.inputs[0] is not tensor:
        return False
    shape = constant_value(node.inputs[1])
    if shape is None or shape.ndim != 1:
        return False
    copies = [i for i, d in enumerate(shape.tolist()) if d == 0] if not node.attrs.get("allowzero", 0) else []
    return all(i < 2 for i in copies)


def carry_in_4d(
    graph: gs.Graph, ops: tuple[gs.Node, ...], x2: gs.Tensor, x4: gs.Variable, next_linear: gs.Node
) -> tuple[gs.Variable, int]:
    """Move elementwise ops from the 2-D chain onto the 4-D one; 2-D tensors others read get a Flatten."""
    flattens = 0
    for index, node in enumerate(ops):
        old = node.outputs[0]
        new = gs.Variable(unique_name(graph, f"{old.name}/4d"), dtype=old.dtype)
        node.inputs = [x4 if t is x2 else t for t in node.inputs]
        node.outputs[0] = new
        next_node = ops[index + 1] if index + 1 < len(ops) else next_linear
        if read_outside_chain(graph, old, next_node):
            flattens += emit_flatten(graph, new, old)
        x2, x4 = old, new
    return x4, flattens
