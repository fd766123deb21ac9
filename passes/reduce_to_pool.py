"""reduce-to-pool: spatial ReduceMean/ReduceMax as GlobalAveragePool/GlobalMaxPool or pooling.

Matches top-level default-domain ReduceMean and ReduceMax (and ReduceSum with `sum_as_pool`) on a
3-D, 4-D or 5-D float32/float16 tensor [N, C, spatial...] whose axes are constant (the `axes`
attribute, or from opset 18 (ReduceSum: 13) a constant `axes` input; negative axes allowed) and
reduce only spatial axes:
  1. every spatial axis -> GlobalAveragePool / GlobalMaxPool. Works with any batch and spatial
     size, dynamic included.
  2. some spatial axes (`partial`, on by default), e.g. only H of [N, C, H, W] -> AveragePool /
     MaxPool with kernel H on the reduced axes and 1 elsewhere, strides 1, no padding. Needs the
     reduced dims to be static.
  3. ReduceSum (`sum_as_pool`, off by default, float32 only) -> the average pool of 1 or 2,
     times the number of reduced elements (a Mul by a float32 constant); needs static reduced dims.
     With keepdims=1, when only Convs with constant float32 weights read the sum (as their data),
     their weights are scaled by the count instead and no Mul is emitted: onnxsim's
     fuse_preceding_mul_into_conv would fold the Mul into such a Conv the next time `simplify`
     runs (after merge-convs made two such Convs one), so `all` would change its own output.
     Each scaled weight is a new constant; one that would overflow float32 keeps the Mul.
With keepdims=0 a Squeeze of the reduced axes follows, so the batch may stay dynamic. The last
node writes the Reduce's own output tensor, so a graph output keeps its name, dtype and shape.

Shared nodes: a node this pass would add that computes exactly what a node already in the graph
computes (same op, attributes and inputs, constants compared by value; its output may be a graph
output) is not added: the existing node's output is read instead, and when it is the last
node, the Reduce's readers read it. Two ReduceMeans on one map become one pool, and a
ReduceMean(keepdims=1) beside a GlobalAveragePool of the same map reads that pool. onnxsim's
common-subexpression elimination would merge such nodes the next time `simplify` runs (it leaves
the Reduce nodes alone only because they are different ops, or write graph outputs), and
merge-convs, later in `all`, would then find new siblings; shared now, `all` leaves nothing for a
second run. A Reduce whose output is a graph output still gets its own last node, and those
pools are rewritten first, so the others can share them.

Why, and what TensorRT actually does with it. TensorRT's ONNX parser imports GlobalAveragePool
and GlobalMaxPool as an IReduceLayer over every axis but N and C with keepDimensions=true, and
ReduceMean/ReduceMax as an IReduceLayer too; AveragePool and MaxPool become an IPoolingLayer
(addPoolingNd) (onnx-tensorrt, onnxOpImporters.cpp and importerUtils.cpp `globalPoolingHelper`:
https://github.com/onnx/onnx-tensorrt/blob/main/onnxOpImporters.cpp). So:
  - case 1 gives TensorRT the same reduce layer it built from the ReduceMean. Its value is a
    canonical form: one op for global pooling, which graphopt's passes and other ONNX consumers
    match, and which ONNX Runtime runs with a dedicated kernel. With keepdims=0 it costs one
    Squeeze (a shuffle layer in TensorRT) that the ReduceMean did not need, unless a linear
    reads it: fc-to-conv, which runs right after this pass in `all`, then reads the pooled
    [N, C, 1, 1] map itself and the Squeeze goes.
  - case 2 turns a reduce layer into a pooling layer. The builder's fusion rules are matched per
    layer type (Layer Fusion Catalog:
    https://docs.nvidia.com/deeplearning/tensorrt/latest/performance/fusion-catalog.html); this
    pass does not claim a speed-up for it, and the equivalence check only proves it correct.
    TensorRT caps a pooling window's volume (MAX_KERNEL_DIMS_PRODUCT; windows of 317x317 and up
    fail to build: https://github.com/NVIDIA/TensorRT/issues/2094,
    https://github.com/onnx/onnx-tensorrt/issues/937), so windows of 100000 elements or more are
    declined. The global form has no such cap, since it is imported as a reduction
    (https://github.com/onnx/onnx-tensorrt/issues/333 is the failure the old pooling import had).
The same ONNX rewrite is in tf2onnx's optimizer (https://github.com/onnx/tensorflow-onnx/pull/1465).

Precision: average pooling divides by the window size like ReduceMean; only the summation order
may differ (a few ulp). ReduceSum as average x count rounds twice (sum/n, then x n): up to about
2 ulp relative, and for fp32 sums of integers it may no longer be exact, which is why
`sum_as_pool` is off and float32-only. ReduceMax vs MaxPool may differ on NaN inputs in some
runtimes (ONNX leaves NaN propagation of MaxPool unspecified); outputs agree on finite inputs.

Declines (counted by reason): axes touching the batch or channel axis, including absent/empty
axes (which mean all axes, or a no-op with noop_with_empty_axes=1); non-constant axes; unknown
or unsupported rank (not 3-5); non-float dtypes (ONNX pooling has no integer kernels) and
float16 for ReduceSum; partial reductions over non-static dims or with too large a window; an
output read inside a subgraph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graphs import (
    DEFAULT_DOMAINS,
    constant_value,
    equal_constants,
    is_graph_output,
    make_constant,
    nodes_with_op,
    opset_version,
    replace_input,
    unique_name,
    used_in_subgraph,
)
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
    # Convs that read the sum as their data, each with its weight times `count` (instead of a Mul).
    scaled_convs: tuple[tuple[gs.Node, np.ndarray], ...] = ()


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
        # Pools that write a graph output themselves first: such a pool must be its own node, and
        # the others can then share it (a keepdims=0 mean beside a keepdims=1 output mean).
        sites.sort(key=lambda site: site.payload.squeeze_axes is not None or not is_graph_output(graph, site.payload.node.outputs[0]))
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
        scaled_convs = ()
        if count is not None and squeeze_axes is None:
            scaled_convs = convs_that_can_take_the_count(graph, node.outputs[0], count)
        return PoolPlan(node, global_op if kernel is None else window_op, kernel, count, squeeze_axes, scaled_convs)

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        plan: PoolPlan = site.payload
        reduce = plan.node
        x, out = reduce.inputs[0], reduce.outputs[0]
        reduce.inputs.clear()
        reduce.outputs.clear()

        def step(op: str, inputs: list[gs.Tensor], last: bool, **attrs) -> gs.Tensor:
            shared = same_computation(graph, op, inputs, attrs)
            if shared is not None and not (last and is_graph_output(graph, out)):
                for reader in list(out.outputs) if last else []:
                    replace_input(reader, out, shared)
                stats.counters["nodes_shared"] += 1
                return shared
            result = out if last else gs.Variable(unique_name(graph, f"{reduce.name}_{op.lower()}"), dtype=out.dtype)
            graph.nodes.append(gs.Node(op, unique_name(graph, f"{reduce.name}_{op.lower()}"), attrs, inputs, [result]))
            if shared is not None and not is_graph_output(graph, shared):
                # The other way round: this pool writes a graph output, so the equal node already
                # there gives way, and its readers read this one.
                for reader in list(shared.outputs):
                    replace_input(reader, shared, result)
                stats.counters["nodes_shared"] += 1
            return result

        attrs = {} if plan.kernel is None else {"kernel_shape": list(plan.kernel), "strides": [1] * len(plan.kernel)}
        scale_weights = bool(plan.scaled_convs)
        tensor = step(plan.pool_op, [x], last=(plan.count is None or scale_weights) and plan.squeeze_axes is None, **attrs)
        for conv, weight in plan.scaled_convs:
            conv.inputs[1] = make_constant(graph, f"{conv.name}_weight_times_{plan.count}", weight)
            stats.counters["conv_weights_scaled"] += 1
        if plan.count is not None and not scale_weights:
            count = make_constant(graph, f"{reduce.name}_count", np.array(plan.count, dtype=np.float32))
            tensor = step("Mul", [tensor, count], last=plan.squeeze_axes is None)
        if plan.squeeze_axes is not None:
            axes = list(plan.squeeze_axes)
            if opset_version(graph) >= 13:
                step("Squeeze", [tensor, make_constant(graph, f"{reduce.name}_axes", np.array(axes, np.int64))], last=True)
            else:
                step("Squeeze", [tensor], last=True, axes=axes)
        stats.counters[f"{reduce.op}_to_{plan.pool_op}"] += 1
        stats.details.append({"node": reduce.name, "pool": plan.pool_op, "kernel": plan.kernel,
                              "keepdims": plan.squeeze_axes is None})


def convs_that_can_take_the_count(graph: gs.Graph, total: gs.Tensor, count: int) -> tuple[tuple[gs.Node, np.ndarray], ...]:
    """The Convs that read the ReduceSum's output `total`, each with its weight times the count,
    when nothing else reads it and every such weight stays finite.

    Conv(pool * n, W, B) = Conv(pool, n W, B), zero padding included. A Mul left between the pool
    and a Conv with a constant weight, its only reader, is what onnxsim's
    fuse_preceding_mul_into_conv folds the next time `simplify` runs; with two Convs, merge-convs
    would merge them first. So every reader must be a default-domain Conv reading `total` as its
    data only, with a constant float32 weight that stays finite times n; else none are scaled.
    """
    readers = list(total.outputs)
    if not readers or is_graph_output(graph, total) or used_in_subgraph(graph, total):
        return ()
    scaled = []
    for conv in readers:
        if conv.op != "Conv" or conv.domain not in DEFAULT_DOMAINS or len(conv.inputs) < 2:
            return ()
        if conv.inputs[0] is not total or any(t is total for t in conv.inputs[1:]):
            return ()
        weight = constant_value(conv.inputs[1])
        if weight is None or weight.dtype != np.float32:
            return ()
        with np.errstate(over="ignore"):  # overflow is what the check below looks for
            times_count = (weight.astype(np.float64) * count).astype(np.float32)
        if not np.all(np.isfinite(times_count)):
            return ()
        scaled.append((conv, times_count))
    return tuple(scaled)


def same_computation(graph: gs.Graph, op: str, inputs: list[gs.Tensor], attrs: dict) -> gs.Tensor | None:
    """The output of a node that already computes `op` on these inputs (see "Shared nodes")."""
    for reader in inputs[0].outputs:
        if (
            reader.op == op
            and reader.domain in DEFAULT_DOMAINS
            and dict(reader.attrs) == attrs
            and len(reader.inputs) == len(inputs)
            and all(a is b or equal_constants(a, b) for a, b in zip(reader.inputs, inputs))
            and len(reader.outputs) == 1
            and not used_in_subgraph(graph, reader.outputs[0])
        ):
            return reader.outputs[0]
    return None


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
