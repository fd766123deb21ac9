"""Text for people: a lint report grouped by finding kind, and what changed between two reports."""

from __future__ import annotations

from collections import defaultdict

from graphopt.lint import trt_parser_ops
from graphopt.lint.findings import SEVERITIES, Finding, LintReport, match_findings

SITES_SHOWN = 5  # per kind in the text report; --json has them all
NEW_SHOWN = 10


def format_findings(report: LintReport) -> str:
    lines = [
        f"{report.model}: TensorRT readiness, each layer in its own precision (float32 layers: {report.target_precision}, "
        f"int8 aligned to {report.int8_align}; {report.total_flops / 1e9:.3g} GFLOPs; parser {trt_parser_ops.PARSER} {trt_parser_ops.PARSER_VERSION})"
    ]
    for group in _by_kind(report.findings):
        first = group[0]
        shares = [f.flops_share for f in group if f.flops_share is not None]
        share = f", {sum(shares):.1%} of FLOPs" if shares and first.category in ("alignment", "merging") else ""
        rule = f" [{first.rule}]" if first.rule else ""
        lines.append("")
        lines.append(f"{_worst(group)}  {first.code} {first.name}{rule}: {_count(len(group), 'site')}{share}")
        lines.append(f"    why: {first.why}")
        for finding in group[:SITES_SHOWN]:
            lines.append(f"  - {_site(finding)}")
        if len(group) > SITES_SHOWN:
            lines.append(f"  ... and {len(group) - SITES_SHOWN} more (--json lists all)")
        if first.reference:
            lines.append(f"    see: {first.reference}")
    if report.notes:
        lines.append("")
        lines.extend(f"note: {note}" for note in report.notes)
    counts = ", ".join(_count(report.count(s), s) for s in SEVERITIES)
    lines.append("")
    lines.append(f"{_count(len(report.findings), 'finding')}: {counts}")
    return "\n".join(lines)


def diff_findings(before: LintReport, after: LintReport) -> str:
    """How the findings changed from a pipeline's input to its output (`graphopt run --lint`).

    Findings are paired by what they are about (`match_findings`: code, rule and subject, the
    tensors a pass keeps), not by node names, so a finding a pass left in place is unchanged
    even when the pass renamed its nodes.
    """
    diff = match_findings(before.findings, after.findings)
    lines = [f"lint (float32 layers: {after.target_precision}): {_count(len(before.findings), 'finding')} -> {len(after.findings)} "
             f"({len(diff.resolved)} resolved, {len(diff.new)} new, {len(diff.kept)} unchanged)"]
    counts_before, counts_after = before.codes(), after.codes()
    names = {f.code: f.name for f in [*before.findings, *after.findings]}
    for code in sorted(set(counts_before) | set(counts_after)):
        change = counts_after[code] - counts_before[code]
        mark = "" if change == 0 else f" ({change:+d})"
        lines.append(f"  {code} {names[code]}: {counts_before[code]} -> {counts_after[code]}{mark}")
    added = [after.findings[j] for j in diff.new]
    for finding in added[:NEW_SHOWN]:
        lines.append(f"  new: {finding.severity} {finding.code} {_site(finding)}")
    if len(added) > NEW_SHOWN:
        lines.append(f"  ... and {len(added) - NEW_SHOWN} more new findings")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 or noun == "info" else f"{n} {noun}s"


def _by_kind(findings: list[Finding]) -> list[list[Finding]]:
    groups: dict[tuple[str, str | None], list[Finding]] = defaultdict(list)
    for finding in findings:
        groups[(finding.code, finding.rule)].append(finding)
    ordered = sorted(groups.values(), key=lambda g: (SEVERITIES.index(_worst(g)), g[0].code))
    return [sorted(g, key=lambda f: (SEVERITIES.index(f.severity), -(f.flops_share or 0.0))) for g in ordered]


def _worst(group: list[Finding]) -> str:
    return min((f.severity for f in group), key=SEVERITIES.index)


def _site(finding: Finding) -> str:
    parts = [finding.detail]
    if finding.flops_share is not None and finding.category == "alignment":
        parts.append(f"{finding.flops_share:.2%} of FLOPs")
    if finding.fix_pass:
        cost = f" (+{finding.extra_flops_share:.2%} FLOPs)" if finding.extra_flops_share else ""
        parts.append(f"fix: {finding.fix_pass}{cost}")
    else:
        parts.append("no graphopt pass fixes it")
    return "; ".join(parts)
