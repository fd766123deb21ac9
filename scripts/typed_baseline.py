#!/usr/bin/env python
"""What graphopt does to the typed corpus (tests/fixtures/typed): per model, per pass alone and `all`.

Runs in the project venv::

    python scripts/typed_baseline.py --out typed-baseline.md [--only regnet_y_400mf] [--json raw.json]

For every fixture it reports, per pass run alone (with the pipeline's canonicalization) and for
`all`: the sites rewritten, the declines by reason, whether verification passed; and a census of
the model before and after: quantized convs whose output channels are not a multiple of 16 (8 for
FP16 forms), Gemm/MatMul with constant (quantized) weights, sibling convs reading one input.

For the INT8 forms it also measures what graphopt's verification can see (issue 15, item 3):
- a wrong quantized rewrite: one output channel's DequantizeLinear scale x1.05 (first, middle and
  last channel of up to SCALE_PROBES convs); how many the default verification flags;
- how much the verification input reaches the output (two seeded inputs compared), and how far
  outputs move when the input moves by a relative 1e-6 (what an exact rewrite's float reordering
  does to the tensors in front of a QuantizeLinear).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_graphsurgeon as gs  # noqa: E402

import graphopt  # noqa: E402
from graphopt.graphs import weight  # noqa: E402
from graphopt.registry import default_order  # noqa: E402
from graphopt.verify import Verifier, default_tolerance, make_feed, run_onnxruntime  # noqa: E402
from tests.fixtures.zoo import load_typed_model, typed_names  # noqa: E402

CANONICALIZER = "simplify"
SCALE_PROBES = 12
SCALE_ERROR = 1.05
INPUT_NUDGE = 1e-6


@dataclass
class Census:
    """What the passes could change, counted on one model."""

    convs: int = 0
    quantized_convs: int = 0
    dense_unaligned: int = 0  # group-1 convs whose output channels are not a multiple of `align`
    dense_unaligned_quantized: int = 0
    align: int = 16
    dense_not8_quantized: int = 0  # of the quantized ones, not a multiple of 8 either (pad-channels' fp16 default)
    linears: int = 0  # Gemm/MatMul with a constant weight
    quantized_linears: int = 0
    sibling_groups: int = 0  # >= 2 convs reading one activation (through its Q/DQ)
    quantized_sibling_groups: int = 0


@dataclass
class Run:
    spec: str
    seconds: float
    equivalent: bool
    final_rel_err: float | None
    status: dict[str, str] = field(default_factory=dict)
    applied: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    rolled_back: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    after: Census | None = None


@dataclass
class Probe:
    """What the default verification input can see on one model."""

    input_dependence: float = 0.0  # max |y(feed seed 0) - y(feed seed 1)| / max |y|
    nudge_rel_err: float = 0.0  # max |y(x (1 + INPUT_NUDGE)) - y(x)| / max |y|
    convs_probed: int = 0
    flagged: int = 0
    rel_errs: list[float] = field(default_factory=list)


@dataclass
class ModelBaseline:
    name: str
    nodes: int
    rtol: float
    before: Census
    runs: list[Run]
    probe: Probe


def activation_source(tensor: gs.Tensor) -> str:
    """The activation a conv reads, looking back through its DequantizeLinear <- QuantizeLinear."""
    for op in ("DequantizeLinear", "QuantizeLinear"):
        if len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
            tensor = tensor.inputs[0].inputs[0]
    return tensor.name


def census(model: onnx.ModelProto, align: int) -> Census:
    graph = gs.import_onnx(model)
    found = Census(align=align)
    siblings: dict[str, list[bool]] = defaultdict(list)
    for node in graph.nodes:
        w = weight(node.inputs[1]) if node.op in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1 else None
        if node.op == "Conv":
            found.convs += 1
            quantized = w is not None and w.quantized
            found.quantized_convs += quantized
            if w is not None and node.attrs.get("group", 1) == 1 and w.shape[0] % align:
                found.dense_unaligned += 1
                found.dense_unaligned_quantized += quantized
                found.dense_not8_quantized += quantized and w.shape[0] % 8 != 0
            siblings[activation_source(node.inputs[0])].append(quantized)
        elif node.op in ("Gemm", "MatMul") and w is not None:
            found.linears += 1
            found.quantized_linears += w.quantized
    for members in siblings.values():
        if len(members) >= 2:
            found.sibling_groups += 1
            found.quantized_sibling_groups += all(members)
    return found


def run_spec(model: onnx.ModelProto, spec: str, align: int) -> Run:
    start = time.perf_counter()
    out, report = graphopt.optimize(model, spec)
    run = Run(spec, time.perf_counter() - start, report.equivalent, report.final.max_rel_err if report.final else None)
    for record in report.passes:
        if record.canonicalization:
            continue
        run.status[record.name] = record.status
        run.applied[record.name] = len(record.sites_applied)
        run.skipped[record.name] = dict(record.skipped)
        run.counters[record.name] = {k: v for k, v in record.counters.items() if v}
        run.rolled_back[record.name] = [f"{r.site}: {r.reason}" for r in record.rolled_back]
        if record.error:
            run.errors[record.name] = record.error
    for record in report.passes:
        if record.canonicalization and record.error:
            run.errors[f"simplify after {record.after}"] = record.error
    run.after = census(out, align)
    return run


def probe_verification(model: onnx.ModelProto, quantized: bool) -> Probe:
    """How much the default verification input exercises `model`; for INT8 forms, whether it flags
    one output channel's scale x SCALE_ERROR in each of up to SCALE_PROBES quantized convs."""
    verifier = Verifier(model)
    references = verifier.reference_of_input(model)  # one per input set; the first is the [-1, 1] set
    reference = references[0]
    probe = Probe(
        input_dependence=relative_change(reference, run_onnxruntime(model, make_feed(model, {}, seed=1))),
        nudge_rel_err=relative_change(reference, run_onnxruntime(model, {
            k: (v * (1 + INPUT_NUDGE)).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in verifier.feed.items()})),
    )
    if not quantized:
        return probe
    graph = gs.import_onnx(model)
    convs = [n for n in graph.nodes if n.op == "Conv" and (w := weight(n.inputs[1])) is not None and w.quantized]
    # Up to SCALE_PROBES convs spread over the graph; in each, its first, middle and last output channel.
    picked = [convs[i] for i in np.linspace(0, len(convs) - 1, min(SCALE_PROBES, len(convs))).round().astype(int)] if convs else []
    probe.convs_probed = len(picked)
    for conv in picked:
        channels = weight(conv.inputs[1]).quantization.scale.size
        for channel in sorted({0, channels // 2, channels - 1}):
            verdict, _ = verifier.check(references, wrong_channel_scale(model, conv.name, channel), model)
            probe.flagged += not verdict.passed
            probe.rel_errs.append(verdict.max_rel_err)
    return probe


def relative_change(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(other[k].astype(np.float64) - reference[k]).max() / max(np.abs(reference[k]).max(), 1e-30))
               for k in reference)


def wrong_channel_scale(model: onnx.ModelProto, conv_name: str, channel: int) -> onnx.ModelProto:
    """`model` with one output channel of `conv_name`'s weight dequantized with its scale x SCALE_ERROR
    (the whole weight, for a per-tensor scale)."""
    graph = gs.import_onnx(model)
    [conv] = [n for n in graph.nodes if n.name == conv_name]
    dequantize = weight(conv.inputs[1]).quantization.dequantize
    scale = np.array(dequantize.inputs[1].values, copy=True)
    flat = scale.reshape(-1)
    flat[channel] = flat[channel] * SCALE_ERROR
    dequantize.inputs[1] = gs.Constant(f"{dequantize.inputs[1].name}_probe", scale)  # the QuantizeLinear keeps its own
    return gs.export_onnx(graph)


def baseline(name: str, specs: list[str]) -> ModelBaseline:
    model = load_typed_model(name)
    align = 8 if "fp16" in name else 16
    canonical = graphopt.Pipeline([], verify=False).run(model)[0]
    quantized = "int8" in name or "qdq" in name
    return ModelBaseline(
        name, len(model.graph.node), default_tolerance(canonical).rtol, census(canonical, align), [run_spec(model, spec, align) for spec in specs],
        probe_verification(canonical, quantized),
    )


# --------------------------------------------------------------------------- report
def reasons(skipped: dict[str, int]) -> str:
    return "; ".join(f"{reason} x{count}" for reason, count in sorted(skipped.items(), key=lambda kv: -kv[1])) or "-"


def markdown(results: list[ModelBaseline], passes: list[str]) -> str:
    lines = ["## Census before (canonical input) and after `all`", "",
             "Unaligned: group-1 convs whose output channels are not a multiple of 16 (INT8 forms) or 8 (FP16 forms); "
             "(q) = of them quantized; q not 8 = quantized ones not a multiple of 8 either (what pad-channels' default "
             "precision=fp16 aligns to). Linears: Gemm/MatMul with a constant weight. Siblings: groups of >= 2 convs "
             "reading one activation (looking through its Q/DQ). `all` is run with its defaults.", "",
             "| model | nodes | convs (q) | unaligned (q) before -> after all | q not 8 before -> after all | linears (q) before -> after all "
             "| sibling groups (q) before -> after all | all: equivalent | all: final rel err | all: s |",
             "|---|---:|---:|---|---|---|---|---|---:|---:|"]
    for r in results:
        b, all_run = r.before, r.runs[-1]
        a = all_run.after
        lines.append(
            f"| {r.name} | {r.nodes} | {b.convs} ({b.quantized_convs}) "
            f"| {b.dense_unaligned} ({b.dense_unaligned_quantized}) -> {a.dense_unaligned} ({a.dense_unaligned_quantized}) "
            f"| {b.dense_not8_quantized} -> {a.dense_not8_quantized} "
            f"| {b.linears} ({b.quantized_linears}) -> {a.linears} ({a.quantized_linears}) "
            f"| {b.sibling_groups} ({b.quantized_sibling_groups}) -> {a.sibling_groups} ({a.quantized_sibling_groups}) "
            f"| {'yes' if all_run.equivalent else 'NO'} | {all_run.final_rel_err:.2g} | {all_run.seconds:.1f} |")
    for graph_pass in passes:
        lines += ["", f"## {graph_pass}", "",
                  "| model | alone: rewritten | alone: verified | in all: rewritten | after alone: unaligned (q) / linears (q) / siblings (q) "
                  "| declines (alone) | counters (alone) | rolled back / errors |",
                  "|---|---:|---|---:|---|---|---|---|"]
        for r in results:
            alone = next(run for run in r.runs if run.spec == graph_pass)
            in_all = r.runs[-1]
            trouble = "; ".join([*alone.rolled_back.get(graph_pass, []), *alone.errors.values()]) or "-"
            counters = ", ".join(f"{k}={v}" for k, v in alone.counters.get(graph_pass, {}).items()) or "-"
            a = alone.after
            lines.append(f"| {r.name} | {alone.applied.get(graph_pass, 0)} | {'yes' if alone.equivalent else 'NO'} "
                         f"| {in_all.applied.get(graph_pass, 0)} | {a.dense_unaligned} ({a.dense_unaligned_quantized}) / "
                         f"{a.linears} ({a.quantized_linears}) / {a.sibling_groups} ({a.quantized_sibling_groups}) "
                         f"| {reasons(alone.skipped.get(graph_pass, {}))} | {counters} | {trouble} |")
    lines += ["", "## What the default verification input sees", "",
              "Input dependence: max |y(seed 0 input) - y(seed 1 input)| / max |y| (graphopt's verification feeds, "
              f"uniform [-1, 1]). Nudge: the same when the input is scaled by 1 + {INPUT_NUDGE:g}, what an exact rewrite's "
              "float reordering does to tensors in front of a QuantizeLinear. Wrong rewrite (INT8 forms): one output channel "
              f"of one quantized conv's DequantizeLinear scale x{SCALE_ERROR} (its QuantizeLinear unchanged): the first, "
              f"middle and last channel of up to {SCALE_PROBES} convs spread over the graph, each judged by the default "
              "verification (one seeded sample, the model's default tolerance).", "",
              "| model | tolerance (rtol) | input dependence | nudge | convs probed | wrong scales flagged / tried | rel err of the probes (min / median / max) |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        p = r.probe
        errs = np.array(p.rel_errs) if p.rel_errs else None
        spread = f"{errs.min():.2g} / {np.median(errs):.2g} / {errs.max():.2g}" if errs is not None else "-"
        probed = (str(p.convs_probed), f"{p.flagged} / {len(p.rel_errs)}") if p.convs_probed else ("-", "-")
        lines.append(f"| {r.name} | {r.rtol:g} | {p.input_dependence:.2g} | {p.nudge_rel_err:.2g} | {probed[0]} | {probed[1]} | {spread} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the Markdown tables here (default: stdout)")
    parser.add_argument("--json", type=Path, help="also write every number as JSON")
    parser.add_argument("--only", action="append", metavar="MODEL", help="only fixtures of this source model (repeatable)")
    args = parser.parse_args(argv)
    passes = [p for p in default_order() if p != CANONICALIZER]
    names = [n for n in typed_names() if not args.only or n.split(".")[0] in args.only]
    results = []
    for name in names:
        start = time.perf_counter()
        results.append(baseline(name, [*passes, "all"]))
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    text = markdown(results, passes)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
