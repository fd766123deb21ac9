"""A model over 2 GB: loaded with external data, rewritten, verified, and saved with external data."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

GRAPHOPT = str(Path(sys.executable).parent / "graphopt")
COLUMNS = (2**30 // 4) // 8 + 2**18  # two weights of 8 x COLUMNS float32: just over 2 GiB together


@pytest.fixture(scope="module")
def large_model(tmp_path_factory) -> Path:
    """(x @ W1) * 1 + x @ W2 -> Relu, W1 and W2 in an external data file written directly.

    Built on the fly and deleted after. Two weights of just over 1 GiB each: ONNX stores any
    single tensor this large as external data anyway, and protobuf cannot copy one over 2 GiB.
    """
    folder = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    length = 8 * COLUMNS * 4
    weights = []
    with open(folder / "large.onnx.data", "wb") as data:
        for index, name in enumerate(["w1", "w2"]):
            for _ in range(8):
                data.write(rng.standard_normal(COLUMNS, dtype=np.float32).tobytes())
            tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[8, COLUMNS], data_location=TensorProto.EXTERNAL)
            for key, value in {"location": "large.onnx.data", "offset": str(index * length), "length": str(length)}.items():
                tensor.external_data.add(key=key, value=value)
            weights.append(tensor)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="matmul1"),
         helper.make_node("Mul", ["m1", "one"], ["s"], name="mul_one"),
         helper.make_node("MatMul", ["x", "w2"], ["m2"], name="matmul2"),
         helper.make_node("Add", ["s", "m2"], ["a"], name="add"),
         helper.make_node("Relu", ["a"], ["y"], name="relu")],
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, COLUMNS])],
        [*weights, numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(folder / "large.onnx"))
    return folder / "large.onnx"


@pytest.mark.slow
def test_a_model_over_2gb_is_optimized_and_saved_with_external_data(large_model, tmp_path):
    before = large_model.stat().st_mtime_ns, (large_model.parent / "large.onnx.data").stat().st_size
    out = tmp_path / "large.opt.onnx"
    # One rewriting pass keeps this test to about a minute: load, rewrite, verify, save is the point.
    result = subprocess.run([GRAPHOPT, "run", str(large_model), "-o", str(out), "--passes", "remove-identity-scale"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^remove-identity-scale\s+changed", result.stdout, re.MULTILINE), result.stdout
    assert "whole pipeline: equivalent on onnxruntime" in result.stdout, result.stdout
    assert (tmp_path / "large.opt.onnx.data").stat().st_size > 2**31
    assert out.stat().st_size < 2**20  # the weights live in the external data file
    assert before == (large_model.stat().st_mtime_ns, (large_model.parent / "large.onnx.data").stat().st_size)
    onnx.checker.check_model(str(out), full_check=True)
