"""merge-convs: sibling Convs on one input become one Conv (+ Split), verified equivalent."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from graphopt.modelio import infer_shapes
from graphopt.spec import parse_options
from graphopt.testing import assert_equivalent
from passes.merge_convs import (
    FLOPS_GROW,
    MIXED_ACTIVATIONS,
    MIXED_QUANTIZED,
    NO_GEOMETRY_MATCH,
    OUTPUT_Q_DIFFERS,
    OUTPUT_Q_MIXED,
    TOO_FEW,
    TOO_WIDE,
    WEIGHT_FORMS_DIFFER,
    MergeConvs,
)
from tests.fixtures.cases import load_case
from tests.fixtures.zoo import load_zoo_model
from tests.helpers import assert_rewrites_equivalently, assert_unchanged, attr, canonical, constant, only, op_counts, run_pass


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def merged_conv(model: onnx.ModelProto, channels: int) -> onnx.NodeProto:
    [conv] = [n for n in model.graph.node if n.op_type == "Conv" and constant(model, n.input[1]).shape[0] == channels]
    return conv


# -- horizontal merges ---------------------------------------------------------------------------


def test_merges_two_1x1_siblings_into_one_conv_and_a_split():
    out, record = assert_rewrites_equivalently(load_case("merge_convs/two_1x1_siblings"), MergeConvs())
    assert op_counts(out) == {"Conv": 1, "Split": 1}
    conv, split = only(out, "Conv"), only(out, "Split")
    assert constant(out, conv.input[1]).shape == (24, 8, 1, 1)
    assert constant(out, conv.input[2])[16:].tolist() == [0.0] * 8  # the bias-free sibling's share
    assert attr(split, "axis") == 1 and constant(out, split.input[1]).tolist() == [16, 8]
    assert list(split.output) == ["ya", "yb"] == [o.name for o in out.graph.output]
    assert record.counters["convs_merged"] == 2


def test_merges_a_fire_module_and_drops_the_split_and_the_concat():
    out, record = assert_rewrites_equivalently(load_case("merge_convs/fire_module"), MergeConvs())
    assert op_counts(out) == {"Conv": 2, "Relu": 2}
    conv = merged_conv(out, 16)
    assert attr(conv, "kernel_shape") == [3, 3] and attr(conv, "pads") == [1, 1, 1, 1]
    weight = constant(out, conv.input[1])
    assert np.all(weight[:8, :, [0, 0, 2, 2], [0, 2, 0, 2]] == 0)  # the 1x1 expand sits at the centre
    assert producer(out, "y").op_type == "Relu" and producer(out, "y").input[0] == conv.output[0]
    assert record.counters["concats_dropped"] == 1 and record.counters["activations_shared"] == 2


def test_reports_the_flops_of_each_merge_before_and_after():
    _, record = assert_rewrites_equivalently(load_case("merge_convs/fire_module"), MergeConvs())
    [merge] = record.details
    pixels = 9 * 9
    assert merge["flops"] == [2 * pixels * (8 * 4 * 1 + 8 * 4 * 9), 2 * pixels * 16 * 4 * 9]  # the 1x1 grows to 3x3
    assert merge["flop_growth"] == 1.8


def test_merges_siblings_in_the_order_of_their_concat():
    model = load_case("merge_convs/concat_reversed")
    out, _ = assert_rewrites_equivalently(model, MergeConvs())
    conv = only(out, "Conv")
    assert op_counts(out) == {"Conv": 1} and conv.output[0] == "y"
    weight = constant(out, conv.input[1])
    np.testing.assert_array_equal(weight[:12], constant(model, "wb"))
    np.testing.assert_array_equal(weight[12:], constant(model, "wa"))


def test_merges_a_detection_head_and_keeps_its_per_branch_sigmoids():
    out, record = assert_rewrites_equivalently(load_case("merge_convs/det_head"), MergeConvs())
    assert op_counts(out) == {"Conv": 1, "Split": 1, "Sigmoid": 2, "Concat": 1}
    split = only(out, "Split")
    assert constant(out, split.input[1]).tolist() == [80, 4, 1]
    assert constant(out, only(out, "Conv").input[1]).shape[0] == 85
    assert {producer(out, name).op_type for name in ("cls", "box", "obj")} == {"Split"}
    assert record.counters["convs_merged"] == 3


def test_shares_one_relu_when_every_sibling_has_its_own():
    out, _ = assert_rewrites_equivalently(load_case("merge_convs/shared_relu"), MergeConvs())
    assert op_counts(out) == {"Conv": 1, "Relu": 1, "Split": 1}
    assert producer(out, only(out, "Split").input[0]).op_type == "Relu"
    assert list(only(out, "Split").output) == ["ra", "rb"]


def test_shares_a_clip_whose_bounds_are_equal_constants():
    out, _ = assert_rewrites_equivalently(load_case("merge_convs/shared_clip"), MergeConvs())
    assert op_counts(out) == {"Conv": 1, "Clip": 1, "Split": 1, "Add": 1}
    clip = only(out, "Clip")
    assert [constant(out, name).item() for name in clip.input[1:]] == [0.0, 6.0]


def test_leaves_aligned_siblings_with_different_activations_alone():
    # Merged, each Conv would reach its activation through the Split: TensorRT could fuse neither.
    _, record, _ = run_pass(load_case("merge_convs/different_activations"), MergeConvs())
    assert record.status == "unchanged"
    assert record.skipped == {MIXED_ACTIVATIONS: 2}


def test_merges_narrow_siblings_with_different_activations_and_keeps_them_after_the_split():
    out, record = assert_rewrites_equivalently(load_case("merge_convs/different_activations_narrow"), MergeConvs())
    assert op_counts(out) == {"Conv": 1, "Split": 1, "Relu": 1, "Sigmoid": 1}
    assert producer(out, only(out, "Relu").input[0]).op_type == "Split"
    assert producer(out, only(out, "Sigmoid").input[0]).op_type == "Split"
    assert "activations_shared" not in record.counters


def test_merges_siblings_under_a_dynamic_batch():
    model = load_case("merge_convs/dynamic_batch")
    out, _ = assert_rewrites_equivalently(model, MergeConvs(), input_shapes={"x": (3, 8, 10, 10)})
    conv = only(out, "Conv")
    assert attr(conv, "kernel_shape") == [5, 5] and attr(conv, "pads") == [2, 2, 2, 2]
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_a_sibling_output_that_is_a_graph_output_keeps_its_name():
    out, _ = assert_rewrites_equivalently(load_case("merge_convs/sibling_feeds_graph_output"), MergeConvs())
    assert list(only(out, "Split").output) == ["ya", "yb"]
    assert [o.name for o in out.graph.output] == ["ya", "ra", "sb"]
    assert only(out, "Relu").input[0] == "ya" and only(out, "Sigmoid").input[0] == "yb"


def test_pads_a_dilated_kernel_by_whole_taps_and_the_pads_by_dilation():
    model = load_case("merge_convs/dilated")
    out, _ = assert_rewrites_equivalently(model, MergeConvs())
    conv = only(out, "Conv")
    assert attr(conv, "kernel_shape") == [3, 3] and attr(conv, "pads") == [2, 2, 2, 2]
    assert attr(conv, "dilations") == [2, 2]
    weight = constant(out, conv.input[1])
    np.testing.assert_array_equal(weight[6:, :, 1:2, 1:2], constant(model, "wb"))


def test_places_an_off_centre_kernel_at_its_first_tap():
    model = load_case("merge_convs/strided_shifted")
    out, _ = assert_rewrites_equivalently(model, MergeConvs())
    conv = only(out, "Conv")
    assert attr(conv, "pads") == [1, 1, 1, 1] and attr(conv, "strides") == [2, 2]
    weight = constant(out, conv.input[1])
    np.testing.assert_array_equal(weight[4:, :, :2, :2], constant(model, "wb"))
    assert not weight[4:, :, 2, :].any() and not weight[4:, :, :, 2].any()


def test_merges_1x3_and_3x1_siblings_into_3x3_when_flop_growth_allows():
    out, record = assert_rewrites_equivalently(load_case("merge_convs/inception_1x3_3x1"), MergeConvs(max_flop_growth=3.0))
    conv = only(out, "Conv")
    assert attr(conv, "kernel_shape") == [3, 3] and attr(conv, "pads") == [1, 1, 1, 1]
    assert record.details[0]["flop_growth"] == 3.0


def test_leaves_1x3_and_3x1_siblings_alone_by_default():
    assert_unchanged(load_case("merge_convs/inception_1x3_3x1"), MergeConvs(), reason=FLOPS_GROW)


def test_merges_only_identical_kernels_when_the_whole_group_would_grow_flops_too_much():
    out, record = assert_rewrites_equivalently(load_case("merge_convs/three_siblings_mixed"), MergeConvs())
    assert op_counts(out) == {"Conv": 2, "Split": 1}
    assert constant(out, merged_conv(out, 16).input[1]).shape == (16, 4, 1, 1)
    assert producer(out, "yc").name == "conv_yc"
    assert record.skipped == {FLOPS_GROW: 1}


def test_gives_split_sizes_as_an_attribute_before_opset_13():
    out, _ = assert_rewrites_equivalently(load_case("merge_convs/opset11"), MergeConvs())
    split = only(out, "Split")
    assert list(split.input) == [only(out, "Conv").output[0]] and attr(split, "split") == [6, 2]


def test_merges_float16_siblings_in_float16():
    out, _ = assert_rewrites_equivalently(load_case("merge_convs/fp16_siblings"), MergeConvs())
    conv = only(out, "Conv")
    assert constant(out, conv.input[1]).dtype == np.float16 and constant(out, conv.input[2]).dtype == np.float16


# -- options -------------------------------------------------------------------------------------


def test_leaves_a_group_wider_than_max_out_channels_alone():
    assert_unchanged(load_case("merge_convs/two_1x1_siblings"), MergeConvs(max_out_channels=16), reason=TOO_WIDE)


def test_leaves_a_group_smaller_than_min_siblings_alone():
    assert_unchanged(load_case("merge_convs/two_1x1_siblings"), MergeConvs(min_siblings=3), reason=TOO_FEW)


def test_reads_its_options_from_a_spec():
    options = parse_options(MergeConvs, "max-out-channels=none,max-flop-growth=3,min-siblings=3,vertical=true")
    assert options == {"max_out_channels": None, "max_flop_growth": 3.0, "min_siblings": 3, "vertical": True}


@pytest.mark.parametrize("options", [{"min_siblings": 1}, {"max_out_channels": 1}, {"max_flop_growth": 0.5}])
def test_rejects_options_out_of_range(options):
    with pytest.raises(ValueError):
        MergeConvs(**options)


# -- must not touch ------------------------------------------------------------------------------


def test_leaves_siblings_with_different_strides_alone():
    assert_unchanged(load_case("merge_convs/different_strides"), MergeConvs(), reason=NO_GEOMETRY_MATCH)


def test_leaves_a_grouped_sibling_alone():
    assert_unchanged(load_case("merge_convs/grouped_conv"), MergeConvs(), reason="grouped convolution (group != 1)")


def test_leaves_siblings_with_different_dilations_alone():
    assert_unchanged(load_case("merge_convs/different_dilation"), MergeConvs(), reason=NO_GEOMETRY_MATCH)


def test_leaves_a_sibling_with_a_runtime_weight_alone():
    assert_unchanged(load_case("merge_convs/runtime_weight"), MergeConvs(), reason="weight is not a constant")


def test_leaves_a_single_conv_alone():
    record = assert_unchanged(load_case("merge_convs/single_conv"), MergeConvs(vertical=True))
    assert record.sites_found == 0


def test_leaves_siblings_whose_pads_give_different_output_shapes_alone():
    assert_unchanged(load_case("merge_convs/incompatible_pads"), MergeConvs(), reason=NO_GEOMETRY_MATCH)


# -- quantized (Q/DQ) siblings ------------------------------------------------------------------------


def feeds(model: onnx.ModelProto, count: int = 3) -> list[dict[str, np.ndarray]]:
    """Normal inputs (a dynamic batch at 2): every channel of every sibling sees both signs."""
    rng = np.random.default_rng(7)
    shapes = {i.name: [d.dim_value or 2 for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()} for _ in range(count)]


def quantized_outputs(model: onnx.ModelProto, inputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The integers every QuantizeLinear writes (weights' included), on each input, stacked."""
    names = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in {o.name for o in probe.graph.output})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = [session.run(names, feed) for feed in inputs]
    return {name: np.stack([run[i] for run in runs]) for i, name in enumerate(names)}


def assert_same_integers(before: onnx.ModelProto, after: onnx.ModelProto, siblings: list[str]) -> None:
    """Every QuantizeLinear left writes the integers it wrote before, and the merged one writes the
    siblings' output integers (`siblings`: their Q outputs, in channel order) concatenated. Exact:
    the merged Conv sums the same products; its zero taps add exact zeros."""
    inputs = feeds(before)
    old, new = quantized_outputs(canonical(before), inputs), quantized_outputs(after, inputs)
    [merged] = [name for name in new if name not in old]
    np.testing.assert_array_equal(new.pop(merged), np.concatenate([old[name] for name in siblings], axis=2))
    for name, integers in new.items():
        np.testing.assert_array_equal(integers, old[name], err_msg=name)


def initializer_of(model: onnx.ModelProto, tensor: str, hops: int) -> str:
    """The constant `hops` single-input producers up from `tensor` (a weight's Q/DQ chain)."""
    for _ in range(hops):
        tensor = next(n for n in model.graph.node if tensor in n.output).input[0]
    return tensor


def quantization_of(model: onnx.ModelProto, tensor: str) -> tuple[onnx.NodeProto, np.ndarray, np.ndarray]:
    """The DequantizeLinear writing `tensor`, its scale and zero point."""
    dq = next(n for n in model.graph.node if tensor in n.output)
    assert dq.op_type == "DequantizeLinear"
    return dq, constant(model, dq.input[1]), constant(model, dq.input[2])


def test_merges_ort_int8_siblings_with_equal_output_quantization_into_one_conv_and_one_q():
    model = load_case("merge_convs/qdq_ort_fire")
    out, record = assert_rewrites_equivalently(model, MergeConvs())
    assert op_counts(out) == {"Conv": 1, "QuantizeLinear": 3, "DequantizeLinear": 5}  # x, merged output, Concat; weight, bias
    assert "Concat" not in op_counts(out) and record.counters["concats_dropped"] == 1
    conv = only(out, "Conv")
    assert attr(conv, "kernel_shape") == [3, 3] and attr(conv, "pads") == [1, 1, 1, 1]
    # The integers: the 1x1's at the centre of zero-point taps (0: symmetric), the 3x3's as they were.
    dq, scale, zero_point = quantization_of(out, conv.input[1])
    stored = constant(out, dq.input[0])
    assert stored.dtype == np.int8 and attr(dq, "axis") == 0
    np.testing.assert_array_equal(stored[:8, :, 1:2, 1:2], constant(model, "w1_quantized"))
    assert not stored[:8, :, [0, 0, 2, 2], [0, 2, 0, 2]].any()
    np.testing.assert_array_equal(stored[8:], constant(model, "w3_quantized"))
    np.testing.assert_array_equal(scale, np.concatenate([constant(model, "w1_scale"), constant(model, "w3_scale")]))
    np.testing.assert_array_equal(zero_point, np.zeros(16, np.int8))
    # The int32 biases and their per-channel scales, concatenated.
    dq, scale, _ = quantization_of(out, conv.input[2])
    expected = np.concatenate([constant(model, "b1_quantized"), constant(model, "b3_quantized")])
    np.testing.assert_array_equal(constant(out, dq.input[0]), expected)
    np.testing.assert_array_equal(scale, np.concatenate([constant(model, "b1_quantized_scale"), constant(model, "b3_quantized_scale")]))
    # One Q -> DQ after the merged Conv writes what the Concat wrote; the Concat's own Q stays.
    quantize = next(n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == conv.output[0])
    assert constant(out, quantize.input[1]) == constant(model, "e1_scale") == constant(model, "e3_scale")
    assert next(n for n in out.graph.node if quantize.output[0] in n.input).output == ["y_QuantizeLinear_Input"]
    assert record.counters["quantized_convs_merged"] == 2 and record.counters["output_quantizers_shared"] == 2
    assert_same_integers(model, out, ["e1_QuantizeLinear_Output", "e3_QuantizeLinear_Output"])


def test_gives_a_sibling_without_a_bias_int32_zeros_beside_the_others_int32_bias():
    model = load_case("merge_convs/qdq_ort_fire_one_bias")
    out, _ = assert_rewrites_equivalently(model, MergeConvs())
    dq, scale, zero_point = quantization_of(out, only(out, "Conv").input[2])
    stored = constant(out, dq.input[0])
    assert stored.dtype == np.int32 and attr(dq, "axis") == 0
    np.testing.assert_array_equal(stored, np.concatenate([np.zeros(8, np.int32), constant(model, "b3_quantized")]))
    np.testing.assert_array_equal(scale[8:], constant(model, "b3_quantized_scale"))
    np.testing.assert_array_equal(scale[:8], constant(model, "x_scale") * constant(model, "w1_scale"))  # as ORT scales a bias
    assert not zero_point.any()
    assert_same_integers(model, out, ["e1_QuantizeLinear_Output", "e3_QuantizeLinear_Output"])


def test_merges_siblings_reading_equal_but_separate_input_qdq_pairs():
    # ORT's DedicatedQDQPair gives each reader its own Q -> DQ of x; canonicalization merges them,
    # the pass without it must see one input too.
    out, record = assert_rewrites_equivalently(load_case("merge_convs/qdq_ort_fire"), MergeConvs(), canonicalize=False)
    assert op_counts(out)["Conv"] == 1 and op_counts(out)["QuantizeLinear"] == 3
    assert record.counters["convs_merged"] == 2


def test_merges_per_tensor_weights_with_different_scales_into_per_channel_weights():
    model = load_case("merge_convs/qdq_ort_per_tensor")
    out, record = assert_rewrites_equivalently(model, MergeConvs())
    assert op_counts(out) == {"Conv": 1, "Split": 1, "QuantizeLinear": 2, "DequantizeLinear": 3}
    conv, split = only(out, "Conv"), only(out, "Split")
    dq, scale, zero_point = quantization_of(out, conv.input[1])
    assert constant(model, "wa_scale") != constant(model, "wb_scale")
    assert attr(dq, "axis") == 0 and scale.shape == (16,)
    np.testing.assert_array_equal(scale, [constant(model, "wa_scale")] * 12 + [constant(model, "wb_scale")] * 4)
    np.testing.assert_array_equal(zero_point, np.zeros(16, np.int8))
    expected = np.concatenate([constant(model, "wa_quantized"), constant(model, "wb_quantized")])
    np.testing.assert_array_equal(constant(out, dq.input[0]), expected)
    # Conv -> Q -> DQ -> Split: the Split writes the siblings' dequantized outputs, the graph outputs.
    assert next(n for n in out.graph.node if split.input[0] in n.output).op_type == "DequantizeLinear"
    assert list(split.output) == ["ya", "yb"] == [o.name for o in out.graph.output]
    assert record.counters["output_quantizers_shared"] == 2
    assert_same_integers(model, out, ["ya_QuantizeLinear_Output", "yb_QuantizeLinear_Output"])


def test_merges_modelopt_float16_weights_behind_quantizelinear_in_that_form():
    model = load_case("merge_convs/qdq_modelopt_fire")
    out, record = assert_rewrites_equivalently(model, MergeConvs())
    assert op_counts(out)["Conv"] == 1 and op_counts(out)["Relu"] == 1 and "Concat" not in op_counts(out)
    conv = only(out, "Conv")
    dq, scale, zero_point = quantization_of(out, conv.input[1])
    quantize = next(n for n in out.graph.node if dq.input[0] in n.output)
    assert quantize.op_type == "QuantizeLinear" and attr(quantize, "axis") == 0
    stored = constant(out, quantize.input[0])
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored[:8, :, 1:2, 1:2], constant(model, "w1_f"))
    assert not stored[:8, :, [0, 0, 2, 2], [0, 2, 0, 2]].any()  # a float zero quantizes to the zero point
    np.testing.assert_array_equal(stored[8:], constant(model, "w3_f"))
    np.testing.assert_array_equal(scale, np.concatenate([constant(model, "w1_s"), constant(model, "w3_s")]))
    assert scale.dtype == np.float16 and zero_point.dtype == np.int8
    bias = constant(out, conv.input[2])  # plain float16, as it came
    np.testing.assert_array_equal(bias, np.concatenate([constant(model, "b1"), constant(model, "b3")]))
    assert record.counters["quantized_convs_merged"] == 2 and "output_quantizers_shared" not in record.counters


def test_merges_int8_siblings_whose_outputs_are_not_quantized():
    model = load_case("merge_convs/qdq_siblings")
    out, _ = assert_rewrites_equivalently(model, MergeConvs())
    assert op_counts(out) == {"Conv": 1, "Split": 1, "QuantizeLinear": 1, "DequantizeLinear": 2}
    dq, scale, _ = quantization_of(out, only(out, "Conv").input[1])
    np.testing.assert_array_equal(constant(out, dq.input[0]), np.concatenate([constant(model, "wa_q"), constant(model, "wb_q")]))
    np.testing.assert_array_equal(scale, np.full(8, 0.01, np.float32))


def test_leaves_siblings_with_different_output_quantization_alone():
    assert_unchanged(load_case("merge_convs/qdq_ort_fire_output_scales_differ"), MergeConvs(), reason=OUTPUT_Q_DIFFERS)


def test_leaves_a_quantized_output_beside_a_plain_one_alone():
    assert_unchanged(load_case("merge_convs/qdq_output_quantized_beside_plain"), MergeConvs(), reason=OUTPUT_Q_MIXED)


def test_leaves_a_plain_weight_sibling_beside_a_quantized_one_alone():
    record = assert_unchanged(load_case("merge_convs/qdq_plain_beside_quantized"), MergeConvs(), reason=MIXED_QUANTIZED)
    assert record.skipped == {MIXED_QUANTIZED: 2}


def test_leaves_siblings_with_weights_in_different_quantized_forms_alone():
    record = assert_unchanged(load_case("merge_convs/qdq_weight_forms_differ"), MergeConvs(), reason=WEIGHT_FORMS_DIFFER)
    assert record.skipped == {WEIGHT_FORMS_DIFFER: 2}


def test_does_not_compose_quantized_convs():
    model = load_case("merge_convs/qdq_siblings")
    assert MergeConvs(vertical=True).apply(model).applied == MergeConvs().apply(model).applied


# -- vertical ------------------------------------------------------------------------------------


def test_composes_a_1x1_into_the_conv_after_it_when_asked():
    out, record = assert_rewrites_equivalently(load_case("merge_convs/pointwise_then_3x3"), MergeConvs(vertical=True))
    conv = only(out, "Conv")
    assert constant(out, conv.input[1]).shape == (8, 4, 3, 3) and conv.output[0] == "y"
    before, after = record.details[0]["flops"]
    assert before == 2 * (16 * 4 * 8 * 8 + 8 * 16 * 9 * 6 * 6)  # the 1x1 on 8x8, the unpadded 3x3 on 6x6
    assert after == 2 * 8 * 4 * 9 * 6 * 6


def test_does_not_compose_convs_by_default():
    assert_unchanged(load_case("merge_convs/pointwise_then_3x3"), MergeConvs())


def test_composes_into_a_padded_conv_when_the_1x1_has_no_bias():
    out, _ = assert_rewrites_equivalently(load_case("merge_convs/pointwise_no_bias_then_padded_3x3"), MergeConvs(vertical=True))
    assert attr(only(out, "Conv"), "pads") == [1, 1, 1, 1]


def test_does_not_compose_when_padding_would_expose_the_1x1_bias():
    assert_unchanged(
        load_case("merge_convs/pointwise_then_padded_3x3"), MergeConvs(vertical=True),
        reason="vertical: second conv pads its input and the 1x1 conv has a non-zero bias (borders would differ)",
    )


def test_does_not_compose_when_that_grows_the_flops():
    assert_unchanged(
        load_case("merge_convs/bottleneck_then_3x3"), MergeConvs(vertical=True), reason="vertical: composing would grow the FLOPs"
    )


def test_composes_a_chain_of_three_in_one_run():
    out, record = assert_rewrites_equivalently(load_case("merge_convs/pointwise_chain_of_three"), MergeConvs(vertical=True))
    assert op_counts(out) == {"Conv": 1} and constant(out, only(out, "Conv").input[1]).shape == (8, 8, 3, 3)
    assert record.sites_applied == ["conv_a,conv_b,conv_y"] and record.counters["chains_composed"] == 2
    assert assert_unchanged(out, MergeConvs(vertical=True)).sites_found == 0


def test_composes_a_1x1_into_the_conv_its_merged_readers_become():
    out, record = assert_rewrites_equivalently(load_case("merge_convs/pointwise_before_siblings"), MergeConvs(vertical=True))
    assert op_counts(out) == {"Conv": 1, "Split": 1} and only(out, "Conv").input[0] == "x"
    assert record.sites_applied == ["conv_p,conv_ya,conv_yb"]
    assert record.counters["convs_merged"] == 2 and record.counters["chains_composed"] == 1


def test_rewrites_each_component_of_its_rounds_on_its_own():
    model = infer_shapes(load_case("merge_convs/two_vertical_components"))  # as the pass manager does
    sites = MergeConvs(vertical=True).apply(model).sites
    assert sites == ["conv_a,conv_yb,conv_yc", "conv_d,conv_ye"]
    expected = {sites[0]: {"Conv": 3, "Split": 1}, sites[1]: {"Conv": 4}}
    for site in sites:
        result = MergeConvs(vertical=True).apply(model, only=[site])
        assert result.applied == [site] and op_counts(result.model) == expected[site]
        onnx.checker.check_model(result.model)
        assert_equivalent(model, result.model)


# -- real architectures: merge-convs alone on the raw export (the manager canonicalizes it first) --


@pytest.mark.zoo
def test_merges_every_squeezenet_fire_module_without_split_or_concat():
    out, record = assert_rewrites_equivalently(load_zoo_model("squeezenet1_0"), MergeConvs())
    assert len(record.sites_applied) == 8
    assert record.counters["concats_dropped"] == 8 and record.counters["kernels_zero_padded"] == 8
    assert op_counts(out)["Conv"] == 26 - 8 and "Concat" not in op_counts(out) and "Split" not in op_counts(out)
    assert all(merge["flop_growth"] <= 2.0 and merge["flops"][1] > merge["flops"][0] for merge in record.details)


@pytest.mark.zoo
def test_merges_the_1x1_branches_of_every_googlenet_inception_block():
    out, record = assert_rewrites_equivalently(load_zoo_model("googlenet"), MergeConvs())
    assert len(record.sites_applied) == 9 and record.counters["convs_merged"] == 27
    assert op_counts(out)["Split"] == 9
    assert all(merge["flops"][1] == merge["flops"][0] for merge in record.details)  # 1x1s: no zero taps


@pytest.mark.zoo
def test_merges_the_1x1_branches_of_every_inception_v3_block():
    out, record = assert_rewrites_equivalently(load_zoo_model("inception_v3"), MergeConvs())
    assert len(record.sites_applied) == 10 and record.counters["convs_merged"] == 29
    assert record.skipped == {FLOPS_GROW: 4, NO_GEOMETRY_MATCH: 2}  # 1x3 + 3x1 pairs; Mixed_6a's strides


@pytest.mark.zoo
def test_merges_the_cls_box_obj_convs_of_a_detection_head():
    out, record = assert_rewrites_equivalently(load_zoo_model("det_head"), MergeConvs())
    assert record.sites_applied == ["/cls/Conv,/box/Conv,/obj/Conv"]
    assert constant(out, only(out, "Split").input[1]).tolist() == [80, 4, 1]


@pytest.mark.zoo
def test_leaves_resnet50s_aligned_stem_and_downsample_siblings_alone():
    _, record, _ = run_pass(load_zoo_model("resnet50"), MergeConvs(), verify=False)
    assert record.status == "unchanged" and record.skipped[MIXED_ACTIVATIONS] == 2


def test_zero_filters_do_not_count_towards_flop_growth():
    # pad-channels' zero filters must not turn a declined group into a merge on a second run of `all`.
    assert_unchanged(load_case("merge_convs/pointwise_beside_padded_3x3"), MergeConvs(), reason=FLOPS_GROW)
    _, record = assert_rewrites_equivalently(load_case("merge_convs/pointwise_beside_full_3x3"), MergeConvs())
    assert record.sites_applied == ["conv_y1,conv_y3"]
