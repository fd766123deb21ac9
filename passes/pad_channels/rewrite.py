"""pad-channels: what a site costs, and the rewrite."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graphs import constant_value, live_channels, make_constant, make_weight, set_split_sizes, unique_name, weight
from .sites import ChannelSite, ConvCost, Role, has_bias
from .reach import split_sizes


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
    conv.inputs[1] = make_weight(graph, stem, conv_weight, stored, scale, zero_point)


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
