"""remove-identity-scale: remove nodes that provably compute the identity.

Matches top-level default-domain nodes (the provers below refer to these numbers):
  1. Identity; Dropout in inference (training_mode absent or constant false), mask unused.
  2. Mul/Div by a constant of ones, Add/Sub of a constant of zeros (Div and Sub: right operand
     only), of the input's dtype, that does not grow the input by broadcasting.
  3. BatchNormalization in inference whose mean and bias are 0 and whose scale/sqrt(var + eps)
     is exactly 1 in float32 and in float64 (the default BN, var 1 and eps 1e-5, is not).
  4. Pad with all pads 0, any mode.
  5. Reshape to the input's own shape (0, the static dim, or one -1 among static dims); Expand
     to a shape that broadcasts to the input's own shape.
  6. Transpose by the identity permutation; Cast to the input's own dtype.
  7. Slice that keeps every element (step 1, start 0, end >= the dim or INT64_MAX).

Emits nothing: readers read the removed node's input; a graph output keeps its name (the
producer of the input writes it, `graphs.bypass`).

Why TensorRT benefits: the ONNX parser makes a layer of each (IIdentityLayer, an elementwise
layer over a constant, ICastLayer, IScaleLayer), and the builder's fusions match adjacent layers
(Conv + activation), so a do-nothing layer between them stands in the way. Canonicalization
(onnxsim) removes most of these too; this pass is what removes them where onnxsim cannot run
(custom-domain ops, models over 2 GB), and what it alone removes (inference Dropout, full-range
Slice). docs/passes/remove-identity-scale.md has the IEEE argument for each case.

Declines (counted): a constant that is not exactly the identity element or would broadcast the
input; unknown rank, shape or dtype where the proof needs it; non-constant pads, shapes, axes or
training_mode; a used Dropout mask; an output read inside a subgraph; a graph output that cannot
keep its name (its value is a graph input, an initializer or another graph output, or another
removed node's graph output already claims the producer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graphs import (
    bypass,
    constant_value,
    is_graph_input,
    is_graph_output,
    nodes_with_op,
    opset_version,
    used_in_subgraph,
)
from graphopt.passbase import GraphPass, NoOptions, PassStats, Site

INT64_MAX = np.iinfo(np.int64).max

# The identity element of each elementwise op, and whether the constant may be the left operand.
ELEMENTWISE = {"Mul": (1, True), "Add": (0, True), "Div": (1, False), "Sub": (0, False)}


@dataclass(frozen=True)
class Passthrough:
    """Proof that `node` outputs its input number `keep` unchanged."""

    node: gs.Node
    keep: int

    @property
    def source(self) -> gs.Tensor:
        return self.node.inputs[self.keep]


class RemoveIdentityScale(GraphPass[NoOptions]):
    name = "remove-identity-scale"
    summary = "Remove nodes that compute the identity (x*1, x+0, Identity, no-op Pad/Reshape/Transpose/...)."
    Options = NoOptions
    order = 20

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        proofs: list[Passthrough] = []
        for node in nodes_with_op(graph, *PROVERS):
            proof = PROVERS[node.op](graph, node)
            if isinstance(proof, str):
                stats.skip(proof)
            elif (reason := output_read_in_subgraph(graph, node)) is not None:
                stats.skip(reason)
            else:
                proofs.append(proof)
        by_output = {id(p.node.outputs[0]): p for p in proofs}
        claimed: set[int] = set()
        sites = []
        for proof in proofs:
            if (reason := graph_output_cannot_keep_its_name(graph, proof, by_output, claimed)) is not None:
                stats.skip(reason)
                continue
            sites.append(Site(proof.node.name, proof))
        return sites

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        proof: Passthrough = site.payload
        if not bypass(graph, proof.node, keep=proof.source):
            # find_sites proved the bypass possible for any subset of sites; reaching here is a bug,
            # and raising lets the manager roll this site back.
            raise RuntimeError(f"cannot bypass {proof.node.op} {proof.node.name}")
        stats.counters[f"removed_{proof.node.op}"] += 1


# -- checks common to every op ---------------------------------------------------------------------


def output_read_in_subgraph(graph: gs.Graph, node: gs.Node) -> str | None:
    return "output is read inside a subgraph" if used_in_subgraph(graph, node.outputs[0]) else None


def graph_output_cannot_keep_its_name(
    graph: gs.Graph, proof: Passthrough, by_output: dict[int, Passthrough], claimed: set[int]
) -> str | None:
    """For a node writing a graph output: can the upstream producer take the output's name?

    `bypass` renames the producer's output, so that tensor must be a plain intermediate. The
    manager may remove any subset of the sites, in any order, so every tensor on the chain of
    removable nodes above must qualify too (any of them may end up being the one renamed), and
    two graph outputs must not claim the same chain.
    """
    if not is_graph_output(graph, proof.node.outputs[0]):
        return None
    chain = []
    tensor = proof.source
    while True:
        if (reason := cannot_be_renamed(graph, tensor)) is not None:
            return reason
        chain.append(id(tensor))
        upstream = by_output.get(id(tensor))
        if upstream is None:
            break
        tensor = upstream.source
    if claimed.intersection(chain):
        return "graph output: another removed node's graph output already takes the same producer"
    claimed.update(chain)
    return None


def cannot_be_renamed(graph: gs.Graph, tensor: gs.Tensor) -> str | None:
    if isinstance(tensor, gs.Constant) or not tensor.inputs:
        return "graph output would lose its name: its value is a graph input or a constant"
    if is_graph_input(graph, tensor):
        return "graph output would lose its name: its value is a graph input or a constant"
    if is_graph_output(graph, tensor):
        return "graph output would lose its name: its value is another graph output"
    if used_in_subgraph(graph, tensor):
        return "graph output would lose its name: its value is read inside a subgraph"
    return None


# -- one prover per op: a Passthrough, or the reason the node is not provably the identity --------

Proof = Passthrough | str


def prove_identity(graph: gs.Graph, node: gs.Node) -> Proof:  # case 1
    return Passthrough(node, 0)


def prove_dropout(graph: gs.Graph, node: gs.Node) -> Proof:  # case 1
    if len(node.outputs) > 1 and (node.outputs[1].outputs or is_graph_output(graph, node.outputs[1])):
        return "Dropout mask output is used"
    if opset_version(graph) < 7 and node.attrs.get("is_test", 0) != 1:
        return "Dropout is in training mode (is_test is not 1)"
    if len(node.inputs) > 2 and node.inputs[2].name:
        mode = constant_value(node.inputs[2])
        if mode is None:
            return "Dropout training_mode is not a constant"
        if np.any(mode):
            return "Dropout is in training mode"
    return Passthrough(node, 0)


def prove_elementwise(graph: gs.Graph, node: gs.Node) -> Proof:  # case 2
    neutral, commutative = ELEMENTWISE[node.op]
    sides = [(0, 1), (1, 0)] if commutative else [(0, 1)]
    reason = f"{node.op} has no constant operand" if commutative else f"{node.op} has no constant right operand"
    for keep, other in sides:
        value = constant_value(node.inputs[other])
        if value is None:
            continue
        if not np.all(value == neutral):
            reason = f"{node.op} constant is not all {neutral}s"
            continue
        reason = dtype_differs(node.inputs[keep], value) or grows_by_broadcast(node.inputs[keep], value.shape)
        if reason is None:
            return Passthrough(node, keep)
    return reason


def prove_batchnorm(graph: gs.Graph, node: gs.Node) -> Proof:  # case 3
    training = node.attrs.get("training_mode", 0) or (opset_version(graph) < 7 and node.attrs.get("is_test", 0) != 1)
    if len(node.outputs) > 1 or training:
        return "BatchNormalization is in training mode"
    params = [constant_value(t) for t in node.inputs[1:5]]
    if any(p is None for p in params):
        return "BatchNormalization parameters are not constant"
    if tensor_dtype(node.inputs[0]) != onnx.TensorProto.FLOAT or any(p.dtype != np.float32 for p in params):
        return "BatchNormalization is not float32"
    scale, bias, mean, var = params
    eps = np.float32(node.attrs.get("epsilon", 1e-5))
    if np.any(mean != 0) or np.any(bias != 0):
        return "BatchNormalization mean or bias is not 0"
    folded_fp32 = scale / np.sqrt(var + eps)  # float32 throughout, as onnx-tensorrt folds it
    exact = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + np.float64(eps))
    if np.any(folded_fp32 != 1) or np.any(exact.astype(np.float32) != 1):
        return "BatchNormalization scale/sqrt(var+eps) is not exactly 1"
    return Passthrough(node, 0)


def prove_pad(graph: gs.Graph, node: gs.Node) -> Proof:  # case 4
    if opset_version(graph) < 11:
        pads = node.attrs.get("pads", node.attrs.get("paddings"))
    else:
        pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
    if pads is None:
        return "Pad pads are not constant"
    return Passthrough(node, 0) if not np.any(np.asarray(pads)) else "Pad has nonzero pads"


def prove_reshape(graph: gs.Graph, node: gs.Node) -> Proof:  # case 5
    target = constant_value(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("shape")
    if target is None:
        return "Reshape shape is not constant"
    dims = input_dims(node.inputs[0])
    if dims is None:
        return "input rank unknown"
    target = [int(t) for t in np.asarray(target).reshape(-1)]
    if len(target) != len(dims):
        return "Reshape changes the rank"
    copy_zero = not node.attrs.get("allowzero", 0)
    inferred = [i for i, t in enumerate(target) if t == -1]
    for t, d in zip(target, dims):
        same = (t == 0 and copy_zero) or (isinstance(d, int) and t == d) or t == -1
        if not same:
            return "Reshape target is not provably the input's shape"
    if len(inferred) > 1:
        return "Reshape target is not provably the input's shape"
    if inferred and not all(isinstance(d, int) and d > 0 for i, d in enumerate(dims) if i != inferred[0]):
        return "Reshape -1 is not provably the input's dim"
    return Passthrough(node, 0)


def prove_expand(graph: gs.Graph, node: gs.Node) -> Proof:  # case 5
    shape = constant_value(node.inputs[1])
    if shape is None:
        return "Expand shape is not constant"
    return grows_by_broadcast(node.inputs[0], tuple(int(s) for s in np.asarray(shape).reshape(-1))) or Passthrough(node, 0)


def prove_transpose(graph: gs.Graph, node: gs.Node) -> Proof:  # case 6
    dims = input_dims(node.inputs[0])
    if dims is None:
        return "input rank unknown"
    perm = node.attrs.get("perm", list(reversed(range(len(dims)))))
    return Passthrough(node, 0) if list(perm) == list(range(len(dims))) else "Transpose permutation is not the identity"


def prove_cast(graph: gs.Graph, node: gs.Node) -> Proof:  # case 6
    source = tensor_dtype(node.inputs[0])
    if source is None:
        return "input dtype unknown"
    return Passthrough(node, 0) if source == node.attrs["to"] else "Cast changes the dtype"


def prove_slice(graph: gs.Graph, node: gs.Node) -> Proof:  # case 7
    dims = input_dims(node.inputs[0])
    if dims is None:
        return "input rank unknown"
    ranges = slice_ranges(graph, node)
    if ranges is None:
        return "Slice starts/ends/axes/steps are not constant"
    starts, ends, axes, steps = ranges
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if not -len(dims) <= axis < len(dims):
            return "Slice axis out of range"
        dim = dims[axis]
        static = isinstance(dim, int)
        if step != 1:
            return "Slice step is not 1"
        if not (start == 0 or (static and start <= -dim)):
            return "Slice does not start at 0"
        if not (end >= INT64_MAX or (static and end >= dim)):
            return "Slice does not end at the dim (INT64_MAX for a dim not known statically)"
    return Passthrough(node, 0)


PROVERS: dict[str, Callable[[gs.Graph, gs.Node], Proof]] = {
    "Identity": prove_identity,
    "Dropout": prove_dropout,
    "Mul": prove_elementwise,
    "Div": prove_elementwise,
    "Add": prove_elementwise,
    "Sub": prove_elementwise,
    "BatchNormalization": prove_batchnorm,
    "Pad": prove_pad,
    "Reshape": prove_reshape,
    "Expand": prove_expand,
    "Transpose": prove_transpose,
    "Cast": prove_cast,
    "Slice": prove_slice,
}


# -- small facts the provers share -----------------------------------------------------------------


def tensor_dtype(tensor: gs.Tensor) -> int | None:
    """The ONNX element type; graphsurgeon keeps the ONNX enum for types numpy lacks (bfloat16)."""
    dtype = tensor.values.dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def input_dims(tensor: gs.Tensor) -> list[int | None] | None:
    """Each dim's static size, None for a dim not known statically; None when the rank is unknown."""
    shape = tensor.values.shape if isinstance(tensor, gs.Constant) else tensor.shape
    if shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]


def dtype_differs(tensor: gs.Tensor, value: np.ndarray) -> str | None:
    dtype = tensor_dtype(tensor)
    if dtype is None:
        return "input dtype unknown"
    return None if dtype == onnx.helper.np_dtype_to_tensor_dtype(value.dtype) else "constant dtype differs from the input's"


def grows_by_broadcast(tensor: gs.Tensor, shape: tuple[int, ...]) -> str | None:
    """Whether broadcasting `tensor` with `shape` may give anything but `tensor`'s own shape."""
    if len(shape) == 0:
        return None  # a scalar broadcasts to any shape without changing it
    dims = input_dims(tensor)
    if dims is None:
        return "input rank unknown"
    if len(shape) > len(dims):
        return "constant would broadcast the input to a higher rank"
    for size, dim in zip(reversed(shape), reversed(dims)):
        if size != 1 and size != dim:
            return "constant would broadcast the input to a larger shape (or the input dim is not static)"
    return None


def slice_ranges(graph: gs.Graph, node: gs.Node) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """Slice's (starts, ends, axes, steps), defaults filled in; None if any is not constant."""
    if opset_version(graph) < 10:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes"), None
    else:
        present = [t if t.name else None for t in node.inputs[1:]] + [None] * (5 - len(node.inputs))
        values = [constant_value(t) if t is not None else None for t in present]
        if any(t is not None and v is None for t, v in zip(present, values)):
            return None
        starts, ends, axes, steps = values
    if starts is None or ends is None:
        return None
    starts, ends = [int(s) for s in np.ravel(starts)], [int(e) for e in np.ravel(ends)]
    axes = list(range(len(starts))) if axes is None else [int(a) for a in np.ravel(axes)]
    steps = [1] * len(starts) if steps is None else [int(s) for s in np.ravel(steps)]
    return starts, ends, axes, steps
