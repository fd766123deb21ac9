"""fc-to-conv: Gemm/MatMul linears with constant weights become Conv, FC chains stay 4-D."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt import Pipeline, optimize
from graphopt.modelio import infer_shapes
from graphopt.passes.fc_to_conv import FcToConv
from graphopt.passes.reduce_to_pool import ReduceToPool
from graphopt.passes.simplify import Simplify
from graphopt.testing import assert_equivalent
from graphopt.verify import run_onnxruntime
from tests.fixtures.cases import load_case
from tests.fixtures.zoo import load_zoo_model
from tests.helpers import assert_rewrites_equivalently, assert_unchanged, op_counts
from tests.test_fuzz_regressions import changed_on_second_run


def case(name: str) -> onnx.ModelProto:
    return load_case(f"fc_to_conv/{name}")


def shapes_with_batch(model: onnx.ModelProto, batch: int = 3) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes with every symbolic dim set to `batch` (1 would hide broadcasting bugs)."""
    return {
        vi.name: tuple(d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim)
        for vi in model.graph.input
    }


def rewrite(name: str, **options) -> tuple[onnx.ModelProto, onnx.ModelProto, object]:
    model = case(name)
    out, record = assert_rewrites_equivalently(model, FcToConv(**options), input_shapes=shapes_with_batch(model))
    return model, out, record


def nodes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def attr(node: onnx.NodeProto, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def io_signature(values) -> list[tuple[str, bytes]]:
    return [(v.name, v.type.SerializeToString()) for v in values]


# -- 2-D linears -> 1x1 Conv -------------------------------------------------------------------------


def test_rewrites_gemm_with_trans_b_into_1x1_conv_folding_alpha_and_beta():
    model, out, _ = rewrite("gemm_trans_b")
    assert op_counts(out) == {"Reshape": 1, "Conv": 1, "Flatten": 1}
    [conv] = nodes(out, "Conv")
    assert attr(conv, "kernel_shape") == [1, 1]
    weight, bias = initializer(out, conv.input[1]), initializer(out, conv.input[2])
    np.testing.assert_allclose(weight, 0.5 * initializer(model, "y_w").reshape(8, 16, 1, 1), rtol=1e-6)
    np.testing.assert_allclose(bias, 2.0 * initializer(model, "y_b"), rtol=1e-6)


def test_rewrites_gemm_without_trans_b_and_with_a_row_bias():
    model, out, _ = rewrite("gemm_no_trans_b_row_bias")
    [conv] = nodes(out, "Conv")
    weight, bias = initializer(out, conv.input[1]), initializer(out, conv.input[2])
    np.testing.assert_allclose(weight[:, :, 0, 0], 1.5 * initializer(model, "y_w").T, rtol=1e-6)
    np.testing.assert_allclose(bias, 0.25 * initializer(model, "y_b")[0], rtol=1e-6)


def test_spreads_a_one_element_gemm_bias_over_every_channel():
    _, out, _ = rewrite("gemm_scalar_bias")
    [conv] = nodes(out, "Conv")
    assert initializer(out, conv.input[2]).shape == (8,)


def test_rewrites_gemm_without_bias_into_conv_without_bias():
    _, out, _ = rewrite("gemm_no_bias")
    [conv] = nodes(out, "Conv")
    assert len(conv.input) == 2


def test_keeps_float16_weights_and_outputs_in_float16():
    model, out, _ = rewrite("gemm_fp16")
    [conv] = nodes(out, "Conv")
    assert initializer(out, conv.input[1]).dtype == np.float16
    assert io_signature(out.graph.output) == io_signature(model.graph.output)


def test_folds_matmul_and_its_bias_add_into_one_conv():
    model, out, _ = rewrite("matmul_add")
    assert op_counts(out) == {"Reshape": 1, "Conv": 1, "Flatten": 1}
    [conv] = nodes(out, "Conv")
    np.testing.assert_array_equal(initializer(out, conv.input[2]), initializer(model, "b"))


def test_rewrites_matmul_without_bias():
    _, out, _ = rewrite("matmul_no_bias")
    assert op_counts(out) == {"Reshape": 1, "Conv": 1, "Flatten": 1}


def test_handles_a_symbolic_batch():
    model, out, _ = rewrite("gemm_trans_b")
    [reshape] = nodes(out, "Reshape")
    assert initializer(out, reshape.input[1]).tolist() == [0, 16, 1, 1]  # 0 copies the batch
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert_equivalent(model, out, input_shapes=shapes_with_batch(model, batch=1))


# -- flattened feature maps -> kernel-sized Conv -------------------------------------------------------


def test_runs_flatten_of_a_feature_map_as_a_conv_with_a_full_kernel():
    model, out, record = rewrite("flatten_4d")
    assert op_counts(out) == {"Conv": 1, "Flatten": 1}
    [conv] = nodes(out, "Conv")
    assert conv.input[0] == "x"
    assert attr(conv, "kernel_shape") == [3, 3]
    np.testing.assert_array_equal(initializer(out, conv.input[1]), initializer(model, "y_w").reshape(10, 4, 3, 3))
    assert record.counters["flattens_folded_into_kernel"] == 1


def test_keeps_the_flatten_that_something_else_reads():
    model, out, _ = rewrite("flatten_4d_shared")
    [conv] = nodes(out, "Conv")
    assert conv.input[0] == "x"
    assert sorted(n.output[0] for n in nodes(out, "Flatten")) == ["flat", "y"]
    assert io_signature(out.graph.output) == io_signature(model.graph.output)


@pytest.mark.parametrize("name", ["reshape_4d_keep_batch", "reshape_4d_infer_batch", "reshape_4d_static_batch"])
def test_runs_reshape_that_flattens_a_feature_map_as_a_full_kernel_conv(name):
    _, out, _ = rewrite(name)
    assert op_counts(out) == {"Conv": 1, "Flatten": 1}
    [conv] = nodes(out, "Conv")
    assert conv.input[0] == "x" and attr(conv, "kernel_shape") == [3, 3]


@pytest.mark.parametrize("name", ["squeeze_pooled_map_axes_attribute", "squeeze_pooled_map_axes_input"])
def test_runs_a_squeezed_pooled_map_through_a_1x1_conv_over_the_map_itself(name):
    _, out, record = rewrite(name)
    assert op_counts(out) == {"GlobalAveragePool": 1, "Conv": 1, "Flatten": 1}
    [pool], [conv] = nodes(out, "GlobalAveragePool"), nodes(out, "Conv")
    assert conv.input[0] == pool.output[0] and attr(conv, "kernel_shape") == [1, 1]
    assert record.counters["flattens_folded_into_kernel"] == 1


def test_views_a_squeeze_of_symbolic_spatial_dims_through_a_reshape():
    model = case("squeeze_symbolic_spatial")
    out, record = assert_rewrites_equivalently(model, FcToConv(), input_shapes={"x": (3, 4, 1, 1)})
    assert op_counts(out) == {"Squeeze": 1, "Reshape": 1, "Conv": 1, "Flatten": 1}
    assert "flattens_folded_into_kernel" not in record.counters


def test_views_a_squeeze_of_other_axes_as_one_reshape_of_its_input():
    _, out, record = rewrite("squeeze_other_axes")  # [B, 1, 4, 1] -> Squeeze(axes=[1, 3]) -> MatMul
    assert op_counts(out) == {"Reshape": 1, "Conv": 1, "Flatten": 1}
    [reshape] = nodes(out, "Reshape")
    assert reshape.input[0] == "x" and initializer(out, reshape.input[1]).tolist() == [-1, 4, 1, 1]
    assert "flattens_folded_into_kernel" not in record.counters


def test_leaves_nothing_between_reduce_to_pool_and_the_conv_of_a_reduce_mean_head():
    model = load_case("fuzz_regressions/reduce_mean_matmul")  # ReduceMean(keepdims=0) -> MatMul
    out, report = Pipeline([ReduceToPool(), FcToConv()], input_shapes=shapes_with_batch(model)).run(model)
    assert report.equivalent and [p.status for p in report.passes] == ["changed", "changed"]
    assert op_counts(out) == {"GlobalAveragePool": 1, "Conv": 1, "Flatten": 1}


def test_folds_the_flatten_after_a_pooled_reduce_mean_with_keepdims_into_the_kernel():
    model = case("reduce_mean_keepdims_flatten_gemm")
    out, report = Pipeline([ReduceToPool(), FcToConv()], input_shapes=shapes_with_batch(model)).run(model)
    assert report.equivalent and report.passes[1].counters["flattens_folded_into_kernel"] == 1
    assert op_counts(out) == {"GlobalAveragePool": 1, "Conv": 1, "Flatten": 1}


# -- chains --------------------------------------------------------------------------------------------


def test_keeps_an_fc_chain_4d_with_one_flatten_at_the_end():
    _, out, record = rewrite("chain_relu_dropout")
    assert op_counts(out) == {"Conv": 2, "Relu": 1, "Dropout": 1, "Flatten": 1}
    first, second = nodes(out, "Conv")
    [relu], [dropout], [flatten] = nodes(out, "Relu"), nodes(out, "Dropout"), nodes(out, "Flatten")
    assert (relu.input[0], dropout.input[0], second.input[0]) == (first.output[0], relu.output[0], dropout.output[0])
    assert flatten.input[0] == second.output[0] and flatten.output[0] == "y"
    assert record.sites_found == 1 and record.counters["linears_converted"] == 2


def test_gives_chain_tensors_that_others_read_their_own_flatten():
    model, out, record = rewrite("chain_shared_tensors")
    assert record.sites_found == 1
    assert sorted(n.output[0] for n in nodes(out, "Flatten")) == ["h", "logits", "r"]
    assert io_signature(out.graph.output) == io_signature(model.graph.output)


def test_rewrites_each_site_of_a_fork_on_its_own():
    model = infer_shapes(case("chain_fork"))  # as the pass manager does before every pass
    sites = FcToConv().apply(model).sites
    assert len(sites) == 3
    for site in sites:
        result = FcToConv().apply(model, only=[site])
        assert result.applied == [site]
        onnx.checker.check_model(result.model)
        assert_equivalent(model, result.model, input_shapes=shapes_with_batch(model))


def test_lets_a_reshape_after_the_chain_read_the_4d_output_without_a_flatten():
    _, out, record = rewrite("flatten_gemm_reshape_head")
    assert op_counts(out) == {"Conv": 1, "Reshape": 1}
    [conv], [reshape] = nodes(out, "Conv"), nodes(out, "Reshape")
    assert reshape.input[0] == conv.output[0] and reshape.output[0] == "y"
    assert record.details[0]["flattens"] == 0


def test_keeps_the_flatten_when_the_reshaped_tensor_is_a_graph_output_too():
    model, out, _ = rewrite("flatten_gemm_reshape_and_output")
    assert op_counts(out) == {"Conv": 1, "Flatten": 1, "Reshape": 1}
    assert io_signature(out.graph.output) == io_signature(model.graph.output)


# -- BatchNormalization after a linear ----------------------------------------------------------------------


def folded_batchnorm(model: onnx.ModelProto, linear_weight: np.ndarray, linear_bias: np.ndarray, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """The [N, K] weight and [N] bias of a linear with the BatchNormalization `bn` after it, in float64."""
    [node] = [n for n in model.graph.node if n.name == bn]
    scale, beta, mean, var = (initializer(model, name).astype(np.float64) for name in node.input[1:])
    epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    s = scale / np.sqrt(var + epsilon)
    return linear_weight.astype(np.float64) * s[:, None], (linear_bias.astype(np.float64) - mean) * s + beta


def test_folds_a_batchnorm_between_two_linears_into_the_first():
    model, out, record = rewrite("chain_batchnorm_relu")
    assert op_counts(out) == {"Conv": 2, "Relu": 1, "Flatten": 1}
    assert record.counters["batchnorms_folded"] == 1 and record.counters["ops_carried_in_4d"] == 1
    first = nodes(out, "Conv")[0]
    weight, bias = folded_batchnorm(model, initializer(model, "h_w"), initializer(model, "h_b"), "batchnormalization_n")
    np.testing.assert_allclose(initializer(out, first.input[1]), weight.reshape(16, 8, 2, 2).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(initializer(out, first.input[2]), bias.astype(np.float32), rtol=1e-5, atol=1e-6)


def test_folds_a_batchnorm_after_a_bias_add_and_keeps_its_output_name():
    model, out, record = rewrite("matmul_add_batchnorm")
    assert op_counts(out) == {"Reshape": 1, "Conv": 1, "Flatten": 1}
    assert record.counters["batchnorms_folded"] == 1
    assert io_signature(out.graph.output) == io_signature(model.graph.output)


def test_folds_a_float16_batchnorm_into_float16_weights():
    model, out, _ = rewrite("gemm_batchnorm_fp16")
    [conv] = nodes(out, "Conv")
    assert initializer(out, conv.input[1]).dtype == initializer(out, conv.input[2]).dtype == np.float16
    assert io_signature(out.graph.output) == io_signature(model.graph.output)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("batchnorm_runtime_mean", "scale, bias, mean or variance is not a constant"),
        ("batchnorm_beside_relu", "the linear's output has other readers"),
        ("batchnorm_after_graph_output", "the linear's output is a graph output"),
    ],
)
def test_keeps_a_batchnorm_it_cannot_fold_and_still_converts_the_linear(name, reason):
    _, out, record = rewrite(name)
    assert op_counts(out)["BatchNormalization"] == 1 and op_counts(out)["Conv"] == 1
    assert record.skipped == {f"BatchNormalization not folded: {reason}": 1}
    assert "batchnorms_folded" not in record.counters


# -- Muls and Pads that onnxsim would fold into the new Convs ----------------------------------------------


def test_folds_a_scalar_mul_before_a_flatten_into_the_kernel():
    model, out, record = rewrite("scalar_mul_before_flatten")  # Mul by a [1, 1, 1, 1] Constant node
    assert op_counts(out) == {"Conv": 1, "Flatten": 1}
    [conv] = nodes(out, "Conv")
    assert conv.input[0] == "x" and record.counters["muls_folded"] == 1
    expected = -0.6 * initializer(model, "w").astype(np.float64).T.reshape(10, 4, 3, 3)
    np.testing.assert_allclose(initializer(out, conv.input[1]), expected, rtol=1e-6)


def test_folds_a_per_channel_mul_before_a_flatten_into_the_kernels_input_channels():
    model, out, record = rewrite("channel_mul_before_flatten")
    assert op_counts(out) == {"Conv": 1, "Flatten": 1}
    [conv] = nodes(out, "Conv")
    scale = initializer(model, "scale").astype(np.float64).reshape(1, 4, 1, 1)
    expected = initializer(model, "y_w").astype(np.float64).reshape(10, 4, 3, 3) * scale
    np.testing.assert_allclose(initializer(out, conv.input[1]), expected, rtol=1e-6)
    assert conv.input[0] == "x" and record.counters["muls_folded"] == 1


def test_adds_up_the_kernel_channels_a_mul_broadcasts_one_channel_to():
    model, out, _ = rewrite("channel_broadcast_mul_before_flatten")  # [B, 1, 3, 3] * [4, 1, 1]
    [conv] = nodes(out, "Conv")
    scaled = initializer(model, "w").astype(np.float64).T.reshape(10, 4, 3, 3) * initializer(model, "scale").reshape(1, 4, 1, 1)
    np.testing.assert_allclose(initializer(out, conv.input[1]), scaled.sum(axis=1, keepdims=True), rtol=1e-5)
    assert conv.input[0] == "x" and op_counts(out) == {"Conv": 1, "Flatten": 1}


@pytest.mark.parametrize(
    ("name", "kernel", "pads"),
    [("zero_pad_before_flatten", [5, 6], [1, 0, 1, 3]), ("zero_pad_attribute_before_flatten", [4, 5], [0, 2, 1, 0])],
)
def test_folds_a_zero_pad_before_a_flatten_into_the_convs_pads(name, kernel, pads):
    _, out, record = rewrite(name)
    assert op_counts(out) == {"Conv": 1, "Flatten": 1}
    [conv] = nodes(out, "Conv")
    assert conv.input[0] == "x" and attr(conv, "kernel_shape") == kernel and attr(conv, "pads") == pads
    assert record.counters["pads_folded"] == 1


def test_folds_muls_on_both_sides_of_a_zero_pad_before_a_flatten():
    _, out, record = rewrite("mul_pad_mul_before_flatten")
    assert op_counts(out) == {"Conv": 1, "Flatten": 1}
    assert record.counters["muls_folded"] == 2 and record.counters["pads_folded"] == 1


def test_folds_a_per_channel_mul_and_a_bias_add_after_a_matmul():
    model, out, record = rewrite("matmul_mul_add")
    assert op_counts(out) == {"Reshape": 1, "Conv": 1, "Flatten": 1}
    [conv] = nodes(out, "Conv")
    scale = initializer(model, "scale").astype(np.float64).reshape(8)
    expected = initializer(model, "w").astype(np.float64).T * scale[:, None]
    np.testing.assert_allclose(initializer(out, conv.input[1])[:, :, 0, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(initializer(out, conv.input[2]), initializer(model, "b"))
    assert record.counters["muls_folded"] == 1


def test_folds_a_mul_right_before_a_later_linear_of_a_chain_into_its_weight():
    model, out, record = rewrite("chain_relu_mul")  # Gemm -> Relu -> Mul(0.25) -> Gemm
    assert op_counts(out) == {"Conv": 2, "Relu": 1, "Flatten": 1}
    second = nodes(out, "Conv")[1]
    np.testing.assert_allclose(initializer(out, second.input[1])[:, :, 0, 0], 0.25 * initializer(model, "y_w"), rtol=1e-6)
    assert record.counters["muls_folded"] == 1 and record.counters["ops_carried_in_4d"] == 1


def test_folds_a_mul_after_a_graph_output_into_the_next_linear():
    model, out, record = rewrite("chain_output_mul")  # Gemm -> h (graph output) -> Mul -> Gemm
    first, second = nodes(out, "Conv")
    assert second.input[0] == first.output[0] and "Mul" not in op_counts(out)
    np.testing.assert_allclose(initializer(out, second.input[1])[:, :, 0, 0], -1.5 * initializer(model, "y_w"), rtol=1e-6)
    assert io_signature(out.graph.output) == io_signature(model.graph.output)


def test_lets_linears_that_read_a_converted_linear_read_its_conv():
    _, out, record = rewrite("chain_then_sibling_linears")  # Flatten -> Gemm -> two MatMuls
    first, *siblings = nodes(out, "Conv")
    assert [conv.input[0] for conv in siblings] == [first.output[0]] * 2
    assert "Reshape" not in op_counts(out) and record.sites_found == 3


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("mul_before_flatten_read_elsewhere", None),
        ("runtime_mul_before_flatten", None),
        ("pixel_mul_before_flatten", "Mul before a flattened map not folded: scale varies within a channel"),
        ("reflect_pad_before_flatten", "Pad before a flattened map not folded: mode is not constant"),
        ("matmul_mul_beside_relu", None),
    ],
)
def test_keeps_a_mul_or_pad_it_cannot_fold_and_still_converts_the_linear(name, reason):
    model, out, record = rewrite(name)
    kept = "Pad" if "pad" in name else "Mul"
    assert op_counts(out)[kept] == op_counts(model)[kept] and op_counts(out)["Conv"] == 1
    assert "muls_folded" not in record.counters and "pads_folded" not in record.counters
    assert record.skipped == ({reason: 1} if reason else {})


@pytest.mark.parametrize(
    "name",
    [
        "scalar_mul_before_flatten", "channel_mul_before_flatten", "channel_broadcast_mul_before_flatten",
        "zero_pad_before_flatten", "zero_pad_attribute_before_flatten", "mul_pad_mul_before_flatten", "chain_relu_mul",
        "chain_output_mul", "chain_then_sibling_linears", "flatten_gemm_reshape_and_output", "squeeze_other_axes",
        "pixel_mul_before_flatten", "reflect_pad_before_flatten",
    ],
)
def test_all_leaves_nothing_for_a_second_run_to_change(name):
    model = case(name)
    out, report = optimize(model, "all", input_shapes=shapes_with_batch(model))
    assert report.equivalent
    assert changed_on_second_run(out) == {}


@pytest.mark.xfail(strict=True, reason="onnxsim's fuse_reshape_family turns Squeeze(axes=[2, 3]) -> Reshape into one Reshape "
                                       "of [B, 4, h, w], exact only if h = w = 1 at run time; fc-to-conv does not assume that")
def test_all_leaves_a_squeeze_of_unproven_unit_dims_alone_on_a_second_run():
    out, _ = optimize(case("squeeze_symbolic_spatial"), "all", verify=False)
    assert changed_on_second_run(out) == {}


# -- token-wise linears ----------------------------------------------------------------------------------


def test_leaves_token_wise_linears_alone_by_default():
    assert_unchanged(case("token_linear"), FcToConv(), reason="token-wise linear (token_linears=false)")


def test_rewrites_token_wise_linears_when_asked():
    _, out, _ = rewrite("token_linear", token_linears=True)
    assert op_counts(out)["Conv"] == 1 and "Gemm" not in op_counts(out)


# -- what it must leave alone ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("runtime_weight", "weight is not a constant"),
        ("trans_a", "Gemm with transA=1"),
        ("two_activation_matmul", "MatMul of two activations"),
        ("unknown_rank", "input rank unknown"),
        ("rank3_input", "input has rank 3"),
        ("row_bias", "Gemm bias of shape [4, 8] is not per-channel"),
        ("column_bias", "Gemm bias of shape [4, 1] is not per-channel"),
        ("output_in_subgraph", "output is read inside a subgraph"),
    ],
)
def test_leaves_linears_it_cannot_prove_alone(name, reason):
    assert_unchanged(case(name), FcToConv(), reason=reason)


# -- real architectures ------------------------------------------------------------------------------------


@functools.cache
def simplified(name: str) -> onnx.ModelProto:
    out, _ = Pipeline([Simplify()], verify=False).run(load_zoo_model(name))
    return out


def rewrite_zoo(name: str, **options) -> tuple[onnx.ModelProto, object]:
    model = simplified(name)
    return assert_rewrites_equivalently(model, FcToConv(**options), input_shapes=shapes_with_batch(model, batch=2))


@pytest.mark.zoo
def test_converts_both_gemms_of_fc_head_classifier_into_one_4d_chain():
    out, record = rewrite_zoo("fc_head_classifier")
    assert record.sites_found == 1 and record.counters["linears_converted"] == 2
    counts = op_counts(out)
    assert "Gemm" not in counts and "Reshape" not in counts and counts["Flatten"] == 1
    head = nodes(out, "Conv")[-2:]
    assert [attr(conv, "kernel_shape") for conv in head] == [[4, 4], [1, 1]]


@pytest.mark.zoo
def test_converts_resnet50_flatten_gemm_head_into_a_conv_over_the_pooled_map():
    out, record = rewrite_zoo("resnet50")
    assert record.sites_found == 1 and "Gemm" not in op_counts(out)
    [pool] = nodes(out, "GlobalAveragePool")
    [head] = [conv for conv in nodes(out, "Conv") if conv.input[0] == pool.output[0]]
    assert initializer(out, head.input[1]).shape == (1000, 2048, 1, 1)


@pytest.mark.zoo
def test_converts_only_the_vit_classifier_head_by_default():
    out, record = rewrite_zoo("vit_tiny_patch16_224")
    assert record.sites_applied == ["/head/Gemm"]
    assert record.skipped == {"MatMul of two activations": 24, "token-wise linear (token_linears=false)": 48}
    assert op_counts(out)["MatMul"] == 24 and op_counts(out)["Gemm"] == 48


@pytest.mark.zoo
def test_converts_vit_token_linears_when_asked_and_leaves_attention_alone():
    out, record = rewrite_zoo("vit_tiny_patch16_224", token_linears=True)
    assert record.counters["linears_converted"] == 49
    assert record.skipped == {"MatMul of two activations": 24}
    assert op_counts(out)["MatMul"] == 24 and "Gemm" not in op_counts(out)


def test_leaves_a_float16_gemm_alone_when_folding_alpha_would_overflow():
    assert_unchanged(case("gemm_fp16_alpha_overflows"), FcToConv(), reason="Gemm alpha or beta would overflow the weight dtype when folded")


def test_keeps_the_add_when_the_folded_float16_bias_would_overflow():
    model, out, record = rewrite("gemm_add_fp16_bias_overflows")
    assert op_counts(out) == {"Reshape": 1, "Conv": 1, "Flatten": 1, "Add": 1}  # the Add stays after the Conv
    feed = {"x": np.full((2, 4), -40000, np.float16)}
    assert np.all(np.isfinite(run_onnxruntime(out, feed)["y"]))
