"""`graphopt lint`: a TensorRT readiness report for an ONNX model.

    from graphopt.lint import lint_model
    report = lint_model(onnx.load("model.onnx"), precision="fp16", int8_align=32)
    for finding in report.findings:
        print(finding.code, finding.nodes, finding.detail, finding.precision, finding.decided_by, finding.fix_pass)

Each finding names the nodes involved, a severity, why TensorRT runs them worse, and the
graphopt passes that fix it (or None). Each layer is judged in its own precision, read from the
graph by graphopt.precision as pad-channels reads it; `precision` is what float32 layers run in
and `int8_align` an int8 layer's channel multiple, the options of pad-channels of the same names.
The checks, one module each: fusion blockers, quantization continuity (where layers run int8),
channel alignment, sibling Convs TensorRT will not merge, and ONNX-TensorRT parser support. Which passes fix what is not a rule of lint's own: it runs
them and looks (forecast.py). docs/lint.md documents the codes and the JSON schema.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

import click
import onnx

from graphopt import modelio
from graphopt.errors import EXIT_OK
from graphopt.graphs import name_unnamed_nodes
from graphopt.lint import alignment, fusion, merging, parser_support, quantization
from graphopt.lint.context import build_context, is_weighted, pass_default
from graphopt.lint.findings import PRECISIONS, SCHEMA_VERSION, Finding, Kind, LintReport, match_findings
from graphopt.lint.forecast import PADDING_PASS, explained, forecast_fixes, pipeline_for
from graphopt.precision import TargetPrecision
from graphopt.lint.render import diff_findings, format_findings

EXIT_LINT_ERRORS = 1  # a finding of severity error: the ONNX-TensorRT parser would reject the model


def lint_model(model: onnx.ModelProto, precision: TargetPrecision | None = None, name: str | None = None,
               fixes: bool = True, int8_align: int | None = None) -> LintReport:
    """Lint a model (not modified). `precision` (float32 layers) and `int8_align` default to pad-channels'.

    With `fixes`, lint runs `graphopt run --passes all` on a copy, unverified, with pad-channels
    given the same precision and int8_align, to tell which passes fix each finding (forecast.py):
    that costs about what `graphopt run --no-verify` costs. Without it no finding names a fix.
    """
    precision = pass_default(PADDING_PASS, "precision") if precision is None else precision
    int8_align = pass_default(PADDING_PASS, "int8_align") if int8_align is None else int8_align
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if int8_align not in (16, 32):
        raise ValueError(f"int8_align must be 16 or 32, not {int8_align!r}")
    named = onnx.ModelProto()
    named.CopyFrom(model)
    name_unnamed_nodes(named)  # findings name nodes; exporters leave some unnamed
    report = _lint(named, precision, int8_align)
    report.model = name or model.graph.name or "model"
    if fixes:
        report.findings = forecast_fixes(named, report.findings, pipeline_for(precision, int8_align),
                                         lambda m: _lint(m, precision, int8_align).findings, report.notes)
    else:
        report.findings = [dataclasses.replace(explained(f), extra_flops_share=None) for f in report.findings]
    return report


def _lint(model: onnx.ModelProto, precision: TargetPrecision, int8_align: int) -> LintReport:
    """The findings as the checks make them: no fixes, hints apart from the detail."""
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    name_unnamed_nodes(prepared)
    ctx = build_context(prepared, precision, int8_align)
    findings = [
        *parser_support.check(ctx, prepared),
        *fusion.check(ctx),
        *quantization.check(ctx),
        *alignment.check(ctx),
        *merging.check(ctx),
    ]
    layers = {n.name: ctx.precision_of(n) for n in ctx.graph.nodes if is_weighted(n)}
    if layers:
        counts = Counter(f"{p.precision} ({p.decided_by})" for p in layers.values())
        ctx.notes.append("precision: " + ", ".join(f"{n} {'layer' if n == 1 else 'layers'} {how}" for how, n in counts.most_common()))
    return LintReport(prepared.graph.name or "model", precision, int8_align, ctx.total_flops, findings, ctx.notes, layers)


def lint_command_impl(model_path: str | os.PathLike, precision: TargetPrecision | None, json_path: str | os.PathLike | None,
                      fixes: bool = True, int8_align: int | None = None) -> int:
    """`graphopt lint`: print the report, write JSON if asked; exit 1 when the parser would reject it.

    Bad input raises ModelError/OutputPathError, which the CLI turns into one line and exit 2.
    """
    source = modelio.read_model(model_path)
    model = source.model
    outputs = [modelio.OutputFile(Path(json_path), "--json")] if json_path else []
    [target] = modelio.check_outputs(outputs, source.inputs()) or [None]
    report = lint_model(model, precision, name=Path(model_path).name, fixes=fixes, int8_align=int8_align)
    click.echo(format_findings(report))
    if target is not None:
        modelio.write_text_atomic(target, report.to_json())
    return EXIT_LINT_ERRORS if report.has_errors else EXIT_OK


__all__ = [
    "EXIT_LINT_ERRORS",
    "SCHEMA_VERSION",
    "Finding",
    "Kind",
    "LintReport",
    "diff_findings",
    "format_findings",
    "lint_command_impl",
    "lint_model",
    "match_findings",
]
