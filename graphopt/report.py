"""What a pipeline run did, pass by pass: the record the CLI prints and `--report` writes as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

CHANGED = "changed"
UNCHANGED = "unchanged"
PARTIAL = "partially-rolled-back"
ROLLED_BACK = "rolled-back"
# `PassRecord.after` of the canonicalization that runs before the first pass.
INPUT = "(input)"


@dataclass
class RolledBackSite:
    """A site the manager undid, and the evidence: the output that broke or the error raised."""

    site: str
    reason: str
    output: str | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None


@dataclass
class PassRecord:
    name: str
    spec: str
    iteration: int
    status: str = UNCHANGED
    nodes_before: int = 0
    nodes_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    seconds: float = 0.0
    verified_by: str | None = None  # the backend that computed the candidate's outputs
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    worst_output: str | None = None
    # How a quantized graph's rewrite was judged when its outputs differed (graphopt.layerwise).
    judged: str | None = None
    sites_found: int = 0
    sites_applied: list[str] = field(default_factory=list)
    rolled_back: list[RolledBackSite] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    # Set on the canonicalizer's records: the pass whose output it canonicalized, or INPUT.
    after: str | None = None

    @property
    def canonicalization(self) -> bool:
        return self.after is not None

    @property
    def changed(self) -> bool:
        return self.status in (CHANGED, PARTIAL)


@dataclass
class FinalCheck:
    """The whole pipeline's output against the original model."""

    verified_by: str
    passed: bool
    max_abs_err: float
    max_rel_err: float
    worst_output: str
    detail: str
    judged: str | None = None  # as PassRecord.judged


@dataclass
class InputSetRecord:
    """One input set verification ran every graph on: the seeded ones, or the user's own feeds."""

    label: str
    seed: int | None = None
    distribution: str | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Report:
    pipeline: str
    verify: bool
    backend: str | None
    atol: float | None
    rtol: float | None
    seed: int
    input_shapes: dict[str, list[int] | int]
    input_sets: list[InputSetRecord] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    seconds: float = 0.0
    iterations: int = 0
    canonicalize: bool = False  # whether the canonical form was established before and between passes
    passes: list[PassRecord] = field(default_factory=list)
    final: FinalCheck | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [p for p in self.passes if p.status in (PARTIAL, ROLLED_BACK)]

    @property
    def equivalent(self) -> bool:
        """No rewrite had to be undone and the final model matched the original (when verified)."""
        return not self.rolled_back and (self.final is None or self.final.passed)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["equivalent"] = self.equivalent
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
