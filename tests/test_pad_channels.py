"""pad-channels: unaligned conv channels padded with zero filters, carried, absorbed or sliced back."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from graphopt.modelio import infer_shapes
from graphopt.verify import Verifier, make_feed, run_onnxruntime
from passes.pad_channels import (
    SKIP_ALIGNED,
    SKIP_BIAS,
    SKIP_BIAS_LAYOUT,
    SKIP_FIRST_LAYER,
    SKIP_OVERHEAD,
    SKIP_QUANT_LAYOUT,
    SKIP_SUBGRAPH,
    SKIP_WEIGHT,
    PadChannels,
)
from passes.pad_channels.rewrite import conv_cost
from tests.fixtures.cases import load_case
from tests.fixtures.zoo import load_zoo_model
from tests.helpers import assert_rewrites_equivalently, assert_unchanged, op_counts, run_pass

# -- reading the rewritten model --------------------------------------------------------------------


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    [found] = [n for n in model.graph.node if n.name == name]
    return found


def attr(node: onnx.NodeProto, name: str, default=None):
    found = [a for a in node.attribute if a.name == name]
    return onnx.helper.get_attribute_value(found[0]) if found else default


def value(model: onnx.ModelProto, name: str) -> np.ndarray:
    [found] = [t for t in model.graph.initializer if t.name == name]
    return numpy_helper.to_array(found)


def conv_weight(model: onnx.ModelProto, conv: str) -> np.ndarray:
    return value(model, node_named(model, conv).input[1])


def conv_bias(model: onnx.ModelProto, conv: str) -> np.ndarray:
    return value(model, node_named(model, conv).input[2])


def dims(model: onnx.ModelProto, tensor: str) -> list:
    infos = [*model.graph.input, *model.graph.value_info, *model.graph.output]
    [info] = [vi for vi in infos if vi.name == tensor]
    return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]


def readers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    [found] = [n for n in model.graph.node if tensor in n.output]
    return found


# -- the rewrite itself -----------------------------------------------------------------------------


def test_pads_17_output_channels_to_24_with_zero_filters_and_bias():
    out, record = assert_rewrites_equivalently(load_case("pad_channels/relu_chain_17"), PadChannels())
    weight, bias = conv_weight(out, "conv1"), conv_bias(out, "conv1")
    assert weight.shape == (24, 16, 3, 3) and bias.shape == (24,)
    assert not weight[17:].any() and not bias[17:].any()
    assert record.counters["channels_padded"] == 7


def test_gives_the_consumer_conv_zero_input_weights():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/relu_chain_17"), PadChannels())
    weight = conv_weight(out, "conv2")
    assert weight.shape == (16, 24, 3, 3)
    assert not weight[:, 17:].any()
    assert op_counts(out)["Slice"] == 0


def test_carries_padding_through_batchnorm_sigmoid_and_per_channel_constants():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/bn_sigmoid_mul_30"), PadChannels())
    bn = node_named(out, "batchnormalization_bn")
    scale, bias, mean, var = (value(out, name) for name in bn.input[1:])
    assert [p.shape for p in (scale, bias, mean, var)] == [(32,)] * 4
    np.testing.assert_array_equal(np.stack([scale[30:], bias[30:], mean[30:], var[30:]]), [[1, 1], [0, 0], [0, 0], [1, 1]])
    assert value(out, node_named(out, "mul_m").input[1]).shape == (1, 32, 1, 1)
    assert value(out, node_named(out, "add_a").input[0]).shape == (32, 1, 1)
    np.testing.assert_array_equal(value(out, node_named(out, "div_d").input[1])[30:], 1.0)  # never divide by 0
    assert conv_weight(out, "conv2").shape == (16, 32, 3, 3)
    assert op_counts(out)["Slice"] == 0


def test_slices_back_before_concat_and_flatten():
    model = load_case("pad_channels/concat_flatten_100")
    out, record = assert_rewrites_equivalently(model, PadChannels())
    assert conv_weight(out, "conv1").shape[0] == 104
    assert op_counts(out)["Slice"] == 2 and record.counters["slices_inserted"] == 2
    assert producer(out, node_named(out, "concat_cat").input[0]).op_type == "Slice"
    assert producer(out, node_named(out, "flatten_flat").input[0]).op_type == "Slice"
    assert dims(out, "cat") == dims(model, "cat") == ["batch", 116, 7, 7]


def test_graph_output_keeps_its_name_and_shape():
    model = load_case("pad_channels/graph_output_17")
    out, _ = assert_rewrites_equivalently(model, PadChannels())
    assert [o.name for o in out.graph.output] == ["features", "y"]
    assert dims(out, "features") == ["batch", 17, 14, 14]
    assert producer(out, "features").op_type == "Slice"
    assert conv_weight(out, "conv2").shape == (16, 24, 3, 3)  # conv2 still reads the padded tensor


def test_carries_padding_through_a_depthwise_conv():
    out, record = assert_rewrites_equivalently(load_case("pad_channels/depthwise_17"), PadChannels())
    assert attr(node_named(out, "dw"), "group") == 24
    assert conv_weight(out, "dw").shape == (24, 1, 3, 3) and not conv_weight(out, "dw")[17:].any()
    assert conv_weight(out, "conv2").shape == (16, 24, 1, 1)
    assert record.counters["depthwise_convs_carried"] == 1 and op_counts(out)["Slice"] == 0


def test_slices_back_before_a_grouped_conv():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/grouped_consumer_18"), PadChannels())
    grouped = node_named(out, "conv2")
    assert producer(out, grouped.input[0]).op_type == "Slice"
    assert conv_weight(out, "conv2").shape == (18, 9, 3, 3)


def test_adds_an_unread_trailing_split_output_to_a_merged_head():
    out, record = assert_rewrites_equivalently(load_case("pad_channels/merged_head_split_85"), PadChannels())
    split = node_named(out, "split_cls")
    assert conv_weight(out, "head").shape[0] == 88
    assert list(value(out, split.input[1])) == [80, 4, 1, 3]
    assert len(split.output) == 4 and not readers(out, split.output[3])
    assert record.counters["split_outputs_added"] == 1 and op_counts(out)["Slice"] == 0


def test_gives_split_with_num_outputs_explicit_sizes():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/split_num_outputs_30"), PadChannels())
    split = node_named(out, "split_a")
    assert attr(split, "num_outputs") is None
    assert list(value(out, split.input[1])) == [10, 10, 10, 2]


def test_pads_both_addends_of_a_residual_add_as_one_site():
    out, record = assert_rewrites_equivalently(load_case("pad_channels/residual_add_30"), PadChannels())
    assert record.sites_applied == ["conv:conv_a,conv_b"]
    assert conv_weight(out, "conv_a").shape == (32, 16, 3, 3)
    weight_b = conv_weight(out, "conv_b")
    assert weight_b.shape == (32, 32, 3, 3) and not weight_b[30:].any() and not weight_b[:, 30:].any()
    assert conv_weight(out, "conv_c").shape == (16, 32, 3, 3)
    assert op_counts(out)["Slice"] == 0


def test_slices_back_an_addend_whose_partner_cannot_be_padded():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/residual_from_input_17"), PadChannels())
    add = node_named(out, "add_s")
    assert producer(out, add.input[0]).op_type == "Slice" and add.input[1] == "x"
    assert conv_weight(out, "conv2").shape == (16, 17, 3, 3)


def test_pads_silu_squeeze_excite_where_both_mul_operands_are_padded():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/silu_se_6"), PadChannels())
    assert conv_weight(out, "fc1").shape == (8, 48, 1, 1)
    assert conv_weight(out, "fc2").shape == (48, 8, 1, 1)
    assert op_counts(out)["Slice"] == 0


def test_adopts_the_gate_conv_of_a_30_channel_squeeze_excite():
    out, record = assert_rewrites_equivalently(load_case("pad_channels/se_reduce_mean_30"), PadChannels())
    assert record.sites_applied == ["conv:conv1,fc"]
    assert conv_weight(out, "fc").shape == (32, 32, 1, 1)
    assert op_counts(out)["Slice"] == 0


def test_slices_back_before_the_padded_tensor_becomes_a_divisor():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/divided_by_padded_17"), PadChannels())
    assert producer(out, node_named(out, "div_d").input[1]).op_type == "Slice"


# A conv with Q/DQ on its input and weight runs INT8: 17 channels pad to 32 (kCHW32), an overhead
# of 88% that the default max_overhead (0.5) would decline.
INT8_17_TO_32 = PadChannels(max_overhead=1.0)


def test_pads_per_channel_quantized_weights_consistently():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/qdq_per_channel_17"), INT8_17_TO_32)
    dq1 = producer(out, node_named(out, "conv1").input[1])
    q1, scale1, zero1 = (value(out, name) for name in dq1.input)
    assert q1.shape == (32, 16, 3, 3) and q1.dtype == np.int8 and not q1[17:].any()
    assert scale1.shape == (32,) and zero1.shape == (32,) and (scale1[17:] == 1).all()
    dq2 = producer(out, node_named(out, "conv2").input[1])
    q2 = value(out, dq2.input[0])
    assert q2.shape == (32, 32, 3, 3) and not q2[:, 17:].any()


def test_pads_per_tensor_quantized_weights_with_their_zero_point():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/qdq_per_tensor_17"), INT8_17_TO_32)
    dq1 = producer(out, node_named(out, "conv1").input[1])
    q1, scale1, zero1 = (value(out, name) for name in dq1.input)
    assert q1.shape == (32, 16, 3, 3) and scale1.shape == zero1.shape == () and zero1 == 3
    assert (q1[17:] == 3).all()  # (3 - 3) * scale = 0
    q2 = value(out, producer(out, node_named(out, "conv2").input[1]).input[0])
    assert q2.shape == (32, 32, 3, 3) and (q2[:, 17:] == 3).all()


def test_pads_float_weights_behind_a_quantize_linear_in_that_form():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/qdq_float_weight_17"), INT8_17_TO_32)
    dq1 = producer(out, node_named(out, "conv1").input[1])
    quantize = producer(out, dq1.input[0])
    assert quantize.op_type == "QuantizeLinear" and list(quantize.input[1:]) == list(dq1.input[1:])
    floats, scale = value(out, quantize.input[0]), value(out, quantize.input[1])
    assert floats.dtype == np.float32 and floats.shape == (32, 16, 3, 3) and not floats[17:].any()
    assert scale.shape == (32,) and (scale[17:] == 1).all()
    conv2_floats = value(out, producer(out, producer(out, node_named(out, "conv2").input[1]).input[0]).input[0])
    assert conv2_floats.shape == (32, 32, 3, 3) and not conv2_floats[:, 17:].any()


def test_pads_per_channel_activation_quantization_scales():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/qdq_activation_per_channel_17"), INT8_17_TO_32)
    quantize = node_named(out, "quantizelinear_rq")
    scale, zero_point = value(out, quantize.input[1]), value(out, quantize.input[2])
    assert scale.shape == zero_point.shape == (32,) and (scale[17:] == 1).all() and not zero_point[17:].any()
    dequantize = node_named(out, "dequantizelinear_rd")
    assert value(out, dequantize.input[1]).shape == (32,)
    weight_dq = producer(out, node_named(out, "conv2").input[1])
    assert value(out, weight_dq.input[0]).shape == (32, 32, 3, 3)


def test_carries_padding_through_pools_and_every_listed_activation():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/pool_chain_17"), PadChannels())
    assert conv_weight(out, "conv1").shape == (24, 16, 3, 3) and len(node_named(out, "conv1").input) == 2
    assert conv_weight(out, "conv2").shape == (16, 24, 3, 3)
    assert op_counts(out)["Slice"] == 0


def test_extends_split_sizes_given_as_an_attribute_before_opset_13():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/split_attr_opset11"), PadChannels())
    split = node_named(out, "split_cls")
    assert attr(split, "split") == [80, 4, 1, 3] and len(split.output) == 4


def test_keeps_float16_weights_in_float16():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/fp16_chain_30"), PadChannels())
    assert conv_weight(out, "conv1").dtype == np.float16 and conv_weight(out, "conv1").shape[0] == 32
    assert conv_weight(out, "conv2").dtype == np.float16


def test_works_with_a_dynamic_batch():
    model = load_case("pad_channels/bn_sigmoid_mul_30")
    out, _ = assert_rewrites_equivalently(model, PadChannels(), input_shapes={"x": (3, 16, 14, 14)})
    assert dims(out, "x") == ["batch", 16, 14, 14] and dims(out, "y") == ["batch", 16, 14, 14]


def test_any_subset_of_sites_rewrites_equivalently():
    model = infer_shapes(load_case("pad_channels/two_sites_share_conv"))
    graph_pass = PadChannels()
    sites = graph_pass.apply(model).sites
    assert sites == ["conv:conv1", "conv:conv2"]
    verifier = Verifier(model)
    reference = verifier.reference(model)
    for size in (1, 2):
        for subset in combinations(sites, size):
            result = graph_pass.apply(model, only=list(subset))
            verdict, _ = verifier.check(reference, infer_shapes(result.model))
            assert verdict.passed, (subset, verdict.worst.describe())
    assert conv_weight(graph_pass.apply(model).model, "conv2").shape == (32, 24, 3, 3)


def test_is_idempotent():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/two_sites_share_conv"), PadChannels())
    assert_unchanged(out, PadChannels(), reason=SKIP_ALIGNED)


def test_counts_no_zero_filters_an_earlier_site_added_as_work():
    # Otherwise a second run would judge {conv_1, conv_2} cheaper (10.3x, not 12.6x) and pad it.
    model = load_case("pad_channels/residual_pair_before_a_padded_conv")
    out, record = assert_rewrites_equivalently(model, PadChannels(max_overhead=11))
    assert record.sites_applied == ["conv:conv_3"] and record.skipped[SKIP_OVERHEAD] == 1
    again = assert_unchanged(out, PadChannels(max_overhead=11), reason=SKIP_OVERHEAD)
    assert again.skipped[SKIP_OVERHEAD] == 1


def test_pads_two_roots_whose_outputs_meet_as_one_site():
    out, record = assert_rewrites_equivalently(load_case("pad_channels/residual_pair_before_a_padded_conv"), PadChannels(max_overhead=13))
    assert record.sites_applied == ["conv:conv_1,conv_2", "conv:conv_3"]
    assert conv_weight(out, "conv_2").shape == (8, 8, 1, 1) and conv_weight(out, "conv_3").shape == (8, 8, 1, 1)


# -- alignment and options --------------------------------------------------------------------------


def test_int8_pads_to_multiples_of_32():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/relu_chain_100"), PadChannels(precision="int8"))
    assert conv_weight(out, "conv1").shape[0] == 128 and conv_weight(out, "conv2").shape[1] == 128


def test_int8_pads_a_layer_aligned_only_to_8():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/aligned_24"), PadChannels(precision="int8"))
    assert conv_weight(out, "conv1").shape[0] == 32


def test_explicit_align_16_overrides_precision():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/relu_chain_100"), PadChannels(precision="int8", align=16))
    assert conv_weight(out, "conv1").shape[0] == 112


def test_fp16_default_pads_100_to_104_only():
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/relu_chain_100"), PadChannels())
    assert conv_weight(out, "conv1").shape[0] == 104


def test_reports_each_sites_flops_before_and_after_and_each_conv_it_grows():
    _, record = assert_rewrites_equivalently(load_case("pad_channels/relu_chain_17"), PadChannels())
    [site] = record.details
    conv1, conv2 = site["convs"]
    assert site["site"] == "conv:conv1"
    assert conv1["conv"] == "conv1" and conv1["out_channels"] == [17, 24] and conv1["in_channels"] == [16, 16]
    assert conv2["conv"] == "conv2" and conv2["out_channels"] == [16, 16] and conv2["in_channels"] == [17, 24]
    per_pixel_pair = 2 * 3 * 3 * 14 * 14  # 3x3 kernel, 14x14 output
    assert conv1["flops"] == [per_pixel_pair * 17 * 16, per_pixel_pair * 24 * 16]
    assert site["flops"] == [per_pixel_pair * 2 * 17 * 16, per_pixel_pair * 2 * 24 * 16]
    assert site["flops_overhead"] == pytest.approx(7 / 17, abs=1e-4)


@pytest.mark.parametrize("options", [{"align": 12}, {"max_overhead": -0.1}, {"precision": "int4"}, {"int8_align": 8}])
def test_rejects_invalid_options(options):
    with pytest.raises(ValueError):
        PadChannels(**options)


# -- declines ---------------------------------------------------------------------------------------


def test_leaves_an_aligned_conv_alone():
    assert_unchanged(load_case("pad_channels/aligned_24"), PadChannels(), reason=SKIP_ALIGNED)


def test_declines_a_1_to_8_pad_over_max_overhead():
    assert_unchanged(load_case("pad_channels/tiny_out_1"), PadChannels(), reason=SKIP_OVERHEAD)


def test_pads_a_3_channel_head_only_when_overhead_is_allowed():
    model = load_case("pad_channels/head_3")
    assert_unchanged(model, PadChannels(), reason=SKIP_OVERHEAD)
    out, _ = assert_rewrites_equivalently(model, PadChannels(max_overhead=2.0))
    assert conv_weight(out, "head").shape[0] == 8
    assert producer(out, "y").op_type == "Slice" and dims(out, "y") == ["batch", 3, 14, 14]


def test_leaves_first_layer_input_channels_alone_by_default():
    assert_unchanged(load_case("pad_channels/first_layer_3"), PadChannels(), reason=SKIP_FIRST_LAYER)


def test_pads_first_layer_input_channels_when_asked():
    model = load_case("pad_channels/first_layer_3")
    assert_unchanged(model, PadChannels(pad_first_layer=True), reason=SKIP_OVERHEAD)  # 3 -> 8 adds 167%
    out, record = assert_rewrites_equivalently(model, PadChannels(pad_first_layer=True, max_overhead=2.0))
    pad = producer(out, node_named(out, "stem").input[0])
    assert pad.op_type == "Pad" and pad.input[0] == "x"
    weight = conv_weight(out, "stem")
    assert weight.shape == (16, 8, 3, 3) and not weight[:, 3:].any()
    assert record.counters["input_channels_padded"] == 5 and dims(out, "x") == ["batch", 3, 16, 16]


def test_declines_when_a_subgraph_reads_the_padded_tensor():
    assert_unchanged(load_case("pad_channels/subgraph_reads_17"), PadChannels(), reason=SKIP_SUBGRAPH)


def test_declines_a_conv_with_runtime_weights():
    assert_unchanged(load_case("pad_channels/runtime_weight_17"), PadChannels(), reason=SKIP_WEIGHT)




# -- quantized biases and the other quantized layouts ---------------------------------------------


# int8_align=16: conv1 pads 17 -> 32 and conv2 (16 output channels) only grows its input channels.
INT8_16 = PadChannels(int8_align=16, max_overhead=1.0)


def dequantized(model: onnx.ModelProto, tensor: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored values, scale and zero point of the DequantizeLinear writing `tensor`."""
    return tuple(value(model, name) for name in producer(model, tensor).input)


def ort_outputs_equal(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Both models give bit-identical outputs on ONNX Runtime at batch 2 (inputs uniform in [-1, 1])."""
    feed = make_feed(before, {"batch": 2}, seed=3)
    expected, got = run_onnxruntime(before, feed), run_onnxruntime(after, feed)
    for name in expected:
        assert np.abs(expected[name]).max() > 0
        np.testing.assert_array_equal(got[name], expected[name])


def padded_channels_read_by(model: onnx.ModelProto, conv: str, channels: int) -> np.ndarray:
    """On ONNX Runtime, the channels past `channels` of the padded tensor `conv` reads."""
    tensor = node_named(model, conv).input[0]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    feed = make_feed(model, {"batch": 2}, seed=3)
    return run_onnxruntime(probe, feed)[tensor][:, channels:]


def test_pads_an_int32_bias_per_channel_in_its_form_with_zeros_and_input_times_weight_scales():
    model = load_case("pad_channels/ort_qdq_bias_per_channel_17")
    out, _ = assert_rewrites_equivalently(model, INT8_16)
    old_weight, _, _ = dequantized(model, "conv1.w")
    old_bias, old_scale, _ = dequantized(model, "conv1.b")
    weight_q, weight_scale, _ = dequantized(out, node_named(out, "conv1").input[1])
    bias_q, bias_scale, bias_zero = dequantized(out, node_named(out, "conv1").input[2])
    assert weight_q.dtype == np.int8 and (weight_q[:17] == old_weight).all() and not weight_q[17:].any()
    assert bias_q.dtype == np.int32 and bias_q.shape == (32,) and (bias_q[:17] == old_bias).all() and not bias_q[17:].any()
    assert bias_zero.shape == (32,) and not bias_zero.any()
    input_scale = value(model, "act.s")
    assert (bias_scale[:17] == old_scale).all() and (bias_scale[17:] == input_scale * weight_scale[17:]).all()
    assert attr(producer(out, node_named(out, "conv1").input[2]), "axis") == 0
    # conv2 only grows its input channels: its bias stays as it was
    bias2_q, bias2_scale, _ = dequantized(out, node_named(out, "conv2").input[2])
    assert (bias2_q == value(model, "conv2.bq")).all() and (bias2_scale == value(model, "conv2.bs")).all()
    ort_outputs_equal(model, out)


def test_padded_channels_pass_a_per_tensor_qdq_with_a_zero_point_as_exact_zeros():
    # the Q/DQ between the convs has zero point -5: 0 quantizes to -5 and dequantizes to 0
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/ort_qdq_bias_per_channel_17"), INT8_16)
    assert value(out, producer(out, node_named(out, "conv2").input[0]).input[2]) == -5
    extra = padded_channels_read_by(out, "conv2", 17)
    assert extra.shape[1] == 15 and not extra.any()


def test_pads_a_per_tensor_int32_bias_with_its_zero_point():
    model = load_case("pad_channels/ort_qdq_bias_per_tensor_zero_point_17")
    out, _ = assert_rewrites_equivalently(model, INT8_16)
    bias_q, bias_scale, bias_zero = dequantized(out, node_named(out, "conv1").input[2])
    assert bias_scale.shape == bias_zero.shape == () and bias_zero == 5 and bias_scale == value(model, "conv1.bs")
    assert (bias_q[:17] == value(model, "conv1.bq")).all() and (bias_q[17:] == 5).all()  # (5 - 5) * s = 0
    ort_outputs_equal(model, out)


def test_counts_no_filter_whose_quantized_bias_is_its_zero_point_as_work():
    # the 15 new filters of conv1 are zero with bias entries 5 - 5: a later site must not count them
    out, _ = assert_rewrites_equivalently(load_case("pad_channels/ort_qdq_bias_per_tensor_zero_point_17"), INT8_16)
    [conv1] = [n for n in gs.import_onnx(infer_shapes(out)).nodes if n.name == "conv1"]
    per_filter_and_input = 2 * 3 * 3 * 8 * 8
    assert conv_cost(conv1, 32, grows_out=False, grows_in=False).flops == (per_filter_and_input * 17 * 16,) * 2


def test_pads_a_float16_bias_behind_a_quantize_linear_in_that_form_with_scale_one():
    model = load_case("pad_channels/qdq_float16_bias_per_channel_17")
    out, _ = assert_rewrites_equivalently(model, INT8_16)
    dequantize = producer(out, node_named(out, "conv1").input[2])
    quantize = producer(out, dequantize.input[0])
    assert quantize.op_type == "QuantizeLinear" and list(quantize.input[1:]) == list(dequantize.input[1:])
    floats, scale, zero_point = (value(out, name) for name in quantize.input)
    assert floats.dtype == scale.dtype == np.float16 and zero_point.dtype == np.int8
    assert (floats[:17] == value(model, "conv1.bf")).all() and not floats[17:].any()
    # these bias scales are not input scale x weight scale: the new ones are 1
    assert (scale[:17] == value(model, "conv1.bs")).all() and (scale[17:] == 1).all() and not zero_point.any()
    ort_outputs_equal(model, out)


def test_grows_a_per_channel_activation_qdq_and_the_int32_bias_before_it():
    model = load_case("pad_channels/ort_qdq_bias_activation_per_channel_17")
    out, _ = assert_rewrites_equivalently(model, INT8_16)
    for op in ("QuantizeLinear", "DequantizeLinear"):
        [activation] = [n for n in out.graph.node if n.op_type == op and n.input[1] != "act.s" and "conv" not in n.name]
        scale, zero_point = value(out, activation.input[1]), value(out, activation.input[2])
        assert scale.shape == zero_point.shape == (32,) and (scale[:17] == value(model, "mid.s")).all()
        assert (scale[17:] == 1).all() and not zero_point[17:].any()
    _, bias_scale, _ = dequantized(out, node_named(out, "conv1").input[2])
    assert (bias_scale[17:] == value(model, "act.s")).all()  # the input scale x weight scale 1
    assert not padded_channels_read_by(out, "conv2", 17).any()
    ort_outputs_equal(model, out)


def test_pads_weights_quantized_along_input_channels():
    model = load_case("pad_channels/qdq_weight_axis1_17")
    out, _ = assert_rewrites_equivalently(model, INT8_16)
    # conv1 grows filters across its 16 input-channel scales: each new integer is its column's zero point
    q1, scale1, zero1 = dequantized(out, node_named(out, "conv1").input[1])
    assert q1.shape == (32, 16, 3, 3) and scale1.shape == zero1.shape == (16,) and not q1[17:].any()
    # conv2 grows input channels along its quantization axis: new scales 1, zero points 0
    q2, scale2, zero2 = dequantized(out, node_named(out, "conv2").input[1])
    assert q2.shape == (16, 32, 3, 3) and scale2.shape == zero2.shape == (32,) and (scale2[17:] == 1).all()
    assert (q2[:, :17] == value(model, "conv2.wq")).all() and not q2[:, 17:].any()
    ort_outputs_equal(model, out)


def test_pads_a_per_tensor_int32_bias_of_a_conv_quantized_along_input_channels():
    model = load_case("pad_channels/ort_qdq_weight_axis1_bias_17")
    out, _ = assert_rewrites_equivalently(model, INT8_16)
    bias_q, bias_scale, _ = dequantized(out, node_named(out, "conv1").input[2])
    assert bias_q.shape == (32,) and bias_scale.shape == () and not bias_q[17:].any()
    ort_outputs_equal(model, out)


def test_pads_float8_weights_to_fp8s_16_keeping_their_type():
    model = load_case("pad_channels/fp8_chain_12")
    out, record = assert_rewrites_equivalently(model, PadChannels())
    assert [site["alignment"] for site in record.details] == [16]
    assert set(record.details[0]["precision"].values()) == {"fp8 (Q/DQ on its input and weight)"}
    dequantize = producer(out, node_named(out, "conv1").input[1])
    stored = next(t for t in out.graph.initializer if t.name == dequantize.input[0])
    zero_point = next(t for t in out.graph.initializer if t.name == dequantize.input[2])
    assert stored.data_type == zero_point.data_type == onnx.TensorProto.FLOAT8E4M3FN and list(stored.dims) == [16, 16, 3, 3]
    q, scale, _ = dequantized(out, node_named(out, "conv1").input[1])
    assert (q[:12].astype(np.float32) == value(model, "conv1.wq").astype(np.float32)).all()
    assert not q[12:].astype(np.float32).any() and (scale[12:] == 1).all()
    ort_outputs_equal(model, out)


def test_counts_float8_filters_of_small_values_as_work():
    # conv2's last 8 filters hold 0.5 in float8 and no bias: live, though an integer cast would call them zero
    graph = gs.import_onnx(infer_shapes(load_case("pad_channels/fp8_chain_12")))
    [conv2] = [n for n in graph.nodes if n.name == "conv2"]
    stored, bias = conv2.inputs[1].inputs[0].inputs[0], conv2.inputs[2]
    stored.values, bias.values = np.array(stored.values, copy=True), np.array(bias.values, copy=True)
    stored.values[8:], bias.values[8:] = np.array(0.5, stored.values.dtype), 0
    per_filter_and_input = 2 * 3 * 3 * 8 * 8
    assert conv_cost(conv2, 16, grows_out=False, grows_in=True).flops == (per_filter_and_input * 16 * 12, per_filter_and_input * 16 * 16)


def test_declines_a_conv_with_a_runtime_bias():
    assert_unchanged(load_case("pad_channels/runtime_bias_17"), PadChannels(), reason=SKIP_BIAS)


def test_declines_an_int16_bias():
    assert_unchanged(load_case("pad_channels/qdq_int16_bias_17"), INT8_17_TO_32, reason=SKIP_BIAS_LAYOUT)


def test_declines_int4_weights():
    # not padded yet (graphs.export_like exports read int4 constants packed; padding them is untested)
    assert_unchanged(load_case("pad_channels/int4_weight_chain_12"), INT8_17_TO_32, reason=SKIP_QUANT_LAYOUT)


# -- real architectures -----------------------------------------------------------------------------


def run_on_zoo(name: str, **options):
    """pad-channels alone on the raw export: the pass manager canonicalizes it first."""
    out, record, report = run_pass(load_zoo_model(name), PadChannels(**options))
    for site in record.details:  # never grow an aligned channel count
        for conv in site["convs"]:
            for before, after in (conv["out_channels"], conv["in_channels"]):
                assert before == after or (before % 8 != 0 and after % 8 == 0), conv
    return out, record, report


@pytest.mark.zoo
@pytest.mark.parametrize("name, convs, depthwise", [
    ("squeezenet1_0", 26, 0), ("googlenet", 57, 0), ("inception_v3", 94, 0), ("mobilenet_v2", 35, 17), ("mobilenet_v3_small", 41, 11),
])
def test_leaves_8_aligned_architectures_alone(name, convs, depthwise):
    _, record, _ = run_on_zoo(name)
    assert record.status == "unchanged" and not record.details
    assert record.skipped[SKIP_ALIGNED] == convs
    assert record.skipped.get("grouped or depthwise conv", 0) == depthwise
    assert record.skipped[SKIP_FIRST_LAYER] == 1  # the RGB stem


@pytest.mark.zoo
def test_det_head_box_and_objectness_convs_are_declined_for_overhead_by_default():
    _, record, _ = run_on_zoo("det_head")
    assert record.status == "unchanged" and record.skipped[SKIP_OVERHEAD] == 2  # 4 -> 8 (+100%), 1 -> 8 (+700%)


@pytest.mark.zoo
def test_det_head_heads_are_sliced_back_before_concat_when_overhead_is_allowed():
    out, record, report = run_on_zoo("det_head", max_overhead=8.0)
    assert record.status == "changed" and len(record.sites_applied) == 2 and report.final.passed
    assert record.counters["slices_inserted"] == 2
    concat = [n for n in out.graph.node if n.op_type == "Concat"][0]
    # box: Conv(4->8) -> Slice; objectness: Conv(1->8) -> Sigmoid (carried) -> Slice.
    assert [producer(out, t).op_type for t in concat.input] == ["Sigmoid", "Slice", "Slice"]
    assert dims(out, "output") == ["batch", 85, 20, 20]


@pytest.mark.zoo
def test_efficientnet_b0_pads_squeeze_excite_convs_within_overhead():
    _, record, report = run_on_zoo("efficientnet_b0")
    assert record.status == "changed" and report.final.passed
    # SE squeeze convs of 6, 20 and 28 channels (8 of them) are padded; 4 and 10 (+100%, +60%) are not.
    assert len(record.sites_applied) == 8 and record.skipped[SKIP_OVERHEAD] == 3
    assert record.counters["channels_padded"] == 28 and "slices_inserted" not in record.counters
    assert all(site["flops"][0] < site["flops"][1] <= 1.5 * site["flops"][0] for site in record.details)


def test_a_quantized_conv_aligns_to_int8s_32_and_a_float_conv_to_fp16s_8():
    out, record = assert_rewrites_equivalently(load_case("pad_channels/qdq_per_tensor_17"), INT8_17_TO_32)
    assert record.details and all(site["alignment"] == 32 for site in record.details)
    assert {p for site in record.details for p in site["precision"].values()} == {"int8 (Q/DQ on its input and weight)"}
    _, float_record = assert_rewrites_equivalently(load_case("pad_channels/pool_chain_17"), PadChannels())
    assert [d["alignment"] for d in float_record.details] == [8]
    assert set(float_record.details[0]["precision"].values()) == {"fp16 (float32 layer: the target precision (fp16))"}


def test_int8_align_16_leaves_a_quantized_conv_of_16_channels_alone():
    # qdq_per_tensor_17's conv2 has 16 output channels: unaligned for 32, aligned for 16
    _, record = assert_rewrites_equivalently(load_case("pad_channels/qdq_per_tensor_17"), PadChannels(int8_align=16, max_overhead=1.0))
    assert [site["alignment"] for site in record.details] == [16] and record.sites_applied == ["conv:conv1"]


def test_slices_the_integers_so_a_quantized_grouped_conv_still_reads_a_dequantize():
    """Conv1 (18 filters, int8) padded to 32; the grouped conv2 reads 18 channels back. The Slice goes
    on the integers with a DequantizeLinear after it: a Slice between conv2 and its
    DequantizeLinear would leave conv2 a float layer (for TensorRT and graphopt.precision)."""
    from graphopt.precision import layer_precision
    from tests.fixtures.builders import make_model, node

    rng = np.random.default_rng(0)
    act = {f"s{i}": np.array(1 / 32, np.float32) for i in (1, 2)} | {f"z{i}": np.array(0, np.int8) for i in (1, 2)}
    weights = {"w1": rng.integers(-127, 128, (18, 8, 3, 3), dtype=np.int8), "ws1": np.full(18, 0.01, np.float32),
               "w2": rng.integers(-127, 128, (18, 9, 3, 3), dtype=np.int8), "ws2": np.full(18, 0.01, np.float32),
               "wz1": np.zeros(18, np.int8), "wz2": np.zeros(18, np.int8)}
    model = make_model([
        node("QuantizeLinear", ["x", "s1", "z1"], ["q1"]), node("DequantizeLinear", ["q1", "s1", "z1"], ["d1"]),
        node("DequantizeLinear", ["w1", "ws1", "wz1"], ["wd1"], axis=0),
        node("Conv", ["d1", "wd1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        node("QuantizeLinear", ["c1", "s2", "z2"], ["q2"]), node("DequantizeLinear", ["q2", "s2", "z2"], ["d2"]),
        node("DequantizeLinear", ["w2", "ws2", "wz2"], ["wd2"], axis=0),
        node("Conv", ["d2", "wd2"], ["y"], name="conv2", pads=[1, 1, 1, 1], group=2),
    ], {"x": [1, 8, 8, 8]}, ["y"], act | weights, opset=13)
    out, _ = assert_rewrites_equivalently(model, INT8_17_TO_32)
    assert value(out, producer(out, node_named(out, "conv1").input[1]).input[0]).shape == (32, 8, 3, 3)
    conv2 = node_named(out, "conv2")
    dequantize = producer(out, conv2.input[0])
    assert dequantize.op_type == "DequantizeLinear" and producer(out, dequantize.input[0]).op_type == "Slice"
    graph = gs.import_onnx(infer_shapes(out))
    assert layer_precision(next(n for n in graph.nodes if n.name == "conv2"), "fp16").precision == "int8"
