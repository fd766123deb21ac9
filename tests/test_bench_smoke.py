"""scripts/bench.py runs end to end on one tiny model and writes the fields the docs rely on.

No timing assertions: CI machines vary. Peers (onnxslim, onnxoptimizer) are optional, so their
tests skip when they are missing, and the output must then say "not installed" for them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"
MODEL = "synthetic-200"
TOOLS = ["floor", "graphopt", "graphopt-verify", "onnxsim", "onnxslim", "onnxoptimizer"]
PEERS = ["onnxslim", "onnxoptimizer"]


def _load_bench():
    spec = importlib.util.spec_from_file_location("graphopt_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, str(BENCH), "--models", MODEL, "--repeats", "1", "--ort-runs", "1",
         "--out", str(out), "--cache", str(out / "cache")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"[1/1] {MODEL}" in result.stdout  # progress is printed
    return out, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def _tool(data: dict, name: str) -> dict:
    [model] = data["models"]
    return model["tools"][name]


def test_markdown_table_has_a_column_per_tool_and_a_row_for_the_model(bench_run):
    _, _, markdown = bench_run
    assert "| model | nodes | " + " | ".join(TOOLS) + " |" in markdown
    assert f"| {MODEL} | " in markdown
    assert "## Targets" in markdown


def test_json_records_the_model_before_optimization(bench_run):
    _, data, _ = bench_run
    [model] = data["models"]
    assert model["name"] == MODEL and model["kind"] == "synthetic"
    assert model["stats"]["nodes"] > 150 and model["stats"]["ops"]["Conv"] > 0
    assert model["stats"]["flops"] > 0 and model["stats"]["params"] > 0
    assert model["latency"]["original_ms"] > 0


@pytest.mark.parametrize("tool", ["graphopt", "graphopt-verify", "onnxsim"])
def test_json_records_time_structure_and_latency_of_each_required_tool(bench_run, tool):
    _, data, _ = bench_run
    result = _tool(data, tool)
    assert result["status"] == "ok"
    assert len(result["seconds"]) == 1 and result["median_s"] > 0
    assert result["stats"]["nodes"] > 0 and isinstance(result["ops_diff"], dict)
    assert result["ort_ms"] > 0 and result["max_rel_err"] < 1e-3


def test_graphopt_time_is_split_into_simplify_other_passes_and_the_rest(bench_run):
    _, data, _ = bench_run
    breakdown = _tool(data, "graphopt")["graphopt"]
    assert set(breakdown["passes"]) >= {"simplify"}
    assert breakdown["simplify_s"] > 0 and breakdown["other_passes_s"] >= 0
    assert _tool(data, "graphopt-verify")["graphopt"]["equivalent"] is True


def test_environment_and_targets_are_recorded(bench_run):
    _, data, _ = bench_run
    env = data["environment"]
    assert env["cores"] >= 1 and env["versions"]["onnxsim"] and env["passes"][0] == "simplify"
    assert {t["name"] for t in data["targets"]} >= {
        "graphopt `all` without verification within 1.5x of onnxsim",
        "graphopt `all` with verification within 4x of onnxsim",
    }


@pytest.mark.parametrize("peer", PEERS)
def test_installed_peer_is_measured(bench_run, peer):
    if importlib.util.find_spec(peer) is None:
        pytest.skip(f"{peer} not installed (pip install .[bench]); the benchmark reports it as 'not installed'")
    _, data, _ = bench_run
    assert _tool(data, peer)["status"] == "ok"
    assert _tool(data, peer)["median_s"] > 0


@pytest.mark.parametrize("peer", PEERS)
def test_missing_peer_is_marked_not_installed(bench_run, peer):
    if importlib.util.find_spec(peer) is not None:
        pytest.skip(f"{peer} is installed; see test_missing_tool_reports_not_installed for the marking")
    _, data, markdown = bench_run
    assert _tool(data, peer)["status"] == "not installed"
    assert f"{peer}: not installed" in markdown


def test_missing_tool_reports_not_installed(tmp_path):
    bench = _load_bench()
    ghost = bench.Tool("ghost", "graphopt_no_such_module", lambda src, dst: None, "a tool nobody installed")
    assert bench.time_tool(ghost, tmp_path / "in.onnx", tmp_path / "out.onnx", repeats=1).status == "not installed"


def test_scaling_plot_is_drawn_or_its_absence_explained(bench_run):
    out, _, markdown = bench_run
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib not installed" in markdown
    else:
        assert (out / "scaling.png").stat().st_size > 0


# -- the typed corpus: what each tool does to the precision written into a Q/DQ graph -------------

TYPED_MODEL = "se_block.ort-qdq"  # int8 -> DQ weights, int32 -> DQ biases, Q/DQ on every activation


@pytest.fixture(scope="module")
def typed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench-typed")
    result = subprocess.run(
        [sys.executable, str(BENCH), "--models", TYPED_MODEL, "--tools", "graphopt,onnxsim", "--repeats", "1", "--ort-runs", "0",
         "--out", str(out), "--cache", str(out / "cache")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_typed_model_records_the_precision_of_the_input(typed_run):
    data, _ = typed_run
    [model] = data["models"]
    assert model["kind"] == "typed"
    assert model["precision"] == {
        "quantized_weights": 2, "float_weights": 0,  # both 1x1 convs of the SE gate, int8 -> DQ
        "quantize_nodes": 7, "dequantize_nodes": 11,
        "quantized_convs": 2, "quantized_not16": 1, "quantized_not32": 1,  # the 8-channel squeeze
        "fp16_convs": 0, "fp16_not8": 0,
    }


@pytest.mark.parametrize("tool", ["graphopt", "onnxsim"])
def test_typed_model_records_what_each_tool_kept_and_whether_it_is_equivalent(typed_run, tool):
    data, _ = typed_run
    [model] = data["models"]
    result = model["tools"][tool]
    assert result["status"] == "ok" and result["precision"] is not None
    assert result["precision"]["dequantize_nodes"] > 0
    assert result["equivalence"]["passed"] is True
    # a quantized graph is judged between its quantizers, unless its outputs are bit-identical
    assert result["equivalence"]["layerwise"] is True or result["equivalence"]["max_rel_err"] == 0


def test_graphopt_keeps_quantized_weights_quantized(typed_run):
    data, _ = typed_run
    [model] = data["models"]
    before, after = model["precision"], model["tools"]["graphopt"]["precision"]
    assert after["quantized_weights"] == before["quantized_weights"] and after["float_weights"] == 0
    assert (after["quantize_nodes"], after["dequantize_nodes"]) == (before["quantize_nodes"], before["dequantize_nodes"])


def test_typed_models_get_a_section_of_their_own(typed_run):
    _, markdown = typed_run
    assert "## Typed corpus" in markdown and "## Wall time" not in markdown
    assert "| graphopt | 1 | 1 | 0 | 0 | 1 of 1 |" in markdown  # the per-tool summary: kept all, equivalent
    [row] = [line for line in markdown.splitlines() if line.startswith(f"| {TYPED_MODEL} | graphopt |")]
    assert "| 2 / 0 | 7 / 11 | 1 / 1 of 2 | 0 of 0 | yes" in row


def test_a_weight_dequantized_to_float_is_reported(tmp_path):
    """What onnxsim issue #216 asks not to happen: DQ(int8 weight) folded into a float initializer."""
    bench = _load_bench()
    import onnx_graphsurgeon as gs

    from graphopt.graphs import weight
    from tests.fixtures.zoo import load_typed_model

    model = load_typed_model(TYPED_MODEL, seed=0)
    graph = gs.import_onnx(model)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    w = weight(conv.inputs[1])
    shape = [-1] + [1] * (len(w.shape) - 1)
    folded = (w.stored.astype("float32") - w.quantization.zero_point.reshape(shape)) * w.quantization.scale.reshape(shape)
    conv.inputs[1] = gs.Constant("folded_weight", folded.astype("float32"))
    graph.cleanup()
    candidate = gs.export_onnx(graph)

    before, after = bench.precision_stats(model), bench.precision_stats(candidate)
    assert (after.quantized_weights, after.float_weights, after.dequantize_nodes) == (1, 1, before.dequantize_nodes - 1)
    assert (after.quantized_convs, after.fp16_convs) == (1, 1)  # a float weight: no longer an INT8 layer
    assert bench.dequantized(before, after) == 1
    assert bench.dequantized(before, before) == 0
    equivalence = bench.EquivalenceCheck(model)(candidate)
    assert equivalence.passed and equivalence.max_rel_err == 0  # the same numbers, only no longer INT8 for TensorRT
