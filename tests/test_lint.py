"""graphopt lint: each finding kind shows on its fixture and not on its twin; real models read sensibly."""

import functools
import importlib.util
import json
import re
import sys
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt import Pipeline
from graphopt.errors import EXIT_USAGE, ModelError
from graphopt.lint import (
    SCHEMA_VERSION, Finding, Kind, LintReport, alignment, diff_findings, format_findings, fusion, lint_command_impl,
    lint_model, match_findings, merging, parser_support, quantization, trt_parser_ops,
)
from graphopt.lint.forecast import pipeline_for
from graphopt.modelio import infer_shapes
from graphopt.spec import parse_spec
from passes.pad_channels import PadChannelsOptions
from passes.simplify import Simplify
from tests.fixtures.cases import FIXTURES, load_case
from tests.fixtures.zoo import load_typed_model, load_zoo_model, typed_names, zoo_names

REPO = Path(__file__).resolve().parents[1]

# finding code -> (fixture that shows it, fixture that must not, target precision of float32 layers)
KINDS = {
    "GO-FUSE-001": ("conv_transpose_relu", "conv_relu", "fp16"),
    "GO-FUSE-002": ("conv_hardswish", "conv_relu", "fp16"),
    "GO-FUSE-003": ("pad_zero_conv", "pad_reflect_conv", "fp16"),
    "GO-FUSE-004": ("pad_reflect_conv", "pad_zero_conv", "fp16"),
    "GO-FUSE-005": ("qdq_between_conv_and_relu", "qdq_after_relu", "int8"),
    "GO-FUSE-006": ("reduce_mean_over_hw", "reduce_mean_over_channels", "fp16"),
    "GO-FUSE-007": ("flatten_gemm_head", "gemm_on_2d_input", "fp16"),
    "GO-FUSE-008": ("conv_times_one_relu", "conv_times_two_relu", "fp16"),
    "GO-QUANT-001": ("qdq_chain", "conv_relu_conv", "int8"),
    "GO-QUANT-002": ("qdq_chain_with_float_conv", "qdq_chain", "fp16"),  # target int8 would make its float conv int8
    "GO-QUANT-003": ("squeeze_excite_between_convs", "conv_relu_conv", "int8"),
    "GO-ALIGN-001": ("conv_channels_20", "conv_channels_24", "fp16"),
    "GO-ALIGN-002": ("conv_channels_24", "conv_channels_48", "fp8"),
    "GO-ALIGN-003": ("conv_channels_48", "conv_channels_64", "int8"),
    "GO-MERGE-001": ("siblings_1x1_and_3x3", "siblings_same_kernel", "fp16"),
    "GO-MERGE-002": ("qdq_siblings_same_kernel", "siblings_same_kernel", "int8"),
    "GO-PARSE-001": ("det_op", "conv_relu", "fp16"),
    "GO-PARSE-002": ("reduce_mean_runtime_axes", "reduce_mean_over_hw", "fp16"),
    "GO-PARSE-003": ("double_relu", "conv_relu", "fp16"),
    "GO-PARSE-004": ("custom_domain_op", "conv_relu", "fp16"),
    "GO-PARSE-005": ("opset_22_relu", "conv_relu", "fp16"),
    "GO-PARSE-006": ("dynamic_batch_conv", "conv_relu", "fp16"),
}


def lint(case: str, precision: str | None = "fp16", **options) -> LintReport:
    return lint_model(load_case(f"lint/{case}"), precision, **options)


def codes(report: LintReport) -> set[str]:
    return {f.code for f in report.findings}


def only(report: LintReport, code: str):
    [finding] = [f for f in report.findings if f.code == code]
    return finding


def simplified_zoo(name: str) -> onnx.ModelProto:
    return Simplify().apply(load_zoo_model(name)).model


# -- every kind, on its fixture and its twin ---------------------------------------------------------


def test_every_finding_kind_has_a_fixture_pair():
    declared = {v.code for module in (fusion, quantization, alignment, merging, parser_support)
                for v in vars(module).values() if isinstance(v, Kind)}
    declared |= {rule.kind.code for rule in alignment.RULES.values()}
    assert declared == set(KINDS)


@pytest.mark.parametrize("code", KINDS)
def test_kind_is_reported_on_its_fixture(code):
    shows, _, precision = KINDS[code]
    assert code in codes(lint(shows, precision))


@pytest.mark.parametrize("code", KINDS)
def test_kind_is_not_reported_on_its_twin(code):
    _, quiet, precision = KINDS[code]
    assert code not in codes(lint(quiet, precision))


# -- what a finding says -----------------------------------------------------------------------------


def test_finding_names_nodes_severity_reason_and_fix():
    finding = only(lint("conv_transpose_relu"), "GO-FUSE-001")
    assert finding.nodes == ("conv", "transpose", "relu")
    assert finding.severity == "warning"
    assert finding.why.count(".") == 1 and "TensorRT" in finding.why
    assert finding.fix_pass is None  # the Transpose changes the layout: no pass removes it
    assert finding.reference.startswith("https://")


def test_layout_op_that_changes_nothing_is_fixed_by_simplify():
    assert only(lint("conv_noop_reshape_relu"), "GO-FUSE-001").fix_pass == "simplify"


def test_zero_pad_is_fixed_by_simplify_and_reflect_pad_by_no_pass():
    assert only(lint("pad_zero_conv"), "GO-FUSE-003").fix_pass == "simplify"
    reflect = only(lint("pad_reflect_conv"), "GO-FUSE-004")
    assert reflect.fix_pass is None and "mode=reflect" in reflect.detail


def test_silu_after_conv_is_an_activation_tensorrt_may_not_fuse():
    assert only(lint("conv_silu"), "GO-FUSE-002").nodes == ("conv", "sigmoid", "mul")


def test_reduce_and_fc_head_name_the_pass_that_rewrites_them():
    assert only(lint("reduce_mean_over_hw"), "GO-FUSE-006").fix_pass == "reduce-to-pool"
    assert {f.fix_pass for f in lint("flatten_gemm_head").findings if f.code == "GO-FUSE-007"} == {"fc-to-conv"}


def test_identity_scale_after_a_conv_is_fixed_by_simplify_which_runs_first():
    # onnxsim's optimizer folds a Mul by a constant after a Conv into the Conv (fuse_mul_into_conv)
    assert only(lint("conv_times_one_relu"), "GO-FUSE-008").fix_pass == "simplify"


# -- alignment ---------------------------------------------------------------------------------------


def test_alignment_gives_flops_share_and_padding_cost():
    report = lint("conv_channels_20")
    conv1 = next(f for f in report.findings if f.nodes == ("conv1",))
    assert conv1.rule == alignment.ALIGN_8.name and conv1.fix_pass == "pad-channels"
    assert conv1.flops_share == pytest.approx(0.5, rel=1e-3)  # 32->20 and 20->32: equal FLOPs
    assert conv1.extra_flops_share == pytest.approx(0.5 * (24 / 20 - 1), rel=1e-3)


def test_an_int8_layer_is_judged_against_32_or_with_int8_align_16_against_16():
    assert {(f.code, f.rule) for f in lint("conv_channels_24", "int8").findings} == {("GO-ALIGN-003", alignment.ALIGN_32.name)}
    assert codes(lint("conv_channels_48", "int8", int8_align=16)) == set()
    sixteen = lint("conv_channels_24", "int8", int8_align=16).findings
    assert {(f.code, f.rule) for f in sixteen} == {("GO-ALIGN-002", alignment.ALIGN_16.name)}
    assert {f.fix_pass for f in sixteen} == {"pad-channels(precision=int8,int8-align=16)"}  # what pad-channels needs to align it


def test_padding_pad_channels_would_refuse_has_no_fix():
    finding = next(f for f in lint("conv_channels_20", "int8").findings if f.nodes == ("conv1",))
    assert finding.fix_pass is None and "max-overhead" in finding.detail  # 20 -> 32 grows the layer 60%


def test_unaligned_classifier_head_is_left_alone_when_padding_costs_too_much():
    finding = only(lint("flatten_gemm_head"), "GO-ALIGN-001")
    assert finding.nodes == ("fc2",) and finding.fix_pass is None  # 10 -> 16 classes: +60%


def test_unaligned_siblings_are_fixed_by_merging_then_padding():
    finding = next(f for f in lint("siblings_same_kernel", "int8", int8_align=16).findings if f.code == "GO-ALIGN-002")
    assert finding.nodes == ("expand0",) and finding.fix_pass == "merge-convs,pad-channels(precision=int8,int8-align=16)"


def test_target_precision_and_int8_align_default_to_pad_channels_defaults():
    report = lint("conv_relu", None)
    assert (report.target_precision, report.int8_align) == (PadChannelsOptions().precision, PadChannelsOptions().int8_align)


def test_a_qdq_layer_runs_int8_whatever_the_target_and_a_float32_layer_runs_the_target():
    for target in ("fp16", "int8"):
        layers = lint("qdq_chain_with_float_conv", target).layers
        assert {name: p.precision for name, p in layers.items()} == {"conv1": "int8", "conv2": "int8", "conv3": target, "conv4": "int8"}
        assert layers["conv1"].decided_by == "Q/DQ on its input and weight" and "target" in layers["conv3"].decided_by


# -- each layer in its own precision -----------------------------------------------------------------


def alignment_findings(report: LintReport) -> dict[str, tuple[str, str, int]]:
    """Layer -> (precision, how it was decided, the multiple its finding asks for)."""
    aligns = {rule.name: rule.align for rule in alignment.RULES.values()}
    return {f.nodes[0]: (f.precision, f.decided_by, aligns[f.rule]) for f in report.findings if f.category == "alignment"}


INT8_QDQ = "Q/DQ on its input and weight"


def test_mixed_model_judges_each_layer_in_its_own_precision_and_says_how_it_was_decided():
    report = lint("mixed_precision", "fp16", fixes=False)
    assert alignment_findings(report) == {
        "conv1": ("int8", INT8_QDQ, 32),  # 16 -> 20: neither a multiple of 32
        "conv2": ("fp16", "float32 layer: the target precision (fp16)", 8),  # 20 in: not a multiple of 8; 24 out is
        "conv3": ("int8", INT8_QDQ, 32),  # 24 -> 48
        "head": ("fp16", "float16 tensors", 8),  # 48 -> 10 classes
    }
    conv2 = next(f for f in report.findings if f.nodes == ("conv2",) and f.category == "alignment")
    assert "runs fp16 (float32 layer: the target precision (fp16))" in conv2.detail and "20 input channels" in conv2.detail
    assert "24 output" not in conv2.detail
    assert only(report, "GO-QUANT-002").nodes == ("conv2",)  # a float layer between int8 ones


def test_mixed_model_int8_align_and_target_move_only_the_layers_they_apply_to():
    sixteen = alignment_findings(lint("mixed_precision", "fp16", fixes=False, int8_align=16))
    assert sixteen == {"conv1": ("int8", INT8_QDQ, 16), "conv2": ("fp16", "float32 layer: the target precision (fp16)", 8),
                       "conv3": ("int8", INT8_QDQ, 16), "head": ("fp16", "float16 tensors", 8)}
    int8 = alignment_findings(lint("mixed_precision", "int8", fixes=False))
    assert int8 == {"conv1": ("int8", INT8_QDQ, 32), "conv2": ("int8", "float32 layer: the target precision (int8)", 32),
                    "conv3": ("int8", INT8_QDQ, 32), "head": ("fp16", "float16 tensors", 8)}


def test_mixed_model_json_gives_each_finding_its_precision_and_each_layer_its_precision():
    data = json.loads(lint("mixed_precision", "fp16", fixes=False).to_json())
    assert (data["target_precision"], data["int8_align"]) == ("fp16", 32)
    assert data["layers"]["head"] == {"precision": "fp16", "decided_by": "float16 tensors"}
    head = next(f for f in data["findings"] if f["nodes"] == ["head"])
    assert (head["precision"], head["decided_by"], head["code"]) == ("fp16", "float16 tensors", "GO-ALIGN-001")


def test_the_forecast_pads_with_lints_own_precision_and_int8_align():
    # conv3's 48 outputs pad to 64 at int8's 32 (+33%, within max-overhead), and need nothing at 16
    by_align = {align: lint("mixed_precision", "fp16", int8_align=align) for align in (32, 16)}
    [conv3] = [f for f in by_align[32].findings if f.nodes == ("conv3",) and f.category == "alignment"]
    assert "after `all`" in conv3.detail and "24 input channels" in conv3.detail.split("after `all`")[1]
    assert "48 output" not in conv3.detail.split("after `all`")[1]  # pad-channels padded it to 64 as lint asked
    [conv3] = [f for f in by_align[16].findings if f.nodes == ("conv3",) and f.category == "alignment"]
    assert conv3.fix_pass is None and "48 output" not in conv3.detail  # 24 in, from conv2, which runs fp16 and aligns to 8


typed_model = functools.cache(load_typed_model)


@pytest.mark.parametrize("options", [{"precision": "fp16", "int8_align": 32}, {"precision": "int8", "int8_align": 16}],
                         ids=lambda o: f"{o['precision']}-{o['int8_align']}")
@pytest.mark.parametrize("name", typed_names())
def test_lint_and_pad_channels_agree_on_the_precision_of_every_conv_of_the_typed_corpus(name, options):
    model = typed_model(name)
    linted = {layer: f"{p.precision} ({p.decided_by})" for layer, p in lint_model(model, fixes=False, **options).layers.items()}
    # Every conv, as pad-channels judges it on the canonical graph it is handed ...
    pad_options = PadChannelsOptions(max_overhead=100.0, **options)  # every unaligned conv it can pad is a site
    canonical = gs.import_onnx(infer_shapes(Pipeline([], verify=False).run(model)[0]))
    convs = [n for n in canonical.nodes if n.op == "Conv"]
    judged = {conv.name: (lambda align, p: f"{p.precision} ({p.decided_by})")(*pad_options.layer_alignment(conv)) for conv in convs}
    assert convs and {conv: linted.get(conv) for conv in judged} == judged
    # ... and as its report says for every conv it padded.
    spec = f"pad-channels(precision={pad_options.precision},int8_align={pad_options.int8_align},max_overhead={pad_options.max_overhead})"
    _, run = Pipeline(parse_spec(spec), verify=False).run(model)
    [record] = [r for r in run.passes if r.name == "pad-channels"]
    padded = {conv: precision for site in record.details for conv, precision in site["precision"].items()}
    assert {conv: linted.get(conv) for conv in padded} == padded


# -- quantization continuity -------------------------------------------------------------------------


def test_quantization_is_judged_only_where_layers_run_int8():
    assert not {c for c in codes(lint("squeeze_excite_between_convs", "fp16")) if c.startswith("GO-QUANT")}


def test_float_only_gate_names_its_ops_and_the_flops_around_it():
    finding = only(lint("squeeze_excite_between_convs", "int8"), "GO-QUANT-003")
    assert finding.nodes == ("gate_sigmoid", "gate_mul")
    assert 0.0 < finding.flops_share < 1.0


def test_qdq_model_lists_its_int8_regions_and_the_float_conv_between_them():
    report = lint("qdq_chain_with_float_conv", "fp16")
    assert [f.nodes for f in report.findings if f.code == "GO-QUANT-001"] == [("conv1", "conv2"), ("conv4",)]
    float_conv = only(report, "GO-QUANT-002")
    assert float_conv.nodes == ("conv3",) and float_conv.precision == "fp16" and "target" in float_conv.decided_by


def test_a_float32_conv_with_target_int8_joins_the_int8_region_around_it():
    report = lint("qdq_chain_with_float_conv", "int8")
    assert [f.nodes for f in report.findings if f.code == "GO-QUANT-001"] == [("conv1", "conv2", "conv3", "conv4")]
    assert "GO-QUANT-002" not in codes(report)


# -- merging -----------------------------------------------------------------------------------------


def test_siblings_with_different_kernels_name_the_group_and_its_flops():
    finding = only(lint("siblings_1x1_and_3x3"), "GO-MERGE-001")
    assert finding.nodes == ("expand0", "expand1") and finding.fix_pass == "merge-convs"
    assert finding.flops_share == pytest.approx(1.0)
    assert "issues/501" in finding.reference


def test_qdq_siblings_cite_tensorrt_and_say_merge_convs_merges_them():
    finding = only(lint("qdq_siblings_same_kernel", "int8"), "GO-MERGE-002")
    assert finding.fix_pass == "merge-convs"
    assert "issues/1602" in finding.reference


def test_qdq_siblings_merge_convs_declines_say_what_one_q_needs():
    # ONNX Runtime calibrates each sibling's output on its own: one Q cannot serve both.
    finding = only(lint_model(load_case("merge_convs/qdq_ort_fire_output_scales_differ"), "int8"), "GO-MERGE-002")
    assert finding.fix_pass is None and "one output quantization" in finding.detail and "before quantizing" in finding.detail


# -- parser support ----------------------------------------------------------------------------------


def test_parser_table_records_release_commit_and_opsets():
    assert re.fullmatch(r"[0-9a-f]{40}", trt_parser_ops.PARSER_COMMIT)
    assert trt_parser_ops.PARSER_VERSION.startswith("10.")
    assert (trt_parser_ops.MIN_OPSET, trt_parser_ops.MAX_OPSET) == (9, 20)
    assert trt_parser_ops.OPERATORS["Conv"].supported and not trt_parser_ops.OPERATORS["Det"].supported


def test_unsupported_op_is_an_error():
    finding = only(lint("det_op"), "GO-PARSE-001")
    assert finding.severity == "error" and finding.nodes == ("det",)


def test_documented_restrictions_are_checked():
    assert "axes" in only(lint("reduce_mean_runtime_axes"), "GO-PARSE-002").detail
    assert "indices" in only(lint("maxpool_indices"), "GO-PARSE-002").detail


def test_dynamic_input_names_the_input_and_its_dims():
    assert "'x'" in only(lint("dynamic_batch_conv"), "GO-PARSE-006").detail
    assert "batchx16x8x8" in only(lint("dynamic_batch_conv"), "GO-PARSE-006").detail


def test_table_generator_reads_the_parsers_markdown(monkeypatch):
    spec = importlib.util.spec_from_file_location("gen_trt_op_table", REPO / "scripts" / "gen_trt_op_table.py")
    gen = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gen)  # dataclasses look their module up there
    spec.loader.exec_module(gen)
    markdown = ("TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20.\n"
                "| Conv | Y | FP32, FP16 |\n| Det | N |\n| Pad | Y | FP32, INF64 | `axes` must be an initializer |\n")
    rows = gen.parse_rows(markdown)
    assert [(r.op, r.supported, r.types) for r in rows] == [
        ("Conv", True, ("FP32", "FP16")), ("Det", False, ()), ("Pad", True, ("FP32", "INT64"))]
    source = gen.render(rows, *gen.parse_header(markdown), version="10.1.0", commit="0" * 40)
    namespace: dict = {}
    exec(compile(source, "trt_parser_ops.py", "exec"), namespace)  # noqa: S102 - our own generated code
    assert namespace["OPERATORS"]["Pad"].restrictions == "`axes` must be an initializer"


# -- output: text, JSON, diff, command ---------------------------------------------------------------


def test_json_report_has_schema_version_and_the_documented_fields():
    data = json.loads(lint("conv_channels_20").to_json())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["parser"]["commit"] == trt_parser_ops.PARSER_COMMIT
    documented = (REPO / "docs" / "lint.md").read_text()
    for field in [*data, *data["findings"][0]]:
        assert f"`{field}`" in documented, f"field {field} is not documented in docs/lint.md"


def test_text_report_groups_findings_by_kind_and_counts_them():
    text = format_findings(lint("conv_channels_20"))
    assert "GO-ALIGN-001 channels-not-multiple-of-8" in text and "2 sites" in text
    assert text.rstrip().endswith("2 findings: 0 errors, 2 warnings, 0 info")


def test_diff_shows_what_a_pass_resolved():
    before = lint("pad_zero_conv")
    after = lint_model(Simplify().apply(load_case("lint/pad_zero_conv")).model, "fp16")
    text = diff_findings(before, after)
    assert "1 finding -> 0 (1 resolved, 0 new, 0 unchanged)" in text
    assert "GO-FUSE-003 pad-foldable-into-conv: 1 -> 0 (-1)" in text


def test_lint_command_prints_the_report_and_writes_json(tmp_path, capsys):
    report = tmp_path / "lint.json"
    status = lint_command_impl(FIXTURES / "lint" / "conv_channels_20.onnx", "fp16", report)
    assert status == 0
    assert "GO-ALIGN-001" in capsys.readouterr().out
    assert json.loads(report.read_text())["findings"][0]["code"] == "GO-ALIGN-001"


def test_lint_command_exits_1_when_the_parser_would_reject_the_model(capsys):
    assert lint_command_impl(FIXTURES / "lint" / "det_op.onnx", None, None) == 1


def test_lint_command_rejects_bad_input_with_a_one_line_usage_error(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(ModelError) as err:
        lint_command_impl(garbage, "fp16", None)
    assert err.value.exit_code == EXIT_USAGE and "\n" not in str(err.value)


# -- never crashes --------------------------------------------------------------------------------------


# zoo and typed hold weightless skeletons (refilled by their own tests)
FIXTURE_FILES = sorted(p for p in FIXTURES.glob("*/*.onnx") if p.parent.name not in ("zoo", "typed"))


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_lint_judges_every_fixture_without_crashing(path):
    model = onnx.load(str(path))
    assert isinstance(lint_model(model, "fp16"), LintReport)  # with fixes: the passes run too
    assert isinstance(lint_model(model, "int8", fixes=False), LintReport)


zoo_model = functools.cache(load_zoo_model)  # neither lint nor the pipeline modifies the model it is given


@functools.cache
def linted_zoo(name: str, precision: str, fixes: bool = True) -> LintReport:
    return lint_model(zoo_model(name), precision, fixes=fixes)


@functools.cache
def optimized_zoo(name: str, spec: str = "all") -> onnx.ModelProto:
    return Pipeline(parse_spec(spec), verify=False).run(zoo_model(name))[0]


@pytest.mark.zoo
@pytest.mark.parametrize("name", zoo_names())
def test_lint_judges_raw_exporter_output(name):
    assert linted_zoo(name, "int8", fixes=False).total_flops > 0


# -- real architectures ------------------------------------------------------------------------------


@pytest.mark.zoo
def test_resnet50_fp16_is_aligned_except_its_rgb_input():
    report = linted_zoo("resnet50", "fp16")
    [finding] = [f for f in report.findings if f.category == "alignment"]
    assert finding.nodes == ("/conv1/Conv",) and "3 input channels" in finding.detail and finding.fix_pass is None
    assert "graph input 'input'" in finding.detail
    assert not [f for f in report.findings if f.severity == "error"]


@pytest.mark.zoo
def test_squeezenet_fire_modules_are_merge_groups_with_different_kernels():
    report = linted_zoo("squeezenet1_0", "fp16")
    groups = [f for f in report.findings if f.code == "GO-MERGE-001"]
    assert len(groups) == 8 and all(f.fix_pass == "merge-convs" and "expand1x1" in f.nodes[0] for f in groups)


@pytest.mark.zoo
def test_inception_asymmetric_kernel_pairs_are_flagged_without_a_fix():
    groups = [f for f in linted_zoo("inception_v3", "fp16").findings if f.code == "GO-MERGE-001"]
    assert len(groups) == 4 and all(f.fix_pass is None and "max-flop-growth" in f.detail for f in groups)


@pytest.mark.zoo
def test_googlenet_sibling_groups_all_share_a_kernel_so_tensorrt_merges_them():
    assert not [f for f in linted_zoo("googlenet", "fp16").findings if f.category == "merging"]


@pytest.mark.zoo
def test_efficientnet_int8_squeeze_excite_gates_break_int8_regions():
    breaks = [f for f in linted_zoo("efficientnet_b0", "int8", fixes=False).findings if f.code == "GO-QUANT-003"]
    assert len(breaks) == 16
    assert all([n.rsplit("/", 1)[-1] for n in f.nodes] == ["Sigmoid", "Mul"] for f in breaks)


@pytest.mark.zoo
def test_vit_int8_flags_every_attention_softmax():
    breaks = [f for f in linted_zoo("vit_tiny_patch16_224", "int8", fixes=False).findings if f.code == "GO-QUANT-003"]
    softmax = [f for f in breaks if f.nodes[0].endswith("/Softmax")]
    assert len(softmax) == 12


@pytest.mark.zoo
def test_det_head_box_and_objectness_heads_are_unaligned_and_fixed_by_merge_then_pad():
    report = linted_zoo("det_head", "fp16")
    heads = {f.nodes[0]: f for f in report.findings if f.code == "GO-ALIGN-001" and "output channel" in f.detail}
    assert set(heads) == {"/box/Conv", "/obj/Conv"}
    assert {f.fix_pass for f in heads.values()} == {"merge-convs,pad-channels"}


@pytest.mark.zoo
def test_the_fix_lint_names_for_det_head_resolves_its_findings():
    model = simplified_zoo("det_head")
    before = lint_model(model, "fp16")
    [spec] = {f.fix_pass for f in before.findings if f.fix_pass}
    optimized, _ = Pipeline(parse_spec(spec), verify=False).run(model)
    after = lint_model(optimized, "fp16", fixes=False)
    assert "2 resolved, 0 new, 2 unchanged" in diff_findings(before, after)


# -- lint and run agree ------------------------------------------------------------------------------


def kept_after(before: LintReport, after: LintReport) -> list[Finding]:
    """The findings of `before` that `after` still has (paired by what they are about)."""
    return [before.findings[i] for i, _ in match_findings(before.findings, after.findings).kept]


def run_unverified(model: onnx.ModelProto, spec: str) -> onnx.ModelProto:
    return Pipeline(parse_spec(spec), verify=False).run(model)[0]


@pytest.mark.parametrize("code", KINDS)
def test_all_never_leaves_more_findings_of_a_kind_than_it_was_given(code):
    for case in KINDS[code][:2]:  # the fixture that shows it and its twin
        model, precision = load_case(f"lint/{case}"), KINDS[code][2]
        before = lint_model(model, precision, fixes=False).codes()[code]
        after = lint_model(run_unverified(model, "all"), precision, fixes=False).codes()[code]
        assert after <= before, f"{case}: {before} -> {after} {code}"


# fixture, target precision, int8 alignment: each has findings whose fix a pass makes
FIXABLE = [("conv_noop_reshape_relu", "fp16", 32), ("pad_zero_conv", "fp16", 32), ("reduce_mean_over_hw", "fp16", 32),
           ("flatten_gemm_head", "fp16", 32), ("conv_times_one_relu", "fp16", 32), ("conv_channels_20", "fp16", 32),
           ("conv_channels_24", "int8", 32), ("siblings_same_kernel", "int8", 16), ("siblings_1x1_and_3x3", "fp16", 32),
           ("repvgg_blocks", "fp16", 32), ("mixed_precision", "int8", 32)]


@pytest.mark.parametrize(("case", "precision", "int8_align"), FIXABLE)
def test_the_fix_a_finding_names_resolves_it_when_run_with_its_defaults(case, precision, int8_align):
    model = load_case(f"lint/{case}")
    report = lint_model(model, precision, int8_align=int8_align)
    fixes = {f.fix_pass for f in report.findings if f.fix_pass}
    assert fixes, f"{case}: no finding has a fix"
    for spec in fixes:
        after = lint_model(run_unverified(model, spec), precision, fixes=False, int8_align=int8_align)
        promised = [f for f in report.findings if f.fix_pass == spec]
        assert not [f for f in kept_after(report, after) if f in promised], f"{spec} left findings it was named for"


def left_of(finding: Finding, before: LintReport, after: LintReport) -> list[Finding]:
    """What `after` has of a finding: itself, or findings of its kind about a tensor it was about."""
    paired = dict(match_findings(before.findings, after.findings).kept)
    index = before.findings.index(finding)
    if index in paired:
        return [after.findings[paired[index]]]
    return [f for f in after.findings if (f.code, f.rule) == (finding.code, finding.rule) and set(f.subject) & set(finding.subject)]


# Not qdq_siblings_same_kernel: merge-convs merges those siblings now, and `left_of` cannot follow
# expand1's input-channel finding onto the merged Conv (whose subject names expand0 only).
@pytest.mark.parametrize(("case", "precision"), [("conv_transpose_relu", "fp16"), ("pad_reflect_conv", "fp16"),
                                                 ("narrow_heads", "fp16"), ("conv_channels_20", "int8")])
def test_a_finding_without_a_fix_is_one_all_leaves(case, precision):
    model = load_case(f"lint/{case}")
    report = lint_model(model, precision)
    unfixed = [f for f in report.findings if f.fix_pass is None and f.code != "GO-PARSE-006"]
    assert unfixed
    for finding in unfixed:
        after = lint_model(run_unverified(model, pipeline_for(precision, 32)), precision, fixes=False)
        assert left_of(finding, report, after), f"{finding.code} {finding.nodes}: `all` resolved it"


def test_narrow_siblings_merged_into_a_conv_pad_channels_declines_have_no_fix():
    report = lint("narrow_heads")
    heads = [f for f in report.findings if f.code == "GO-ALIGN-001"]
    assert [f.nodes for f in heads] == [("box",), ("obj",)] and all(f.fix_pass is None for f in heads)
    merged = "after `all`: Conv 'box_merged' runs fp16 (float32 layer: the target precision (fp16)) and has 5 output channels"
    assert all(merged in f.detail and "max-overhead 0.5" in f.detail for f in heads)


def test_branches_summed_by_an_add_are_fixed_by_reparameterize_not_merge_convs():
    groups = [f for f in lint("repvgg_blocks").findings if f.code == "GO-MERGE-001"]
    assert len(groups) == 2 and {f.fix_pass for f in groups} == {"reparameterize"}


def test_fc_to_conv_leaves_no_layout_op_between_a_heads_conv_and_its_activation():
    model = load_case("lint/gemm_head_tanh")
    assert lint_model(run_unverified(model, "all"), "fp16", fixes=False).codes()["GO-FUSE-001"] == 0


def test_run_lint_counts_a_finding_whose_nodes_a_pass_renamed_as_unchanged():
    model = load_case("lint/dynamic_batch_linear")  # fc-to-conv replaces the Gemm that reads the dynamic input
    before = lint_model(model, "fp16", fixes=False)
    after = lint_model(run_unverified(model, "fc-to-conv"), "fp16", fixes=False)
    assert only(before, "GO-PARSE-006").nodes != only(after, "GO-PARSE-006").nodes
    assert only(before, "GO-PARSE-006") in kept_after(before, after)


def test_a_layer_a_pass_turns_into_another_op_keeps_its_alignment_finding():
    model = load_case("lint/flatten_gemm_head")  # fc2's 10 classes: fc-to-conv makes it a Conv, still 10 channels
    before = lint_model(model, "fp16", fixes=False)
    after = lint_model(run_unverified(model, "fc-to-conv"), "fp16", fixes=False)
    assert only(after, "GO-ALIGN-001").nodes != ("fc2",)
    assert only(before, "GO-ALIGN-001") in kept_after(before, after)


def test_findings_pair_by_subject_whatever_their_nodes_are_called():
    kind = alignment.ALIGN_8.kind
    old = [kind.at(["conv"], "a", subject=("x", "y")), kind.at(["gone"], "b", subject=("x", "z"))]
    new = [kind.at(["conv_renamed"], "a", subject=("x", "y")), kind.at(["other"], "c", subject=("w", "v"))]
    diff = match_findings(old, new)
    assert (diff.kept, diff.resolved, diff.new) == ([(0, 0)], [1], [1])


def test_lint_without_fixes_names_none_and_says_why_a_pass_may_leave_a_finding():
    report = lint_model(load_case("lint/conv_channels_20"), "int8", fixes=False)
    assert all(f.fix_pass is None and f.extra_flops_share is None for f in report.findings)
    assert any("max-overhead" in f.detail for f in report.findings)


@pytest.mark.zoo
@pytest.mark.parametrize("name", zoo_names())
def test_all_leaves_no_more_findings_of_any_kind_on_real_architectures(name):
    for precision in ("fp16", "int8"):
        before = linted_zoo(name, precision, fixes=False).codes()
        after = lint_model(optimized_zoo(name), precision, fixes=False).codes()
        assert not {code: (before[code], n) for code, n in after.items() if n > before[code]}, precision


@pytest.mark.zoo
@pytest.mark.parametrize("name", zoo_names())
def test_all_fixes_every_finding_lint_names_a_fix_for_on_real_architectures(name):
    report = linted_zoo(name, "fp16")
    after = lint_model(optimized_zoo(name), "fp16", fixes=False)
    assert not [f for f in kept_after(report, after) if f.fix_pass]


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["det_head", "squeezenet1_0", "fc_head_classifier", "se_block"])
def test_the_passes_a_fix_names_fix_it_on_their_own_on_raw_exporter_output(name):
    report = linted_zoo(name, "fp16")
    specs = {f.fix_pass for f in report.findings if f.fix_pass}
    assert specs
    for spec in specs:
        after = lint_model(run_unverified(zoo_model(name), spec), "fp16", fixes=False)
        promised = [f for f in report.findings if f.fix_pass == spec]
        assert not [f for f in kept_after(report, after) if f in promised], f"{spec} left findings it was named for"


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["det_head", "squeezenet1_0"])
@pytest.mark.parametrize("int8_align", [16, 32])
def test_int8_alignment_fixes_name_the_alignment_and_keep_their_promise(name, int8_align):
    report = lint_model(zoo_model(name), "int8", int8_align=int8_align)
    after = lint_model(optimized_zoo(name, pipeline_for("int8", int8_align)), "int8", fixes=False, int8_align=int8_align)
    promised = [f for f in report.findings if f.fix_pass]
    assert promised and not [f for f in kept_after(report, after) if f in promised]
    assert all(f"int8-align={int8_align}" in f.fix_pass for f in promised if "pad-channels" in f.fix_pass) == (int8_align == 16)
