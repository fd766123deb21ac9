#!/usr/bin/env python
"""Benchmark graphopt against onnxsim, onnxslim and onnxoptimizer: what each does, how long it takes.

    python scripts/bench.py                                  # zoo + synthetic, every tool
    python scripts/bench.py --models resnet50 synthetic-5k --repeats 3 --out /tmp/bench
    python scripts/bench.py --models zoo --tools graphopt,onnxsim
    python scripts/bench.py --models typed --repeats 1 --ort-runs 5   # the INT8 Q/DQ and FP16 corpus

Every tool is timed as a user runs it: load the model from a file, optimize, save to a file. Each
time is the median of --repeats runs, all in this one process, after one untimed warm-up run of
every tool; `floor` is onnx load + save alone. Repeats stop once a tool has spent --max-seconds
on a model, and a tool whose smaller synthetic runs forecast more than that is skipped.

On the typed corpus (tests/fixtures/typed: INT8 Q/DQ and FP16 graphs) it also records what each
tool did to the precision written into the graph: Conv/Gemm/MatMul whose weight stays quantized
(behind DequantizeLinear) or became plain float, Q/DQ node counts, quantized convs whose output
channels are not a multiple of 16 or 32 and FP16 convs not a multiple of 8 (graphopt.precision
decides a conv's precision), and whether the output is equivalent to the input by graphopt's
Verifier (layer-wise on quantized graphs). These get a "Typed corpus" section of their own.

For each output the script records nodes, op histogram, FLOPs (graphopt.flops after shape
inference at batch 1), parameters (elements of all initializers), and the ONNX Runtime CPU
latency with ORT's default graph optimizations (what a user deploying on ORT gets) and one
intra-op thread: the median of --ort-runs runs, sessions interleaved in a shuffled order each
round so drift hits every tool alike.

Models are built locally and cached in --cache (default bench-cache/, not in git): the zoo's
and the typed corpus's weight-stripped skeletons refilled with seeded weights, and synthetic CNN-like graphs
(scripts/synthetic.py) of 1k to 50k nodes for scaling. Writes results.md, results.json and
scaling.png (time vs node count, log-log) to --out. Tools that are not installed are reported
as "not installed", not skipped silently.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_graphsurgeon as gs  # noqa: E402
import onnxruntime as ort  # noqa: E402

import graphopt  # noqa: E402
from graphopt import modelio  # noqa: E402
from graphopt.flops import count_flops  # noqa: E402
from graphopt.graphs import weight  # noqa: E402
from graphopt.lint.context import infer_shapes_lightly  # noqa: E402
from graphopt.precision import layer_precision  # noqa: E402
from graphopt.registry import default_order  # noqa: E402
from graphopt.verify import FP32_TOLERANCE, Verifier, compare_arrays, make_feed  # noqa: E402
from synthetic import GENERATOR_VERSION, SyntheticSpec, format_count, make_synthetic, parse_count  # noqa: E402
from tests.fixtures.zoo import TYPED_DIR, ZOO_DIR, load_typed_model, load_zoo_model, typed_names, zoo_names  # noqa: E402

SYNTHETIC_SIZES = (1000, 5000, 20000, 50000)
NOT_INSTALLED = "not installed"
LATENCY_SLACK = 0.05
# ORT session creation grows faster than linearly with node count (one 50k-node synthetic graph
# takes ~100 s with all optimizations on a 2-core machine), so latency stops at this size.
DEFAULT_LATENCY_MAX_NODES = 10000


# -- models ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchModel:
    name: str
    kind: str  # "zoo", "typed" or "synthetic"
    path: Path
    nodes: int = 0  # the target size of a synthetic graph


def resolve_models(requested: list[str], cache: Path) -> list[BenchModel]:
    """Names, `zoo`, `typed` or `synthetic` -> models materialized as files in the cache."""
    names: list[str] = []
    for item in (part for entry in requested for part in entry.split(",") if part):
        if item == "zoo":
            names += zoo_names()
        elif item == "typed":
            names += typed_names()
        elif item == "synthetic":
            names += [f"synthetic-{format_count(n)}" for n in SYNTHETIC_SIZES]
        else:
            names.append(item)
    zoo, typed = set(zoo_names()), set(typed_names())
    models = []
    for name in dict.fromkeys(names):
        if name.startswith("synthetic-"):
            models.append(_synthetic_file(parse_count(name.removeprefix("synthetic-")), cache))
        elif name in zoo:
            models.append(_skeleton_file(name, "zoo", ZOO_DIR, load_zoo_model, cache))
        elif name in typed:
            models.append(_skeleton_file(name, "typed", TYPED_DIR, load_typed_model, cache))
        else:
            raise SystemExit(f"bench: unknown model {name!r}; valid: zoo, typed, synthetic, synthetic-<N> (e.g. synthetic-5k), "
                             f"{', '.join(sorted(zoo | typed))}")
    # Synthetic graphs run smallest first: each size's times forecast the next one's (see Budget).
    return ([m for m in models if m.kind == "zoo"] + [m for m in models if m.kind == "typed"]
            + sorted((m for m in models if m.kind == "synthetic"), key=lambda m: m.nodes))


def _skeleton_file(name: str, kind: str, directory: Path, load: Callable[[str, int], onnx.ModelProto], cache: Path) -> BenchModel:
    """A weight-stripped skeleton of the zoo or the typed corpus, refilled with seed 0, as a file."""
    path = cache / kind / f"{name}.onnx"
    skeleton = directory / f"{name}.onnx"
    if not path.exists() or path.stat().st_mtime < skeleton.stat().st_mtime:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(load(name, 0), str(path))
    return BenchModel(name, kind, path)


def _synthetic_file(nodes: int, cache: Path) -> BenchModel:
    spec = SyntheticSpec(nodes)
    path = cache / "synthetic" / f"{spec.name}-v{GENERATOR_VERSION}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(make_synthetic(spec), str(path))
    return BenchModel(spec.name, "synthetic", path, nodes)


# -- what a model is -------------------------------------------------------------------------------


@dataclass
class ModelStats:
    nodes: int
    ops: dict[str, int]
    flops: int
    params: int


def model_stats(model: onnx.ModelProto) -> ModelStats:
    # Dynamic dims set to 1 before inference, as `graphopt lint` counts: otherwise a token count
    # that only a static batch resolves (ViT's Reshape to [batch * 197, 192]) would count as 1.
    inferred = infer_shapes_lightly(model, unit_dims=True)
    params = sum(int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer)
    ops = Counter(node.op_type for node in model.graph.node)
    return ModelStats(len(model.graph.node), dict(ops.most_common()), count_flops(inferred).total, params)


def ops_diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Op types whose count changed, largest change first: {'Identity': -12, 'Conv': +3}."""
    diff = {op: after.get(op, 0) - before.get(op, 0) for op in {*before, *after}}
    return dict(sorted(((op, d) for op, d in diff.items() if d), key=lambda item: (-abs(item[1]), item[0])))


# -- what a typed model's precision is -------------------------------------------------------------

QUANTIZED_PRECISIONS = ("int8", "fp8", "int4")


@dataclass
class PrecisionStats:
    """The precision written into a graph, counted: what a tool must not lose on a Q/DQ or FP16 model."""

    quantized_weights: int  # Conv/Gemm/MatMul whose constant weight comes through DequantizeLinear
    float_weights: int  # Conv/Gemm/MatMul whose weight is a plain float constant
    quantize_nodes: int
    dequantize_nodes: int
    quantized_convs: int  # convs graphopt.precision judges int8/fp8/int4
    quantized_not16: int  # of those, output channels not a multiple of 16
    quantized_not32: int  # ... nor of 32
    fp16_convs: int  # convs judged fp16: float16 tensors (a float32 conv counts as the fp16 target)
    fp16_not8: int  # of those, output channels not a multiple of 8


def precision_stats(model: onnx.ModelProto) -> PrecisionStats:
    # Types inferred first: a ModelOpt weight's QuantizeLinear output declares no type, and
    # layer_precision reads the quantized type there (a conv of unknown type would count as float).
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    del typed.graph.value_info[:]
    typed.graph.value_info.extend(infer_shapes_lightly(model).graph.value_info)
    graph = gs.import_onnx(typed)
    quantized = floating = 0
    q_convs, q_not16, q_not32, h_convs, h_not8 = 0, 0, 0, 0, 0
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        kernel = weight(node.inputs[1])
        if kernel is not None:
            quantized += kernel.quantized
            floating += not kernel.quantized
        if node.op != "Conv" or kernel is None or not kernel.shape:
            continue
        channels, precision = kernel.shape[0], layer_precision(node).precision
        if precision in QUANTIZED_PRECISIONS:
            q_convs, q_not16, q_not32 = q_convs + 1, q_not16 + (channels % 16 != 0), q_not32 + (channels % 32 != 0)
        elif precision == "fp16":
            h_convs, h_not8 = h_convs + 1, h_not8 + (channels % 8 != 0)
    ops = Counter(node.op_type for node in model.graph.node)
    return PrecisionStats(quantized, floating, ops["QuantizeLinear"], ops["DequantizeLinear"], q_convs, q_not16, q_not32, h_convs, h_not8)


@dataclass
class Equivalence:
    """graphopt's Verifier on a tool's output, with the input model as reference."""

    passed: bool  # False also when ORT cannot run the output (`worst` says so)
    worst: str  # the worst output's verdict, in words
    max_rel_err: float | None = None
    layerwise: bool = False  # judged region by region between shared quantizers


class EquivalenceCheck:
    """One Verifier per input model: its reference outputs are computed once, every output judged against them."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.verifier = Verifier(model)
        self.references = self.verifier.reference_of_input(model)

    def __call__(self, candidate: onnx.ModelProto) -> Equivalence:
        try:
            verdict, _ = self.verifier.check(self.references, candidate, self.model)
        except Exception as err:  # ORT may refuse a tool's output; that is the result
            return Equivalence(False, f"cannot run: {type(err).__name__}: {_one_line(err)}")
        return Equivalence(verdict.passed, verdict.worst.describe(), verdict.max_rel_err, verdict.layerwise is not None)


# -- tools -----------------------------------------------------------------------------------------


@dataclass
class GraphoptBreakdown:
    """Where a graphopt run's time went, from its Report (medians over the repeats)."""

    simplify_s: float  # the `simplify` pass (onnxsim) as the pass manager timed it
    other_passes_s: float  # every other pass, as timed by the pass manager
    outside_passes_s: float  # load, shape inference, reference run, final check, save
    passes: dict[str, float] = field(default_factory=dict)  # per pass name
    equivalent: bool | None = None
    rolled_back: list[str] = field(default_factory=list)


# A tool optimizes the model at `src` into `dst`; it may return a graphopt Report.
Optimize = Callable[[Path, Path], "graphopt.Report | None"]


@dataclass(frozen=True)
class Tool:
    name: str
    module: str  # the import a user needs; when it is missing the tool is "not installed"
    optimize: Optimize
    about: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


def _floor(src: Path, dst: Path) -> None:
    onnx.save_model(onnx.load_model(str(src)), str(dst))


def _graphopt(verify: bool) -> Optimize:
    def run(src: Path, dst: Path) -> graphopt.Report:
        model, report = graphopt.optimize(src, "all", verify=verify)
        modelio.save_model(model, dst)
        return report

    return run


def _onnxsim(src: Path, dst: Path) -> None:
    import onnxsim

    with contextlib.redirect_stdout(io.StringIO()):
        model, _ = onnxsim.simplify(onnx.load_model(str(src)))
    onnx.save_model(model, str(dst))


def _onnxslim(src: Path, dst: Path) -> None:
    import onnxslim

    onnx.save_model(onnxslim.slim(str(src)), str(dst))


def _onnxoptimizer(src: Path, dst: Path) -> None:
    import onnxoptimizer

    onnx.save_model(onnxoptimizer.optimize(onnx.load_model(str(src))), str(dst))


TOOLS = {
    tool.name: tool
    for tool in (
        Tool("floor", "onnx", _floor, "onnx.load_model + onnx.save_model, nothing else"),
        Tool("graphopt", "graphopt", _graphopt(verify=False), "graphopt.optimize(path, 'all', verify=False) + modelio.save_model"),
        Tool("graphopt-verify", "graphopt", _graphopt(verify=True), "graphopt.optimize(path, 'all', verify=True) + modelio.save_model"),
        Tool("onnxsim", "onnxsim", _onnxsim, "onnxsim.simplify(model) with its defaults"),
        Tool("onnxslim", "onnxslim", _onnxslim, "onnxslim.slim(path) with its defaults"),
        Tool("onnxoptimizer", "onnxoptimizer", _onnxoptimizer, "onnxoptimizer.optimize(model): fuse and elimination passes"),
    )
}


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class ToolResult:
    status: str  # "ok", "not installed", "failed: <one line>"
    seconds: list[float] = field(default_factory=list)
    stats: ModelStats | None = None
    ops_diff: dict[str, int] = field(default_factory=dict)
    ort_ms: float | None = None
    max_rel_err: float | None = None  # vs the original's ORT outputs, relative to each output's scale
    graphopt: GraphoptBreakdown | None = None
    precision: PrecisionStats | None = None  # typed models only
    equivalence: Equivalence | None = None  # typed models only

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


@dataclass
class Latency:
    original_ms: float | None = None  # the faster of two sessions of the original
    noise: float | None = None  # |1 - one session / the other|: what "the same" looks like
    note: str | None = None  # why latency was not measured


@dataclass
class ModelResult:
    name: str
    kind: str
    stats: ModelStats
    latency: Latency
    tools: dict[str, ToolResult]
    precision: PrecisionStats | None = None  # typed models only
    equivalence_warnings: list[str] = field(default_factory=list)  # the Verifier's (input sets dropped, ...)

    @property
    def ort_ms(self) -> float | None:
        return self.latency.original_ms


@dataclass(frozen=True)
class Settings:
    repeats: int
    ort_runs: int
    latency_max_nodes: int
    max_seconds: float


ORIGINAL, ORIGINAL_AGAIN = "(original)", "(original again)"


@dataclass
class Budget:
    """How long one tool may spend on one model, and a forecast for the next synthetic size.

    Peer tools are quadratic on large graphs (onnxslim took 860 s on the 20k-node graph), so a
    tool whose time on the smaller synthetic graphs forecasts more than `max_seconds` on the next
    one is skipped there, and repeats stop once a tool has spent `max_seconds` on a model.
    """

    max_seconds: float
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tool -> [(nodes, s)]

    def record(self, tool: str, nodes: int, seconds: float) -> None:
        self.history.setdefault(tool, []).append((nodes, seconds))

    def forecast(self, tool: str, nodes: int) -> tuple[float, str] | None:
        """Seconds for one run at `nodes`, extrapolated in log-log space, and how it was derived."""
        points = sorted(p for p in self.history.get(tool, []) if p[0] < nodes)
        if not points:
            return None
        n2, t2 = points[-1]
        exponent = 1.0
        if len(points) >= 2:
            n1, t1 = points[-2]
            exponent = min(max(np.log(t2 / t1) / np.log(n2 / n1), 1.0), 3.0) if t1 > 0 and t2 > 0 else 1.0
        return t2 * (nodes / n2) ** exponent, f"{t2:.1f} s at {n2} nodes, growing as nodes^{exponent:.2f}"

    def keep_repeating(self, seconds: list[float]) -> bool:
        return sum(seconds) + seconds[-1] <= self.max_seconds


def time_tool(tool: Tool, src: Path, dst: Path, repeats: int, budget: Budget | None = None) -> ToolResult:
    if not tool.installed():
        return ToolResult(NOT_INSTALLED)
    seconds, reports = [], []
    for _ in range(repeats):
        if seconds and budget is not None and not budget.keep_repeating(seconds):
            break
        gc.collect()
        start = time.perf_counter()
        try:
            report = tool.optimize(src, dst)
        except Exception as err:  # a peer tool may raise anything; the failure is the result
            return ToolResult(f"failed: {type(err).__name__}: {_one_line(err)}")
        seconds.append(time.perf_counter() - start)
        reports.append(report)
    result = ToolResult("ok", seconds)
    if reports[-1] is not None:
        result.graphopt = _breakdown(reports, seconds)
    return result


def _breakdown(reports: list[graphopt.Report], seconds: list[float]) -> GraphoptBreakdown:
    def median_of(pick: Callable[[graphopt.Report], float]) -> float:
        return statistics.median(pick(r) for r in reports)

    names = dict.fromkeys(p.name for p in reports[-1].passes)
    per_pass = {name: median_of(lambda r, n=name: sum(p.seconds for p in r.passes if p.name == n)) for name in names}
    simplify = per_pass.get("simplify", 0.0)
    others = sum(s for name, s in per_pass.items() if name != "simplify")
    last = reports[-1]
    return GraphoptBreakdown(
        simplify_s=simplify, other_passes_s=others,
        outside_passes_s=max(0.0, statistics.median(seconds) - simplify - others), passes=per_pass,
        equivalent=last.equivalent if last.verify else None,
        rolled_back=[f"{p.name}: {', '.join(s.site for s in p.rolled_back)}" for p in last.rolled_back],
    )


@dataclass
class LatencyRun:
    ms: dict[str, float]  # median per model
    max_rel_err: dict[str, float]  # against the first model's outputs; inf when names, shapes or dtypes differ
    rejected: dict[str, str]  # models ORT could not load or run, and why


def measure_latency(models: dict[str, onnx.ModelProto], runs: int) -> LatencyRun:
    """Median ORT CPU latency in ms per model, and each model's max error against the first one.

    Sessions are built first, then run round-robin in a shuffled order each round, so a slow
    stretch of the machine, or running right after a given model, favours no one.
    """
    options = ort.SessionOptions()  # default graph optimizations: ORT_ENABLE_ALL
    # One intra-op thread: on a shared 2-core machine a 2-thread pool measures the neighbours
    # (a model's two identical sessions differed 7x in a trial run); one thread differs by percents.
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    feed = make_feed(next(iter(models.values())), {}, seed=0)
    sessions: dict[str, ort.InferenceSession] = {}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    rejected: dict[str, str] = {}
    for name, model in models.items():
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            outputs[name] = dict(zip(names, session.run(None, feed)))  # warm-up, and the outputs
        except Exception as err:  # ORT raises its own pybind types; a tool's broken output is a result
            rejected[name] = f"ORT cannot run it: {type(err).__name__}: {_one_line(err)}"
            continue
        session.run(None, feed)
        sessions[name] = session
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    shuffle = np.random.default_rng(0).permutation
    for _ in range(runs):
        for name in (order[i] for i in shuffle(len(order))):
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append(time.perf_counter() - start)
    reference = outputs[next(iter(models))]
    errors = {name: _max_rel_err(reference, out) for name, out in outputs.items()}
    return LatencyRun({name: 1000 * statistics.median(t) for name, t in times.items()}, errors, rejected)


def _max_rel_err(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> float:
    if list(reference) != list(candidate):
        return float("inf")
    verdicts = [compare_arrays(name, ref, candidate[name], FP32_TOLERANCE) for name, ref in reference.items()]
    return max((v.max_rel_err if v.reason is None else float("inf") for v in verdicts), default=0.0)


def warm_up(tools: list[Tool], cache: Path) -> None:
    """Run every tool once, untimed, on a small graph: imports and lazy set-up are not what we measure."""
    small = _synthetic_file(200, cache)
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        for tool in tools:
            if tool.installed():
                time_tool(tool, small.path, Path(tmp) / f"{tool.name}.onnx", repeats=1)


def bench_model(model: BenchModel, tools: list[Tool], settings: Settings, budget: Budget, log: Callable[[str], None]) -> ModelResult:
    original = onnx.load_model(str(model.path))
    stats = model_stats(original)
    typed = model.kind == "typed"
    check = EquivalenceCheck(original) if typed else None
    results: dict[str, ToolResult] = {}
    outputs: dict[str, onnx.ModelProto] = {}
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        for tool in tools:
            dst = Path(tmp) / f"{tool.name}.onnx"
            forecast = budget.forecast(tool.name, stats.nodes) if model.kind == "synthetic" else None
            if forecast is not None and forecast[0] > budget.max_seconds and tool.installed():
                result = ToolResult(f"skipped: forecast {forecast[0]:.0f} s > --max-seconds {budget.max_seconds:.0f} ({forecast[1]})")
            else:
                result = time_tool(tool, model.path, dst, settings.repeats, budget)
            if model.kind == "synthetic" and result.median_s is not None:
                budget.record(tool.name, stats.nodes, result.median_s)
            results[tool.name] = result
            if result.status == "ok" and tool.name != "floor":
                optimized = onnx.load_model(str(dst))
                outputs[tool.name] = optimized
                result.stats = model_stats(optimized)
                result.ops_diff = ops_diff(stats.ops, result.stats.ops)
                if check is not None:
                    result.precision, result.equivalence = precision_stats(optimized), check(optimized)
            log(f"    {tool.name:<16} {_describe(result, stats)}")
    latency = Latency()
    if settings.ort_runs <= 0:
        latency.note = "latency not measured (--ort-runs 0)"
    elif stats.nodes > settings.latency_max_nodes:
        latency.note = f"latency not measured above --latency-max-nodes {settings.latency_max_nodes}"
    else:
        # The original runs in two sessions: their gap is the noise floor, and the faster of the
        # two is the baseline, so noise never makes a tool look faster than the original.
        run = measure_latency({ORIGINAL: original, ORIGINAL_AGAIN: original, **outputs}, settings.ort_runs)
        if ORIGINAL in run.rejected:
            latency.note = f"latency not measured: the original: {run.rejected[ORIGINAL]}"
        else:
            first, again = run.ms.pop(ORIGINAL), run.ms.pop(ORIGINAL_AGAIN)
            latency.original_ms, latency.noise = min(first, again), abs(again / first - 1)
            for name, value in run.ms.items():
                results[name].ort_ms, results[name].max_rel_err = value, run.max_rel_err[name]
            for name, why in run.rejected.items():
                results[name].status = f"failed: {why}"
            log(f"    ORT ms: original {first:.3f} and {again:.3f}, " + ", ".join(f"{n} {v:.3f}" for n, v in run.ms.items()))
    if latency.note:
        log(f"    {latency.note}")
    if check is None:
        return ModelResult(model.name, model.kind, stats, latency, results)
    return ModelResult(model.name, model.kind, stats, latency, results, precision_stats(original), check.verifier.warnings)


def _describe(result: ToolResult, before: ModelStats) -> str:
    if result.status != "ok":
        return result.status
    text = f"{result.median_s:8.3f} s"
    if result.stats is not None:
        text += f"  nodes {before.nodes} -> {result.stats.nodes}"
    if result.graphopt is not None:
        text += f"  (simplify {result.graphopt.simplify_s:.3f} s, other passes {result.graphopt.other_passes_s:.3f} s)"
    if result.precision is not None:
        text += f"  quantized weights {result.precision.quantized_weights}, float {result.precision.float_weights}"
    if result.equivalence is not None:
        text += "  " + _equivalence_cell(result.equivalence)
    return text


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] + "..." if len(text) > 200 else text


# -- targets ---------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    met: bool | None  # None: not measurable in this run
    detail: str


def evaluate_targets(models: list[ModelResult]) -> list[Target]:
    return [
        _ratio_target(models, "graphopt `all` without verification within 1.5x of onnxsim", "graphopt", "onnxsim", 1.5),
        _other_passes_target(models),
        _ratio_target(models, "graphopt `all` with verification within 4x of onnxsim", "graphopt-verify", "onnxsim", 4.0),
        *(_scaling_target(models, tool) for tool in ("graphopt", "graphopt-verify")),
        _latency_target(models),
    ]


def _medians(models: list[ModelResult], *tools: str) -> Iterator[tuple[ModelResult, list[float]]]:
    for m in models:
        values = [m.tools[t].median_s if t in m.tools else None for t in tools]
        if all(v is not None for v in values):
            yield m, values


def _ratio_target(models: list[ModelResult], name: str, tool: str, baseline: str, limit: float) -> Target:
    ratios = {m.name: a / b for m, (a, b) in _medians(models, tool, baseline)}
    if not ratios:
        return Target(name, None, f"needs {tool} and {baseline} results")
    misses = {n: r for n, r in ratios.items() if r > limit}
    worst = max(ratios, key=ratios.get)
    detail = f"worst {worst} {ratios[worst]:.2f}x"
    if misses:
        detail += "; over on " + ", ".join(f"{n} {r:.2f}x" for n, r in misses.items())
    return Target(name, not misses, detail)


def _other_passes_target(models: list[ModelResult]) -> Target:
    name = "graphopt minus its simplify pass faster than onnxslim's whole run"
    ratios = {}
    for m, (total, slim) in _medians(models, "graphopt", "onnxslim"):
        breakdown = m.tools["graphopt"].graphopt
        ratios[m.name] = (total - breakdown.simplify_s) / slim
    if not ratios:
        return Target(name, None, "needs graphopt and onnxslim results")
    misses = {n: r for n, r in ratios.items() if r >= 1.0}
    worst = max(ratios, key=ratios.get)
    detail = f"(graphopt total - simplify pass) / onnxslim: worst {worst} {ratios[worst]:.2f}x"
    if misses:
        detail += "; slower on " + ", ".join(f"{n} {r:.2f}x" for n, r in misses.items())
    return Target(name, not misses, detail)


WITHOUT_SIMPLIFY = "graphopt - simplify"  # graphopt's own code: its run minus the onnxsim pass


def scaling(models: list[ModelResult], tool: str) -> dict[int, float]:
    """Microseconds per node for each synthetic size, keyed by node count."""
    if tool == WITHOUT_SIMPLIFY:
        return {m.stats.nodes: 1e6 * (t - m.tools["graphopt"].graphopt.simplify_s) / m.stats.nodes
                for m, (t,) in _medians(models, "graphopt") if m.kind == "synthetic"}
    return {m.stats.nodes: 1e6 * t / m.stats.nodes for m, (t,) in _medians(models, tool) if m.kind == "synthetic"}


def _scaling_target(models: list[ModelResult], tool: str) -> Target:
    name = f"{tool}: time per node within 2x from 1k to 50k nodes"
    per_node = {n: us for n, us in scaling(models, tool).items() if n >= 1000}
    if len(per_node) < 2:
        return Target(name, None, "needs at least two synthetic sizes of 1k nodes or more")
    spread = max(per_node.values()) / min(per_node.values())
    detail = ", ".join(f"{format_count(round(n, -3))}: {us:.0f} us/node" for n, us in sorted(per_node.items()))
    return Target(name, spread <= 2.0, f"{detail}; max/min {spread:.2f}x")


def _latency_target(models: list[ModelResult]) -> Target:
    name = "ORT latency of graphopt's output no worse than the original"
    measured = [m for m in models if m.ort_ms and "graphopt" in m.tools and m.tools["graphopt"].ort_ms]
    if not measured:
        return Target(name, None, "needs latency of the original and of graphopt's output")
    ratios = {m.name: m.tools["graphopt"].ort_ms / m.ort_ms for m in measured}
    # A model counts as slower only beyond its own noise floor (two sessions of the original), and never under 5%.
    allowed = {m.name: 1 + max(LATENCY_SLACK, m.latency.noise or 0.0) for m in measured}
    misses = {n: r for n, r in ratios.items() if r > allowed[n]}
    worst = max(ratios, key=ratios.get)
    detail = f"worst {worst} {ratios[worst]:.3f}x"
    if misses:
        detail += "; slower beyond noise on " + ", ".join(f"{n} {r:.3f}x (noise {allowed[n] - 1:.0%})" for n, r in misses.items())
    return Target(name, not misses, detail)


# -- reporting -------------------------------------------------------------------------------------


@dataclass
class Environment:
    cpu: str
    cores: int
    python: str
    versions: dict[str, str]
    passes: list[str]  # what `--passes all` ran
    source: str  # the graphopt commit measured, and its uncommitted changes
    settings: Settings
    load_before: float  # 1-minute load average: other work on the machine skews every time
    load_after: float = 0.0
    wall_s: float = 0.0


def environment(settings: Settings) -> Environment:
    versions = {}
    for package in ("graphopt", "onnx", "onnxruntime", "onnx-graphsurgeon", "polygraphy", "onnxsim", "onnxslim", "onnxoptimizer", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = NOT_INSTALLED
    return Environment(_cpu_name(), os.cpu_count() or 0, platform.python_version(), versions, default_order(), _source_state(),
                       settings, os.getloadavg()[0])


def _source_state() -> str:
    """`<commit>` or `<commit> + uncommitted changes to <files>`: what graphopt code was measured."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
    except OSError:  # no git executable
        return "unknown (git not found)"
    if not commit:
        return "unknown (not a git checkout)"
    changed = [line.split(maxsplit=1)[1] for line in git("status", "--porcelain", "--untracked-files=no", "--", "graphopt", "passes").splitlines()]
    return commit + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_json(path: Path, env: Environment, models: list[ModelResult], targets: list[Target]) -> None:
    data = {
        "environment": asdict(env),
        "tools": {name: tool.about for name, tool in TOOLS.items()},
        "models": [_model_dict(m) for m in models],
        "targets": [asdict(t) for t in targets],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def _model_dict(m: ModelResult) -> dict:
    data = asdict(m)
    for name, tool in m.tools.items():
        data["tools"][name]["median_s"] = tool.median_s
    return data


def _fmt_s(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _cell(result: ToolResult | None) -> str:
    if result is None:
        return ""
    return _fmt_s(result.median_s) if result.status == "ok" else result.status.split(":")[0]


def markdown(env: Environment, results: list[ModelResult], targets: list[Target], tools: list[Tool], notes: list[str]) -> str:
    names = [t.name for t in tools]
    models = [m for m in results if m.kind != "typed"]
    typed = [m for m in results if m.kind == "typed"]
    lines = [
        "# graphopt benchmark", "",
        f"CPU: {env.cpu} ({env.cores} cores); Python {env.python}; "
        + ", ".join(f"{k} {v}" for k, v in env.versions.items()) + ".",
        f"graphopt `all` = {', '.join(env.passes)}; source: {env.source}.", "",
        f"Times are medians of up to {env.settings.repeats} runs of load + optimize + save, fewer once a tool has spent "
        f"{env.settings.max_seconds:.0f} s on a model; latency is the median of {env.settings.ort_runs} ORT CPU runs with "
        f"default graph optimizations and one intra-op thread. Load average {env.load_before:.1f} at the start, {env.load_after:.1f} at the end; "
        f"the run took {env.wall_s / 60:.1f} min.",
    ]
    if models:
        lines += _untyped_tables(models, names)
    lines += _typed_tables(typed, names)
    lines += ["", "## Targets", ""]
    for t in targets:
        mark = "not measured" if t.met is None else "met" if t.met else "MISSED"
        lines.append(f"- **{mark}**: {t.name} ({t.detail})")
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def _untyped_tables(models: list[ModelResult], names: list[str]) -> list[str]:
    lines = [
        "", "## Wall time (s)", "",
        "| model | nodes | " + " | ".join(names) + " | graphopt / onnxsim | verify / onnxsim | (graphopt - simplify) / onnxslim |",
        "|---|---:|" + "---:|" * (len(names) + 3),
    ]
    for m in models:
        lines.append(f"| {m.name} | {m.stats.nodes} | " + " | ".join(_cell(m.tools.get(n)) for n in names)
                     + f" | {_ratio(m, 'graphopt', 'onnxsim')} | {_ratio(m, 'graphopt-verify', 'onnxsim')} | {_slim_ratio(m)} |")
    lines += ["", "## What each tool did", "",
              "| model | tool | nodes | ops changed | MFLOPs | params | ORT ms | vs original | max rel err |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for m in models:
        noise = "" if m.latency.noise is None else f"noise {m.latency.noise:.1%}"
        lines.append(f"| {m.name} | (original) | {m.stats.nodes} | | {m.stats.flops / 1e6:.1f} | {m.stats.params} | "
                     f"{_fmt_ms(m.ort_ms)} | {noise} | |")
        for name in names:
            r = m.tools.get(name)
            if r is None or name == "floor":
                continue
            if r.stats is None:
                lines.append(f"| {m.name} | {name} | {_cell(r)} | | | | | | |")
                continue
            vs = f"{r.ort_ms / m.ort_ms:.3f}x" if r.ort_ms and m.ort_ms else ""
            err = "" if r.max_rel_err is None else f"{r.max_rel_err:.1e}"
            lines.append(f"| {m.name} | {name} | {r.stats.nodes} | {_fmt_diff(r.ops_diff)} | {r.stats.flops / 1e6:.1f} | "
                         f"{r.stats.params} | {_fmt_ms(r.ort_ms)} | {vs} | {err} |")
    return lines + _breakdown_table(models) + _scaling_table(models, names)


def dequantized(before: PrecisionStats, after: PrecisionStats) -> int:
    """Layers whose quantized weight a tool turned into a plain float constant (merged layers aside)."""
    return max(0, min(before.quantized_weights - after.quantized_weights, after.float_weights - before.float_weights))


def _typed_tables(models: list[ModelResult], names: list[str]) -> list[str]:
    if not models:
        return []
    names = [n for n in names if n != "floor"]
    lines = [
        "", "## Typed corpus", "",
        "INT8 Q/DQ (ModelOpt, ORT quantize_static) and FP16 (AutoCast) models from tests/fixtures/typed, refilled with seed 0. "
        "`q / float weights`: Conv/Gemm/MatMul whose constant weight comes through DequantizeLinear / is a plain float "
        "constant. `int8 convs` (quantized per graphopt.precision) and `fp16 convs` (float16 tensors; a float32 conv "
        "counts as the fp16 target) give, of all convs, those whose output channels are not a multiple of 16 / 32 and of 8. "
        "`equivalent`: graphopt's Verifier with the input model as reference (layer-wise between shared quantizers on "
        "quantized graphs), and the worst relative error.", "",
        "### What each tool does to quantized weights", "",
        "| tool | models with quantized weights | all kept quantized | some dequantized to float | layers dequantized "
        "| equivalent (all typed models) | fewer nodes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        runs = [(m, m.tools[name]) for m in models if name in m.tools and m.tools[name].precision is not None]
        with_q = [(m, r) for m, r in runs if m.precision.quantized_weights]
        lost = [dequantized(m.precision, r.precision) for m, r in with_q]
        passed = sum(bool(r.equivalence and r.equivalence.passed) for _, r in runs)
        fewer = sum(r.stats.nodes < m.stats.nodes for m, r in runs)
        lines.append(f"| {name} | {len(with_q)} | {lost.count(0)} | {len(lost) - lost.count(0)} | {sum(lost)} | "
                     f"{passed} of {len(runs)} | {fewer} of {len(runs)} |")
    lines += [
        "", "### Per model", "",
        "| model | tool | nodes | s | ORT ms | q / float weights | Q / DQ | int8 convs: not x16 / x32 of | "
        "fp16 convs: not x8 of | equivalent (worst rel err) |",
        "|---|---|---:|---:|---:|---|---|---|---|---|",
    ]
    for m in models:
        lines.append(f"| {m.name} | (original) | {m.stats.nodes} | | {_fmt_ms(m.ort_ms)} | {_precision_cells(m.precision)} | |")
        for name in names:
            r = m.tools.get(name)
            if r is None:
                continue
            if r.precision is None:
                lines.append(f"| {m.name} | {name} | {_cell(r)} | | | | | | | |")
                continue
            lost = dequantized(m.precision, r.precision)
            flag = f" (**{lost} dequantized**)" if lost else ""
            lines.append(f"| {m.name} | {name} | {r.stats.nodes} | {_fmt_s(r.median_s)} | {_fmt_ms(r.ort_ms)} | "
                         f"{_precision_cells(r.precision, flag)} | {_equivalence_cell(r.equivalence)} |")
    warnings = sorted({f"{m.name}: {w}" for m in models for w in m.equivalence_warnings})
    if warnings:
        lines += ["", "Verifier warnings:", "", *(f"- {w}" for w in warnings)]
    return lines


def _precision_cells(p: PrecisionStats, flag: str = "") -> str:
    return (f"{p.quantized_weights} / {p.float_weights}{flag} | {p.quantize_nodes} / {p.dequantize_nodes} | "
            f"{p.quantized_not16} / {p.quantized_not32} of {p.quantized_convs} | {p.fp16_not8} of {p.fp16_convs}")


def _equivalence_cell(e: Equivalence | None) -> str:
    if e is None:
        return ""
    if not e.passed:
        return "NO: " + (e.worst if len(e.worst) <= 160 else e.worst[:157] + "...").replace("|", "/")
    how = "yes, layer-wise" if e.layerwise else "yes"
    return how if e.max_rel_err is None else f"{how} ({e.max_rel_err:.1e})"


def _ratio(m: ModelResult, tool: str, baseline: str) -> str:
    a, b = (m.tools.get(t).median_s if m.tools.get(t) else None for t in (tool, baseline))
    return f"{a / b:.2f}x" if a and b else ""


def _slim_ratio(m: ModelResult) -> str:
    go, slim = m.tools.get("graphopt"), m.tools.get("onnxslim")
    if not (go and go.graphopt and slim and slim.median_s):
        return ""
    return f"{(go.median_s - go.graphopt.simplify_s) / slim.median_s:.2f}x"


def _fmt_ms(ms: float | None) -> str:
    return "" if ms is None else f"{ms:.2f}"


def _fmt_diff(diff: dict[str, int], limit: int = 5) -> str:
    items = [f"{op} {d:+d}" for op, d in diff.items()]
    return ", ".join(items[:limit]) + (f", +{len(items) - limit} more" if len(items) > limit else "")


def _breakdown_table(models: list[ModelResult]) -> list[str]:
    rows = []
    for tool in ("graphopt", "graphopt-verify"):
        for m in models:
            r = m.tools.get(tool)
            if r is None or r.graphopt is None:
                continue
            b = r.graphopt
            passes = ", ".join(f"{n} {s:.3f}" for n, s in b.passes.items() if n != "simplify")
            verdict = "" if b.equivalent is None else ("equivalent" if b.equivalent else "NOT equivalent")
            if b.rolled_back:
                verdict += "; rolled back " + "; ".join(b.rolled_back)
            rows.append(f"| {m.name} | {tool} | {_fmt_s(r.median_s)} | {_fmt_s(b.simplify_s)} | {_fmt_s(b.other_passes_s)} | "
                        f"{_fmt_s(b.outside_passes_s)} | {passes} | {verdict} |")
    if not rows:
        return []
    return ["", "## Where graphopt's time goes (s)", "",
            "`outside passes` is load, shape inference, FLOP counts, reference outputs, the final check and save.", "",
            "| model | run | total | simplify | other passes | outside passes | other passes, each | verification |",
            "|---|---|---:|---:|---:|---:|---|---|", *rows]


def _scaling_table(models: list[ModelResult], names: list[str]) -> list[str]:
    per_tool = {name: scaling(models, name) for name in [*names, *([WITHOUT_SIMPLIFY] if "graphopt" in names else [])]}
    sizes = sorted({n for s in per_tool.values() for n in s})
    if not sizes:
        return []
    lines = ["", "## Scaling on synthetic graphs (microseconds per node)", "",
             f"`{WITHOUT_SIMPLIFY}` is graphopt's run minus its simplify pass: how graphopt's own code scales.", "",
             "| tool | " + " | ".join(str(n) for n in sizes) + " | max/min (1k+) |", "|---|" + "---:|" * (len(sizes) + 1)]
    for name, values in per_tool.items():
        big = [v for n, v in values.items() if n >= 1000]
        spread = f"{max(big) / min(big):.2f}x" if len(big) >= 2 else ""
        lines.append(f"| {name} | " + " | ".join(f"{values[n]:.0f}" if n in values else "" for n in sizes) + f" | {spread} |")
    return lines


def plot_scaling(path: Path, models: list[ModelResult], names: list[str]) -> str | None:
    """Time vs node count, log-log. Returns why no plot was drawn, or None."""
    if not any(m.kind in ("zoo", "synthetic") for m in models):
        return "scaling.png not drawn: no zoo or synthetic model in this run"
    if importlib.util.find_spec("matplotlib") is None:
        return "scaling.png not drawn: matplotlib not installed (pip install .[bench])"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in names:
        points = sorted((m.stats.nodes, m.tools[name].median_s, m.kind) for m in models
                        if name in m.tools and m.tools[name].median_s)
        if not points:
            continue
        synthetic = [(n, t) for n, t, kind in points if kind == "synthetic"]
        line = ax.plot(*zip(*synthetic), marker="o", label=name)[0] if synthetic else None
        zoo = [(n, t) for n, t, kind in points if kind == "zoo"]
        if zoo:
            ax.scatter(*zip(*zoo), marker="x", color=line.get_color() if line else None, label=None if line else name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes in the input model")
    ax.set_ylabel("wall time, load + optimize + save (s)")
    ax.set_title("Optimizer time vs graph size (lines: synthetic graphs, x: zoo models)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# -- command line ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["zoo", "synthetic"], metavar="NAME",
                        help="zoo, typed, synthetic, a zoo or typed model name (se_block.ort-qdq) or synthetic-<N> "
                             "(e.g. synthetic-200, synthetic-5k); comma-separated or repeated [default: zoo synthetic]")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {', '.join(TOOLS)} [default: all]")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tool and model; the median is reported [default: 3]")
    parser.add_argument("--ort-runs", type=int, default=30, help="ORT runs per model for latency; 0 skips latency [default: 30]")
    parser.add_argument("--latency-max-nodes", type=int, default=DEFAULT_LATENCY_MAX_NODES,
                        help=f"skip latency for models with more nodes (ORT session creation is superlinear) "
                             f"[default: {DEFAULT_LATENCY_MAX_NODES}]")
    parser.add_argument("--max-seconds", type=float, default=200.0,
                        help="stop repeating once a tool has spent this long on a model, and skip a tool on a synthetic graph "
                             "when its smaller runs forecast more [default: 200]")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-cache" / "results",
                        help="where results.md/json and scaling.png go [default: bench-cache/results/, outside git]")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench-cache", help="where models are built and kept [default: bench-cache/]")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tools.split(",") if t and t not in TOOLS]
    if unknown:
        parser.error(f"unknown tool(s) {', '.join(unknown)}; valid: {', '.join(TOOLS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = [TOOLS[t] for t in args.tools.split(",") if t]

    def log(message: str) -> None:
        print(message, flush=True)

    models = resolve_models(args.models, args.cache)
    settings = Settings(args.repeats, args.ort_runs, args.latency_max_nodes, args.max_seconds)
    env = environment(settings)
    budget = Budget(args.max_seconds)
    missing = [t.name for t in tools if not t.installed()]
    notes = [f"{name}: not installed (pip install .[bench])" for name in missing]
    log(f"graphopt `all` = {', '.join(env.passes)}; tools: {', '.join(t.name for t in tools)}"
        + (f" ({', '.join(missing)} not installed)" if missing else ""))
    started = time.perf_counter()
    warm_up(tools, args.cache)
    results = []
    for i, model in enumerate(models, 1):
        log(f"[{i}/{len(models)}] {model.name} ({model.path})")
        results.append(bench_model(model, tools, settings, budget, log))
    env.wall_s, env.load_after = time.perf_counter() - started, os.getloadavg()[0]
    # Targets are about zoo and synthetic graphs: the typed corpus is judged by what each tool keeps of its precision.
    targets = evaluate_targets([m for m in results if m.kind != "typed"])
    args.out.mkdir(parents=True, exist_ok=True)
    if (why := plot_scaling(args.out / "scaling.png", results, [t.name for t in tools])) is not None:
        notes.append(why)
    notes += sorted({m.latency.note for m in results if m.latency.note})
    notes += [f"{m.name}: {name} {r.status}" for m in results for name, r in m.tools.items() if r.status not in ("ok", NOT_INSTALLED)]
    write_json(args.out / "results.json", env, results, targets)
    (args.out / "results.md").write_text(markdown(env, results, targets, tools, notes))
    written = ["results.md", "results.json"] + (["scaling.png"] if (args.out / "scaling.png").exists() else [])
    log(f"done in {env.wall_s:.0f} s; wrote {', '.join(str(args.out / w) for w in written)}")
    for t in targets:
        log(f"  {'n/a' if t.met is None else 'met' if t.met else 'MISSED'}: {t.name} ({t.detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
