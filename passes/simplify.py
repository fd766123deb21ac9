"""simplify: the canonical form every pass assumes (onnxsim's constant folding and optimizer).

Matches: the whole model. Emits: onnxsim's output, where every tensor computable ahead of time
is an initializer, Conv + BatchNormalization / bias / scale / zero Pad are one Conv, equal
initializers and nodes are merged, and shapes are static where the inputs allow.

The pass manager runs it before the first pass whatever the spec names, and again after every
pass that changed the graph (ARCHITECTURE.md, "The canonical form"); naming it in a spec only
sets its options. Why TensorRT benefits: exporters route weights through Identity/Cast chains
and compute shapes at run time (Shape -> Gather -> Concat -> Reshape); folded, TensorRT and the
passes see constant weights and static shapes.

Declines (with a warning, never a crash) when onnxsim fails on a model: custom-domain ops it
cannot run, an opset it does not support, a model over 2 GB.

Two onnxsim behaviours are undone here (both found by tests/test_fuzz.py):
1. its optimizer can return a model that fails onnx's own checks: it folds a Mul by a
   [1, 1, 1, 1, 1] constant into the Conv before it, giving the Conv a 5-D weight. When the
   optimized model fails the checker (with strict shape inference if the input passes it), the
   pass keeps onnxsim's constant folding without its optimizer, and says so in a warning;
2. it re-infers the graph's inputs and outputs and may rename their symbolic dims (`N` becomes
   `unk__1` once a Reshape to [-1, ...] is folded away). The model's own declared input and
   output types are put back, so its interface does not change.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.graphs import keep_declared_interface
from graphopt.modelio import check_model, is_large, without_initializers
from graphopt.passbase import GraphPass, PassResult, PassStats

WHOLE_MODEL = "(whole model)"


@dataclass(frozen=True)
class SimplifyOptions:
    optimize: bool = True  # also run onnxsim's fusions (e.g. Conv+BatchNormalization)
    # onnxsim's fusions run in onnxoptimizer, whose time grows with the square of the node count
    # (docs/benchmarks.md: 1.8 s at 5k nodes for a pass that changes nothing). Above this many
    # nodes only constant folding and shape inference run, with a warning; 0 means no limit.
    optimize_max_nodes: int = 10_000

    def __post_init__(self) -> None:
        if self.optimize_max_nodes < 0:
            raise ValueError("optimize-max-nodes must be 0 (no limit) or more")


class Simplify(GraphPass[SimplifyOptions]):
    name = "simplify"
    summary = "The canonical form (onnxsim): runs first and after every pass that changed the graph."
    Options = SimplifyOptions
    order = 10

    def apply(self, model: onnx.ModelProto, only: Collection[str] | None = None, *,
              since: onnx.ModelProto | None = None) -> PassResult:
        """`since`: the canonical model a pass rewrote into `model` (see `weights_far_from_changes`)."""
        stats = PassStats()
        if only is not None and WHOLE_MODEL not in only:
            return PassResult(model, [WHOLE_MODEL], [], stats)
        if (reason := self.reason_to_skip(model)) is not None:
            stats.skip(reason)
            stats.warnings.append(f"simplify skipped: {reason}")
            return PassResult(model, [], [], stats)
        optimize = self.options.optimize
        if optimize and 0 < self.options.optimize_max_nodes < len(model.graph.node):
            optimize = False
            stats.counters["optimizer_skipped"] += 1
            stats.warnings.append(f"simplify: {len(model.graph.node)} nodes is over optimize-max-nodes "
                                  f"({self.options.optimize_max_nodes}); folded constants without onnxsim's fusions")
        held_back = weights_far_from_changes(model, since) if since is not None else set()
        try:
            simplified = self._run_onnxsim(model, optimize, held_back)
            if optimize and (problem := check_problem(simplified, strict=check_problem(model, strict=True) is None)):
                stats.counters["optimizer_output_rejected"] += 1
                stats.warnings.append(f"simplify: onnxsim's optimizer made an invalid model ({problem}); folded constants only")
                simplified = self._run_onnxsim(model, False, held_back)
        except Exception as err:  # onnxsim raises many types (RuntimeError, ValidationError, ...)
            reason = f"onnxsim failed: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
            stats.skip("onnxsim failed")
            stats.warnings.append(f"simplify skipped: {reason}")
            return PassResult(model, [], [], stats)
        keep_declared_interface(simplified, model)
        if _same_graph(model, simplified):
            stats.skip("already simplified")
            return PassResult(model, [WHOLE_MODEL], [], stats)
        stats.rewritten = 1
        stats.counters["nodes_removed"] = max(0, len(model.graph.node) - len(simplified.graph.node))
        return PassResult(simplified, [WHOLE_MODEL], [WHOLE_MODEL], stats)

    @staticmethod
    def reason_to_skip(model: onnx.ModelProto) -> str | None:
        if is_large(model):
            return "model over 2 GB (onnxsim folds in one protobuf)"
        custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
        if custom:
            return f"custom-domain ops ({', '.join(custom)}) that onnxsim cannot evaluate"
        return None

    @staticmethod
    def _run_onnxsim(model: onnx.ModelProto, optimize: bool, held_back: set[str] = frozenset()) -> onnx.ModelProto:
        import onnxsim

        light, weights = hold_back(model, held_back)
        # onnxsim prints progress to stdout; graphopt's own output must stay clean.
        with contextlib.redirect_stdout(io.StringIO()):
            simplified, _ = onnxsim.simplify(light, check_n=0, perform_optimization=optimize)
        put_back(simplified, weights)
        # Its intermediate shape annotations go: the pass manager infers every shape again after
        # the pass, and the check below judges the graph, not annotations onnxsim left behind.
        del simplified.graph.value_info[:]
        return simplified


def weights_far_from_changes(model: onnx.ModelProto, since: onnx.ModelProto) -> set[str]:
    """Weights onnxsim need not see when it re-canonicalizes `model`, a pass's rewrite of `since`.

    `since` is canonical: onnxsim's rewrites of it are done, and each of them (a fold, a fusion of
    two or three adjacent nodes, merging equal nodes) reads nodes next to each other. So a weight
    that only nodes the pass left unchanged read, none of them next to a changed node or two
    steps from one, takes part in none, and onnxsim gets it as a graph input instead: on
    ResNet-50 after fc-to-conv, 100 MB it would otherwise copy several times (1.3 s of 1.4 s).
    Only weights of 1 KiB or more, unchanged by name and value, are held back; and none equal to
    a weight the pass added, which onnxsim merges with it wherever both are read (`since`, being
    canonical, holds no two equal weights of its own).
    """
    old = {t.name: t for t in since.graph.initializer}
    new_weights = {t.name for t in model.graph.initializer if t.name not in old or t != old[t.name]}
    before = {n.SerializeToString(deterministic=True) for n in since.graph.node}
    changed = [n for n in model.graph.node
               if new_weights.intersection(n.input) or n.SerializeToString(deterministic=True) not in before]
    near = {t for n in changed for t in (*n.input, *n.output)}
    for _ in range(2):  # two steps out from every changed node
        near |= {t for n in model.graph.node if near.intersection(n.input) or near.intersection(n.output) for t in (*n.input, *n.output)}
    interface = {v.name for v in [*model.graph.input, *model.graph.output]}
    added: dict[tuple, list[onnx.TensorProto]] = {}
    for tensor in model.graph.initializer:
        if tensor.name in new_weights:
            added.setdefault(_layout(tensor), []).append(tensor)
    return {
        t.name for t in model.graph.initializer
        if t.name not in near | new_weights | interface and t.ByteSize() >= HELD_BACK_MIN_BYTES and not t.data_location
        and not _equal_to_one_of(t, added)
    }


def _layout(tensor: onnx.TensorProto) -> tuple:
    return tensor.data_type, tuple(tensor.dims)


def _equal_to_one_of(tensor: onnx.TensorProto, added: dict[tuple, list[onnx.TensorProto]]) -> bool:
    """Whether a weight the pass added has this one's type, shape and values (compared only where the layout matches)."""
    twins = added.get(_layout(tensor), [])
    return bool(twins) and any(np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(tensor)) for t in twins)


HELD_BACK_MIN_BYTES = 1024


def hold_back(model: onnx.ModelProto, names: set[str]) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """`model` with the initializers `names` turned into graph inputs of the same type, and them."""
    if not names:
        return model, {}
    light = without_initializers(model)  # model-level fields the manager restores after the pass
    held = {}
    for tensor in model.graph.initializer:
        if tensor.name in names:
            held[tensor.name] = tensor
            light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
        else:
            light.graph.initializer.append(tensor)
    return light, held


def put_back(model: onnx.ModelProto, held: dict[str, onnx.TensorProto]) -> None:
    """Turn the held-back graph inputs into the initializers they were, in place."""
    if not held:
        return
    inputs = [v for v in model.graph.input if v.name not in held]
    read = {name for node in model.graph.node for name in node.input}
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(held[name] for name in held if name in read)


def check_problem(model: onnx.ModelProto, strict: bool) -> str | None:
    """Why onnx.checker (with strict shape inference if `strict`) rejects the model, or None."""
    try:
        check_model(model, full=strict)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether onnxsim changed nothing that matters: nodes, interface and initializers.

    The weights are compared by value, not by serializing both graphs (which copied every weight
    twice per run: 12% of graphopt's time on ResNet-50, docs/benchmarks.md).
    """
    if len(a.graph.node) != len(b.graph.node) or len(a.graph.initializer) != len(b.graph.initializer):
        return False

    def structure(model: onnx.ModelProto) -> list[bytes]:
        graph = model.graph
        # Nodes as a set: onnxsim may only reorder them (it rotates Constant nodes on every run,
        # tests/test_fuzz_regressions.py), and names fix the dataflow whatever the order.
        nodes = sorted(n.SerializeToString(deterministic=True) for n in graph.node)
        return nodes + [m.SerializeToString(deterministic=True) for m in [*graph.input, *graph.output]]

    def weights(model: onnx.ModelProto) -> dict[str, tuple]:
        return {t.name: (t.data_type, tuple(t.dims)) for t in model.graph.initializer}

    if structure(a) != structure(b) or weights(a) != weights(b):
        return False
    others = {t.name: t for t in b.graph.initializer}
    return all(t == others[t.name] for t in a.graph.initializer)
