"""Models from every exporter pass through `all` intact: what passes must not break or drop."""

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from graphopt import ModelError, optimize
from graphopt.testing import assert_equivalent
from tests.fixtures.cases import case_path, load_case

GRAPHOPT = str(Path(sys.executable).parent / "graphopt")


def nodes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def test_custom_domain_ops_cannot_be_verified_and_say_so():
    with pytest.raises(ModelError, match="cannot verify: ONNX Runtime cannot run the input model .*--no-verify"):
        optimize(load_case("intact/custom_domain_op"))


def test_custom_domain_ops_pass_through_unverified_runs_untouched():
    model = load_case("intact/custom_domain_op")
    out, report = optimize(model, verify=False)
    [plugin] = [n for n in out.graph.node if n.domain == "com.example"]
    assert plugin == next(n for n in model.graph.node if n.domain == "com.example")
    assert {o.domain: o.version for o in out.opset_import}["com.example"] == 1
    assert "simplify skipped: custom-domain ops (com.example)" in " ".join(report.passes[0].warnings)


@pytest.mark.parametrize("name", ["if_subgraph", "loop_body"])
def test_control_flow_models_stay_equivalent(name):
    model = load_case(f"intact/{name}")
    out, report = optimize(model)
    assert report.equivalent, [(p.name, p.rolled_back) for p in report.rolled_back]
    assert_equivalent(model, out)


def branch_nodes(node: onnx.NodeProto) -> list[tuple]:
    return [(a.name, [(n.op_type, list(n.input), list(n.output)) for n in a.g.node]) for a in node.attribute]


def test_graphopts_own_passes_leave_subgraphs_and_the_tensors_they_read_alone():
    model = load_case("intact/if_subgraph")
    out, report = optimize(model, "all", skip=["simplify"])  # onnxsim rewrites subgraphs itself, verified
    assert report.equivalent
    [original_if], [new_if] = nodes(model, "If"), nodes(out, "If")
    assert branch_nodes(new_if) == branch_nodes(original_if)  # value_info may gain shapes; nodes may not change
    # the branches read `scaled` (x * 1) from the outer scope: it must still be computed
    assert any("scaled" in n.output for n in out.graph.node)


def test_symbolic_dims_stay_symbolic_and_verify_at_other_sizes():
    model = load_case("intact/symbolic_dims")
    out, report = optimize(model, input_shapes={"x": (2, 3, 12, 10)})
    assert report.equivalent
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    assert_equivalent(model, out, input_shapes={"x": (3, 3, 7, 9)})


@pytest.mark.parametrize("name", ["fp16_weights", "bf16_cast"])
def test_low_precision_models_keep_their_dtypes(name):
    model = load_case(f"intact/{name}")
    out, report = optimize(model)
    assert report.equivalent
    assert [o.type for o in out.graph.output] == [o.type for o in model.graph.output]
    assert [i.type for i in out.graph.input] == [i.type for i in model.graph.input]


def test_fp16_models_are_judged_with_fp16_tolerances():
    _, report = optimize(load_case("intact/fp16_weights"))
    assert report.rtol == 1e-2


def test_no_rewrite_separates_a_qdq_pair_from_the_conv_it_quantizes():
    out, report = optimize(load_case("intact/qdq_conv"))
    assert report.equivalent
    producers = {o: n for n in out.graph.node for o in n.output}
    for conv in nodes(out, "Conv"):
        data, weight = producers[conv.input[0]], producers[conv.input[1]]
        assert data.op_type == "DequantizeLinear" and producers[data.input[0]].op_type == "QuantizeLinear"
        assert weight.op_type == "DequantizeLinear" and weight.input[0] in {i.name for i in out.graph.initializer}


def test_models_with_external_data_load_and_save(tmp_path):
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(onnx.load(str(case_path("core/conv_stack"))), str(source), save_as_external_data=True,
                    location="model.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in source.parent.iterdir()}
    out = tmp_path / "out.onnx"
    result = subprocess.run([GRAPHOPT, "run", str(source), "-o", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in source.parent.iterdir()} == before
    assert_equivalent(str(source), str(out))
