"""The pass manager: ordering, checking, verification, rollback by site, reports."""

import json

import numpy as np
import onnx
import pytest

from graphopt import EquivalenceError, Pipeline, optimize
from graphopt.spec import parse_spec
from graphopt.testing import assert_equivalent
from tests.fixtures.builders import make_model, node, rand
from tests.fixtures.cases import load_case


def conv_names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Conv"]


def test_passes_run_in_the_order_of_the_spec(plugin_installed):
    _, report = optimize(load_case("core/conv_stack"), "reweight-convs,simplify", canonicalize=False)
    assert [p.name for p in report.passes] == ["reweight-convs", "simplify"]


def test_a_wrong_pass_is_caught_and_rolled_back(plugin_installed):
    model = load_case("core/conv_stack")
    out, report = optimize(model, "scale-filter", canonicalize=False)
    [record] = report.passes
    assert record.status == "rolled-back"
    assert sorted(site.site for site in record.rolled_back) == ["conv1", "conv2", "conv3"]
    assert all(site.output == "y" and site.max_rel_err > 1e-4 for site in record.rolled_back)
    assert not report.equivalent
    assert_equivalent(model, out)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]


def test_a_pass_wrong_at_one_site_loses_only_that_site(plugin_installed):
    model = load_case("core/conv_stack")
    out, report = optimize(model, "reweight-convs(wrong-at=conv2)", canonicalize=False)
    [record] = report.passes
    assert record.status == "partially-rolled-back"
    assert [site.site for site in record.rolled_back] == ["conv2"]
    assert "max abs error" in record.rolled_back[0].reason
    assert sorted(record.sites_applied) == ["conv1", "conv3"]
    assert record.counters == {"convs_reweighted": 2}
    assert [n.op_type for n in out.graph.node].count("Mul") == 2
    assert_equivalent(model, out)


def test_a_pass_that_raises_at_one_site_loses_only_that_site(plugin_installed):
    model = load_case("core/conv_stack")
    out, report = optimize(model, "raise-at(wrong-at=conv3)", canonicalize=False)
    [record] = report.passes
    assert record.status == "partially-rolled-back"
    assert [site.site for site in record.rolled_back] == ["conv3"]
    assert "deliberate failure at conv3" in record.rolled_back[0].reason
    assert_equivalent(model, out)


def test_without_verification_a_raising_site_is_still_rolled_back(plugin_installed):
    _, report = optimize(load_case("core/conv_stack"), "raise-at(wrong-at=conv1)", verify=False, canonicalize=False)
    assert [site.site for site in report.passes[0].rolled_back] == ["conv1"]
    assert report.passes[0].verified_by is None


def test_strict_turns_a_rollback_into_an_equivalence_error(plugin_installed):
    with pytest.raises(EquivalenceError, match="--strict: reweight-convs failed verification at conv1") as info:
        optimize(load_case("core/conv_stack"), "reweight-convs(wrong-at=conv1)", strict=True, canonicalize=False)
    assert info.value.report.passes[0].status == "partially-rolled-back"


def test_the_callers_model_is_never_modified(plugin_installed):
    model = load_case("core/identity_weights")
    before = model.SerializeToString()
    optimize(model, "simplify,reweight-convs")
    assert model.SerializeToString() == before


def test_simplify_folds_identity_routed_weights():
    out, report = optimize(load_case("core/identity_weights"), "simplify")
    assert "Identity" not in [n.op_type for n in out.graph.node]
    assert report.passes[0].verified_by == "onnxruntime"


def conv_batchnorm() -> onnx.ModelProto:
    stats = {"scale": rand(4, seed=1) + 1.5, "bias": rand(4, seed=2), "mean": rand(4, seed=3), "var": rand(4, seed=4) ** 2 + 0.5}
    return make_model(
        [node("Conv", ["x", "w"], ["c"], name="conv"), node("BatchNormalization", ["c", *stats], ["y"], name="bn")],
        {"x": [1, 3, 8, 8]}, ["y"], {"w": rand(4, 3, 3, 3), **stats},
    )


def test_simplify_fuses_a_batchnorm_into_its_conv():
    out, report = optimize(conv_batchnorm(), "simplify")
    assert [n.op_type for n in out.graph.node] == ["Conv"] and report.equivalent


def test_simplify_above_optimize_max_nodes_folds_without_fusing_and_says_so():
    out, report = optimize(conv_batchnorm(), "simplify(optimize-max-nodes=1)")
    assert [n.op_type for n in out.graph.node] == ["Conv", "BatchNormalization"]
    [record] = report.passes
    assert record.counters == {"optimizer_skipped": 1}
    assert record.warnings == ["simplify: 2 nodes is over optimize-max-nodes (1); folded constants without onnxsim's fusions"]


def test_every_pass_leaves_a_checked_model_with_names_and_opsets_kept(plugin_installed):
    model = load_case("core/conv_stack")
    model.metadata_props.add(key="author", value="tests")
    model.doc_string = "kept"
    out, _ = optimize(model, "reweight-convs,simplify")
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    assert out.opset_import == model.opset_import
    assert {p.key: p.value for p in out.metadata_props} == {"author": "tests"}
    assert out.doc_string == "kept" and out.ir_version == model.ir_version
    assert all(n.name for n in out.graph.node)


def test_fixed_point_repeats_until_nothing_changes(plugin_installed):
    _, report = optimize(load_case("core/identity_weights"), "simplify", fixed_point=True, canonicalize=False)
    assert [(p.iteration, p.status) for p in report.passes] == [(1, "changed"), (2, "unchanged")]
    assert report.iterations == 2


def test_the_report_records_what_each_pass_did(plugin_installed):
    _, report = optimize(load_case("core/conv_stack"), "reweight-convs(wrong-at=conv2)", canonicalize=False)
    data = json.loads(report.to_json())
    record = data["passes"][0]
    assert record["name"] == "reweight-convs" and record["spec"] == "reweight-convs(wrong-at=conv2)"
    assert record["nodes_before"] == 5 and record["nodes_after"] == 7
    assert record["verified_by"] == "onnxruntime" and record["max_rel_err"] < 1e-6
    assert record["sites_found"] == 3 and record["rolled_back"][0]["site"] == "conv2"
    assert record["seconds"] > 0 and record["flops_before"] == record["flops_after"] > 0
    assert data["backend"] == "onnxruntime" and data["rtol"] == 1e-5
    assert data["final"]["passed"] is True and data["equivalent"] is False


def test_a_pipeline_can_be_built_from_pass_instances(plugin_installed):
    pipeline = Pipeline(parse_spec("simplify") + parse_spec("reweight-convs"), verify=True, canonicalize=False)
    assert pipeline.spec == "simplify,reweight-convs"
    out, report = pipeline.run(load_case("core/conv_stack"))
    assert report.equivalent and len(out.graph.node) == 8


def test_reference_outputs_are_reused_between_passes(plugin_installed, monkeypatch):
    from graphopt import verify

    sessions = []

    class CountedOrtGraph(verify.OrtGraph):
        def __init__(self, model):
            sessions.append(model)
            super().__init__(model)

    monkeypatch.setattr(verify, "OrtGraph", CountedOrtGraph)
    optimize(load_case("core/conv_stack"), "reweight-convs,+reweight-convs,+reweight-convs", canonicalize=False)
    # one session for the input, then one per changed pass (each runs every input set); the final check reuses them
    assert len(sessions) == 4


def test_dynamic_dims_take_user_shapes(plugin_installed):
    _, report = optimize(load_case("core/conv_stack"), "reweight-convs", input_shapes={"x": (3, 3, 16, 16)})
    assert report.input_shapes == {"x": [3, 3, 16, 16]} and report.equivalent


def test_an_unchanged_pass_costs_no_verification_run(plugin_installed):
    model = load_case("core/tiny_outputs")
    _, report = optimize(model, "simplify")
    assert report.passes[0].status == "unchanged" and report.final is None
    assert np.isfinite(report.seconds)


# -- the canonical form ----------------------------------------------------------------------------


def test_the_canonical_form_is_established_before_the_first_pass_whatever_the_spec(plugin_installed):
    # identity_weights routes its Conv weights through Identity nodes, as PyTorch exports do:
    # reweight-convs (like every pass) only rewrites a Conv whose weight is a constant.
    out, report = optimize(load_case("core/identity_weights"), "reweight-convs")
    first, rewrite = report.passes[0], report.passes[1]
    assert (first.name, first.after, first.status) == ("simplify", "(input)", "changed")
    assert rewrite.name == "reweight-convs" and rewrite.status == "changed" and rewrite.after is None
    assert "Identity" not in [n.op_type for n in out.graph.node] and report.equivalent


def test_the_canonical_form_is_restored_after_each_pass_that_changed_the_graph(plugin_installed):
    # reweight-convs leaves Conv(2W) -> Mul(0.5); canonicalization folds the Mul back into the Conv.
    out, report = optimize(load_case("core/conv_stack"), "reweight-convs")
    assert [(p.name, p.after, p.status) for p in report.passes] == [
        ("simplify", "(input)", "unchanged"), ("reweight-convs", None, "changed"), ("simplify", "reweight-convs", "changed"),
    ]
    assert report.passes[2].verified_by == "onnxruntime"
    assert "Mul" not in [n.op_type for n in out.graph.node] and report.equivalent and report.canonicalize


def test_no_canonicalization_follows_a_pass_that_changed_nothing(plugin_installed):
    relu_only = make_model([node("Relu", ["x"], ["y"], name="relu")], {"x": [1, 3, 8, 8]}, ["y"], {})
    _, report = optimize(relu_only, "scale-filter")
    assert [(p.name, p.status) for p in report.passes] == [("simplify", "unchanged"), ("scale-filter", "unchanged")]


def test_the_specs_own_simplify_options_are_the_canonicalizers(plugin_installed):
    _, report = optimize(conv_batchnorm(), "reweight-convs,simplify(optimize=false)")
    assert [(p.name, p.spec) for p in report.passes if p.canonicalization] == [
        ("simplify", "simplify(optimize=false)"), ("simplify", "simplify(optimize=false)"),
    ]


def test_a_canonicalization_that_fails_verification_is_rolled_back_and_named(plugin_installed):
    from graphopt.passes.simplify import Simplify

    class WrongSimplify(Simplify):
        """Canonicalizes, then scales the first weight it finds: a wrong canonicalizer."""

        def apply(self, model, only=None):
            result = super().apply(model, only)
            if result.modified:
                weight = result.model.graph.initializer[0]
                values = onnx.numpy_helper.to_array(weight) * 1.5
                weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
            return result

    model = load_case("core/identity_weights")
    out, report = Pipeline([WrongSimplify()]).run(model)
    [record] = report.passes
    assert record.status == "rolled-back" and record.rolled_back[0].site == "(whole model)"
    assert not report.equivalent
    assert_equivalent(model, out)


def test_skipping_simplify_turns_canonicalization_off(plugin_installed):
    pipeline = Pipeline.from_spec("all,reweight-convs", skip=["simplify"], verify=False)
    _, report = pipeline.run(load_case("core/identity_weights"))
    assert "simplify" not in [p.name for p in report.passes] and not report.canonicalize


def conv_chain(length: int, last_weight_seed: int = 0) -> onnx.ModelProto:
    nodes = [node("Conv", [f"c{i}", f"w{i}"], [f"c{i + 1}"], name=f"conv{i}", pads=[1, 1, 1, 1]) for i in range(length)]
    weights = {f"w{i}": rand(16, 16, 3, 3, seed=i) for i in range(length)}  # 9 KiB each
    weights[f"w{length - 1}"] = rand(16, 16, 3, 3, seed=100 + last_weight_seed)
    return make_model(nodes, {"c0": [1, 16, 8, 8]}, [f"c{length}"], weights)


def test_canonicalization_after_a_pass_holds_back_only_weights_two_nodes_from_any_change():
    from graphopt.passes.simplify import Simplify, weights_far_from_changes

    before, after = conv_chain(6), conv_chain(6, last_weight_seed=1)  # "a pass" rewrote conv5's weight
    assert weights_far_from_changes(after, before) == {"w0", "w1", "w2"}
    held_back = Simplify().apply(after, since=before).model
    assert held_back.SerializeToString() == Simplify().apply(after).model.SerializeToString()


def test_a_weight_equal_to_one_a_pass_added_is_not_held_back():
    """onnxsim merges equal weights wherever they are read: holding one back would leave the
    duplicate for the next run's canonicalization (no fixed point)."""
    from graphopt.passes.simplify import Simplify, weights_far_from_changes

    before = conv_chain(6)
    after = conv_chain(6)
    w0 = next(t for t in after.graph.initializer if t.name == "w0")
    [w5] = [t for t in after.graph.initializer if t.name == "w5"]
    w5.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w0), "w5"))  # "a pass" wrote conv5 a copy of w0
    after.graph.initializer.remove(w5)
    renamed = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w0), "w5_new")
    after.graph.initializer.append(renamed)
    after.graph.node[5].input[1] = "w5_new"
    assert weights_far_from_changes(after, before) == {"w1", "w2"}
    held_back, full = Simplify().apply(after, since=before).model, Simplify().apply(after).model
    assert len(full.graph.initializer) == 5  # the copy was merged
    assert list(held_back.graph.node) == list(full.graph.node)
    assert sorted(t.SerializeToString() for t in held_back.graph.initializer) == sorted(t.SerializeToString() for t in full.graph.initializer)


def test_a_read_int4_weight_exports_packed():
    """graphsurgeon exports a 4-bit constant it has loaded one byte an element (invalid ONNX):
    export_like hands it a packed TensorProto, so a pass that reads int4 weights can rewrite."""
    import onnx_graphsurgeon as gs

    from graphopt.graphs import export_like, weight

    model = load_case("pad_channels/int4_weight_chain_12")
    graph = gs.import_onnx(model)
    int4 = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.dtype.name == "int4"]
    assert int4
    before = {t.name: weight(t).stored.astype(np.int8) for t in int4}  # reading loads them
    out = export_like(graph, model)
    onnx.checker.check_model(out, full_check=True)
    after = {t.name: onnx.numpy_helper.to_array(t).astype(np.int8) for t in out.graph.initializer if t.name in before}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
