"""The pass manager: run passes in order, check and verify each, roll back what is wrong.

For each pass: apply it to a copy, re-infer shapes and check the model (onnx.checker, strict
shape inference when the input passed it), then compare the new graph's outputs with the
outputs of the graph before the pass. If that fails, or the pass raises, the manager bisects
over the pass's sites and keeps every site that verifies; the ones it undoes are reported by
node name. Reference outputs are computed once and then carried from pass to pass.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from graphopt import modelio
from graphopt.errors import EquivalenceError, ModelError
from graphopt.flops import count_flops
from graphopt.graphs import declare_like, keep_model_fields, name_unnamed_nodes
from graphopt.passbase import GraphPass, PassResult
from graphopt.registry import get_pass
from graphopt.report import CHANGED, INPUT, PARTIAL, ROLLED_BACK, UNCHANGED, FinalCheck, PassRecord, Report, RolledBackSite
from graphopt.spec import format_pass, format_spec, parse_spec
from graphopt.inputs import InputSet, InputShapes
from graphopt.verify import References, Tolerance, Verdict, Verifier

Progress = Callable[[str], None]
# Called after every step (a pass, or the canonicalization after one) with its record and the
# model it leaves; `graphopt lint` follows its findings through them. The model must not be changed.
Observer = Callable[[PassRecord, onnx.ModelProto], None]

# The pass that establishes the canonical form every other pass may assume (ARCHITECTURE.md).
CANONICALIZER = "simplify"


@dataclass
class _Attempt:
    """A pass applied to some of its sites, checked, and (when verifying) compared."""

    ok: bool
    model: onnx.ModelProto | None = None
    result: PassResult | None = None
    verdict: Verdict | None = None
    outputs: References | None = None
    error: str | None = None

    def failure(self, site: str) -> RolledBackSite:
        if self.error is not None or self.verdict is None:
            return RolledBackSite(site, self.error or "failed")
        worst = self.verdict.worst
        return RolledBackSite(site, worst.describe(), worst.name, worst.max_abs_err, worst.max_rel_err)


class Pipeline:
    """An ordered list of passes and how to run them. `run` never modifies the model it is given."""

    def __init__(
        self,
        passes: Sequence[GraphPass],
        *,
        verify: bool = True,
        strict: bool = False,
        fixed_point: bool = False,
        max_iterations: int = 8,
        tolerance: Tolerance | None = None,
        input_shapes: InputShapes | None = None,
        seed: int = 0,
        input_sets: Sequence[InputSet] | None = None,
        backend: str = "auto",
        progress: Progress | None = None,
        canonicalize: bool = True,
        observer: Observer | None = None,
    ) -> None:
        self.passes = list(passes)
        self.observer = observer
        self.canonicalizer = _canonicalizer(self.passes) if canonicalize else None
        self.verify = verify
        self.strict = strict
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self.input_shapes = dict(input_shapes or {})
        self.seed = seed
        self.input_sets = input_sets  # the user's own data, instead of the seeded sets
        self.backend = backend
        self.progress = progress or (lambda message: None)

    @classmethod
    def from_spec(cls, spec: str = "all", skip: Sequence[str] = (), **kwargs: Any) -> Pipeline:
        """`skip` naming the canonicalizer (simplify) turns canonicalization off."""
        skipped = {s.strip() for item in skip for s in item.split(",")}
        kwargs.setdefault("canonicalize", CANONICALIZER not in skipped)
        return cls(parse_spec(spec, skip), **kwargs)

    @property
    def spec(self) -> str:
        return format_spec(self.passes)

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, Report]:
        start = time.perf_counter()
        working = onnx.ModelProto()
        working.CopyFrom(model)
        name_unnamed_nodes(working)
        verifier = (
            Verifier(working, input_shapes=self.input_shapes, seed=self.seed, tolerance=self.tolerance, backend=self.backend,
                     input_sets=self.input_sets)
            if self.verify else None
        )
        report = Report(
            pipeline=self.spec, verify=self.verify,
            backend=verifier.backend if verifier else None,
            atol=verifier.tolerance.atol if verifier else None,
            rtol=verifier.tolerance.rtol if verifier else None,
            seed=self.seed, input_shapes={k: list(v) if isinstance(v, tuple) else v for k, v in self.input_shapes.items()},
        )
        self._full_check = _passes_full_check(working)
        if not self._full_check:
            report.warnings.append("the input fails strict shape inference; passes are checked with onnx.checker only")
        modelio.infer_shapes(working, in_place=True)
        report.nodes_before = len(working.graph.node)
        report.flops_before = count_flops(working).total
        original = _reference_or_explain(verifier, working) if verifier else None
        input_model = working
        if verifier:
            report.input_sets = verifier.describe_input_sets()
            report.warnings.extend(verifier.warnings)
            verifier.warnings.clear()  # what the verifier says from here on is added once, at the end
        reference = original
        flops = report.flops_before

        canonicalizer = self.canonicalizer
        steps = [p for p in self.passes if p is not canonicalizer]
        report.canonicalize = canonicalizer is not None

        def run_step(graph_pass: GraphPass, iteration: int, after: str | None = None, since: onnx.ModelProto | None = None) -> PassRecord:
            nonlocal working, reference, flops
            working, reference, record = self._run_pass(graph_pass, working, reference, verifier, iteration, flops, since)
            record.after = after
            collect()
            flops = record.flops_after
            report.passes.append(record)
            if self.observer is not None:
                self.observer(record, working)
            return record

        with _collect_between_passes() as collect:
            if canonicalizer is not None:
                self.progress(f"[0/{len(steps)}] {canonicalizer.name} (canonical form)")
                run_step(canonicalizer, 1, after=INPUT)
            for iteration in range(1, self.max_iterations + 1):
                report.iterations = iteration
                changed = False
                for index, graph_pass in enumerate(steps, 1):
                    self.progress(f"[{index}/{len(steps)}] {graph_pass.name}" + (f" (iteration {iteration})" if iteration > 1 else ""))
                    before = working
                    record = run_step(graph_pass, iteration)
                    changed |= record.changed
                    if record.changed and canonicalizer is not None:
                        # The canonical form is re-established after every change, so the next
                        # pass may assume it and a second run finds nothing left to fold.
                        changed |= run_step(canonicalizer, iteration, after=graph_pass.name, since=before).changed
                if not (self.fixed_point and changed):
                    break

        report.nodes_after = len(working.graph.node)
        report.flops_after = flops
        if verifier:
            report.warnings.extend(dict.fromkeys(verifier.warnings))  # e.g. a layer-wise check that could not run
        if verifier and any(p.changed for p in report.passes):
            report.final = self._final_check(verifier, original, reference, input_model, working)
        report.seconds = time.perf_counter() - start
        if self.strict and not report.equivalent:
            raise EquivalenceError(_strict_message(report), report)
        declare_like(working, model)  # the shapes inferred for the passes are not the caller's
        return working, report

    # -- one pass ------------------------------------------------------------------------------

    def _run_pass(
        self, graph_pass: GraphPass, base: onnx.ModelProto, reference: References | None, verifier: Verifier | None, iteration: int,
        flops_before: int, since: onnx.ModelProto | None = None,
    ) -> tuple[onnx.ModelProto, References | None, PassRecord]:
        """`flops_before` is carried from the previous pass: counting walks every value_info.
        `since` (canonicalizations only): the canonical model the last pass rewrote into `base`."""
        apply_options = {} if since is None else {"since": since}
        start = time.perf_counter()
        record = PassRecord(graph_pass.name, format_pass(graph_pass), iteration, nodes_before=len(base.graph.node))
        record.flops_before = record.flops_after = flops_before

        def attempt(only: list[str] | None) -> _Attempt:
            try:
                result = graph_pass.apply(base, only, **apply_options)
                if not result.modified:
                    return _Attempt(True, base, result)
                candidate = self._finalize(result.model, base)
            except Exception as err:  # a bug in one pass must not take the pipeline down: undo it
                return _Attempt(False, error=f"{graph_pass.name} raised {type(err).__name__}: {_one_line(err)} ({_where(err)})")
            if verifier is None:
                return _Attempt(True, candidate, result)
            try:
                verdict, outputs = verifier.check(reference, candidate, base)
            except Exception as err:  # the runtime rejected the rewritten graph: that is a failure too
                return _Attempt(False, error=f"{verifier.backend} cannot run the rewritten graph: {type(err).__name__}: {_one_line(err)}")
            return _Attempt(verdict.passed, candidate, result, verdict, outputs)

        full = attempt(None)
        final = full
        if not full.ok:
            sites = full.result.sites if full.result else self._site_keys(graph_pass, base)
            final, rolled_back = self._bisect(sites, attempt)
            record.rolled_back = rolled_back or [full.failure("(whole pass)")]
            record.error = full.error
        if final.result is None or not final.result.modified:
            record.status = ROLLED_BACK if record.rolled_back else UNCHANGED
            final = _Attempt(True, base, final.result, outputs=reference)
        else:
            record.status = PARTIAL if record.rolled_back else CHANGED
        self._record(record, final)
        record.seconds = time.perf_counter() - start
        model = final.model
        next_reference = reference
        if verifier and record.changed:
            next_reference = final.outputs if final.outputs is not None else verifier.reference(model)
        return model, next_reference, record

    def _bisect(self, sites: list[str], attempt: Callable[[list[str] | None], _Attempt]) -> tuple[_Attempt, list[RolledBackSite]]:
        """Keep the largest set of sites found by halving: O(bad sites x log(sites)) attempts."""
        accepted: list[str] = []
        rolled_back: list[RolledBackSite] = []
        best = _Attempt(True)

        def search(group: list[str], known_bad: bool) -> None:
            nonlocal best
            if not known_bad:
                trial = attempt(accepted + group)
                if trial.ok:
                    accepted.extend(group)
                    best = trial
                    return
                if len(group) == 1:
                    rolled_back.append(trial.failure(group[0]))
                    return
            middle = len(group) // 2
            search(group[:middle], False)
            search(group[middle:], False)

        if len(sites) > 1:
            search(sites, known_bad=True)
        elif sites:
            rolled_back.append(attempt(sites).failure(sites[0]))
        return best, rolled_back

    @staticmethod
    def _site_keys(graph_pass: GraphPass, base: onnx.ModelProto) -> list[str]:
        try:
            import onnx_graphsurgeon as gs

            from graphopt.passbase import PassStats

            return [s.key for s in graph_pass.find_sites(gs.import_onnx(base), PassStats())]
        except Exception:  # the pass cannot even find its sites: the whole pass is rolled back
            return []

    def _finalize(self, model: onnx.ModelProto, base: onnx.ModelProto) -> onnx.ModelProto:
        """Keep the model's own fields, name new nodes, check, infer shapes (strictly if allowed)."""
        keep_model_fields(model, base)
        name_unnamed_nodes(model)
        return modelio.check_and_infer(model, strict=self._full_check)

    @staticmethod
    def _record(record: PassRecord, final: _Attempt) -> None:
        model = final.model
        record.nodes_after = len(model.graph.node)
        if record.changed:
            record.flops_after = count_flops(model).total
        if final.result is not None:
            stats = final.result.stats
            record.sites_found = len(final.result.sites)
            record.sites_applied = list(final.result.applied)
            record.skipped = dict(stats.skipped)
            record.counters = dict(stats.counters)
            record.details = list(stats.details)
            record.warnings = list(stats.warnings)
        if final.verdict is not None and record.changed:
            record.verified_by = final.verdict.backend
            record.max_abs_err = final.verdict.max_abs_err
            record.max_rel_err = final.verdict.max_rel_err
            record.worst_output = final.verdict.worst.name
            record.judged = final.verdict.layerwise.describe() if final.verdict.layerwise else None

    @staticmethod
    def _final_check(verifier: Verifier, original: References, last: References, original_model: onnx.ModelProto,
                     model: onnx.ModelProto) -> FinalCheck:
        if verifier.backend == "onnxruntime":
            verdict = verifier.compare(original, last, original_model, model)
        else:
            verdict, _ = verifier.check(original, model, original_model)
        worst = verdict.worst
        return FinalCheck(verdict.backend, verdict.passed, verdict.max_abs_err, verdict.max_rel_err, worst.name, worst.describe(),
                          verdict.layerwise.describe() if verdict.layerwise else None)


def _canonicalizer(passes: Sequence[GraphPass]) -> GraphPass:
    """The spec's own `simplify` (with its options), else one with default options."""
    named = [p for p in passes if p.name == CANONICALIZER]
    return named[0] if named else get_pass(CANONICALIZER)()


@contextlib.contextmanager
def _collect_between_passes() -> Iterator[Callable[[], None]]:
    """Pause Python's automatic garbage collection during a run; collect once after each pass.

    Automatic collection scans every live object whenever allocations pass a threshold, and a
    pass over a 20k-node graph allocates millions (graphsurgeon's nodes and tensors): it cost a
    quarter of the passes' time there (docs/benchmarks.md). A pass's graph is garbage once the
    pass is done, so one collection per pass keeps memory where it was.
    """
    if not gc.isenabled():
        yield lambda: None
        return
    gc.disable()
    try:
        yield lambda: gc.collect(1)  # the young generations: what the pass allocated, not the whole heap
    finally:
        gc.enable()


def _reference_or_explain(verifier: Verifier, model: onnx.ModelProto) -> References:
    """Reference outputs of the input model, or a clear error when ORT cannot run it at all."""
    try:
        return verifier.reference_of_input(model)
    except Exception as err:  # ORT raises its own types (custom op, unsupported opset, bad type)
        raise ModelError(
            f"cannot verify: ONNX Runtime cannot run the input model ({type(err).__name__}: {_one_line(err)}); "
            "give inputs it runs on with --load-inputs, or rerun with --no-verify to rewrite without proof"
        ) from None


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        modelio.check_model(model, full=True)
    except Exception:  # onnx raises ValidationError or InferenceError here: either way, not strict-clean
        return False
    return True


def _where(err: BaseException) -> str:
    """The innermost frame of an exception, as file:line in function: enough to file a bug."""
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f"at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _strict_message(report: Report) -> str:
    if report.rolled_back:
        record = report.rolled_back[0]
        site = record.rolled_back[0]
        return f"--strict: {record.name} failed verification at {site.site}: {site.reason}"
    assert report.final is not None
    return f"--strict: the optimized model differs from the input: {report.final.detail}"


def optimize(
    model: onnx.ModelProto | str | os.PathLike,
    passes: str | Sequence[GraphPass] = "all",
    *,
    skip: Sequence[str] = (),
    **options: Any,
) -> tuple[onnx.ModelProto, Report]:
    """Optimize a model (or the model at a path) and return the new model with its report.

    Keyword options are those of `Pipeline`: verify, strict, fixed_point, tolerance,
    input_shapes, seed, backend, progress. The caller's ModelProto is never modified.
    """
    if not isinstance(model, onnx.ModelProto):
        model = modelio.load_model(model)
    pipeline = Pipeline.from_spec(passes, skip, **options) if isinstance(passes, str) else Pipeline(passes, **options)
    return pipeline.run(model)
