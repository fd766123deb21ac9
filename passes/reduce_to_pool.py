"""reduce-to-pool: spatial ReduceMean/ReduceMax as GlobalAveragePool/GlobalMaxPool or pooling.

Matches a default-domain ReduceMean or ReduceMax (and ReduceSum with `sum_as_pool`) on a 3-D to
5-D float32/float16 tensor [N, C, spatial...] whose constant axes (attribute, or input from opset
18; ReduceSum 13) reduce only spatial axes.

Emits: over every spatial axis, GlobalAveragePool/GlobalMaxPool (any size, dynamic included);
over some (`partial`, on by default; static dims), AveragePool/MaxPool with the reduced dims as
kernel; ReduceSum (`sum_as_pool`, off, float32 only) as the average pool times the count. With
keepdims=0 a Squeeze of the reduced axes follows. The last node writes the Reduce's own output,
so a graph output keeps its name, dtype and shape.

Why TensorRT benefits: its ONNX parser imports global pools and ReduceMean as the same reduce
layer, so the global case is a canonical form (fc-to-conv reads a pooled map; ModelOpt quantizes
GlobalAveragePool, not ReduceMean) rather than a speed-up; a partial reduction reaches the
pooling layer. No speed-up is claimed. docs/passes/reduce-to-pool.md has the parser facts, the
window cap and the precision argument.

Declines (counted): axes touching batch or channel (or absent: every axis); non-constant or
out-of-range axes; unknown rank or rank outside 3-5; non-float dtypes (float16 for ReduceSum);
partial reductions over non-static dims or a window of TensorRT's maximum volume or more; an
output read inside a subgraph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graphs import constant_value, make_constant, nodes_with_op, opset_version, unique_name, used_in_subgraph
from graphopt.passbase import GraphPass, PassStats, Site

POOLS = {"ReduceMean": ("GlobalAveragePool", "AveragePool"), "ReduceSum": ("GlobalAveragePool", "AveragePool"),
         "ReduceMax": ("GlobalMaxPool", "MaxPool")}
# Opset from which each op takes `axes` as an input instead of an attribute.
AXES_INPUT_SINCE = {"ReduceMean": 18, "ReduceMax": 18, "ReduceSum": 13}
POOLABLE_DTYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
# TensorRT's MAX_KERNEL_DIMS_PRODUCT: a pooling window must hold fewer elements than this.
MAX_WINDOW_VOLUME = 100_000


@dataclass(frozen=True)
class ReduceToPoolOptions:
    partial: bool = True  # also reductions over some spatial axes -> AveragePool/MaxPool (static dims)
    sum_as_pool: bool = False  # ReduceSum -> average pool x count; float32 only, rounds twice


@dataclass(frozen=True)
class PoolPlan:
    """How one Reduce node becomes a pool: `kernel` None means global; `count` scales a ReduceSum."""

    node: gs.Node
    pool_op: str
    kernel: tuple[int, ...] | None
    count: int | None
    squeeze_axes: tuple[int, ...] | None


class ReduceToPool(GraphPass[ReduceToPoolOptions]):
    name = "reduce-to-pool"
    summary = "Spatial ReduceMean/ReduceMax (opt. ReduceSum) -> GlobalAveragePool/GlobalMaxPool or pooling."
    Options = ReduceToPoolOptions
    order = 30

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        ops = ["ReduceMean", "ReduceMax"] + (["ReduceSum"] if self.options.sum_as_pool else [])
        sites = []
        for node in nodes_with_op(graph, *ops):
            plan = self.plan(graph, node)
            if isinstance(plan, str):
                stats.skip(plan)
            else:
                sites.append(Site(node.name, plan))
        return sites

    def plan(self, graph: gs.Graph, node: gs.Node) -> PoolPlan | str:
        """The rewrite for `node`, or the reason to leave it alone."""
        x = node.inputs[0]
        if used_in_subgraph(graph, node.outputs[0]):
            return "output is read inside a subgraph"
        if (reason := unpoolable_dtype(node)) is not None:
            return reason
        if x.shape is None:
            return "input rank unknown"
        rank = len(x.shape)
        if rank not in (3, 4, 5):
            return f"rank {rank} input (pooling needs [N, C, spatial...] of rank 3-5)"
        axes = reduced_axes(graph, node, rank)
        if isinstance(axes, str):
            return axes
        if axes & {0, 1}:
            return "reduces the batch or channel axis"
        spatial = set(range(2, rank))
        sizes = {a: x.shape[a] for a in axes}
        static = all(isinstance(d, (int, np.integer)) and d > 0 for d in sizes.values())
        global_op, window_op = POOLS[node.op]
        kernel = None
        if axes != spatial:
            if not self.options.partial:
                return "reduces only some spatial axes (partial=false)"
            if not static:
                return "reduces some spatial axes whose dims are not static"
            kernel = tuple(int(sizes[a]) if a in axes else 1 for a in range(2, rank))
            if np.prod(kernel) >= MAX_WINDOW_VOLUME:
                return f"pooling window of {np.prod(kernel)} elements is over TensorRT's limit"
        count = None
        if node.op == "ReduceSum":
            if not static:
                return "ReduceSum over dims that are not static (the count must be known)"
            count = int(np.prod([int(d) for d in sizes.values()]))
        keepdims = node.attrs.get("keepdims", 1)
        squeeze_axes = None if keepdims else tuple(sorted(axes))
        return PoolPlan(node, global_op if kernel is None else window_op, kernel, count, squeeze_axes)

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        plan: PoolPlan = site.payload
        reduce = plan.node
        x, out = reduce.inputs[0], reduce.outputs[0]
        reduce.inputs.clear()
        reduce.outputs.clear()

        def emit(op: str, inputs: list[gs.Tensor], last: bool, **attrs) -> gs.Tensor:
            result = out if last else gs.Variable(unique_name(graph, f"{reduce.name}_{op.lower()}"), dtype=out.dtype)
            graph.nodes.append(gs.Node(op, unique_name(graph, f"{reduce.name}_{op.lower()}"), attrs, inputs, [result]))
            return result

        attrs = {} if plan.kernel is None else {"kernel_shape": list(plan.kernel), "strides": [1] * len(plan.kernel)}
        tensor = emit(plan.pool_op, [x], last=plan.count is None and plan.squeeze_axes is None, **attrs)
        if plan.count is not None:
            count = make_constant(graph, f"{reduce.name}_count", np.array(plan.count, dtype=np.float32))
            tensor = emit("Mul", [tensor, count], last=plan.squeeze_axes is None)
        if plan.squeeze_axes is not None:
            axes = list(plan.squeeze_axes)
            if opset_version(graph) >= 13:
                emit("Squeeze", [tensor, make_constant(graph, f"{reduce.name}_axes", np.array(axes, np.int64))], last=True)
            else:
                emit("Squeeze", [tensor], last=True, axes=axes)
        stats.counters[f"{reduce.op}_to_{plan.pool_op}"] += 1
        stats.details.append({"node": reduce.name, "pool": plan.pool_op, "kernel": plan.kernel,
                              "keepdims": plan.squeeze_axes is None})


def unpoolable_dtype(node: gs.Node) -> str | None:
    dtype = node.inputs[0].dtype
    if dtype is None:
        return "input dtype unknown"
    onnx_dtype = dtype if isinstance(dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if onnx_dtype not in POOLABLE_DTYPES:
        return "not float32/float16 (ONNX pooling has no kernels for other types)"
    if node.op == "ReduceSum" and onnx_dtype != onnx.TensorProto.FLOAT:
        return "ReduceSum as pooling is float32 only"
    return None


def reduced_axes(graph: gs.Graph, node: gs.Node, rank: int) -> set[int] | str:
    """The normalized reduced axes, or why they cannot be known or pooled."""
    if opset_version(graph) < AXES_INPUT_SINCE[node.op]:
        axes = node.attrs.get("axes")
    elif len(node.inputs) > 1 and node.inputs[1].name:
        axes = constant_value(node.inputs[1])
        if axes is None:
            return "axes are not constant"
    else:
        axes = None
    if axes is None or np.size(axes) == 0:
        if node.attrs.get("noop_with_empty_axes", 0):
            return "empty axes with noop_with_empty_axes: a no-op, not a pooling"
        return "no axes: reduces every axis, batch and channel included"
    normalized = {int(a) + rank if int(a) < 0 else int(a) for a in np.ravel(axes)}
    if not all(0 <= a < rank for a in normalized):
        return "axes out of range"
    return normalized
