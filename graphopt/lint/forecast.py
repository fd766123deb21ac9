"""Which pass fixes a finding: lint asks the passes instead of guessing their rules.

Lint runs the default pipeline on the model, one pass at a time and unverified, so that each
pass's own `find_sites` decides what it rewrites, on the graph that pass sees in `all`. It lints
the model after every pass that changed it and follows each finding from one model to the next
(`match_findings`: by subject, then by likeness). A pass keeps a finding (perhaps renaming its
nodes), resolves it, or turns it into findings of the same kind about a tensor they share: two
narrow sibling Convs merged into one Conv become the alignment finding of that Conv. A finding
of which nothing is left after the last pass is fixed, and its fix is the passes that touched
it, in pipeline order (`merge-convs,pad-channels`). A finding left over has no fix; where passes
changed it on the way, its detail says what the pipeline leaves.

The int8 alignment rules (multiples of 16 and of 32) are met only by pad-channels with that
alignment, so for their findings the pipeline is `all(pad-channels.align=16)` or
`all(pad-channels.align=32)`, sharing every model before pad-channels, and the fix names the
option. Everything else follows plain `all`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx

from graphopt.lint import alignment
from graphopt.lint.findings import Finding, FindingsDiff, Precision, match_findings
from graphopt.passbase import GraphPass
from graphopt.pipeline import Pipeline
from graphopt.registry import default_order, get_pass
from graphopt.spec import format_pass, parse_spec

DEFAULT_PIPELINE = "all"
PADDING_PASS = "pad-channels"

Lint = Callable[[onnx.ModelProto], list[Finding]]


@dataclass(frozen=True)
class Stage:
    """A pass that changed the model, and the findings after it."""

    graph_pass: GraphPass
    findings: list[Finding]
    diff: FindingsDiff  # from the findings before this pass


@dataclass(frozen=True)
class Trail:
    """What became of one finding: the passes that touched it and what is left at the end."""

    touched: list[str]  # the passes, as spec items, in pipeline order
    left: list[Finding]  # what the last pass leaves of it; empty when fixed
    last_seen: list[tuple[int, int]]  # (stage, finding) it was last seen as, before it was resolved


def pipeline_for(finding: Finding, precision: Precision) -> str:
    """The pipeline that can fix this finding: `all`, or `all` padding to its alignment rule."""
    rule = next((r for r in alignment.RULES[precision] if r.name == finding.rule), None)
    if rule is None or PADDING_PASS not in default_order() or rule.align == get_pass(PADDING_PASS).Options().alignment:
        return DEFAULT_PIPELINE
    return f"{DEFAULT_PIPELINE}({PADDING_PASS}.align={rule.align})"


def forecast_fixes(model: onnx.ModelProto, findings: Sequence[Finding], precision: Precision, lint: Lint,
                   notes: list[str]) -> list[Finding]:
    """`findings` (of `model`) with the fix the passes give each, or with why they leave it."""
    findings = list(findings)
    chosen = [pipeline_for(f, precision) for f in findings]
    pipelines = sorted(set(chosen))
    runs = _run_pipelines(model, findings, pipelines, lint)
    result = list(findings)
    for pipeline in pipelines:
        trails = {i: _follow(i, findings, runs[pipeline]) for i, p in enumerate(chosen) if p == pipeline}
        # Findings merged into one (siblings into a merged Conv) share the cost of fixing it.
        sharers = Counter(seen for trail in trails.values() if not trail.left for seen in trail.last_seen)
        for i, trail in trails.items():
            result[i] = _with_fix(findings[i], trail, runs[pipeline], sharers, pipeline)
    changed = {s.graph_pass.name for stages in runs.values() for s in stages}
    notes.append(f"fixes: lint ran {' and '.join(f'`{p}`' for p in pipelines) or 'no pipeline'} without verification; "
                 f"passes that changed the model: {', '.join(n for n in default_order() if n in changed) or 'none'}")
    return result


def _run_pipelines(model: onnx.ModelProto, findings: list[Finding], pipelines: list[str], lint: Lint) -> dict[str, list[Stage]]:
    """The stages of each pipeline; a prefix shared by two pipelines runs once."""
    done: dict[tuple[str, ...], tuple[onnx.ModelProto, list[Finding], Stage | None]] = {}
    runs = {}
    for pipeline in pipelines:
        current, current_findings, prefix, stages = model, findings, (), []
        for graph_pass in parse_spec(pipeline):
            prefix += (format_pass(graph_pass),)
            if prefix not in done:
                out, report = Pipeline([graph_pass], verify=False).run(current)
                if report.passes[0].changed:
                    after = lint(out)
                    done[prefix] = (out, after, Stage(graph_pass, after, match_findings(current_findings, after)))
                else:
                    done[prefix] = (current, current_findings, None)
            current, current_findings, stage = done[prefix]
            if stage is not None:
                stages.append(stage)
        runs[pipeline] = stages
    return runs


def _follow(index: int, findings: list[Finding], stages: list[Stage]) -> Trail:
    """Follow `findings[index]` through the stages: kept, renamed, resolved or turned into others."""
    previous, current = findings, [index]
    touched: list[str] = []
    last_seen = [(-1, index)]
    for number, stage in enumerate(stages):
        kept = dict(stage.diff.kept)
        following = []
        for i in current:
            if i in kept:
                if stage.findings[kept[i]].nodes != previous[i].nodes:
                    touched.append(format_pass(stage.graph_pass))
                following.append(kept[i])
            else:
                touched.append(format_pass(stage.graph_pass))
                following += [j for j in stage.diff.new if _became(previous[i], stage.findings[j])]
        previous, current = stage.findings, sorted(set(following))
        if current:
            last_seen = [(number, j) for j in current]
    return Trail(list(dict.fromkeys(touched)), [previous[j] for j in current], last_seen)


def _became(old: Finding, new: Finding) -> bool:
    """A new finding of the same kind about a tensor the resolved one was about."""
    return new.code == old.code and new.rule == old.rule and bool(set(new.subject) & set(old.subject))


def _with_fix(finding: Finding, trail: Trail, stages: list[Stage], sharers: Counter, pipeline: str) -> Finding:
    if not trail.left:
        extra = [(share, sharers[seen]) for seen in trail.last_seen if (share := _extra(finding, stages, seen)) is not None]
        return dataclasses.replace(finding, fix_pass=",".join(trail.touched), hint=None,
                                   extra_flops_share=sum(share / count for share, count in extra) if extra else None)
    left = [explained(f).detail for f in trail.left]
    if any(detail != explained(finding).detail for detail in left):  # passes changed it: say what they leave
        return dataclasses.replace(finding, detail=f"{finding.detail}; after `{pipeline}`: {' / '.join(left)}", fix_pass=None,
                                   extra_flops_share=None, hint=None)
    return dataclasses.replace(explained(finding), fix_pass=None, extra_flops_share=None)


def _extra(finding: Finding, stages: list[Stage], seen: tuple[int, int]) -> float | None:
    stage, index = seen
    return finding.extra_flops_share if stage < 0 else stages[stage].findings[index].extra_flops_share


def explained(finding: Finding) -> Finding:
    """A finding no pass fixes, with its hint (why a pass leaves it) in its detail."""
    if finding.hint is None:
        return finding
    return dataclasses.replace(finding, detail=f"{finding.detail}; {finding.hint}", hint=None)
