"""remove-identity-scale: what it removes, what it must keep, and that graph outputs keep their names."""

import itertools

import onnx
import pytest

from graphopt import modelio
from graphopt.testing import assert_equivalent
from passes.remove_identity_scale import RemoveIdentityScale
from tests.fixtures.cases import load_case
from tests.fixtures.zoo import load_zoo_model
from tests.helpers import assert_rewrites_equivalently, assert_unchanged, op_counts, run_pass

# fixture -> the op types the pass must remove from it
REMOVED = {
    "identity_between_conv_and_relu": ["Identity"],
    "mul_by_channel_ones": ["Mul"],
    "scalar_one_times_x": ["Mul"],
    "div_by_one": ["Div"],
    "zero_plus_x": ["Add"],
    "x_minus_zero_from_constant_node": ["Sub", "Constant"],
    "add_zero_through_identity": ["Add", "Identity"],
    "int64_plus_zero": ["Add"],
    "float16_times_one": ["Mul"],
    "dropout_inference": ["Dropout"],
    "dropout_training_mode_false": ["Dropout"],
    "batchnorm_exact_identity": ["BatchNormalization"],
    "pad_zero_reflect": ["Pad"],
    "reshape_to_same_shape": ["Reshape", "Reshape"],
    "expand_to_own_shape": ["Expand"],
    "transpose_identity_perm": ["Transpose"],
    "cast_to_same_type": ["Cast"],
    "slice_full_range": ["Slice"],
}

# fixture -> the reason it must be left alone
KEPT = {
    "one_over_x": "Div has no constant right operand",
    "zero_minus_x": "Sub has no constant right operand",
    "mul_by_almost_one": "Mul constant is not all 1s",
    "mul_by_ones_that_broadcast": "constant would broadcast the input to a larger shape (or the input dim is not static)",
    "mul_by_ones_of_higher_rank": "constant would broadcast the input to a higher rank",
    "mul_by_ones_over_dynamic_dim": "constant would broadcast the input to a larger shape (or the input dim is not static)",
    "mul_input_of_unknown_rank": "input rank unknown",
    "dropout_mask_used": "Dropout mask output is used",
    "dropout_training": "Dropout is in training mode",
    "batchnorm_default_init": "BatchNormalization scale/sqrt(var+eps) is not exactly 1",
    "pad_nonzero": "Pad has nonzero pads",
    "reshape_changes_shape": "Reshape target is not provably the input's shape",
    "reshape_infers_next_to_dynamic_dim": "Reshape -1 is not provably the input's dim",
    "transpose_swaps_axes": "Transpose permutation is not the identity",
    "cast_to_float16": "Cast changes the dtype",
    "slice_drops_a_row": "Slice does not end at the dim (INT64_MAX for a dim not known statically)",
    "slice_int32_max_on_dynamic_dim": "Slice does not end at the dim (INT64_MAX for a dim not known statically)",
    "graph_input_to_graph_output": "graph output would lose its name: its value is a graph input or a constant",
    "initializer_to_graph_output": "graph output would lose its name: its value is a graph input or a constant",
    "identity_read_in_subgraph": "output is read inside a subgraph",
}


def case(name: str) -> onnx.ModelProto:
    return load_case(f"remove_identity_scale/{name}")


# The pass on its own: most of these identities are also what canonicalization (onnxsim) removes,
# so the tests of the pass's own proofs run it without canonicalization. The pass is what removes
# them where onnxsim cannot run (custom-domain ops, models over 2 GB).
ALONE = {"canonicalize": False}


def producer_of(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


@pytest.mark.parametrize("name", REMOVED)
def test_removes_the_node_that_computes_the_identity(name):
    model = case(name)
    out, record = assert_rewrites_equivalently(model, RemoveIdentityScale(), **ALONE)
    expected = op_counts(model)
    expected.subtract(REMOVED[name])
    assert op_counts(out) == +expected
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]


@pytest.mark.parametrize("name", KEPT)
def test_leaves_what_is_not_provably_the_identity_alone(name):
    assert_unchanged(case(name), RemoveIdentityScale(), reason=KEPT[name], **ALONE)


def test_relu_reads_the_conv_once_the_identity_between_them_is_gone():
    out, _ = assert_rewrites_equivalently(case("identity_between_conv_and_relu"), RemoveIdentityScale(), **ALONE)
    assert producer_of(out, "y").input == ["c"]


def test_conv_reads_its_initializer_directly_instead_of_through_identity():
    out, record = assert_rewrites_equivalently(case("identity_weights"), RemoveIdentityScale(), **ALONE)
    [conv] = out.graph.node
    assert conv.input[1] == "w"
    assert record.counters == {"removed_Identity": 1}


def test_graph_output_keeps_its_name_dtype_and_shape():
    model = case("identity_writes_graph_output")
    out, _ = assert_rewrites_equivalently(model, RemoveIdentityScale(), **ALONE)
    assert producer_of(out, "y").op_type == "Relu"
    assert out.graph.output == model.graph.output


def test_a_chain_into_a_graph_output_is_removable_in_any_subset_and_order():
    """The manager may rewrite any subset of sites while bisecting; each must stay valid."""
    model = modelio.infer_shapes(case("identity_chain_to_graph_output"))  # as the manager hands it over
    sites = ["identity_a", "mul_b"]
    for size in range(1, len(sites) + 1):
        for subset in itertools.permutations(sites, size):
            result = RemoveIdentityScale().apply(model, only=list(subset))
            assert sorted(result.applied) == sorted(subset)
            onnx.checker.check_model(result.model)
            assert [o.name for o in result.model.graph.output] == ["y", "z"]
            assert_equivalent(model, result.model)


def test_of_two_graph_outputs_sharing_a_producer_only_one_takes_it_over():
    model = case("two_outputs_share_a_producer")
    out, record = assert_rewrites_equivalently(model, RemoveIdentityScale(), **ALONE)
    assert record.sites_applied == ["identity_1"]
    assert record.skipped == {"graph output: another removed node's graph output already takes the same producer": 1}
    assert producer_of(out, "y1").op_type == "Relu"
    assert producer_of(out, "y2").op_type == "Identity"


@pytest.mark.zoo
def test_raw_densenet121_loses_its_identity_routing_but_keeps_its_batchnorms():
    model = load_zoo_model("densenet121")
    out, record = assert_rewrites_equivalently(model, RemoveIdentityScale(), **ALONE)
    assert record.counters == {"removed_Identity": 245}
    # Inline BN parameters are torch's defaults (var 1, eps 1e-5): they scale by 1/sqrt(1+1e-5).
    assert record.skipped == {"BatchNormalization scale/sqrt(var+eps) is not exactly 1": 10,
                              "BatchNormalization mean or bias is not 0": 52}
    assert op_counts(out)["BatchNormalization"] == 62
    assert "Identity" not in op_counts(out)


@pytest.mark.zoo
def test_raw_vit_loses_identity_routing_zero_biases_and_no_op_casts():
    model = load_zoo_model("vit_tiny_patch16_224")
    out, record = assert_rewrites_equivalently(model, RemoveIdentityScale(), **ALONE)
    # The zero attention-projection biases are shared through Identity; Cast float->float and a
    # Reshape of a [3] shape tensor to [-1] sit in the exported shape arithmetic.
    assert record.counters == {"removed_Identity": 94, "removed_Add": 24, "removed_Cast": 12, "removed_Reshape": 1}
    assert "Identity" not in op_counts(out)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["densenet121", "vit_tiny_patch16_224"])
def test_finds_nothing_left_to_remove_in_the_canonical_form(name):
    _, record, _ = run_pass(load_zoo_model(name), RemoveIdentityScale(), verify=False)
    assert record.status == "unchanged"


@pytest.mark.parametrize("name", ["dropout_inference", "slice_full_range"])
def test_removes_what_canonicalization_leaves(name):
    model = case(name)
    out, record = assert_rewrites_equivalently(model, RemoveIdentityScale())
    assert len(out.graph.node) == len(model.graph.node) - 1
