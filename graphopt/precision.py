"""The precision each layer runs in, read from the graph: TensorRT 11 builds strongly typed networks.

TensorRT 11 has no FP16/INT8 builder flags: a layer runs in the types its graph gives it. A Conv
or linear whose data input and weight both come through DequantizeLinear runs in the quantized
type (INT8, FP8, INT4), as does a MatMul of two dequantized activations; one on float16
(bfloat16) tensors runs FP16 (BF16); a float32 layer runs in the pipeline's target precision,
what the user will build or convert it to (the `precision` option, fp16 by default).
pad-channels aligns each layer by this, and lint judges it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graphs import weight

Precision = Literal["int8", "fp8", "int4", "fp16", "bf16", "fp32"]
TargetPrecision = Literal["fp16", "int8", "fp8"]

# The channel multiple Tensor Core kernels want per precision: FP16 reads channels in vectors of 8
# (kHWC8) and INT8 in 32 (kCHW32) (TensorRT "Data Format Descriptions"); INT8 16 on request, the
# rule of TensorRT's removed engine lint and ModelOpt's INT8 eligibility. FP8 and INT4 take 16
# and 32, as the quantized-graphs issue sets them; no TensorRT measurement backs those two here.
ALIGNMENT: dict[str, int] = {"int8": 32, "fp8": 16, "int4": 32, "fp16": 8, "bf16": 8, "fp32": 8}

_QUANTIZED_KIND = {
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8",
    onnx.TensorProto.FLOAT8E4M3FN: "fp8", onnx.TensorProto.FLOAT8E4M3FNUZ: "fp8",
    onnx.TensorProto.FLOAT8E5M2: "fp8", onnx.TensorProto.FLOAT8E5M2FNUZ: "fp8",
    onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "int4",
}


@dataclass(frozen=True)
class LayerPrecision:
    """A layer's precision and how it was decided, in words a report can print."""

    precision: Precision
    decided_by: str

    def alignment(self, int8_align: int = 32) -> int:
        return int8_align if self.precision == "int8" else ALIGNMENT[self.precision]


def layer_precision(layer: gs.Node, target: TargetPrecision = "fp16") -> LayerPrecision:
    """The precision `layer` (a Conv, Gemm or MatMul: data input 0, weight input 1) runs in."""
    data = layer.inputs[0]
    # Structure first: reading a float weight's values costs a copy of it, and most layers are float.
    both = len(layer.inputs) > 1 and _dequantized(data) and _dequantized(layer.inputs[1])
    kernel = weight(layer.inputs[1]) if both else None
    if kernel is not None and kernel.quantized:
        kind = _QUANTIZED_KIND.get(_onnx_type(kernel.quantization.dequantize.inputs[0]))
        if kind is not None:
            return LayerPrecision(kind, "Q/DQ on its input and weight")
    if both and kernel is None:  # a MatMul of two activations (attention), each quantized
        kind = _QUANTIZED_KIND.get(_onnx_type(layer.inputs[1].inputs[0].inputs[0]))
        if kind is not None:
            return LayerPrecision(kind, "Q/DQ on both its inputs")
    dtype = _onnx_type(data)
    if dtype == onnx.TensorProto.FLOAT16:
        return LayerPrecision("fp16", "float16 tensors")
    if dtype == onnx.TensorProto.BFLOAT16:
        return LayerPrecision("bf16", "bfloat16 tensors")
    return LayerPrecision(target, f"float32 layer: the target precision ({target})")


def _dequantized(tensor: gs.Tensor) -> bool:
    return len(tensor.inputs) == 1 and tensor.inputs[0].op == "DequantizeLinear"


def _onnx_type(tensor: gs.Tensor) -> int | None:
    dtype = tensor.dtype
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError):
        return None
