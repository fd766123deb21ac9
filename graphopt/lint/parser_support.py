"""Parser support: what the ONNX-TensorRT parser will not import, and what the engine will need.

Judged against the parser's own operator list (trt_parser_ops, generated from onnx-tensorrt's
docs/operators.md by scripts/gen_trt_op_table.py, which records the release and commit):

- ops the list marks unsupported, or does not list at all (GO-PARSE-001);
- the documented restrictions that can be decided from the graph (GO-PARSE-002), such as
  axes given as run-time tensors, pooling beyond 3-D, non-zero Q/DQ zero points;
- the first input's data type against the types listed for the op (GO-PARSE-003);
- ops in custom domains, which the parser imports as plugins (GO-PARSE-004);
- an ONNX opset outside the range the parser supports (GO-PARSE-005);
- graph inputs with dynamic dims, which need an optimization profile (GO-PARSE-006).

Nested graphs (If/Loop/Scan bodies) are checked too: the parser imports them op by op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graphs import DEFAULT_DOMAINS, iter_subgraphs
from graphopt.lint import trt_parser_ops
from graphopt.lint.context import LintContext, int_attr, output_names, resolved_constant
from graphopt.lint.findings import Finding, Kind

SOURCE = trt_parser_ops.SOURCE
DYNAMIC_SHAPES = "https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-dynamic-shapes.html"

UNSUPPORTED_OP = Kind(
    "GO-PARSE-001", "unsupported-op", "parser", "error",
    "The ONNX-TensorRT parser has no importer for this op, so it tries to load a plugin of the same "
    "name and fails to parse the model unless one is registered.",
    SOURCE,
)
UNSUPPORTED_USE = Kind(
    "GO-PARSE-002", "unsupported-op-use", "parser", "error",
    "The parser imports this op only within the restrictions its operator list documents, and "
    "rejects the node otherwise.",
    SOURCE,
)
UNSUPPORTED_TYPE = Kind(
    "GO-PARSE-003", "unsupported-type", "parser", "warning",
    "The parser's operator list does not name this data type for the op: it rejects the node, or, "
    "for DOUBLE, casts to FLOAT and clamps.",
    SOURCE,
)
CUSTOM_DOMAIN = Kind(
    "GO-PARSE-004", "custom-domain-op", "parser", "warning",
    "The parser looks ops up by name alone: one it has no importer for becomes a TensorRT plugin "
    "that must be registered wherever the engine is built and run, and one sharing an ONNX op's "
    "name is imported with that op's semantics.",
    SOURCE,
)
OPSET_OUT_OF_RANGE = Kind(
    "GO-PARSE-005", "opset-out-of-range", "parser", "warning",
    f"The parser supports ONNX opsets {trt_parser_ops.MIN_OPSET} to {trt_parser_ops.MAX_OPSET}; ops "
    "whose definition changed outside that range may be rejected or imported with other semantics.",
    SOURCE,
)
DYNAMIC_INPUT = Kind(
    "GO-PARSE-006", "dynamic-input-dims", "parser", "info",
    "TensorRT builds an engine for dynamic dims only with an optimization profile (min/opt/max per "
    "input) and tunes its kernels for the opt shape.",
    DYNAMIC_SHAPES,
)

# onnx data type -> the name the parser's operator list uses
_TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.INT4: "INT4",
}
_RESIZE = {
    "mode": ("nearest", "linear"),
    "coordinate_transformation_mode": ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"),
    "nearest_mode": ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"),
    "keep_aspect_ratio_policy": ("stretch",),
}
_TOPK_LIMIT = 3840


def check(ctx: LintContext, model: onnx.ModelProto) -> list[Finding]:
    functions = {(f.domain, f.name) for f in model.functions}
    graph_outputs = {t.name for g in [ctx.graph, *iter_subgraphs(ctx.graph)] for t in g.outputs}
    findings = []
    for node in _all_nodes(ctx.graph):
        if (node.domain or "", node.op) in functions:
            continue  # the parser imports model-local functions by inlining them
        if node.domain not in DEFAULT_DOMAINS:
            findings.append(CUSTOM_DOMAIN.at([node.name], f"{node.op} {node.name!r} is in domain {node.domain!r}", subject=output_names(node)))
            continue
        support = trt_parser_ops.OPERATORS.get(node.op)
        if support is None or not support.supported:
            listed = "is marked unsupported" if support else "is not"
            findings.append(UNSUPPORTED_OP.at([node.name], f"{node.op} {node.name!r}: the op {listed} in the parser's operator list",
                                              subject=output_names(node)))
            continue
        findings += [UNSUPPORTED_USE.at([node.name], f"{node.op} {node.name!r} {reason}", subject=output_names(node))
                     for reason in _restrictions_broken(node, graph_outputs)]
        if (type_name := _first_input_type(node)) is not None and support.types and type_name not in support.types:
            detail = f"{node.op} {node.name!r} takes {type_name}; the parser lists {', '.join(support.types)}"
            findings.append(UNSUPPORTED_TYPE.at([node.name], detail, subject=output_names(node)))
    findings += _opset(model)
    findings += _dynamic_inputs(ctx.graph)
    return findings


def _all_nodes(graph: gs.Graph) -> Iterator[gs.Node]:
    yield from graph.nodes
    for sub in iter_subgraphs(graph):
        yield from sub.nodes


def _first_input_type(node: gs.Node) -> str | None:
    if not node.inputs or not node.inputs[0].name or node.inputs[0].dtype is None:
        return None
    dtype = node.inputs[0].dtype
    try:
        code = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError):
        code = dtype if isinstance(dtype, int) else None
    return _TYPE_NAMES.get(code)


def _opset(model: onnx.ModelProto) -> list[Finding]:
    versions = [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")]
    low, high = trt_parser_ops.MIN_OPSET, trt_parser_ops.MAX_OPSET
    return [OPSET_OUT_OF_RANGE.at([], f"the model imports ONNX opset {v}, outside {low}-{high}", subject=(f"opset {v}",))
            for v in versions if not low <= v <= high]


def _dynamic_inputs(graph: gs.Graph) -> list[Finding]:
    findings = []
    for tensor in graph.inputs:
        shape = tensor.shape
        if shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            continue
        dims = "unknown rank" if shape is None else "x".join(str(d) if isinstance(d, (int, np.integer)) and d >= 0 else str(d or "?") for d in shape)
        detail = f"graph input {tensor.name!r} has dynamic dims ({dims})"
        findings.append(DYNAMIC_INPUT.at([n.name for n in tensor.outputs], detail, subject=(tensor.name,)))
    return findings


# -- documented restrictions that can be decided from the graph ----------------------------------

Restriction = Callable[[gs.Node], "str | None"]


def _restrictions_broken(node: gs.Node, graph_outputs: set[str]) -> list[str]:
    reasons = [reason for check_restriction in RESTRICTIONS.get(node.op, ()) if (reason := check_restriction(node)) is not None]
    supported = OUTPUTS_SUPPORTED.get(node.op)
    if supported is not None:
        used = [t.name for t in node.outputs[supported:] if t.name and (t.outputs or t.name in graph_outputs)]
        if used:
            reasons.append(f"uses output(s) {', '.join(used)}, which the parser does not produce")
    return reasons


def _input_must_be_constant(index: int, what: str) -> Restriction:
    def check_input(node: gs.Node) -> str | None:
        if len(node.inputs) > index and node.inputs[index].name and resolved_constant(node.inputs[index]) is None:
            return f"takes `{what}` as a run-time tensor; the parser needs an initializer"
        return None

    return check_input


def _pooling_2d_or_3d(node: gs.Node) -> str | None:
    shape = node.inputs[0].shape
    if shape is not None and len(shape) not in (4, 5):
        return f"pools a {len(shape)}-D tensor; the parser supports 2-D and 3-D pooling only"
    return None


def _dilations_one(node: gs.Node) -> str | None:
    dilations = node.attrs.get("dilations")
    if dilations is not None and any(int(d) != 1 for d in dilations):
        return f"has dilations {list(dilations)}; the parser needs them empty or all ones"
    return None


def _zero_point_zero(index: int) -> Restriction:
    def check_zero_point(node: gs.Node) -> str | None:
        if len(node.inputs) <= index or not node.inputs[index].name:
            return None
        value = resolved_constant(node.inputs[index])
        if value is None:
            return "has a zero point computed at run time; the parser needs it to be zero"
        if np.any(value != 0):
            return "has a non-zero zero point; the parser needs it to be zero"
        return None

    return check_zero_point


def _topk_supported(node: gs.Node) -> str | None:
    if int_attr(node, "sorted", 1) != 1:
        return "has sorted=0; the parser needs sorted=1"
    k = resolved_constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if k is not None and k.size == 1 and int(k.ravel()[0]) >= _TOPK_LIMIT:
        return f"has K={int(k.ravel()[0])}; the parser needs K < {_TOPK_LIMIT}"
    return None


def _resize_supported(node: gs.Node) -> str | None:
    for attr, allowed in _RESIZE.items():
        value = node.attrs.get(attr)
        value = value.decode() if isinstance(value, bytes) else value
        if value is not None and value not in allowed:
            return f"has {attr}={value}; the parser supports {', '.join(allowed)}"
    if int_attr(node, "antialias", 0):
        return "uses antialias=1, which the parser does not support"
    return None


def _no_scatter_reduction(node: gs.Node) -> str | None:
    reduction = node.attrs.get("reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    return None if reduction == "none" else f"has reduction={reduction}, which the parser does not support"


def _grid_sample_4d(node: gs.Node) -> str | None:
    shape = node.inputs[0].shape
    return None if shape is None or len(shape) == 4 else f"samples a {len(shape)}-D input; the parser needs 4-D"


def _lstm_defaults(node: gs.Node) -> str | None:
    for attr in ("input_forget", "layout"):
        if int_attr(node, attr, 0) != 0:
            return f"has {attr}={int_attr(node, attr, 0)}; the parser needs 0"
    return None


def _constant_is_dense(node: gs.Node) -> str | None:
    for attr in ("sparse_value", "value_string", "value_strings"):
        if attr in node.attrs:
            return f"uses the `{attr}` attribute, which the parser does not support"
    return None


_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare")
RESTRICTIONS: dict[str, tuple[Restriction, ...]] = {
    "AveragePool": (_pooling_2d_or_3d, _dilations_one),
    "MaxPool": (_pooling_2d_or_3d, _dilations_one),
    "LpPool": (_dilations_one,),
    "Slice": (_input_must_be_constant(3, "axes"),),
    "Squeeze": (_input_must_be_constant(1, "axes"),),
    "Unsqueeze": (_input_must_be_constant(1, "axes"),),
    "Pad": (_input_must_be_constant(3, "axes"),),
    "CumSum": (_input_must_be_constant(1, "axis"),),
    "OneHot": (_input_must_be_constant(1, "depth"),),
    "TopK": (_topk_supported,),
    "QuantizeLinear": (_zero_point_zero(2),),
    "DequantizeLinear": (_zero_point_zero(2),),
    "Resize": (_resize_supported,),
    "ScatterND": (_no_scatter_reduction,),
    "GridSample": (_grid_sample_4d,),
    "LSTM": (_lstm_defaults,),
    "Constant": (_constant_is_dense,),
    **{op: (_input_must_be_constant(1, "axes"),) for op in _REDUCE_OPS},
}
# Ops whose later outputs the parser does not produce: MaxPool's Indices, LayerNormalization's Mean/InvStdDev.
OUTPUTS_SUPPORTED = {"MaxPool": 1, "LayerNormalization": 1}
