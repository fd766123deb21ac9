"""fc-to-conv: run fully connected layers as convolutions, and what follows them in 4-D.

Matches a *linear*: a Gemm (transA=0, any transB, alpha, beta; bias one value or one per output
channel) or a MatMul whose weight is a constant 2-D matrix (`graphs.weight`) and whose input is a
2-D [B, K] tensor of float32 or float16. Elementwise ops that read a linear's output and compute
the same on [B, N, 1, 1] (activations, BatchNormalization, Dropout, Add/Mul/... of operands of
rank 2 or less, the erf-GELU pattern) are *carried* into 4-D; linears and carried ops joined by
tensors form one site (a classifier head, LeViT's two heads and their Add, a fork).

Emits, per site:
1. each linear as a Conv: over the [B, C, H, W] map itself with an HxW kernel when its input is
   a per-sample Flatten/Reshape (or a Squeeze of a pooled [B, C, 1, 1] map) of it, else 1x1 over
   Reshape(x, [0, 0, 1, 1]), or over the 4-D tensor of the carried op it reads;
2. the carried ops on the 4-D tensors, their operands viewed in 4-D (a constant reshaped, a
   tensor through Reshape(t, [0, .., 1, 1])): two unit dims appended, so broadcasting is unchanged;
3. a Flatten(axis=1) writing each original 2-D tensor something outside the site reads (another
   op, a graph output, a subgraph): names, dtypes and shapes stay; the batch is never spelled
   out, so a symbolic batch works.
Q/DQ heads (ONNX Runtime's int8 -> DQ weights and int32 biases, ModelOpt's float -> Q -> DQ) stay
in that form: the stored integers are reshaped (never dequantized), scales and zero points kept,
a per-channel axis becomes the Conv's output channel axis 0. A per-tensor Q/DQ writing the input
is copied onto the 4-D tensor the Conv reads (it commutes exactly with Flatten/Reshape), and
per-tensor Q/DQ after a linear are carried like any elementwise op, so each Conv reads a
DequantizeLinear and a QuantizeLinear reads the Conv.
The pass folds nothing but a Gemm's alpha and beta into a float weight and bias. A BatchNormalization,
bias Add or Mul by a per-channel constant after a linear is carried and lands right after its Conv,
a zero Pad or constant Mul in front of a flattened map stays in front of the Conv, and the
canonicalization that follows the pass (onnxsim) fuses them into it; docs/passes/fc-to-conv.md
lists what onnxsim folds and what it leaves (a bias Add after a Gemm that has a bias stays).

Why TensorRT benefits: TensorRT 10 has no FullyConnected layer; the ONNX parser imports a Gemm as
a MatrixMultiply plus elementwise layers for alpha, beta and bias. A Convolution takes its bias
as a weight and fuses with the activation, elementwise sum or per-channel scale after it (Layer
Fusion Catalog: Convolution and ReLU/GELU/Clip/Generic Activation, Convolution and ElementWise
Operation, Convolution and Scale). So nothing may sit between a Conv and that op: a site whose
Conv would be followed by a Flatten and then an activation or Add it cannot carry is declined.
No TensorRT speed-up has been measured; on cuDNN an FC head ran 0.90x (docs/passes/fc-to-conv.md
has the sources and the numbers).

Declines, counting each reason: Gemm transA=1; a runtime weight, a MatMul of two activations
(attention is never touched); a quantized weight that is blocked, per input channel, not int8/uint8,
behind a float input (weight-only), or with alpha/beta != 1; a per-axis, blocked or runtime-scaled
Q/DQ on the input, or one after a linear that cannot be carried; a constant input, an input
of unknown rank or rank other than 2, a dtype other than float32/float16 or weight and input
dtypes that differ; a Gemm bias that is not a per-channel constant; alpha/beta that overflow
float16 when folded; token-wise linears of transformers unless `token_linears` (their rows are
tokens; no source says a Conv runs them faster: measure); a flattened map computed by a Mul that
broadcasts channels (onnxsim folds it into the Conv wrongly); the Flatten-before-fusion case
above; opsets below 7.
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graphs import (
    DEFAULT_DOMAINS,
    FLOAT_DTYPES,
    constant_value,
    Weight,
    in_dtype,
    is_graph_output,
    make_constant,
    make_weight,
    nodes_with_op,
    per_tensor_problem,
    producer_of,
    rank,
    unique_name,
    used_in_subgraph,
    weight,
)
from graphopt.lint.fusion import FUSION_PARTNERS
from graphopt.passbase import GraphPass, PassStats, Site

# Elementwise ops that read their first input per element and keep its shape at any rank; their
# other inputs (Clip's bounds) are scalars. Carried from [B, N] to [B, N, 1, 1] unchanged.
RANK_FREE_UNARY = frozenset({
    "Abs", "Celu", "Ceil", "Clip", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
    "HardSwish", "Identity", "LeakyRelu", "Log", "Mish", "Neg", "Reciprocal", "Relu", "Round",
    "Selu", "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu",
})
# Broadcasting elementwise ops: carried when every operand is carried or has rank <= 2.
BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"})
# What canonicalization fuses into the Conv before it, given constant operands (onnxsim's
# fuse_bn_into_conv, fuse_add_bias_into_conv, fuse_mul_into_conv; Dropout/Identity eliminated).
FUSED_INTO_CONV = frozenset({"BatchNormalization", "Add", "Mul", "Dropout", "Identity"})
QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
# How quantized weights and biases may be stored to be reshaped here: the integers (int32: biases),
# or ModelOpt's float weights in front of a QuantizeLinear. int4 and float8 are not handled.
QUANTIZED_STORAGE = frozenset(np.dtype(t) for t in (np.int8, np.uint8, np.int32, np.float16, np.float32))


@dataclass(frozen=True)
class FcToConvOptions:
    # Also rewrite token-wise linears of transformers; off by default (see the module docstring).
    token_linears: bool = False


@dataclass(frozen=True)
class Linear:
    """One fully connected layer: output = input @ weight.T + bias."""

    node: gs.Node
    weight: np.ndarray  # [N, K] as stored: float with alpha folded in, or a quantized weight's integers
    bias: np.ndarray | None  # [N] as stored, beta folded in
    source: gs.Tensor | None  # the static [B, C, H, W] map whose per-sample flatten is the input
    weight_form: Weight  # the original weight and bias: new ones are built in their form
    bias_form: Weight | None
    quantizer: tuple[gs.Node, gs.Node] | None  # the per-tensor QuantizeLinear -> DequantizeLinear writing the input

    @property
    def input(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]


@dataclass(frozen=True)
class Component:
    """A site: linears and the ops carried in 4-D between and after them, in graph order."""

    members: tuple[gs.Node, ...]
    linears: dict[str, Linear]

    @property
    def key(self) -> str:
        return "+".join(self.linears)


class FcToConv(GraphPass[FcToConvOptions]):
    name = "fc-to-conv"
    summary = "Run Gemm/MatMul linears with constant weights as Conv, keeping what follows them 4-D."
    Options = FcToConvOptions
    order = 40

    # -- match -------------------------------------------------------------------------------------

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        if int(graph.opset) < 7:
            stats.skip("opset below 7")
            return []
        linears = {}
        for node in nodes_with_op(graph, "Gemm", "MatMul"):
            match = self.match_linear(node)
            if isinstance(match, str):
                stats.skip(match)
            else:
                linears[node.name] = match
        sites = []
        top_level = {id(node) for node in graph.nodes}  # a tensor's readers include nodes of subgraphs
        for component in connected_components(graph, linears):
            if (reason := flatten_before_fused_op(component, top_level) or quantizer_left_in_2d(component, top_level)) is not None:
                stats.skip(reason)
            else:
                sites.append(Site(component.key, component))
        return sites

    def match_linear(self, node: gs.Node) -> Linear | str:
        """The linear a Gemm/MatMul computes, or why the pass leaves it alone."""
        if (reason := reason_not_a_linear(node)) is not None:
            return reason
        if (linear := read_linear(node)) is None:
            return "Gemm alpha or beta would overflow the weight dtype when folded"
        if not self.options.token_linears and is_token_linear(node):
            return "token-wise linear (token_linears=false)"
        if linear.source is not None and channels_broadcast_in_front(linear.source):
            return "the flattened map is a Mul that broadcasts channels (onnxsim folds it into a Conv wrongly)"
        dequantized_map = linear.source is not None and producer_of(linear.source, "DequantizeLinear") is not None
        if linear.weight_form.quantized and linear.quantizer is None and not dequantized_map:
            # the Conv would read a float tensor: what TensorRT builds of a Conv with only its weight quantized is not known here
            return "weight quantized but not the input (weight-only quantization)"
        return linear

    # -- rewrite -----------------------------------------------------------------------------------

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        component: Component = site.payload
        twins: dict[str, gs.Tensor] = {}  # 2-D tensor name -> its [B, N, 1, 1] twin
        originals: list[gs.Tensor] = []
        converted, carried = [], []
        for node in component.members:
            original = node.outputs[0]
            originals.append(original)
            if (linear := component.linears.get(node.name)) is None:
                twins[original.name] = carry(graph, node, twins)
                carried.append(node.op)
                continue
            if linear.input.name in twins:  # a carried QuantizeLinear -> DequantizeLinear's too
                x4, kernel = twins[linear.input.name], (1, 1)
            elif linear.source is not None:
                x4, kernel = linear.source, (int(linear.source.shape[2]), int(linear.source.shape[3]))
                stats.counters["flattens_folded_into_kernel"] += 1
            else:
                x = unquantized(linear)
                x4, kernel = (twins[x.name] if x.name in twins else view_in_4d(graph, x)), (1, 1)
            if linear.quantizer is not None and linear.input.name not in twins:
                x4 = quantize_in_4d(graph, linear.quantizer, x4)
                stats.counters["input_quantizers_moved_to_4d"] += 1
            twins[linear.output.name] = emit_conv(graph, linear, x4, kernel)
            node.inputs.clear()
            node.outputs.clear()
            n, k = linear.weight.shape
            converted.append(f"{node.op} {node.name} {k}->{n} as a {kernel[0]}x{kernel[1]} Conv")
        flattens = sum(emit_flatten(graph, tensor, twins[tensor.name]) for tensor in originals)
        stats.counters["linears_converted"] += len(converted)
        stats.counters["ops_carried_in_4d"] += len(carried)
        stats.details.append({"site": component.key, "linears": converted, "carried_in_4d": carried, "flattens": flattens})


# -- matching helpers -------------------------------------------------------------------------------


def reason_not_a_linear(node: gs.Node) -> str | None:
    """Why a Gemm/MatMul is not a linear this pass can convert, or None."""
    x = node.inputs[0]
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA=1"
    w = weight(node.inputs[1])
    if w is None:
        if (dequantize := producer_of(node.inputs[1], "DequantizeLinear")) is not None and dequantize.attrs.get("block_size", 0):
            return "weight quantized in blocks (block_size)"
        return "MatMul of two activations" if node.op == "MatMul" and weight(x) is None else "weight is not a constant"
    if weight(x) is not None:
        return "input is a constant"
    if isinstance(quantizer := activation_quantizer(x), str):
        return quantizer
    if w.quantized and (reason := quantized_weight_not_reshapable(node, w)) is not None:
        return reason
    if rank(x) != 2:
        return "input rank unknown" if rank(x) is None else f"input has rank {rank(x)}"
    if tensor_dtype(x) not in FLOAT_DTYPES:
        return "dtype is not float32/float16"
    if w.dtype != tensor_dtype(x):
        return "weight dtype differs from input dtype"
    if w.stored.ndim != 2:
        return "weight is not 2-D"
    n, k = w.shape if node.op == "Gemm" and node.attrs.get("transB", 0) else w.shape[::-1]
    if isinstance(x.shape[1], (int, np.integer)) and x.shape[1] != k:
        return "weight does not match the input"
    return gemm_bias_not_per_channel(node, n)


def activation_quantizer(tensor: gs.Tensor) -> tuple[gs.Node, gs.Node] | str | None:
    """The per-tensor QuantizeLinear -> DequantizeLinear writing `tensor`, None when no
    DequantizeLinear writes it, or why the pass cannot move that quantizer onto a 4-D tensor.

    One scale and zero point for every element: Q and DQ are then elementwise and commute with any
    reshape, so Q/DQ(Flatten(m)) = Flatten(Q/DQ(m)) exactly. A per-axis or blocked one does not.
    """
    dequantize = producer_of(tensor, "DequantizeLinear")
    if dequantize is None:
        return None
    quantize = producer_of(dequantize.inputs[0], "QuantizeLinear")
    if quantize is None:
        return "input is dequantized from a tensor no QuantizeLinear computes"
    for node in (quantize, dequantize):
        if (reason := per_tensor_problem(node)) is not None:
            return f"input {reason}"
    return quantize, dequantize


def quantized_weight_not_reshapable(node: gs.Node, w: Weight) -> str | None:
    """Why a Q/DQ weight cannot become a Conv weight by reshaping its integers, or None.

    Its scale must stay per output channel (the Conv's axis 0) or per tensor; alpha and beta would
    have to change the integers or scales, which is not exact.
    """
    q = w.quantization
    if w.stored.dtype not in QUANTIZED_STORAGE:
        return f"weight quantized as {w.stored.dtype} (int8/uint8 only)"
    output_axis = 0 if node.op == "Gemm" and node.attrs.get("transB", 0) else 1
    if q.axis is not None and q.axis != output_axis:
        return "weight quantized per input channel"
    if node.op == "Gemm" and (float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0):
        return "Gemm alpha or beta with a quantized weight (cannot be folded into its integers)"
    return None


def tensor_dtype(tensor: gs.Tensor) -> np.dtype | None:
    try:
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:  # an ONNX-only type (bfloat16, float8...) that NumPy cannot name
        return None


def gemm_bias_not_per_channel(node: gs.Node, n: int) -> str | None:
    if node.op != "Gemm" or len(node.inputs) < 3 or not node.inputs[2].name:
        return None
    bias = weight(node.inputs[2])
    if bias is None:
        return "Gemm bias is not a constant"
    if bias.quantized and bias.stored.dtype not in QUANTIZED_STORAGE:
        return f"Gemm bias quantized as {bias.stored.dtype}"
    if bias.quantized and float(node.attrs.get("beta", 1.0)) != 1.0:
        return "Gemm beta with a quantized bias (cannot be folded into its integers)"
    if per_channel(bias.stored, n) is None:
        return f"Gemm bias of shape {list(bias.shape)} is not per-channel"
    return None


def per_channel(values: np.ndarray, n: int) -> np.ndarray | None:
    """`values` as an [N] bias if it broadcasts over a [B, N] output the same way for every row."""
    if values.ndim > 2 or (values.ndim == 2 and values.shape[0] != 1) or values.size not in (1, n):
        return None
    return np.broadcast_to(values.reshape(-1), (n,))


def read_linear(node: gs.Node) -> Linear | None:
    """The [N, K] weight and [N] bias of a checked Gemm/MatMul, as stored, alpha and beta folded
    into float ones (computed in float64; a quantized weight has neither); None when that
    overflows the weight's dtype (float16 ends at 65504)."""
    w = weight(node.inputs[1])
    gemm = node.op == "Gemm"
    matrix = w.stored if gemm and node.attrs.get("transB", 0) else w.stored.T
    alpha, beta = (float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))) if gemm else (1.0, 1.0)
    # alpha = beta = 1 (every exporter's Gemm) needs no arithmetic: a float64 copy of a large
    # classifier's weight was most of the pass's time.
    folded = matrix if alpha == 1.0 else in_dtype(matrix.astype(np.float64) * alpha, w.dtype)
    bias, bias_form = None, None
    if gemm and len(node.inputs) > 2 and node.inputs[2].name:
        bias_form = weight(node.inputs[2])
        values = per_channel(bias_form.stored, matrix.shape[0])
        dtype = values.dtype if bias_form.quantized else w.dtype
        bias = values.astype(dtype) if beta == 1.0 else in_dtype(values.astype(np.float64) * beta, dtype)
        if bias is None:
            return None
    if folded is None:
        return None
    quantizer = activation_quantizer(node.inputs[0])
    x = quantizer[0].inputs[0] if quantizer is not None else node.inputs[0]
    return Linear(node, folded, bias, flattened_map(x, matrix.shape[1]), w, bias_form, quantizer)


def unquantized(linear: Linear) -> gs.Tensor:
    """The linear's input, before the QuantizeLinear -> DequantizeLinear writing it if any."""
    return linear.quantizer[0].inputs[0] if linear.quantizer is not None else linear.input


def flattened_map(x: gs.Tensor, k: int) -> gs.Tensor | None:
    """The [B, C, H, W] map (C, H, W static, C*H*W = K) whose per-sample flatten `x` is."""
    producer = x.inputs[0] if len(x.inputs) == 1 else None
    if producer is None or producer.op not in ("Flatten", "Reshape", "Squeeze") or producer.domain not in DEFAULT_DOMAINS:
        return None
    data = producer.inputs[0]
    dims = data.shape[1:] if rank(data) == 4 else ()
    if not dims or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims) or math.prod(dims) != k:
        return None
    if constant_value(data) is not None or tensor_dtype(data) != tensor_dtype(x):
        return None
    return data if flattens_per_sample(producer) else None


def flattens_per_sample(node: gs.Node) -> bool:
    """Whether a Flatten/Reshape/Squeeze provably turns [B, d1, ..., dk] into [B, d1*...*dk]."""
    data = node.inputs[0]
    data_rank = rank(data)
    if data_rank is None or data_rank < 2:
        return False
    if node.op == "Flatten":
        return int(node.attrs.get("axis", 1)) in (1, 1 - data_rank)
    if node.op == "Squeeze":  # of a pooled [B, C, 1, 1] map; axes an attribute before opset 13
        axes = constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else node.attrs.get("axes")
        unit_spatial = data_rank == 4 and all(isinstance(d, (int, np.integer)) and d == 1 for d in data.shape[2:])
        return unit_spatial and axes is not None and sorted(int(a) % 4 for a in np.ravel(axes)) == [2, 3]
    shape = constant_value(node.inputs[1]) if node.op == "Reshape" and len(node.inputs) > 1 else None
    if shape is None or shape.shape != (2,):
        return False
    first, second = (int(v) for v in shape)
    rest = math.prod(data.shape[1:]) if all(isinstance(d, (int, np.integer)) for d in data.shape[1:]) else None
    batch = data.shape[0]
    keeps_batch = (first == 0 and not node.attrs.get("allowzero", 0)) or (isinstance(batch, (int, np.integer)) and first == batch > 0)
    if keeps_batch:  # [0 or B, -1] or [0 or B, rest]
        return second == -1 or second == rest
    return first == -1 and rest is not None and rest > 0 and second == rest  # -1 infers B from B * rest elements


def channels_broadcast_in_front(tensor: gs.Tensor) -> bool:
    """Whether a Mul that widens the channels (1 -> C) computes the map, through the zero Pads and
    constant Muls onnxsim folds into the Conv that reads it: its fold keeps all C kernel channels
    for a one-channel input, and the model it returns fails to run."""
    while len(tensor.inputs) == 1 and (producer := tensor.inputs[0]).op in ("Mul", "Pad") and producer.domain in DEFAULT_DOMAINS:
        operands = producer.inputs[:2] if producer.op == "Mul" else producer.inputs[:1]
        data = [t for t in operands if constant_value(t) is None]
        if len(data) != 1:
            return False
        if producer.op == "Mul" and (rank(data[0]) != 4 or rank(tensor) != 4 or data[0].shape[1] != tensor.shape[1]):
            return True
        tensor = data[0]
    return False


def is_token_linear(node: gs.Node) -> bool:
    """A transformer's per-token linear: its rows are tokens, not samples. Its 2-D input is a
    Reshape/Flatten of a rank-3+ tensor that is not a per-sample flatten, or its output is
    reshaped to rank 3 while its input is not a per-sample flatten."""
    x, y = node.inputs[0], node.outputs[0]
    if isinstance(quantizer := activation_quantizer(x), tuple):
        x = quantizer[0].inputs[0]
    producer = x.inputs[0] if len(x.inputs) == 1 else None
    from_rows = producer is not None and producer.op in ("Flatten", "Reshape") and (rank(producer.inputs[0]) or 0) >= 3
    per_sample = from_rows and flattens_per_sample(producer)
    readers = [*y.outputs, *(r for q in y.outputs if q.op == "QuantizeLinear" for d in q.outputs[0].outputs
                             if d.op == "DequantizeLinear" for r in d.outputs[0].outputs)]
    reshaped_to_tokens = any(c.op == "Reshape" and rank(c.outputs[0]) == 3 for c in readers)
    return (from_rows or reshaped_to_tokens) and not per_sample


def carries_in_4d(graph: gs.Graph, node: gs.Node, carried: Container[str]) -> bool:
    """Whether `node`, reading a carried [B, N] tensor, computes the same on [B, N, 1, 1] twins."""
    if node.domain not in DEFAULT_DOMAINS or not node.inputs or len(node.outputs) < 1:
        return False
    if any(t.outputs or is_graph_output(graph, t) for t in node.outputs[1:]):
        return False  # Dropout's mask or BatchNormalization's running statistics are read
    first_carried = node.inputs[0].name in carried
    others_inert = not any(t.name in carried for t in node.inputs[1:])
    if node.op in BROADCASTING:
        return all(t.name in carried or (rank(t) is not None and rank(t) <= 2) for t in node.inputs) and (node.op != "PRelu" or first_carried)
    if node.op in RANK_FREE_UNARY:
        return first_carried and others_inert and all(not t.name or rank(t) == 0 for t in node.inputs[1:])
    if node.op == "Dropout":  # an identity unless training_mode is set
        training = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.array(False)
        return first_carried and others_inert and training is not None and not bool(training)
    if node.op == "BatchNormalization":  # per channel on axis 1, of [B, N] and [B, N, 1, 1] alike
        return first_carried and others_inert and not node.attrs.get("training_mode", 0) and node.attrs.get("spatial", 1) == 1
    if node.op in QDQ:  # elementwise when per tensor; per-axis ones are declined (quantizer_left_in_2d)
        return first_carried and others_inert and per_tensor_problem(node) is None
    return False


def connected_components(graph: gs.Graph, linears: dict[str, Linear]) -> list[Component]:
    """Linears and the ops carried after them, grouped by the tensors that join them.

    One sweep in graph (topological) order: a linear starts a component or joins the one whose
    carried tensor it reads; an op that carries in 4-D joins (and unites) the components of the
    carried tensors it reads.
    """
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    owner: dict[str, str] = {}  # carried tensor name -> the member that writes it
    members: list[gs.Node] = []
    for node in graph.nodes:
        if node.name in linears:  # its weight and bias are constants
            read = [owner[node.inputs[0].name]] if node.inputs[0].name in owner else []
        else:
            read = [owner[t.name] for t in node.inputs if t.name in owner]
            if not read or not carries_in_4d(graph, node, owner):
                continue
        parent[node.name] = node.name
        for other in read:
            parent[find(other)] = node.name
        members.append(node)
        owner[node.outputs[0].name] = node.name
    groups: dict[str, list[gs.Node]] = {}
    for node in members:
        groups.setdefault(find(node.name), []).append(node)
    return [Component(tuple(nodes), {n.name: linears[n.name] for n in nodes if n.name in linears}) for nodes in groups.values()]


def flatten_before_fused_op(component: Component, top_level: Container[int]) -> str | None:
    """Why the site would leave a Flatten between a Conv and an op TensorRT fuses with it, or None.

    Looks at what reads each linear's output, and past the ops canonicalization folds into the
    Conv (a BatchNormalization or Mul/Add of constants): what stays outside the site reads a Flatten.
    """
    names = {node.name for node in component.members}
    for linear in component.linears.values():
        tensor = linear.output
        while True:
            outside = [r for r in tensor.outputs
                       if id(r) in top_level and r.name not in names and r.op in FUSION_PARTNERS and r.domain in DEFAULT_DOMAINS]
            if outside:
                return f"a Flatten would sit between the Conv and the {outside[0].op} TensorRT fuses with it"
            follower = tensor.outputs[0] if len(tensor.outputs) == 1 else None
            if follower is None or follower.name not in names or follower.op not in FUSED_INTO_CONV | QDQ:
                break
            if any(t is not tensor and t.name and constant_value(t) is None for t in follower.inputs):
                break
            tensor = follower.outputs[0]
    return None


def quantizer_left_in_2d(component: Component, top_level: Container[int]) -> str | None:
    """Why a QuantizeLinear/DequantizeLinear the pass cannot carry (per axis, blocked) would read a
    Flatten of the site's output instead of the Conv's, or None. TensorRT fuses a Conv with the
    QuantizeLinear after it; a Flatten in between is not proven to keep that."""
    names = {node.name for node in component.members}
    for node in component.members:
        for reader in node.outputs[0].outputs:
            if id(reader) in top_level and reader.name not in names and reader.op in QDQ and reader.domain in DEFAULT_DOMAINS:
                return f"a {reader.op} that is not per tensor reads the site"
    return None


# -- rewrite helpers --------------------------------------------------------------------------------


def emit_conv(graph: gs.Graph, linear: Linear, x4: gs.Tensor, kernel: tuple[int, int]) -> gs.Variable:
    """The linear as a Conv over `x4`: the map it flattens (an HxW kernel) or a [B, K, 1, 1] view.

    Flatten is C-major, as NumPy's reshape is, so the [N, C*H*W] weight is the [N, C, H, W] kernel.
    """
    n, k = linear.weight.shape
    stem = linear.node.name
    # A quantized weight keeps its integers and scales; its per-channel axis is now the Conv's
    # output channel axis 0 (read_linear moved N first). A bias keeps its own (axis 0 of [N]).
    kernel_values = linear.weight.reshape(n, k // math.prod(kernel), *kernel)
    inputs = [x4, make_weight(graph, f"{stem}/conv_weight", linear.weight_form, kernel_values, axis=output_axis(linear.weight_form))]
    if linear.bias is not None:
        inputs.append(make_weight(graph, f"{stem}/conv_bias", linear.bias_form, linear.bias, axis=output_axis(linear.bias_form)))
    y4 = gs.Variable(unique_name(graph, f"{stem}/conv"), dtype=linear.output.dtype)
    attrs = {"kernel_shape": list(kernel), "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1}
    graph.nodes.append(gs.Node("Conv", unique_name(graph, f"{stem}/conv"), attrs=attrs, inputs=inputs, outputs=[y4]))
    return y4


def output_axis(form: Weight) -> int | None:
    """The per-channel axis of a new Conv weight or bias in `form`: 0, or None for one scale."""
    return None if form.quantization is None or form.quantization.axis is None else 0


def quantize_in_4d(graph: gs.Graph, quantizer: tuple[gs.Node, gs.Node], x4: gs.Tensor) -> gs.Variable:
    """A copy of the per-tensor QuantizeLinear -> DequantizeLinear on the 4-D tensor, for the Conv
    to read: same scales and zero points, so the same integers (the original stays for others)."""
    for node in quantizer:
        output = gs.Variable(unique_name(graph, f"{node.outputs[0].name}/4d"), dtype=node.outputs[0].dtype)
        copy = gs.Node(node.op, unique_name(graph, f"{node.name}/4d"), dict(node.attrs), inputs=[x4, *node.inputs[1:]], outputs=[output])
        graph.nodes.append(copy)
        x4 = output
    return x4


def view_in_4d(graph: gs.Graph, tensor: gs.Tensor) -> gs.Tensor:
    """`tensor` (rank <= 2) with two unit dims appended: it broadcasts against [B, N, 1, 1] as the
    original does against [B, N]. A constant is reshaped, a quantized one in its form (its axis
    index unchanged); a tensor goes through Reshape with 0s, which copy its dims (a symbolic batch too)."""
    r = rank(tensor)
    if r == 0:
        return tensor
    if (values := weight(tensor)) is not None:
        return make_weight(graph, f"{tensor.name}/4d", values, values.stored.reshape(*values.shape, 1, 1))
    shape = make_constant(graph, f"{tensor.name}/as_4d_shape", np.array([0] * r + [1, 1], dtype=np.int64))
    viewed = gs.Variable(unique_name(graph, f"{tensor.name}/4d"), dtype=tensor.dtype)
    graph.nodes.append(gs.Node("Reshape", unique_name(graph, f"{tensor.name}/as_4d"), inputs=[tensor, shape], outputs=[viewed]))
    return viewed


def carry(graph: gs.Graph, node: gs.Node, twins: dict[str, gs.Tensor]) -> gs.Variable:
    """Make `node` compute on 4-D twins; returns its new output. Its old output is left for a Flatten."""
    if node.op in ("Add", "Mul") and len(node.inputs) == 2 and node.inputs[1].name in twins and node.inputs[0].name not in twins:
        node.inputs[0], node.inputs[1] = node.inputs[1], node.inputs[0]  # onnxsim fuses Add(conv, bias), not Add(bias, conv)
    for index, tensor in enumerate(list(node.inputs)):
        if tensor.name in twins:
            node.inputs[index] = twins[tensor.name]
        elif node.op in BROADCASTING and tensor.name:
            node.inputs[index] = view_in_4d(graph, tensor)
    old = node.outputs[0]
    node.outputs[0] = gs.Variable(unique_name(graph, f"{old.name}/4d"), dtype=old.dtype)
    return node.outputs[0]


def emit_flatten(graph: gs.Graph, tensor: gs.Tensor, tensor4: gs.Tensor) -> int:
    """Flatten(axis=1) of the twin writes the original 2-D tensor where anything still reads it."""
    if not tensor.outputs and not is_graph_output(graph, tensor) and not used_in_subgraph(graph, tensor):
        return 0
    graph.nodes.append(gs.Node("Flatten", unique_name(graph, f"{tensor.name}/flatten"), attrs={"axis": 1}, inputs=[tensor4], outputs=[tensor]))
    return 1
