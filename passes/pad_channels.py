"""pad-channels: pad unaligned Conv output channels with zero filters, up to a multiple of `align`.

Matches a Conv (group 1; its weight a constant, or int8/uint8 integers behind a DequantizeLinear
per tensor or per output channel; static output shape) whose output channel count C is not a
multiple of the alignment: 8 for `precision=fp16`, 32 for `int8`, or `align`. The conv roots a
*site*: everything that must change with it for the graph to compute the same outputs.

Emits, for C -> Cp (C rounded up to the alignment):
  1. the root conv with Cp - C zero filters and zero bias;
  2. the extra channels carried through the channel-wise ops that read them: activations, pools,
     spatial reductions, BatchNormalization, Add/Sub/Mul/Div by a constant (per-channel entries
     grow with 0 or 1), per-tensor and per-channel (axis 1) Q/DQ, depthwise convs, and
     Add/Sub/Mul of two tensors both padded by the site (a residual Add, SiLU's x * sigmoid(x):
     the convs behind both operands become roots of one site);
  3. where they end: zero input weights in a group-1 Conv; one more, unread output of a Split on
     axis 1 (the shape merge-convs emits); for anything else, and for graph outputs, a Slice back
     to C channels that writes the original tensor, so graph outputs keep name, dtype and shape.
The extra channels hold finite values (0 out of the root, then what channel-wise ops make of 0)
that no real channel reads. A padded tensor is never a divisor: 1/0 would be inf, and 0 * inf NaN.

`pad_first_layer` also pads a graph input's unaligned channels (RGB) with a Pad op; off by default.

Why TensorRT benefits: Tensor Core kernels read channels in vectors, 8 for FP16 (kHWC8) and 32
for INT8 (kCHW32, NVIDIA/TensorRT#1310). TensorRT pads internally as well, with reformat layers
where layouts meet (NVIDIA/TensorRT#3876); a pad in the graph saves those inside a site and adds
a Slice at its edges. Measured on cuDNN FP16 (not TensorRT): unaligned 3x3 layers ran 1.3x-2.1x
faster padded to 8, while aligned layers gained nothing from 16 or 32. Hence fp16 -> 8, an aligned
layer is never padded, and `max_overhead` (extra FLOPs over the FLOPs of the convs a site touches,
default 0.5) keeps 1->8, 3->8 and 4->8 out. Citations, measurements and why the rewrite is exact:
docs/passes/pad-channels.md. The report gives each site's FLOPs before and after.

Declines, counted by reason: grouped or aligned roots; runtime, non-float or otherwise quantized
weights; unknown spatial sizes; overhead above `max_overhead`; a padded tensor read in a subgraph
or of unknown channel count; a graph input unless `pad_first_layer`; opset below 11.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graphs import (
    DEFAULT_DOMAINS,
    FLOAT_DTYPES,
    constant_value,
    is_graph_output,
    live_channels,
    make_constant,
    nodes_with_op,
    opset_version,
    set_split_sizes,
    unique_name,
    used_in_subgraph,
    weight,
)
from graphopt.passbase import GraphPass, PassStats, Site

ALIGN_FOR_PRECISION = {"fp16": 8, "int8": 32}
VALID_ALIGNS = (8, 16, 32)
QUANTIZED_TYPES = (np.dtype(np.int8), np.dtype(np.uint8))
MIN_OPSET = 11  # Slice and Pad take their parameters as inputs from here on

# Ops that compute each output channel from the same input channel only.
UNARY = {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
REDUCES = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"}
NEUTRAL_FILL = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}
# BatchNormalization inputs 1-4 (scale, bias, mean, var): the extra channels get y = x / sqrt(1 + eps).
BATCHNORM_FILL = {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0}

SKIP_GROUPED = "grouped or depthwise conv"
SKIP_ALIGNED = "output channels already aligned"
SKIP_WEIGHT = "weight is not a constant"
SKIP_BIAS = "bias is not a constant"
SKIP_DTYPE = "weight dtype is not float32/float16"
SKIP_QUANT_LAYOUT = "quantized weight layout not supported (only int8/uint8, per-tensor or axis 0)"
SKIP_SHAPE = "output shape not static (channels and spatial size are needed for FLOPs)"
SKIP_OVERHEAD = "FLOP overhead above max_overhead"
SKIP_SUBGRAPH = "a padded tensor is read inside a subgraph"
SKIP_UNKNOWN_CHANNELS = "a padded tensor has no known channel count"
SKIP_FIRST_LAYER = "input channels come from a graph input (pad_first_layer is off)"
SKIP_OPSET = f"opset below {MIN_OPSET}"


@dataclass(frozen=True)
class PadChannelsOptions:
    precision: Literal["fp16", "int8"] = "fp16"  # fp16 aligns to 8, int8 to 32
    align: int | None = None  # 8, 16 or 32; overrides precision
    max_overhead: float = 0.5  # extra FLOPs a site may add, relative to the convs it touches
    pad_first_layer: bool = False  # also pad the unaligned channels of graph inputs read by convs

    def __post_init__(self) -> None:
        if self.precision not in ALIGN_FOR_PRECISION:
            raise ValueError(f"precision must be one of {', '.join(ALIGN_FOR_PRECISION)}, got {self.precision!r}")
        if self.align is not None and self.align not in VALID_ALIGNS:
            raise ValueError(f"align must be one of {', '.join(map(str, VALID_ALIGNS))}, got {self.align}")
        if not self.max_overhead >= 0:
            raise ValueError(f"max_overhead must be >= 0, got {self.max_overhead}")

    @property
    def alignment(self) -> int:
        return self.align if self.align is not None else ALIGN_FOR_PRECISION[self.precision]


@dataclass(frozen=True)
class ConstantPad:
    """The reader's input `index` is a constant that grows along `axis` with `fill`."""

    index: int
    axis: int
    fill: float


@dataclass(frozen=True)
class ConvCost:
    """One conv a site touches: channels and FLOPs (batch 1) before and after."""

    conv: str
    out_channels: tuple[int, int]
    in_channels: tuple[int, int]
    flops: tuple[int, int]


@dataclass
class ChannelSite:
    """Padded tensors that meet (a residual Add, x * sigmoid(x)) and everything that grows with them."""

    channels: int
    padded: int
    roots: list[gs.Node] = field(default_factory=list)  # convs whose outputs grow, with zero filters
    graph_input: gs.Variable | None = None  # or the graph input a Pad grows (pad_first_layer)
    tensors: list[gs.Variable] = field(default_factory=list)  # tensors whose channel axis grows
    readers: list[Reader] = field(default_factory=list)  # who reads a site tensor padded, and how
    sliced: list[str] = field(default_factory=list)  # tensors still read unpadded: a Slice writes them
    costs: list[ConvCost] = field(default_factory=list)  # measured before any site is rewritten

    def readers_as(self, role: Role) -> list[gs.Node]:
        return [reader.node for reader in self.readers if reader.decision.role is role]


class PadChannels(GraphPass[PadChannelsOptions]):
    name = "pad-channels"
    summary = "Pad unaligned conv channels with zero filters up to a multiple of 8 (fp16) or 32 (int8)."
    Options = PadChannelsOptions
    order = 60

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        if opset_version(graph) < MIN_OPSET:
            stats.skip(SKIP_OPSET)
            return []
        align = self.options.alignment
        roots = []
        for conv in nodes_with_op(graph, "Conv"):
            if (reason := root_problem(conv, align)) is not None:
                stats.skip(reason)
            else:
                roots.append(conv)
        sites = []
        for site, reason in plan_sites(graph, roots, align):
            if reason is None:
                site.costs = site_costs(site)
                reason = self.overhead_problem(site.costs)
            if reason is not None:
                stats.skip(reason)
                continue
            sites.append(Site("conv:" + ",".join(sorted(r.name for r in site.roots)), site))
        return sites + self.find_input_sites(graph, stats)

    def find_input_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        align = self.options.alignment
        sites: list[Site] = []
        for tensor in graph.inputs:
            shape = tensor.shape
            if tensor.dtype not in FLOAT_DTYPES or shape is None or len(shape) < 3 or not isinstance(shape[1], int):
                continue
            channels = shape[1]
            if channels % align == 0:
                continue
            convs = [n for n, i in uses(tensor) if n.op == "Conv" and n.domain in DEFAULT_DOMAINS and i == 0]
            convs = [c for c in convs if conv_problem(c, in_per_group=channels) is None]
            if not convs:
                continue
            if not self.options.pad_first_layer:
                for _ in convs:
                    stats.skip(SKIP_FIRST_LAYER)
                continue
            site = ChannelSite(channels, round_up(channels, align), graph_input=tensor,
                               readers=[Reader(conv, 0, Decision(Role.ABSORB_CONV)) for conv in convs])
            site.costs = site_costs(site)
            if (reason := self.overhead_problem(site.costs)) is not None:
                stats.skip(reason)
                continue
            sites.append(Site(f"input:{tensor.name}", site))
        return sites

    def overhead_problem(self, costs: list[ConvCost]) -> str | None:
        before, after = total_flops(costs)
        if before <= 0:
            return SKIP_SHAPE
        return SKIP_OVERHEAD if (after - before) / before > self.options.max_overhead else None

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        padding = site.payload
        pad_site(graph, padding)
        grown = padding.padded - padding.channels
        if padding.graph_input is not None:
            stats.counters["input_channels_padded"] += grown
        else:
            stats.counters["channels_padded"] += len(padding.roots) * grown
        for counter, count in (("slices_inserted", len(padding.sliced)), ("split_outputs_added", len(padding.readers_as(Role.ABSORB_SPLIT))),
                               ("depthwise_convs_carried", len(padding.readers_as(Role.DEPTHWISE)))):
            if count:
                stats.counters[counter] += count
        before, after = total_flops(padding.costs)
        stats.details.append({
            "site": site.key,
            "flops": [before, after],
            "flops_overhead": round((after - before) / before, 4),
            "convs": [{"conv": c.conv, "out_channels": list(c.out_channels), "in_channels": list(c.in_channels),
                       "flops": list(c.flops)} for c in padding.costs],
        })


# -- preconditions --------------------------------------------------------------------------------


def root_problem(conv: gs.Node, align: int) -> str | None:
    """Why `conv` cannot have its output channels padded, or None."""
    shape = conv.outputs[0].shape
    if conv.attrs.get("group", 1) == 1 and shape is not None and len(shape) > 1 and isinstance(shape[1], int) and shape[1] % align == 0:
        return SKIP_ALIGNED  # decided before the weight is read: most convs are aligned
    if (reason := conv_problem(conv)) is not None:
        return reason
    filters = weight(conv.inputs[1]).shape[0]
    if filters % align == 0:
        return SKIP_ALIGNED
    return None if shape[1] == filters else SKIP_SHAPE


def conv_problem(conv: gs.Node, group: int = 1, in_per_group: int | None = None) -> str | None:
    """Why `conv`'s weight cannot grow, or None: it must have `group` groups, `in_per_group` input
    channels per group (if given), a weight and bias `weight_problem` accepts, and a static output."""
    if conv.attrs.get("group", 1) != group:
        return SKIP_GROUPED
    if (reason := weight_problem(conv)) is not None:
        return reason
    shape, out = weight(conv.inputs[1]).shape, conv.outputs[0].shape
    if in_per_group is not None and shape[1] != in_per_group:
        return SKIP_UNKNOWN_CHANNELS
    if out is None or len(out) != len(shape) or not all(isinstance(d, int) and d >= 0 for d in out[1:]):
        return SKIP_SHAPE
    return None


def weight_problem(conv: gs.Node) -> str | None:
    """Why the conv's weight and bias cannot be padded, or None."""
    conv_weight = weight(conv.inputs[1])
    if conv_weight is None:
        return SKIP_WEIGHT
    if conv_weight.dtype not in FLOAT_DTYPES:
        return SKIP_DTYPE
    if (q := conv_weight.quantization) is not None and not (
        q.axis in (None, 0) and q.zero_point.dtype in QUANTIZED_TYPES and q.zero_point.shape == q.scale.shape
        and (q.quantize is not None or conv_weight.stored.dtype in QUANTIZED_TYPES)
    ):
        return SKIP_QUANT_LAYOUT
    if has_bias(conv) and ((bias := weight(conv.inputs[2])) is None or bias.quantized or bias.dtype not in FLOAT_DTYPES):
        return SKIP_BIAS
    return None


def has_bias(conv: gs.Node) -> bool:
    return len(conv.inputs) > 2 and bool(conv.inputs[2].name)


# -- growing sites: where the padding of the root convs reaches ------------------------------------


class Role(Enum):
    CARRY = "output is padded too"
    DEPTHWISE = "depthwise conv: output is padded too"
    PAIR = "binary op of two padded-size tensors: carries once both are padded, joining their sites"
    ABSORB_CONV = "conv: zero input weights for the extra channels"
    ABSORB_SPLIT = "split: one more output, unread"
    SLICE = "reads a Slice back to the true channel count"


@dataclass(frozen=True)
class Decision:
    role: Role
    pads: tuple[ConstantPad, ...] = ()  # constant inputs that grow with the channels


@dataclass(frozen=True)
class Reader:
    """Input `index` of `node` reads a site tensor, and takes it padded as `decision` says."""

    node: gs.Node
    index: int
    decision: Decision


SLICE = Decision(Role.SLICE)
CARRY = Decision(Role.CARRY)


def plan_sites(graph: gs.Graph, roots: list[gs.Node], align: int) -> list[tuple[ChannelSite, str | None]]:
    """The sites the roots' padding makes, in graph order, each with a reason to decline it or None."""
    reach = Reach(graph)
    for root in roots:
        reach.add(root.outputs[0], root.outputs[0].shape[1])
    reach.follow()
    sites: dict[str, ChannelSite] = {}
    for root in roots:
        channels = root.outputs[0].shape[1]
        site = sites.setdefault(reach.find(root.outputs[0].name), ChannelSite(channels, round_up(channels, align)))
        site.roots.append(root)
    for name, tensor in reach.tensors.items():
        sites[reach.find(name)].tensors.append(tensor)
    for reader in reach.readers:
        sites[reach.find(reader.node.inputs[reader.index].name)].readers.append(reader)
    for site in sites.values():
        site.sliced = [t.name for t in site.tensors if needs_slice(graph, site, t)]
    return [(site, tensor_problem(graph, site)) for site in sites.values()]


class Reach:
    """Where padding flows: from root outputs through every reader that carries it.

    Tensors that padding reaches are joined (union-find) with the tensor they were carried from;
    a binary op of two tensors of the padded size carries once both are reached, joining them.
    So tensors that meet (a residual Add of two convs' outputs) end in one set: one site.
    """

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.tensors: dict[str, gs.Variable] = {}  # reached tensors, in the order reached
        self.channels: dict[str, int] = {}  # the true channel count of each
        self.parent: dict[str, str] = {}
        self.readers: list[Reader] = []  # who reads a reached tensor padded
        self.pairs: dict[str, tuple[gs.Node, int]] = {}  # binary ops waiting for their other operand
        self.paired: set[str] = set()  # binary ops carried
        self.queue: deque[gs.Variable] = deque()

    def add(self, tensor: gs.Variable, channels: int, joined_to: str | None = None) -> None:
        if tensor.name not in self.tensors:
            self.tensors[tensor.name], self.channels[tensor.name], self.parent[tensor.name] = tensor, channels, tensor.name
            self.queue.append(tensor)
        if joined_to is not None:
            self.parent[self.find(tensor.name)] = self.find(joined_to)

    def find(self, name: str) -> str:
        while self.parent[name] != name:
            # Path halving, in two statements: `name = parent[name] = grandparent` would assign
            # `name` first and so make the grandparent its own root, splitting the set.
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def follow(self) -> None:
        while self.queue:
            tensor = self.queue.popleft()
            channels = self.channels[tensor.name]
            for node, index in uses(tensor):
                decision = classify(self.graph, node, index, channels)
                if decision.role is Role.PAIR:
                    if node.name not in self.paired:
                        self.pairs[node.name] = (node, channels)
                elif decision.role is not Role.SLICE:
                    self.readers.append(Reader(node, index, decision))
                    if decision.role in (Role.CARRY, Role.DEPTHWISE):
                        self.add(node.outputs[0], channels, joined_to=tensor.name)
            if not self.queue:
                self.carry_pairs()

    def carry_pairs(self) -> None:
        """Carry the binary ops whose operands are all reached now (their outputs join the queue)."""
        for name, (node, channels) in list(self.pairs.items()):
            operands = [i for i, t in enumerate(node.inputs) if channel_dim(t, node) == channels]
            if operands and all(self.channels.get(node.inputs[i].name) == channels for i in operands):
                del self.pairs[name]
                self.paired.add(name)
                for i in operands:
                    self.readers.append(Reader(node, i, CARRY))
                    self.add(node.outputs[0], channels, joined_to=node.inputs[i].name)


def tensor_problem(graph: gs.Graph, site: ChannelSite) -> str | None:
    for tensor in site.tensors:
        shape = tensor.shape
        if shape is None or len(shape) < 3 or shape[1] != site.channels:
            return SKIP_UNKNOWN_CHANNELS
        if used_in_subgraph(graph, tensor):
            return SKIP_SUBGRAPH
    return None


def needs_slice(graph: gs.Graph, site: ChannelSite, tensor: gs.Variable) -> bool:
    """Whether the tensor is a graph output or has a reader that does not take it padded."""
    padded = {(id(reader.node), reader.index) for reader in site.readers}
    return is_graph_output(graph, tensor) or any((id(node), index) not in padded for node, index in uses(tensor))


# -- how one reader takes a padded input ------------------------------------------------------------


def classify(graph: gs.Graph, node: gs.Node, index: int, channels: int) -> Decision:
    """How `node` takes its input `index` when that input grows from `channels` channels."""
    op = node.op
    if node.domain not in DEFAULT_DOMAINS:
        return SLICE
    if op in UNARY:
        return CARRY if index == 0 else SLICE
    if op in POOLS:
        return CARRY if index == 0 and only_first_output_read(graph, node) else SLICE
    if op in REDUCES:
        return CARRY if index == 0 and reduces_spatial_only(node) else SLICE
    if op == "BatchNormalization":
        return classify_batchnorm(graph, node, index, channels)
    if op in ("QuantizeLinear", "DequantizeLinear"):
        return classify_qdq(node, index, channels)
    if op in NEUTRAL_FILL:
        return classify_binary(node, index, channels)
    if op == "Conv" and index == 0:
        if conv_problem(node, in_per_group=channels) is None:
            return Decision(Role.ABSORB_CONV)
        return Decision(Role.DEPTHWISE) if conv_problem(node, group=channels, in_per_group=1) is None else SLICE
    if op == "Split" and index == 0:
        return Decision(Role.ABSORB_SPLIT) if split_sizes(node, channels) else SLICE
    return SLICE


def only_first_output_read(graph: gs.Graph, node: gs.Node) -> bool:
    # MaxPool's Indices count positions across channels: more channels change them.
    return all(not out.outputs and not is_graph_output(graph, out) for out in node.outputs[1:])


def classify_batchnorm(graph: gs.Graph, node: gs.Node, index: int, channels: int) -> Decision:
    if index != 0 or node.attrs.get("training_mode", 0) or not only_first_output_read(graph, node):
        return SLICE
    return per_channel_parameters(node, channels, BATCHNORM_FILL)


def classify_qdq(node: gs.Node, index: int, channels: int) -> Decision:
    scale = constant_value(node.inputs[1])
    if index != 0 or node.attrs.get("block_size", 0) or scale is None:
        return SLICE
    if scale.ndim == 0 or (scale.shape == (1,) and channels != 1):
        return CARRY  # per-tensor: the same elementwise function on every channel
    rank = len(node.inputs[0].shape or ())
    if rank < 3 or node.attrs.get("axis", 1) % rank != 1:
        return SLICE
    has_zero_point = len(node.inputs) > 2 and bool(node.inputs[2].name)
    return per_channel_parameters(node, channels, {1: 1.0, 2: 0.0} if has_zero_point else {1: 1.0})


def per_channel_parameters(node: gs.Node, channels: int, fills: dict[int, float]) -> Decision:
    """Carry, growing these inputs with these values, when each is a constant of one value a channel."""
    for k in fills:
        value = constant_value(node.inputs[k]) if len(node.inputs) > k else None
        if value is None or value.shape != (channels,):
            return SLICE
    return Decision(Role.CARRY, tuple(ConstantPad(k, 0, fill) for k, fill in fills.items()))


def classify_binary(node: gs.Node, index: int, channels: int) -> Decision:
    if len(node.inputs) != 2:
        return SLICE
    padded, other = node.inputs[index], node.inputs[1 - index]
    if node.op == "Div" and (index == 1 or other is padded):
        return SLICE  # a padded divisor may hold zeros: inf/NaN that zero weights cannot cancel
    if padded.shape is None:
        return SLICE
    rank = len(padded.shape)
    if (value := constant_value(other)) is not None:
        axis = value.ndim - rank + 1  # the constant's axis that broadcasts against channels
        if value.ndim > rank:
            return SLICE
        if axis < 0 or value.shape[axis] == 1:
            return CARRY
        if value.shape[axis] != channels:
            return SLICE
        return Decision(Role.CARRY, (ConstantPad(1 - index, axis, NEUTRAL_FILL[node.op]),))
    if node.op == "Div" or other.shape is None or len(other.shape) > rank:
        return SLICE
    if other is padded:
        return CARRY
    # Checked before broadcasting: when the site's tensors have one channel, a one-channel
    # operand is not a broadcast but a peer, which another root may pad (fuzz_regressions).
    other_channels = channel_dim(other, node)
    if other_channels == channels and len(other.shape) == rank:
        return Decision(Role.PAIR)
    return CARRY if other_channels == 1 else SLICE


def uses(tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
    """Every (reader, input index) of `tensor`, each once (a node reading it twice is listed twice in outputs)."""
    found = {(id(node), i): (node, i) for node in tensor.outputs for i, t in enumerate(node.inputs) if t is tensor}
    return list(found.values())


def channel_dim(tensor: gs.Tensor, reader: gs.Node) -> int | None:
    """The size of `tensor`'s axis that lines up with the channel axis of `reader`'s output.

    1 when the tensor broadcasts over channels (no such axis, or size 1); None when unknown.
    """
    out_shape = reader.outputs[0].shape if reader.outputs else None
    if tensor.shape is None or out_shape is None:
        return None
    axis = len(tensor.shape) - len(out_shape) + 1
    if axis < 0:
        return 1
    dim = tensor.shape[axis]
    return dim if isinstance(dim, int) else None


def reduces_spatial_only(node: gs.Node) -> bool:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        value = constant_value(node.inputs[1])
        axes = None if value is None else value.tolist()
    rank = len(node.inputs[0].shape or ())
    if not axes or rank < 3 or node.attrs.get("keepdims", 1) != 1:
        return False
    return all(a % rank >= 2 for a in axes)


def split_sizes(split: gs.Node, channels: int) -> list[int] | None:
    """The sizes a Split along axis 1 cuts `channels` into, or None when not known or not axis 1."""
    rank = len(split.inputs[0].shape or ())
    if rank < 3 or split.attrs.get("axis", 0) % rank != 1:
        return None
    count = len(split.outputs)
    if len(split.inputs) > 1 and split.inputs[1].name:
        value = constant_value(split.inputs[1])
        sizes = None if value is None else [int(v) for v in value.reshape(-1)]
    elif "split" in split.attrs:
        sizes = [int(v) for v in split.attrs["split"]]
    elif "num_outputs" in split.attrs:  # opset 18: equal chunks, the last one smaller
        chunk = math.ceil(channels / count)
        sizes = [chunk] * (count - 1) + [channels - chunk * (count - 1)]
    else:
        sizes = [channels // count] * count if channels % count == 0 else None
    if sizes is None or len(sizes) != count or sum(sizes) != channels or min(sizes) < 0:
        return None
    return sizes


# -- FLOPs ----------------------------------------------------------------------------------------


def site_costs(site: ChannelSite) -> list[ConvCost]:
    """Before/after FLOPs of every conv a site touches (a conv may grow on both axes)."""
    depthwise, input_convs = site.readers_as(Role.DEPTHWISE), site.readers_as(Role.ABSORB_CONV)
    grows_out = {id(c) for c in [*site.roots, *depthwise]}
    grows_in = {id(c) for c in [*input_convs, *depthwise]}
    touched = {id(c): c for c in [*site.roots, *input_convs, *depthwise]}
    return [conv_cost(conv, site.padded, key in grows_out, key in grows_in) for key, conv in touched.items()]


def conv_cost(conv: gs.Node, padded: int, grows_out: bool, grows_in: bool) -> ConvCost:
    """FLOPs of `conv` before and after its outputs and/or inputs grow to `padded` channels.

    Channels the site leaves alone count as far as they compute something: the zero filters and
    zero input weights an earlier site added are not work, or the next run would judge a site
    that touches the same conv cheaper and pad it after all (docs/passes/pad-channels.md).
    """
    conv_weight = weight(conv.inputs[1])
    out_channels, in_per_group = conv_weight.shape[:2]
    group = conv.attrs.get("group", 1)
    bias = weight(conv.inputs[2]).stored if has_bias(conv) else None
    per_channel_pair = 2 * math.prod(conv_weight.shape[2:]) * math.prod(conv.outputs[0].shape[2:])
    live_out = out_channels if grows_out else live_channels(conv_weight, 0, bias)
    live_in = in_per_group if grows_in or group != 1 else live_channels(conv_weight, 1)
    return ConvCost(
        conv.name,
        (out_channels, padded if grows_out else out_channels),
        (in_per_group * group, padded if grows_in else in_per_group * group),
        (per_channel_pair * live_out * live_in,
         per_channel_pair * (padded if grows_out else live_out) * (padded if grows_in and group == 1 else live_in)),
    )


def total_flops(costs: list[ConvCost]) -> tuple[int, int]:
    return sum(c.flops[0] for c in costs), sum(c.flops[1] for c in costs)


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


# -- rewriting ------------------------------------------------------------------------------------


def pad_site(graph: gs.Graph, site: ChannelSite) -> None:
    if site.graph_input is not None:
        pad_graph_input(graph, site.graph_input, site)
    for conv in site.roots:
        pad_conv(graph, conv, axis=0, size=site.padded)
    for reader in site.readers:
        node, role = reader.node, reader.decision.role
        for pad in reader.decision.pads:
            grown = pad_axis(constant_value(node.inputs[pad.index]), pad.axis, site.padded, pad.fill)
            node.inputs[pad.index] = make_constant(graph, f"{node.name}_padded_{pad.index}", grown)
        if role is Role.ABSORB_CONV:
            pad_conv(graph, node, axis=1, size=site.padded)
        elif role is Role.DEPTHWISE:
            pad_conv(graph, node, axis=0, size=site.padded)
            node.attrs["group"] = site.padded
        elif role is Role.ABSORB_SPLIT:
            add_split_output(graph, node, site.channels, site.padded)
    sliced = set(site.sliced)
    for tensor in site.tensors:
        swap_in_padded_tensor(graph, tensor, site, slice_back=tensor.name in sliced)


def swap_in_padded_tensor(graph: gs.Graph, tensor: gs.Variable, site: ChannelSite, slice_back: bool) -> None:
    """The producer writes a new, padded tensor; the original becomes a Slice of it if still read.

    Keeping the original tensor object for the unpadded readers keeps graph outputs' names,
    dtypes and shapes exactly.
    """
    padded = padded_variable(graph, tensor, site.padded)
    producer = tensor.inputs[0]
    producer.outputs[[i for i, t in enumerate(producer.outputs) if t is tensor][0]] = padded
    for reader in site.readers:
        if reader.node.inputs[reader.index] is tensor:
            reader.node.inputs[reader.index] = padded
    if slice_back:
        def ints(stem: str, value: int) -> gs.Constant:
            return make_constant(graph, f"{tensor.name}_{stem}", np.array([value], dtype=np.int64))

        graph.nodes.append(gs.Node("Slice", unique_name(graph, f"{tensor.name}_unpad"),
                                   inputs=[padded, ints("starts", 0), ints("ends", site.channels), ints("axes", 1)],
                                   outputs=[tensor]))


def pad_graph_input(graph: gs.Graph, tensor: gs.Variable, site: ChannelSite) -> None:
    """The site's convs read the graph input through a Pad with zero channels (the input itself stays)."""
    rank = len(tensor.shape)
    pads = np.zeros(2 * rank, dtype=np.int64)
    pads[rank + 1] = site.padded - site.channels  # end of axis 1
    padded = padded_variable(graph, tensor, site.padded)
    graph.nodes.append(gs.Node(
        "Pad", unique_name(graph, f"{tensor.name}_pad_channels"),
        inputs=[tensor, make_constant(graph, f"{tensor.name}_pads", pads),
                make_constant(graph, f"{tensor.name}_pad_value", np.zeros((), dtype=tensor.dtype))],
        outputs=[padded],
    ))
    for conv in site.readers_as(Role.ABSORB_CONV):
        conv.inputs[0] = padded


def padded_variable(graph: gs.Graph, tensor: gs.Variable, channels: int) -> gs.Variable:
    return gs.Variable(unique_name(graph, f"{tensor.name}_padded"), dtype=tensor.dtype,
                       shape=[tensor.shape[0], channels, *tensor.shape[2:]])


def pad_conv(graph: gs.Graph, conv: gs.Node, axis: int, size: int) -> None:
    """Grow the conv's weight along `axis` (0: filters, with their bias; 1: input channels) with zeros.

    Reads the weight the graph holds now, so two sites growing one conv on different axes
    compose in either order. A quantized weight stays quantized, in the form it came in.
    """
    conv_weight = weight(conv.inputs[1])
    stem = f"{conv.name}_weight_padded"
    if axis == 0 and has_bias(conv):
        bias = pad_axis(weight(conv.inputs[2]).stored, 0, size, 0.0)
        conv.inputs[2] = make_constant(graph, f"{conv.name}_bias_padded", bias)
    q = conv_weight.quantization
    if q is None:
        conv.inputs[1] = make_constant(graph, stem, pad_axis(conv_weight.stored, axis, size, 0.0))
        return
    new_filters = axis == 0 and q.axis == 0  # with their own scale 1 and zero point 0: (0 - 0) * 1 = 0
    if new_filters or q.quantize is not None:
        fill = 0  # a float 0 quantizes to the zero point
    else:  # each new integer is its filter's zero point: (zp - zp) * s = 0
        fill = q.zero_point.reshape((-1,) + (1,) * (conv_weight.stored.ndim - 1)) if q.per_channel else q.zero_point.reshape(())
    stored = pad_axis(conv_weight.stored, axis, size, fill)
    scale = pad_axis(q.scale, 0, size, 1.0) if new_filters else q.scale
    zero_point = pad_axis(q.zero_point, 0, size, 0) if new_filters else q.zero_point
    parameters = [make_constant(graph, f"{stem}_scale", scale), make_constant(graph, f"{stem}_zero_point", zero_point)]
    source: gs.Tensor = make_constant(graph, f"{stem}_stored", stored)
    if q.quantize is not None:
        source = quantization_node(graph, q.quantize, [source, *parameters], zero_point.dtype, stored.shape)
    conv.inputs[1] = quantization_node(graph, q.dequantize, [source, *parameters], scale.dtype, stored.shape)


def quantization_node(graph: gs.Graph, like: gs.Node, inputs: list[gs.Tensor], dtype: np.dtype, shape: tuple[int, ...]) -> gs.Variable:
    """A new Q or DQ node with the attributes of `like`, reading `inputs`; returns its output."""
    output = gs.Variable(unique_name(graph, f"{like.name}_padded_out"), dtype=dtype, shape=list(shape))
    graph.nodes.append(gs.Node(like.op, unique_name(graph, f"{like.name}_padded"), dict(like.attrs), inputs=inputs, outputs=[output]))
    return output


def add_split_output(graph: gs.Graph, split: gs.Node, channels: int, padded: int) -> None:
    sizes = split_sizes(split, channels)
    assert sizes is not None, f"{split.name}: split sizes changed since find_sites"
    set_split_sizes(graph, split, [*sizes, padded - channels])
    split.outputs.append(gs.Variable(unique_name(graph, f"{split.name}_channel_padding"), dtype=split.inputs[0].dtype))


def pad_axis(values: np.ndarray, axis: int, size: int, fill: float | np.ndarray) -> np.ndarray:
    """A new array: `values` grown to `size` along `axis`, the new entries set to `fill`."""
    extra_shape = list(values.shape)
    extra_shape[axis] = size - values.shape[axis]
    extra = np.broadcast_to(np.asarray(fill, dtype=values.dtype), extra_shape)
    return np.concatenate([values, extra], axis=axis)
