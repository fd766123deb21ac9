"""The README's example pass, written against the canonical form, works on raw exporter output."""

import sys
from pathlib import Path

from tests.fixtures.builders import make_model, node, rand
from tests.helpers import assert_rewrites_equivalently, assert_unchanged

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from drop_zero_bias import DropZeroBias  # noqa: E402


def conv_with_bias(bias, through_identity: bool = False):
    nodes = [node("Conv", ["x", "w", "b_read" if through_identity else "b"], ["y"], name="conv")]
    if through_identity:  # as PyTorch exports a shared parameter
        nodes.insert(0, node("Identity", ["b"], ["b_read"], name="route_b"))
    return make_model(nodes, {"x": [1, 3, 8, 8]}, ["y"], {"w": rand(4, 3, 3, 3), "b": bias})


def test_drops_a_zero_bias_routed_through_identity_once_canonicalized():
    out, record = assert_rewrites_equivalently(conv_with_bias(rand(4) * 0, through_identity=True), DropZeroBias())
    [conv] = out.graph.node
    assert list(conv.input) == ["x", "w"] and record.counters == {"biases_dropped": 1}


def test_keeps_a_nonzero_bias():
    assert_unchanged(conv_with_bias(rand(4, seed=3)), DropZeroBias(), reason="bias is not all zeros")
