"""simplify: constant folding and shape inference with onnxsim.

Matches: the whole model. Emits: onnxsim's output, where every tensor computable ahead of time
is an initializer and shapes are static where the inputs allow.

Why TensorRT benefits: exporters route weights through Identity/Cast/Reshape chains and compute
shapes at run time (Shape -> Gather -> Concat -> Reshape). Folded, the graph gives TensorRT, and
the passes after this one, constant weights and static shapes: a Gemm whose weight arrives
through an Identity is not provably constant to fc-to-conv until it is folded.

Declines (with a warning, never a crash) when onnxsim fails on a model: custom-domain ops it
cannot run, an opset it does not support, a model over 2 GB.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Collection
from dataclasses import dataclass

import onnx

from graphopt.modelio import is_large
from graphopt.passbase import GraphPass, PassResult, PassStats

WHOLE_MODEL = "(whole model)"


@dataclass(frozen=True)
class SimplifyOptions:
    optimize: bool = True  # also run onnxsim's fusions (e.g. Conv+BatchNormalization)


class Simplify(GraphPass[SimplifyOptions]):
    name = "simplify"
    summary = "Fold constants and infer static shapes with onnxsim."
    Options = SimplifyOptions
    order = 10

    def apply(self, model: onnx.ModelProto, only: Collection[str] | None = None) -> PassResult:
        stats = PassStats()
        if only is not None and WHOLE_MODEL not in only:
            return PassResult(model, [WHOLE_MODEL], [], stats)
        if (reason := self.reason_to_skip(model)) is not None:
            stats.skip(reason)
            stats.warnings.append(f"simplify skipped: {reason}")
            return PassResult(model, [], [], stats)
        try:
            simplified = self._run_onnxsim(model)
        except Exception as err:  # onnxsim raises many types (RuntimeError, ValidationError, ...)
            reason = f"onnxsim failed: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
            stats.skip("onnxsim failed")
            stats.warnings.append(f"simplify skipped: {reason}")
            return PassResult(model, [], [], stats)
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

    def _run_onnxsim(self, model: onnx.ModelProto) -> onnx.ModelProto:
        import onnxsim

        # onnxsim prints progress to stdout; graphopt's own output must stay clean.
        with contextlib.redirect_stdout(io.StringIO()):
            simplified, _ = onnxsim.simplify(model, check_n=0, perform_optimization=self.options.optimize)
        return simplified


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    def canonical(model: onnx.ModelProto) -> bytes:
        graph = onnx.GraphProto()
        graph.CopyFrom(model.graph)
        del graph.value_info[:]
        return graph.SerializeToString(deterministic=True)

    return canonical(a) == canonical(b)
