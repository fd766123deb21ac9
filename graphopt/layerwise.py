"""Layer-wise verification of quantized graphs: each region between quantizers judged on the reference's own integers.

Why graph outputs alone cannot judge a Q/DQ graph: a rewrite that is exact in real arithmetic
still reorders float operations; a value on a rounding boundary then quantizes one step apart,
and every later quantized layer amplifies that flip. On a random-weight int8 MixNet an exact
rewrite moved the outputs by up to 14%, as much as moving the input by one float step does
(17-38%). A tolerance loose enough to pass the first passes wrong rewrites too; a tight one
fails exact rewrites.

So the quantizers both graphs share cut them into regions, and each region is judged alone, on
exactly the reference's inputs. A *cut point* is an activation QuantizeLinear of the reference
that the candidate keeps: paired by output name, or by a node name unique in both graphs (a pass
that pads or renames a tensor keeps its producer's name), with one element type and rank, equal
constant scale and zero point, and dimensions that agree where both are known (the candidate's
channel axis may be longer: pad-channels). Both graphs run in one *cut form*: each cut point is a
graph input fed the reference's integers (the candidate's own values follow them along a longer
axis), while the quantizer still computes its own integers from its own input, as an output.
The reference runs in that form too, so regions no rewrite touched compute bit for bit alike
(ONNX Runtime rounds float16 differently depending on what is a graph input or output). Then,
per input set:

- each region's output (its quantizer's input) must match the reference's within the model's
  tolerance relative to what the quantizer does not saturate, and never by more than
  STEP_TOLERANCE of the quantizer's step (or ROUNDING_STEPS of its own float type's, where that
  is coarser); values both graphs saturate to the same integer are not compared;
- its integers may differ by at most one step (a value on a rounding boundary); how many differ
  by one step is reported;
- each graph output, now computed from the reference's integers, must match within the tolerance.

Sound because the regions cover the graph: every op of the candidate lies between cut points
(or graph inputs) and a cut point or graph output, and is judged on the reference's own values
there; a pairing is only a claim, checked by the same comparison. A region that computes the same
real function up to float rounding passes; a wrong one (a weight scale or zero point off,
channels swapped, a bias dropped) moves its quantizer's input by more, wherever the input sets
reach it. A quantizer the rewrite removed or re-parameterized is simply not a cut point: its
region extends to the next one, so nothing is left unjudged. Regions are judged without the
fp32-sensitivity allowance: that allowance measures chaos between quantizers, which the cuts
remove.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.modelio import infer_shapes

OWN_SUFFIX = "__graphopt_own"  # the candidate's own integers at a cut point (its input is the reference's)
REFERENCE_SUFFIX = "__graphopt_reference"  # a grown cut point's reference part, fed from outside
# Quantized types ONNX Runtime slices and concatenates (a grown cut point of another type, float8
# or int4, is not a cut: its region extends).
_SLICEABLE = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16}


@dataclass(frozen=True)
class CutPoint:
    """A quantizer both graphs share: its output's and its input's names in each graph."""

    name: str  # the reference's
    candidate_name: str  # the same, or what the rewrite renamed it to (pad-channels: `<name>_padded`)
    reference_input: str
    candidate_input: str
    value_info: onnx.ValueInfoProto  # the reference's quantized tensor type, declared for the injected input
    # The types the cut form marks as outputs: the candidate's quantized tensor and quantizer input
    # (shape inference ran once, in cut_points), and the reference's quantizer input.
    candidate_info: onnx.ValueInfoProto
    candidate_input_info: onnx.ValueInfoProto
    reference_input_info: onnx.ValueInfoProto
    # The one axis along which the candidate's tensor is longer (pad-channels' padded channels):
    # the reference's integers are injected in front, the candidate's own values after them.
    grown_axis: int | None = None
    reference_length: int = 0
    # Trailing dimensions of 1 the candidate's tensor has past the reference's (fc-to-conv carries
    # a linear's [rows, N] output quantizer into 4-D as [rows, N, 1, 1]): injected reshaped.
    unit_dims: int = 0
    scale: np.ndarray | None = None  # the quantizer's (equal in both graphs)
    axis: int | None = None  # of a per-axis scale

    def step(self, shape: tuple[int, ...]) -> np.ndarray:
        """The quantizer's step for each element of a tensor of `shape` (its scale, broadcast)."""
        scale = np.abs(self.scale.astype(np.float64))
        if scale.ndim == 1 and scale.size > 1 and self.axis is not None:
            scale = scale.reshape([-1 if d == self.axis % len(shape) else 1 for d in range(len(shape))])
        return np.broadcast_to(scale.reshape(()) if scale.size == 1 else scale, shape)

    def reference_part(self, candidate_value: np.ndarray) -> np.ndarray:
        """The part of a candidate tensor (the cut point, or its quantizer's input) the reference has."""
        if self.unit_dims:
            return candidate_value.reshape(candidate_value.shape[:candidate_value.ndim - self.unit_dims])
        if self.grown_axis is None:
            return candidate_value
        return np.take(candidate_value, np.arange(self.reference_length), axis=self.grown_axis)


@dataclass(frozen=True)
class StepDifferences:
    """How a cut point's integers differ: elements one step apart, and more than one step apart."""

    one_step: int
    more: int
    max_steps: int
    size: int


# Ops that quantize activations or compute on quantized ones, in any graph of a model: where one
# appears, rounding flips make outputs chaotic (ORT's dynamic quantization, its QOperator form).
QUANTIZING_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                  "MatMulInteger", "QLinearAdd", "QLinearMul", "QGemm", "DynamicQuantizeMatMul", "QAttention"}
QUANTIZATION_DOMAINS = ("", "ai.onnx", "com.microsoft")


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether an activation is quantized anywhere: a QuantizeLinear of a computed tensor (not a
    stored weight) or another quantizing op, in the graph, its subgraphs or its functions."""
    constants = _constants(model.graph)
    nodes = [*_all_nodes(model.graph), *(n for f in model.functions for n in f.node)]
    return any(n.op_type in QUANTIZING_OPS and n.domain in QUANTIZATION_DOMAINS
               and not (n.op_type == "QuantizeLinear" and n.input[0] in constants) for n in nodes)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                nodes.extend(_all_nodes(sub))
    return nodes


def cut_points(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> list[CutPoint]:
    """The activation quantizers `candidate` keeps from `reference` unchanged (name, type, shape, parameters)."""
    ref_graph, cand_graph = infer_shapes(reference).graph, infer_shapes(candidate).graph
    ref_types, cand_types = _value_infos(ref_graph), _value_infos(cand_graph)
    ref_constants, cand_constants = _constants(reference.graph), _constants(candidate.graph)
    cand_by_output = {n.output[0]: n for n in _quantizers(cand_graph)}
    cand_by_node = _unique_names(_quantizers(cand_graph))
    ref_names = _unique_names(_quantizers(ref_graph))
    paired: set[str] = set()  # each candidate quantizer is one cut point at most
    graph_outputs = {o.name for o in [*ref_graph.output, *cand_graph.output]}
    graph_inputs = {i.name for i in cand_graph.input}
    cuts = []
    for ref_node in _quantizers(ref_graph):
        name = ref_node.output[0]
        # Any pairing is sound (each cut point's own value is judged against what is injected
        # for it); output names pair what survived, node names what a rewrite renamed.
        cand_node = cand_by_output.get(name) or (cand_by_node.get(ref_node.name) if ref_node.name in ref_names else None)
        if cand_node is None or ref_node.input[0] in ref_constants or cand_node.output[0] in paired:
            continue
        cand_name = cand_node.output[0]
        if {name, cand_name} & graph_outputs or cand_name in graph_inputs:
            continue
        ref_type, cand_type = ref_types.get(name), cand_types.get(cand_name)
        if ref_type is None or cand_type is None:
            continue  # a type shape inference does not know (a contrib domain's): no input can be declared
        unit_dims = _unit_dims(ref_type.type, cand_type.type)
        grown = _grown_axis(ref_type.type, cand_type.type, unit_dims)
        if grown is False or (grown is not None and (unit_dims or ref_type.type.tensor_type.elem_type not in _SLICEABLE)):
            continue
        if not _same_parameters(ref_node, ref_constants, cand_node, cand_constants):
            continue
        if ref_node.input[0] not in ref_types or cand_node.input[0] not in cand_types:
            continue  # the quantizer's input cannot be marked as an output without its type
        length = 0 if grown is None else ref_type.type.tensor_type.shape.dim[grown].dim_value
        paired.add(cand_name)
        axis = next((a.i for a in ref_node.attribute if a.name == "axis"), 1)
        cuts.append(CutPoint(name, cand_name, ref_node.input[0], cand_node.input[0], ref_type, cand_type,
                             cand_types[cand_node.input[0]], ref_types[ref_node.input[0]], grown, length, unit_dims,
                             ref_constants[ref_node.input[1]], axis))
    return cuts


def reference_cut(cut: CutPoint) -> CutPoint:
    """The cut point as the reference graph has it (to cut the reference in the candidate's form)."""
    return CutPoint(cut.name, cut.name, cut.reference_input, cut.reference_input, cut.value_info, cut.value_info,
                    cut.reference_input_info, cut.reference_input_info)


def reference_probe(model: onnx.ModelProto, cuts: Sequence[CutPoint]) -> onnx.ModelProto:
    """`model` with every cut point as an extra output: the integers both cut graphs are fed."""
    probe = _copy(model)
    _add_outputs(probe, [c.value_info for c in cuts])
    return probe


def candidate_probe(model: onnx.ModelProto, cuts: Sequence[CutPoint]) -> onnx.ModelProto:
    """`model` with each cut point fed from outside (input `<name>`, or `<name>__graphopt_reference`
    in front of the candidate's own extra values where it grew); its own quantizer writes
    `<name>__graphopt_own`, an extra output."""
    probe = _copy(model)
    own_names = {c.candidate_name: c.name + OWN_SUFFIX for c in cuts}
    for node in probe.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in own_names:
            node.output[0] = own_names[node.output[0]]
    for cut in cuts:
        probe.graph.input.append(_renamed(cut.value_info, _injected_name(cut)))
        if cut.grown_axis is not None:
            _append_reference_in_front(probe.graph, cut)
        elif cut.unit_dims:
            _append_reference_reshaped(probe.graph, cut)
    own = [_renamed(c.candidate_info, c.name + OWN_SUFFIX) for c in cuts]
    _add_outputs(probe, [c.candidate_input_info for c in cuts] + own)
    return probe


def injected_feed(cuts: Sequence[CutPoint], reference_values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The candidate probe's extra inputs: each cut point's reference integers."""
    return {_injected_name(c): reference_values[c.name] for c in cuts}


def _injected_name(cut: CutPoint) -> str:
    """The candidate's own tensor name, or (where it must be reshaped or extended) a name of its own."""
    return cut.candidate_name if cut.grown_axis is None and not cut.unit_dims else cut.name + REFERENCE_SUFFIX


def _append_reference_reshaped(graph: onnx.GraphProto, cut: CutPoint) -> None:
    """The candidate's tensor = the reference integers with the candidate's trailing dimensions of 1."""
    rank = len(cut.value_info.type.tensor_type.shape.dim)
    shape = cut.name + "__graphopt_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([0] * rank + [1] * cut.unit_dims, np.int64), shape))
    graph.node.append(onnx.helper.make_node("Reshape", [cut.name + REFERENCE_SUFFIX, shape], [cut.candidate_name]))


def _append_reference_in_front(graph: onnx.GraphProto, cut: CutPoint) -> None:
    """The candidate's tensor = Concat(reference integers, the candidate's own values past them) along the grown axis."""
    own, extra = cut.name + OWN_SUFFIX, cut.name + "__graphopt_extra"
    big = np.iinfo(np.int64).max
    starts, ends, axes = (cut.name + suffix for suffix in ("__graphopt_starts", "__graphopt_ends", "__graphopt_axes"))
    graph.initializer.extend([numpy_helper.from_array(np.array([cut.reference_length], np.int64), starts),
                              numpy_helper.from_array(np.array([big], np.int64), ends),
                              numpy_helper.from_array(np.array([cut.grown_axis], np.int64), axes)])
    graph.node.extend([onnx.helper.make_node("Slice", [own, starts, ends, axes], [extra]),
                       onnx.helper.make_node("Concat", [cut.name + REFERENCE_SUFFIX, extra], [cut.candidate_name], axis=cut.grown_axis)])


# How far a region's output may move, in steps of the quantizer that reads it, or in rounding steps
# of its own float type where those are coarser (a float16 sigmoid near 1 rounds in steps of 1e-3,
# a quarter of its quantizer's step). Exact rewrites of float16 regions moved them by up to 0.19
# quantizer steps on the typed corpus (MixNet, RegNetY), an SE gate near 1 by 3 float16 steps; a wrong
# rewrite worth the name moves more. Under float32 the tolerance relative to the tensor's scale is
# the tighter one, and it holds.
STEP_TOLERANCE = 0.25
ROUNDING_STEPS = 8


@dataclass(frozen=True)
class RegionError:
    """A region's output (its quantizer's input) against the reference's, on one input set."""

    max_abs_err: float
    steps: float  # the worst element's error in steps of its quantizer
    scale: float  # max |reference| over the values the quantizer does not saturate
    passed: bool
    allowed_steps: float  # at the worst element


def region_error(cut: CutPoint, reference: np.ndarray, candidate: np.ndarray, reference_integers: np.ndarray,
                 candidate_integers: np.ndarray, atol: float, rtol: float) -> RegionError:
    """Each value within min(atol + rtol x scale, max(STEP_TOLERANCE quantizer steps, ROUNDING_STEPS
    float steps of its own type)), where `scale` leaves out what the quantizer saturates (an
    outlier it clips hides nothing); values both graphs saturate to the same integer are not
    compared (what the quantizer clips away cannot matter)."""
    if reference.shape != candidate.shape or reference_integers.shape != candidate_integers.shape:
        return RegionError(float("inf"), float("inf"), 0.0, False, STEP_TOLERANCE)
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    ref_saturated = _saturated(reference_integers)
    compared = ~(ref_saturated & (_as_integers(reference_integers) == _as_integers(candidate_integers)))
    same_specials = np.array_equal(np.isnan(ref), np.isnan(cand)) and np.array_equal(np.isinf(ref) * np.sign(ref), np.isinf(cand) * np.sign(cand))
    finite = np.isfinite(ref) & np.isfinite(cand)
    kept = np.abs(ref[finite & ~ref_saturated])
    scale = float(kept.max()) if kept.size else 0.0
    step = cut.step(ref.shape)
    rounding = ROUNDING_STEPS * np.spacing(np.abs(reference)).astype(np.float64) if reference.dtype.kind == "f" else 0.0
    allowed = np.minimum(atol + rtol * scale, np.maximum(STEP_TOLERANCE * step, rounding))
    error = np.where(compared & finite, np.abs(cand - ref), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        in_steps = np.where(step > 0, error / step, np.where(error > 0, np.inf, 0.0))
    worst = np.unravel_index(int(np.argmax(in_steps)), in_steps.shape) if in_steps.size else ()
    passed = same_specials and bool(np.all(error <= allowed))
    if not in_steps.size:
        return RegionError(0.0, 0.0, scale, same_specials, STEP_TOLERANCE)
    return RegionError(float(error.max()), float(in_steps[worst]), scale, passed,
                       float(allowed[worst] / step[worst]) if step[worst] > 0 else 0.0)


def _as_integers(values: np.ndarray) -> np.ndarray:
    """Quantized values as NumPy integers (4-bit types come as ml_dtypes' int4/uint4), or as they are."""
    if values.dtype.name in ("int4", "uint4"):
        return values.astype(np.int16)
    return values


def _saturated(values: np.ndarray) -> np.ndarray:
    """Where a quantizer's output sits at an end of its type's range (float8: no ends are read)."""
    integers = _as_integers(values)
    if integers.dtype.kind not in "iu":
        return np.zeros(values.shape, dtype=bool)
    low, high = (-8, 7) if values.dtype.name == "int4" else (0, 15) if values.dtype.name == "uint4" else \
        (np.iinfo(integers.dtype).min, np.iinfo(integers.dtype).max)
    return (integers == low) | (integers == high)


def step_differences(reference: np.ndarray, candidate: np.ndarray) -> StepDifferences | None:
    """Integer differences of one quantized tensor; None for types without integer steps (float8)."""
    reference, candidate = _as_integers(reference), _as_integers(candidate)
    if reference.dtype.kind not in "iu" or reference.shape != candidate.shape:
        return None
    steps = np.abs(reference.astype(np.int64) - candidate.astype(np.int64))
    return StepDifferences(int(np.count_nonzero(steps == 1)), int(np.count_nonzero(steps > 1)),
                           int(steps.max(initial=0)), int(steps.size))


# -- helpers ---------------------------------------------------------------------------------------


def _quantizers(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "QuantizeLinear" and n.domain in QUANTIZATION_DOMAINS and n.output and n.output[0]
            and len(n.input) > 1]


def _unique_names(nodes: list[onnx.NodeProto]) -> dict[str, onnx.NodeProto]:
    """Node name -> node, for the names only one of `nodes` has."""
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.name] = counts.get(node.name, 0) + 1
    return {n.name: n for n in nodes if n.name and counts[n.name] == 1}


def _constants(graph: onnx.GraphProto) -> Mapping[str, np.ndarray]:
    """Initializers and Constant-node values by name (only what a quantizer's parameters can be)."""
    values = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = attr.t
    return _LazyArrays(values)


class _LazyArrays(dict):
    """Name -> array, converted from TensorProto on first read (a graph's weights are never all read)."""

    def __getitem__(self, name: str) -> np.ndarray:
        value = super().__getitem__(name)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
            super().__setitem__(name, value)
        return value

    def get(self, name: str, default=None):  # noqa: ANN001 (dict's signature)
        return self[name] if name in self else default


def _same_parameters(a: onnx.NodeProto, a_constants: Mapping, b: onnx.NodeProto, b_constants: Mapping) -> bool:
    """Equal constant scale and zero point, and equal attributes (axis, saturate, output_dtype...)."""
    if len(a.input) != len(b.input) or sorted(a.attribute, key=lambda x: x.name) != sorted(b.attribute, key=lambda x: x.name):
        return False
    for a_name, b_name in zip(a.input[1:], b.input[1:]):
        if not a_name and not b_name:
            continue
        a_value, b_value = a_constants.get(a_name), b_constants.get(b_name)
        if a_value is None or b_value is None or a_value.dtype != b_value.dtype or not np.array_equal(a_value, b_value):
            return False
    return True


def _value_infos(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    return {v.name: v for v in [*graph.input, *graph.value_info, *graph.output] if v.type.HasField("tensor_type")}


def _unit_dims(reference: onnx.TypeProto, candidate: onnx.TypeProto) -> int:
    """How many trailing dimensions, each known to be 1, the candidate's type has past the reference's rank."""
    ta, tb = reference.tensor_type, candidate.tensor_type
    if not ta.HasField("shape") or not tb.HasField("shape"):
        return 0
    extra = tb.shape.dim[len(ta.shape.dim):]
    return len(extra) if extra and all(d.HasField("dim_value") and d.dim_value == 1 for d in extra) else 0


def _grown_axis(reference: onnx.TypeProto, candidate: onnx.TypeProto, unit_dims: int = 0) -> int | None | bool:
    """None when both types are one element type and rank (less the candidate's `unit_dims`
    trailing ones) and no dimension known on both sides differs; the axis when only that one is
    longer in the candidate; False otherwise. A dimension unknown or symbolic on either side
    (shape inference names them as it goes) is left to the run: a tensor of another shape there
    fails its comparison."""
    ta, tb = reference.tensor_type, candidate.tensor_type
    if ta.elem_type != tb.elem_type or not ta.HasField("shape") or not tb.HasField("shape") \
            or len(ta.shape.dim) + unit_dims != len(tb.shape.dim):
        return False
    grown = None
    for axis, (da, db) in enumerate(zip(ta.shape.dim, tb.shape.dim)):
        if not (da.HasField("dim_value") and db.HasField("dim_value")):
            continue
        if da.dim_value > db.dim_value:
            return False
        if da.dim_value < db.dim_value:
            if grown is not None:
                return False
            grown = axis
    return grown


def _renamed(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    copy.name = name
    return copy


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    return probe


def _add_outputs(model: onnx.ModelProto, infos: Sequence[onnx.ValueInfoProto]) -> None:
    present = {o.name for o in model.graph.output}
    for info in infos:
        if info.name not in present:
            model.graph.output.append(info)
            present.add(info.name)
