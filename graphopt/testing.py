"""Equivalence assertions for pytest suites: graphopt's own tests use them, and so can yours.

    from graphopt.testing import assert_equivalent, assert_matches_golden

    def test_export_is_unchanged_by_graphopt(tmp_path):
        optimized, _ = graphopt.optimize("model.onnx")
        assert_equivalent("model.onnx", optimized)

Golden outputs are polygraphy RunResults JSON files (`polygraphy run --save-outputs` writes the
same format), so a golden recorded once, by either tool, checks every later model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import onnx

from graphopt import modelio
from graphopt.errors import EquivalenceError
from graphopt.goldens import inputs_path_for, load_outputs, save_inputs, save_outputs
from graphopt.inputs import graph_inputs, load_input_sets
from graphopt.verify import References, Tolerance, Verdict, Verifier, compare_outputs

ModelLike = onnx.ModelProto | str | os.PathLike


def _load(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else modelio.load_model(model)


def check_equivalent(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    tolerance: Tolerance | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    backend: str = "auto",
) -> Verdict:
    """Run both models on the same seeded input sets: ORT on `reference`, the backend on `candidate`."""
    reference, candidate = _load(reference), _load(candidate)
    verifier = Verifier(reference, input_shapes=input_shapes, seed=seed, tolerance=tolerance, backend=backend)
    verdict, _ = verifier.check(verifier.reference_of_input(reference), candidate)
    return verdict


def assert_equivalent(reference: ModelLike, candidate: ModelLike, **options) -> Verdict:
    """Fail with the worst output and its error unless both models compute the same outputs."""
    verdict = check_equivalent(reference, candidate, **options)
    if not verdict.passed:
        raise AssertionError(f"models differ ({verdict.backend}): {verdict.worst.describe()}")
    return verdict


def record_golden(model: ModelLike, path: str | os.PathLike, **options) -> References:
    """Run `model` with ORT on seeded input sets; save the outputs to `path` (one iteration per set), the inputs beside it."""
    model = _load(model)
    verifier = Verifier(model, **options)
    outputs = verifier.reference_of_input(model)
    save_outputs(path, outputs)
    save_inputs(inputs_path_for(path), verifier.feeds)
    return outputs


def assert_matches_golden(model: ModelLike, path: str | os.PathLike, *, tolerance: Tolerance | None = None, backend: str = "auto") -> Verdict:
    """Feed a golden's saved inputs to `model` and compare with its saved outputs."""
    model = _load(model)
    expected = load_outputs(path, model)
    input_sets = load_input_sets(inputs_path_for(path), graph_inputs(model))
    if len(input_sets) != len(expected):
        raise AssertionError(f"golden {os.fspath(path)} has {len(expected)} iterations for {len(input_sets)} input sets")
    verifier = Verifier(model, input_sets=input_sets, tolerance=tolerance, backend=backend)
    verdict, _ = verifier.check(tuple(expected), model)
    if not verdict.passed:
        raise AssertionError(f"model differs from golden {os.fspath(path)} ({verdict.backend}): {verdict.worst.describe()}")
    return verdict


__all__ = ["EquivalenceError", "assert_equivalent", "assert_matches_golden", "check_equivalent", "compare_outputs", "record_golden"]
