"""What a model declares about its tensors comes out of graphopt as the input declared it.

graphopt infers shapes for its passes and keeps them to itself: the graph inputs and outputs
keep their exact declarations (dtypes, dims, dim names, doc strings), and value_info appears
only where the input had it.
"""

import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import optimize
from graphopt.graphs import keep_declared_value_info
from graphopt.registry import default_order
from tests.fixtures.cases import load_case


def dims(info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("spec", ["all", *default_order()])
def test_outputs_and_inputs_come_out_declared_exactly_as_in_the_input(spec):
    model = load_case("declared/detector_outputs")
    out, report = optimize(model, spec)
    assert report.equivalent
    assert list(out.graph.output) == list(model.graph.output)
    assert list(out.graph.input) == list(model.graph.input)


def test_a_dim_name_inference_could_compute_stays_a_name():
    model = load_case("declared/detector_outputs")
    out, report = optimize(model, "all")
    assert [p.name for p in report.passes if p.changed] == ["simplify", "reduce-to-pool", "fc-to-conv", "merge-convs", "pad-channels"]
    assert dims(out.graph.output[0]) == ["batch", "Transposedetections_dim_1", 85]  # inference says 64


@pytest.mark.parametrize("spec", ["all", *default_order()])
def test_a_model_without_value_info_comes_out_without_value_info(spec):
    out, _ = optimize(load_case("declared/detector_outputs"), spec)
    assert not out.graph.value_info


def test_value_info_the_input_declared_is_kept_as_declared_and_nothing_is_added():
    model = load_case("declared/detector_with_value_info")
    out, _ = optimize(model, "all")
    assert list(out.graph.value_info) == list(model.graph.value_info)


def test_a_declaration_that_no_longer_fits_its_tensor_gives_way_to_the_inferred_type():
    template = helper.make_model(helper.make_graph([], "g", [], [], value_info=[
        helper.make_tensor_value_info("padded", TensorProto.FLOAT, ["batch", 17, 4, 4]),
        helper.make_tensor_value_info("renamed_dims", TensorProto.FLOAT, ["batch", "c", 4, 4]),
        helper.make_tensor_value_info("removed", TensorProto.FLOAT, [1])]))
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["padded"]), helper.make_node("Relu", ["x"], ["renamed_dims"])], "g", [], [],
        value_info=[helper.make_tensor_value_info("padded", TensorProto.FLOAT, ["batch", 24, 4, 4]),
                    helper.make_tensor_value_info("renamed_dims", TensorProto.FLOAT, ["unk__0", 16, 4, 4]),
                    helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1])]))
    keep_declared_value_info(model, template)
    assert {vi.name: dims(vi) for vi in model.graph.value_info} == {"padded": ["batch", 24, 4, 4], "renamed_dims": ["batch", "c", 4, 4]}
