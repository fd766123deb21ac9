"""The equivalence check: what it accepts, and the leniencies of plain polygraphy it closes."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphopt import optimize
from graphopt.errors import InputShapeError
from graphopt.verify import FP32_TOLERANCE, Tolerance, compare_arrays, parse_input_shapes
from graphopt.testing import assert_equivalent, check_equivalent
from tests.fixtures.cases import load_case
from tests.fixtures.zoo import load_zoo_model

TOL = FP32_TOLERANCE


def test_identical_arrays_pass():
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    assert compare_arrays("y", x, x.copy(), TOL)


def test_errors_are_judged_relative_to_the_output_scale():
    big = np.full((4,), 1000.0, np.float32)
    tiny = np.full((4,), 1e-5, np.float32)
    # the same 1% change fails at both scales; an absolute 1e-5 tolerance would pass the tiny one
    assert not compare_arrays("big", big, big * 1.01, TOL)
    assert not compare_arrays("tiny", tiny, tiny * 1.01, TOL)
    # and float32 rounding noise passes at both
    assert compare_arrays("big", big, np.nextafter(big, np.inf), TOL)
    assert compare_arrays("tiny", tiny, np.nextafter(tiny, np.inf), TOL)


def test_nan_never_equals_a_finite_value():
    ref = np.array([1.0, 2.0], np.float32)
    verdict = compare_arrays("y", ref, np.array([1.0, np.nan], np.float32), Tolerance(atol=1e9, rtol=1e9))
    assert not verdict and "NaN/Inf differ" in verdict.reason


def test_inf_must_match_sign_and_place():
    ref = np.array([np.inf, 1.0], np.float32)
    assert compare_arrays("y", ref, ref.copy(), TOL)
    assert not compare_arrays("y", ref, np.array([-np.inf, 1.0], np.float32), TOL)


def test_shape_and_dtype_changes_fail_whatever_the_values():
    ref = np.zeros((1, 4), np.float32)
    assert "shape changed" in compare_arrays("y", ref, np.zeros((4,), np.float32), TOL).reason
    assert "dtype changed" in compare_arrays("y", ref, np.zeros((1, 4), np.float16), TOL).reason


def test_integer_outputs_must_match_exactly():
    ref = np.array([3, 1], np.int64)
    assert not compare_arrays("argmax", ref, np.array([3, 2], np.int64), Tolerance(atol=10, rtol=10))


def scale_one_filter(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """A copy of `model` with filter 0 of its last Conv scaled by `factor`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    conv = [n for n in out.graph.node if n.op_type == "Conv"][-1]
    init = next(i for i in out.graph.initializer if i.name == conv.input[1])
    weight = numpy_helper.to_array(init).copy()
    weight[0] *= factor
    init.CopyFrom(numpy_helper.from_array(weight, init.name))
    return out


def test_outputs_of_about_1e_5_are_still_checked():
    model = load_case("core/tiny_outputs")
    assert not check_equivalent(model, scale_one_filter(model, 1.02))


@pytest.mark.zoo
def test_defaults_pass_real_fp32_rewrites_of_resnet50_and_fail_one_filter_scaled_by_1_02():
    model = load_zoo_model("resnet50")
    simplified, report = optimize(model, "simplify")
    assert report.passes[0].status == "changed" and report.final.passed
    verdict = check_equivalent(simplified, scale_one_filter(simplified, 1.02))
    assert not verdict, verdict.worst.describe()


def test_assert_equivalent_names_the_worst_output():
    model = load_case("core/conv_stack")
    with pytest.raises(AssertionError, match=r"y: max abs error 1\.\d+, relative error 0\.5 \(output scale \d"):
        assert_equivalent(model, scale_one_filter(model, 1.5))


def test_input_shapes_parse_and_reject_nonsense():
    assert parse_input_shapes(["images:1x3x224x224", "ids:2x7"]) == {"images": (1, 3, 224, 224), "ids": (2, 7)}
    for bad in ["images", "images:", ":1x3", "images:1xx3", "images:axb", "images:-1x3"]:
        with pytest.raises(InputShapeError, match="bad --input-shape"):
            parse_input_shapes([bad])


def test_an_input_shape_for_a_missing_input_is_an_error():
    with pytest.raises(InputShapeError, match="not an input; inputs: x"):
        check_equivalent(load_case("core/conv_stack"), load_case("core/conv_stack"), input_shapes={"images": (1, 3)})


def test_tensorrt_backend_runs_when_tensorrt_is_installed():
    pytest.importorskip("tensorrt", reason="tensorrt is not installed here (pip install graphopt[trt] on a GPU machine)")
    model = load_case("core/conv_stack")
    verdict = check_equivalent(model, model, backend="tensorrt")
    assert verdict.backend == "tensorrt" and verdict.passed


# -- several input sets: what one sample misses ------------------------------------------------------

from graphopt.errors import InputDataError, OptionError  # noqa: E402
from graphopt.inputs import InputSet, default_input_sets, graph_inputs, integer_ranges  # noqa: E402
from graphopt.verify import Verifier, ort_threads  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from tests.fixtures.builders import make_model, node, rand  # noqa: E402

WRONG_REWRITES = [
    ("verify/image_conv", "verify/image_conv_clipped"),  # Clip(x, -1, 1) in front: wrong on images
    ("verify/centered_over_batch", "verify/zero_over_batch"),  # c - mean over batch vs c - c: wrong at batch > 1
]


@pytest.mark.parametrize(("model", "wrong"), WRONG_REWRITES)
def test_default_input_sets_catch_what_one_sample_in_minus_one_to_one_at_batch_1_misses(model, wrong):
    reference, candidate = load_case(model), load_case(wrong)
    [first, *_] = default_input_sets(reference)
    assert check_equivalent_on([first], reference, candidate)  # the sample verification drew before
    assert not check_equivalent(reference, candidate)


def check_equivalent_on(input_sets, reference, candidate):
    verifier = Verifier(reference, input_sets=input_sets)
    verdict, _ = verifier.check(verifier.reference(reference), candidate)
    return verdict


def test_simplify_rewriting_argmax_of_log_to_argmax_is_rolled_back():
    model = load_case("verify/argmax_of_log")
    out, report = optimize(model, "simplify")
    [record] = report.passes
    assert record.status == "rolled-back" and "values differ" in record.rolled_back[0].reason
    assert [n.op_type for n in out.graph.node] == ["Log", "ArgMax"]


def test_default_sets_use_several_seeds_distributions_and_dynamic_sizes():
    sets = default_input_sets(load_case("core/conv_stack"), seed=5)
    assert [s.seed for s in sets] == [5, 6, 7]
    assert [s.distribution for s in sets] == ["uniform[-1, 1]", "normal(0, 1)", "uniform[0, 255]"]
    assert [s.shapes["x"][0] for s in sets] == [1, 2, 1]
    images = sets[2].feed["x"]
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() > 200


def two_inputs_sharing_dims():
    return make_model([node("Add", ["ids", "mask"], ["y"])], {"ids": ["batch", "sequence"], "mask": ["batch", "sequence"]}, ["y"])


def test_a_named_dim_takes_one_value_in_every_input():
    for input_set in default_input_sets(two_inputs_sharing_dims()):
        assert input_set.feed["ids"].shape == input_set.feed["mask"].shape


def test_dims_can_be_set_by_name_or_through_one_inputs_shape():
    by_name = default_input_sets(two_inputs_sharing_dims(), {"batch": 3, "sequence": 64})
    through_ids = default_input_sets(two_inputs_sharing_dims(), {"ids": (3, 64)})
    for input_set in by_name + through_ids:
        assert input_set.shapes == {"ids": [3, 64], "mask": [3, 64]}


def test_input_shapes_parse_named_dims():
    assert parse_input_shapes(["batch=4,sequence=64", "ids:2x7"]) == {"batch": 4, "sequence": 64, "ids": (2, 7)}


@pytest.mark.parametrize(("shapes", "message"), [
    ({"x": (1, 4, 16, 16)}, "dimension 1 is 3 in the model, not 4"),
    ({"channels": 4}, "which no input has; named dimensions: batch"),
    ({"x": (1, 3)}, "has rank 2"),
])
def test_input_shapes_that_contradict_the_model_are_refused(shapes, message):
    with pytest.raises(InputShapeError, match=message):
        default_input_sets(load_case("core/conv_stack"), shapes)


@pytest.mark.parametrize("spec", ["x:0x3x16x16", "batch=0"])
def test_a_zero_size_dim_is_refused(spec):
    with pytest.raises(InputShapeError, match="zero-size dimension makes every comparison vacuous"):
        parse_input_shapes([spec])


def test_a_feed_too_large_to_hold_is_refused_before_it_is_drawn():
    with pytest.raises(InputDataError, match=r"would take .* GB .*largest x: 2x3x65536x65536 float.*limit is 4 GB"):
        default_input_sets(make_model([node("Relu", ["x"], ["y"])], {"x": ["batch", 3, "h", "w"]}, ["y"]), {"h": 65536, "w": 65536})


def test_discrete_outputs_are_compared_over_more_rows_and_seeds():
    sets = default_input_sets(load_case("verify/argmax_of_log"))
    assert len(sets) > len(default_input_sets(load_case("verify/centered_over_batch")))
    assert sum(s.shapes["x"][0] for s in sets) >= 12


def gather_model(vocabulary: int):
    return make_model([node("Gather", ["table", "ids"], ["y"], axis=0)], {"ids": ["batch", "sequence"]}, ["y"],
                      {"table": rand(vocabulary, 4, seed=14)}, input_dtype=TensorProto.INT64)


def test_indices_are_drawn_over_the_whole_range_the_graph_allows():
    model = gather_model(50)
    assert integer_ranges(model, graph_inputs(model)) == {"ids": (-50, 49)}
    ids = np.concatenate([s.feed["ids"].ravel() for s in default_input_sets(model, {"sequence": 64})])
    assert ids.min() < -25 and ids.max() > 25


def test_an_axis_input_is_drawn_within_the_rank():
    graph = helper.make_graph([helper.make_node("CumSum", ["x", "axis"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4]), helper.make_tensor_value_info("axis", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert integer_ranges(model, graph_inputs(model)) == {"axis": (-3, 2)}


# -- every dtype ONNX Runtime runs ---------------------------------------------------------------


def identity_of(elem_type: int, opset: int = 21):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", elem_type, ["batch", 5])],
                              [helper.make_tensor_value_info("y", elem_type, ["batch", 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def dequantize_of(elem_type: int):
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["x", "scale"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", elem_type, ["batch", 6])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
                              [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


SAMPLED_TYPES = {
    "bfloat16": identity_of(TensorProto.BFLOAT16),
    "float8e4m3fn": identity_of(TensorProto.FLOAT8E4M3FN),
    "float8e4m3fnuz": identity_of(TensorProto.FLOAT8E4M3FNUZ),
    "float8e5m2": identity_of(TensorProto.FLOAT8E5M2),
    "float8e5m2fnuz": identity_of(TensorProto.FLOAT8E5M2FNUZ),
    "int4": dequantize_of(TensorProto.INT4),
    "uint4": dequantize_of(TensorProto.UINT4),
    "string": identity_of(TensorProto.STRING),
    "bool": identity_of(TensorProto.BOOL),
    "float16": identity_of(TensorProto.FLOAT16),
    "uint64": identity_of(TensorProto.UINT64),
}


@pytest.mark.parametrize("dtype", list(SAMPLED_TYPES))
def test_every_dtype_onnx_runtime_runs_is_sampled_and_verified(dtype):
    model = SAMPLED_TYPES[dtype]
    verdict = check_equivalent(model, model)
    assert verdict.passed, verdict.worst.describe()


def test_bfloat16_and_float8_outputs_are_judged_as_floats_not_bit_for_bit():
    import ml_dtypes

    from graphopt.verify import FP16_TOLERANCE

    values = np.linspace(-3, 3, 50, dtype=np.float32)
    rounded_differently = (values + 0.01).astype(ml_dtypes.bfloat16)  # some values move by one bfloat16 step
    assert not np.array_equal(rounded_differently, values.astype(ml_dtypes.bfloat16))
    assert compare_arrays("y", values.astype(ml_dtypes.bfloat16), rounded_differently, FP16_TOLERANCE)
    for dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn):
        changed = compare_arrays("y", values.astype(dtype), (values * 1.5).astype(dtype), FP16_TOLERANCE)
        assert not changed and changed.reason is None and changed.max_rel_err > 0.1


def test_an_input_that_is_not_a_tensor_is_refused_with_the_way_out():
    graph = helper.make_graph([helper.make_node("SequenceLength", ["s"], ["n"])], "g",
                              [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("n", TensorProto.INT64, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputDataError, match="input s is a sequence .*--load-inputs or --data-loader-script.*--no-verify"):
        default_input_sets(model)


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tolerance", [dict(atol=float("nan"), rtol=0.0), dict(atol=0.0, rtol=-1e-5), dict(atol=float("inf"), rtol=0.0)])
def test_a_tolerance_must_be_finite_and_not_negative(tolerance):
    with pytest.raises(OptionError, match="a tolerance must be a finite number >= 0"):
        Tolerance(**tolerance)


def test_seed_must_be_a_non_negative_integer():
    with pytest.raises(InputDataError, match="--seed -1"):
        default_input_sets(load_case("core/conv_stack"), seed=-1)


def test_ort_threads_are_capped_at_the_cores(monkeypatch):
    import os

    monkeypatch.setenv("GRAPHOPT_ORT_THREADS", "100000")
    assert ort_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("GRAPHOPT_ORT_THREADS", "many")
    with pytest.raises(OptionError, match="GRAPHOPT_ORT_THREADS=many"):
        ort_threads()


def test_the_users_sets_replace_the_seeded_ones():
    model = load_case("core/conv_stack")
    mine = InputSet("mine", {"x": np.full((3, 3, 16, 16), 7.0, np.float32)})
    verifier = Verifier(model, input_sets=[mine])
    assert verifier.input_sets == [mine] and verifier.reference(model)[0]["y"].shape[0] == 3


# -- errors within an input set's fp32 sensitivity ---------------------------------------------------


def fast_sine(kind: str):
    """y = Sin(x * 10000): one rounding step of x moves y by about 1e-3, and so does computing x * 10000 as (x * 100) * 100."""
    if kind == "reference":
        return make_model([node("Mul", ["x", "k"], ["p"]), node("Sin", ["p"], ["y"])], {"x": ["batch", 64]}, ["y"],
                          {"k": np.array([10000.0], np.float32)})
    if kind == "exact":
        nodes = [node("Mul", ["x", "h"], ["q"]), node("Mul", ["q", "h"], ["p"]), node("Sin", ["p"], ["y"])]
        return make_model(nodes, {"x": ["batch", 64]}, ["y"], {"h": np.array([100.0], np.float32)})
    return make_model([node("Mul", ["x", "k"], ["p"]), node("Sin", ["p"], ["y"])], {"x": ["batch", 64]}, ["y"],
                      {"k": np.array([10001.0], np.float32)})


def test_an_exact_rewrite_within_the_inputs_fp32_sensitivity_passes_and_says_so():
    verdict = check_equivalent(fast_sine("reference"), fast_sine("exact"))
    assert verdict.passed and verdict.max_rel_err > FP32_TOLERANCE.rtol
    assert "within 10x this input set's fp32 sensitivity" in verdict.worst.describe()


def test_a_wrong_rewrite_beyond_the_inputs_fp32_sensitivity_still_fails():
    # lenient on [0, 255], where x * 10000 is rounded by 0.25; strict on the small inputs
    verdict = check_equivalent(fast_sine("reference"), fast_sine("wrong"))
    assert not verdict and "uniform[0, 255]" not in verdict.worst.input_set


def test_a_candidates_own_sensitivity_never_excuses_its_error():
    well_conditioned = make_model([node("Relu", ["x"], ["y"])], {"x": ["batch", 64]}, ["y"])
    cancelling = make_model([node("Relu", ["x"], ["r"]), node("Add", ["r", "big"], ["s"]), node("Sub", ["s", "big"], ["y"])],
                            {"x": ["batch", 64]}, ["y"], {"big": np.array([1e4], np.float32)})
    assert not check_equivalent(well_conditioned, cancelling)


@pytest.mark.zoo
def test_all_on_efficientnet_rolls_nothing_back_where_image_range_inputs_amplify_rounding():
    # Random weights fed [0, 255] grow EfficientNet's logits to 1e4-1e5: pad-channels' exact rewrite then differs by
    # 1.7e-5 of them, as much as one rounding step of the input moves them.
    _, report = optimize(load_zoo_model("efficientnet_b0"), "all")
    assert report.equivalent and not report.rolled_back, [(p.name, p.rolled_back) for p in report.rolled_back]


def test_the_sensitivity_probe_moves_every_float_weight_by_one_rounding_step():
    """Folding rewrites (BatchNorm into a float16 conv) round every weight anew: the sensitivity
    they are judged against moves the weights by one rounding step too, not only the inputs."""
    from graphopt.verify import weights_one_rounding_step_away
    from tests.fixtures.builders import make_model, node, rand

    model = make_model([node("Conv", ["x", "w"], ["y"])], {"x": [1, 4, 5, 5]}, ["y"],
                       {"w": rand(8, 4, 3, 3, seed=1).astype(np.float16)}, input_dtype=onnx.TensorProto.FLOAT16)
    moved = weights_one_rounding_step_away(model, np.random.default_rng(0))
    before, after = (numpy_helper.to_array(m.graph.initializer[0]) for m in (model, moved))
    assert after.dtype == np.float16
    assert np.array_equal(np.abs(after.astype(np.float64) - before), np.spacing(np.abs(before)).astype(np.float64))
