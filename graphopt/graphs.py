"""Small graph helpers shared by passes: constants, shapes, bypassing a node, exporting.

Passes edit onnx-graphsurgeon graphs. These helpers hold the few facts every pass needs and
that are easy to get subtly wrong (a removed node that produced a graph output, a tensor whose
value is only known through a Constant node, an export that forgets the model's metadata).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues


# graphsurgeon imports an unset domain as None; ONNX spells the default domain "" or "ai.onnx".
DEFAULT_DOMAINS = (None, "", "ai.onnx")
# The float types the passes rewrite; others (bfloat16, float8, double) are declined.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def nodes_with_op(graph: gs.Graph, *op_types: str) -> list[gs.Node]:
    """Top-level nodes of the given op types in the default domain (subgraphs are not entered)."""
    return [n for n in graph.nodes if n.op in op_types and n.domain in DEFAULT_DOMAINS]


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor known before inference: an initializer or a Constant node's output,
    also through the Identity chains exporters route weights by (canonicalization folds those,
    but a pass must stay sound on a graph onnxsim could not canonicalize)."""
    for _ in range(64):
        if isinstance(tensor, gs.Constant):
            return tensor.values
        producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if producer is None or producer.domain not in DEFAULT_DOMAINS:
            return None
        if producer.op == "Constant":
            value = producer.attrs.get("value")
            return value.values if isinstance(value, gs.Constant) else None
        if producer.op != "Identity":
            return None
        tensor = producer.inputs[0]
    return None


@dataclass(frozen=True)
class Quantization:
    """How a quantized weight is stored: value = (stored - zero_point) * scale, along `axis`.

    `quantize` is set for the float form (ModelOpt's: a float constant -> QuantizeLinear ->
    DequantizeLinear, the integers computed at build time); else `stored` holds the integers.
    """

    dequantize: gs.Node
    scale: np.ndarray
    zero_point: np.ndarray  # zeros of the quantized type when the DequantizeLinear has none
    axis: int | None  # None: one scale for the whole tensor
    quantize: gs.Node | None = None

    @property
    def per_channel(self) -> bool:
        return self.axis is not None


@dataclass(frozen=True)
class Weight:
    """A tensor's value known before inference, as every pass sees weights.

    `stored` is what the graph holds: the float values of a plain constant, or, for a quantized
    weight, the integers (or the float constant in front of a QuantizeLinear). Rewrites keep a
    weight in the form it came in.
    """

    stored: np.ndarray
    quantization: Quantization | None = None

    @property
    def quantized(self) -> bool:
        return self.quantization is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape

    @property
    def dtype(self) -> np.dtype:
        """The dtype the weight's reader sees."""
        return self.quantization.scale.dtype if self.quantization else self.stored.dtype


def weight(tensor: gs.Tensor) -> Weight | None:
    """The weight `tensor` carries, or None when it is computed at run time.

    A plain constant, or a constant behind DequantizeLinear (integers -> DQ, or ModelOpt's float
    -> QuantizeLinear -> DQ) with constant scale and zero point and a layout ONNX and ONNX Runtime
    read alike (per tensor, or one scale per index of `axis`; not blocked).
    """
    if (value := constant_value(tensor)) is not None:
        return Weight(value)
    dequantize = producer_of(tensor, "DequantizeLinear")
    if dequantize is None:
        return None
    source = dequantize.inputs[0]
    quantize = producer_of(source, "QuantizeLinear")
    stored = constant_value(quantize.inputs[0] if quantize is not None else source)
    scale, zero_point = _scale_and_zero_point(dequantize)
    if stored is None or scale is None or zero_point is None or dequantize.attrs.get("block_size", 0):
        return None
    if quantize is not None and not _same_quantization(quantize, dequantize):
        return None
    axis = _quantization_axis(dequantize, stored.shape, scale)
    if axis is False:
        return None
    return Weight(stored, Quantization(dequantize, scale, zero_point, axis, quantize))


def producer_of(tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The node of type `op` (default domain) that writes `tensor`, or None."""
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == op and tensor.inputs[0].domain in DEFAULT_DOMAINS:
        return tensor.inputs[0]
    return None


def per_tensor_problem(node: gs.Node) -> str | None:
    """Why a QuantizeLinear/DequantizeLinear does not quantize its data with one constant scale and zero point."""
    if node.attrs.get("block_size", 0):
        return "quantized in blocks (block_size)"
    parameters = [constant_value(t) for t in node.inputs[1:3] if t.name]
    if any(p is None for p in parameters):
        return "quantized with a runtime scale or zero point"
    if any(p.ndim != 0 for p in parameters):
        return "quantized per axis"
    return None


def _scale_and_zero_point(node: gs.Node) -> tuple[np.ndarray | None, np.ndarray | None]:
    scale = constant_value(node.inputs[1])
    if len(node.inputs) > 2 and node.inputs[2].name:
        return scale, constant_value(node.inputs[2])
    source = node.inputs[0] if node.op == "DequantizeLinear" else None
    dtype = source.dtype if source is not None and source.dtype is not None else np.uint8
    return scale, (None if scale is None else np.zeros(scale.shape, dtype=dtype))


def _same_quantization(quantize: gs.Node, dequantize: gs.Node) -> bool:
    (qs, qz), (ds, dz) = _scale_and_zero_point(quantize), _scale_and_zero_point(dequantize)
    return (
        all(v is not None for v in (qs, qz, ds, dz))
        and np.array_equal(qs, ds) and qz.dtype == dz.dtype and np.array_equal(qz, dz)
        and quantize.attrs.get("axis", 1) == dequantize.attrs.get("axis", 1)
        and not quantize.attrs.get("block_size", 0)
    )


def _quantization_axis(dequantize: gs.Node, shape: tuple[int, ...], scale: np.ndarray) -> int | None | bool:
    """The per-channel axis (None for per-tensor), or False for a layout not accepted."""
    if scale.ndim == 0:
        return None
    axis = dequantize.attrs.get("axis", 1)
    if scale.ndim != 1:
        return False
    # ONNX reads a 1-D scale as per-axis, ONNX Runtime a one-element one as per-tensor: a
    # one-element scale is read as per-tensor, which both agree on where the axis has one index.
    # It is also how ORT's quantize_static writes a per-tensor int32 bias: a [1] scale and no
    # axis, so the default axis 1 lies outside the 1-D bias, where only ORT's reading exists.
    if scale.shape[0] == 1:
        return None
    if not -len(shape) <= axis < len(shape):
        return False
    return axis % len(shape) if scale.shape[0] == shape[axis] else False


def equal_constants(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Whether both tensors are constants of one dtype, shape and value."""
    va, vb = constant_value(a), constant_value(b)
    return va is not None and vb is not None and va.dtype == vb.dtype and np.array_equal(va, vb)


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The shape if every dimension is a known integer, else None."""
    shape = tensor.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs)


def sole_consumer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 else None


def used_in_subgraph(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether a nested graph (If/Loop/Scan body) reads this tensor from the outer scope."""
    return tensor.name in _names_read_in_subgraphs(graph)


def _names_read_in_subgraphs(graph: gs.Graph) -> frozenset[str]:
    """Every tensor name a nested graph reads, collected once per graph.

    Passes call `used_in_subgraph` for many tensors; walking every node's attributes each time
    made them quadratic in graph size. Passes edit top-level nodes only and never add or change
    subgraphs, so the names stay valid for the life of the graph (a removed If/Loop only makes
    the set too large, which declines a rewrite, never allows a wrong one).
    """
    names: frozenset[str] | None = graph.__dict__.get("_graphopt_subgraph_reads")  # not getattr: gs logs each miss
    if names is None:
        names = frozenset(t.name for sub in iter_subgraphs(graph) for node in sub.nodes for t in node.inputs)
        graph._graphopt_subgraph_reads = names
    return names


def iter_subgraphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    for node in graph.nodes:
        for attr in node.attrs.values():
            subs = attr if isinstance(attr, (list, tuple)) else [attr]
            for sub in subs:
                if isinstance(sub, gs.Graph):
                    yield sub
                    yield from iter_subgraphs(sub)


def bypass(graph: gs.Graph, node: gs.Node, keep: gs.Tensor | None = None) -> bool:
    """Remove a single-output node whose output equals `keep` (default: its first input).

    Consumers read `keep` instead. When the output is a graph output, its name must survive:
    the producer of `keep` is made to write the output tensor directly. That is only possible
    when `keep` is computed by a node and read by nobody else outside, so otherwise the node
    stays and this returns False.
    """
    keep = node.inputs[0] if keep is None else keep
    out = node.outputs[0]
    if used_in_subgraph(graph, out):
        return False
    if not is_graph_output(graph, out):
        for consumer in list(out.outputs):
            replace_input(consumer, out, keep)
        node.outputs.clear()
        return True
    movable = (
        len(keep.inputs) == 1
        and not isinstance(keep, gs.Constant)
        and not is_graph_input(graph, keep)
        and not is_graph_output(graph, keep)
        and not used_in_subgraph(graph, keep)
    )
    if not movable:
        return False
    producer = keep.inputs[0]
    for consumer in list(keep.outputs):
        if consumer is not node:
            replace_input(consumer, keep, out)
    for index, tensor in enumerate(producer.outputs):
        if tensor is keep:
            producer.outputs[index] = out
    node.inputs.clear()
    node.outputs.clear()
    return True


def replace_input(consumer: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make `consumer` read `new` wherever it read `old`.

    One index at a time: graphsurgeon's synchronized lists keep tensor.outputs in step on item
    assignment, but fail on slice assignment.
    """
    for index, tensor in enumerate(consumer.inputs):
        if tensor is old:
            consumer.inputs[index] = new


def make_constant(graph: gs.Graph, stem: str, values: np.ndarray) -> gs.Constant:
    """A new initializer holding `values`, under a name unused in the graph.

    Equal initializers need no sharing here: canonicalization (onnxsim) merges them after the pass.
    """
    # np.array, not np.ascontiguousarray: the latter turns a 0-d scalar into shape [1]
    return gs.Constant(unique_name(graph, stem), np.array(values, order="C"))


def make_weight(
    graph: gs.Graph, stem: str, like: Weight, stored: np.ndarray,
    scale: np.ndarray | None = None, zero_point: np.ndarray | None = None, axis: int | None | bool = False,
) -> gs.Tensor:
    """A new weight in the form `like` came in: a plain constant, integers -> DequantizeLinear, or
    a float constant -> QuantizeLinear -> DequantizeLinear, the Q/DQ nodes copying `like`'s
    attributes (`axis` replaced where given: None for per-tensor). Scale and zero point default
    to `like`'s. Returns the tensor a reader takes as its input.
    """
    q = like.quantization
    if q is None:
        return make_constant(graph, stem, stored)
    scale = q.scale if scale is None else scale
    zero_point = q.zero_point if zero_point is None else zero_point
    axis = q.axis if axis is False else axis
    parameters = [make_constant(graph, f"{stem}_scale", scale), make_constant(graph, f"{stem}_zero_point", zero_point)]
    source: gs.Tensor = make_constant(graph, f"{stem}_stored", stored)
    if q.quantize is not None:
        source = _quantization_node(graph, q.quantize, axis, [source, *parameters], zero_point.dtype, stored.shape)
    return _quantization_node(graph, q.dequantize, axis, [source, *parameters], scale.dtype, stored.shape)


def _quantization_node(graph: gs.Graph, like: gs.Node, axis: int | None, inputs: list[gs.Tensor],
                       dtype: np.dtype, shape: tuple[int, ...]) -> gs.Variable:
    """A Q or DQ node with `like`'s attributes (saturate, output_dtype...) and the given axis."""
    output = gs.Variable(unique_name(graph, f"{like.name}_out"), dtype=dtype, shape=list(shape))
    node_attrs = {k: v for k, v in like.attrs.items() if k != "axis"}
    if axis is not None:
        node_attrs["axis"] = axis
    graph.nodes.append(gs.Node(like.op, unique_name(graph, like.name), node_attrs, inputs=inputs, outputs=[output]))
    return output


def in_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """Weights computed in float64, cast to `dtype`; None where a finite value overflows it
    (float16 ends at 65504), so that a fold declines instead of writing Inf."""
    with np.errstate(over="ignore"):  # overflow is what this checks for
        cast = values.astype(dtype)
    return None if np.any(np.isinf(cast) & np.isfinite(values)) else cast


def unique_name(graph: gs.Graph, stem: str) -> str:
    """A tensor or node name unused anywhere in the graph, its subgraphs included.

    The set of taken names is built once per graph and extended here, so passes that create
    thousands of tensors stay linear; passes must take every new name through this function.
    """
    # graph.__dict__, not getattr: graphsurgeon's Graph.__getattr__ logs an error for unknown names
    taken: set[str] | None = graph.__dict__.get("_graphopt_taken_names")
    if taken is None:
        taken = set(graph.tensors()) | {n.name for n in graph.nodes}
        for sub in iter_subgraphs(graph):
            taken |= set(sub.tensors()) | {n.name for n in sub.nodes}
        graph._graphopt_taken_names = taken
    name, i = stem, 1
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


def name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """Give every top-level node a unique name, in place.

    Rollback reports sites by node name and finds them again by name after re-importing the
    graph, so names must exist and be unique. Named nodes keep their names.
    """
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            base = node.name or f"{node.op_type}_{index}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
        seen.add(node.name)


def export_like(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graph, keeping the model-level fields of the model it came from.

    graphsurgeon writes its own producer and may choose another IR version; a rewrite must not
    change what a model says about itself (metadata, doc strings, IR version, functions).
    Intermediate value_info is dropped on purpose: a pass may have changed a tensor's shape, and
    stale shapes would fail strict shape inference. The manager re-infers shapes afterwards.
    """
    _pack_sub_byte_constants(graph)
    model = gs.export_onnx(graph, do_type_check=False)
    del model.graph.value_info[:]
    keep_model_fields(model, template)
    return model


_SUB_BYTE_TYPES = ("int4", "uint4", "float4_e2m1fn")


def _pack_sub_byte_constants(graph: gs.Graph) -> None:
    """Hand graphsurgeon 4-bit constants a pass has read as packed TensorProtos.

    graphsurgeon 0.6 exports a loaded constant as its NumPy bytes, one byte an element, which for
    int4/uint4 is not what ONNX stores (two to a byte): the export raises. onnx's own from_array
    packs them, and graphsurgeon exports a lazily held TensorProto as it is. Constants never read
    are still lazy and need nothing.
    """
    for each in (graph, *iter_subgraphs(graph)):
        for tensor in each.tensors().values():
            if isinstance(tensor, gs.Constant) and not isinstance(tensor._values, LazyValues) \
                    and np.dtype(tensor.dtype).name in _SUB_BYTE_TYPES:
                tensor.values = LazyValues(numpy_helper.from_array(tensor.values, tensor.name))


def keep_model_fields(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Restore what a model says about itself (metadata, docs, IR version, opsets), in place."""
    model.ir_version = template.ir_version
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    model.graph.doc_string = template.graph.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    model.graph.name = template.graph.name
    _keep_opsets(model, template)
    if template.functions and not model.functions:
        model.functions.extend(template.functions)


def declare_like(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Declare `model`'s tensors as `template` does, in place: what a saved model says about itself.

    The graph inputs and outputs get `template`'s declarations exactly (dtype, dims, dim names,
    doc strings): passes keep the interface, but shape inference rewrites the declarations it
    can refine (`[batch, Transposeoutput_dim_1, 85]` becomes `[batch, 16, 85]`). value_info is
    kept only for the tensors `template` declared it for; the shapes the pass manager inferred
    for itself are dropped (see `keep_declared_value_info`).
    """
    keep_declared_interface(model, template)
    keep_declared_value_info(model, template)


def keep_declared_interface(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Give the graph inputs and outputs the declarations `template` has for them, in place."""
    declared = {vi.name: vi for vi in [*template.graph.input, *template.graph.output]}
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name in declared:
            vi.CopyFrom(declared[vi.name])


def keep_declared_value_info(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Keep value_info only for the tensors `template` declares it for, in place.

    Such a tensor keeps `template`'s declaration while it still fits the tensor (same dtype and
    rank, no known dim changed); one a pass reshaped (a padded channel axis) gets its new,
    inferred type instead, so the model never declares a shape it does not compute.
    """
    declared = {vi.name: vi for vi in template.graph.value_info}
    inferred = {vi.name: vi for vi in model.graph.value_info}
    produced = {name for node in model.graph.node for name in node.output}
    kept = []
    for name, declaration in declared.items():
        if name not in produced:
            continue  # a pass removed the tensor
        current = inferred.get(name)
        kept.append(declaration if current is None or _declaration_fits(declaration.type, current.type) else current)
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _declaration_fits(declared: onnx.TypeProto, inferred: onnx.TypeProto) -> bool:
    """Whether a declared tensor type still describes the inferred one (dim names may differ)."""
    a, b = declared.tensor_type, inferred.tensor_type
    if not declared.HasField("tensor_type") or a.elem_type != b.elem_type:
        return declared == inferred
    if not a.HasField("shape") or not b.HasField("shape"):
        return True
    if len(a.shape.dim) != len(b.shape.dim):
        return False
    return all(not (x.HasField("dim_value") and y.HasField("dim_value")) or x.dim_value == y.dim_value
               for x, y in zip(a.shape.dim, b.shape.dim))


def _keep_opsets(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    versions = {op.domain: op.version for op in template.opset_import}
    for op in model.opset_import:
        versions.setdefault(op.domain, op.version)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())


def opset_version(graph: gs.Graph) -> int:
    return int(graph.opset)


def node_names(nodes: Sequence[gs.Node]) -> str:
    return ",".join(n.name for n in nodes)


def live_channels(weight: Weight, axis: int, bias: Weight | None = None) -> int:
    """Channels of `weight` along `axis` up to the last one that computes something.

    pad-channels appends zero channels: zero filters (with zero bias) and zero input weights, a
    quantized weight's zero point being its zero. A FLOP-based decision that counted them as work
    would change on the next run of `all` (merge-convs' FLOP growth, pad-channels' own overhead):
    they are not work. `bias` (for axis 0) keeps a zero filter with a bias alive. A weight with no
    non-zero channel counts all of them.
    """
    stored = weight.stored
    live = np.any(_reads_nonzero(weight), axis=tuple(a for a in range(stored.ndim) if a != axis))
    if bias is not None:
        live = live | _reads_nonzero(bias).reshape(-1)
    read = np.flatnonzero(live)
    return int(read[-1]) + 1 if read.size else stored.shape[axis]


def _reads_nonzero(value: Weight) -> np.ndarray:
    """Where a weight's reader sees something other than 0: stored values off their zero point."""
    stored, quantization = value.stored, value.quantization
    if quantization is None or quantization.quantize is not None:  # a float zero quantizes to the zero point
        return stored != 0
    # float64 holds every int8..int32 and float8 value exactly (int64 would truncate float8's 0.5)
    zero_point = quantization.zero_point.astype(np.float64)
    if quantization.axis is not None:
        zero_point = zero_point.reshape([-1 if a == quantization.axis else 1 for a in range(stored.ndim)])
    return stored.astype(np.float64) != zero_point


def set_split_sizes(graph: gs.Graph, split: gs.Node, sizes: Sequence[int]) -> None:
    """Give a Split explicit sizes: an int64 input from opset 13 on, the `split` attribute before."""
    split.attrs.pop("num_outputs", None)
    if opset_version(graph) < 13:
        split.attrs["split"] = [int(s) for s in sizes]
        return
    tensor = make_constant(graph, f"{split.name}_sizes", np.array(sizes, dtype=np.int64))
    if len(split.inputs) > 1:
        split.inputs[1] = tensor
    else:
        split.inputs.append(tensor)
