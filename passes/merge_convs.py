"""merge-convs: merge sibling convolutions that read one tensor into one wider Conv.

Matches two or more Convs reading the same tensor, or equal QuantizeLinear -> DequantizeLinear
pairs of one tensor (siblings): group 1, auto_pad NOTSET, constant weights and biases of one float
dtype, stored alike (all plain; or all int8 -> DQ, or all float -> Q -> DQ, per output channel or
per tensor, same dtypes and Q/DQ attributes), equal strides and dilations, the same static output
shape. Kernels may differ (SqueezeNet's 1x1 beside a 3x3): each is padded into one window covering
every sibling's taps with zero taps (a quantized filter's zero point), so it reads what it read.

Emits one Conv whose output channels are the siblings' in order, then a Split on axis 1 that
writes the siblings' own output tensors, so graph outputs keep name, dtype and shape. Quantized
weights stay in their form, per output channel: integers (or floats) and scales concatenated, a
per-tensor scale repeated. When every sibling feeds only the same activation (op, attributes,
equal constant extras), one activation follows the merged Conv; when every (activated) output goes
only to an equal per-tensor QuantizeLinear -> DequantizeLinear, one Q -> DQ follows and the Split
parts the DQ output; when the siblings' last outputs are exactly the inputs of one Concat on axis
1, the merged Conv (or its activation, Q/DQ) writes the Concat's output: no Split, no Concat.
`vertical` (off by default) also composes a plain 1x1 Conv (stride 1, no pads) into the Conv that
alone reads it, when that does not grow the FLOPs; rewrites make new sites, so it works in rounds.

Why TensorRT benefits: TensorRT merges siblings itself only when their kernels are identical and
they are not Q/DQ (NVIDIA/TensorRT#501, #1602), so a fire module's 1x1 + 3x3 stays two kernels.
On cuDNN FP16 (not TensorRT) one conv for 2-3 siblings ran 1.1x-2.9x faster per layer, SqueezeNet
1.27x (H100) and 1.34x (SqueezeNet 1.1, H200). Zero taps grow FLOPs: `max_flop_growth` (2.0) keeps
merges to what was measured to pay (the fire module, 1.8x). An unaligned merged width (80 + 4 + 1)
paid only once padded, so this pass runs before pad-channels. Aligned siblings merge only when
they end in the same activation, so the Split never parts a Conv from the activation TensorRT
would fuse it with. The report gives each site's FLOPs before and after. Derivations and
evidence: docs/passes/merge-convs.md.

Declines, counted by reason: runtime weights, weights quantized along another axis or to other
types than int8/uint8, group != 1, auto_pad, dtypes other than float32/float16, unknown spatial
shapes, an output read in a subgraph; siblings whose strides, dilations, tap lattice or output
shape differ; quantized beside plain siblings, or quantized differently; siblings whose outputs
are quantized differently, or some quantized and others not (one Q/DQ must serve all); an aligned
sibling whose activation no other sibling shares; a group over `max_flop_growth` (siblings with
identical windows in it still merge) or `max_out_channels`, or under `min_siblings`. FLOP
decisions count live channels only: pad-channels' zero filters would otherwise turn a decline into
a merge when `all` runs again.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Hashable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graphs import (
    DEFAULT_DOMAINS,
    FLOAT_DTYPES,
    Quantization,
    Weight,
    constant_value,
    equal_constants,
    export_like,
    is_graph_output,
    live_channels,
    make_constant,
    make_weight,
    node_names,
    nodes_with_op,
    per_tensor_problem,
    producer_of,
    set_split_sizes,
    sole_consumer,
    unique_name,
    used_in_subgraph,
    weight,
)
from graphopt.passbase import GraphPass, PassResult, PassStats, Site

# Elementwise ops of one data input: f(concat(a, b)) == concat(f(a), f(b)) along any axis.
ACTIVATIONS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Mish", "Gelu",
})
FP16_ALIGNMENT = 8  # channels tensor cores want at FP16 (docs/passes/merge-convs.md)

WEIGHT_FORMS_DIFFER = "siblings' weights are quantized differently (int -> DQ or float -> Q -> DQ, dtypes, Q/DQ attributes)"
MIXED_QUANTIZED = "quantized and plain-weight siblings are not merged"
OUTPUT_Q_DIFFERS = "siblings' output quantization differs"
OUTPUT_Q_MIXED = "some siblings' outputs are quantized and others not"
OUTPUT_Q_SHAPE = "a sibling's output QuantizeLinear is not per-tensor with constant parameters and one DequantizeLinear after it"
NO_GEOMETRY_MATCH = "no sibling with the same strides, dilations, pad lattice and output shape"
MIXED_ACTIVATIONS = "aligned siblings end in different activations: the Split would part a Conv from its activation"
FLOPS_GROW = "zero-padded kernels would grow the group's FLOPs past max-flop-growth"
TOO_FEW = "fewer compatible siblings than min-siblings"
TOO_WIDE = "merged conv would be wider than max-out-channels"
WINDOW_MISMATCH = "merged window would change the output shape"


@dataclass(frozen=True)
class MergeConvsOptions:
    min_siblings: int = 2  # smaller groups of compatible siblings are left alone
    # No merged Conv wider than this; none: no limit. No measurement shows a wide merge losing
    # (Inception-v3's Mixed_7b/7c input groups are 1152 wide), so there is no limit by default.
    max_out_channels: int | None = None
    # Merged FLOPs over the siblings' FLOPs that zero-padded kernels may add. A fire module's
    # 1x1 + 3x3 grows 1.8x and still ran faster merged (docs/passes/merge-convs.md); larger
    # growth was not measured.
    max_flop_growth: float = 2.0
    vertical: bool = False  # also compose a 1x1 Conv into the Conv that reads its output

    def __post_init__(self) -> None:
        if self.min_siblings < 2:
            raise ValueError(f"min-siblings must be at least 2, got {self.min_siblings}")
        if self.max_out_channels is not None and self.max_out_channels < 2:
            raise ValueError(f"max-out-channels must be at least 2 (or none), got {self.max_out_channels}")
        if not self.max_flop_growth >= 1.0:
            raise ValueError(f"max-flop-growth must be at least 1.0, got {self.max_flop_growth}")


@dataclass(frozen=True)
class ConvInfo:
    """A Conv that passed every precondition, with its constants and window read out."""

    node: gs.Node
    weight_value: Weight  # stored as it came: plain, integers -> DQ, or float -> Q -> DQ
    bias_value: Weight | None
    begin: tuple[int, ...]  # pads before each spatial axis
    end: tuple[int, ...]  # pads after each spatial axis
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    activation: gs.Node | None  # the elementwise activation that alone reads the output
    live_out: int  # output and input channels that compute something (graphs.live_channels)
    live_in: int

    @property
    def weight(self) -> np.ndarray:
        """The stored weight: floats, or a quantized weight's integers (float form: its floats)."""
        return self.weight_value.stored

    @property
    def bias(self) -> np.ndarray | None:
        return None if self.bias_value is None else self.bias_value.stored

    @property
    def dtype(self) -> np.dtype:
        """The float type the Conv computes in (a quantized weight's scale type)."""
        return self.weight_value.dtype

    @property
    def quantized(self) -> bool:
        return self.weight_value.quantized or (self.bias_value is not None and self.bias_value.quantized)

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def input(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    def first_tap(self, axis: int) -> int:
        """Where the kernel's first tap falls, relative to each output's origin in the input."""
        return -self.begin[axis]

    def last_tap(self, axis: int) -> int:
        return -self.begin[axis] + (self.kernel[axis] - 1) * self.dilations[axis]

    @property
    def flops(self) -> int:
        """FLOPs per image (2 per multiply-accumulate)."""
        return 2 * math.prod(self.weight.shape) * math.prod(self.out_spatial)

    @property
    def live_flops(self) -> int:
        return 2 * self.live_out * self.live_in * math.prod(self.kernel) * math.prod(self.out_spatial)

    @property
    def merge_key(self) -> tuple:
        """Siblings with equal keys can share one merged window: their taps lie on one lattice."""
        lattice = tuple(self.first_tap(a) % d for a, d in enumerate(self.dilations))
        return (data_source(self.input), self.dtype, self.strides, self.dilations, lattice, self.out_spatial)

    @property
    def form(self) -> Hashable:
        """How the weight is stored; siblings merge only with siblings of the same form."""
        return weight_form(self.weight_value)

    @property
    def zero_tap(self) -> np.ndarray:
        """The stored value of a zero tap, per filter: the zero point for stored integers, else 0."""
        q = self.weight_value.quantization
        if q is None or q.quantize is not None:
            return np.zeros((), self.weight.dtype)
        return per_filter(q.zero_point, self.out_channels).reshape([-1] + [1] * (self.weight.ndim - 1))


@dataclass(frozen=True)
class MergedWindow:
    """The kernel and pads of the merged Conv: the union of every sibling's taps, per axis.

    A sibling's kernel sits `offsets` taps in, zeros around it, so it reads exactly its own taps;
    the end pad is the smallest that keeps every sibling's output length (docs/passes/merge-convs.md).
    """

    kernel: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]

    @classmethod
    def covering(cls, convs: list[ConvInfo]) -> MergedWindow:
        first = convs[0]
        kernel, begin, end = [], [], []
        for a, d in enumerate(first.dilations):
            start = min(c.first_tap(a) for c in convs)
            stop = max(c.last_tap(a) for c in convs)
            kernel.append((stop - start) // d + 1)
            begin.append(-start)
            end.append(min(c.end[a] + stop - c.last_tap(a) for c in convs))
        return cls(tuple(kernel), tuple(begin), tuple(end), first.strides, first.dilations)

    def pad_kernel(self, conv: ConvInfo) -> np.ndarray:
        """The sibling's stored kernel inside the merged window, the rest zero taps."""
        offsets = [(B - b) // d for B, b, d in zip(self.begin, conv.begin, self.dilations)]
        padded = np.empty(conv.weight.shape[:2] + self.kernel, conv.weight.dtype)
        padded[...] = conv.zero_tap
        padded[(slice(None), slice(None), *(slice(t, t + k) for t, k in zip(offsets, conv.kernel)))] = conv.weight
        return padded

    def output_spatial(self, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            (n + b + e - d * (k - 1) - 1) // s + 1
            for n, b, e, d, k, s in zip(in_spatial, self.begin, self.end, self.dilations, self.kernel, self.strides)
        )

    def flop_growth(self, convs: list[ConvInfo]) -> float:
        """Merged over separate FLOPs, live filters only (the input channels are the same)."""
        merged = sum(c.live_out for c in convs) * math.prod(self.kernel)
        return merged / sum(c.live_out * math.prod(c.kernel) for c in convs)

    def attrs(self) -> dict:
        return {"kernel_shape": list(self.kernel), "pads": list(self.begin + self.end), "strides": list(self.strides),
                "dilations": list(self.dilations), "group": 1}


@dataclass(frozen=True)
class SiblingGroup:
    """One horizontal site: siblings in output-channel order, and what follows them."""

    convs: list[ConvInfo]
    window: MergedWindow
    activations: list[gs.Node] | None  # each sibling's activation, when they share one
    quantized_output: OutputQuantization | None  # each sibling's equal output Q -> DQ
    concat: gs.Node | None  # the Concat that the merged output replaces


@dataclass(frozen=True)
class OutputQuantization:
    """Each sibling's output QuantizeLinear and the one DequantizeLinear reading it, all equal."""

    quantizers: list[gs.Node]
    dequantizers: list[gs.Node]

    @property
    def ends(self) -> list[gs.Tensor]:
        return [dq.outputs[0] for dq in self.dequantizers]


@dataclass(frozen=True)
class ConvChain:
    """One vertical site: a 1x1 Conv and the Conv that alone reads its output."""

    pointwise: ConvInfo
    follower: ConvInfo


class MergeConvs(GraphPass[MergeConvsOptions]):
    name = "merge-convs"
    summary = "Merge sibling Convs on one input into one Conv + Split (and optionally 1x1 chains)."
    Options = MergeConvsOptions
    order = 50

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        sites: list[Site] = []
        used: set[str] = set()
        for readers in sibling_readers(graph):
            candidates = []
            for conv in readers:
                if (reason := conv_problem(graph, conv)) is not None:
                    stats.skip(reason)
                else:
                    candidates.append(describe_conv(graph, conv))
            for group in self.groups(graph, candidates, stats):
                nodes = [c.node for c in group.convs]
                used.update(n.name for n in nodes)
                sites.append(Site(node_names(nodes), group))
        if self.options.vertical:
            for chain in self.chains(graph, used, stats):
                sites.append(Site(node_names([chain.pointwise.node, chain.follower.node]), chain))
        return sites

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        if isinstance(site.payload, SiblingGroup):
            merge_siblings(graph, site.payload, stats)
        else:
            compose_chain(graph, site.payload, stats)

    def groups(self, graph: gs.Graph, candidates: list[ConvInfo], stats: PassStats) -> Iterator[SiblingGroup]:
        buckets: dict[tuple, list[ConvInfo]] = defaultdict(list)
        for conv in candidates:
            buckets[conv.merge_key].append(conv)
        for members in buckets.values():
            if len(members) == 1:
                stats.skip(NO_GEOMETRY_MATCH)
                continue
            for same_form in self.by_form(members, stats):
                yield from self.groups_of_one_form(graph, same_form, stats)

    def by_form(self, members: list[ConvInfo], stats: PassStats) -> Iterator[list[ConvInfo]]:
        """The siblings whose weights are stored alike (all plain, or all quantized alike)."""
        forms: dict[Hashable, list[ConvInfo]] = defaultdict(list)
        for conv in members:
            forms[conv.form].append(conv)
        for same in forms.values():
            if len(same) > 1:
                yield same
            elif len(forms) > 1:
                stats.skip(MIXED_QUANTIZED if None in forms else WEIGHT_FORMS_DIFFER)

    def groups_of_one_form(self, graph: gs.Graph, members: list[ConvInfo], stats: PassStats) -> Iterator[SiblingGroup]:
        for same_end in by_activation(members):
            if len(same_end) == 1:
                stats.skip(MIXED_ACTIVATIONS)
                continue
            groups = [same_end]
            if MergedWindow.covering(same_end).flop_growth(same_end) > self.options.max_flop_growth:
                stats.skip(FLOPS_GROW)
                groups = [g for g in same_window(same_end) if len(g) > 1]
            for convs in groups:
                if (reason := self.group_problem(convs)) is not None:
                    stats.skip(reason)
                elif isinstance(plan := plan_group(graph, convs), str):
                    stats.skip(plan)
                else:
                    yield plan

    def group_problem(self, convs: list[ConvInfo]) -> str | None:
        if len(convs) < self.options.min_siblings:
            return TOO_FEW
        cap = self.options.max_out_channels
        if cap is not None and sum(c.out_channels for c in convs) > cap:
            return TOO_WIDE
        if len({weight_form(c.bias_value) for c in convs if c.bias_value is not None}) > 1:
            return WEIGHT_FORMS_DIFFER
        window = MergedWindow.covering(convs)
        if any(window.output_spatial(c.in_spatial) != c.out_spatial for c in convs):
            return WINDOW_MISMATCH  # cannot happen for valid models; a guard, not a feature
        return None

    def chains(self, graph: gs.Graph, used: set[str], stats: PassStats) -> Iterator[ConvChain]:
        for conv in nodes_with_op(graph, "Conv"):
            follower = sole_consumer(conv.outputs[0]) if len(conv.outputs) == 1 else None
            if (conv.name in used or follower is None or follower.op != "Conv" or follower.domain not in DEFAULT_DOMAINS
                    or follower.name in used or follower.inputs[0] is not conv.outputs[0]):
                continue
            reason = conv_problem(graph, conv) or conv_problem(graph, follower)
            if reason is None:
                chain = ConvChain(describe_conv(graph, conv), describe_conv(graph, follower))
                reason = composition_problem(graph, chain)
            if reason is not None:
                stats.skip(f"vertical: {reason}")
                continue
            used.update((conv.name, follower.name))
            yield chain

    # -- vertical: rounds until nothing is left ----------------------------------------------------

    def apply(self, model: onnx.ModelProto, only: Collection[str] | None = None) -> PassResult:
        """With `vertical`, rewrite in rounds until a round finds no site (a composition or merge can
        make a new one). Rewrites that build on each other are one site for the pass manager;
        while it bisects, the rounds are replayed keeping only the chosen sites' rewrites."""
        if not self.options.vertical:
            return super().apply(model, only)
        allowed = None
        if only is not None:
            planned = self.rewrite_in_rounds(gs.import_onnx(model), PassStats()).sites()
            allowed = frozenset().union(*(planned[key] for key in only if key in planned))
        graph = gs.import_onnx(model)
        stats = PassStats()
        rounds = self.rewrite_in_rounds(graph, stats, allowed)
        sites = rounds.sites() if only is None else planned
        rewritten = set().union(*rounds.components)
        applied = [key for key, names in sites.items() if names & rewritten]
        stats.rewritten = len(applied)
        return PassResult(export_like(graph, model) if applied else model, list(sites), applied, stats)

    def rewrite_in_rounds(self, graph: gs.Graph, stats: PassStats, allowed: frozenset[str] | None = None) -> Rounds:
        """Declines are counted in the last round (what is left, and why). `allowed` keeps only the
        rewrites of those input nodes."""
        rounds = Rounds({node.name: index for index, node in enumerate(graph.nodes)})
        while True:
            round_stats = PassStats()
            sites = self.find_sites(graph, round_stats)
            if allowed is not None:
                sites = [s for s in sites if rounds.covered(s) <= allowed]
            if not sites:
                stats.skipped.update(round_stats.skipped)
                return rounds
            for site in sites:
                before = len(graph.nodes)
                self.rewrite_site(graph, site, stats)
                rounds.record(site, graph.nodes[before:])
            graph.cleanup(remove_unused_graph_inputs=False).toposort()


@dataclass
class Rounds:
    """Which input nodes each new node replaces, and which rewrites went together (components)."""

    order: dict[str, int]  # input node name -> position in the input graph
    origins: dict[str, frozenset[str]] = field(default_factory=dict)  # new node -> input nodes it replaces
    components: list[set[str]] = field(default_factory=list)

    def covered(self, site: Site) -> frozenset[str]:
        return frozenset().union(*(self.origins.get(node.name, {node.name}) for node in site_nodes(site.payload)))

    def record(self, site: Site, new_nodes: list[gs.Node]) -> None:
        covered = self.covered(site)
        for node in new_nodes:
            self.origins[node.name] = covered
        joined = set(covered)
        for component in [c for c in self.components if c & covered]:
            joined |= component
            self.components.remove(component)
        self.components.append(joined)

    def sites(self) -> dict[str, set[str]]:
        """Each component by its key (its input nodes in graph order), in graph order."""
        ordered = sorted((sorted(c, key=self.order.__getitem__) for c in self.components), key=lambda names: self.order[names[0]])
        return {",".join(names): set(names) for names in ordered}


# -- matching ----------------------------------------------------------------------------------------


def sibling_readers(graph: gs.Graph) -> list[list[gs.Node]]:
    """Convs grouped by the tensor they read, in graph order, where two or more read one tensor."""
    readers: dict[Hashable, list[gs.Node]] = defaultdict(list)
    for conv in nodes_with_op(graph, "Conv"):
        readers[data_source(conv.inputs[0])].append(conv)
    return [convs for convs in readers.values() if len(convs) > 1]


def data_source(tensor: gs.Tensor) -> Hashable:
    """What a Conv reads, equal for equal values: the tensor, or for the output of QuantizeLinear ->
    DequantizeLinear, the quantized tensor and both nodes' parameters (ONNX Runtime's
    DedicatedQDQPair, or a graph not canonicalized, gives each reader its own equal pair)."""
    dequantize = producer_of(tensor, "DequantizeLinear")
    quantize = producer_of(dequantize.inputs[0], "QuantizeLinear") if dequantize is not None else None
    if quantize is None:
        return tensor.name
    signatures = (quantizer_signature(quantize), quantizer_signature(dequantize))
    return tensor.name if None in signatures else (quantize.inputs[0].name, signatures)


def quantizer_signature(node: gs.Node) -> Hashable | None:
    """A Q or DQ node's attributes and constant scale and zero point, hashable; None when a
    parameter is not a constant."""
    parameters = []
    for tensor in node.inputs[1:]:
        value = constant_value(tensor) if tensor.name else None
        if tensor.name and value is None:
            return None
        parameters.append(None if value is None else (value.dtype.str, value.shape, value.tobytes()))
    return (node.op, tuple(sorted((k, repr(v)) for k, v in node.attrs.items())), tuple(parameters))


def weight_form(value: Weight) -> Hashable:
    """None for a plain constant; for a quantized one, what its merged weight must share: stored,
    scale and zero point dtypes, float or integer form, the Q/DQ attributes but the axis."""
    q = value.quantization
    if q is None:
        return None
    attrs = [tuple(sorted((k, repr(v)) for k, v in node.attrs.items() if k != "axis")) for node in (q.dequantize, q.quantize) if node]
    return (value.stored.dtype.str, q.scale.dtype.str, q.zero_point.dtype.str, q.quantize is not None, *attrs)


def per_filter(values: np.ndarray, channels: int) -> np.ndarray:
    """A quantization parameter per output channel: per-channel as it is, per-tensor repeated."""
    flat = values.reshape(-1)
    return flat if flat.size == channels else np.repeat(flat, channels)


def conv_problem(graph: gs.Graph, conv: gs.Node) -> str | None:
    """The first precondition a Conv fails, checked in an order where each may rely on the last."""
    attrs = conv.attrs
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        return "auto_pad is not NOTSET"
    if attrs.get("group", 1) != 1:
        return "grouped convolution (group != 1)"
    if len(conv.outputs) != 1 or len(conv.inputs) < 2:
        return "not a Conv with one output and a weight"
    conv_weight, bias = weight(conv.inputs[1]), weight(conv.inputs[2]) if has_bias(conv) else None
    if conv_weight is None:
        return "weight is not a constant"
    if has_bias(conv) and bias is None:
        return "bias is not a constant"
    if (reason := quantization_problem(conv_weight, bias)) is not None:
        return reason
    if conv_weight.dtype not in FLOAT_DTYPES:
        return "weight dtype is not float32 or float16"
    if bias is not None and bias.dtype != conv_weight.dtype:
        return "bias dtype differs from the weight's"
    shape = conv_weight.shape
    spatial = len(shape) - 2
    if spatial < 1:
        return "weight has no spatial axes"
    for tensor in (conv.inputs[0], conv.outputs[0]):
        dims = tensor.shape
        if dims is None or len(dims) != len(shape) or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims[2:]):
            return "spatial shapes are not static"
    if list(attrs.get("kernel_shape", shape[2:])) != list(shape[2:]):
        return "kernel_shape disagrees with the weight"
    pads = attrs.get("pads", [0] * 2 * spatial)
    strides = attrs.get("strides", [1] * spatial)
    dilations = attrs.get("dilations", [1] * spatial)
    if len(pads) != 2 * spatial or len(strides) != spatial or len(dilations) != spatial:
        return "pads, strides or dilations do not match the kernel rank"
    if min(pads) < 0 or min(strides) < 1 or min(dilations) < 1:
        return "negative pads or non-positive strides or dilations"
    if used_in_subgraph(graph, conv.outputs[0]):
        return "output is read inside a subgraph"
    return None


def quantization_problem(conv_weight: Weight, bias: Weight | None) -> str | None:
    """Quantized weights merge per output channel, padded with zero-point taps: int8/uint8 (float
    form: quantized to them) along axis 0 or per tensor; integer biases likewise."""
    for value, what in ((conv_weight, "weight"), (bias, "bias")):
        q = value.quantization if value is not None else None
        if q is None:
            continue
        if q.axis not in (None, 0):
            return f"{what} quantized along an axis other than the output channels"
        types = (np.int8, np.uint8) if what == "weight" else (np.int8, np.uint8, np.int32)
        if q.zero_point.dtype not in [np.dtype(t) for t in types]:
            return f"{what} quantized to a type other than {', '.join(np.dtype(t).name for t in types)}"
    return None


def has_bias(conv: gs.Node) -> bool:
    return len(conv.inputs) > 2 and bool(conv.inputs[2].name)


def describe_conv(graph: gs.Graph, conv: gs.Node) -> ConvInfo:
    """Read out a Conv that passed `conv_problem`."""
    conv_weight = weight(conv.inputs[1])
    bias = weight(conv.inputs[2]) if has_bias(conv) else None
    spatial = len(conv_weight.shape) - 2
    pads = [int(p) for p in conv.attrs.get("pads", [0] * 2 * spatial)]
    return ConvInfo(
        node=conv,
        weight_value=conv_weight,
        bias_value=bias,
        begin=tuple(pads[:spatial]),
        end=tuple(pads[spatial:]),
        strides=tuple(int(s) for s in conv.attrs.get("strides", [1] * spatial)),
        dilations=tuple(int(d) for d in conv.attrs.get("dilations", [1] * spatial)),
        in_spatial=tuple(int(d) for d in conv.inputs[0].shape[2:]),
        out_spatial=tuple(int(d) for d in conv.outputs[0].shape[2:]),
        activation=activation_of(graph, conv.outputs[0]),
        live_out=live_channels(conv_weight, 0, bias),
        live_in=live_channels(conv_weight, 1),
    )


def activation_of(graph: gs.Graph, out: gs.Tensor) -> gs.Node | None:
    """The elementwise activation that alone reads a conv's output, if one does."""
    act = sole_consumer(out)
    if (act is None or is_graph_output(graph, out) or used_in_subgraph(graph, out) or act.op not in ACTIVATIONS
            or act.domain not in DEFAULT_DOMAINS or act.inputs[0] is not out or len(act.outputs) != 1):
        return None
    return act


def same_op(a: gs.Node | None, b: gs.Node | None) -> bool:
    """Both None, or the same op with the same attributes and extra inputs (Clip's bounds)
    omitted in both or equal constants in both."""
    if a is None or b is None:
        return a is b
    return a.op == b.op and a.attrs == b.attrs and len(a.inputs) == len(b.inputs) and all(
        (not x.name and not y.name) or equal_constants(x, y) for x, y in zip(a.inputs[1:], b.inputs[1:]))


def by_activation(convs: list[ConvInfo]) -> list[list[ConvInfo]]:
    """The siblings that may merge: all of them when one is narrow (aligning it is the gain), else
    each class that ends in the same activation (the Split must not part a Conv from the
    activation TensorRT would fuse it with)."""
    classes: list[list[ConvInfo]] = []
    for conv in convs:
        same = next((members for members in classes if same_op(members[0].activation, conv.activation)), None)
        if same is None:
            classes.append([conv])
        else:
            same.append(conv)
    if len(classes) > 1 and any(conv.live_out % FP16_ALIGNMENT for conv in convs):
        return [convs]
    return classes


def same_window(convs: list[ConvInfo]) -> list[list[ConvInfo]]:
    """Siblings split by identical kernel and pads: groups that merge without adding zeros."""
    groups: dict[tuple, list[ConvInfo]] = defaultdict(list)
    for conv in convs:
        groups[(conv.kernel, conv.begin, conv.end)].append(conv)
    return list(groups.values())


def plan_group(graph: gs.Graph, convs: list[ConvInfo]) -> SiblingGroup | str:
    """Find the shared activation, the output quantization and the Concat to drop, and order the
    siblings by that Concat; or the reason their output quantization cannot be shared."""
    activations = [c.activation for c in convs]
    shared = all(a is not None and same_op(a, activations[0]) for a in activations)
    tails = [a.outputs[0] for a in activations] if shared else [c.output for c in convs]
    quantized = output_quantization(graph, tails)
    if isinstance(quantized, str):
        return quantized
    ends = quantized.ends if quantized is not None else tails
    concat = concat_of_exactly(graph, ends)
    if concat is not None:
        order = sorted(range(len(convs)), key=lambda i: [id(t) for t in concat.inputs].index(id(ends[i])))
        convs, activations = [convs[i] for i in order], [activations[i] for i in order]
        if quantized is not None:
            quantized = OutputQuantization([quantized.quantizers[i] for i in order], [quantized.dequantizers[i] for i in order])
    return SiblingGroup(convs, MergedWindow.covering(convs), activations if shared else None, quantized, concat)


def output_quantization(graph: gs.Graph, tails: list[gs.Tensor]) -> OutputQuantization | None | str:
    """Each sibling's output QuantizeLinear -> DequantizeLinear, when every (activated) output goes
    only to one; they must be equal and per tensor, which commutes with Split and Concat. None when
    no output is quantized; else the reason one Q/DQ cannot serve them all."""
    quantizers = [quantizer_of(graph, t) for t in tails]
    if all(q is None for q in quantizers):
        return None
    if any(q is None for q in quantizers):
        return OUTPUT_Q_MIXED
    dequantizers = [sole_consumer(q.outputs[0]) for q in quantizers]
    for q, dq in zip(quantizers, dequantizers):
        if (dq is None or dq.op != "DequantizeLinear" or dq.domain not in DEFAULT_DOMAINS or dq.inputs[0] is not q.outputs[0]
                or len(q.outputs) != 1 or len(dq.outputs) != 1 or is_graph_output(graph, q.outputs[0])
                or used_in_subgraph(graph, q.outputs[0]) or per_tensor_problem(q) or per_tensor_problem(dq)):
            return OUTPUT_Q_SHAPE
    if len({quantizer_signature(q) for q in quantizers}) > 1 or len({quantizer_signature(dq) for dq in dequantizers}) > 1:
        return OUTPUT_Q_DIFFERS
    return OutputQuantization(quantizers, dequantizers)


def quantizer_of(graph: gs.Graph, tail: gs.Tensor) -> gs.Node | None:
    """The QuantizeLinear that alone reads a sibling's (activated) output, if one does."""
    q = sole_consumer(tail)
    if (q is None or q.op != "QuantizeLinear" or q.domain not in DEFAULT_DOMAINS or q.inputs[0] is not tail
            or is_graph_output(graph, tail) or used_in_subgraph(graph, tail)):
        return None
    return q


def concat_of_exactly(graph: gs.Graph, tails: list[gs.Tensor]) -> gs.Node | None:
    """The Concat on axis 1 whose inputs are these tensors (in any order) and that alone reads them."""
    concat = sole_consumer(tails[0])
    if concat is None or concat.op != "Concat" or concat.domain not in DEFAULT_DOMAINS:
        return None
    if len(concat.inputs) != len(tails) or {id(t) for t in concat.inputs} != {id(t) for t in tails}:
        return None
    if any(sole_consumer(t) is not concat or is_graph_output(graph, t) or used_in_subgraph(graph, t) for t in tails):
        return None
    rank = len(tails[0].shape) if tails[0].shape is not None else None
    axis = concat.attrs.get("axis")
    return concat if rank is not None and axis is not None and axis % rank == 1 else None


def composition_problem(graph: gs.Graph, chain: ConvChain) -> str | None:
    """Why the 1x1 cannot compose into its follower (derivation: docs/passes/merge-convs.md)."""
    first, second = chain.pointwise, chain.follower
    if any(k != 1 for k in first.kernel) or any(s != 1 for s in first.strides) or any(first.begin + first.end):
        return "first conv is not 1x1 with stride 1 and no pads"
    if first.quantized or second.quantized:
        return "quantized weights are not composed"
    if first.weight.dtype != second.weight.dtype:
        return "the two convs have different dtypes"
    if is_graph_output(graph, first.output):
        return "output of the 1x1 conv is a graph output"
    if any(second.begin + second.end) and first.bias is not None and np.any(first.bias != 0):
        return "second conv pads its input and the 1x1 conv has a non-zero bias (borders would differ)"
    composed = 2 * second.live_out * first.live_in * math.prod(second.kernel) * math.prod(second.out_spatial)
    if composed > first.live_flops + second.live_flops:
        return "composing would grow the FLOPs"
    return None


def site_nodes(payload: SiblingGroup | ConvChain) -> list[gs.Node]:
    """Every node a site's rewrite replaces."""
    if isinstance(payload, ConvChain):
        return [payload.pointwise.node, payload.follower.node]
    quantized = payload.quantized_output
    output_quantization = quantized.quantizers + quantized.dequantizers if quantized else []
    concat = [payload.concat] if payload.concat else []
    return [c.node for c in payload.convs] + (payload.activations or []) + output_quantization + concat


# -- rewriting ---------------------------------------------------------------------------------------


def merge_siblings(graph: gs.Graph, group: SiblingGroup, stats: PassStats) -> None:
    convs, window, activations, concat = group.convs, group.window, group.activations, group.concat
    quantized = group.quantized_output
    stem = f"{convs[0].node.name}_merged"
    dtype = convs[0].dtype
    weight_values = np.concatenate([window.pad_kernel(c) for c in convs], axis=0)
    inputs = [convs[0].input, merged_weight(graph, f"{stem}_weight", [c.weight_value for c in convs], weight_values)]
    if any(c.bias is not None for c in convs):
        inputs.append(merged_bias(graph, f"{stem}_bias", convs))
    # The merged Conv, then what the siblings shared after it: the activation, the output Q -> DQ.
    steps = [("Conv", stem, window.attrs(), inputs[1:], dtype)]
    if activations:
        act = activations[0]
        steps.append((act.op, f"{stem}_{act.op.lower()}", dict(act.attrs), act.inputs[1:], dtype))
    if quantized:
        for like in (quantized.quantizers[0], quantized.dequantizers[0]):
            steps.append((like.op, f"{stem}_{like.op.lower()}", dict(like.attrs), like.inputs[1:], like.outputs[0].dtype))
    ends = quantized.ends if quantized else [a.outputs[0] for a in activations] if activations else [c.output for c in convs]
    final = concat.outputs[0] if concat is not None else None
    # Shaped, so that a later round (vertical) can tell the merged Conv's geometry.
    shape = [convs[0].output.shape[0], int(weight_values.shape[0]), *convs[0].out_spatial]
    # Cut the old producers first: their output tensors are written by the new nodes below.
    for old in site_nodes(group):
        old.outputs.clear()

    current, new_nodes = convs[0].input, []
    for index, (op, name, attrs, extra_inputs, out_dtype) in enumerate(steps):
        last = index == len(steps) - 1
        out = final if last and final is not None else gs.Variable(unique_name(graph, f"{name}_output"), dtype=out_dtype, shape=shape)
        new_nodes.append(gs.Node(op, unique_name(graph, name), attrs, inputs=[current, *extra_inputs], outputs=[out]))
        current = out
    if concat is None:
        new_nodes.append(gs.Node("Split", unique_name(graph, f"{stem}_split"), {"axis": 1}, inputs=[current], outputs=ends))
        set_split_sizes(graph, new_nodes[-1], [c.out_channels for c in convs])
    graph.nodes.extend(new_nodes)

    stats.counters["convs_merged"] += len(convs)
    if convs[0].weight_value.quantized:
        stats.counters["quantized_convs_merged"] += len(convs)
    if quantized:
        stats.counters["output_quantizers_shared"] += len(convs)
    stats.counters["kernels_zero_padded"] += sum(c.kernel != window.kernel for c in convs)
    if activations:
        stats.counters["activations_shared"] += len(activations)
    if concat is not None:
        stats.counters["concats_dropped"] += 1
    stats.details.append({
        "convs": [c.node.name for c in convs],
        "out_channels": [c.out_channels for c in convs],
        "merged_out_channels": int(weight_values.shape[0]),
        "kernel": list(window.kernel),
        "pads": list(window.begin + window.end),
        "flops": [sum(c.flops for c in convs), 2 * int(weight_values.size) * math.prod(convs[0].out_spatial)],
        "flop_growth": round(window.flop_growth(convs), 3),
        "activation": activations[0].op if activations else None,
        "concat_dropped": concat is not None,
        "output_quantized": quantized is not None,
    })


def merged_weight(graph: gs.Graph, stem: str, siblings: list[Weight], stored: np.ndarray) -> gs.Tensor:
    """The merged weight in the siblings' form: stored values concatenated; a quantized one per
    output channel (axis 0), each sibling's scales and zero points in its filters' places."""
    like = siblings[0]
    if like.quantization is None:
        return make_constant(graph, stem, stored)
    channels = [w.shape[0] for w in siblings]
    scale = np.concatenate([per_filter(w.quantization.scale, n) for w, n in zip(siblings, channels)])
    zero_point = np.concatenate([per_filter(w.quantization.zero_point, n) for w, n in zip(siblings, channels)])
    return make_weight(graph, stem, like, stored, scale, zero_point, axis=0)


def merged_bias(graph: gs.Graph, stem: str, convs: list[ConvInfo]) -> gs.Tensor:
    """The siblings' biases concatenated in their form, zero for a sibling without one. A missing
    quantized bias is integer zeros with the scale ONNX Runtime gives a bias (input scale x weight
    scale), any scale reading zero as zero."""
    like = next(c.bias_value for c in convs if c.bias_value is not None)
    parts = [c.bias_value if c.bias_value is not None
             else Weight(np.zeros(c.out_channels, like.stored.dtype), zero_bias_quantization(c, like)) for c in convs]
    return merged_weight(graph, stem, parts, np.concatenate([p.stored for p in parts]))


def zero_bias_quantization(conv: ConvInfo, like: Weight) -> Quantization | None:
    q, weight_quantization = like.quantization, conv.weight_value.quantization
    if q is None:
        return None
    scale = np.ones(conv.out_channels, q.scale.dtype)
    if weight_quantization is not None:
        scale = per_filter(weight_quantization.scale, conv.out_channels).astype(q.scale.dtype)
    dequantize = producer_of(conv.input, "DequantizeLinear")
    input_scale = constant_value(dequantize.inputs[1]) if dequantize is not None else None
    if input_scale is not None and input_scale.size == 1:
        scale = (scale * input_scale.reshape(())).astype(q.scale.dtype)
    return Quantization(q.dequantize, scale, np.zeros(conv.out_channels, q.zero_point.dtype), 0, q.quantize)


def compose_chain(graph: gs.Graph, chain: ConvChain, stats: PassStats) -> None:
    """W'[o, c, taps] = sum_m W_b[o, m, taps] W_a[m, c]; b' = b_b + sum_{m, taps} W_b[o, m, taps] b_a[m]."""
    first, second = chain.pointwise, chain.follower
    dtype = second.weight.dtype
    pointwise = first.weight.reshape(first.weight.shape[:2]).astype(np.float64)
    follower = second.weight.astype(np.float64)
    composed = np.einsum("om...,mc->oc...", follower, pointwise)
    inputs = [first.input, make_constant(graph, f"{second.node.name}_composed_weight", composed.astype(dtype))]
    if first.bias is not None or second.bias is not None:
        bias = np.zeros(second.out_channels) if second.bias is None else second.bias.astype(np.float64)
        if first.bias is not None:
            bias = bias + follower.reshape(follower.shape[0], follower.shape[1], -1).sum(axis=2) @ first.bias.astype(np.float64)
        inputs.append(make_constant(graph, f"{second.node.name}_composed_bias", bias.astype(dtype)))
    out = second.output
    first.node.outputs.clear()
    second.node.outputs.clear()
    attrs = {k: v for k, v in second.node.attrs.items() if k != "auto_pad"}
    graph.nodes.append(gs.Node("Conv", unique_name(graph, f"{second.node.name}_composed"), attrs, inputs=inputs, outputs=[out]))
    stats.counters["chains_composed"] += 1
    stats.details.append({
        "convs": [first.node.name, second.node.name],
        "flops": [first.flops + second.flops, 2 * int(composed.size) * math.prod(second.out_spatial)],
    })
