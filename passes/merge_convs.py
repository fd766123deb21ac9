"""merge-convs: merge sibling convolutions that read one tensor into a single, wider Conv.

Matches:
  1. Sibling Convs: two or more Convs reading the same tensor with equal strides and dilations,
     group 1, auto_pad NOTSET, constant weights (and biases) of one float dtype, and the same
     static output shape. Their kernels may differ (a 1x1 beside a 3x3, as in SqueezeNet's fire
     modules): each kernel is zero-padded into one merged window (see "The merged window").
  2. Shared activation: when every sibling's only reader is the same elementwise activation
     (same op, attributes and constant extra inputs: Relu after each, Clip with one min/max),
     a single activation follows the merged Conv. Siblings that end differently merge only when
     one of them is narrow (not a multiple of 8 channels), and their activations stay after the
     Split; aligned ones merge only with siblings that end alike (see `by_activation`).
  3. Concat: when the siblings' outputs (after the shared activation, if any) are read only by
     one Concat on axis 1 made of exactly those tensors, the siblings are merged in the Concat's
     order and the merged Conv (or its activation) writes the Concat's output itself.
  4. Vertical (option `vertical`, off by default): a 1x1 Conv (stride 1, no pads, group 1) whose
     output is read only by another group-1 Conv composes into that Conv, when that does not grow
     the FLOPs (see "Vertical composition").

Emits one Conv whose output channels are the siblings' in order, then a Split on axis 1 (sizes
as a constant input from opset 13, as an attribute before) that writes the siblings' original
output tensors, so graph outputs keep their names, dtypes and shapes. With a matching Concat
(case 3) there is neither Split nor Concat. pad-channels, which runs after this pass in `all`,
aligns the merged Conv's channel total: it handles a Conv whose only consumer is such a Split.

Why TensorRT benefits: on an H100 at batch 1 each convolution costs about 7-9 µs of fixed
overhead, so one Conv instead of two or three siblings ran 1.1x-2.9x faster (SqueezeNet fire,
Inception 1x1 branches, detection heads; measured, see shared/evidence/h100-conv-probe.md).
A merged detection head of 80+4+1 = 85 channels was slower at batch 32 until padded to 88,
hence merge-convs runs before pad-channels. TensorRT merges some siblings on its own: reporters
show it joining two convolutions of the same kernel size on one input into one layer
("Conv_45 + Relu_46 || Conv_52 + Relu_53", implicit INT8, TensorRT 8), and say it does not when
the model is explicitly quantized with Q/DQ (NVIDIA/TensorRT#1602) or when the kernel sizes
differ (TensorRT 7, 3D inception branches, NVIDIA/TensorRT#501, where NVIDIA answered that the
merge "can improve your performance"). This pass merges every eligible group, identical kernels
included, so that pad-channels sees (and aligns) the merged width.

The merged window, per spatial axis, with dilation d: a sibling with kernel k and pads (b, e)
reads the input at offsets -b, -b + d, ..., last = -b + (k - 1)d from each output's origin
(origin = output index x stride). The merged kernel covers the union of those taps: from
S = min(-b) to R = max(last), so K = (R - S)/d + 1 taps and begin pad B = -S = max(b). A sibling's
kernel sits t = (B - b)/d taps in, zeros around it, which reads exactly its own offsets as long
as t is a whole number: all siblings' -b must lie on one lattice of step d (part of the grouping
key). The end pad only sets the output length: the output-size numerator
L + B + E - d(K - 1) - 1 equals a sibling's own L + b + e - d(k - 1) - 1 when E = e + (R - last);
siblings must already agree on the output length (inferred shapes), and every such E gives it,
so the smallest is used. For centred kernels (1x1 pad 0, 3x3 pad 1, 5x5 pad 2, any dilation)
this is symmetric zero padding by (K - k)/2 taps a side with merged pads p + d(K - k)/2.
Results are identical for finite inputs: the added taps multiply the input by zero (an Inf in
the input would become NaN in a sibling's channels that did not read it).

Vertical composition: with A = W_a x + b_a (1x1) feeding B, the composed Conv has weight
W'[o, c, taps] = sum_m W_b[o, m, taps] W_a[m, c] and bias b' = b_b + sum_{m, taps} W_b[o, m, taps] b_a[m].
Inside the input this equals B(A(x)). But B zero-pads A's output, whose padded positions hold 0,
not b_a, while the composed Conv has folded b_a into every tap: at an output whose window
overlaps the padding it adds sum over the padded taps of W_b[o, m, tap] b_a[m]. That term is zero
for every output exactly when B has no pads (a NOTSET Conv without pads never reads padding) or
b_a = 0, so only those chains are composed.

Rounds (with `vertical`): a rewrite can make a new site. A composed Conv reads the 1x1's input,
where it can have siblings; two composed 1x1s are a 1x1 that can compose again; siblings merged
into one Conv leave a 1x1 before them with one reader, and a merged 1x1 that writes a Concat's
output can compose into the Conv after it. So the pass finds and rewrites sites in rounds, cleaning
up in between, until a round finds none: one run leaves nothing for the next. Rewrites that
build on each other (a round reads a node an earlier round made) are one site for the pass
manager, named by the input nodes they replace in graph order; while it bisects, the rounds are
replayed keeping only the chosen sites' rewrites. Declines are counted in the last round: what
is left, and why. Without `vertical` one round is all there is (merging alone never makes a new
site), so the pass runs a single round.

Declines (each counted by reason): a sibling with runtime or quantized (Q/DQ) weights, group
!= 1, auto_pad other than NOTSET, a dtype other than float32/float16, non-static spatial shapes,
an output read inside a subgraph; siblings with different strides, dilations, pad lattice or
output shape; an aligned sibling whose activation no other sibling shares; a group whose
zero-padded kernels would grow its FLOPs past `max_flop_growth`
(then identical-window siblings are still merged), wider than `max_out_channels`, or smaller
than `min_siblings`. Q/DQ siblings are all declined: each sibling's output quantization would
sit behind the Split, where TensorRT cannot fuse it into the convolution; merging them needs
equal output scales and per-channel weight-scale concatenation, which is not implemented.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graphs import (
    DEFAULT_DOMAINS,
    FLOAT_DTYPES,
    nodes_with_op,
    constant_value,
    equal_constants,
    export_like,
    is_graph_output,
    make_constant,
    node_names,
    sole_consumer,
    unique_name,
    used_in_subgraph,
)
from graphopt.passbase import GraphPass, PassResult, PassStats, Site

# Elementwise ops of one data input: f(concat(a, b)) == concat(f(a), f(b)) along any axis.
ACTIVATIONS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Mish", "Gelu",
})
SPLIT_SIZES_AS_INPUT = 13  # Split takes its sizes as an input from opset 13, an attribute before

NO_GEOMETRY_MATCH = "no sibling with the same strides, dilations, pad lattice and output shape"
FLOPS_GROW = "zero-padded kernels would grow the group's FLOPs past max-flop-growth"
TOO_FEW = "fewer compatible siblings than min-siblings"
TOO_WIDE = "merged conv would be wider than max-out-channels"
WINDOW_MISMATCH = "merged window would change the output shape"
FP16_ALIGNMENT = 8  # channels tensor cores want at FP16 (shared/evidence/h100-conv-probe.md)
MIXED_ACTIVATIONS = "aligned siblings end in different activations: the Split would part a Conv from its activation"


@dataclass(frozen=True)
class MergeConvsOptions:
    min_siblings: int = 2  # smaller groups of compatible siblings are left alone
    # No merged Conv wider than this; none: no limit. No measurement shows a wide merge losing
    # (Inception-v3's Mixed_7b/7c input groups are 1152 wide), so there is no limit by default.
    max_out_channels: int | None = None
    # Merged FLOPs over the siblings' FLOPs that zero-padded kernels may add. A fire module's
    # 1x1 + 3x3 grows 1.8x and still ran 1.11x faster merged at batch 32 (H100 probe); larger
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
class ConvGeometry:
    """Where a Conv's taps fall on each spatial axis."""

    kernel: tuple[int, ...]
    begin: tuple[int, ...]  # pads before each spatial axis
    end: tuple[int, ...]  # pads after each spatial axis
    strides: tuple[int, ...]
    dilations: tuple[int, ...]

    def first_tap(self, axis: int) -> int:
        return -self.begin[axis]

    def last_tap(self, axis: int) -> int:
        return -self.begin[axis] + (self.kernel[axis] - 1) * self.dilations[axis]


@dataclass(frozen=True)
class ConvInfo:
    """A Conv that passed every precondition, with its constants read out."""

    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None
    geometry: ConvGeometry
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]

    @property
    def input(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def live_out_channels(self) -> int:
        """Output channels that compute something. pad-channels' zero filters (zero weight and bias)
        do not count, or a group declined for its FLOP growth would pass once padded, and a
        second run of `all` would merge it."""
        weight = self.weight.reshape(self.weight.shape[0], -1)
        live = np.any(weight != 0, axis=1) | (self.bias != 0 if self.bias is not None else False)
        return int(np.count_nonzero(live)) or self.out_channels

    @property
    def live_in_channels(self) -> int:
        """Input channels some filter reads with a non-zero weight (pad-channels adds zero ones)."""
        reads = np.any(self.weight != 0, axis=tuple(a for a in range(self.weight.ndim) if a != 1))
        return int(np.count_nonzero(reads)) or int(self.weight.shape[1])

    @property
    def live_flops(self) -> int:
        """`flops` without pad-channels' zero filters and zero input weights."""
        kernel = math.prod(self.weight.shape[2:])
        return self.live_out_channels * self.live_in_channels * kernel * math.prod(self.out_spatial)

    @property
    def flops(self) -> int:
        """Multiply-accumulates per image (constant factors cancel in every comparison here)."""
        return math.prod(self.weight.shape) * math.prod(self.out_spatial)

    @property
    def merge_key(self) -> tuple:
        """Siblings with equal keys can share one merged window."""
        g = self.geometry
        lattice = tuple(g.first_tap(a) % g.dilations[a] for a in range(len(g.kernel)))
        return (self.input.name, self.weight.dtype, g.strides, g.dilations, lattice, self.out_spatial)


@dataclass(frozen=True)
class MergedWindow:
    """The kernel and pads of the merged Conv (see the module docstring)."""

    kernel: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]

    @classmethod
    def covering(cls, convs: list[ConvInfo]) -> MergedWindow:
        g0 = convs[0].geometry
        kernel, begin, end = [], [], []
        for a, d in enumerate(g0.dilations):
            first = min(c.geometry.first_tap(a) for c in convs)
            last = max(c.geometry.last_tap(a) for c in convs)
            kernel.append((last - first) // d + 1)
            begin.append(-first)
            end.append(min(c.geometry.end[a] + last - c.geometry.last_tap(a) for c in convs))
        return cls(tuple(kernel), tuple(begin), tuple(end), g0.strides, g0.dilations)

    def offsets(self, geometry: ConvGeometry) -> tuple[int, ...]:
        """How many taps into the merged kernel a sibling's kernel starts, per axis."""
        return tuple((B - b) // d for B, b, d in zip(self.begin, geometry.begin, self.dilations))

    def pad_kernel(self, conv: ConvInfo) -> np.ndarray:
        widths = [(0, 0), (0, 0)] + [
            (t, K - k - t) for t, K, k in zip(self.offsets(conv.geometry), self.kernel, conv.geometry.kernel)
        ]
        return np.pad(conv.weight, widths)

    def output_spatial(self, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            (n + b + e - d * (k - 1) - 1) // s + 1
            for n, b, e, d, k, s in zip(in_spatial, self.begin, self.end, self.dilations, self.kernel, self.strides)
        )

    def flop_growth(self, convs: list[ConvInfo]) -> float:
        merged = sum(c.live_out_channels for c in convs) * math.prod(self.kernel)
        return merged / sum(c.live_out_channels * math.prod(c.geometry.kernel) for c in convs)

    def attrs(self) -> dict:
        return {
            "kernel_shape": list(self.kernel),
            "pads": list(self.begin + self.end),
            "strides": list(self.strides),
            "dilations": list(self.dilations),
            "group": 1,
        }


@dataclass(frozen=True)
class SiblingGroup:
    """One horizontal site: siblings in output-channel order, and what follows them."""

    convs: list[ConvInfo]
    window: MergedWindow
    activations: list[gs.Node] | None  # the shared activation node of each sibling
    concat: gs.Node | None  # the Concat that the merged output replaces


@dataclass(frozen=True)
class ConvChain:
    """One vertical site: a 1x1 Conv and the Conv that alone reads its output."""

    pointwise: ConvInfo
    follower: ConvInfo


@dataclass
class Rounds:
    """What rounds of rewrites did: the input nodes behind each new node, and which went together.

    A rewrite that reads a node an earlier rewrite made joins that rewrite's component; each
    component is one site, named by its input nodes in graph order.
    """

    order: dict[str, int]  # input node name -> position in the input graph
    origins: dict[str, frozenset[str]] = field(default_factory=dict)  # new node -> input nodes it replaces
    components: list[set[str]] = field(default_factory=list)

    def record(self, site: Site, new_nodes: list[gs.Node]) -> None:
        covered = frozenset().union(*(self.origins.get(node.name, {node.name}) for node in site_nodes(site.payload)))
        for node in new_nodes:
            self.origins[node.name] = covered
        joined = set(covered)
        for component in [c for c in self.components if c & covered]:
            joined |= component
            self.components.remove(component)
        self.components.append(joined)

    def keys(self) -> dict[str, set[str]]:
        """Each component by its key, in graph order."""
        ordered = [sorted(c, key=self.order.__getitem__) for c in self.components]
        return {",".join(names): set(names) for names in sorted(ordered, key=lambda names: self.order[names[0]])}


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
                if (reason := reason_not_mergeable(graph, conv)) is not None:
                    stats.skip(reason)
                else:
                    candidates.append(describe_conv(conv))
            for group in self._groups(graph, candidates, stats):
                nodes = [c.node for c in group.convs]
                used.update(n.name for n in nodes)
                sites.append(Site(node_names(nodes), group))
        if self.options.vertical:
            for chain in self._chains(graph, used, stats):
                nodes = [chain.pointwise.node, chain.follower.node]
                used.update(n.name for n in nodes)
                sites.append(Site(node_names(nodes), chain))
        return sites

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        if isinstance(site.payload, SiblingGroup):
            merge_siblings(graph, site.payload, stats)
        else:
            compose_chain(graph, site.payload, stats)

    # -- vertical: rounds until nothing is left ----------------------------------------------------

    def apply(self, model: onnx.ModelProto, only: Collection[str] | None = None) -> PassResult:
        """With `vertical`, rewrite in rounds until a round finds no site (see "Rounds" above)."""
        if not self.options.vertical:
            return super().apply(model, only)
        allowed = None
        if only is not None:
            planned = self._rewrite_in_rounds(gs.import_onnx(model), PassStats()).keys()
            allowed = frozenset().union(*(planned[key] for key in only if key in planned))
        graph = gs.import_onnx(model)
        stats = PassStats()
        rounds = self._rewrite_in_rounds(graph, stats, allowed)
        components = rounds.keys() if only is None else planned
        rewritten = set().union(*rounds.components)
        applied = [key for key, names in components.items() if names & rewritten]
        stats.rewritten = len(applied)
        if not applied:
            return PassResult(model, list(components), [], stats)
        return PassResult(export_like(graph, model), list(components), applied, stats)

    def _rewrite_in_rounds(self, graph: gs.Graph, stats: PassStats, allowed: frozenset[str] | None = None) -> Rounds:
        """Find and rewrite sites, clean up, and again, until none is found (or none is allowed).

        Declines are counted in the last round: what is left, and why. `allowed` keeps only the
        rewrites of those input nodes (some components, while the manager bisects).
        """
        rounds = Rounds({node.name: index for index, node in enumerate(graph.nodes)})
        while True:
            round_stats = PassStats()
            sites = self.find_sites(graph, round_stats)
            if allowed is not None:
                sites = [s for s in sites if all(rounds.origins.get(n.name, {n.name}) <= allowed for n in site_nodes(s.payload))]
            if not sites:
                stats.skipped.update(round_stats.skipped)
                return rounds
            for site in sites:
                before = len(graph.nodes)
                self.rewrite_site(graph, site, stats)
                rounds.record(site, graph.nodes[before:])
            graph.cleanup(remove_unused_graph_inputs=False).toposort()

    # -- horizontal: grouping ----------------------------------------------------------------------

    def _groups(self, graph: gs.Graph, candidates: list[ConvInfo], stats: PassStats) -> Iterator[SiblingGroup]:
        buckets: dict[tuple, list[ConvInfo]] = defaultdict(list)
        for conv in candidates:
            buckets[conv.merge_key].append(conv)
        for members in buckets.values():
            if len(members) == 1:
                stats.skip(NO_GEOMETRY_MATCH)
                continue
            for same_end in by_activation(graph, members):
                if len(same_end) == 1:
                    stats.skip(MIXED_ACTIVATIONS)
                    continue
                groups = [same_end]
                if MergedWindow.covering(same_end).flop_growth(same_end) > self.options.max_flop_growth:
                    stats.skip(FLOPS_GROW)
                    groups = [g for g in same_window(same_end) if len(g) > 1]
                for convs in groups:
                    if (reason := self._reason_to_skip_group(convs)) is not None:
                        stats.skip(reason)
                        continue
                    yield plan_group(graph, convs)

    def _reason_to_skip_group(self, convs: list[ConvInfo]) -> str | None:
        if len(convs) < self.options.min_siblings:
            return TOO_FEW
        cap = self.options.max_out_channels
        if cap is not None and sum(c.out_channels for c in convs) > cap:
            return TOO_WIDE
        window = MergedWindow.covering(convs)
        if any(window.output_spatial(c.in_spatial) != c.out_spatial for c in convs):
            return WINDOW_MISMATCH  # cannot happen for valid models; a guard, not a feature
        return None

    # -- vertical ------------------------------------------------------------------------------------

    def _chains(self, graph: gs.Graph, used: set[str], stats: PassStats) -> Iterator[ConvChain]:
        for conv in nodes_with_op(graph, "Conv"):
            follower = sole_consumer(conv.outputs[0]) if len(conv.outputs) == 1 else None
            if (
                conv.name in used
                or follower is None
                or follower.op != "Conv"
                or follower.domain not in DEFAULT_DOMAINS
                or follower.name in used
                or follower.inputs[0] is not conv.outputs[0]
            ):
                continue
            reason = reason_not_mergeable(graph, conv) or reason_not_mergeable(graph, follower)
            if reason is None:
                chain = ConvChain(describe_conv(conv), describe_conv(follower))
                reason = reason_not_composable(graph, chain)
            if reason is not None:
                stats.skip(f"vertical: {reason}")
                continue
            used.update((conv.name, follower.name))
            yield chain


# -- matching ----------------------------------------------------------------------------------------


def sibling_readers(graph: gs.Graph) -> list[list[gs.Node]]:
    """Convs grouped by the tensor they read, in graph order, where two or more read one tensor."""
    readers: dict[str, list[gs.Node]] = defaultdict(list)
    for conv in nodes_with_op(graph, "Conv"):
        readers[conv.inputs[0].name].append(conv)
    return [convs for convs in readers.values() if len(convs) > 1]


def reason_not_mergeable(graph: gs.Graph, conv: gs.Node) -> str | None:
    """The first precondition a Conv fails, checked in an order where each may rely on the last."""
    return (
        unsupported_attributes(conv)
        or non_constant_parameters(conv)
        or unsupported_dtype(conv)
        or unknown_geometry(conv)
        or output_not_rewritable(graph, conv)
    )


def unsupported_attributes(conv: gs.Node) -> str | None:
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        return "auto_pad is not NOTSET"
    if conv.attrs.get("group", 1) != 1:
        return "grouped convolution (group != 1)"
    if len(conv.outputs) != 1 or len(conv.inputs) < 2:
        return "not a Conv with one output and a weight"
    return None


def non_constant_parameters(conv: gs.Node) -> str | None:
    weight = conv.inputs[1]
    if constant_value(weight) is None:
        if len(weight.inputs) == 1 and weight.inputs[0].op == "DequantizeLinear":
            return "quantized weight (Q/DQ): quantized siblings are not merged"
        return "weight is not a constant"
    if has_bias(conv) and constant_value(conv.inputs[2]) is None:
        return "bias is not a constant"
    return None


def unsupported_dtype(conv: gs.Node) -> str | None:
    weight = constant_value(conv.inputs[1])
    if weight.dtype not in FLOAT_DTYPES:
        return "weight dtype is not float32 or float16"
    if has_bias(conv) and constant_value(conv.inputs[2]).dtype != weight.dtype:
        return "bias dtype differs from the weight's"
    return None


def unknown_geometry(conv: gs.Node) -> str | None:
    weight = constant_value(conv.inputs[1])
    rank = weight.ndim
    spatial = rank - 2
    if spatial < 1:
        return "weight has no spatial axes"
    for tensor in (conv.inputs[0], conv.outputs[0]):
        shape = tensor.shape
        if shape is None or len(shape) != rank or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[2:]):
            return "spatial shapes are not static"
    attrs = conv.attrs
    if list(attrs.get("kernel_shape", weight.shape[2:])) != list(weight.shape[2:]):
        return "kernel_shape disagrees with the weight"
    pads = attrs.get("pads", [0] * 2 * spatial)
    strides = attrs.get("strides", [1] * spatial)
    dilations = attrs.get("dilations", [1] * spatial)
    if len(pads) != 2 * spatial or len(strides) != spatial or len(dilations) != spatial:
        return "pads, strides or dilations do not match the kernel rank"
    if min(pads) < 0 or min(strides) < 1 or min(dilations) < 1:
        return "negative pads or non-positive strides or dilations"
    return None


def output_not_rewritable(graph: gs.Graph, conv: gs.Node) -> str | None:
    if used_in_subgraph(graph, conv.outputs[0]):
        return "output is read inside a subgraph"
    return None


def site_nodes(payload: SiblingGroup | ConvChain) -> list[gs.Node]:
    """Every node a site's rewrite replaces."""
    if isinstance(payload, ConvChain):
        return [payload.pointwise.node, payload.follower.node]
    return [c.node for c in payload.convs] + (payload.activations or []) + ([payload.concat] if payload.concat else [])


def has_bias(conv: gs.Node) -> bool:
    return len(conv.inputs) > 2 and bool(conv.inputs[2].name)


def describe_conv(conv: gs.Node) -> ConvInfo:
    """Read out a Conv that passed `reason_not_mergeable`."""
    weight = constant_value(conv.inputs[1])
    spatial = weight.ndim - 2
    pads = [int(p) for p in conv.attrs.get("pads", [0] * 2 * spatial)]
    geometry = ConvGeometry(
        kernel=tuple(int(k) for k in weight.shape[2:]),
        begin=tuple(pads[:spatial]),
        end=tuple(pads[spatial:]),
        strides=tuple(int(s) for s in conv.attrs.get("strides", [1] * spatial)),
        dilations=tuple(int(d) for d in conv.attrs.get("dilations", [1] * spatial)),
    )
    return ConvInfo(
        node=conv,
        weight=weight,
        bias=constant_value(conv.inputs[2]) if has_bias(conv) else None,
        geometry=geometry,
        in_spatial=tuple(int(d) for d in conv.inputs[0].shape[2:]),
        out_spatial=tuple(int(d) for d in conv.outputs[0].shape[2:]),
    )


def same_window(convs: list[ConvInfo]) -> list[list[ConvInfo]]:
    """Siblings split by identical kernel and pads: groups that merge without adding zeros."""
    groups: dict[tuple, list[ConvInfo]] = defaultdict(list)
    for conv in convs:
        groups[(conv.geometry.kernel, conv.geometry.begin, conv.geometry.end)].append(conv)
    return list(groups.values())


def plan_group(graph: gs.Graph, convs: list[ConvInfo]) -> SiblingGroup:
    """Find the shared activation and the Concat to drop, and order the siblings by that Concat."""
    activations = shared_activation(graph, convs)
    tails = [a.outputs[0] for a in activations] if activations else [c.output for c in convs]
    concat = concat_of_exactly(graph, tails)
    if concat is not None:
        position = {id(t): i for i, t in enumerate(concat.inputs)}
        order = sorted(range(len(convs)), key=lambda i: position[id(tails[i])])
        convs = [convs[i] for i in order]
        activations = [activations[i] for i in order] if activations else None
    return SiblingGroup(convs, MergedWindow.covering(convs), activations, concat)


def by_activation(graph: gs.Graph, convs: list[ConvInfo]) -> list[list[ConvInfo]]:
    """The siblings that may merge: all of them, or, when they end differently, each class alike.

    TensorRT fuses a Conv with the activation after it (Layer Fusion Catalog); merged with a
    sibling that has another activation or none, a Conv reaches its activation through the
    Split, unfused. When every sibling is already aligned that is all the merge changes (TensorRT
    merges same-kernel siblings itself), as with ResNet-50's first downsample and conv1 (merged,
    ONNX Runtime lost 7% and cuDNN gained 1%, docs/benchmarks.md), so only siblings that end
    alike merge. A narrow sibling is different: a detection head's 4-channel box conv beside its
    80-class conv is aligned only as part of the merged 85 + 3 zero filters (pad-channels), the
    measured gain (shared/evidence/h100-conv-probe.md), and its activations stay after the Split.
    """
    classes = same_activation(graph, convs)
    if len(classes) > 1 and any(conv.live_out_channels % FP16_ALIGNMENT for conv in convs):
        return [convs]
    return classes


def same_activation(graph: gs.Graph, convs: list[ConvInfo]) -> list[list[ConvInfo]]:
    """The siblings in classes that end alike: the same activation alone reads each, or none does."""
    classes: list[tuple[gs.Node | None, list[ConvInfo]]] = []
    for conv in convs:
        act = activation_of(graph, conv)
        for other, members in classes:
            if (act is None and other is None) or (act is not None and other is not None and same_op(act, other)):
                members.append(conv)
                break
        else:
            classes.append((act, [conv]))
    return [members for _, members in classes]


def shared_activation(graph: gs.Graph, convs: list[ConvInfo]) -> list[gs.Node] | None:
    """Each sibling's activation, when every sibling feeds only the same one (op, attrs, extras)."""
    activations = [activation_of(graph, conv) for conv in convs]
    if any(a is None for a in activations) or not all(same_op(a, activations[0]) for a in activations):
        return None
    return activations


def activation_of(graph: gs.Graph, conv: ConvInfo) -> gs.Node | None:
    """The elementwise activation that alone reads the conv's output, if one does."""
    out = conv.output
    act = sole_consumer(out)
    if (
        act is None
        or is_graph_output(graph, out)
        or used_in_subgraph(graph, out)
        or act.op not in ACTIVATIONS
        or act.domain not in DEFAULT_DOMAINS
        or act.inputs[0] is not out
        or len(act.outputs) != 1
    ):
        return None
    return act


def same_op(a: gs.Node, b: gs.Node) -> bool:
    return a.op == b.op and a.attrs == b.attrs and same_constant_extras(a, b)


def same_constant_extras(a: gs.Node, b: gs.Node) -> bool:
    """Inputs after the first (Clip's min/max) are omitted in both, or equal constants in both."""
    if len(a.inputs) != len(b.inputs):
        return False
    return all((not x.name and not y.name) or equal_constants(x, y) for x, y in zip(a.inputs[1:], b.inputs[1:]))


def concat_of_exactly(graph: gs.Graph, tails: list[gs.Tensor]) -> gs.Node | None:
    """The Concat on axis 1 whose inputs are these tensors (in any order) and that alone reads them."""
    concat = sole_consumer(tails[0])
    if concat is None or concat.op != "Concat" or concat.domain not in DEFAULT_DOMAINS:
        return None
    if len(concat.inputs) != len(tails) or {id(t) for t in concat.inputs} != {id(t) for t in tails}:
        return None
    for tail in tails:
        if sole_consumer(tail) is not concat or is_graph_output(graph, tail) or used_in_subgraph(graph, tail):
            return None
    rank = len(tails[0].shape) if tails[0].shape is not None else None
    axis = concat.attrs.get("axis")
    if rank is None or axis is None or axis % rank != 1:
        return None
    return concat


def reason_not_composable(graph: gs.Graph, chain: ConvChain) -> str | None:
    first, second = chain.pointwise, chain.follower
    g = first.geometry
    if any(k != 1 for k in g.kernel) or any(s != 1 for s in g.strides) or any(g.begin + g.end):
        return "first conv is not 1x1 with stride 1 and no pads"
    if first.weight.dtype != second.weight.dtype:
        return "the two convs have different dtypes"
    if is_graph_output(graph, first.output):
        return "output of the 1x1 conv is a graph output"
    if any(second.geometry.begin + second.geometry.end) and first.bias is not None and np.any(first.bias != 0):
        return "second conv pads its input and the 1x1 conv has a non-zero bias (borders would differ)"
    # Live channels only: counted with pad-channels' zero filters, a chain declined here would
    # pass once padded, and a second run of `all` would compose it.
    composed = second.live_out_channels * first.live_in_channels * math.prod(second.geometry.kernel) * math.prod(second.out_spatial)
    if composed > first.live_flops + second.live_flops:
        return "composing would grow the FLOPs"
    return None


# -- rewriting ---------------------------------------------------------------------------------------


def merge_siblings(graph: gs.Graph, group: SiblingGroup, stats: PassStats) -> None:
    convs, window, activations, concat = group.convs, group.window, group.activations, group.concat
    stem = f"{convs[0].node.name}_merged"
    dtype = convs[0].weight.dtype
    weight = np.concatenate([window.pad_kernel(c) for c in convs], axis=0)
    inputs = [convs[0].input, make_constant(graph, f"{stem}_weight", weight)]
    if any(c.bias is not None for c in convs):
        bias = np.concatenate([c.bias if c.bias is not None else np.zeros(c.out_channels, dtype) for c in convs])
        inputs.append(make_constant(graph, f"{stem}_bias", bias))

    tails = [a.outputs[0] for a in activations] if activations else [c.output for c in convs]
    final = concat.outputs[0] if concat is not None else None
    # Shaped, so that a later round (vertical) can tell the merged Conv's geometry.
    shape = [convs[0].output.shape[0], int(weight.shape[0]), *convs[0].out_spatial]
    # Cut the old producers first: their output tensors are written by the new nodes below.
    for old in [c.node for c in convs] + (activations or []) + ([concat] if concat is not None else []):
        old.outputs.clear()

    def tensor(suffix: str) -> gs.Variable:
        return gs.Variable(unique_name(graph, f"{stem}_{suffix}"), dtype=dtype, shape=shape)

    merged = final if final is not None and not activations else tensor("output")
    new_nodes = [gs.Node("Conv", unique_name(graph, stem), window.attrs(), inputs=inputs, outputs=[merged])]
    if activations:
        act = activations[0]
        activated = final if final is not None else tensor(act.op.lower())
        new_nodes.append(gs.Node(
            act.op, unique_name(graph, f"{stem}_{act.op.lower()}"), dict(act.attrs),
            inputs=[merged, *act.inputs[1:]], outputs=[activated],
        ))
        merged = activated
    if concat is None:
        new_nodes.append(split_node(graph, merged, tails, [c.out_channels for c in convs], stem))
    graph.nodes.extend(new_nodes)

    stats.counters["convs_merged"] += len(convs)
    stats.counters["kernels_zero_padded"] += sum(c.geometry.kernel != window.kernel for c in convs)
    if activations:
        stats.counters["activations_shared"] += len(activations)
    if concat is not None:
        stats.counters["concats_dropped"] += 1
    stats.details.append({
        "convs": [c.node.name for c in convs],
        "out_channels": [c.out_channels for c in convs],
        "merged_out_channels": int(weight.shape[0]),
        "kernel": list(window.kernel),
        "pads": list(window.begin + window.end),
        "flop_growth": round(window.flop_growth(convs), 3),
        "activation": activations[0].op if activations else None,
        "concat_dropped": concat is not None,
    })


def split_node(graph: gs.Graph, source: gs.Tensor, outputs: list[gs.Tensor], sizes: list[int], stem: str) -> gs.Node:
    attrs: dict = {"axis": 1}
    inputs = [source]
    if graph.opset >= SPLIT_SIZES_AS_INPUT:
        inputs.append(make_constant(graph, f"{stem}_split_sizes", np.array(sizes, dtype=np.int64)))
    else:
        attrs["split"] = list(sizes)
    return gs.Node("Split", unique_name(graph, f"{stem}_split"), attrs, inputs=inputs, outputs=list(outputs))


def compose_chain(graph: gs.Graph, chain: ConvChain, stats: PassStats) -> None:
    first, second = chain.pointwise, chain.follower
    dtype = second.weight.dtype
    pointwise = first.weight.reshape(first.weight.shape[:2]).astype(np.float64)
    follower = second.weight.astype(np.float64)
    weight = np.einsum("om...,mc->oc...", follower, pointwise)
    inputs = [first.input, make_constant(graph, f"{second.node.name}_composed_weight", weight.astype(dtype))]
    if first.bias is not None or second.bias is not None:
        bias = np.zeros(second.out_channels) if second.bias is None else second.bias.astype(np.float64)
        if first.bias is not None:
            tap_sums = follower.reshape(follower.shape[0], follower.shape[1], -1).sum(axis=2)
            bias = bias + tap_sums @ first.bias.astype(np.float64)
        inputs.append(make_constant(graph, f"{second.node.name}_composed_bias", bias.astype(dtype)))
    out = second.output
    first.node.outputs.clear()
    second.node.outputs.clear()
    attrs = {k: v for k, v in second.node.attrs.items() if k != "auto_pad"}
    graph.nodes.append(gs.Node("Conv", unique_name(graph, f"{second.node.name}_composed"), attrs, inputs=inputs, outputs=[out]))
    stats.counters["chains_composed"] += 1
    stats.details.append({
        "convs": [first.node.name, second.node.name],
        "flops_before": first.flops + second.flops,
        "flops_after": int(weight.size) * math.prod(second.out_spatial),
    })
