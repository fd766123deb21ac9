"""The inputs verification runs graphs on: several seeded sets by default, or the user's own data.

One random sample proves little: a rewrite that is wrong only for values outside [-1, 1], only at
batch > 1, or only on some rows of an ArgMax passes it. So by default every graph is run on
several input sets (`DEFAULT_PLAN`), each with its own seed and float distribution, and with
every dynamic dimension at 1 and at a larger size. A dimension is resolved by name across all
inputs (`batch` takes one value everywhere) and can be set by name (`--input-shape batch=4`)
or through an input's whole shape (`--input-shape ids:3x64` also sets `batch` and `sequence`
wherever else they appear). Integer inputs that the graph uses as indices or axes are drawn
within the range the graph allows. Models with discrete outputs (ArgMax, TopK indices,
integers, booleans), where one row can happen to agree, are compared over more rows.

The user's own data replaces the random sets: polygraphy's input JSON (`--load-inputs`, a list
of feed dicts, as `polygraphy run --save-inputs` writes) or polygraphy's data-loader-script
convention (`--data-loader-script file.py[:func]`, a function, `load_data` by default, that
yields feed dicts). Every feed is checked against the model's inputs before anything runs.

Why not polygraphy's DataLoader: it draws every float in float64 before casting (a 1 GB float32
input costs 3 GB), draws from one uniform range only, and cannot make bfloat16, float8, 4-bit
or string tensors. Its file formats and script convention are used as they are.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from polygraphy.json import load_json
from polygraphy.logger import G_LOGGER

from graphopt.errors import InputDataError, InputShapeError

Feed = dict[str, np.ndarray]
# What --input-shape asks for: an input's whole shape (tuple) or a named dimension's size (int).
InputShapes = Mapping[str, "tuple[int, ...] | int"]

INT64_MAX = 2**63 - 1
SEED_MAX = 2**63 - 1
# All input sets together; past this the feed is refused before it is drawn. Graph activations
# take many times the inputs, so a model whose inputs alone take this much is not verifiable here.
FEED_LIMIT_BYTES = 4 * 10**9
# Unsampled integer inputs (shapes, counts, flags) stay small and non-negative, valid for most uses.
DEFAULT_INT_RANGE = (0, 3)


@contextlib.contextmanager
def quiet_polygraphy() -> Iterator[None]:
    """Nothing from polygraphy's logger, not even its critical messages: graphopt reports in one line."""
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):
        yield


# -- distributions and the default plan ------------------------------------------------------------


@dataclass(frozen=True)
class FloatDistribution:
    """How float inputs of one input set are drawn (float32, then cast to the input's type)."""

    name: str
    kind: str  # "uniform" or "normal"
    low: float = 0.0
    high: float = 1.0

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "normal":
            return rng.standard_normal(shape, dtype=np.float32)
        values = rng.random(shape, dtype=np.float32)
        values *= np.float32(self.high - self.low)
        values += np.float32(self.low)
        return values


# [-1, 1] reaches both signs of Relu/Clip paths; a standard normal has a third of its values
# outside [-1, 1]; [0, 255] is what image models are fed, and what a Clip(x, -1, 1) or a quantized
# channel that small inputs never reach would change.
UNIFORM = FloatDistribution("uniform[-1, 1]", "uniform", -1.0, 1.0)
NORMAL = FloatDistribution("normal(0, 1)", "normal")
WIDE = FloatDistribution("uniform[0, 255]", "uniform", 0.0, 255.0)


@dataclass(frozen=True)
class SetPlan:
    """One default input set: its seed (offset from --seed), float distribution and dynamic-dim size."""

    seed_offset: int
    distribution: FloatDistribution
    dynamic_dim: int


LARGER_DIM = 2
DEFAULT_PLAN = (
    SetPlan(0, UNIFORM, 1),
    SetPlan(1, NORMAL, LARGER_DIM),
    SetPlan(2, WIDE, 1),
)
# A discrete output (an ArgMax's index) can agree on one row by chance and differ on the next:
# such models get more rows in the larger set and more seeds.
DISCRETE_LARGER_DIM = 8
DISCRETE_EXTRA_PLAN = tuple(SetPlan(3 + i, (UNIFORM, NORMAL)[i % 2], 1) for i in range(4))


@dataclass
class InputSet:
    """One feed for every graph input, and where it came from (what the report lists)."""

    label: str
    feed: Feed
    seed: int | None = None
    distribution: str | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)


# -- the model's inputs ----------------------------------------------------------------------------


Dim = int | str | None  # a static size, a named (symbolic) dimension, or an unnamed dynamic one


@dataclass(frozen=True)
class GraphInput:
    """A real graph input (initializers are not inputs): its name, type and declared dims."""

    name: str
    kind: str  # "tensor_type", "sequence_type", "map_type", "optional_type", ...
    elem_type: int = onnx.TensorProto.UNDEFINED
    dims: tuple[Dim, ...] | None = None  # None: the rank is unknown

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))

    def describe_type(self) -> str:
        if self.kind != "tensor_type":
            return self.kind.removesuffix("_type") + " (not a tensor)"
        return onnx.TensorProto.DataType.Name(self.elem_type).lower()


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    initializers = {init.name for init in model.graph.initializer}
    inputs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        kind = vi.type.WhichOneof("value") or "unknown"
        if kind != "tensor_type":
            inputs.append(GraphInput(vi.name, kind))
            continue
        tensor_type = vi.type.tensor_type
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
        inputs.append(GraphInput(vi.name, kind, tensor_type.elem_type, dims))
    return inputs


# -- shapes ----------------------------------------------------------------------------------------


def parse_input_shapes(specs: Iterable[str]) -> dict[str, tuple[int, ...] | int]:
    """`images:1x3x224x224` (an input's shape) and `batch=4,sequence=64` (named dims), repeatable."""
    shapes: dict[str, tuple[int, ...] | int] = {}
    for spec in specs:
        if ":" not in spec and "=" in spec:
            for item in spec.split(","):
                name, sep, value = item.partition("=")
                size = _parse_dim(value) if sep and name else None
                if size is None:
                    raise InputShapeError(f"bad --input-shape {spec!r}; expected NAME=SIZE[,NAME=SIZE...], e.g. batch=4,sequence=64")
                shapes[name.strip()] = size
            continue
        name, sep, text = spec.rpartition(":")
        dims = [_parse_dim(d) for d in text.lower().split("x")] if text else []
        if not sep or not name or not dims or None in dims:
            raise InputShapeError(f"bad --input-shape {spec!r}; expected NAME:DIMxDIM... (e.g. input:1x3x224x224) or DIM=SIZE (e.g. batch=4)")
        shapes[name] = tuple(dims)
    return shapes


def _parse_dim(text: str) -> int | None:
    """A dimension size: a whole number from 1 to int64's maximum; 0 is refused (see below)."""
    text = text.strip()
    if not text.isdigit():
        return None
    size = int(text)
    if size == 0:
        # A zero-size input makes every output empty, and every comparison of empty outputs passes.
        raise InputShapeError(f"--input-shape: a zero-size dimension makes every comparison vacuous (empty outputs); "
                              f"give sizes of at least 1")
    if size > INT64_MAX:
        raise InputShapeError(f"--input-shape: {text} does not fit in int64")
    return size


@dataclass(frozen=True)
class ShapeResolver:
    """Concrete shapes for every input from the model's dims, the user's requests and a default size."""

    inputs: tuple[GraphInput, ...]
    whole: Mapping[str, tuple[int, ...]]  # input name -> the user's shape
    named: Mapping[str, int]  # dimension name -> the user's size (given, or read from a whole shape)

    @classmethod
    def build(cls, inputs: Sequence[GraphInput], requested: InputShapes) -> ShapeResolver:
        by_name = {i.name: i for i in inputs}
        dim_names = {d for i in inputs for d in (i.dims or ()) if isinstance(d, str)}
        whole = {name: value for name, value in requested.items() if isinstance(value, tuple)}
        named = {name: value for name, value in requested.items() if not isinstance(value, tuple)}
        unknown_inputs = sorted(set(whole) - set(by_name))
        if unknown_inputs:
            raise InputShapeError(f"--input-shape names {', '.join(unknown_inputs)}, not an input; "
                                  f"inputs: {', '.join(by_name) or '(none)'}")
        unknown_dims = sorted(set(named) - dim_names)
        if unknown_dims:
            raise InputShapeError(f"--input-shape sets dimension {', '.join(unknown_dims)}, which no input has; "
                                  f"named dimensions: {', '.join(sorted(dim_names)) or '(none)'}")
        sources = {name: f"{name}={size}" for name, size in named.items()}
        for name, shape in whole.items():
            graph_input = by_name[name]
            if graph_input.dims is None:
                continue
            if len(shape) != len(graph_input.dims):
                raise InputShapeError(f"--input-shape {name} has rank {len(shape)}, the model's input has rank {len(graph_input.dims)}")
            for axis, (declared, size) in enumerate(zip(graph_input.dims, shape)):
                if isinstance(declared, int) and declared != size:
                    raise InputShapeError(f"--input-shape {name}: dimension {axis} is {declared} in the model, not {size}; "
                                          "only dynamic dimensions can be set")
                if isinstance(declared, str):
                    if declared in named and named[declared] != size:
                        raise InputShapeError(f"--input-shape {name} sets {declared}={size}, but {sources[declared]} was given")
                    named[declared] = size
                    sources.setdefault(declared, f"{name}:{'x'.join(map(str, shape))}")
        return cls(tuple(inputs), whole, named)

    def shapes(self, dynamic_dim: int) -> dict[str, tuple[int, ...]]:
        """Each tensor input's shape, with every dimension the user left open at `dynamic_dim`."""
        shapes = {}
        for graph_input in self.inputs:
            if graph_input.name in self.whole:
                shapes[graph_input.name] = self.whole[graph_input.name]
            elif graph_input.dims is not None:
                shapes[graph_input.name] = tuple(
                    d if isinstance(d, int) else self.named.get(d, dynamic_dim) if isinstance(d, str) else dynamic_dim
                    for d in graph_input.dims
                )
        return shapes

    @property
    def has_open_dims(self) -> bool:
        return any(
            not isinstance(d, int) and (d is None or d not in self.named)
            for i in self.inputs if i.name not in self.whole for d in (i.dims or ())
        )


# -- the default input sets ------------------------------------------------------------------------


def default_input_sets(model: onnx.ModelProto, requested: InputShapes | None = None, seed: int = 0) -> list[InputSet]:
    """The seeded input sets of DEFAULT_PLAN (more for discrete outputs), checked for size first."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX - 16:
        raise InputDataError(f"--seed {seed}: a seed is a whole number from 0 to {SEED_MAX - 16}")
    inputs = graph_inputs(model)
    for graph_input in inputs:
        _check_sampleable(graph_input)
    resolver = ShapeResolver.build(inputs, requested or {})
    plan = list(DEFAULT_PLAN)
    if has_discrete_output(model):
        plan = [p if p.dynamic_dim == 1 else SetPlan(p.seed_offset, p.distribution, DISCRETE_LARGER_DIM) for p in plan]
        plan += DISCRETE_EXTRA_PLAN
    if not resolver.has_open_dims:
        # Every dimension is fixed: the larger set would repeat the first one's shapes; keep its seed and distribution.
        plan = [SetPlan(p.seed_offset, p.distribution, 1) for p in plan]
    shapes_per_set = [resolver.shapes(p.dynamic_dim) for p in plan]
    check_feed_size(inputs, shapes_per_set)
    ranges = integer_ranges(model, inputs)
    sets = []
    for p, shapes in zip(plan, shapes_per_set):
        rng = np.random.default_rng(seed + p.seed_offset)
        feed = {i.name: sample(i, shapes.get(i.name, ()), p.distribution, rng, ranges.get(i.name)) for i in inputs}
        label = f"seed {seed + p.seed_offset}, {p.distribution.name}, " + _describe_shapes(shapes)
        sets.append(InputSet(label, feed, seed + p.seed_offset, p.distribution.name, {k: list(v) for k, v in shapes.items()}))
    return sets


def _describe_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name}:{'x'.join(map(str, shape)) or 'scalar'}" for name, shape in shapes.items()) or "no inputs"


def has_discrete_output(model: onnx.ModelProto) -> bool:
    """An output of integers, booleans or strings (an ArgMax, TopK's indices, a mask); unknown types count too."""
    return any(not _is_float_type(o.type.tensor_type.elem_type) for o in model.graph.output if o.type.HasField("tensor_type"))


def _is_float_type(elem_type: int) -> bool:
    try:
        return is_float_dtype(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):  # UNDEFINED, or a type numpy cannot name
        return False


_UNSAMPLEABLE = {onnx.TensorProto.UNDEFINED}
for _name in ("FLOAT8E8M0",):  # a scale format: no sign, no mantissa; not a value type to draw
    if hasattr(onnx.TensorProto, _name):
        _UNSAMPLEABLE.add(getattr(onnx.TensorProto, _name))


def _check_sampleable(graph_input: GraphInput) -> None:
    if graph_input.kind != "tensor_type" or graph_input.elem_type in _UNSAMPLEABLE:
        raise InputDataError(
            f"input {graph_input.name} is a {graph_input.describe_type()}, which graphopt cannot draw at random; "
            "give its values with --load-inputs or --data-loader-script, or skip verification with --no-verify"
        )


def check_feed_size(inputs: Sequence[GraphInput], shapes_per_set: Sequence[Mapping[str, tuple[int, ...]]]) -> None:
    """Refuse, before drawing anything, input sets too large to hold (and far too large to run)."""
    total = 0
    largest: tuple[int, str] = (0, "")
    for shapes in shapes_per_set:
        for graph_input in inputs:
            shape = shapes.get(graph_input.name, ())
            count = math.prod(shape)
            size = count * _bytes_per_element(graph_input.elem_type)
            total += size
            largest = max(largest, (size, f"{graph_input.name}: {'x'.join(map(str, shape))} {graph_input.describe_type()}"))
    if total > FEED_LIMIT_BYTES:
        raise InputDataError(
            f"the verification inputs would take {_format_bytes(total)} in {len(shapes_per_set)} input sets "
            f"(largest {largest[1]}, {_format_bytes(largest[0])}); the limit is {_format_bytes(FEED_LIMIT_BYTES)}: "
            "give smaller sizes with --input-shape, or skip verification with --no-verify"
        )


def _bytes_per_element(elem_type: int) -> float:
    if elem_type == onnx.TensorProto.STRING:
        return 64  # an object pointer and a short string
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 8


def _format_bytes(size: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


# -- drawing values --------------------------------------------------------------------------------


_STRINGS = np.array(["", "a", "graphopt", "ONNX", "42", "-1.5", "hello world", "TensorRT", "\u00e9t\u00e9", "x" * 17],
                    dtype=object)


def sample(graph_input: GraphInput, shape: tuple[int, ...], distribution: FloatDistribution, rng: np.random.Generator,
           int_range: tuple[int, int] | None = None) -> np.ndarray:
    """Random values of the input's type: floats from `distribution`, integers within `int_range`."""
    # NumPy's generators return a scalar, not an array, for shape (); runtimes take arrays only.
    return np.asarray(_draw(graph_input, shape, distribution, rng, int_range))


def _draw(graph_input: GraphInput, shape: tuple[int, ...], distribution: FloatDistribution, rng: np.random.Generator,
          int_range: tuple[int, int] | None) -> np.ndarray:
    elem_type = graph_input.elem_type
    if elem_type == onnx.TensorProto.STRING:
        return _STRINGS[rng.integers(0, len(_STRINGS), shape)]
    dtype = graph_input.dtype
    if dtype == np.bool_:
        return rng.random(shape, dtype=np.float32) < 0.5
    if np.issubdtype(dtype, np.complexfloating):
        return (distribution.draw(rng, shape) + 1j * distribution.draw(rng, shape)).astype(dtype)
    if is_float_dtype(dtype):
        if dtype == np.float64:
            return distribution.draw(rng, shape).astype(np.float64)
        values = distribution.draw(rng, shape)
        limit = float(ml_dtypes.finfo(dtype).max)
        if limit < float(np.finfo(np.float32).max):  # narrow floats (fp16, float8, float4) saturate, never overflow to inf
            np.clip(values, -limit, limit, out=values)
        return values.astype(dtype)
    low, high = int_range or DEFAULT_INT_RANGE
    info = ml_dtypes.iinfo(dtype)
    low, high = max(low, int(info.min)), min(high, int(info.max))
    return rng.integers(low, high + 1, shape, dtype=np.int64).astype(dtype)


def is_float_dtype(dtype: np.dtype) -> bool:
    if np.issubdtype(dtype, np.floating):
        return True
    try:
        ml_dtypes.finfo(dtype)
    except (ValueError, TypeError):
        return False
    return True


# -- integer inputs the graph uses as indices or axes ----------------------------------------------


def integer_ranges(model: onnx.ModelProto, inputs: Sequence[GraphInput]) -> dict[str, tuple[int, int]]:
    """[low, high] for integer inputs whose every use bounds them (Gather indices, axes, OneHot...).

    An index into a dimension of size d may be anything in [-d, d-1]; an axis of a rank-r tensor
    anything in [-r, r-1]. An input with several uses gets the intersection; an input with a use
    that says nothing keeps DEFAULT_INT_RANGE.
    """
    integer = {i.name for i in inputs if i.kind == "tensor_type" and _is_integer(i.elem_type)}
    if not integer:
        return {}
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {name: [] for name in integer}
    aliases = {name: name for name in integer}  # Cast/Identity of an integer input carries its range
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in aliases:
                source = aliases[name]
                if node.op_type in ("Cast", "Identity") and _cast_keeps_integers(node):
                    aliases[node.output[0]] = source
                else:
                    uses[source].append((node, index))
    shapes = _known_shapes(model)
    ranges = {}
    for name, node_uses in uses.items():
        bounds = [_index_range(node, index, shapes) for node, index in node_uses]
        if not bounds or any(b is None for b in bounds):
            continue
        low, high = max(b[0] for b in bounds), min(b[1] for b in bounds)
        if low <= high:
            ranges[name] = (low, high)
    return ranges


def _is_integer(elem_type: int) -> bool:
    return elem_type in {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                         onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def _cast_keeps_integers(node: onnx.NodeProto) -> bool:
    if node.op_type == "Identity":
        return True
    to = next((a.i for a in node.attribute if a.name == "to"), onnx.TensorProto.UNDEFINED)
    return _is_integer(to)


def _known_shapes(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...]]:
    shapes: dict[str, tuple[Dim, ...]] = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape") and vi.name not in shapes:
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)
    return shapes


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _index_range(node: onnx.NodeProto, index: int, shapes: Mapping[str, tuple[Dim, ...]]) -> tuple[int, int] | None:
    """The values `node` accepts at input `index`, when its data's shape says (None: unknown)."""
    op = node.op_type
    data = shapes.get(node.input[0]) if node.input else None

    def dim(axis: int) -> int | None:
        if data is None or not -len(data) <= axis < len(data):
            return None
        size = data[axis]
        return size if isinstance(size, int) and size > 0 else None

    def around(size: int | None) -> tuple[int, int] | None:
        return None if size is None else (-size, size - 1)

    if op in ("Gather", "GatherElements", "ScatterElements", "Scatter") and index == 1:
        return around(dim(_attribute(node, "axis", 0)))
    if op in ("GatherND", "ScatterND") and index == 1:
        if data is None:
            return None
        batch_dims = _attribute(node, "batch_dims", 0)
        sizes = [dim(axis) for axis in range(batch_dims, len(data))]
        return None if not sizes or None in sizes else (0, min(sizes) - 1)
    if op in ("CumSum",) and index == 1:
        return None if data is None else (-len(data), len(data) - 1)
    if op == "TopK" and index == 1:
        size = dim(_attribute(node, "axis", -1))
        return None if size is None else (1, size)
    return None


# -- the user's own data ---------------------------------------------------------------------------


def load_input_sets(path: str | os.PathLike, inputs: Sequence[GraphInput]) -> list[InputSet]:
    """Every feed in a polygraphy input-data JSON file (`polygraphy run --save-inputs`), checked."""
    try:
        with quiet_polygraphy():
            feeds = load_json(os.fspath(path), description="input data")
    except Exception as err:  # polygraphy raises its own types (and JSON's) for malformed files
        raise InputDataError(f"{path}: not a polygraphy input-data file ({_one_line(err)})") from None
    if isinstance(feeds, Mapping):
        feeds = [feeds]
    if not isinstance(feeds, list) or not feeds:
        raise InputDataError(f"{path}: not a polygraphy input-data file (expected a list of feeds: "
                             "{input name: array}, as polygraphy run --save-inputs writes)")
    return [_users_set(f"{Path(path).name} #{i}", check_feed(feed, inputs, f"{path} #{i}")) for i, feed in enumerate(feeds)]


def script_input_sets(spec: str, inputs: Sequence[GraphInput]) -> list[InputSet]:
    """The feeds a data-loader script yields (polygraphy's --data-loader-script FILE.py[:FUNC])."""
    from polygraphy import mod
    from polygraphy.tools.args.util import parse_script_and_func_name

    script, function = parse_script_and_func_name(spec, default_func_name="load_data")
    if not script or not Path(script).is_file():
        raise InputDataError(f"--data-loader-script {spec}: no such file")
    try:
        with quiet_polygraphy():
            load_data = mod.import_from_script(script, function)
        feeds = list(load_data() if callable(load_data) else load_data)
    except Exception as err:  # the user's script: anything it raises is its problem, reported in one line
        raise InputDataError(f"--data-loader-script {spec}: {type(err).__name__}: {_one_line(err)}") from None
    if not feeds:
        raise InputDataError(f"--data-loader-script {spec}: {function}() yielded no feeds")
    return [_users_set(f"{Path(script).name}:{function} #{i}", check_feed(feed, inputs, f"{spec} #{i}")) for i, feed in enumerate(feeds)]


def _users_set(label: str, feed: Feed) -> InputSet:
    return InputSet(label, feed, shapes={name: list(value.shape) for name, value in feed.items() if isinstance(value, np.ndarray)})


def check_feed(feed: object, inputs: Sequence[GraphInput], where: str) -> Feed:
    """A feed with exactly the model's inputs, each of the declared type, rank and static dims.

    Arrays of types numpy lacks (bfloat16, float8, 4-bit) come back from JSON as raw bytes of the
    right width; they are read as the type the model declares.
    """
    if not isinstance(feed, Mapping):
        raise InputDataError(f"{where}: a feed must map input names to arrays, not {type(feed).__name__}")
    names = [i.name for i in inputs]
    missing, extra = [n for n in names if n not in feed], [n for n in feed if n not in names]
    if missing or extra:
        raise InputDataError(f"{where}: " + "; ".join(filter(None, [
            missing and f"no value for input {', '.join(missing)}", extra and f"{', '.join(map(str, extra))} is not an input",
        ])) + f"; the model's inputs: {', '.join(names) or '(none)'}")
    checked: Feed = OrderedDict()
    for graph_input in inputs:
        value = feed[graph_input.name]
        if graph_input.kind != "tensor_type":
            checked[graph_input.name] = value  # sequences and optionals go to ONNX Runtime as given
            continue
        checked[graph_input.name] = _as_declared(np.asarray(value), graph_input, where)
    return checked


def _as_declared(array: np.ndarray, graph_input: GraphInput, where: str) -> np.ndarray:
    name = graph_input.name
    if graph_input.elem_type == onnx.TensorProto.STRING:
        if array.dtype.kind not in "OUS":
            raise InputDataError(f"{where}: input {name} is a string tensor, the value given is {array.dtype}")
        array = array.astype(object)
    else:
        expected = graph_input.dtype
        if array.dtype.kind == "V" and array.dtype.itemsize == expected.itemsize:
            array = array.view(expected)
        if array.dtype != expected:
            raise InputDataError(f"{where}: input {name} is {graph_input.describe_type()} in the model, the value given is {array.dtype}")
    if graph_input.dims is not None:
        if array.ndim != len(graph_input.dims):
            raise InputDataError(f"{where}: input {name} has rank {len(graph_input.dims)} in the model, the value given has shape "
                                 f"{list(array.shape)}")
        for axis, (declared, size) in enumerate(zip(graph_input.dims, array.shape)):
            if isinstance(declared, int) and declared != size:
                raise InputDataError(f"{where}: input {name} has dimension {axis} = {declared} in the model, the value given has "
                                     f"shape {list(array.shape)}")
    return array


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
