"""ONNX's own backend node tests through `graphopt run --load-inputs`, each case on its own inputs.

The onnx wheel ships the generators of these cases (onnx.backend.test.case.node), not their data
files, so the cases are generated in memory: a model of one op, and the inputs its test feeds it.
Random data is invalid for many ops (CumSum's axis, Col2Im's shapes), so every case runs on the
inputs it was written for, as a user runs graphopt on their own data. Every third case that ONNX
Runtime implements (it creates a session) is taken, in name order, about 590 cases, bfloat16,
float8, 4-bit, string and sequence inputs included. graphopt must crash on none (exit 3), refuse
(exit 2) under 3% of them, and never write a model that differs (exit 1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from polygraphy.json import save_json

from graphopt.cli import main
from graphopt.goldens import saveable

pytestmark = pytest.mark.slow

EVERY = 3
REFUSED_AT_MOST = 0.03


@dataclass(frozen=True)
class Outcome:
    case: str
    exit_code: int
    message: str


def node_cases() -> list:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the generators compute expected outputs with numpy, overflow included
        import onnx.backend.test.case.node as cases

        return sorted(cases.collect_testcases(), key=lambda case: case.name)


def as_value(value: object) -> object:
    """A test input as a feed value: TensorProtos (bfloat16, float8, 4-bit, strings) as arrays, sequences as lists."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [as_value(item) for item in value]
    return None if value is None else np.asarray(value)


def case_feed(case) -> dict[str, object]:
    inputs, _ = case.data_sets[0]
    return {vi.name: as_value(value) for vi, value in zip(case.model.graph.input, inputs)}


def onnx_runtime_implements(case) -> bool:
    """ORT has a kernel for the op and its types: it creates a session (running it is graphopt's job)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(case.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # ORT raises its own types for ops and types it does not implement
        return False
    return True


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[Outcome]:
    chosen = [case for case in node_cases() if onnx_runtime_implements(case)][::EVERY]
    folder = tmp_path_factory.mktemp("backend_nodes")
    runner = CliRunner()
    results = []
    for case in chosen:
        model, inputs, out = folder / f"{case.name}.onnx", folder / f"{case.name}.inputs.json", folder / f"{case.name}.out.onnx"
        model.write_bytes(case.model.SerializeToString())
        save_json([saveable(case_feed(case))], str(inputs))
        result = runner.invoke(main, ["run", str(model), "-o", str(out), "--load-inputs", str(inputs), "-q"])
        results.append(Outcome(case.name, result.exit_code, (result.output or repr(result.exception)).strip()))
    return results


def describe(outcomes: list[Outcome]) -> str:
    return "\n".join(f"{o.case}: exit {o.exit_code}: {o.message}" for o in outcomes)


def test_enough_cases_run(outcomes):
    assert len(outcomes) > 500


def test_graphopt_crashes_on_no_backend_node_case(outcomes):
    crashed = [o for o in outcomes if o.exit_code not in (0, 1, 2)]
    assert not crashed, describe(crashed)


def test_graphopt_refuses_under_3_percent_of_backend_node_cases(outcomes):
    refused = [o for o in outcomes if o.exit_code == 2]
    assert len(refused) < REFUSED_AT_MOST * len(outcomes), describe(refused)


def test_graphopt_writes_no_backend_node_case_that_differs(outcomes):
    differing = [o for o in outcomes if o.exit_code == 1]
    assert not differing, describe(differing)
