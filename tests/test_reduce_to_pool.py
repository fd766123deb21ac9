"""reduce-to-pool: spatial reductions become global or windowed pooling; the rest is left alone."""

import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt import Pipeline
from passes.reduce_to_pool import ReduceToPool
from passes.simplify import Simplify
from tests.fixtures.cases import load_case
from tests.fixtures.zoo import load_zoo_model
from tests.helpers import assert_rewrites_equivalently, assert_unchanged, op_counts

# fixture -> the ops it must end with
REWRITTEN = {
    "mean_over_hw": {"Relu": 1, "GlobalAveragePool": 1},
    "mean_with_axes_input_opset18": {"Relu": 1, "GlobalAveragePool": 1},
    "mean_over_dynamic_hw": {"Relu": 1, "GlobalAveragePool": 1},
    "mean_over_length_of_3d": {"Relu": 1, "GlobalAveragePool": 1},
    "max_over_dhw_of_5d": {"Relu": 1, "GlobalMaxPool": 1},
    "float16_mean_over_hw": {"Relu": 1, "GlobalAveragePool": 1},
    "max_over_negative_hw_axes_without_keepdims": {"Relu": 1, "GlobalMaxPool": 1, "Squeeze": 1},
    "mean_without_keepdims_opset12": {"Relu": 1, "GlobalAveragePool": 1, "Squeeze": 1},
    "mean_over_h_only": {"Relu": 1, "AveragePool": 1},
    "max_over_w_only_without_keepdims": {"Relu": 1, "MaxPool": 1, "Squeeze": 1},
    "squeeze_excite_block": {"GlobalAveragePool": 1, "Conv": 2, "Relu": 1, "Sigmoid": 1, "Mul": 1},
}

# fixture -> the reason it must be left alone
KEPT = {
    "mean_over_channels": "reduces the batch or channel axis",
    "mean_over_batch_and_hw": "reduces the batch or channel axis",
    "mean_without_axes": "no axes: reduces every axis, batch and channel included",
    "mean_with_empty_axes_as_noop": "empty axes with noop_with_empty_axes: a no-op, not a pooling",
    "mean_with_runtime_axes": "axes are not constant",
    "int32_max_over_hw": "not float32/float16 (ONNX pooling has no kernels for other types)",
    "mean_of_2d": "rank 2 input (pooling needs [N, C, spatial...] of rank 3-5)",
    "mean_over_hw_of_unknown_rank": "input rank unknown",
    "mean_over_dynamic_h_only": "reduces some spatial axes whose dims are not static",
    "mean_over_a_window_too_large_for_tensorrt": "pooling window of 100000 elements is over TensorRT's limit",
    "mean_read_in_subgraph": "output is read inside a subgraph",
}


def case(name: str) -> onnx.ModelProto:
    return load_case(f"reduce_to_pool/{name}")


def only_node(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    [found] = [n for n in model.graph.node if n.op_type == op_type]
    return found


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def initializer(model: onnx.ModelProto, name: str):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("name", REWRITTEN)
def test_rewrites_the_spatial_reduction_as_pooling(name):
    model = case(name)
    out, _ = assert_rewrites_equivalently(model, ReduceToPool())
    assert dict(op_counts(out)) == REWRITTEN[name]
    assert out.graph.output == model.graph.output


@pytest.mark.parametrize("name", KEPT)
def test_leaves_a_reduction_that_is_no_spatial_pooling_alone(name):
    # canonicalization would inline the If of mean_read_in_subgraph (its condition is constant)
    assert_unchanged(case(name), ReduceToPool(), reason=KEPT[name], canonicalize=name != "mean_read_in_subgraph")


def test_pooling_writes_the_reductions_output_tensor():
    out, _ = assert_rewrites_equivalently(case("mean_over_hw"), ReduceToPool())
    pool = only_node(out, "GlobalAveragePool")
    assert list(pool.input) == ["r"] and list(pool.output) == ["y"]


def test_reduction_over_h_pools_with_an_h_by_1_window():
    out, record = assert_rewrites_equivalently(case("mean_over_h_only"), ReduceToPool())
    assert attrs(only_node(out, "AveragePool")) == {"kernel_shape": [6, 1], "strides": [1, 1]}
    assert record.details == [{"node": "reduce", "pool": "AveragePool", "kernel": (6, 1), "keepdims": True}]


def test_without_keepdims_a_squeeze_drops_exactly_the_reduced_axes():
    out, _ = assert_rewrites_equivalently(case("max_over_w_only_without_keepdims"), ReduceToPool())
    assert attrs(only_node(out, "MaxPool")) == {"kernel_shape": [1, 5], "strides": [1, 1]}
    squeeze = only_node(out, "Squeeze")
    assert initializer(out, squeeze.input[1]).tolist() == [3]


def test_squeeze_takes_axes_as_an_attribute_before_opset_13():
    out, _ = assert_rewrites_equivalently(case("mean_without_keepdims_opset12"), ReduceToPool())
    squeeze = only_node(out, "Squeeze")
    assert len(squeeze.input) == 1 and attrs(squeeze) == {"axes": [2, 3]}


def test_keeps_partial_reductions_when_partial_is_off():
    assert_unchanged(case("mean_over_h_only"), ReduceToPool(partial=False),
                     reason="reduces only some spatial axes (partial=false)")


def test_leaves_reduce_sum_alone_by_default():
    record = assert_unchanged(case("sum_over_hw"), ReduceToPool())
    assert record.sites_found == 0


def test_with_sum_as_pool_rewrites_reduce_sum_as_average_times_count():
    out, _ = assert_rewrites_equivalently(case("sum_over_hw"), ReduceToPool(sum_as_pool=True))
    assert dict(op_counts(out)) == {"Relu": 1, "GlobalAveragePool": 1, "Mul": 1, "Squeeze": 1}
    mul = only_node(out, "Mul")
    assert initializer(out, mul.input[1]).tolist() == 6.0 * 5


def test_with_sum_as_pool_still_keeps_float16_sums():
    assert_unchanged(case("float16_sum_over_hw"), ReduceToPool(sum_as_pool=True),
                     reason="ReduceSum as pooling is float32 only")


def test_two_equal_reductions_end_as_one_pool_once_canonicalized():
    out, record = assert_rewrites_equivalently(case("two_means_without_keepdims"), ReduceToPool())
    assert record.counters == {"ReduceMean_to_GlobalAveragePool": 2}
    pool = only_node(out, "GlobalAveragePool")  # canonicalization merged the two equal pools
    squeezes = [n for n in out.graph.node if n.op_type == "Squeeze"]
    assert len(squeezes) in (1, 2) and all(n.input[0] == pool.output[0] for n in squeezes)


def test_a_reduction_beside_an_equal_global_pool_ends_as_that_pool_once_canonicalized():
    out, _ = assert_rewrites_equivalently(case("mean_beside_global_pool"), ReduceToPool())
    assert dict(op_counts(out)) == {"GlobalAveragePool": 1, "Relu": 1, "Sigmoid": 1}
    pool = only_node(out, "GlobalAveragePool")
    assert only_node(out, "Relu").input[0] == only_node(out, "Sigmoid").input[0] == pool.output[0]


def test_a_reduction_that_writes_a_graph_output_keeps_its_pool_and_an_equal_pool_merges_into_it():
    # Two equal pools would be merged by onnxsim when `all` runs again (tests/test_fuzz.py).
    model = case("mean_as_graph_output_beside_global_pool")
    out, _ = assert_rewrites_equivalently(model, ReduceToPool())
    assert dict(op_counts(out)) == {"GlobalAveragePool": 1, "Sigmoid": 1}
    assert [n.input[0] for n in out.graph.node if n.op_type == "Sigmoid"] == ["m"]
    assert out.graph.output == model.graph.output


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["se_block", "se_block_opset18"])
def test_squeeze_excite_block_squeezes_with_global_average_pool(name):
    model = Pipeline([Simplify()], verify=False).run(load_zoo_model(name))[0]
    out, record = assert_rewrites_equivalently(model, ReduceToPool())
    assert record.counters == {"ReduceMean_to_GlobalAveragePool": 1}
    assert "ReduceMean" not in op_counts(out)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small"])
def test_torchvision_squeeze_excite_already_exports_global_average_pool(name):
    _, report = Pipeline([Simplify(), ReduceToPool()]).run(load_zoo_model(name))
    assert report.passes[1].status == "unchanged" and report.passes[1].sites_found == 0
