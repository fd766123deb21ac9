"""pad-channels: what a site costs, and the rewrite."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graphs import DEFAULT_DOMAINS, constant_value, live_channels, make_constant, make_weight, producer_of, set_split_sizes, unique_name, weight
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
    bias = weight(conv.inputs[2]) if has_bias(conv) else None
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
    if not slice_back:
        return

    def ints(stem: str, value: int) -> gs.Constant:
        return make_constant(graph, f"{tensor.name}_{stem}", np.array([value], dtype=np.int64))

    # A per-tensor DequantizeLinear is repeated after a Slice of its integers, so the unpadded
    # reader (a grouped conv) still reads a DequantizeLinear: a Slice between them would leave it
    # a float layer for TensorRT and for graphopt.precision.
    dequantize = producer if is_per_tensor_dequantize(producer) else None
    source = dequantize.inputs[0] if dequantize is not None else padded
    sliced = tensor if dequantize is None else gs.Variable(unique_name(graph, f"{source.name}_unpad"), dtype=source.dtype)
    graph.nodes.append(gs.Node("Slice", unique_name(graph, f"{tensor.name}_unpad"),
                               inputs=[source, ints("starts", 0), ints("ends", site.channels), ints("axes", 1)], outputs=[sliced]))
    if dequantize is not None:
        graph.nodes.append(gs.Node("DequantizeLinear", unique_name(graph, f"{dequantize.name}_unpad"), dict(dequantize.attrs),
                                   inputs=[sliced, *dequantize.inputs[1:]], outputs=[tensor]))


def is_per_tensor_dequantize(node: gs.Node) -> bool:
    if node.op != "DequantizeLinear" or node.domain not in DEFAULT_DOMAINS or node.attrs.get("block_size", 0):
        return False
    scale = constant_value(node.inputs[1])
    return scale is not None and scale.size == 1


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
    compose in either order. A quantized weight or bias stays quantized, in the form it came in.
    """
    conv_weight = weight(conv.inputs[1])
    stem = f"{conv.name}_weight_padded"
    q = conv_weight.quantization
    weight_scale = None  # per output channel (or one), as a quantized bias's scale relates to it
    if q is None:
        conv.inputs[1] = make_constant(graph, stem, pad_axis(conv_weight.stored, axis, size, 0.0))
    else:
        # New entries along the quantization axis get their own scale 1 and zero point 0: (0 - 0) * 1 = 0.
        own_scale = q.axis == axis
        if own_scale or q.quantize is not None:
            fill = 0  # a float 0 quantizes to the zero point
        elif q.per_channel:  # each new integer is the zero point of its scale: (zp - zp) * s = 0
            fill = q.zero_point.reshape([-1 if a == q.axis else 1 for a in range(conv_weight.stored.ndim)])
        else:
            fill = q.zero_point.reshape(())
        scale = pad_axis(q.scale, 0, size, 1.0) if own_scale else q.scale
        zero_point = pad_axis(q.zero_point, 0, size, 0) if own_scale else q.zero_point
        conv.inputs[1] = make_weight(graph, stem, conv_weight, pad_axis(conv_weight.stored, axis, size, fill), scale, zero_point)
        weight_scale = scale if q.axis in (None, 0) else None
    if axis == 0 and has_bias(conv):
        conv.inputs[2] = padded_bias(graph, conv, size, weight_scale)


def padded_bias(graph: gs.Graph, conv: gs.Node, size: int, weight_scale: np.ndarray | None) -> gs.Tensor:
    """The conv's bias grown to `size` entries that read 0, in the form it came in.

    A quantized bias per tensor grows with its zero point (a float bias behind a QuantizeLinear
    with 0, which quantizes to it); per channel, with stored 0, zero point 0 and a positive scale:
    the input scale x the new filter's weight scale where the old bias scales are that product
    (what ONNX Runtime's quantize_static writes, and ONNX's QLinearConv requires of its bias), else 1.
    Any positive scale dequantizes the stored 0 to 0; the product keeps the bias in that form.
    """
    bias = weight(conv.inputs[2])
    stem = f"{conv.name}_bias_padded"
    q = bias.quantization
    if q is None:
        return make_constant(graph, stem, pad_axis(bias.stored, 0, size, 0.0))
    if not q.per_channel:
        fill = 0 if q.quantize is not None else q.zero_point.reshape(())
        return make_weight(graph, stem, bias, pad_axis(bias.stored, 0, size, fill))
    scale = pad_axis(q.scale, 0, size, new_bias_scales(conv, q.scale, weight_scale, size))
    return make_weight(graph, stem, bias, pad_axis(bias.stored, 0, size, 0), scale, pad_axis(q.zero_point, 0, size, 0))


def new_bias_scales(conv: gs.Node, bias_scale: np.ndarray, weight_scale: np.ndarray | None, size: int) -> np.ndarray | float:
    """Scales for the bias entries of new filters: input scale x weight scale if the old ones are that, else 1."""
    dequantize = producer_of(conv.inputs[0], "DequantizeLinear")
    input_scale = constant_value(dequantize.inputs[1]) if dequantize is not None else None
    if input_scale is None or input_scale.size != 1 or weight_scale is None:
        return 1.0
    per_filter = np.broadcast_to(weight_scale.reshape(-1) if weight_scale.size > 1 else weight_scale.reshape(()), (size,))
    expected = (input_scale.reshape(()) * per_filter).astype(bias_scale.dtype)
    old, new = expected[:bias_scale.shape[0]], expected[bias_scale.shape[0]:]
    if np.allclose(bias_scale, old, rtol=1e-6, atol=0) and np.all(np.isfinite(new)) and np.all(new > 0):
        return new
    return 1.0


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
