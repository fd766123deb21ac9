"""pad-channels: pad unaligned Conv output channels with zero filters, up to a multiple of `align`.

Matches a Conv (group 1; weight and bias constants, or quantized: int8/uint8/float8 behind a
DequantizeLinear, or float -> QuantizeLinear -> DequantizeLinear, the weight per tensor or per
output or input channel, the bias (also int32) per tensor or per channel; static output shape)
whose output channel count C is not a multiple of its layer's alignment. A layer's precision is
read from the graph (graphopt.precision: Q/DQ on input and weight -> int8 or fp8, float16 tensors
-> fp16, float32 -> the `precision` option) and aligns to 8 (fp16), 16 (fp8) or `int8_align` (32;
16 on request), or to `align` when given; the report says per conv how its precision was decided.
The conv roots a *site*: everything that must change with it for the graph to compute the same
outputs.

Emits, for C -> Cp (C rounded up to the alignment):
  1. the root conv with Cp - C zero filters and zero bias, quantized ones in their form (new
     entries the zero point, or stored 0 with their own scale and zero point 0);
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

Declines, counted by reason: grouped or aligned roots; runtime or non-float weights, weights or
biases quantized otherwise (int4, int16, FNUZ float8, blocked); unknown spatial sizes; overhead
above `max_overhead`; a padded tensor read in a subgraph or of unknown channel count; a graph
input unless `pad_first_layer`; opset below 11.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_graphsurgeon as gs

from graphopt.graphs import DEFAULT_DOMAINS, FLOAT_DTYPES, nodes_with_op, opset_version
from graphopt.passbase import GraphPass, PassStats, Site
from graphopt.precision import LayerPrecision, layer_precision
from .reach import plan_sites, uses
from .rewrite import pad_site, site_costs, total_flops
from .sites import (
    ChannelSite,
    ConvCost,
    Decision,
    MIN_OPSET,
    Reader,
    Role,
    SKIP_FIRST_LAYER,
    SKIP_OPSET,
    SKIP_OVERHEAD,
    SKIP_SHAPE,
    VALID_ALIGNS,
    conv_problem,
    root_problem,
    round_up,
)
from .sites import SKIP_ALIGNED, SKIP_BIAS, SKIP_BIAS_LAYOUT, SKIP_QUANT_LAYOUT, SKIP_SUBGRAPH, SKIP_WEIGHT  # noqa: F401 (the reasons it counts)


@dataclass(frozen=True)
class PadChannelsOptions:
    # What a float32 layer will run in; a quantized or float16 layer's own types decide its
    # precision (graphopt.precision): fp16 aligns to 8, int8 to `int8_align`, fp8 to 16.
    precision: Literal["fp16", "int8", "fp8"] = "fp16"
    align: int | None = None  # 8, 16 or 32 for every layer, whatever its precision
    int8_align: int = 32  # 32 (kCHW32) or 16 (TensorRT's engine lint, ModelOpt's INT8 eligibility)
    max_overhead: float = 0.5  # extra FLOPs a site may add, relative to the convs it touches
    pad_first_layer: bool = False  # also pad the unaligned channels of graph inputs read by convs

    def __post_init__(self) -> None:
        if self.precision not in ("fp16", "int8", "fp8"):
            raise ValueError(f"precision must be one of fp16, int8, fp8, got {self.precision!r}")
        if self.align is not None and self.align not in VALID_ALIGNS:
            raise ValueError(f"align must be one of {', '.join(map(str, VALID_ALIGNS))}, got {self.align}")
        if self.int8_align not in (16, 32):
            raise ValueError(f"int8_align must be 16 or 32, got {self.int8_align}")
        if not self.max_overhead >= 0:
            raise ValueError(f"max_overhead must be >= 0, got {self.max_overhead}")

    @property
    def alignment(self) -> int:
        """The alignment of a float32 layer (the target precision's)."""
        return self.align if self.align is not None else LayerPrecision(self.precision, "").alignment(self.int8_align)

    def layer_alignment(self, conv: gs.Node) -> tuple[int, LayerPrecision]:
        precision = layer_precision(conv, self.precision)
        return (self.align if self.align is not None else precision.alignment(self.int8_align)), precision



class PadChannels(GraphPass[PadChannelsOptions]):
    name = "pad-channels"
    summary = "Pad unaligned conv channels with zero filters to each layer's precision: 8 (fp16), 16 (fp8), 32 (int8)."
    Options = PadChannelsOptions
    order = 60

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        if opset_version(graph) < MIN_OPSET:
            stats.skip(SKIP_OPSET)
            return []
        roots, aligns, precisions = [], {}, {}
        for conv in nodes_with_op(graph, "Conv"):
            aligns[conv.name], precisions[conv.name] = self.options.layer_alignment(conv)
            if (reason := root_problem(conv, aligns[conv.name])) is not None:
                stats.skip(reason)
            else:
                roots.append(conv)
        sites = []
        for site, reason in plan_sites(graph, roots, aligns):
            site.precisions = {root.name: precisions[root.name] for root in site.roots}
            site.alignment = max(aligns[root.name] for root in site.roots)
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
            "precision": {conv: f"{p.precision} ({p.decided_by})" for conv, p in padding.precisions.items()},
            "alignment": padding.alignment,
            "flops": [before, after],
            "flops_overhead": round((after - before) / before, 4),
            "convs": [{"conv": c.conv, "out_channels": list(c.out_channels), "in_channels": list(c.in_channels),
                       "flops": list(c.flops)} for c in padding.costs],
        })
