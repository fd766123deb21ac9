"""Hypothesis strategies for random, valid, tiny ONNX models: the grammar behind tests/test_fuzz.py.

A model starts from one 4-D NCHW input `x` (batch static or symbolic `N`, 1-40 channels, spatial
4-12) and grows by a few *steps*, each drawn from `STEPS` and applied to a feature map already in
the graph: a Conv with random channels, kernel, strides, pads, groups and dilations, sibling
Convs on one tensor, training-form blocks (sibling Convs, x or its BatchNormalization, summed by
Adds), a 1x1 Conv feeding another, BatchNormalization, Relu/Sigmoid/Clip/LeakyRelu,
Mul/Add/Div/Sub by constants (exactly 1 and 0 included) of several broadcasting shapes, residual
Add/Mul of two maps, ReduceMean/ReduceMax/ReduceSum over random axes, pooling, Concat, Split,
and do-nothing ops (Identity, Dropout, Reshape to the same shape, ...). It may end in a 2-D
head: Flatten/Reshape/reduction to [B, K], then Gemm/MatMul linears with activations between
them, or a transformer-style token-wise linear. Every tensor nobody reads is a graph output, and
so, now and then, is one that something reads.

A third of the models are quantized, as users bring them (`Quantized`): in ONNX Runtime's
quantize_static form (int8 weights -> DequantizeLinear per output channel or per tensor, int32
biases, int8 or uint8 activation Q/DQ in front of every Conv/Gemm/MatMul and sometimes after) or
in ModelOpt's (float weights -> QuantizeLinear -> DequantizeLinear per output channel, int8 Q/DQ in
front of Convs, linears, average pools, ReduceMean and residual Adds), some layers left float.
Weight scales are max|w| / 127 per channel; activation scales cover [-r, r], r drawn from 2, 4, 8
(the layers keep unit gain, so N(0, 1) inputs mostly stay inside).

The opset is 11, 13 or 18 (13 or 18 when quantized: per-axis Q/DQ needs 13), and each op is
written the way its opset spells it: ReduceMean axes and Split sizes as attributes in 11, as
inputs in 18, and so on. Shapes are tracked exactly while building, so a model is valid by
construction; `models()` still runs `onnx.checker` with `full_check` (strict shape inference) on
each one and rejects what fails.

Weights come from NumPy, seeded by a drawn integer; everything structural (channel counts,
attributes, which constants are exactly 1 or 0, the form, which layers are quantized, per
channel or per tensor, activation ranges and zero points) is drawn from hypothesis, so it shrinks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from hypothesis import reject
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.fixtures.builders import make_model

OPSETS = (11, 13, 18)
# Small counts that are awkward for alignment (1, 3, 17, 33) next to aligned ones (8, 16, 32).
CHANNELS = st.one_of(st.sampled_from([1, 3, 4, 5, 7, 8, 12, 16, 17, 24, 31, 32, 33, 40]), st.integers(1, 40))
SPATIAL = st.integers(4, 12)
CLIP_BOUNDS = st.sampled_from([(0.0, 6.0), (-0.5, 0.5), (None, 0.3), (-0.2, None), (None, None)])
DYNAMIC_BATCH = "N"
INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class GeneratedModel:
    """A drawn model and how it was built; its repr is what hypothesis prints for a failure."""

    model: onnx.ModelProto
    steps: tuple[str, ...]
    form: str = "plain"  # or "ort(int8)", "ort(uint8)", "modelopt(int8)": how its weights and activations are quantized

    @property
    def quantized(self) -> bool:
        return self.form != "plain"

    @property
    def dynamic_batch(self) -> bool:
        return self.model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_param")

    def input_shape(self, batch: int) -> dict[str, tuple[int, ...]]:
        """The input's shape with the batch set to `batch` (for a second run at another size)."""
        dims = self.model.graph.input[0].type.tensor_type.shape.dim
        return {"x": (batch, *(d.dim_value for d in dims[1:]))}

    def __repr__(self) -> str:
        return f"GeneratedModel(form={self.form}, steps={list(self.steps)})\n{describe(self.model)}"


def describe(model: onnx.ModelProto) -> str:
    """The graph as one line per node, with small constants spelled out: enough to rebuild it."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def tensor(name: str) -> str:
        if name not in inits:
            return name
        value = inits[name]
        if value.size <= 8:
            return f"{name}={value.tolist()!r}:{value.dtype}"
        return f"{name}[{'x'.join(map(str, value.shape))}]"

    def attribute(a: onnx.AttributeProto) -> str:
        value = helper.get_attribute_value(a)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value).tolist()
        elif isinstance(value, bytes):
            value = value.decode()
        return f"{a.name}={value}"

    def shape(vi: onnx.ValueInfoProto) -> str:
        dims = vi.type.tensor_type.shape.dim
        return "[" + ",".join(d.dim_param or str(d.dim_value) for d in dims) + "]"

    lines = [f"opset {opset}; inputs " + ", ".join(f"{i.name}{shape(i)}" for i in model.graph.input)]
    for n in model.graph.node:
        attrs = ", ".join(attribute(a) for a in n.attribute)
        lines.append(f"  {', '.join(n.output)} = {n.op_type}({', '.join(tensor(i) for i in n.input)})" + (f" {{{attrs}}}" if attrs else ""))
    lines.append("outputs " + ", ".join(f"{o.name}{shape(o)}" for o in model.graph.output))
    return "\n".join(lines)


# -- building a graph while tracking shapes ---------------------------------------------------------

Dim = int | str
Shape = tuple[Dim, ...]


@dataclass
class GraphBuilder:
    """The graph under construction: nodes, constants, and the static shape of every tensor."""

    opset: int
    batch: Dim
    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, Shape] = field(default_factory=dict)
    maps: list[str] = field(default_factory=list)  # 4-D [batch, C, H, W] tensors steps may read
    ends: list[str] = field(default_factory=list)  # tensors of other shapes: graph outputs only
    read: set[str] = field(default_factory=set)
    counter: int = 0
    quantization: Quantized | None = None  # None: every weight a plain float constant
    # tensor -> its Q/DQ output, the scale, and (scale, zero point) to repeat the pair (None: it is a pair's output)
    dequantized: dict[str, tuple[str, float, tuple | None]] = field(default_factory=dict)

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def add(self, op: str, inputs: list[str], out_shapes: list[Shape], **attrs) -> list[str]:
        outputs = [self.fresh("t") for _ in out_shapes]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.fresh(op.lower() + "_"), **attrs))
        self.read.update(i for i in inputs if i)
        self.shapes.update(zip(outputs, out_shapes))
        return outputs

    def op(self, op: str, inputs: list[str], out_shape: Shape, **attrs) -> str:
        return self.add(op, inputs, [out_shape], **attrs)[0]

    def const(self, value: np.ndarray, stem: str = "c") -> str:
        name = self.fresh(stem)
        self.initializers[name] = np.asarray(value)
        return name

    def const_node(self, value: np.ndarray) -> str:
        """The same constant, written by a Constant node instead of an initializer."""
        out = self.fresh("k")
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.fresh("constant_"),
                                           value=numpy_helper.from_array(np.asarray(value))))
        return out

    def ints(self, values: list[int]) -> str:
        return self.const(np.array(values, dtype=np.int64), "i")

    def float_weight(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))).astype(np.float32)

    def vector(self, n: int, scale: float = 0.1, stem: str = "b") -> str:
        return self.const((self.rng.standard_normal(n) * scale).astype(np.float32), stem)

    def put(self, name: str) -> None:
        """A new tensor: a feature map steps may read, or an end (graph output only)."""
        shape = self.shapes[name]
        if len(shape) == 4 and shape[0] == self.batch:
            self.maps.append(name)
        else:
            self.ends.append(name)


def pick_map(draw: st.DrawFn, g: GraphBuilder, where: Callable[[Shape], bool] = lambda s: True) -> str | None:
    """A feature map, the newest first (so that shrinking makes chains, not fans)."""
    candidates = [m for m in g.maps if where(g.shapes[m])]
    if not candidates:
        return None
    return candidates[-1 - draw(st.integers(0, len(candidates) - 1))]


@st.composite
def subset(draw: st.DrawFn, items: list[int]) -> list[int]:
    """A non-empty subset, in order (st.sets of a small domain often fails to fill and is rejected)."""
    chosen = [item for item in items if draw(st.booleans())]
    return chosen or [draw(st.sampled_from(items))]


@st.composite
def partition(draw: st.DrawFn, total: int, parts: int) -> list[int]:
    """`parts` positive sizes that add up to `total`."""
    sizes = []
    for left in range(parts - 1, 0, -1):
        sizes.append(draw(st.integers(1, total - sum(sizes) - left)))
    return [*sizes, total - sum(sizes)]


def conv_out(size: int, kernel: int, stride: int, begin: int, end: int, dilation: int) -> int:
    return (size + begin + end - dilation * (kernel - 1) - 1) // stride + 1


# -- quantized models: weights and activations behind Q/DQ ------------------------------------------

# The per-model form, drawn first: plain (every weight a float constant) two times in three, so
# that a failure shrinks to a float graph when quantization has no part in it, and because a
# quantized model costs twice a plain one to verify (graphopt.layerwise runs three graphs a check).
FORMS = ("plain", "plain", "plain", "plain", "ort", "modelopt")
# An activation quantizer spans about [-r, r]: the grammar's layers keep unit gain (weights scaled
# by 1/sqrt(fan_in)), so on the verifier's uniform[-1, 1] and N(0, 1) sets r = 4 holds most values
# in most of int8's steps, 2 and 8 clip more or resolve less. [0, 255] inputs saturate: as in use.
ACTIVATION_RANGES = (4.0, 2.0, 8.0)


@dataclass(frozen=True)
class Quantized:
    """How the tools quantize a model, drawn once per model.

    `ort`: ONNX Runtime's quantize_static (QDQ format): int8 weights -> DequantizeLinear, per channel
    on the output-channel axis or per tensor; int32 Conv/Gemm biases -> DequantizeLinear with scale =
    input scale x weight scale; QuantizeLinear -> DequantizeLinear (int8, or uint8 with a zero point)
    on every Conv/Gemm/MatMul data input and sometimes on its output.
    `modelopt`: NVIDIA ModelOpt's: float weights -> QuantizeLinear -> DequantizeLinear (one scale per
    output channel, each node its own copy), float biases, int8 Q/DQ on every Conv/Gemm/MatMul data
    input. Either tool leaves some layers out (a first or last layer): so does the grammar, now and then.
    """

    form: str
    activation_type: type  # np.int8 or np.uint8


def quantizes(draw: st.DrawFn, g: GraphBuilder) -> bool:
    """Whether the next Conv/Gemm/MatMul is quantized (a quantized model leaves one in eight out)."""
    return g.quantization is not None and draw(st.integers(0, 7)) > 0


def quantize_activation(draw: st.DrawFn, g: GraphBuilder, x: str) -> tuple[str, float]:
    """`x` behind QuantizeLinear -> DequantizeLinear, per tensor (ORT fuses DQ -> Conv into
    QLinearConv, which takes nothing else): one pair per tensor, which its quantized readers share
    as the tools write it (ModelOpt now and then gives a reader its own, equal pair). Returns the
    DQ's output and the scale."""
    q = g.quantization
    if x in g.dequantized:
        out, scale, parameters = g.dequantized[x]
        if q.form == "modelopt" and parameters is not None and draw(st.integers(0, 3)) == 0:
            out = emit_quantize_dequantize(g, x, g.shapes[x], *parameters)  # an equal pair of its own
        return out, scale
    r = draw(st.sampled_from(ACTIVATION_RANGES))
    if q.activation_type is np.uint8:  # asymmetric: [-r, r] around a zero point near 128
        scale, zero = np.array(2 * r / 255, np.float32), np.array(128 + draw(st.integers(-24, 24)), np.uint8)
    else:
        scale, zero = np.array(r / 127, np.float32), np.array(draw(st.integers(-16, 16)) if q.form == "ort" and draw(st.booleans()) else 0, np.int8)
    out = emit_quantize_dequantize(g, x, g.shapes[x], scale, zero)
    g.dequantized[x] = (out, float(scale), (scale, zero))
    return g.dequantized[x][:2]


def emit_quantize_dequantize(g: GraphBuilder, x: str, shape: Shape, scale: np.ndarray, zero: np.ndarray, **attrs) -> str:
    """x -> QuantizeLinear -> DequantizeLinear. ORT's nodes share their scale and zero point,
    ModelOpt's each hold a copy."""
    parameters = [g.const(scale, "qs"), g.const(zero, "qz")]
    quantized = g.op("QuantizeLinear", [x, *parameters], shape, **attrs)
    if g.quantization.form == "modelopt":
        parameters = [g.const(scale, "qs"), g.const(zero, "qz")]
    return g.op("DequantizeLinear", [quantized, *parameters], shape, **attrs)


def quantize_output(draw: st.DrawFn, g: GraphBuilder, y: str, quantized: bool) -> str:
    """ORT sometimes quantizes a quantized layer's output too; a reader that quantizes its input
    then reads this pair (ORT writes no second Q/DQ)."""
    if not quantized or g.quantization.form != "ort" or not draw(st.booleans()):
        return y
    out, scale = quantize_activation(draw, g, y)
    g.dequantized[out] = (out, scale, None)  # its readers read the pair ORT wrote
    return out


def modelopt_input(draw: st.DrawFn, g: GraphBuilder, x: str) -> str:
    """ModelOpt also quantizes the input of the ops it runs in int8 with the Convs (global and
    average pools, ReduceMean, residual Adds): now and then, `x` behind its Q/DQ."""
    if g.quantization is None or g.quantization.form != "modelopt" or not draw(st.booleans()):
        return x
    return quantize_activation(draw, g, x)[0]


def emit_weight(draw: st.DrawFn, g: GraphBuilder, value: np.ndarray, axis: int, quantized: bool) -> tuple[str, np.ndarray | None]:
    """A weight as the model's form stores it, per channel along `axis` (the output channels) or
    per tensor; scales max|w| / 127 of the channel (of the tensor), never 0. Returns the tensor its
    reader takes and the weight scale (None for a plain constant)."""
    if not quantized:
        return g.const(value, "w"), None
    form = g.quantization.form
    per_channel = form == "modelopt" or draw(st.booleans())
    peak = np.abs(value).max(axis=tuple(a for a in range(value.ndim) if a != axis)) if per_channel else np.abs(value).max()
    scale = (np.where(peak > 0, peak, 1.0) / 127).astype(np.float32)
    zero = np.zeros(scale.shape, np.int8)
    attrs = {"axis": axis} if per_channel and (axis != 1 or draw(st.booleans())) else {}
    if form == "modelopt":
        return emit_quantize_dequantize(g, g.const(value, "w"), value.shape, scale, zero, **attrs), scale
    along = [-1 if a == axis else 1 for a in range(value.ndim)] if per_channel else []
    stored = np.clip(np.round(value / scale.reshape(along)), -127, 127).astype(np.int8)
    inputs = [g.const(stored, "wq"), g.const(scale, "ws")] + ([g.const(zero, "wz")] if draw(st.booleans()) else [])
    return g.op("DequantizeLinear", inputs, value.shape, **attrs), scale


def emit_bias(g: GraphBuilder, value: np.ndarray, input_scale: float | None, weight_scale: np.ndarray | None) -> str:
    """A Conv/Gemm bias: int32 -> DequantizeLinear with scale = input scale x weight scale in ORT's
    form (per channel when the weight is), else a float constant."""
    if input_scale is None or weight_scale is None or g.quantization.form != "ort":
        return g.const(value, "b")
    scale = (np.float32(input_scale) * weight_scale).astype(np.float32)
    stored = np.round(value / scale).astype(np.int32)
    inputs = [g.const(stored, "bq"), g.const(scale, "bs"), g.const(np.zeros(scale.shape, np.int32), "bz")]
    return g.op("DequantizeLinear", inputs, value.shape, **({"axis": 0} if scale.ndim else {}))


# -- steps: each reads one or more feature maps and adds tensors ------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv's window: the kernel, and the attributes as the node spells them (kernel_shape,
    strides, pads and dilations are each sometimes left out, to take their defaults)."""

    kernel: tuple[int, int]
    attrs: dict[str, Any]

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        strides = self.attrs.get("strides", [1, 1])
        if self.attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
            return -(-h // strides[0]), -(-w // strides[1])
        pads = self.attrs.get("pads", [0, 0, 0, 0])
        dilations = self.attrs.get("dilations", [1, 1])
        return tuple(conv_out(size, self.kernel[a], strides[a], pads[a], pads[a + 2], dilations[a]) for a, size in enumerate((h, w)))


def pointwise(spell_kernel: bool = False) -> ConvGeometry:
    return ConvGeometry((1, 1), {"kernel_shape": [1, 1]} if spell_kernel else {})


def same_size(k: int) -> ConvGeometry:
    return ConvGeometry((k, k), {"kernel_shape": [k, k], "pads": [k // 2] * 4})


@st.composite
def conv_geometry(draw: st.DrawFn, h: int, w: int) -> ConvGeometry:
    """Random kernel, strides, dilations and pads (or auto_pad) valid for an [h, w] input."""
    attrs: dict[str, Any] = {}
    kernel = [draw(st.integers(1, 3)), draw(st.integers(1, 3))] if draw(st.booleans()) else [draw(st.integers(1, 3))] * 2
    strides = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    dilations = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    if draw(st.integers(0, 9)) == 0:
        attrs["auto_pad"] = draw(st.sampled_from(["SAME_UPPER", "SAME_LOWER", "VALID"]))
        dilations = [1, 1]
        if attrs["auto_pad"] == "VALID" and (h < kernel[0] or w < kernel[1]):
            attrs["auto_pad"] = "SAME_UPPER"
    else:
        pads = [draw(st.integers(0, 2)) for _ in range(4)]
        for axis, size in enumerate((h, w)):
            while conv_out(size, kernel[axis], strides[axis], pads[axis], pads[axis + 2], dilations[axis]) < 1:
                dilations[axis] = 1
                kernel[axis] = max(1, kernel[axis] - 1)
        if any(pads) or draw(st.booleans()):
            attrs["pads"] = pads
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    if strides != [1, 1] or draw(st.booleans()):
        attrs["strides"] = strides
    if dilations != [1, 1] or draw(st.booleans()):
        attrs["dilations"] = dilations
    return ConvGeometry((kernel[0], kernel[1]), attrs)


def emit_conv(draw: st.DrawFn, g: GraphBuilder, x: str, cout: int, geometry: ConvGeometry, group: int = 1) -> str:
    b, cin, h, w = g.shapes[x]
    fan_in = cin // group * geometry.kernel[0] * geometry.kernel[1]
    quantized = quantizes(draw, g)
    data, input_scale = quantize_activation(draw, g, x) if quantized else (x, None)
    kernel, weight_scale = emit_weight(draw, g, g.float_weight((cout, cin // group, *geometry.kernel), fan_in), 0, quantized)
    inputs = [data, kernel]
    if draw(st.booleans()):
        inputs.append(emit_bias(g, (g.rng.standard_normal(cout) * 0.1).astype(np.float32), input_scale, weight_scale))
    attrs = dict(geometry.attrs) | ({"group": group} if group != 1 else {})
    return quantize_output(draw, g, g.op("Conv", inputs, (b, cout, *geometry.output_size(h, w)), **attrs), quantized)


@st.composite
def step_conv(draw: st.DrawFn, g: GraphBuilder) -> str:
    """One Conv with random channels, kernel, strides, pads, dilations and groups."""
    x = pick_map(draw, g)
    _, cin, h, w = g.shapes[x]
    divisors = [d for d in range(1, cin + 1) if cin % d == 0]
    group = draw(st.sampled_from([1, cin, *divisors])) if draw(st.integers(0, 3)) == 0 else 1
    cout = draw(CHANNELS) if group == 1 else group * draw(st.integers(1, max(1, 40 // group)))
    g.put(emit_conv(draw, g, x, cout, draw(conv_geometry(h, w)), group))
    return f"conv(g={group},c={cin}->{cout})"


@st.composite
def step_siblings(draw: st.DrawFn, g: GraphBuilder) -> str:
    """2-3 Convs reading one tensor, each maybe with the same activation, maybe concatenated."""
    x = pick_map(draw, g)
    _, cin, h, w = g.shapes[x]
    count = draw(st.integers(2, 3))
    same = draw(st.booleans())
    shared = None if same else draw(conv_geometry(h, w))
    outs = [emit_conv(draw, g, x, draw(CHANNELS), shared or same_size(draw(st.sampled_from([1, 3])))) for _ in range(count)]
    act = draw(st.sampled_from([None, "Relu", "Sigmoid", "Clip"]))
    if act is not None:
        bounds = draw(CLIP_BOUNDS) if draw(st.booleans()) else None  # None: each Clip draws its own
        outs = [emit_activation(draw, g, act, o, bounds) for o in outs]
    spatial = {g.shapes[o][2:] for o in outs}
    if len(spatial) == 1 and draw(st.booleans()):
        order = draw(st.permutations(outs))
        c = sum(g.shapes[o][1] for o in outs)
        g.put(g.op("Concat", list(order), (g.batch, c, *spatial.pop()), axis=draw(st.sampled_from([1, -3]))))
    else:
        for o in outs:
            g.put(o)
    return f"siblings({count},same={same},act={act})"


@st.composite
def step_pointwise_chain(draw: st.DrawFn, g: GraphBuilder) -> str:
    """A 1x1 Conv feeding another Conv: what merge-convs(vertical=true) composes."""
    x = pick_map(draw, g)
    _, _, h, w = g.shapes[x]
    mid = emit_conv(draw, g, x, draw(CHANNELS), pointwise(draw(st.booleans())))
    g.put(emit_conv(draw, g, mid, draw(CHANNELS), draw(conv_geometry(h, w))))
    return "pointwise_chain"


@st.composite
def step_depthwise(draw: st.DrawFn, g: GraphBuilder) -> str:
    """A depthwise Conv (group = channels), 3x3 or 5x5 'same', as in MobileNets."""
    x = pick_map(draw, g)
    c = g.shapes[x][1]
    k = draw(st.sampled_from([3, 5]))
    geometry = ConvGeometry((k, k), same_size(k).attrs | {"strides": [draw(st.integers(1, 2))] * 2})
    g.put(emit_conv(draw, g, x, c * draw(st.sampled_from([1, 1, 2])), geometry, group=c))
    return f"depthwise(c={c})"


@st.composite
def step_rep_block(draw: st.DrawFn, g: GraphBuilder) -> str:
    """A training-form block (RepVGG, ACNet, MobileOne): 1-3 centred Convs on one map (3x3, 1x1, 1x3,
    3x1; maybe dilated, grouped or depthwise, maybe each with a BatchNormalization), maybe x or a
    BatchNormalization of x, summed by Adds in any order, maybe then Relu."""
    x = pick_map(draw, g)
    b, c, h, w = g.shapes[x]
    group = draw(st.sampled_from([1, 1, c] + ([c // 2] if c % 2 == 0 and c > 1 else [])))
    stride = draw(st.sampled_from([1, 1, 2]))
    cout = c if stride == 1 and draw(st.booleans()) else group * draw(st.integers(1, max(1, 24 // group)))
    dilation = draw(st.sampled_from([1, 1, 2]))
    terms = []
    for _ in range(draw(st.integers(1, 3))):
        kh, kw = draw(st.sampled_from([(3, 3), (3, 3), (1, 1), (1, 3), (3, 1)]))
        pads = [dilation * (kh // 2), dilation * (kw // 2)] * 2
        attrs = {"kernel_shape": [kh, kw], "pads": pads, "strides": [stride] * 2}
        if kh > 1 or kw > 1 or draw(st.booleans()):
            attrs["dilations"] = [dilation] * 2
        out = emit_conv(draw, g, x, cout, ConvGeometry((kh, kw), attrs), group)
        terms.append(emit_batchnorm(draw, g, out)[0] if draw(st.integers(0, 3)) == 0 else out)
    identity = draw(st.sampled_from(["none", "x", "batchnorm"])) if cout == c and stride == 1 else "none"
    if identity == "x":
        terms.append(x)
    elif identity == "batchnorm":
        terms.append(emit_batchnorm(draw, g, x)[0])
    terms = draw(st.permutations(terms))
    total = terms[0]
    for term in terms[1:]:
        total = g.op("Add", [total, term], g.shapes[terms[0]])
    g.put(g.op("Relu", [total], g.shapes[total]) if draw(st.booleans()) else total)
    return f"rep_block(g={group},s={stride},{len(terms)} terms,identity={identity})"


@st.composite
def step_squeeze_excite(draw: st.DrawFn, g: GraphBuilder) -> str:
    """x * gate(x): pooled, 1x1 Conv down, Relu, 1x1 Conv up, Sigmoid; the gate broadcasts over H, W."""
    x = pick_map(draw, g)
    b, c, h, w = g.shapes[x]
    source = modelopt_input(draw, g, x)
    if draw(st.booleans()):
        pooled = g.op("GlobalAveragePool", [source], (b, c, 1, 1))
    else:
        inputs, attrs = reduce_attrs(draw, g, "ReduceMean", [2, 3])
        pooled = g.op("ReduceMean", [source, *inputs], (b, c, 1, 1), keepdims=1, **attrs)
    down = emit_conv(draw, g, pooled, draw(CHANNELS), pointwise())
    squeezed = g.op("Relu", [down], g.shapes[down])
    gate = emit_conv(draw, g, squeezed, c, pointwise())
    gate = g.op(draw(st.sampled_from(["Sigmoid", "HardSigmoid"])), [gate], g.shapes[gate])
    g.put(g.op("Mul", [x, gate] if draw(st.booleans()) else [gate, x], g.shapes[x]))
    return "squeeze_excite"


def emit_activation(draw: st.DrawFn, g: GraphBuilder, op: str, x: str, bounds: tuple | None = None) -> str:
    shape = g.shapes[x]
    if op == "Clip":
        low, high = bounds or draw(CLIP_BOUNDS)
        inputs = [x, "" if low is None else g.const(np.array(low, np.float32)), "" if high is None else g.const(np.array(high, np.float32))]
        while inputs[-1] == "":
            inputs.pop()
        return g.op("Clip", inputs, shape)
    if op == "LeakyRelu":
        return g.op(op, [x], shape, alpha=draw(st.sampled_from([0.01, 0.1])))
    return g.op(op, [x], shape)


@st.composite
def step_activation(draw: st.DrawFn, g: GraphBuilder) -> str:
    ops = ["Relu", "Sigmoid", "Clip", "LeakyRelu", "Tanh", "HardSigmoid"] + (["HardSwish"] if g.opset >= 14 else [])
    op = draw(st.sampled_from(ops))
    g.put(emit_activation(draw, g, op, pick_map(draw, g)))
    return op


def emit_batchnorm(draw: st.DrawFn, g: GraphBuilder, x: str) -> tuple[str, str]:
    c = g.shapes[x][1]
    kind = draw(st.sampled_from(["random", "identity", "default"]))
    eps = 1e-5
    if kind == "identity":  # scale 1, bias 0, mean 0, var 1, epsilon 0: exactly x
        params = [np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)]
        eps = 0.0
    elif kind == "default":  # what a fresh BatchNorm layer exports: divides by sqrt(1 + 1e-5)
        params = [np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)]
    else:
        params = [1 + 0.2 * g.rng.standard_normal(c), 0.1 * g.rng.standard_normal(c),
                  0.1 * g.rng.standard_normal(c), 0.5 + g.rng.random(c)]
    names = [g.const(p.astype(np.float32), "bn") for p in params]
    return g.op("BatchNormalization", [x, *names], g.shapes[x], epsilon=eps), kind


@st.composite
def step_batchnorm(draw: st.DrawFn, g: GraphBuilder) -> str:
    out, kind = emit_batchnorm(draw, g, pick_map(draw, g))
    g.put(out)
    return f"batchnorm({kind})"


def broadcast(a: Shape, b: Shape) -> Shape:
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)
    return tuple(y if x == 1 else x for x, y in zip(a, b))


@st.composite
def scale_constant(draw: st.DrawFn, g: GraphBuilder, op: str, shape: Shape) -> np.ndarray:
    """A constant for `x <op> c` whose shape broadcasts against `shape`, often the identity element."""
    _, c, h, w = shape
    forms = [(), (1,), (c, 1, 1), (1, c, 1, 1), (w,), (1, 1, h, w), (1, 1, 1, 1)]
    # Shapes that grow the input where it has a 1: x * ones is then not x.
    forms += [s for s, ok in (((4, 1, 1), c == 1), ((1, 1, 3, 1), h == 1), ((2,), w == 1), ((1, 1, 1, 1, 1), True)) if ok]
    const_shape = draw(st.sampled_from(forms))
    neutral = 1.0 if op in ("Mul", "Div") else 0.0
    kind = draw(st.sampled_from(["neutral", "neutral", "negative zero", "other neutral", "almost", "random"]))
    if kind == "neutral":
        value = np.full(const_shape, neutral)
    elif kind == "negative zero":
        value = np.full(const_shape, -0.0 if neutral == 0.0 else 1.0)
    elif kind == "other neutral":  # x*0, x+1: look like identities, are not
        value = np.full(const_shape, 1.0 - neutral)
    elif kind == "almost":
        value = np.full(const_shape, neutral)
        value.reshape(-1)[-1] = neutral + draw(st.sampled_from([1e-3, 0.5, -1.0]))
    else:
        value = g.rng.uniform(0.5, 2.0, const_shape) * g.rng.choice([-1.0, 1.0], const_shape)
    if op == "Div":
        value = np.where(value == 0, 1.0, value)  # x / 0 has no reference to match
    return value.astype(np.float32)


@st.composite
def step_scale(draw: st.DrawFn, g: GraphBuilder) -> str:
    """x * c, c * x, x + c, x - c, c - x, x / c: constants of many shapes, 1 and 0 included."""
    x = pick_map(draw, g)
    op = draw(st.sampled_from(["Mul", "Add", "Sub", "Div"]))
    value = draw(scale_constant(g, op, g.shapes[x]))
    c = g.const_node(value) if draw(st.integers(0, 3)) == 0 else g.const(value, "s")
    left = op != "Div" and draw(st.integers(0, 3)) == 0
    g.put(g.op(op, [c, x] if left else [x, c], broadcast(g.shapes[x], value.shape)))
    return f"{'const ' if left else ''}{op} {list(value.shape)}"


@st.composite
def step_binary(draw: st.DrawFn, g: GraphBuilder) -> str:
    """Add/Mul/Sub of two maps: a residual over a same-shape Conv branch, or x * sigmoid(x)."""
    x = pick_map(draw, g)
    form = draw(st.sampled_from(["residual", "swish", "pair", "divide"]))
    if form == "swish":
        g.put(g.op("Mul", [x, g.op("Sigmoid", [x], g.shapes[x])], g.shapes[x]))
        return "swish"
    if form == "divide":  # x / (1 + sigmoid(conv(x))): a divisor of runtime values, never 0
        branch = emit_conv(draw, g, x, g.shapes[x][1], same_size(draw(st.sampled_from([1, 3]))))
        divisor = g.op("Add", [g.op("Sigmoid", [branch], g.shapes[x]), g.const(np.array(1.0, np.float32))], g.shapes[x])
        g.put(g.op("Div", [x, divisor], g.shapes[x]))
        return "divide"
    op = draw(st.sampled_from(["Add", "Mul", "Sub"]))
    same_shape = [m for m in g.maps if m != x and g.shapes[m] == g.shapes[x]]
    if form == "pair" and same_shape:
        other = same_shape[-1 - draw(st.integers(0, len(same_shape) - 1))]
    else:
        other = emit_conv(draw, g, x, g.shapes[x][1], same_size(draw(st.sampled_from([1, 3]))))
        if draw(st.booleans()):
            other = g.op("Relu", [other], g.shapes[other])
    if op == "Add":
        x, other = modelopt_input(draw, g, x), modelopt_input(draw, g, other)
    inputs = [x, other] if draw(st.booleans()) else [other, x]
    g.put(g.op(op, inputs, g.shapes[x]))
    return f"{form} {op}"


def reduce_attrs(draw: st.DrawFn, g: GraphBuilder, op: str, axes: list[int] | None) -> tuple[list[str], dict]:
    """Axes as an attribute or an input, as the opset spells them for `op`."""
    axes_input = g.opset >= (13 if op == "ReduceSum" else 18)
    attrs: dict = {}
    if axes_input:
        inputs = [] if axes is None else [g.ints(axes)]
    else:
        inputs = []
        if axes is not None:
            attrs["axes"] = axes
    return inputs, attrs


@st.composite
def step_reduce(draw: st.DrawFn, g: GraphBuilder) -> str:
    """ReduceMean/ReduceMax (ReduceSum now and then) over random axes, keepdims random."""
    x = pick_map(draw, g)
    shape = g.shapes[x]
    op = draw(st.sampled_from(["ReduceMean", "ReduceMean", "ReduceMax", "ReduceSum"]))
    if op == "ReduceMean":
        x = modelopt_input(draw, g, x)
    form = draw(st.sampled_from(["spatial", "spatial", "one spatial", "any", "all"]))
    if form == "spatial":
        axes = [2, 3]
    elif form == "one spatial":
        axes = [draw(st.sampled_from([2, 3]))]
    elif form == "any":
        axes = draw(subset([0, 1, 2, 3]))
    else:
        axes = None
    keepdims = draw(st.sampled_from([0, 1]))
    spelled = None if axes is None else [a - 4 if draw(st.integers(0, 2)) == 0 else a for a in axes]
    inputs, attrs = reduce_attrs(draw, g, op, spelled)
    reduced = set(range(4)) if axes is None else set(axes)
    if keepdims:
        out_shape = tuple(1 if a in reduced else d for a, d in enumerate(shape))
    else:
        out_shape = tuple(d for a, d in enumerate(shape) if a not in reduced)
    if not keepdims or draw(st.booleans()):
        attrs["keepdims"] = keepdims
    g.put(g.op(op, [x, *inputs], out_shape, **attrs))
    return f"{op}(axes={spelled}, keepdims={keepdims})"


@st.composite
def step_pool(draw: st.DrawFn, g: GraphBuilder) -> str:
    x = pick_map(draw, g)
    b, c, h, w = g.shapes[x]
    op = draw(st.sampled_from(["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"]))
    if "Average" in op:
        x = modelopt_input(draw, g, x)
    if op.startswith("Global"):
        g.put(g.op(op, [x], (b, c, 1, 1)))
        return op
    k = draw(st.integers(1, min(3, h, w)))
    s = draw(st.integers(1, 2))
    pad = draw(st.integers(0, k - 1))
    attrs = {"kernel_shape": [k, k], "strides": [s, s], "pads": [pad] * 4}
    if op == "AveragePool":
        attrs["count_include_pad"] = draw(st.sampled_from([0, 1]))
    g.put(g.op(op, [x], (b, c, conv_out(h, k, s, pad, pad, 1), conv_out(w, k, s, pad, pad, 1)), **attrs))
    return op


@st.composite
def step_passthrough(draw: st.DrawFn, g: GraphBuilder) -> str:
    """Ops that leave the tensor as it is: Identity, inference Dropout, same-shape Reshape, ..."""
    x = pick_map(draw, g)
    shape = g.shapes[x]
    op = draw(st.sampled_from(["Identity", "Dropout", "Reshape", "Transpose", "Pad", "Cast", "Slice", "Expand"]))
    if op == "Dropout":
        inputs = [x]
        if g.opset >= 12 and draw(st.booleans()):
            inputs += [g.const(np.array(0.5, np.float32)), g.const(np.array(False))]
        with_mask = draw(st.integers(0, 4)) == 0
        outs = g.add("Dropout", inputs, [shape, shape] if with_mask else [shape])
        if with_mask:
            g.ends.append(outs[1])
        g.put(outs[0])
    elif op == "Reshape":
        target = draw(st.sampled_from([[0, 0, 0, 0], [0, shape[1], shape[2], -1], [-1, *shape[1:]], [0, -1, shape[2], shape[3]]]))
        g.put(g.op("Reshape", [x, g.ints(target)], shape))
    elif op == "Transpose":
        g.put(g.op("Transpose", [x], shape, perm=[0, 1, 2, 3]))
    elif op == "Pad":
        g.put(g.op("Pad", [x, g.ints([0] * 8)], shape, mode=draw(st.sampled_from(["constant", "reflect", "edge"]))))
    elif op == "Cast":
        g.put(g.op("Cast", [x], shape, to=TensorProto.FLOAT))
    elif op == "Slice":
        axes = draw(subset([1, 2, 3]))
        ends = [draw(st.sampled_from([shape[a], shape[a] + 5, INT64_MAX])) for a in axes]
        starts = [draw(st.sampled_from([0, -shape[a]])) for a in axes]
        g.put(g.op("Slice", [x, g.ints(starts), g.ints(ends), g.ints(axes)], shape))
    elif op == "Expand":
        target = draw(st.sampled_from([[1, 1, 1, 1], [1], [1, shape[1], 1, 1]]))
        g.put(g.op("Expand", [x, g.ints(target)], shape))
    else:
        g.put(g.op("Identity", [x], shape))
    return op


@st.composite
def step_concat(draw: st.DrawFn, g: GraphBuilder) -> str:
    x = pick_map(draw, g)
    spatial = g.shapes[x][2:]
    partners = [m for m in g.maps if g.shapes[m][2:] == spatial]
    inputs = [x] + draw(st.lists(st.sampled_from(partners), min_size=1, max_size=2))
    c = sum(g.shapes[i][1] for i in inputs)
    g.put(g.op("Concat", inputs, (g.batch, c, *spatial), axis=draw(st.sampled_from([1, -3]))))
    return f"concat({len(inputs)})"


@st.composite
def step_split(draw: st.DrawFn, g: GraphBuilder) -> str:
    """Split on the channel axis (or a spatial one) into 2-3 parts, sizes spelled per opset."""
    x = pick_map(draw, g, lambda s: max(s[1:]) >= 2)
    if x is None:
        return draw(step_conv(g))
    shape = g.shapes[x]
    axis = draw(st.sampled_from([a for a in (1, 1, 2, 3) if shape[a] >= 2]))
    size = shape[axis]
    sizes = draw(partition(size, draw(st.integers(2, min(3, size)))))
    attrs: dict = {"axis": axis}
    inputs = [x]
    if g.opset >= 18 and len(sizes) == 2 and sizes[0] == sizes[1] and draw(st.booleans()):
        attrs["num_outputs"] = 2
    elif g.opset >= 13:
        inputs.append(g.ints(sizes))
    else:
        attrs["split"] = sizes
    outs = g.add("Split", inputs, [tuple(s if a == axis else d for a, d in enumerate(shape)) for s in sizes], **attrs)
    for o in outs:
        g.put(o)
    return f"split(axis={axis}, {sizes})"


@st.composite
def step_crop(draw: st.DrawFn, g: GraphBuilder) -> str:
    """A Slice that keeps part of the channels or of a spatial axis, with steps 1 or 2."""
    x = pick_map(draw, g, lambda s: max(s[1:]) >= 2)
    if x is None:
        return draw(step_conv(g))
    shape = g.shapes[x]
    axis = draw(st.sampled_from([a for a in (1, 2, 3) if shape[a] >= 2]))
    size = shape[axis]
    start = draw(st.integers(0, size - 1))
    end = draw(st.integers(start + 1, size))
    step = draw(st.sampled_from([1, 1, 2]))
    out = tuple(len(range(start, end, step)) if a == axis else d for a, d in enumerate(shape))
    g.put(g.op("Slice", [x, g.ints([start]), g.ints([end]), g.ints([axis]), g.ints([step])], out))
    return f"crop(axis={axis}, {start}:{end}:{step})"


@st.composite
def step_matmul_map(draw: st.DrawFn, g: GraphBuilder) -> str:
    """A MatMul of a 4-D map by a constant [W, N]: a linear over the last axis, not a 2-D one."""
    x = pick_map(draw, g)
    b, c, h, w = g.shapes[x]
    n = draw(st.integers(1, 12))
    quantized = quantizes(draw, g)
    data = quantize_activation(draw, g, x)[0] if quantized else x
    weight = emit_weight(draw, g, g.float_weight((w, n), w), 1, quantized)[0]
    g.put(quantize_output(draw, g, g.op("MatMul", [data, weight], (b, c, h, n)), quantized))
    return "matmul_map"


STEPS = {
    "conv": (step_conv, 4),
    "siblings": (step_siblings, 2),
    "pointwise_chain": (step_pointwise_chain, 2),
    "activation": (step_activation, 2),
    "batchnorm": (step_batchnorm, 1),
    "scale": (step_scale, 4),
    "binary": (step_binary, 1),
    "reduce": (step_reduce, 3),
    "pool": (step_pool, 1),
    "passthrough": (step_passthrough, 2),
    "concat": (step_concat, 1),
    "split": (step_split, 1),
    "depthwise": (step_depthwise, 2),
    "rep_block": (step_rep_block, 1),
    "squeeze_excite": (step_squeeze_excite, 1),
    "crop": (step_crop, 1),
    "matmul_map": (step_matmul_map, 1),
}
STEP_NAMES = [name for name, (_, weight) in STEPS.items() for _ in range(weight)]


# -- heads: from a feature map to [B, K], then linears -----------------------------------------------


@st.composite
def to_matrix(draw: st.DrawFn, g: GraphBuilder, x: str) -> tuple[str, str]:
    """[B, C, H, W] -> [B, K] by Flatten, Reshape, pooling + Flatten, or ReduceMean keepdims=0."""
    b, c, h, w = g.shapes[x]
    form = draw(st.sampled_from(["Flatten", "Reshape(0,-1)", "Reshape(-1,K)", "Reshape(B,K)", "pool+Flatten", "ReduceMean",
                                 "Flatten(axis=2)", "Reshape(-1,HW)"]))
    if form == "Reshape(B,K)" and not isinstance(b, int):
        form = "Reshape(0,-1)"
    rows = b * c if isinstance(b, int) else "BC"
    if form == "Flatten":
        return g.op("Flatten", [x], (b, c * h * w), axis=1), form
    if form == "Flatten(axis=2)":  # rows are (sample, channel) pairs: not a per-sample flatten
        return g.op("Flatten", [x], (rows, h * w), axis=2), form
    if form == "Reshape(-1,HW)":
        return g.op("Reshape", [x, g.ints([-1, h * w])], (rows, h * w)), form
    if form.startswith("Reshape"):
        target = {"Reshape(0,-1)": [0, -1], "Reshape(-1,K)": [-1, c * h * w], "Reshape(B,K)": [b, c * h * w]}[form]
        return g.op("Reshape", [x, g.ints(target)], (b, c * h * w)), form
    if form == "pool+Flatten":
        pooled = g.op("GlobalAveragePool", [x], (b, c, 1, 1))
        return g.op("Flatten", [pooled], (b, c), axis=1), form
    inputs, attrs = reduce_attrs(draw, g, "ReduceMean", [2, 3])
    return g.op("ReduceMean", [x, *inputs], (b, c), keepdims=0, **attrs), form


@st.composite
def emit_linear(draw: st.DrawFn, g: GraphBuilder, v: str) -> tuple[str, str]:
    """Gemm (transB, alpha, beta, bias shapes) or MatMul (+ bias Add) on [B, K]."""
    b, k = g.shapes[v]
    n = draw(CHANNELS)
    quantized = quantizes(draw, g)
    data, input_scale = quantize_activation(draw, g, v) if quantized else (v, None)
    if draw(st.booleans()):
        trans_b = draw(st.sampled_from([0, 1]))
        w, weight_scale = emit_weight(draw, g, g.float_weight((n, k) if trans_b else (k, n), k), 0 if trans_b else 1, quantized)
        attrs = {"transB": trans_b} if trans_b or draw(st.booleans()) else {}
        alpha, beta = draw(st.sampled_from([1.0, 0.5])), draw(st.sampled_from([1.0, 2.0, 0.0]))
        if alpha != 1.0:
            attrs["alpha"] = alpha
        if beta != 1.0:
            attrs["beta"] = beta
        bias_shapes = [None, (n,), (1, n), (1,), (1, 1)] + ([(b, n), (b, 1)] if isinstance(b, int) else [])
        bias_shape = draw(st.sampled_from(bias_shapes))
        inputs = [data, w]
        if bias_shape is not None:  # ORT quantizes a 1-D bias only
            value = (0.1 * g.rng.standard_normal(bias_shape)).astype(np.float32)
            inputs.append(emit_bias(g, value, input_scale, weight_scale) if len(bias_shape) == 1 and bias_shape[0] == n else g.const(value, "b"))
        y = quantize_output(draw, g, g.op("Gemm", inputs, (b, n), **attrs), quantized)
        return y, f"Gemm(transB={trans_b}, bias={bias_shape})"
    y = quantize_output(draw, g, g.op("MatMul", [data, emit_weight(draw, g, g.float_weight((k, n), k), 1, quantized)[0]], (b, n)), quantized)
    bias_shape = draw(st.sampled_from([None, (n,), (1, n)]))
    if bias_shape is None:
        return y, "MatMul"
    bias = g.const((0.1 * g.rng.standard_normal(bias_shape)).astype(np.float32), "b")
    return g.op("Add", [y, bias] if draw(st.booleans()) else [bias, y], (b, n)), f"MatMul+Add{list(bias_shape)}"


@st.composite
def between_linears(draw: st.DrawFn, g: GraphBuilder, v: str) -> tuple[str, str]:
    op = draw(st.sampled_from(["Relu", "Sigmoid", "Clip", "LeakyRelu", "Identity", "Dropout", "Mul", "Add", "BatchNormalization"]))
    shape = g.shapes[v]
    if op in ("Mul", "Add"):
        value = np.array(draw(st.sampled_from([1.0, 0.0, 0.5, -2.0])), np.float32).reshape(draw(st.sampled_from([(), (1,), (1, 1)])))
        return g.op(op, [v, g.const(value, "s")], shape), f"{op}({value.tolist()})"
    if op == "BatchNormalization":
        return emit_batchnorm(draw, g, v)[0], op
    if op in ("Identity", "Dropout"):
        return g.op(op, [v], shape), op
    return emit_activation(draw, g, op, v), op


@st.composite
def step_head(draw: st.DrawFn, g: GraphBuilder) -> str:
    """A classifier head: to [B, K], then 1-3 linears with ops between, maybe a forked tensor."""
    x = pick_map(draw, g)
    v, form = draw(to_matrix(g, x))
    parts = [form]
    for index in range(draw(st.integers(1, 3))):
        if index:
            v, op = draw(between_linears(g, v))
            parts.append(op)
        if draw(st.integers(0, 5)) == 0:  # a sibling linear on the same [B, K] tensor
            sibling, name = draw(emit_linear(g, v))
            g.ends.append(sibling)
            parts.append(f"sibling {name}")
        if draw(st.integers(0, 5)) == 0:  # the tensor inside the chain is also a graph output
            g.ends.append(v)
        v, name = draw(emit_linear(g, v))
        parts.append(name)
    g.ends.append(v)
    return "head(" + " -> ".join(parts) + ")"


@st.composite
def step_token_head(draw: st.DrawFn, g: GraphBuilder) -> str:
    """A transformer-style token-wise linear: [B, C, H, W] -> [B*HW, C] -> Gemm -> [B, HW, N]."""
    x = pick_map(draw, g)
    b, c, h, w = g.shapes[x]
    tokens = g.op("Reshape", [x, g.ints([0, c, h * w])], (b, c, h * w))
    tokens = g.op("Transpose", [tokens], (b, h * w, c), perm=[0, 2, 1])
    rows = g.op("Reshape", [tokens, g.ints([-1, c])], (b * h * w if isinstance(b, int) else "BT", c))
    y, name = draw(emit_linear(g, rows))
    n = g.shapes[y][1]
    g.ends.append(g.op("Reshape", [y, g.ints([-1, h * w, n])], (b, h * w, n)))
    return f"token_head({name})"


# -- the model strategy -------------------------------------------------------------------------------


@st.composite
def models(draw: st.DrawFn, opsets: tuple[int, ...] = OPSETS, max_steps: int = 6, forms: tuple[str, ...] = FORMS) -> GeneratedModel:
    quantized_opsets = tuple(o for o in opsets if o >= 13)  # per-axis Q/DQ needs opset 13
    form = draw(st.sampled_from(forms if quantized_opsets else ["plain"]))
    opset = draw(st.sampled_from(opsets if form == "plain" else quantized_opsets))
    batch: Dim = draw(st.sampled_from([DYNAMIC_BATCH, 1, 2]))
    g = GraphBuilder(opset, batch, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    if form != "plain":
        g.quantization = Quantized(form, draw(st.sampled_from([np.int8, np.uint8])) if form == "ort" else np.int8)
    g.shapes["x"] = (batch, draw(CHANNELS), draw(SPATIAL), draw(SPATIAL))
    g.maps.append("x")
    steps = [draw(STEPS[name][0](g)) for name in draw(st.lists(st.sampled_from(STEP_NAMES), min_size=1, max_size=max_steps))]
    head = draw(st.sampled_from([None, None, "head", "token_head"]))
    if head == "head":
        steps.append(draw(step_head(g)))
    elif head == "token_head":
        steps.append(draw(step_token_head(g)))
    model = finish(draw, g)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        reject()  # a grammar bug: the shapes tracked above disagree with ONNX's
    return GeneratedModel(model, tuple(steps), form if g.quantization is None else f"{form}({np.dtype(g.quantization.activation_type)})")


def finish(draw: st.DrawFn, g: GraphBuilder) -> onnx.ModelProto:
    """Every tensor nobody reads becomes a graph output, and now and then one that is read."""
    produced = [m for m in g.maps + g.ends if m != "x"]
    outputs = [t for t in produced if t not in g.read or draw(st.integers(0, 7)) == 0]
    if not outputs:
        outputs = [g.op("Identity", ["x"], g.shapes["x"])]
    outputs = list(dict.fromkeys(outputs))
    model = make_model(g.nodes, {"x": list(g.shapes["x"])}, outputs, g.initializers, opset=g.opset)
    return model
