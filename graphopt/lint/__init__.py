"""`graphopt lint`: a TensorRT readiness report for an ONNX model.

    from graphopt.lint import lint_model
    report = lint_model(onnx.load("model.onnx"), precision="int8")
    for finding in report.findings:
        print(finding.code, finding.nodes, finding.detail, finding.fix_pass)

Each finding names the nodes involved, a severity, why TensorRT runs them worse, and the
graphopt passes that fix it (or None). The checks, one module each: fusion blockers,
quantization continuity (int8 only), channel alignment, sibling Convs TensorRT will not merge,
and ONNX-TensorRT parser support. Which passes fix what is not a rule of lint's own: it runs
them and looks (forecast.py). docs/lint.md documents the codes and the JSON schema.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click
import onnx

from graphopt import modelio
from graphopt.errors import EXIT_OK
from graphopt.graphs import name_unnamed_nodes
from graphopt.lint import alignment, fusion, merging, parser_support, quantization
from graphopt.lint.context import QDQ_OPS, build_context
from graphopt.lint.findings import PRECISIONS, SCHEMA_VERSION, Finding, Kind, LintReport, Precision, match_findings
from graphopt.lint.forecast import explained, forecast_fixes
from graphopt.lint.render import diff_findings, format_findings

EXIT_LINT_ERRORS = 1  # a finding of severity error: the ONNX-TensorRT parser would reject the model


def lint_model(model: onnx.ModelProto, precision: Precision | None = None, name: str | None = None,
               fixes: bool = True) -> LintReport:
    """Lint a model (not modified). `precision` defaults to int8 for Q/DQ models, else fp16.

    With `fixes`, lint runs `graphopt run --passes all` on a copy, unverified, to tell which
    passes fix each finding (forecast.py): that costs about what `graphopt run --no-verify`
    costs. Without it no finding names a fix.
    """
    if precision is None:
        precision = "int8" if any(n.op_type in QDQ_OPS for n in model.graph.node) else "fp16"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    named = onnx.ModelProto()
    named.CopyFrom(model)
    name_unnamed_nodes(named)  # findings name nodes; exporters leave some unnamed
    report = _lint(named, precision)
    report.model = name or model.graph.name or "model"
    if fixes:
        report.findings = forecast_fixes(named, report.findings, precision, lambda m: _lint(m, precision).findings, report.notes)
    else:
        report.findings = [dataclasses.replace(explained(f), extra_flops_share=None) for f in report.findings]
    return report


def _lint(model: onnx.ModelProto, precision: Precision) -> LintReport:
    """The findings as the checks make them: no fixes, hints apart from the detail."""
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    name_unnamed_nodes(prepared)
    ctx = build_context(prepared, precision)
    findings = [
        *parser_support.check(ctx, prepared),
        *fusion.check(ctx),
        *quantization.check(ctx),
        *alignment.check(ctx),
        *merging.check(ctx),
    ]
    return LintReport(prepared.graph.name or "model", precision, ctx.total_flops, findings, ctx.notes)


def lint_command_impl(model_path: str | os.PathLike, precision: Precision | None, json_path: str | os.PathLike | None,
                      fixes: bool = True) -> int:
    """`graphopt lint`: print the report, write JSON if asked; exit 1 when the parser would reject it.

    Bad input raises ModelError/OutputPathError, which the CLI turns into one line and exit 2.
    """
    source = modelio.read_model(model_path)
    model = source.model
    outputs = [modelio.OutputFile(Path(json_path), "--json")] if json_path else []
    [target] = modelio.check_outputs(outputs, source.inputs()) or [None]
    report = lint_model(model, precision, name=Path(model_path).name, fixes=fixes)
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
