"""reparameterize: training-form blocks (sibling Convs and identities summed by Add) become one Conv."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt.flops import count_flops
from graphopt.modelio import infer_shapes
from graphopt.pipeline import Pipeline
from graphopt.registry import default_order
from passes.reparameterize import (
    BROADCAST,
    DIFFERENT_INPUTS,
    FLOPS_GROW,
    READ_ELSEWHERE,
    Branch,
    Reparameterize,
    branches_incompatible,
)
from tests.fixtures.cases import load_case
from tests.fixtures.zoo import load_zoo_model
from tests.helpers import assert_rewrites_equivalently, assert_unchanged, attr, constant, only, op_counts


def batchnorm_affine(model: onnx.ModelProto, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BatchNormalization(x) = s x + t, from the fixture's parameters (epsilon 1e-5)."""
    gamma, beta, mean, var = (constant(model, f"{prefix}_{p}").astype(np.float64) for p in ("scale", "bias", "mean", "var"))
    s = gamma / np.sqrt(var + 1e-5)
    return s, beta - mean * s


def flops(model: onnx.ModelProto) -> int:
    return count_flops(infer_shapes(model)).total


# -- training-form blocks ---------------------------------------------------------------------------


def test_sums_a_repvgg_block_into_one_3x3_conv():
    model = load_case("reparameterize/repvgg_block")
    out, record = assert_rewrites_equivalently(model, Reparameterize())
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    conv = only(out, "Conv")
    assert attr(conv, "kernel_shape") == [3, 3] and attr(conv, "pads") == [1, 1, 1, 1] and only(out, "Relu").input[0] == conv.output[0]
    s, t = batchnorm_affine(model, "identity")
    expected = constant(model, "w3").astype(np.float64)
    expected[:, :, 1, 1] += constant(model, "w1")[:, :, 0, 0] + np.diag(s)  # 1x1 and identity at the centre
    np.testing.assert_allclose(constant(out, conv.input[1]), expected, rtol=1e-6)
    np.testing.assert_allclose(constant(out, conv.input[2]), constant(model, "b3") + constant(model, "b1") + t, rtol=1e-6)
    assert record.counters == {"convs_merged": 2, "identity_branches": 1, "batchnorms_folded": 1, "adds_removed": 2}
    [site] = record.details
    assert site["flops_before"] == 2 * 8 * 100 * 8 * (9 + 1) and site["flops_after"] == 2 * 8 * 100 * 8 * 9


def test_keeps_a_symbolic_batch():
    out, _ = assert_rewrites_equivalently(load_case("reparameterize/repvgg_dynamic_batch"), Reparameterize(), input_shapes={"x": (3, 8, 10, 10)})
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_sums_a_float16_block_in_float16():
    out, _ = assert_rewrites_equivalently(load_case("reparameterize/repvgg_fp16"), Reparameterize())
    conv = only(out, "Conv")
    assert constant(out, conv.input[1]).dtype == np.float16 and constant(out, conv.input[2]).dtype == np.float16


def test_sums_an_acnet_block_into_its_3x3():
    model = load_case("reparameterize/acnet_block")
    out, record = assert_rewrites_equivalently(model, Reparameterize())
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    weight = constant(out, only(out, "Conv").input[1])
    assert weight.shape == (10, 6, 3, 3)
    np.testing.assert_allclose(weight[:, :, 0, 0], constant(model, "w33")[:, :, 0, 0])  # a corner only the 3x3 reads
    centre = constant(model, "w33")[:, :, 1, 1] + constant(model, "w13")[:, :, 0, 1] + constant(model, "w31")[:, :, 1, 0]
    np.testing.assert_allclose(weight[:, :, 1, 1], centre, rtol=1e-6)
    assert record.details[0]["flops_after"] < record.details[0]["flops_before"]


def test_sums_a_mobileone_depthwise_block_per_channel():
    model = load_case("reparameterize/mobileone_depthwise")
    out, record = assert_rewrites_equivalently(model, Reparameterize())
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    conv = only(out, "Conv")
    assert attr(conv, "group") == 16 and constant(out, conv.input[1]).shape == (16, 1, 3, 3)
    s, _ = batchnorm_affine(model, "identity")
    centre = sum(constant(model, f"wk{i}")[:, 0, 1, 1] for i in range(3)) + constant(model, "ws")[:, 0, 0, 0] + s
    np.testing.assert_allclose(constant(out, conv.input[1])[:, 0, 1, 1], centre, rtol=1e-6)
    assert record.counters["convs_merged"] == 4 and record.counters["adds_removed"] == 4


def test_places_the_identity_inside_each_group():
    model = load_case("reparameterize/grouped_block")
    out, _ = assert_rewrites_equivalently(model, Reparameterize())
    weight = constant(out, only(out, "Conv").input[1])
    assert attr(only(out, "Conv"), "group") == 2 and weight.shape == (8, 4, 3, 3)
    s, _ = batchnorm_affine(model, "identity")
    identity = weight[:, :, 1, 1] - constant(model, "w3")[:, :, 1, 1] - constant(model, "w1")[:, :, 0, 0]
    np.testing.assert_allclose(identity, np.concatenate([np.diag(s[:4]), np.diag(s[4:])]), atol=1e-6)


def test_sums_a_strided_block_without_identity():
    out, _ = assert_rewrites_equivalently(load_case("reparameterize/strided_no_identity"), Reparameterize())
    conv = only(out, "Conv")
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    assert attr(conv, "strides") == [2, 2] and constant(out, conv.input[1]).shape == (16, 8, 3, 3)


def test_places_a_1x1_at_the_first_tap_of_an_asymmetrically_padded_kernel():
    model = load_case("reparameterize/asymmetric_pads")
    out, _ = assert_rewrites_equivalently(model, Reparameterize())
    conv = only(out, "Conv")
    assert attr(conv, "pads") == [0, 0, 1, 1]
    weight, w3 = constant(out, conv.input[1]), constant(model, "w3")
    np.testing.assert_allclose(weight[:, :, 0, 0], w3[:, :, 0, 0] + constant(model, "w1")[:, :, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(weight[:, :, 1:, :], w3[:, :, 1:, :])


def test_keeps_the_dilation_of_a_dilated_kernel_beside_a_1x1_and_x():
    out, _ = assert_rewrites_equivalently(load_case("reparameterize/dilated_block"), Reparameterize())
    conv = only(out, "Conv")
    assert op_counts(out) == {"Conv": 1}
    assert attr(conv, "dilations") == [2, 2] and attr(conv, "pads") == [2, 2, 2, 2] and attr(conv, "kernel_shape") == [3, 3]


def test_folds_the_batchnorm_after_each_branch():
    # Canonicalization would fold each Conv's BatchNormalization first (onnxsim's fuse_bn_into_conv).
    out, record = assert_rewrites_equivalently(load_case("reparameterize/branch_batchnorms"), Reparameterize(), canonicalize=False)
    assert op_counts(out) == {"Conv": 1}
    assert record.counters["batchnorms_folded"] == 2 and record.counters["identity_branches"] == 1


def test_sums_a_1d_block():
    out, _ = assert_rewrites_equivalently(load_case("reparameterize/conv1d_block"), Reparameterize())
    assert op_counts(out) == {"Conv": 1} and attr(only(out, "Conv"), "pads") == [1, 1]


def test_adds_a_summand_from_elsewhere_after_the_merged_conv():
    out, record = assert_rewrites_equivalently(load_case("reparameterize/residual_beside_block"), Reparameterize())
    assert op_counts(out) == {"Conv": 1, "Add": 1}
    add = only(out, "Add")
    assert add.output[0] == "y" and set(add.input) == {only(out, "Conv").output[0], "r"}
    assert record.details[0]["summands_kept"] == 1


def test_a_sum_that_is_a_graph_output_becomes_the_conv_and_the_add_after_it_stays():
    out, _ = assert_rewrites_equivalently(load_case("reparameterize/inner_sum_is_graph_output"), Reparameterize())
    assert op_counts(out) == {"Conv": 1, "BatchNormalization": 1, "Add": 1}
    assert only(out, "Conv").output[0] == "inner" and [o.name for o in out.graph.output] == ["inner", "y"]
    assert_unchanged(out, Reparameterize(), reason=READ_ELSEWHERE)  # the merged Conv's output is a graph output


def test_a_second_run_changes_nothing():
    out, _ = assert_rewrites_equivalently(load_case("reparameterize/mobileone_depthwise"), Reparameterize())
    assert assert_unchanged(out, Reparameterize()).sites_found == 0


def test_runs_in_all_after_fc_to_conv_and_before_merge_convs():
    order = default_order()
    assert order.index("fc-to-conv") < order.index("reparameterize") < order.index("merge-convs")


# -- must not touch --------------------------------------------------------------------------------


@pytest.mark.parametrize("case, reason", [
    ("different_strides", "branches differ in strides or group"),
    ("branch_read_elsewhere", READ_ELSEWHERE),
    ("branch_is_graph_output", READ_ELSEWHERE),
    ("runtime_weight", "weight is not a constant"),
    ("quantized_weight", "quantized weight (Q/DQ)"),
    ("broadcasting_add", BROADCAST),
    ("identity_channel_mismatch", BROADCAST),
    ("different_inputs", DIFFERENT_INPUTS),
    ("identity_beside_strided", "identity branch beside a strided Conv"),
    ("flops_grow", FLOPS_GROW),
    ("fp16_overflow", "summed weights overflow the dtype"),
    ("auto_pad_same", "auto_pad is not NOTSET"),
    ("runtime_batchnorm", "BatchNormalization: scale, bias, mean or variance is not a constant"),
    ("bfloat16_block", "identity branch: dtype is not float32 or float16"),
    ("off_lattice", "kernels do not lie on one tap lattice"),
])
def test_leaves_a_sum_alone_and_counts_why(case, reason):
    record = assert_unchanged(load_case(f"reparameterize/{case}"), Reparameterize(), reason=reason)
    assert sum(record.skipped.values()) == 1


def test_declines_branches_whose_pads_give_different_output_sizes():
    # Unreachable through a checked graph, whose Add operands have one shape; the geometry is
    # checked on its own all the same, since the merged pads are derived from it.
    x = gs.Variable("x", dtype=np.float32, shape=[1, 4, 6, 6])
    def branch(kernel: int, pad: int) -> Branch:
        return Branch((), np.dtype(np.float32), np.zeros((8, 4, kernel, kernel)), np.zeros(8), (pad, pad), (pad, pad), (1, 1), (1, 1), 1)
    assert branches_incompatible(x, [branch(3, 1), branch(1, 0)]) is None
    assert branches_incompatible(x, [branch(3, 1), branch(1, 1)]) == "branch pads give different output sizes"


# -- real architectures ----------------------------------------------------------------------------


def rewrites_every_block(name: str, spec: str, convs_after: int) -> onnx.ModelProto:
    model = load_zoo_model(name)
    out, report = Pipeline.from_spec(spec).run(model)
    assert report.final is not None and report.final.passed, report.final
    [record] = [p for p in report.passes if p.name == "reparameterize"]
    assert record.rolled_back == [] and record.skipped == {}
    assert op_counts(out)["Conv"] == convs_after and "Add" not in op_counts(out) and "Split" not in op_counts(out)
    assert "BatchNormalization" not in op_counts(out)
    assert all(site["flops_after"] <= site["flops_before"] for site in record.details)
    assert flops(out) <= flops(model)
    return out


@pytest.mark.zoo
def test_turns_every_repvgg_a0_block_into_one_conv():
    # 22 blocks of 3x3 + 1x1 (+ an identity BatchNormalization in 17): 44 Convs, 39 Adds.
    model = load_zoo_model("repvgg_a0")
    assert op_counts(model)["Conv"] == 44 and op_counts(model)["Add"] == 39
    rewrites_every_block("repvgg_a0", "simplify,reparameterize", convs_after=22)


@pytest.mark.zoo
def test_all_keeps_repvgg_a0_below_its_training_form_flops():
    # merge-convs alone made each block a double-width 3x3 + Split + Add: 3.03 -> 5.44 GFLOPs.
    out = rewrites_every_block("repvgg_a0", "all", convs_after=22 + 1)  # + the classifier, as a Conv
    assert flops(out) < 2.75e9


@pytest.mark.zoo
def test_turns_every_mobileone_s0_block_into_one_conv():
    # 43 blocks: the stem, then depthwise 3x3 and pointwise 1x1 blocks of 4 kxk branches each, a
    # 1x1 scale branch beside each 3x3, and an identity BatchNormalization in 35 of them.
    model = load_zoo_model("mobileone_s0")
    assert op_counts(model)["Conv"] == 191
    out = rewrites_every_block("mobileone_s0", "all", convs_after=43 + 1)
    assert flops(out) < 0.6e9
