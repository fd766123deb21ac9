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
    with pytest.raises(AssertionError, match=r"y: max abs error .* relative to output scale"):
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
