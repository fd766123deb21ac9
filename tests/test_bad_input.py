"""Bad input gets one line, exit code 2, no traceback; the input is untouched and nothing is written."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.testing import record_golden
from tests.fixtures.cases import case_path

GRAPHOPT = str(Path(sys.executable).parent / "graphopt")
GOOD = case_path("core/conv_stack")


def make_bad_inputs(folder: Path) -> dict[str, Path]:
    good = GOOD.read_bytes()
    files = {
        "empty": b"",
        "truncated": good[: len(good) // 3],
        "random bytes": bytes(range(256)) * 7 + b"\xff\xfe" * 100,
        "not a model": onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1]).SerializeToString(),
    }
    fails_checker = onnx.load(str(GOOD))
    fails_checker.graph.node[0].input[1] = "undefined_weight"
    files["fails onnx.checker"] = fails_checker.SerializeToString()
    future = onnx.load(str(GOOD))
    future.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    files["opset newer than onnx supports"] = future.SerializeToString()
    missing_data = onnx.load(str(GOOD))
    paths = {}
    for label, data in files.items():
        path = folder / f"{label.replace(' ', '_')}.onnx"
        path.write_bytes(data)
        paths[label] = path
    onnx.save_model(missing_data, str(folder / "external.onnx"), save_as_external_data=True, location="external.data", size_threshold=0)
    (folder / "external.data").unlink()
    paths["external data missing"] = folder / "external.onnx"
    paths["missing path"] = folder / "nowhere.onnx"
    (folder / "a_directory.onnx").mkdir()
    paths["a directory"] = folder / "a_directory.onnx"
    return paths


EXPECTED = {
    "empty": "file is empty",
    "truncated": "not an ONNX model",
    "random bytes": "not an ONNX model",
    "not a model": "not an ONNX model",
    "fails onnx.checker": "fails onnx.checker",
    "opset newer than onnx supports": "is newer than this onnx",
    "external data missing": "external data cannot be loaded",
    "missing path": "no such file",
    "a directory": "is a directory",
}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in sorted(folder.iterdir())}


def assert_clean_refusal(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("graphopt: error")]) == 1


@pytest.mark.parametrize("command", ["run", "verify"])
@pytest.mark.parametrize("label", list(EXPECTED))
def test_a_bad_model_is_refused_cleanly(tmp_path, label, command):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    bad = make_bad_inputs(inputs)[label]
    before = snapshot(inputs)
    args = ["run", bad, "-o", tmp_path / "out.onnx"] if command == "run" else ["verify", GOOD, bad]
    result = subprocess.run([GRAPHOPT, *map(str, args)], capture_output=True, text=True)
    assert_clean_refusal(result, EXPECTED[label])
    assert snapshot(inputs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "{tmp}/missing_dir/out.onnx"], "does not exist"),
        (["-o", "/proc/out.onnx"], "is not writable"),
        (["-o", "{model}"], "is the input model; pass --in-place"),
        (["-o", "{tmp}"], "is a directory"),
        (["-o", "{tmp}/out.onnx", "--input-shape", "x=1x3"], "bad --input-shape"),
        (["-o", "{tmp}/out.onnx", "--input-shape", "images:1x3x8x8"], "not an input; inputs: x"),
        (["-o", "{tmp}/out.onnx", "--input-shape", "x:1x3"], "has rank 2, the model's input has rank 4"),
        (["-o", "{tmp}/out.onnx", "--passes", "simplify(optimise=1)"], "unknown option 'optimise'"),
        (["-o", "{tmp}/out.onnx", "--passes", "simplify,"], "empty item"),
        (["-o", "{tmp}/out.onnx", "--skip", "nope"], "unknown pass 'nope'"),
        (["-o", "{tmp}/out.onnx", "--seed", "-1"], "--seed -1: a seed is a whole number"),
        (["-o", "{tmp}/out.onnx", "--rtol", "nan"], "--rtol nan: a tolerance must be a finite number >= 0"),
        (["-o", "{tmp}/out.onnx", "--atol", "-1e-3"], "--atol -0.001: a tolerance must be a finite number >= 0"),
        (["-o", "{tmp}/out.onnx", "--input-shape", "x:0x3x16x16"], "zero-size dimension makes every comparison vacuous"),
        (["-o", "{tmp}/out.onnx", "--input-shape", "batch=0"], "zero-size dimension"),
        (["-o", "{tmp}/out.onnx", "--input-shape", "x:99999999999999999999x3x16x16"], "does not fit in int64"),
        (["-o", "{tmp}/out.onnx", "--input-shape", "batch=4000000"], "the verification inputs would take"),
        (["-o", "{tmp}/out.onnx", "--input-shape", "x:1x4x16x16"], "dimension 1 is 3 in the model, not 4"),
        (["-o", "{tmp}/out.onnx", "--input-shape", "sequence=4"], "which no input has; named dimensions: batch"),
        (["-o", "{tmp}/out.onnx", "--load-inputs", "{tmp}/model.onnx"], "not a polygraphy input-data file"),
        (["-o", "{tmp}/out.onnx", "--data-loader-script", "{tmp}/nowhere.py"], "no such file"),
        (["-o", "{tmp}/out.onnx", "--load-inputs", "{model}", "--data-loader-script", "{model}"], "not both"),
    ],
)
def test_bad_arguments_are_refused_cleanly(tmp_path, args, message):
    model = tmp_path / "model.onnx"
    model.write_bytes(GOOD.read_bytes())
    result = subprocess.run([GRAPHOPT, "run", str(model), *[a.format(tmp=tmp_path, model=model) for a in args]],
                            capture_output=True, text=True)
    assert_clean_refusal(result, message)
    assert model.read_bytes() == GOOD.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run([GRAPHOPT, "--debug", "run", str(tmp_path / "nowhere.onnx"), "-o", str(tmp_path / "o.onnx")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" in result.stderr


# -- files are never lost: every output against every input, its external data and each other ------


def make_named_files(folder: Path) -> None:
    """A model, a model with external weights, links to the model, a golden, and a report."""
    (folder / "model.onnx").write_bytes(GOOD.read_bytes())
    onnx.save_model(onnx.load(str(GOOD)), str(folder / "ext.onnx"), save_as_external_data=True, location="ext.weights",
                    size_threshold=0)
    (folder / "hard.onnx").hardlink_to(folder / "model.onnx")
    (folder / "sym.onnx").symlink_to("model.onnx")
    (folder / "dangling.onnx").symlink_to("nowhere/model.onnx")
    record_golden(GOOD, folder / "golden.json")  # and golden.inputs.json beside it


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "model.onnx", "-o", "out.onnx", "--report", "model.onnx"], "--report model.onnx: is the input model"),
        (["run", "model.onnx", "-o", "out.onnx", "--report", "out.onnx"], "--report out.onnx and -o out.onnx name the same file"),
        (["run", "model.onnx", "-o", "out.onnx", "--report", "./out.onnx"], "name the same file"),
        (["run", "model.onnx", "-o", "hard.onnx"], "hard.onnx: is the input model"),
        (["run", "model.onnx", "-o", "sym.onnx"], "sym.onnx: is the input model"),
        (["run", "model.onnx", "-o", "out.onnx", "--report", "hard.onnx"], "--report hard.onnx: is the input model"),
        (["run", "ext.onnx", "-o", "ext.weights"], "-o ext.weights: is external data of"),
        (["run", "ext.onnx", "-o", "ext.weights", "--force"], "-o ext.weights: is external data of"),
        (["run", "ext.onnx", "-o", "out.onnx", "--report", "ext.weights"], "--report ext.weights: is external data of"),
        (["run", "model.onnx", "-o", "out.onnx", "--report", "out.onnx.data"], "name the same file"),
        (["run", "model.onnx", "-o", "/dev/null"], "is not a regular file"),
        (["run", "model.onnx", "-o", "dangling.onnx"], "is a symbolic link to"),
        (["run", "model.onnx", "-o", "out.onnx", "--report", "/proc/report.json"], "is not writable"),
        (["run", "model.onnx", "-o", "out.onnx", "--report", "missing_dir/report.json"], "does not exist"),
        (["verify", "model.onnx", "ext.onnx", "--save-outputs", "model.onnx"], "--save-outputs model.onnx: is the reference model"),
        (["verify", "model.onnx", "ext.onnx", "--save-inputs", "ext.weights"], "--save-inputs ext.weights: is external data of"),
        (["verify", "model.onnx", "hard.onnx", "--save-outputs", "o.json", "--save-inputs", "o.json"], "name the same file"),
        (["verify", "model.onnx", "--load-outputs", "golden.json", "--save-outputs", "golden.json"], "is --load-outputs"),
        (["verify", "model.onnx", "model.onnx", "--load-inputs", "golden.inputs.json", "--save-inputs", "golden.inputs.json"], "is --load-inputs"),
        (["lint", "model.onnx", "--json", "sym.onnx"], "--json sym.onnx: is the input model"),
    ],
)
def test_an_output_that_would_destroy_a_file_is_refused_before_anything_is_written(tmp_path, args, message):
    make_named_files(tmp_path)
    before = snapshot(tmp_path)
    result = subprocess.run([GRAPHOPT, *args], capture_output=True, text=True, cwd=tmp_path)
    assert_clean_refusal(result, message)
    assert snapshot(tmp_path) == before  # nothing overwritten, nothing new (no -o, no report, no temporary)


# -- verification inputs that do not fit the model ------------------------------------------------


def write_feeds(path: Path, feeds: list) -> Path:
    from polygraphy.json import save_json

    save_json(feeds, str(path))
    return path


X = np.zeros((1, 3, 16, 16), np.float32)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ([], "expected a list of feeds"),
        ([{"images": X}], "no value for input x; images is not an input; the model's inputs: x"),
        ([{"x": X.astype(np.float64)}], "input x is float in the model, the value given is float64"),
        ([{"x": X[0]}], "input x has rank 4 in the model, the value given has shape [3, 16, 16]"),
        ([{"x": np.zeros((1, 4, 16, 16), np.float32)}], "input x has dimension 1 = 3 in the model"),
        ([{"x": X}, {"x": X[:, :2]}], "inputs.json #1: input x has dimension 1 = 3"),
    ],
)
@pytest.mark.parametrize("command", ["run", "verify"])
def test_loaded_inputs_that_do_not_fit_the_model_are_refused(tmp_path, feeds, message, command):
    inputs = write_feeds(tmp_path / "inputs.json", feeds)
    args = ["run", GOOD, "-o", tmp_path / "out.onnx"] if command == "run" else ["verify", GOOD, GOOD]
    result = subprocess.run([GRAPHOPT, *map(str, args), "--load-inputs", str(inputs)], capture_output=True, text=True)
    assert_clean_refusal(result, message)
    assert not (tmp_path / "out.onnx").exists()


def test_a_data_loader_script_that_fails_is_refused_in_one_line(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text("def load_data():\n    raise RuntimeError('the dataset is not mounted')\n    yield {}\n")
    result = subprocess.run([GRAPHOPT, "verify", str(GOOD), str(GOOD), "--data-loader-script", str(script)], capture_output=True, text=True)
    assert_clean_refusal(result, "RuntimeError: the dataset is not mounted")


def test_an_input_graphopt_cannot_sample_suggests_its_own_data_or_no_verify(tmp_path):
    graph = onnx.helper.make_graph([onnx.helper.make_node("SequenceLength", ["s"], ["n"])], "g",
                                   [onnx.helper.make_tensor_sequence_value_info("s", onnx.TensorProto.FLOAT, None)],
                                   [onnx.helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [])])
    model = tmp_path / "sequence.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), model)
    result = subprocess.run([GRAPHOPT, "run", str(model), "-o", str(tmp_path / "out.onnx")], capture_output=True, text=True)
    assert_clean_refusal(result, "input s is a sequence (not a tensor), which graphopt cannot draw at random; give its values "
                                 "with --load-inputs or --data-loader-script, or skip verification with --no-verify")


def ort_failing_models(folder: Path) -> dict[str, Path]:
    """Models ONNX Runtime rejects while logging errors of its own: an empty graph, a failed allocation."""
    empty = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []), opset_imports=[onnx.helper.make_opsetid("", 17)])
    huge = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Expand", ["x", "shape"], ["y"])], "huge", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["rows", "columns"])],
        [onnx.helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [1 << 22, 1 << 22])]), opset_imports=[onnx.helper.make_opsetid("", 17)])
    paths = {}
    for name, model in (("empty graph", empty), ("failed allocation", huge)):
        paths[name] = folder / f"{name.replace(' ', '_')}.onnx"
        onnx.save(model, paths[name])
    return paths


@pytest.mark.parametrize("label", ["empty graph", "failed allocation"])
def test_onnx_runtime_logs_nothing_before_graphopts_one_line(tmp_path, label):
    model = ort_failing_models(tmp_path)[label]
    result = subprocess.run([GRAPHOPT, "run", str(model), "-o", str(tmp_path / "out.onnx"), "-q"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("graphopt: error: cannot verify: ONNX Runtime cannot run the input model")
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_too_many_ort_threads_are_capped_instead_of_hanging(tmp_path):
    env = dict(os.environ, GRAPHOPT_ORT_THREADS="100000")
    result = subprocess.run([GRAPHOPT, "run", str(GOOD), "-o", str(tmp_path / "out.onnx"), "-q"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("elem_type", [onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.STRING])
def test_inputs_the_sampler_used_to_crash_on_are_drawn_and_verified(tmp_path, elem_type):
    from tests.test_verify import identity_of

    model = tmp_path / "model.onnx"
    onnx.save(identity_of(elem_type), model)
    result = subprocess.run([GRAPHOPT, "verify", str(model), str(model)], capture_output=True, text=True)
    assert result.returncode == 0 and "equivalent on onnxruntime" in result.stdout, result.stdout + result.stderr
