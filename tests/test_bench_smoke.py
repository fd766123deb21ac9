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
