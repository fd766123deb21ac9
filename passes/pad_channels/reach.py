"""pad-channels: growing sites, where the padding of the root convs reaches, and how each reader takes it."""

from __future__ import annotations

import math
from collections import deque

import onnx_graphsurgeon as gs

from graphopt.graphs import DEFAULT_DOMAINS, constant_value, is_graph_output, used_in_subgraph
from .sites import (
    BATCHNORM_FILL,
    CARRY,
    ChannelSite,
    ConstantPad,
    Decision,
    NEUTRAL_FILL,
    POOLS,
    REDUCES,
    Reader,
    Role,
    SKIP_SUBGRAPH,
    SKIP_UNKNOWN_CHANNELS,
    SLICE,
    UNARY,
    conv_problem,
    round_up,
)


# -- growing sites: where the padding of the root convs reaches ------------------------------------


def plan_sites(graph: gs.Graph, roots: list[gs.Node], aligns: dict[str, int]) -> list[tuple[ChannelSite, str | None]]:
    """The sites the roots' padding makes, in graph order, each with a reason to decline it or None.
    A site pads to the largest alignment its roots need (`aligns`: by conv name): no layer ends at
    a smaller multiple than its precision wants."""
    reach = Reach(graph)
    for root in roots:
        reach.add(root.outputs[0], root.outputs[0].shape[1])
    reach.follow()
    sites: dict[str, ChannelSite] = {}
    for root in roots:
        channels = root.outputs[0].shape[1]
        site = sites.setdefault(reach.find(root.outputs[0].name), ChannelSite(channels, channels))
        site.roots.append(root)
        site.padded = max(site.padded, round_up(channels, aligns[root.name]))
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
            self.parent[name] = self.parent[self.parent[name]]  # path halving
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

