"""The installed `graphopt` command, run as a user runs it: a subprocess, exit codes, files."""

import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import graphopt
from graphopt.testing import assert_equivalent
from tests.fixtures.cases import case_path, load_case
from tests.test_verify import scale_one_filter

GRAPHOPT = str(Path(sys.executable).parent / "graphopt")


def graphopt_cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([GRAPHOPT, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


def test_run_writes_a_verified_model_and_a_summary(tmp_path):
    out = tmp_path / "out.onnx"
    result = graphopt_cli("run", case_path("core/identity_weights"), "-o", out, "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^simplify \(canonical form\)\s+changed\s", result.stdout, re.MULTILINE)
    assert "whole pipeline: equivalent on onnxruntime" in result.stdout
    assert_equivalent(load_case("core/identity_weights"), out)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passes"][0]["verified_by"] == "onnxruntime" and report["equivalent"] is True


def test_run_never_touches_the_input(tmp_path):
    source = tmp_path / "in.onnx"
    source.write_bytes(case_path("core/identity_weights").read_bytes())
    before = source.read_bytes()
    assert graphopt_cli("run", source, "-o", tmp_path / "out.onnx").returncode == 0
    assert source.read_bytes() == before


def test_strict_exits_1_and_writes_nothing_when_a_rewrite_is_wrong(tmp_path, plugin_env):
    out = tmp_path / "out.onnx"
    result = graphopt_cli("run", case_path("core/conv_stack"), "-o", out, "--passes", "reweight-convs(wrong-at=conv2)",
                          "--strict", "--report", tmp_path / "r.json", env=plugin_env)
    assert result.returncode == 1
    assert "failed verification at conv2" in result.stderr and "nothing was written" in result.stderr
    assert not out.exists()
    passes = json.loads((tmp_path / "r.json").read_text())["passes"]
    [rewrite] = [p for p in passes if p["name"] == "reweight-convs"]
    assert rewrite["rolled_back"][0]["site"] == "conv2"


def test_without_strict_the_wrong_site_is_rolled_back_and_the_rest_kept(tmp_path, plugin_env):
    out = tmp_path / "out.onnx"
    result = graphopt_cli("run", case_path("core/conv_stack"), "-o", out, "--passes", "reweight-convs(wrong-at=conv2)", env=plugin_env)
    assert result.returncode == 0
    assert "rolled back reweight-convs at conv2" in result.stdout
    assert_equivalent(load_case("core/conv_stack"), out)


def test_verify_exits_0_on_an_equivalent_pair(tmp_path):
    optimized = tmp_path / "opt.onnx"
    graphopt_cli("run", case_path("core/identity_weights"), "-o", optimized)
    result = graphopt_cli("verify", case_path("core/identity_weights"), optimized)
    assert result.returncode == 0 and "equivalent on onnxruntime" in result.stdout


def test_verify_exits_1_on_a_tampered_pair_and_prints_the_worst_output(tmp_path):
    tampered = tmp_path / "tampered.onnx"
    onnx.save(scale_one_filter(load_case("core/conv_stack"), 1.02), tampered)
    result = graphopt_cli("verify", case_path("core/conv_stack"), tampered)
    assert result.returncode == 1
    assert "NOT equivalent" in result.stdout and "y: max abs error" in result.stdout


def test_saved_outputs_check_a_later_model(tmp_path):
    golden, inputs = tmp_path / "golden.json", tmp_path / "inputs.json"
    model = case_path("core/conv_stack")
    assert graphopt_cli("verify", model, model, "--save-outputs", golden, "--save-inputs", inputs).returncode == 0
    assert graphopt_cli("verify", model, "--load-outputs", golden, "--load-inputs", inputs).returncode == 0
    tampered = tmp_path / "tampered.onnx"
    onnx.save(scale_one_filter(load_case("core/conv_stack"), 1.02), tampered)
    assert graphopt_cli("verify", tampered, "--load-outputs", golden, "--load-inputs", inputs).returncode == 1


def test_saved_outputs_are_polygraphy_run_results(tmp_path):
    from polygraphy.comparator import RunResults

    golden = tmp_path / "golden.json"
    graphopt_cli("verify", case_path("core/conv_stack"), case_path("core/conv_stack"), "--save-outputs", golden)
    [(runner, iterations)] = list(RunResults.load(str(golden)).items())
    assert len(iterations) == 3 and all(list(iteration.keys()) == ["y"] for iteration in iterations)  # one per input set


def test_list_shows_every_pass_with_options():
    result = graphopt_cli("list")
    assert result.returncode == 0
    assert "simplify  [all #1]" in result.stdout and "optimize (bool, default True)" in result.stdout


def test_version_and_help():
    assert graphopt_cli("--version").stdout.strip() == f"graphopt, version {graphopt.__version__}"
    for command in ["run", "verify", "list"]:
        assert graphopt_cli(command, "--help").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.onnx", "-o", "out.onnx"], "missing.onnx: no such file"),
        (["run", "{model}", "-o", "out.onnx", "--passes", "nope"], "unknown pass 'nope'"),
        (["run", "{model}", "-o", "out.onnx", "--passes", "simplify(x=1)"], "unknown option 'x' for simplify"),
        (["run", "{model}", "-o", "no/such/dir/out.onnx"], "output directory no/such/dir does not exist"),
        (["run", "{model}", "-o", "{model}"], "is the input model; pass --in-place"),
        (["run", "{model}", "-o", "out.onnx", "--input-shape", "x:1xx3"], "bad --input-shape"),
        (["run", "{model}"], "give -o/--output, or --in-place"),
    ],
)
def test_bad_usage_gets_one_line_and_exit_2(tmp_path, args, message):
    model = tmp_path / "model.onnx"
    model.write_bytes(case_path("core/conv_stack").read_bytes())
    before = model.read_bytes()
    result = graphopt_cli(*[a.format(model=model) for a in args], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert model.read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()


def test_in_place_overwrites_the_input_atomically(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(case_path("core/identity_weights").read_bytes())
    assert graphopt_cli("run", model, "--in-place").returncode == 0
    assert "Identity" not in [n.op_type for n in onnx.load(str(model)).graph.node]
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary files left


def test_lint_prints_findings_and_writes_json(tmp_path):
    report = tmp_path / "lint.json"
    result = graphopt_cli("lint", case_path("core/conv_stack"), "--json", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["schema_version"] == 2 and (data["target_precision"], data["int8_align"]) == ("fp16", 32)
    assert any(f["code"] == "GO-ALIGN-001" for f in data["findings"])  # the 3-channel input, 4-channel output


def test_lint_takes_pad_channels_precision_and_int8_align(tmp_path):
    report = tmp_path / "lint.json"
    result = graphopt_cli("lint", case_path("core/conv_stack"), "--precision", "int8", "--int8-align", "16", "--no-fixes", "--json", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert (data["target_precision"], data["int8_align"]) == ("int8", 16)
    aligned = [f for f in data["findings"] if f["category"] == "alignment"]
    assert aligned and {(f["code"], f["precision"]) for f in aligned} == {("GO-ALIGN-002", "int8")}


def test_lint_refuses_bad_input_like_run(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    result = graphopt_cli("lint", empty)
    assert result.returncode == 2 and "file is empty" in result.stderr and "Traceback" not in result.stderr


def test_run_with_lint_shows_what_the_rewrite_bought(tmp_path):
    result = graphopt_cli("run", case_path("core/conv_stack"), "-o", tmp_path / "out.onnx", "--lint")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^lint \(float32 layers: fp16\): \d+ findings -> \d+", result.stdout, re.MULTILINE)


def test_an_output_that_is_a_symbolic_link_replaces_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "models" / "current.onnx"
    target.parent.mkdir()
    target.write_bytes(b"previous model")
    link = tmp_path / "deploy.onnx"
    link.symlink_to(target)
    result = graphopt_cli("run", case_path("core/identity_weights"), "-o", link)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and link.resolve() == target
    assert_equivalent(load_case("core/identity_weights"), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy.onnx", "models"]


def test_reports_get_the_same_permissions_as_models(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert graphopt_cli("run", case_path("core/conv_stack"), "-o", out, "--report", report).returncode == 0
    assert report.stat().st_mode == out.stat().st_mode


def test_a_replaced_output_keeps_its_permissions(tmp_path):
    report = tmp_path / "report.json"
    report.write_text("{}")
    report.chmod(0o640)
    assert graphopt_cli("run", case_path("core/conv_stack"), "-o", tmp_path / "out.onnx", "--report", report).returncode == 0
    assert json.loads(report.read_text())["pipeline"] and (report.stat().st_mode & 0o777) == 0o640


def test_sigterm_during_a_save_leaves_no_temporary_folder(tmp_path):
    # The signal arrives while the model is staged in its temporary folder, before the rename.
    script = tmp_path / "terminate_while_saving.py"
    script.write_text(
        "import os, signal, sys\n"
        "from graphopt import cli, modelio\n"
        "write = modelio._write\n"
        "def write_then_terminate(model, path):\n"
        "    write(model, path)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "modelio._write = write_then_terminate\n"
        "sys.exit(cli.main())\n"
    )
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    result = subprocess.run([sys.executable, script, "run", case_path("core/conv_stack"), "-o", out, "--no-verify"],
                            capture_output=True, text=True)
    assert result.returncode == 128 + 15, result.stderr
    assert "interrupted" in result.stderr and "Traceback" not in result.stderr
    assert list(out.parent.iterdir()) == []


# -- input sets: the report lists them, and the user's own data replaces them -------------------------

import numpy as np  # noqa: E402
from polygraphy.json import save_json  # noqa: E402


def test_the_report_lists_the_input_sets_verification_used(tmp_path):
    report = tmp_path / "r.json"
    assert graphopt_cli("run", case_path("core/conv_stack"), "-o", tmp_path / "out.onnx", "--report", report).returncode == 0
    sets = json.loads(report.read_text())["input_sets"]
    assert [(s["seed"], s["distribution"], s["shapes"]["x"]) for s in sets] == [
        (0, "uniform[-1, 1]", [1, 3, 16, 16]), (1, "normal(0, 1)", [2, 3, 16, 16]), (2, "uniform[0, 255]", [1, 3, 16, 16])]


def positive_rows(count: int) -> list[dict[str, np.ndarray]]:
    """Inputs on which ArgMax(Log(x)) and ArgMax(x) agree: every value positive, as probabilities are."""
    rng = np.random.default_rng(3)
    return [{"x": rng.uniform(0.01, 1.0, (4, 10)).astype(np.float32)} for _ in range(count)]


def test_run_verifies_on_the_users_inputs_from_load_inputs(tmp_path):
    inputs, report = tmp_path / "inputs.json", tmp_path / "r.json"
    save_json(positive_rows(2), str(inputs))
    result = graphopt_cli("run", case_path("verify/argmax_of_log"), "-o", tmp_path / "out.onnx", "--passes", "simplify",
                          "--load-inputs", inputs, "--report", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    # on positive inputs onnxsim's ArgMax(x) is right, so it is kept (random sets roll it back)
    assert data["passes"][0]["status"] == "changed"
    assert [s["label"] for s in data["input_sets"]] == ["inputs.json #0", "inputs.json #1"]


def test_run_and_verify_take_a_data_loader_script(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text("import numpy as np\n\n"
                      "def positive_rows():\n"
                      "    rng = np.random.default_rng(3)\n"
                      "    for _ in range(3):\n"
                      "        yield {'x': rng.uniform(0.01, 1.0, (4, 10)).astype(np.float32)}\n\n"
                      "load_data = positive_rows\n")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = graphopt_cli("run", case_path("verify/argmax_of_log"), "-o", out, "--passes", "simplify",
                          "--data-loader-script", f"{script}:positive_rows", "--report", report)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(report.read_text())["input_sets"]) == 3
    verified = graphopt_cli("verify", case_path("verify/argmax_of_log"), out, "--data-loader-script", script)  # load_data by default
    assert verified.returncode == 0 and "over 3 input sets" in verified.stdout
    assert graphopt_cli("verify", case_path("verify/argmax_of_log"), out).returncode == 1  # random sets reach negatives


def test_saved_inputs_and_outputs_hold_every_input_set_and_check_a_later_model(tmp_path):
    inputs, golden = tmp_path / "inputs.json", tmp_path / "golden.json"
    save_json(positive_rows(2), str(inputs))
    model = case_path("verify/argmax_of_log")
    assert graphopt_cli("verify", model, model, "--load-inputs", inputs, "--save-outputs", golden).returncode == 0
    result = graphopt_cli("verify", model, "--load-outputs", golden, "--load-inputs", inputs)
    assert result.returncode == 0 and "over 2 input sets" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("elem_type", [onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.STRING])
def test_saved_inputs_and_outputs_of_types_numpy_lacks_load_back_as_the_models_types(tmp_path, elem_type):
    from tests.test_verify import identity_of

    model, inputs, golden = tmp_path / "model.onnx", tmp_path / "inputs.json", tmp_path / "golden.json"
    onnx.save(identity_of(elem_type), model)
    assert graphopt_cli("verify", model, model, "--save-inputs", inputs, "--save-outputs", golden).returncode == 0
    result = graphopt_cli("verify", model, "--load-outputs", golden, "--load-inputs", inputs)
    assert result.returncode == 0 and "equivalent on onnxruntime" in result.stdout, result.stdout + result.stderr


def test_skip_simplify_turns_canonicalization_off(tmp_path):
    report = tmp_path / "r.json"
    result = graphopt_cli("run", case_path("core/identity_weights"), "-o", tmp_path / "out.onnx", "--passes", "all",
                          "--skip", "simplify", "--no-verify", "--report", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["canonicalize"] is False and "simplify" not in [p["name"] for p in data["passes"]]
