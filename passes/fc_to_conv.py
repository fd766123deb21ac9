"""fc-to-conv: run fully connected layers as convolutions.

Matches a *linear*: a Gemm (transA=0, transB 0 or 1, any alpha/beta, bias C of shape [N], [1, N],
one element, or none) or a MatMul followed, optionally, by an Add of a constant per-channel bias; the weight
is a constant 2-D matrix and the input a 2-D [B, K] tensor of float32 or float16. An inference
BatchNormalization right after it is part of the linear too (see "BatchNormalization" below),
and so are Muls by a constant right before or after it (see "Folds" below).
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
      reduce-to-pool leaves a ReduceMean(keepdims=0), is such a flatten too, with H = W = 1.
      Zero Pads and Muls by a constant that compute the map go into the Conv (see "Folds");
   b. otherwise: Reshape(x, [0, K, 1, 1]) and a 1x1 Conv. Where an earlier chain's Flatten
      writes x, the Conv reads that Flatten's [B, K, 1, 1] input instead: onnxsim would drop
      the Flatten -> Reshape pair the next time `simplify` runs;
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

Folds. `simplify` runs first in `all`, and onnxsim's optimizer folds into a Conv what it leaves
next to a Gemm or MatMul (onnxsim 0.8.1, its onnxsim/passes/*.h): a BatchNormalization after it
(fuse_bn_into_conv), a bias Add after a Conv without bias (fuse_add_bias_into_conv), a Mul by a
constant after it (fuse_mul_into_conv) or before it (fuse_preceding_mul_into_conv: the Mul read
by that Conv alone, its constant one value or one per input channel) and a Pad with zeros on H
and W before it (fuse_pad_into_conv). Next to the Convs of this pass, each would be folded on
the next run of `all`, which would then change its own output. So the pass folds them itself,
exactly in real arithmetic, computing in float64 and storing in the weight's dtype:
1. after a linear, as long as one op is its only reader and not a graph output: an Add of a
   constant bias (one value or one per channel), a Mul by a constant (one value or one per
   output channel: row n of the weight and the bias scale by s[n]) and a BatchNormalization,
   in any order;
2. before a linear, a Mul whose only reader the linear is, by a constant that is one value or
   one per input feature (column k of the weight scales by s[k]), unless the linear before it
   took that Mul under 1. Inside a chain the Mul would sit right before a Conv;
3. in front of a flattened map that only the flatten reads, when only linears read the
   flatten (each takes them; sibling linears' Convs are merged later in `all`, and onnxsim
   would fold into the merged Conv), each op whose output only the next one reads: a Mul by a constant that is one value or one per channel (input channel
   c of the kernel scales by s[c]; where the Mul broadcasts a one-channel map to C channels, the
   C scaled kernel channels add up to one, which onnxsim's fold gets wrong) and a Pad with a
   constant zero on H and W only (mode constant, no `axes` input, no negative pads), which
   becomes the Conv's `pads`.
A Mul by a constant that varies within a channel or over the batch, a Div, Add or Sub before
the map, and a Pad of another mode or value stay (onnxsim leaves them too), counted by reason.
So does a fold whose weights would overflow float16: onnxsim folds that one, and `all` then
changes its output on a second run. The folds give `all` a fixed point that `simplify` keeps;
no TensorRT speed-up is claimed or was measured for them.

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
NO_PADS = (0, 0, 0, 0)


@dataclass(frozen=True)
class FcToConvOptions:
    # Also rewrite token-wise linears of transformers; off by default (see the module docstring).
    token_linears: bool = False


@dataclass(frozen=True)
class FeatureMap:
    """A 4-D map whose per-sample flatten is the first linear's input, and the Conv that reads it.

    `channels`, `height` and `width` are those of the flattened [B, C, H, W] map: the kernel
    covers H x W. When zero Pads and constant Muls in front of the map are folded, `tensor` is
    the tensor above them, `pads` the Conv padding they amount to, and `weight` has their scales
    in it (a single input channel where a Mul broadcast one channel to all C).
    """

    tensor: gs.Tensor  # what the Conv reads
    channels: int
    height: int
    width: int
    weight: np.ndarray  # [N, C or 1, H, W], in the linear's dtype
    pads: tuple[int, int, int, int] = NO_PADS  # top, left, bottom, right
    folded: tuple[gs.Node, ...] = ()  # the Muls and Pads folded, nearest the flatten first

    @property
    def input_dims(self) -> tuple[int, int, int]:
        """C, H, W of `tensor`: the map's, less the folded pads, with one channel if a Mul broadcast it."""
        top, left, bottom, right = self.pads
        return int(self.weight.shape[1]), self.height - top - bottom, self.width - left - right


@dataclass(frozen=True)
class Linear:
    """One fully connected layer: output = input @ weight.T + bias, weight [N, K]."""

    name: str  # the Gemm/MatMul node's name
    op: str
    # The Muls it absorbed in front, the Gemm/MatMul, then the bias Adds, Muls and
    # BatchNormalizations it absorbed after it: nodes[0] reads `input`.
    nodes: tuple[gs.Node, ...]
    input: gs.Tensor  # [B, K]
    output: gs.Tensor  # [B, N], after what it absorbed
    weight: np.ndarray  # [N, K], alpha and the absorbed scales folded in, in the input's dtype
    bias: np.ndarray | None  # [N], beta and the absorbed biases and scales folded in

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

        # A Mul in front of a linear is folded into it only once every linear has taken the Muls
        # after it: a Mul between two linears belongs to the one before.
        taken = {node.name for linear in linears.values() for node in linear.nodes}
        for name, linear in linears.items():
            while (grown := absorb_preceding_mul(graph, linear, taken, stats)) is not None:
                taken.add(grown.nodes[0].name)
                linear = grown
            linears[name] = linear

        entries = {linear.nodes[0].name: linear for linear in linears.values()}
        successors = {name: next_in_chain(graph, linear, entries) for name, linear in linears.items()}
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
            chain = Chain(feature_map_source(graph, linear, entries, stats), tuple(chain_linears), tuple(carried))
            sites.append(Site(chain.key, chain))
        return sites

    def match_linear(self, graph: gs.Graph, node: gs.Node, stats: PassStats) -> Linear | None:
        """The linear computed by a Gemm/MatMul, absorbing the bias Adds, Muls and BatchNormalizations after it.

        Counts why a Gemm/MatMul is no linear, and why a Mul or BatchNormalization after it stays.
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
        linear = fc_linear(node, weight)
        if linear is None:
            stats.skip("Gemm alpha or beta would overflow the weight dtype when folded")
            return None
        while (grown := absorb_following(graph, linear, stats)) is not None:
            linear = grown
        if not self.options.token_linears and is_token_linear(linear):
            stats.skip("token-wise linear (token_linears=false)")
            return None
        return linear

    # -- rewrite -----------------------------------------------------------------------------------

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        chain: Chain = site.payload
        first, source = chain.linears[0], chain.source
        if source is not None:
            x4, weight, kernel, pads = source.tensor, source.weight, (source.height, source.width), source.pads
        else:
            x4 = view_as_map(graph, first.input, first.weight.shape[1], first.name)
            weight, kernel, pads = pointwise_kernel(first.weight), (1, 1), NO_PADS

        flattens = 0
        for index, linear in enumerate(chain.linears):
            for node in linear.nodes:
                node.outputs.clear()
            if index:  # every later linear reads the previous Conv's [B, N, 1, 1] output
                weight, kernel, pads = pointwise_kernel(linear.weight), (1, 1), NO_PADS
            y4 = emit_conv(graph, x4, weight, linear.bias, kernel, pads, linear.name)
            last = index == len(chain.linears) - 1
            next_node = None if last else (chain.carried[index] or (chain.linears[index + 1].nodes[0],))[0]
            flattens += emit_flatten(graph, y4, linear.output, next_node)
            if not last:
                x4, extra = carry_in_4d(graph, chain.carried[index], linear.output, y4, chain.linears[index + 1].nodes[0])
                flattens += extra

        stats.counters["linears_converted"] += len(chain.linears)
        stats.counters["ops_carried_in_4d"] += sum(len(ops) for ops in chain.carried)
        if source is not None:
            stats.counters["flattens_folded_into_kernel"] += 1
        absorbed = [node for linear in chain.linears for node in linear.nodes] + list(source.folded if source else ())
        batchnorms = [node.name for node in absorbed if node.op == "BatchNormalization"]
        muls = [node.name for node in absorbed if node.op == "Mul"]
        pad_nodes = [node.name for node in absorbed if node.op == "Pad"]
        for counter, names in (("batchnorms_folded", batchnorms), ("muls_folded", muls), ("pads_folded", pad_nodes)):
            if names:
                stats.counters[counter] += len(names)
        stats.details.append({
            "site": chain.key,
            "linears": [linear.describe() for linear in chain.linears],
            "input": (
                f"{chain.source.channels}x{chain.source.height}x{chain.source.width} feature map"
                if chain.source is not None else "2-D matrix viewed as [B, K, 1, 1]"
            ),
            "carried_in_4d": [node.op for ops in chain.carried for node in ops],
            "batchnorms_folded": batchnorms,
            "muls_folded": muls,
            "pads_folded": pad_nodes,
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


def fc_linear(node: gs.Node, weight: np.ndarray) -> Linear | None:
    """The [N, K] weight and [N] bias of a Gemm/MatMul (alpha and beta folded in), or None when
    folding them would overflow the weight's dtype (float16 ends at 65504)."""
    dtype = weight.dtype
    if node.op == "MatMul":
        return Linear(node.name, node.op, (node,), node.inputs[0], node.outputs[0], weight.T.astype(dtype), None)
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    matrix = weight if node.attrs.get("transB", 0) else weight.T
    folded = in_dtype(matrix.astype(np.float64) * alpha, dtype)
    bias = None
    if len(node.inputs) >= 3 and node.inputs[2].name != "":
        values = per_channel(constant_value(node.inputs[2]), matrix.shape[0])
        bias = in_dtype(values.astype(np.float64) * beta, dtype)
        if bias is None:
            return None
    if folded is None:
        return None
    return Linear(node.name, node.op, (node,), node.inputs[0], node.outputs[0], folded, bias)


def absorb_bias_add(graph: gs.Graph, linear: Linear) -> Linear | None:
    """The linear with the Add of a constant per-channel bias that is its only reader folded in, or None."""
    y = linear.output
    add = y.outputs[0] if len(y.outputs) == 1 else None
    if add is None or add.op != "Add" or not in_default_domain(add) or is_graph_output(graph, y):
        return None
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    values = constant_value(other)
    if values is None or values.dtype != linear.weight.dtype or used_in_subgraph(graph, add.outputs[0]):
        return None
    bias = per_channel(values, linear.weight.shape[0])
    if bias is None:
        return None
    total = in_dtype(bias.astype(np.float64) + (0.0 if linear.bias is None else linear.bias.astype(np.float64)), linear.weight.dtype)
    if total is None:  # the two biases add up past float16's range: the Add stays
        return None
    return replace(linear, nodes=(*linear.nodes, add), output=add.outputs[0], bias=total)


def absorb_scale_mul(graph: gs.Graph, linear: Linear, stats: PassStats) -> Linear | None:
    """The linear with the Mul by a constant that is its only reader folded in, or None.

    (W v + b) s = (s W) v + s b: row n of the weight and the bias scale by s[n] (one value, or
    one per output channel).
    """
    y = linear.output
    mul = y.outputs[0] if len(y.outputs) == 1 else None
    if mul is None or is_graph_output(graph, y) or (operands := scale_operands(mul)) is None:
        return None
    data, scale = operands
    if data is not y or used_in_subgraph(graph, mul.outputs[0]):
        return None
    n = linear.weight.shape[0]
    if (reason := scale_not_foldable(scale, linear.weight.dtype, n)) is not None:
        stats.skip(f"Mul not folded: {reason}")
        return None
    s = per_channel(scale, n).astype(np.float64)
    weight = in_dtype(linear.weight.astype(np.float64) * s[:, None], linear.weight.dtype)
    bias = None if linear.bias is None else in_dtype(linear.bias.astype(np.float64) * s, linear.weight.dtype)
    if weight is None or (linear.bias is not None and bias is None):
        stats.skip("Mul not folded: the scaled weights overflow their dtype")
        return None
    return replace(linear, nodes=(*linear.nodes, mul), output=mul.outputs[0], weight=weight, bias=bias)


def absorb_preceding_mul(graph: gs.Graph, linear: Linear, taken: set[str], stats: PassStats) -> Linear | None:
    """The linear with the Mul by a constant whose only reader it is folded in, or None.

    (v s) W^T = v (W diag(s))^T: column k of the weight scales by s[k] (one value, or one per
    input feature). A Mul that a linear before it absorbed (in `taken`) stays with that one.
    """
    x = linear.input
    mul = x.inputs[0] if len(x.inputs) == 1 else None
    if mul is None or mul.name in taken or len(x.outputs) != 1 or is_graph_output(graph, x) or used_in_subgraph(graph, x):
        return None
    if (operands := scale_operands(mul)) is None:
        return None
    data, scale = operands
    k = linear.weight.shape[1]
    # The data must already be [B, K]: a Mul that broadcasts it up to [B, K] is no scale of it.
    if rank(data) != 2 or data.shape[1] != k or constant_value(data) is not None:
        return None
    if (reason := scale_not_foldable(scale, linear.weight.dtype, k)) is not None:
        stats.skip(f"Mul not folded: {reason}")
        return None
    weight = in_dtype(linear.weight.astype(np.float64) * per_channel(scale, k).astype(np.float64)[None, :], linear.weight.dtype)
    if weight is None:
        stats.skip("Mul not folded: the scaled weights overflow their dtype")
        return None
    return replace(linear, nodes=(mul, *linear.nodes), input=data, weight=weight)


def absorb_following(graph: gs.Graph, linear: Linear, stats: PassStats) -> Linear | None:
    """The linear grown by the bias Add, Mul or BatchNormalization that reads its output, or None.

    A BatchNormalization that cannot be folded is counted by reason.
    """
    grown = absorb_bias_add(graph, linear) or absorb_scale_mul(graph, linear, stats)
    if grown is not None or (batchnorm := reading_batchnorm(linear)) is None:
        return grown
    if (reason := reason_not_to_fold(graph, linear, batchnorm)) is not None:
        stats.skip(f"BatchNormalization not folded: {reason}")
        return None
    if (folded := fold_batchnorm(linear, batchnorm)) is None:
        stats.skip("BatchNormalization not folded: the folded weights overflow their dtype")
    return folded


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


def fold_batchnorm(linear: Linear, batchnorm: gs.Node) -> Linear | None:
    """y = s (x - mean) + beta with s = scale / sqrt(var + eps), x = W v + b: W' = s W (per row), b' = s (b - mean) + beta.

    None when the folded weights overflow their dtype.
    """
    scale, beta, mean, var = (constant_value(t).astype(np.float64) for t in batchnorm.inputs[1:5])
    s = scale / np.sqrt(var + float(batchnorm.attrs.get("epsilon", 1e-5)))
    dtype = linear.weight.dtype
    bias = np.zeros_like(s) if linear.bias is None else linear.bias.astype(np.float64)
    weight = in_dtype(linear.weight.astype(np.float64) * s[:, None], dtype)
    folded_bias = in_dtype((bias - mean) * s + beta, dtype)
    if weight is None or folded_bias is None:
        return None
    return replace(linear, nodes=(*linear.nodes, batchnorm), output=batchnorm.outputs[0], weight=weight, bias=folded_bias)


def scale_operands(node: gs.Node) -> tuple[gs.Tensor, np.ndarray] | None:
    """(data, scale) of a default-domain Mul with exactly one constant operand, the scale; else None."""
    if node.op != "Mul" or not in_default_domain(node) or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    first, second = (constant_value(t) for t in node.inputs)
    if (first is None) == (second is None):
        return None
    return (node.inputs[1], first) if first is not None else (node.inputs[0], second)


def scale_not_foldable(scale: np.ndarray, dtype: np.dtype, n: int) -> str | None:
    """Why a Mul's constant cannot be folded into n rows or columns of a [B, n]-side weight, or None."""
    if scale.dtype != dtype:
        return "scale dtype differs from the weight's"
    if per_channel(scale, n) is None:
        return "scale is not one value or one per channel"
    if not np.all(np.isfinite(scale)):
        return "scale is not finite"
    return None


def in_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """float64 `values` cast to `dtype`, or None where a finite value overflows it (float16 ends at 65504)."""
    with np.errstate(over="ignore"):  # overflow is what this checks for
        cast = values.astype(dtype)
    return None if np.any(np.isinf(cast) & np.isfinite(values)) else cast


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


def feature_map_source(graph: gs.Graph, linear: Linear, entries: dict[str, Linear], stats: PassStats) -> FeatureMap | None:
    """The 4-D map behind a Flatten/Reshape/Squeeze feeding the linear, when its kernel can cover it.

    When only linears read the flatten (`entries`, by the name of the node that reads each
    linear's input), the zero Pads and constant Muls that compute the map go into each one's Conv
    (fold_into_map): the Conv would read their output otherwise, and where two sibling linears
    read one flatten, merge-convs makes their Convs one, which onnxsim then folds them into.
    """
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
    source = FeatureMap(data, channels, height, width, linear.weight.reshape((-1, channels, height, width)))
    only_linears = all(r.name in entries and entries[r.name].input is x for r in x.outputs)
    if not only_linears or is_graph_output(graph, x) or used_in_subgraph(graph, x):
        return source  # the flatten stays for its other readers, and so does what computes the map
    while (folded := fold_into_map(graph, source, stats)) is not None:
        source = folded
    return source


def fold_into_map(graph: gs.Graph, source: FeatureMap, stats: PassStats) -> FeatureMap | None:
    """`source` with the zero Pad or constant Mul that computes its tensor folded in, or None.

    Only an op whose output nothing else reads: the Conv takes its place. onnxsim's
    fuse_pad_into_conv and fuse_preceding_mul_into_conv would fold it on the next `simplify`.
    """
    t = source.tensor
    producer = t.inputs[0] if len(t.inputs) == 1 else None
    if producer is None or not in_default_domain(producer) or len(producer.outputs) != 1:
        return None
    if len(t.outputs) != 1 or is_graph_output(graph, t) or used_in_subgraph(graph, t):
        return None
    if producer.op == "Pad":
        return fold_pad_into_map(source, producer, stats)
    if producer.op == "Mul":
        return fold_mul_into_map(source, producer, stats)
    return None


def fold_pad_into_map(source: FeatureMap, pad: gs.Node, stats: PassStats) -> FeatureMap | None:
    """A Conv over Pad(x) with zeros is the Conv over x with those pads."""
    if (reason := pad_not_foldable(pad)) is not None:
        stats.skip(f"Pad before a flattened map not folded: {reason}")
        return None
    amounts = pad_amounts(pad)
    top, left, bottom, right = (int(amounts[i]) for i in (2, 3, 6, 7))
    channels, height, width = source.input_dims
    data = pad.inputs[0]
    if static_map_dims(data) != (channels, height - top - bottom, width - left - right):
        return None
    pads = tuple(a + b for a, b in zip(source.pads, (top, left, bottom, right)))
    return replace(source, tensor=data, pads=pads, folded=(*source.folded, pad))


def fold_mul_into_map(source: FeatureMap, mul: gs.Node, stats: PassStats) -> FeatureMap | None:
    """A Conv over x * s, s one value or one per channel, is the Conv over x with input channel c of its weight scaled by s[c].

    Where the Mul broadcasts a one-channel x to C channels, the C scaled input channels of the
    weight add up to one. Zero padding stays zero under the scale, so folded Pads may sit between.
    """
    if (operands := scale_operands(mul)) is None:
        return None
    data, scale = operands
    channels, height, width = source.input_dims
    dims = static_map_dims(data)
    if dims not in ((channels, height, width), (1, height, width)) or constant_value(data) is not None:
        return None
    if (reason := map_scale_not_foldable(scale, source.weight.dtype, channels)) is not None:
        stats.skip(f"Mul before a flattened map not folded: {reason}")
        return None
    if dims[0] != channels and scale.size != channels:
        return None  # one channel times one value is one channel: the shapes disagree, trust neither
    s = np.broadcast_to(scale.astype(np.float64).reshape(-1), (channels,))
    weight = source.weight.astype(np.float64) * s[None, :, None, None]
    if dims[0] != channels:
        weight = weight.sum(axis=1, keepdims=True)
    folded = in_dtype(weight, source.weight.dtype)
    if folded is None:
        stats.skip("Mul before a flattened map not folded: the scaled weights overflow their dtype")
        return None
    return replace(source, tensor=data, weight=folded, folded=(*source.folded, mul))


def static_map_dims(tensor: gs.Tensor) -> tuple[int, int, int] | None:
    """C, H, W of a 4-D tensor whose C, H and W are known."""
    if rank(tensor) != 4 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in tensor.shape[1:]):
        return None
    return tuple(int(d) for d in tensor.shape[1:])


def map_scale_not_foldable(scale: np.ndarray, dtype: np.dtype, channels: int) -> str | None:
    """Why a constant that multiplies a [B, C, H, W] map cannot be folded into the input channels of a weight, or None."""
    if scale.dtype != dtype:
        return "scale dtype differs from the weight's"
    if scale.ndim > 4:
        return "scale has more than 4 dimensions"
    shape = (1,) * (4 - scale.ndim) + scale.shape
    if shape[0] != 1:
        return "scale varies over the batch"
    if shape[2:] != (1, 1):
        return "scale varies within a channel"
    if shape[1] not in (1, channels):
        return "scale is not one value or one per channel"
    if not np.all(np.isfinite(scale)):
        return "scale is not finite"
    return None


def pad_not_foldable(pad: gs.Node) -> str | None:
    """Why a Pad cannot become a Conv's `pads` (zeros, on H and W only), or None."""
    mode = pad.attrs.get("mode", "constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return "mode is not constant"
    if len(pad.inputs) > 3 and pad.inputs[3].name:
        return "it pads listed axes"  # opset 18's `axes` input
    amounts = pad_amounts(pad)
    if amounts is None or amounts.shape != (8,):
        return "pads are not a constant of four begin/end pairs"
    if np.any(amounts[[0, 1, 4, 5]] != 0):
        return "it pads the batch or channel axis"
    if np.any(amounts < 0):
        return "it crops (negative pads)"
    value = pad_value(pad)
    if value is None or value.size != 1 or value.reshape(-1)[0] != 0:
        return "pad value is not a constant zero"
    return None


def pad_amounts(pad: gs.Node) -> np.ndarray | None:
    """A Pad's begin/end amounts: an input from opset 11, an attribute before."""
    if len(pad.inputs) > 1 and pad.inputs[1].name:
        values = constant_value(pad.inputs[1])
        return None if values is None else np.asarray(values, dtype=np.int64).reshape(-1)
    values = pad.attrs.get("pads")
    return None if values is None else np.asarray(values, dtype=np.int64)


def pad_value(pad: gs.Node) -> np.ndarray | None:
    """A Pad's fill value: an optional input from opset 11, the `value` attribute (default 0) before."""
    if len(pad.inputs) > 2 and pad.inputs[2].name:
        return constant_value(pad.inputs[2])
    return np.array(float(pad.attrs.get("value", 0.0)))


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


def next_in_chain(graph: gs.Graph, linear: Linear, entries: dict[str, Linear]) -> tuple[tuple[gs.Node, ...], Linear] | None:
    """The ops after `linear` and the linear they lead to, if the chain goes on.

    `entries` maps the name of the node that reads each linear's input (nodes[0]) to the linear.
    The walk follows a tensor's one reader that can be carried in 4-D or is a linear; readers that
    cannot are kept on the 2-D tensor. Two carriable readers would fork the chain: it stops.
    """
    ops: list[gs.Node] = []
    tensor = linear.output
    while not used_in_subgraph(graph, tensor):
        following = [c for c in tensor.outputs if c.name in entries and entries[c.name].input is tensor]
        carriable = [c for c in tensor.outputs if c.name not in entries and carries_in_4d(graph, c, tensor)]
        if len(following) + len(carriable) != 1:
            return None
        if following:
            return tuple(ops), entries[following[0].name]
        ops.append(carriable[0])
        tensor = carriable[0].outputs[0]
    return None


# -- rewrite helpers --------------------------------------------------------------------------------


def view_as_map(graph: gs.Graph, x: gs.Tensor, k: int, stem: str) -> gs.Tensor:
    """[B, K] as [B, K, 1, 1], for a 1x1 Conv: Reshape(x, [0, K, 1, 1]), whose 0 copies a symbolic batch.

    Linears that read one tensor share one view (the first site rewritten makes it), so their
    Convs read one tensor too and merge-convs, later in `all`, sees them as siblings. In two
    cases that view is one onnxsim would change the next time `simplify` runs, so it differs:
    1. an earlier chain's Flatten writes x: the view is that Flatten's [B, K, 1, 1] input;
    2. a Flatten, Squeeze or Unsqueeze computes x: fuse_reshape_family would make the view read
       that op's input, and fuse_consecutive_reshapes (the view then has no 0) go on up through
       every Reshape-like op above it. The view reads the tensor at the top of those ops with
       [-1, K, 1, 1] (or is that tensor, if it is [B, K, 1, 1] already), when that tensor has
       x's batch dim and per-sample dims that are known and hold K values: the ops are then one
       exact reshape, which cannot fail where they could (a Squeeze of a dim not proven to be 1).
       So it does when the ops are Flattens alone (which cannot fail) and x has a static K
       columns, as after a token-wise Flatten(axis=2) of [N, C, H, W]. onnxsim would write the
       joined Reshape's first dim as -1 when it is symbolic and as a number when static; both
       read the same, and it leaves a Reshape(top, [-1, K, 1, 1]) alone.
    """
    if (flattened := flattened_maps(graph).get(x.name)) is not None:
        return flattened
    source, target = x, [0, k, 1, 1]
    producer = x.inputs[0] if len(x.inputs) == 1 else None
    if producer is not None and producer.op in ("Flatten", "Squeeze", "Unsqueeze") and in_default_domain(producer):
        top = reshape_family_top(x)
        if reshapes_exactly_to_rows(top, x, k) or flattens_to_rows_of_k(top, x, k):
            if top.shape is not None and tuple(top.shape[1:]) == (k, 1, 1):
                return top
            source, target = top, [-1, k, 1, 1]
    for reader in source.outputs:
        if reader.op == "Reshape" and reader.inputs[0] is source and len(reader.inputs) == 2 and len(reader.outputs) == 1:
            shape = constant_value(reader.inputs[1])
            if shape is not None and shape.tolist() == target and not reader.attrs.get("allowzero", 0):
                return reader.outputs[0]
    shape = make_constant(graph, f"{stem}/as_map_shape", np.array(target, dtype=np.int64))
    x4 = gs.Variable(unique_name(graph, f"{stem}/as_map"), dtype=x.dtype)
    graph.nodes.append(gs.Node("Reshape", unique_name(graph, f"{stem}/as_map"), inputs=[source, shape], outputs=[x4]))
    return x4


def reshape_family_top(x: gs.Tensor) -> gs.Tensor:
    """The tensor above the chain of Flatten, Reshape, Squeeze and Unsqueeze ops that computes x."""
    while len(x.inputs) == 1 and x.inputs[0].op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze") and in_default_domain(x.inputs[0]):
        x = x.inputs[0].inputs[0]
    return x


def reshapes_exactly_to_rows(top: gs.Tensor, x: gs.Tensor, k: int) -> bool:
    """Whether `top` has x's batch dim (the same known size or symbol) and known per-sample dims of K values."""
    if top.shape is None or len(top.shape) < 1 or x.shape is None or x.shape[0] is None or top.shape[0] != x.shape[0]:
        return False
    per_sample = top.shape[1:]
    return all(isinstance(d, (int, np.integer)) and d >= 0 for d in per_sample) and math.prod(per_sample) == k


def flattens_to_rows_of_k(top: gs.Tensor, x: gs.Tensor, k: int) -> bool:
    """Whether x, of static shape [*, K], is computed from `top` by default-domain Flattens alone.

    Flatten keeps the element order and never fails, so x is exactly Reshape(top, [-1, K]).
    """
    if x.shape is None or len(x.shape) != 2 or not isinstance(x.shape[1], (int, np.integer)) or x.shape[1] != k:
        return False
    while x is not top:
        producer = x.inputs[0]
        if producer.op != "Flatten":
            return False
        x = producer.inputs[0]
    return True


def pointwise_kernel(weight: np.ndarray) -> np.ndarray:
    """An [N, K] weight as the [N, K, 1, 1] kernel of a 1x1 Conv."""
    return weight.reshape((*weight.shape, 1, 1))


def flattened_maps(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """2-D tensors that emit_flatten wrote in this graph, by name, with the [B, N, 1, 1] tensor each flattens."""
    # graph.__dict__, not getattr: graphsurgeon's Graph.__getattr__ logs an error for unknown names
    return graph.__dict__.setdefault("_fc_to_conv_flattened", {})


def emit_conv(
    graph: gs.Graph, x4: gs.Tensor, weight: np.ndarray, bias: np.ndarray | None, kernel: tuple[int, int],
    pads: tuple[int, int, int, int], stem: str,
) -> gs.Variable:
    inputs = [x4, make_constant(graph, f"{stem}/conv_weight", weight)]
    if bias is not None:
        inputs.append(make_constant(graph, f"{stem}/conv_bias", bias))
    y4 = gs.Variable(unique_name(graph, f"{stem}/conv"), dtype=x4.dtype)
    attrs = {"kernel_shape": list(kernel), "strides": [1, 1], "pads": list(pads), "dilations": [1, 1], "group": 1}
    graph.nodes.append(gs.Node("Conv", unique_name(graph, f"{stem}/conv"), attrs=attrs, inputs=inputs, outputs=[y4]))
    return y4


def emit_flatten(graph: gs.Graph, x4: gs.Tensor, output: gs.Tensor, chain_reader: gs.Node | None) -> int:
    """[B, N, 1, 1] -> the original [B, N] tensor object (its name, dtype and shape are kept).

    Reshapes with a constant shape that read `output` read the 4-D tensor instead: onnxsim would
    fold a Flatten -> Reshape pair into one Reshape the next time `simplify` runs. The Flatten
    is emitted only for what else reads `output`: a graph output, a subgraph, another op, but
    not `chain_reader`, the chain's next op, which reads the 4-D tensor once it is rewritten.
    Returns the number of Flattens emitted.
    """
    for reader in [r for r in output.outputs if reshapes_as_data(r, output)]:
        replace_input(reader, output, x4)
    others = [r for r in output.outputs if r is not chain_reader]
    if not others and not is_graph_output(graph, output) and not used_in_subgraph(graph, output):
        return 0
    name = unique_name(graph, f"{output.name}/flatten")
    graph.nodes.append(gs.Node("Flatten", name, attrs={"axis": 1}, inputs=[x4], outputs=[output]))
    flattened_maps(graph)[output.name] = x4
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
        flattens += emit_flatten(graph, new, old, next_node)
        x2, x4 = old, new
    return x4, flattens
