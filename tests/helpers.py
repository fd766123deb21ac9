"""Assertions shared by the pass tests: run one pass through the real pass manager and check it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt import GraphPass, Pipeline
from graphopt.report import PassRecord, Report


def run_pass(model: onnx.ModelProto, graph_pass: GraphPass, **options) -> tuple[onnx.ModelProto, PassRecord, Report]:
    """One pass through the pass manager (which canonicalizes before and after it), verified with
    polygraphy unless verify=False. The record returned is the pass's own."""
    out, report = Pipeline([graph_pass], **options).run(model)
    [record] = [p for p in report.passes if not p.canonicalization] or [p for p in report.passes if p.name == graph_pass.name]
    return out, record, report


def canonical(model: onnx.ModelProto, **options) -> onnx.ModelProto:
    """The model in the canonical form the pass manager hands every pass."""
    return Pipeline([], verify=False, **options).run(model)[0]


def assert_rewrites_equivalently(model: onnx.ModelProto, graph_pass: GraphPass, **options) -> tuple[onnx.ModelProto, PassRecord]:
    """The pass changed the graph, every site verified, and the whole output matches the input."""
    out, record, report = run_pass(model, graph_pass, **options)
    assert record.status == "changed", f"{graph_pass.name}: {record.status}; skipped={record.skipped} rolled_back={record.rolled_back}"
    assert record.verified_by is not None
    assert report.final is not None and report.final.passed, report.final
    return out, record


def assert_unchanged(model: onnx.ModelProto, graph_pass: GraphPass, reason: str | None = None, **options) -> PassRecord:
    """The pass declined: the graph is node-for-node the same, and (optionally) why was counted."""
    out, record, _ = run_pass(model, graph_pass, verify=False, **options)
    assert record.status == "unchanged", f"{graph_pass.name} changed the graph: {record.sites_applied}"
    before = canonical(model, canonicalize=options.get("canonicalize", True))
    assert [(n.op_type, list(n.input), list(n.output)) for n in out.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in before.graph.node
    ]
    if reason is not None:
        assert record.skipped.get(reason, 0) >= 1, f"expected skip reason {reason!r}, got {record.skipped}"
    return record


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


# -- reading a rewritten model ---------------------------------------------------------------------


def only(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    [found] = [n for n in model.graph.node if n.op_type == op]
    return found


def attr(node: onnx.NodeProto, name: str):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)
