"""reparameterize: sibling Convs summed by Add (RepVGG, ACNet, MobileOne blocks) as one Conv.

Matches an Add tree (Adds whose inner results feed only the next Add) summing, for one input x:
  1. Convs reading x (any kernel sizes whose taps lie on one lattice, equal strides, dilations
     and group), each maybe followed by its own inference BatchNormalization;
  2. identity branches (stride 1, as many output as input channels): x itself, or an inference
     BatchNormalization of x (a per-channel scale, an identity kernel per group, and a shift).
At least one Conv and two branches on x. Other summands (a residual from elsewhere) stay, added
after the merged Conv.

Emits one Conv on x: kernel = the branch kernels summed, each zero-padded into the window that
covers them all; bias = the biases summed (BatchNormalizations folded first). It writes the Add
tree's output tensor, so a graph output keeps its name.

Why TensorRT benefits: a training-form block runs a convolution per branch where one gives the
same output. TensorRT fuses one elementwise sum into a convolution (a builder log shows
"conv2 + sum" beside a separate convolution: NVIDIA forum t/288714), and a TensorRT 7.1 build
merged sibling convolutions feeding Relus but not those summed by an Add (forum t/168691).
Reparameterized as timm does, PyTorch ran RepVGG-A0 2.1-2.7x and MobileOne-S0 5.4-6.9x faster on
an H200 (shared/evidence/h200-reparam-probe.md; FP16 cuDNN, not TensorRT). merge-convs would make
the siblings one wider Conv + Split + Add instead (RepVGG-A0: 3.03 -> 5.44 GFLOPs, issue 17);
this pass runs before it in `all` (RepVGG-A0: 3.03 -> 2.72 GFLOPs, MobileOne-S0: 2.10 -> 0.55).

Declines (counted by reason): a branch with runtime or quantized weights, auto_pad other than
NOTSET, a dtype other than float32/float16, a BatchNormalization that is no constant per-channel
affine; branches with different strides, group or dilations (a kernel of length 1 has none),
taps off one lattice, pads giving different output sizes; an identity branch beside a strided
Conv; a summed tensor that is read elsewhere, is a graph output or is read inside a subgraph;
Add operands of unknown or different shapes (broadcasting, an identity of other channels); a
merged kernel with more taps than the Convs had together (1x3 + 3x1 -> 3x3: the FLOPs would
grow); summed weights that overflow float16; Convs summed with no sibling on their input.

The tap geometry, the pads of the merged Conv and the identity kernel are derived in
docs/passes/reparameterize.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graphs import (
    DEFAULT_DOMAINS,
    FLOAT_DTYPES,
    in_dtype,
    is_graph_output,
    make_constant,
    node_names,
    nodes_with_op,
    unique_name,
    used_in_subgraph,
)
from graphopt.graphs import weight as graph_weight
from graphopt.passbase import GraphPass, PassStats, Site

FLOPS_GROW = "merged kernel has more taps than the summed Convs together (FLOPs would grow)"
DIFFERENT_INPUTS = "summed Convs read different inputs"
BROADCAST = "Add operands differ in shape (broadcasting) or are unknown"
READ_ELSEWHERE = "a summed tensor is read elsewhere, is a graph output or is read in a subgraph"


def constant_of(tensor: gs.Tensor) -> np.ndarray | None:
    """The one place this pass reads a constant (weights, biases, BatchNormalization parameters).
    A quantized weight reads as None: summing kernels would need their scales to agree."""
    found = graph_weight(tensor)
    return found.stored if found is not None and not found.quantized else None


@dataclass(frozen=True)
class Branch:
    """One summand on x as a Conv: its kernel and bias in float64, and where its taps fall."""

    nodes: tuple[gs.Node, ...]  # the Conv (and BatchNormalization) it replaces; () for x itself
    dtype: np.dtype  # of the weights (or of x, for an identity branch)
    weight: np.ndarray  # float64 [C_out, C_in / group, k...]; [C, 1, 1...] for an identity branch
    bias: np.ndarray  # float64 [C_out]
    begin: tuple[int, ...]  # pads before each spatial axis: the first tap sits at -begin
    end: tuple[int, ...]
    strides: tuple[int, ...] | None  # None for an identity branch (it fits any Conv of stride 1)
    dilations: tuple[int, ...] | None
    group: int | None

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def is_conv(self) -> bool:
        return self.strides is not None


@dataclass(frozen=True)
class Merge:
    """One site: the branches on x, summed into `weight` and `bias` under `attrs`."""

    source: gs.Tensor
    branches: list[Branch]
    root: gs.Node  # the Add whose output the result writes
    adds: list[gs.Node]
    others: list[gs.Tensor]  # summands that stay (not on x)
    weight: np.ndarray
    bias: np.ndarray | None
    attrs: dict
    positions: int  # output positions per image (for FLOPs)

    def flops(self, weight_shape: tuple[int, ...]) -> int:
        """2 x multiply-accumulates per image, as graphopt.flops counts a Conv."""
        return 2 * self.positions * math.prod(weight_shape)


class Reparameterize(GraphPass):
    name = "reparameterize"
    summary = "Sibling Convs (+ identity/BatchNormalization) summed by Add -> one Conv (RepVGG, MobileOne)."
    order = 45  # after fc-to-conv (whose 1x1 Convs can be branches), before merge-convs

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        sites = []
        for add in nodes_with_op(graph, "Add"):
            if is_summand(graph, add.outputs[0]):
                continue  # an inner Add: the tree's root handles it
            adds, leaves = add_tree(graph, add)
            plan = self.plan(graph, add, adds, leaves)
            if isinstance(plan, str):
                stats.skip(plan)
            elif plan is not None:
                sites.append(Site(node_names([n for b in plan.branches for n in b.nodes if n.op == "Conv"]), plan))
        return sites

    def plan(self, graph: gs.Graph, root: gs.Node, adds: list[gs.Node], leaves: list[gs.Tensor]) -> Merge | str | None:
        """The merge for one Add tree, the reason to leave it, or None when it is no such block."""
        sources = [branch_source(leaf) for leaf in leaves]
        convs = [source for leaf, source in zip(leaves, sources) if is_conv_branch(leaf)]
        # A block: a Conv on x and at least one more summand on x (another Conv, or an identity).
        blocks = list({id(x): x for x in convs if sum(s is x for s in sources) >= 2}.values())
        if not blocks:
            return DIFFERENT_INPUTS if len(convs) >= 2 else None
        if len(blocks) > 1:
            return "the Add tree sums branches of several inputs"
        [source] = blocks
        if (reason := shapes_differ(adds)) is not None:
            return reason
        branches = []
        for leaf, leaf_source in zip(leaves, sources):
            if leaf_source is source:
                branch = read_branch(graph, leaf, source)
                if isinstance(branch, str):
                    return branch
                branches.append(branch)
        if (reason := branches_incompatible(source, branches)) is not None:
            return reason
        others = [leaf for leaf, leaf_source in zip(leaves, sources) if leaf_source is not source]
        return summed(source, branches, root, adds, others)

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        merge: Merge = site.payload
        out = merge.root.outputs[0]
        widest = max((b for b in merge.branches if b.is_conv), key=lambda b: math.prod(b.kernel))
        stem = f"{widest.nodes[0].name}_reparameterized"
        for node in merge.adds + [n for b in merge.branches for n in b.nodes]:
            node.outputs.clear()
        inputs = [merge.source, make_constant(graph, f"{stem}_weight", merge.weight)]
        if merge.bias is not None:
            inputs.append(make_constant(graph, f"{stem}_bias", merge.bias))
        conv_out = out if not merge.others else gs.Variable(unique_name(graph, f"{stem}_output"), dtype=out.dtype, shape=out.shape)
        graph.nodes.append(gs.Node("Conv", unique_name(graph, stem), dict(merge.attrs), inputs=inputs, outputs=[conv_out]))
        total = conv_out
        for index, other in enumerate(merge.others):  # summands from elsewhere, added after
            last = index == len(merge.others) - 1
            result = out if last else gs.Variable(unique_name(graph, f"{stem}_sum"), dtype=out.dtype, shape=out.shape)
            graph.nodes.append(gs.Node("Add", unique_name(graph, f"{stem}_add"), inputs=[total, other], outputs=[result]))
            total = result

        convs = [b for b in merge.branches if b.is_conv]
        stats.counters["convs_merged"] += len(convs)
        stats.counters["identity_branches"] += sum(not b.is_conv for b in merge.branches)
        stats.counters["batchnorms_folded"] += sum(n.op == "BatchNormalization" for b in merge.branches for n in b.nodes)
        stats.counters["adds_removed"] += len(merge.adds) - len(merge.others)
        stats.details.append({
            "convs": [b.nodes[0].name for b in convs],
            "kernels": [list(b.kernel) for b in convs],
            "identity_branches": sum(not b.is_conv for b in merge.branches),
            "kernel": list(merge.weight.shape[2:]),
            "pads": list(merge.attrs["pads"]),
            "summands_kept": len(merge.others),
            "flops_before": sum(merge.flops(b.weight.shape) for b in convs),
            "flops_after": merge.flops(merge.weight.shape),
        })


# -- the Add tree ---------------------------------------------------------------------------------


def is_summand(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether an Add's output only feeds one more Add of the tree (so it vanishes with the tree)."""
    if len(tensor.outputs) != 1 or tensor.outputs[0].op != "Add" or tensor.outputs[0].domain not in DEFAULT_DOMAINS:
        return False
    return not is_graph_output(graph, tensor) and not used_in_subgraph(graph, tensor)


def add_tree(graph: gs.Graph, root: gs.Node) -> tuple[list[gs.Node], list[gs.Tensor]]:
    """The Adds of the tree rooted at `root` and the tensors it sums, left to right (one entry per use)."""
    adds, leaves, pending = [], [], [root]
    while pending:
        item = pending.pop()
        if isinstance(item, gs.Node):
            adds.append(item)
            pending.extend(reversed(item.inputs))
        elif producer_op(item) == "Add" and is_summand(graph, item):
            pending.append(item.inputs[0])
        else:
            leaves.append(item)
    return adds, leaves


def producer_op(tensor: gs.Tensor) -> str | None:
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    return producer.op if producer is not None and producer.domain in DEFAULT_DOMAINS else None


def is_conv_branch(leaf: gs.Tensor) -> bool:
    """A Conv's output, or a BatchNormalization of a Conv output that nothing else reads."""
    if producer_op(leaf) == "Conv":
        return True
    if producer_op(leaf) == "BatchNormalization":
        data = leaf.inputs[0].inputs[0]
        return producer_op(data) == "Conv" and len(data.outputs) == 1
    return False


def branch_source(leaf: gs.Tensor) -> gs.Tensor:
    """The tensor a summand is a branch of: a Conv's input, a BatchNormalization's input, or itself."""
    if is_conv_branch(leaf):
        conv_out = leaf.inputs[0].inputs[0] if producer_op(leaf) == "BatchNormalization" else leaf
        return conv_out.inputs[0].inputs[0]
    if producer_op(leaf) == "BatchNormalization":
        return leaf.inputs[0].inputs[0]
    return leaf


def shapes_differ(adds: list[gs.Node]) -> str | None:
    for add in adds:
        shapes = [t.shape for t in (*add.inputs, *add.outputs)]
        if any(s is None or any(d is None for d in s) for s in shapes) or any(s != shapes[0] for s in shapes):
            return BROADCAST
    return None


# -- one branch -------------------------------------------------------------------------------------


def read_branch(graph: gs.Graph, leaf: gs.Tensor, source: gs.Tensor) -> Branch | str:
    """A summand on `source` as a Branch, or why it cannot be summed into a Conv."""
    if leaf is source:
        return identity_branch(source, None)
    if (reason := summand_not_private(graph, leaf)) is not None:
        return reason
    if not is_conv_branch(leaf):
        return identity_branch(source, leaf.inputs[0])
    if producer_op(leaf) == "Conv":
        return conv_branch(leaf.inputs[0])
    batchnorm = leaf.inputs[0]
    conv = batchnorm.inputs[0].inputs[0]
    if (reason := summand_not_private(graph, conv.outputs[0])) is not None:
        return reason
    branch = conv_branch(conv)
    if isinstance(branch, str):
        return branch
    if (reason := batchnorm_not_foldable(batchnorm, branch.weight.shape[0], branch.dtype)) is not None:
        return reason
    scale, shift = batchnorm_affine(batchnorm)
    weight = branch.weight * scale.reshape(-1, *[1] * (branch.weight.ndim - 1))
    return replace(branch, nodes=(conv, batchnorm), weight=weight, bias=branch.bias * scale + shift)


def summand_not_private(graph: gs.Graph, tensor: gs.Tensor) -> str | None:
    if len(tensor.outputs) != 1 or is_graph_output(graph, tensor) or used_in_subgraph(graph, tensor):
        return READ_ELSEWHERE
    return None


def conv_branch(conv: gs.Node) -> Branch | str:
    """A Conv's kernel, bias and taps, or why they cannot be read."""
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        return "auto_pad is not NOTSET"
    kernel = constant_of(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if kernel is None:
        quantized = len(conv.inputs) > 1 and producer_op(conv.inputs[1]) == "DequantizeLinear"
        return "quantized weight (Q/DQ)" if quantized else "weight is not a constant"
    if kernel.dtype not in FLOAT_DTYPES:
        return "weight dtype is not float32 or float16"
    has_bias = len(conv.inputs) > 2 and bool(conv.inputs[2].name)
    bias = constant_of(conv.inputs[2]) if has_bias else np.zeros(kernel.shape[0], kernel.dtype)
    if bias is None:
        return "bias is not a constant"
    if bias.dtype != kernel.dtype or bias.shape != kernel.shape[:1]:
        return "bias dtype or shape differs from the weight's"
    spatial = kernel.ndim - 2
    if spatial < 1 or conv.inputs[0].shape is None or len(conv.inputs[0].shape) != kernel.ndim:
        return "unknown rank, or a weight with no spatial axes"
    pads = [int(p) for p in conv.attrs.get("pads", [0] * 2 * spatial)]
    strides = tuple(int(v) for v in conv.attrs.get("strides", [1] * spatial))
    dilations = tuple(int(v) for v in conv.attrs.get("dilations", [1] * spatial))
    kernel_shape = list(conv.attrs.get("kernel_shape", kernel.shape[2:]))
    if kernel_shape != list(kernel.shape[2:]) or len(pads) != 2 * spatial or len(strides) != spatial or len(dilations) != spatial:
        return "kernel_shape, pads, strides or dilations do not match the weight"
    if min(pads) < 0 or min(strides) < 1 or min(dilations) < 1:
        return "negative pads or non-positive strides or dilations"
    return Branch((conv,), kernel.dtype, kernel.astype(np.float64), bias.astype(np.float64),
                  tuple(pads[:spatial]), tuple(pads[spatial:]), strides, dilations, int(conv.attrs.get("group", 1)))


def identity_branch(source: gs.Tensor, batchnorm: gs.Node | None) -> Branch | str:
    """x, or BatchNormalization(x) = s x + t, as a 1x1 kernel [C, 1, 1...] of scales and a bias;
    `summed` places scale c where output channel c reads input channel c."""
    shape = source.shape
    if shape is None or len(shape) < 3 or not isinstance(shape[1], (int, np.integer)):
        return "identity branch: rank or channel count unknown"
    if source.dtype not in FLOAT_DTYPES:  # graphsurgeon gives an ONNX type number for bfloat16
        return "identity branch: dtype is not float32 or float16"
    dtype = np.dtype(source.dtype)
    channels, spatial = int(shape[1]), len(shape) - 2
    scale, shift = np.ones(channels), np.zeros(channels)
    if batchnorm is not None:
        if (reason := batchnorm_not_foldable(batchnorm, channels, dtype)) is not None:
            return reason
        scale, shift = batchnorm_affine(batchnorm)
    nodes = (batchnorm,) if batchnorm is not None else ()
    return Branch(nodes, dtype, scale.reshape(channels, 1, *[1] * spatial), shift, (0,) * spatial, (0,) * spatial, None, None, None)


def batchnorm_not_foldable(batchnorm: gs.Node, channels: int, dtype: np.dtype) -> str | None:
    """Why a BatchNormalization is no per-channel scale and shift of `channels` in `dtype`."""
    if batchnorm.attrs.get("training_mode", 0) or len(batchnorm.outputs) != 1:
        return "BatchNormalization: training mode"
    if batchnorm.attrs.get("spatial", 1) != 1 or len(batchnorm.inputs) != 5:
        return "BatchNormalization: not the per-channel form (spatial=1, five inputs)"
    values = [constant_of(t) for t in batchnorm.inputs[1:5]]
    if any(v is None for v in values):
        return "BatchNormalization: scale, bias, mean or variance is not a constant"
    if any(v.shape != (channels,) or v.dtype != dtype for v in values):
        return "BatchNormalization: parameters are not one per channel in the Conv's dtype"
    variance = values[3].astype(np.float64) + float(batchnorm.attrs.get("epsilon", 1e-5))
    if not all(np.all(np.isfinite(v)) for v in values) or np.any(variance <= 0):
        return "BatchNormalization: parameters are not finite, or variance + epsilon is not positive"
    return None


def batchnorm_affine(batchnorm: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) in float64 with BatchNormalization(x) = s x + t per channel."""
    gamma, beta, mean, var = (constant_of(t).astype(np.float64) for t in batchnorm.inputs[1:5])
    scale = gamma / np.sqrt(var + float(batchnorm.attrs.get("epsilon", 1e-5)))
    return scale, beta - mean * scale


# -- the merged Conv ----------------------------------------------------------------------------------


def branches_incompatible(source: gs.Tensor, branches: list[Branch]) -> str | None:
    convs = [b for b in branches if b.is_conv]
    first = convs[0]
    if any((b.strides, b.group) != (first.strides, first.group) for b in convs):
        return "branches differ in strides or group"
    dilations = window_dilations(convs)
    if dilations is None:
        return "branches differ in dilations"
    if len(convs) < len(branches) and any(s != 1 for s in first.strides):
        return "identity branch beside a strided Conv"
    if len({tuple(-begin % d for begin, d in zip(b.begin, dilations)) for b in branches}) != 1:
        return "kernels do not lie on one tap lattice"
    lengths = source.shape[2:]
    if not all(isinstance(n, (int, np.integer)) for n in lengths):
        return "input spatial sizes are not static"
    if len({output_lengths([int(n) for n in lengths], b, dilations, first.strides) for b in branches}) != 1:
        return "branch pads give different output sizes"
    return None


def window_dilations(convs: list[Branch]) -> tuple[int, ...] | None:
    """The dilation of each axis, shared by every kernel longer than 1 there (a single tap has
    none: timm's 1x1 beside a dilated 3x3 keeps dilation 1); None when they differ."""
    dilations = []
    for axis in range(len(convs[0].begin)):
        used = {b.dilations[axis] for b in convs if b.kernel[axis] > 1}
        if len(used) > 1:
            return None
        dilations.append(used.pop() if used else 1)
    return tuple(dilations)


def output_lengths(lengths: list[int], branch: Branch, dilations: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
    return tuple((n + b + e - d * (k - 1) - 1) // s + 1
                 for n, b, e, d, k, s in zip(lengths, branch.begin, branch.end, dilations, branch.kernel, strides))


def summed(source: gs.Tensor, branches: list[Branch], root: gs.Node, adds: list[gs.Node], others: list[gs.Tensor]) -> Merge | str:
    """The Conv that computes the branches' sum: the window covering every branch's taps."""
    convs = [b for b in branches if b.is_conv]
    first = convs[0]
    dilations, axes = window_dilations(convs), range(len(first.begin))
    start = [min(-b.begin[a] for b in branches) for a in axes]  # first tap, relative to the output's origin
    stop = [max(-b.begin[a] + (b.kernel[a] - 1) * dilations[a] for b in branches) for a in axes]  # last tap
    kernel = [(stop[a] - start[a]) // dilations[a] + 1 for a in axes]
    if math.prod(kernel) > sum(math.prod(b.kernel) for b in convs):
        return FLOPS_GROW
    weight = np.zeros((*first.weight.shape[:2], *kernel))
    bias = np.zeros(first.weight.shape[0])
    for branch in branches:
        offsets = [(-branch.begin[a] - start[a]) // dilations[a] for a in axes]  # taps into the window
        if branch.is_conv:
            weight[(slice(None), slice(None), *(slice(o, o + k) for o, k in zip(offsets, branch.kernel)))] += branch.weight
        else:  # output channel c reads input channel c, the (c mod C_in/group)-th of its group
            channels = np.arange(weight.shape[0])
            weight[(channels, channels % weight.shape[1], *offsets)] += branch.weight.reshape(-1)
        bias += branch.bias
    # Any branch's end pad, moved out by what the window adds after its last tap, gives that
    # branch's output length, which all branches share (docs/passes/reparameterize.md).
    end = [min(b.end[a] + stop[a] - (-b.begin[a] + (b.kernel[a] - 1) * dilations[a]) for b in branches) for a in axes]
    cast_weight, cast_bias = in_dtype(weight, first.dtype), in_dtype(bias, first.dtype)
    if cast_weight is None or cast_bias is None:
        return "summed weights overflow the dtype"
    attrs = {"kernel_shape": kernel, "pads": [-s for s in start] + end, "strides": list(first.strides),
             "dilations": list(dilations), "group": first.group}
    positions = math.prod(output_lengths([int(n) for n in source.shape[2:]], first, dilations, first.strides))
    return Merge(source, branches, root, adds, others, cast_weight, cast_bias if np.any(bias) else None, attrs, positions)
