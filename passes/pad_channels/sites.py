"""pad-channels: what a site is, and which convs can root one (constants, site data, preconditions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx.helper import tensor_dtype_to_np_dtype

from graphopt.graphs import FLOAT_DTYPES, Weight, weight
from graphopt.precision import LayerPrecision

VALID_ALIGNS = (8, 16, 32)
# The stored types of a quantized conv weight the pass grows: the INT8 and FP8 layers of
# graphopt.precision. Not int4/uint4 (yet: graphs.export_like now exports read 4-bit constants
# packed, but padding them is untested). Not the FNUZ float8 types: onnx-graphsurgeon writes them
# back as E4M3FN/E5M2, another type.
QUANTIZED_TYPES = tuple(tensor_dtype_to_np_dtype(t) for t in (TensorProto.INT8, TensorProto.UINT8, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2))
# A quantized bias: ONNX Runtime's int32 (scale = input scale x weight scale), or any of the above.
BIAS_TYPES = (np.dtype(np.int32), *QUANTIZED_TYPES)
MIN_OPSET = 11  # Slice and Pad take their parameters as inputs from here on

# Ops that compute each output channel from the same input channel only.
UNARY = {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
REDUCES = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"}
NEUTRAL_FILL = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}
# BatchNormalization inputs 1-4 (scale, bias, mean, var): the extra channels get y = x / sqrt(1 + eps).
BATCHNORM_FILL = {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0}

SKIP_GROUPED = "grouped or depthwise conv"
SKIP_ALIGNED = "output channels already aligned"
SKIP_WEIGHT = "weight is not a constant"
SKIP_BIAS = "bias is not a constant"
SKIP_DTYPE = "weight dtype is not float32/float16"
SKIP_QUANT_LAYOUT = "quantized weight layout not supported (only int8/uint8/float8 e4m3fn/e5m2, per-tensor, axis 0 or 1)"
SKIP_BIAS_LAYOUT = "quantized bias layout not supported (only int32/int8/uint8/float8 e4m3fn/e5m2, per-tensor or axis 0)"
SKIP_SHAPE = "output shape not static (channels and spatial size are needed for FLOPs)"
SKIP_OVERHEAD = "FLOP overhead above max_overhead"
SKIP_SUBGRAPH = "a padded tensor is read inside a subgraph"
SKIP_UNKNOWN_CHANNELS = "a padded tensor has no known channel count"
SKIP_FIRST_LAYER = "input channels come from a graph input (pad_first_layer is off)"
SKIP_OPSET = f"opset below {MIN_OPSET}"
@dataclass(frozen=True)
class ConstantPad:
    """The reader's input `index` is a constant that grows along `axis` with `fill`."""

    index: int
    axis: int
    fill: float


@dataclass(frozen=True)
class ConvCost:
    """One conv a site touches: channels and FLOPs (batch 1) before and after."""

    conv: str
    out_channels: tuple[int, int]
    in_channels: tuple[int, int]
    flops: tuple[int, int]


@dataclass
class ChannelSite:
    """Padded tensors that meet (a residual Add, x * sigmoid(x)) and everything that grows with them."""

    channels: int
    padded: int
    roots: list[gs.Node] = field(default_factory=list)  # convs whose outputs grow, with zero filters
    graph_input: gs.Variable | None = None  # or the graph input a Pad grows (pad_first_layer)
    tensors: list[gs.Variable] = field(default_factory=list)  # tensors whose channel axis grows
    readers: list[Reader] = field(default_factory=list)  # who reads a site tensor padded, and how
    sliced: list[str] = field(default_factory=list)  # tensors still read unpadded: a Slice writes them
    costs: list[ConvCost] = field(default_factory=list)  # measured before any site is rewritten
    precisions: dict[str, LayerPrecision] = field(default_factory=dict)  # each root's, and how decided
    alignment: int = 0  # the largest its roots' precisions want

    def readers_as(self, role: Role) -> list[gs.Node]:
        return [reader.node for reader in self.readers if reader.decision.role is role]

# -- how a site tensor's reader takes it ---------------------------------------------------------


class Role(Enum):
    CARRY = "output is padded too"
    DEPTHWISE = "depthwise conv: output is padded too"
    PAIR = "binary op of two padded-size tensors: carries once both are padded, joining their sites"
    ABSORB_CONV = "conv: zero input weights for the extra channels"
    ABSORB_SPLIT = "split: one more output, unread"
    SLICE = "reads a Slice back to the true channel count"


@dataclass(frozen=True)
class Decision:
    role: Role
    pads: tuple[ConstantPad, ...] = ()  # constant inputs that grow with the channels


@dataclass(frozen=True)
class Reader:
    """Input `index` of `node` reads a site tensor, and takes it padded as `decision` says."""

    node: gs.Node
    index: int
    decision: Decision


SLICE = Decision(Role.SLICE)
CARRY = Decision(Role.CARRY)
# -- preconditions --------------------------------------------------------------------------------


def root_problem(conv: gs.Node, align: int) -> str | None:
    """Why `conv` cannot have its output channels padded, or None."""
    shape = conv.outputs[0].shape
    if conv.attrs.get("group", 1) == 1 and shape is not None and len(shape) > 1 and isinstance(shape[1], int) and shape[1] % align == 0:
        return SKIP_ALIGNED  # decided before the weight is read: most convs are aligned
    if (reason := conv_problem(conv)) is not None:
        return reason
    filters = weight(conv.inputs[1]).shape[0]
    if filters % align == 0:
        return SKIP_ALIGNED
    return None if shape[1] == filters else SKIP_SHAPE


def conv_problem(conv: gs.Node, group: int = 1, in_per_group: int | None = None) -> str | None:
    """Why `conv`'s weight cannot grow, or None: it must have `group` groups, `in_per_group` input
    channels per group (if given), a weight and bias `weight_problem` accepts, and a static output."""
    if conv.attrs.get("group", 1) != group:
        return SKIP_GROUPED
    if (reason := weight_problem(conv)) is not None:
        return reason
    shape, out = weight(conv.inputs[1]).shape, conv.outputs[0].shape
    if in_per_group is not None and shape[1] != in_per_group:
        return SKIP_UNKNOWN_CHANNELS
    if out is None or len(out) != len(shape) or not all(isinstance(d, int) and d >= 0 for d in out[1:]):
        return SKIP_SHAPE
    return None


def weight_problem(conv: gs.Node) -> str | None:
    """Why the conv's weight and bias cannot be padded, or None."""
    conv_weight = weight(conv.inputs[1])
    if conv_weight is None:
        return SKIP_WEIGHT
    if conv_weight.dtype not in FLOAT_DTYPES:
        return SKIP_DTYPE
    if conv_weight.quantized and not quantized_as(conv_weight, QUANTIZED_TYPES, axes=(None, 0, 1)):
        return SKIP_QUANT_LAYOUT
    if not has_bias(conv):
        return None
    if (bias := weight(conv.inputs[2])) is None or bias.dtype not in FLOAT_DTYPES:
        return SKIP_BIAS
    if bias.quantized and not quantized_as(bias, BIAS_TYPES, axes=(None, 0)):
        return SKIP_BIAS_LAYOUT
    return None


def quantized_as(quantized: Weight, types: tuple[np.dtype, ...], axes: tuple[int | None, ...]) -> bool:
    """Whether a quantized weight is stored in one of `types` (integers or float8 -> DQ, or a float
    constant -> Q -> DQ to one of them), per tensor or along one of `axes`, with one zero point a scale."""
    q = quantized.quantization
    stored = quantized.stored.dtype
    return (q.axis in axes and q.zero_point.dtype in types and q.zero_point.shape == q.scale.shape
            and (stored in FLOAT_DTYPES if q.quantize is not None else stored == q.zero_point.dtype))


def has_bias(conv: gs.Node) -> bool:
    return len(conv.inputs) > 2 and bool(conv.inputs[2].name)



def round_up(value: int, align: int) -> int:
    return -(-value // align) * align
