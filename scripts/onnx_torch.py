"""onnx_torch: run an ONNX graph with PyTorch ops, to time graphopt's output on a GPU.

A plain interpreter over the ONNX graph, one `torch.nn.functional` (or `torch`) call per node;
no torch.fx, no code generation. It covers the ops that the model zoo and graphopt's passes
emit (see OPS), and says which ops a model needs that it lacks.

Values are of two kinds. Activations are torch tensors on the device, float ones in the compute
dtype (float16 for the GPU runs). Constants and shape arithmetic (initializers, Constant,
Shape -> Gather -> Concat -> Reshape chains) stay numpy arrays on the host, so that running the
graph never reads a device tensor back: the whole forward pass can be captured as a CUDA graph.
A host value is copied to the device once, when an op first needs it there, and cached; Conv
weights are cached in channels_last when the executor is.

    runner = OnnxTorch(model, device="cuda", dtype=torch.float16, channels_last=True, global_pool="pool")
    (logits,) = runner(x)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

Value = Union[np.ndarray, torch.Tensor, None]
OpFn = Callable[["OnnxTorch", onnx.NodeProto, dict[str, Any], list[Value]], list[Value]]

OPS: dict[str, OpFn] = {}

ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def op(*names: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
        return fn

    return register


class UnsupportedModelError(ValueError):
    """The model uses an op or an op form this interpreter does not implement."""


class OnnxTorch:
    """Runs one ONNX model; construct once, call many times (the inputs' shapes may change)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.float16,
        channels_last: bool = True,
        global_pool: str = "pool",
    ) -> None:
        if global_pool not in ("pool", "mean"):
            raise ValueError(f"global_pool must be 'pool' (a pooling kernel) or 'mean' (a reduction), got {global_pool!r}")
        self.global_pool = global_pool
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        missing = sorted({n.op_type for n in graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in OPS})
        if missing:
            raise UnsupportedModelError(f"ops not implemented by onnx_torch: {', '.join(missing)}; implemented: {', '.join(sorted(OPS))}")
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in self.constants]
        self.output_names = [o.name for o in graph.output]
        self.nodes = [(n, {a.name: _attribute(a) for a in n.attribute}, OPS[n.op_type]) for n in graph.node]
        self._release = _last_uses(graph, set(self.output_names) | set(self.constants))
        self._on_device: dict[str, tuple[np.ndarray, torch.Tensor]] = {}

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(inputs)}")
        values: dict[str, Value] = dict(self.constants)
        values.update(zip(self.input_names, inputs))
        with torch.inference_mode():
            for index, (node, attrs, fn) in enumerate(self.nodes):
                args = [values[name] if name else None for name in node.input]
                try:
                    outs = fn(self, node, attrs, args)
                except UnsupportedModelError:
                    raise
                except Exception as err:
                    raise RuntimeError(f"{node.op_type} node {node.name!r} failed: {type(err).__name__}: {err}") from err
                for name, value in zip(node.output, outs):
                    if name:
                        values[name] = np.asarray(value) if isinstance(value, np.generic) else value
                for name in self._release.get(index, ()):
                    values.pop(name, None)
        return [self.tensor(values[name], name) for name in self.output_names]

    # -- host/device conversion ---------------------------------------------------------------

    def tensor(self, value: Value, name: str, channels_last: bool = False, transposed: bool = False) -> torch.Tensor:
        """`value` as a device tensor; float host values become the compute dtype.

        Host values are copied once and cached by name (and layout): an initializer is the same
        array on every call, a computed shape vector is compared by value. A copy from the host
        while a CUDA graph is being captured would fail, so warm-up calls must fill this cache.
        """
        if isinstance(value, torch.Tensor):
            return value.t() if transposed else value
        key = name + ("|cl" if channels_last else "") + ("|T" if transposed else "")
        hit = self._on_device.get(key)
        if hit is not None and (hit[0] is value or (hit[0].shape == value.shape and value.size <= 4096 and np.array_equal(hit[0], value))):
            return hit[1]
        array = np.array(value.T if transposed else value, copy=True, order="C")  # torch.from_numpy wants a writable array
        result = torch.from_numpy(array).to(self.device)
        if result.is_floating_point():
            result = result.to(self.dtype)
        if channels_last and result.dim() == 4:
            result = result.contiguous(memory_format=torch.channels_last)
        self._on_device[key] = (value, result)
        return result

    def device_args(self, node: onnx.NodeProto, args: Sequence[Value]) -> list[torch.Tensor | None]:
        return [None if a is None else self.tensor(a, name) for a, name in zip(args, node.input)]


def _attribute(attr: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attr)
    if attr.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(value)
    if isinstance(value, bytes):
        return value.decode()
    return value


def _last_uses(graph: onnx.GraphProto, keep: set[str]) -> dict[int, list[str]]:
    """node index -> values no later node reads (freed there, so captured graphs stay small)."""
    last: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            last[name] = index
        for name in node.output:
            last.setdefault(name, index)
    release: dict[int, list[str]] = {}
    for name, index in last.items():
        if name and name not in keep:
            release.setdefault(index, []).append(name)
    return release


def is_host(*values: Value) -> bool:
    return all(v is None or isinstance(v, np.ndarray) for v in values)


def host(value: Value, what: str) -> np.ndarray:
    """A value that must be known without running the device (shapes, axes, pads)."""
    if isinstance(value, np.ndarray):
        return value
    raise UnsupportedModelError(f"{what} is computed on the device; onnx_torch needs it constant (run simplify first)")


def ints(value: Value, what: str) -> list[int]:
    return [int(v) for v in host(value, what).reshape(-1)]


# -- elementwise --------------------------------------------------------------------------------

_UNARY_TORCH = {
    "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt,
    "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
    "HardSwish": F.hardswish, "Floor": torch.floor, "Ceil": torch.ceil, "Not": torch.logical_not,
}
_UNARY_NUMPY = {"Relu": lambda x: np.maximum(x, 0), "Sqrt": np.sqrt, "Exp": np.exp, "Log": np.log, "Neg": np.negative,
                "Abs": np.abs, "Reciprocal": np.reciprocal, "Floor": np.floor, "Ceil": np.ceil, "Not": np.logical_not}


@op(*_UNARY_TORCH)
def _unary(rt, node, attrs, args):
    (x,) = args[:1]
    if is_host(x) and node.op_type in _UNARY_NUMPY:
        return [_UNARY_NUMPY[node.op_type](x)]
    return [_UNARY_TORCH[node.op_type](rt.tensor(x, node.input[0]))]


@op("Identity", "Dropout")
def _identity(rt, node, attrs, args):
    return [args[0]]


@op("LeakyRelu")
def _leaky_relu(rt, node, attrs, args):
    return [F.leaky_relu(rt.tensor(args[0], node.input[0]), attrs.get("alpha", 0.01))]


@op("HardSigmoid")
def _hard_sigmoid(rt, node, attrs, args):
    x = rt.tensor(args[0], node.input[0])
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:
        return [F.hardsigmoid(x)]
    return [torch.clamp(x * alpha + beta, 0.0, 1.0)]


@op("Gelu")
def _gelu(rt, node, attrs, args):
    return [F.gelu(rt.tensor(args[0], node.input[0]), approximate=attrs.get("approximate", "none"))]


@op("Clip")
def _clip(rt, node, attrs, args):
    x = args[0]
    if rt.opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
    else:
        low = None if len(args) < 2 or args[1] is None else float(host(args[1], "Clip min"))
        high = None if len(args) < 3 or args[2] is None else float(host(args[2], "Clip max"))
    if is_host(x):
        return [np.clip(x, low, high)]
    return [torch.clamp(x, low, high)]


_BINARY_TORCH = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "Equal": torch.eq,
                 "Greater": torch.gt, "Less": torch.lt, "And": torch.logical_and, "Or": torch.logical_or}
_BINARY_NUMPY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Pow": np.power, "Equal": np.equal,
                 "Greater": np.greater, "Less": np.less, "And": np.logical_and, "Or": np.logical_or}


@op(*_BINARY_TORCH)
def _binary(rt, node, attrs, args):
    a, b = args
    if is_host(a, b):
        return [_BINARY_NUMPY[node.op_type](a, b)]
    a, b = rt.device_args(node, args)
    return [_BINARY_TORCH[node.op_type](a, b)]


@op("Div")
def _div(rt, node, attrs, args):
    a, b = args
    if is_host(a, b):
        if np.issubdtype(a.dtype, np.integer):
            return [np.trunc(a / b).astype(a.dtype)]  # ONNX integer division truncates
        return [a / b]
    a, b = rt.device_args(node, args)
    return [torch.div(a, b, rounding_mode="trunc") if not a.is_floating_point() else a / b]


@op("Max", "Min", "Sum", "Mean")
def _variadic(rt, node, attrs, args):
    if is_host(*args):
        fn = {"Max": np.maximum, "Min": np.minimum, "Sum": np.add, "Mean": np.add}[node.op_type]
        out = args[0]
        for a in args[1:]:
            out = fn(out, a)
        return [out / len(args) if node.op_type == "Mean" else out]
    ts = rt.device_args(node, args)
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[node.op_type]
    out = ts[0]
    for t in ts[1:]:
        out = fn(out, t)
    return [out / len(ts) if node.op_type == "Mean" else out]


@op("Where")
def _where(rt, node, attrs, args):
    if is_host(*args):
        return [np.where(*args)]
    c, a, b = rt.device_args(node, args)
    return [torch.where(c, a, b)]


@op("Cast")
def _cast(rt, node, attrs, args):
    x, to = args[0], ONNX_TO_NUMPY[attrs["to"]]
    if is_host(x):
        return [x.astype(to)]
    if np.issubdtype(to, np.floating):
        return [x.to(rt.dtype)]  # every float is the compute dtype on the device
    return [x.to({np.int64: torch.int64, np.int32: torch.int32, np.int8: torch.int8, np.uint8: torch.uint8, np.bool_: torch.bool}[to])]


# -- shape manipulation -------------------------------------------------------------------------


@op("Shape")
def _shape(rt, node, attrs, args):
    shape = np.array(args[0].shape, dtype=np.int64)
    start, end = attrs.get("start", 0), attrs.get("end")
    return [shape[start:end]]


@op("Size")
def _size(rt, node, attrs, args):
    return [np.array(int(np.prod(args[0].shape)), dtype=np.int64)]


@op("Constant")
def _constant(rt, node, attrs, args):
    if "value" in attrs:
        return [attrs["value"]]
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return [np.array(attrs[key], dtype=dtype)]
    raise UnsupportedModelError(f"Constant {node.name!r} with attributes {sorted(attrs)}")


@op("ConstantOfShape")
def _constant_of_shape(rt, node, attrs, args):
    fill = attrs.get("value", np.zeros(1, dtype=np.float32))
    return [np.full(ints(args[0], "ConstantOfShape shape"), fill.reshape(-1)[0], dtype=fill.dtype)]


@op("Range")
def _range(rt, node, attrs, args):
    start, limit, delta = (host(a, "Range bound") for a in args)
    return [np.arange(start, limit, delta, dtype=np.result_type(start, limit, delta))]


def _reshape_target(shape: Sequence[int], target: list[int], allowzero: int) -> list[int]:
    if not allowzero:
        target = [shape[i] if t == 0 else t for i, t in enumerate(target)]
    return target


@op("Reshape")
def _reshape(rt, node, attrs, args):
    x = args[0]
    target = _reshape_target(x.shape, ints(args[1], "Reshape shape"), attrs.get("allowzero", 0))
    return [x.reshape(target)]


@op("Flatten")
def _flatten(rt, node, attrs, args):
    x = args[0]
    axis = attrs.get("axis", 1)
    axis = axis + len(x.shape) if axis < 0 else axis
    return [x.reshape(int(np.prod(x.shape[:axis])), -1)]


@op("Transpose")
def _transpose(rt, node, attrs, args):
    x = args[0]
    perm = attrs.get("perm", list(reversed(range(len(x.shape)))))
    return [np.transpose(x, perm) if is_host(x) else x.permute(*perm)]


def _axes(node: onnx.NodeProto, attrs: dict[str, Any], args: list[Value], index: int, rank: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or from input `index` (newer), made non-negative."""
    if "axes" in attrs:
        axes = list(attrs["axes"])
    elif len(args) > index and args[index] is not None:
        axes = ints(args[index], f"{node.op_type} axes")
    else:
        return None
    return [a % rank for a in axes]


@op("Squeeze")
def _squeeze(rt, node, attrs, args):
    x = args[0]
    axes = _axes(node, attrs, args, 1, len(x.shape))
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    if is_host(x):
        return [np.squeeze(x, tuple(axes))]
    for a in sorted(axes, reverse=True):
        x = x.squeeze(a)
    return [x]


@op("Unsqueeze")
def _unsqueeze(rt, node, attrs, args):
    x = args[0]
    raw = list(attrs["axes"]) if "axes" in attrs else ints(args[1], "Unsqueeze axes")
    for a in sorted(a % (len(x.shape) + len(raw)) for a in raw):
        x = np.expand_dims(x, a) if is_host(x) else x.unsqueeze(a)
    return [x]


@op("Concat")
def _concat(rt, node, attrs, args):
    axis = attrs["axis"]
    parts = [a for a in args if a is not None]
    if is_host(*parts):
        return [np.concatenate(parts, axis=axis)]
    return [torch.cat(rt.device_args(node, args), dim=axis)]


@op("Split")
def _split(rt, node, attrs, args):
    x = args[0]
    axis = attrs.get("axis", 0) % len(x.shape)
    if "split" in attrs:
        sizes = list(attrs["split"])
    elif len(args) > 1 and args[1] is not None:
        sizes = ints(args[1], "Split sizes")
    else:
        parts = attrs.get("num_outputs", len(node.output))
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    if is_host(x):
        return list(np.split(x, np.cumsum(sizes)[:-1], axis=axis))
    return list(torch.split(x, sizes, dim=axis))


@op("Slice")
def _slice(rt, node, attrs, args):
    x = args[0]
    rank = len(x.shape)
    if rt.opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ints(args[1], "Slice starts"), ints(args[2], "Slice ends")
        axes = ints(args[3], "Slice axes") if len(args) > 3 and args[3] is not None else list(range(len(starts)))
        steps = ints(args[4], "Slice steps") if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step < 0 and not is_host(x):
            raise UnsupportedModelError(f"Slice {node.name!r} with a negative step on a device tensor")
        index[axis % rank] = slice(start, end, step)
    return [x[tuple(index)]]


@op("Gather")
def _gather(rt, node, attrs, args):
    x, indices = args
    indices = host(indices, "Gather indices")
    axis = attrs.get("axis", 0) % len(x.shape)
    if is_host(x):
        return [np.take(x, indices, axis=axis)]
    if indices.ndim == 0:
        return [x.select(axis, int(indices) % x.shape[axis])]
    flat = rt.tensor(np.where(indices < 0, indices + x.shape[axis], indices).astype(np.int64).reshape(-1), node.input[1])
    picked = torch.index_select(x, axis, flat)
    return [picked.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1:])]


@op("Expand")
def _expand(rt, node, attrs, args):
    x, shape = args[0], ints(args[1], "Expand shape")
    target = np.broadcast_shapes(tuple(x.shape), tuple(shape))
    if is_host(x):
        return [np.broadcast_to(x, target).copy()]
    return [x.expand(*target)]


@op("Pad")
def _pad(rt, node, attrs, args):
    x = rt.tensor(args[0], node.input[0])
    rank = x.dim()
    if rt.opset < 11:
        pads, value = list(attrs["pads"]), attrs.get("value", 0.0)
        axes = list(range(rank))
    else:
        pads = ints(args[1], "Pad pads")
        value = float(host(args[2], "Pad value")) if len(args) > 2 and args[2] is not None else 0.0
        axes = [a % rank for a in ints(args[3], "Pad axes")] if len(args) > 3 and args[3] is not None else list(range(rank))
    begin, end = pads[: len(axes)], pads[len(axes):]
    per_axis = {a: (b, e) for a, b, e in zip(axes, begin, end)}
    torch_pads: list[int] = []
    for axis in reversed(range(rank)):  # F.pad takes (last dim begin, end, second-last begin, end, ...)
        torch_pads.extend(per_axis.get(axis, (0, 0)))
    mode = attrs.get("mode", "constant")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode]
    if torch_mode == "constant":
        return [F.pad(x, torch_pads, mode="constant", value=value)]
    return [F.pad(x, torch_pads[: 2 * (rank - 2)], mode=torch_mode)]


# -- convolution, linear, pooling, normalization ------------------------------------------------


def _spatial_pads(attrs: dict[str, Any], in_shape: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """ONNX pads [begin..., end...] for the spatial dims, resolving auto_pad."""
    n = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * n)))
    if auto == "VALID":
        return [0] * (2 * n)
    begin, end = [], []
    for size, k, s, d in zip(in_shape, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin + end


def _symmetric_or_pad(x: torch.Tensor, pads: list[int], value: float) -> tuple[torch.Tensor, list[int]]:
    """(input, per-dim padding for the torch op): asymmetric pads are applied with F.pad first."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return x, begin
    torch_pads: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        torch_pads.extend((b, e))
    return F.pad(x, torch_pads, value=value), [0] * n


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@op("Conv")
def _conv(rt, node, attrs, args):
    x = rt.tensor(args[0], node.input[0])
    w = rt.tensor(args[1], node.input[1], channels_last=rt.channels_last)
    b = rt.tensor(args[2], node.input[2]) if len(args) > 2 and args[2] is not None else None
    n = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    pads = _spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    x, padding = _symmetric_or_pad(x, pads, 0.0)
    return [_CONV[n](x, w, b, strides, padding, dilations, attrs.get("group", 1))]


@op("Gemm")
def _gemm(rt, node, attrs, args):
    a = rt.tensor(args[0], node.input[0])
    if attrs.get("transA", 0):
        a = a.t()
    # F.linear wants the weight as [out, in], which is B itself when transB=1.
    w = rt.tensor(args[1], node.input[1], transposed=not attrs.get("transB", 0))
    c = rt.tensor(args[2], node.input[2]) if len(args) > 2 and args[2] is not None else None
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha == 1.0 and (c is None or (beta == 1.0 and c.dim() == 1)):
        return [F.linear(a, w, c)]
    y = F.linear(a, w) * alpha
    return [y if c is None else y + beta * c]


@op("MatMul")
def _matmul(rt, node, attrs, args):
    a, b = rt.device_args(node, args)
    return [torch.matmul(a, b)]


# global_pool="pool" runs global pools as pooling kernels with a full-size window, so that
# reduce-to-pool's rewrite changes the kernel; "mean" runs them as the reduction ReduceMean also
# uses, which is what F.adaptive_avg_pool2d(x, 1) itself does.
@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(rt, node, attrs, args):
    x = rt.tensor(args[0], node.input[0])
    average = node.op_type == "GlobalAveragePool"
    if rt.global_pool == "pool" and x.dim() in (3, 4, 5):
        pool = (_AVG_POOL if average else _MAX_POOL)[x.dim() - 2]
        return [pool(x, list(x.shape[2:]))]
    dims = tuple(range(2, x.dim()))
    return [x.mean(dim=dims, keepdim=True) if average else x.amax(dim=dims, keepdim=True)]


_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@op("AveragePool")
def _average_pool(rt, node, attrs, args):
    x = rt.tensor(args[0], node.input[0])
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    pads = _spatial_pads(attrs, x.shape[2:], kernel, strides, [1] * n)
    include_pad = bool(attrs.get("count_include_pad", 0))
    if pads[:n] != pads[n:] and not include_pad:
        raise UnsupportedModelError(f"AveragePool {node.name!r}: asymmetric pads with count_include_pad=0")
    x, padding = _symmetric_or_pad(x, pads, 0.0)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise UnsupportedModelError(f"AveragePool {node.name!r}: pad larger than half the kernel")
    kwargs = {"ceil_mode": bool(attrs.get("ceil_mode", 0)), "count_include_pad": include_pad}
    return [_AVG_POOL[n](x, kernel, strides, padding, **kwargs)]


@op("MaxPool")
def _max_pool(rt, node, attrs, args):
    if len(node.output) > 1 and node.output[1]:
        raise UnsupportedModelError(f"MaxPool {node.name!r} with an Indices output")
    x = rt.tensor(args[0], node.input[0])
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    pads = _spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    x, padding = _symmetric_or_pad(x, pads, float("-inf"))
    return [_MAX_POOL[n](x, kernel, strides, padding, dilations, ceil_mode=bool(attrs.get("ceil_mode", 0)))]


@op("BatchNormalization")
def _batch_norm(rt, node, attrs, args):
    x, scale, bias, mean, var = rt.device_args(node, args[:5])
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))]


@op("InstanceNormalization")
def _instance_norm(rt, node, attrs, args):
    x, scale, bias = rt.device_args(node, args)
    return [F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))]


@op("LayerNormalization")
def _layer_norm(rt, node, attrs, args):
    if any(node.output[1:]):
        raise UnsupportedModelError(f"LayerNormalization {node.name!r} with Mean/InvStdDev outputs")
    x, scale, bias = (rt.device_args(node, args) + [None])[:3]
    axis = attrs.get("axis", -1) % x.dim()
    return [F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, attrs.get("epsilon", 1e-5))]


@op("Softmax", "LogSoftmax")
def _softmax(rt, node, attrs, args):
    x = rt.tensor(args[0], node.input[0])
    fn = F.softmax if node.op_type == "Softmax" else F.log_softmax
    if rt.opset >= 13:
        return [fn(x, dim=attrs.get("axis", -1))]
    axis = attrs.get("axis", 1) % x.dim()  # before opset 13: softmax over the flattened tail
    flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
    return [fn(flat, dim=1).reshape(x.shape)]


_REDUCE_TORCH = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
}
_REDUCE_NUMPY = {"ReduceMean": np.mean, "ReduceSum": np.sum, "ReduceMax": np.max, "ReduceMin": np.min}
_AXES_AS_INPUT_FROM = {"ReduceSum": 13}  # the others take axes as an input from opset 18


@op(*_REDUCE_TORCH)
def _reduce(rt, node, attrs, args):
    x = args[0]
    rank = len(x.shape)
    axes = _axes(node, attrs, args, 1, rank) if rt.opset >= _AXES_AS_INPUT_FROM.get(node.op_type, 18) else (
        [a % rank for a in attrs["axes"]] if "axes" in attrs else None)
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(rank))
    keep = bool(attrs.get("keepdims", 1))
    if is_host(x):
        return [_REDUCE_NUMPY[node.op_type](x, axis=tuple(axes), keepdims=keep)]
    return [_REDUCE_TORCH[node.op_type](x, tuple(axes), keep)]
