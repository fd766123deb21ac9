"""Which pass fixes a finding: lint asks the passes instead of guessing their rules.

Lint runs the default pipeline on the model, unverified (each pass's own `find_sites` decides
what it rewrites, on the canonical graph that pass sees in `all`), lints the model after every
step that changed it (a pass, or the canonicalization after one) and follows each finding from
one model to the next (`match_findings`: by subject, then by likeness). A step keeps a finding
(perhaps renaming its nodes), resolves it, or turns it into findings of the same kind about a
tensor they share: two narrow sibling Convs merged into one Conv become the alignment finding of
that Conv. A finding of which nothing is left after the last step is fixed, and its fix is the
passes that touched it, in pipeline order (`merge-convs,pad-channels`); what the canonicalization
after a pass does counts as that pass's doing, as it does in `graphopt run`. A finding left over
has no fix; where the passes changed it on the way, its detail says what the pipeline leaves.

pad-channels runs with lint's own target precision (for float32 layers) and int8 alignment,
`all(pad-channels.precision=int8,pad-channels.int8-align=16)` where they are not its defaults,
so the passes align each layer to the multiple its finding names, and a fix names the options
it needs: `merge-convs,pad-channels(int8-align=16)`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx

from graphopt.lint.findings import Finding, FindingsDiff, match_findings
from graphopt.precision import TargetPrecision
from graphopt.pipeline import Pipeline
from graphopt.registry import default_order, get_pass
from graphopt.report import INPUT, PassRecord
from graphopt.spec import parse_spec

DEFAULT_PIPELINE = "all"
PADDING_PASS = "pad-channels"

Lint = Callable[[onnx.ModelProto], list[Finding]]


@dataclass(frozen=True)
class Stage:
    """A step that changed the model, and the findings after it."""

    step: str  # the pass it is the doing of, as a spec item: `pad-channels(align=16)`
    findings: list[Finding]
    diff: FindingsDiff  # from the findings before this step


@dataclass(frozen=True)
class Trail:
    """What became of one finding: the passes that touched it and what is left at the end."""

    touched: list[str]  # the passes, as spec items, in pipeline order
    left: list[Finding]  # what the last step leaves of it; empty when fixed
    last_seen: list[tuple[int, int]]  # (stage, finding) it was last seen as, before it was resolved


def pipeline_for(target: TargetPrecision, int8_align: int) -> str:
    """`all`, with pad-channels given lint's target precision and int8 alignment (where not its defaults)."""
    if PADDING_PASS not in default_order():
        return DEFAULT_PIPELINE
    defaults = get_pass(PADDING_PASS).Options()
    options = [f"{PADDING_PASS}.{name}={value}" for name, value, default in
               (("precision", target, defaults.precision), ("int8-align", int8_align, defaults.int8_align)) if value != default]
    return f"{DEFAULT_PIPELINE}({','.join(options)})" if options else DEFAULT_PIPELINE


def forecast_fixes(model: onnx.ModelProto, findings: Sequence[Finding], pipeline: str, lint: Lint,
                   notes: list[str]) -> list[Finding]:
    """`findings` (of `model`) with the fix `pipeline` gives each, or with why it leaves them."""
    findings = list(findings)
    stages = _stages(model, findings, pipeline, lint)
    trails = [_follow(i, findings, stages) for i in range(len(findings))]
    # Findings merged into one (siblings into a merged Conv) share the cost of fixing it.
    sharers = Counter(seen for trail in trails if not trail.left for seen in trail.last_seen)
    result = [_with_fix(finding, trail, stages, sharers, pipeline) for finding, trail in zip(findings, trails)]
    changed = dict.fromkeys(s.step for s in stages)
    notes.append(f"fixes: lint ran `{pipeline}` without verification; passes that changed the model: {', '.join(changed) or 'none'}")
    return result


def _stages(model: onnx.ModelProto, findings: list[Finding], pipeline: str, lint: Lint) -> list[Stage]:
    """Run `pipeline` on `model` and lint the model after every step that changed it."""
    stages: list[Stage] = []
    current, last_pass = findings, None

    def observe(record: PassRecord, after_step: onnx.ModelProto) -> None:
        nonlocal current, last_pass
        if not record.canonicalization:
            last_pass = record.spec
        if record.changed:
            # The canonical form before the first pass is simplify's doing; after a pass, that pass's.
            step = record.spec if not record.canonicalization or record.after == INPUT else last_pass
            after = lint(after_step)
            stages.append(Stage(step, after, match_findings(current, after)))
            current = after

    Pipeline(parse_spec(pipeline), verify=False, observer=observe).run(model)
    return stages


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
                    touched.append(stage.step)
                following.append(kept[i])
            else:
                touched.append(stage.step)
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
