"""What `graphopt lint` reports: finding kinds, findings, and the report with its JSON form.

A `Kind` is one class of problem: a stable code (`GO-ALIGN-001`), a name, a severity and the
one sentence on why TensorRT runs it worse. Each check module declares its kinds and calls
`kind.at(...)` for every site it finds; a finding whose rule depends on a layer's precision
(alignment, INT8 regions) carries that layer's `LayerPrecision`, read from the graph by
graphopt.precision as pad-channels reads it. The JSON schema is documented in docs/lint.md; bump
`SCHEMA_VERSION` whenever a field changes meaning or disappears (adding a field does not).

A finding's `subject` says what it is about in terms a rewrite keeps: tensor names (a pass may
rename the nodes it rewrites, but keeps the tensors around them), a graph input, an opset.
`match_findings` pairs the findings of two related models by subject, so a finding a pass left
in place is "kept" even when its nodes have new names.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from graphopt.lint import trt_parser_ops
from graphopt.precision import LayerPrecision, TargetPrecision

SCHEMA_VERSION = 2  # 2: per-finding precision and decided_by; the report's target_precision and int8_align

Severity = Literal["error", "warning", "info"]
# error: the TensorRT parser rejects the model; warning: it builds, but slower than it could;
# info: worth knowing (a rewrite graphopt offers, a profile the engine will need).
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")

# What a float32 layer will run in (the user converts or quantizes it); quantized and float16
# layers run in their own types. The same choice as pad-channels' `precision` option.
PRECISIONS: tuple[TargetPrecision, ...] = ("fp16", "int8", "fp8")


@dataclass(frozen=True)
class Kind:
    code: str
    name: str
    category: str  # fusion, quantization, alignment, merging, parser
    severity: Severity
    why: str  # one sentence: why TensorRT runs this worse
    reference: str | None = None

    def at(
        self,
        nodes: Sequence[str],
        detail: str,
        *,
        fix_pass: str | None = None,
        severity: Severity | None = None,
        flops_share: float | None = None,
        extra_flops_share: float | None = None,
        rule: str | None = None,
        subject: Sequence[str] = (),
        likeness: str | None = None,
        hint: str | None = None,
        precision: LayerPrecision | None = None,
    ) -> Finding:
        return Finding(
            code=self.code, name=self.name, category=self.category, severity=severity or self.severity,
            nodes=tuple(nodes), detail=detail, why=self.why, fix_pass=fix_pass, flops_share=flops_share,
            extra_flops_share=extra_flops_share, rule=rule, reference=self.reference, subject=tuple(subject),
            likeness=likeness, hint=hint, precision=None if precision is None else precision.precision,
            decided_by=None if precision is None else precision.decided_by,
        )


@dataclass(frozen=True)
class Finding:
    code: str
    name: str
    category: str
    severity: Severity
    nodes: tuple[str, ...]  # node names, the first one is where to look
    detail: str  # what was found, at which nodes
    why: str
    fix_pass: str | None  # a pipeline spec that fixes it, e.g. "pad-channels(align=16)"; None: no pass does
    flops_share: float | None = None  # of the model's dense-layer FLOPs: the layers this finding is about
    extra_flops_share: float | None = None  # what the fix would add, as a share of the model's FLOPs
    rule: str | None = None  # the rule broken, where a kind has several (alignment)
    reference: str | None = None
    subject: tuple[str, ...] = ()  # what it is about: tensor names (or an input, an opset) a rewrite keeps
    precision: str | None = None  # the layer's, for findings about one layer's precision: int8, fp8, fp16, ...
    decided_by: str | None = None  # how graphopt.precision decided it: "Q/DQ on its input and weight", ...
    # Not in the JSON: a name-free description that pairs a finding whose tensors a pass renamed
    # (a Gemm that became a Conv of the same channels), and why a pass may leave it.
    likeness: str | None = field(default=None, repr=False)
    hint: str | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[str, str | None, tuple[str, ...]]:
        """What identifies a finding across two lint runs of related models."""
        return self.code, self.rule, self.subject

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["nodes"] = list(self.nodes)
        data["subject"] = list(self.subject)
        del data["likeness"], data["hint"]
        return data


@dataclass
class LintReport:
    model: str
    target_precision: TargetPrecision  # what float32 layers run in
    int8_align: int  # the channel multiple of an int8 layer: 32 or 16
    total_flops: int
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the lint could not judge, and summaries
    layers: dict[str, LayerPrecision] = field(default_factory=dict)  # every dense layer's precision

    def count(self, severity: Severity) -> int:
        return sum(f.severity == severity for f in self.findings)

    @property
    def has_errors(self) -> bool:
        return self.count("error") > 0

    def codes(self) -> Counter:
        return Counter(f.code for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "target_precision": self.target_precision,
            "int8_align": self.int8_align,
            "parser": {
                "name": trt_parser_ops.PARSER,
                "version": trt_parser_ops.PARSER_VERSION,
                "commit": trt_parser_ops.PARSER_COMMIT,
                "opsets": [trt_parser_ops.MIN_OPSET, trt_parser_ops.MAX_OPSET],
            },
            "total_flops": self.total_flops,
            "summary": {severity: self.count(severity) for severity in SEVERITIES} | {"by_code": dict(sorted(self.codes().items()))},
            "notes": list(self.notes),
            "layers": {name: {"precision": p.precision, "decided_by": p.decided_by} for name, p in self.layers.items()},
            "findings": [f.to_dict() for f in self.findings],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class FindingsDiff:
    """Findings of two related models paired up, by index into each list."""

    kept: list[tuple[int, int]]  # (before, after): the same problem about the same thing
    resolved: list[int]  # before only
    new: list[int]  # after only


def match_findings(before: Sequence[Finding], after: Sequence[Finding]) -> FindingsDiff:
    """Pair findings by code, rule and subject; then the rest of a kind by their likeness.

    Equal keys pair up in order (two findings can share one subject). Likeness pairs a finding
    whose tensors a rewrite renamed with its counterpart: a classifier Gemm of 1000 channels that
    fc-to-conv turned into a Conv of 1000 channels is the same problem.
    """
    kept: list[tuple[int, int]] = []
    left_before, left_after = list(range(len(before))), list(range(len(after)))
    for describe in (_key, _likeness):
        waiting: dict[Any, list[int]] = {}
        for j in left_after:
            if (key := describe(after[j])) is not None:
                waiting.setdefault(key, []).append(j)
        pairs = [(i, waiting[key].pop(0)) for i in left_before if (key := describe(before[i])) is not None and waiting.get(key)]
        kept += pairs
        paired_before, paired_after = {i for i, _ in pairs}, {j for _, j in pairs}
        left_before = [i for i in left_before if i not in paired_before]
        left_after = [j for j in left_after if j not in paired_after]
    return FindingsDiff(sorted(kept), left_before, left_after)


def _key(finding: Finding) -> tuple:
    return finding.key


def _likeness(finding: Finding) -> tuple | None:
    return None if finding.likeness is None else (finding.code, finding.rule, finding.likeness)
