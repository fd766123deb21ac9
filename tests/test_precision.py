"""A layer's precision is read from the graph (TensorRT 11 builds strongly typed networks)."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.precision import layer_precision


def conv_model(*, data: str = "float", weight: str = "float", dtype=TensorProto.FLOAT, quantized_type=TensorProto.INT8) -> onnx.ModelProto:
    """x -> [Q -> DQ] -> Conv(weight [int -> DQ | float -> Q -> DQ | float]) -> y."""
    float_np = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    nodes, inits = [], [numpy_helper.from_array(np.array(0.05, float_np), "scale"),
                        helper.make_tensor("zero", quantized_type, [], [0])]
    x = "x"
    if data == "qdq":
        nodes += [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"])]
        x = "xd"
    w_float = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(float_np)
    w_scale = numpy_helper.from_array(np.full(8, 0.02, float_np), "w_scale")
    w_zero = helper.make_tensor("w_zero", quantized_type, [8], [0] * 8)
    if weight == "int":
        inits += [numpy_helper.from_array(np.clip(np.rint(w_float / 0.02), -127, 127).astype(np.int8), "w_int"), w_scale, w_zero]
        nodes.append(helper.make_node("DequantizeLinear", ["w_int", "w_scale", "w_zero"], ["w"], axis=0))
    elif weight == "float_qdq":
        inits += [numpy_helper.from_array(w_float, "w_float"), w_scale, w_zero]
        nodes += [helper.make_node("QuantizeLinear", ["w_float", "w_scale", "w_zero"], ["w_q"], axis=0),
                  helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0)]
    else:
        inits.append(numpy_helper.from_array(w_float, "w"))
    nodes.append(helper.make_node("Conv", [x, "w"], ["y"], name="conv"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", dtype, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def precision_of_conv(model: onnx.ModelProto, target: str = "fp16"):
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))  # as the pass manager hands graphs over
    [conv] = [n for n in graph.nodes if n.op == "Conv"]
    return layer_precision(conv, target)


@pytest.mark.parametrize("weight", ["int", "float_qdq"])
def test_a_conv_with_int8_qdq_on_input_and_weight_runs_int8(weight):
    found = precision_of_conv(conv_model(data="qdq", weight=weight))
    assert (found.precision, found.decided_by) == ("int8", "Q/DQ on its input and weight")
    assert found.alignment() == 32 and found.alignment(int8_align=16) == 16


def test_a_conv_with_fp8_qdq_runs_fp8_and_aligns_to_16():
    found = precision_of_conv(conv_model(data="qdq", weight="float_qdq", quantized_type=TensorProto.FLOAT8E4M3FN))
    assert found.precision == "fp8" and found.alignment() == 16


def test_a_weight_only_quantized_conv_runs_in_its_activations_precision():
    assert precision_of_conv(conv_model(weight="int"), target="fp16").precision == "fp16"


def test_a_float16_conv_runs_fp16_whatever_the_target():
    found = precision_of_conv(conv_model(dtype=TensorProto.FLOAT16), target="int8")
    assert (found.precision, found.decided_by) == ("fp16", "float16 tensors") and found.alignment() == 8


@pytest.mark.parametrize("target, align", [("fp16", 8), ("int8", 32)])
def test_a_float32_conv_runs_in_the_target_precision(target, align):
    found = precision_of_conv(conv_model(), target=target)
    assert found.precision == target and found.alignment() == align and "target" in found.decided_by


def test_a_matmul_of_two_dequantized_activations_runs_int8_and_of_float_ones_the_target():
    """Attention's MatMul has no weight: Q/DQ on both activations decides it, as Q/DQ on input and weight does a Conv's."""
    def matmul(quantized: bool) -> onnx.ModelProto:
        nodes, b = [], "b"
        inits = [numpy_helper.from_array(np.array(0.05, np.float32), "scale"), helper.make_tensor("zero", TensorProto.INT8, [], [0])]
        a = "a"
        if quantized:
            nodes = [helper.make_node("QuantizeLinear", [t, "scale", "zero"], [f"{t}q"]) for t in "ab"]
            nodes += [helper.make_node("DequantizeLinear", [f"{t}q", "scale", "zero"], [f"{t}d"]) for t in "ab"]
            a, b = "ad", "bd"
        nodes.append(helper.make_node("MatMul", [a, b], ["y"], name="matmul"))
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(t, TensorProto.FLOAT, [4, 4]) for t in "ab"],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])

    def precision(model):
        graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
        return layer_precision(next(n for n in graph.nodes if n.op == "MatMul"), "fp16")

    found = precision(matmul(True))
    assert (found.precision, found.decided_by) == ("int8", "Q/DQ on both its inputs")
    assert precision(matmul(False)).precision == "fp16"
