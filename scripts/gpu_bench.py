#!/usr/bin/env python
"""GPU evidence for graphopt's passes: does each pass's output run faster than its input on cuDNN?

Issue 9. TensorRT cannot be installed here, so this measures the same effect on cuDNN kernels:
each ONNX variant runs through `onnx_torch` (a small interpreter calling torch ops) in FP16,
channels_last, with cudnn.benchmark on, captured as a CUDA graph and timed with CUDA events over
graph replays. These are cuDNN/PyTorch numbers, never TensorRT ones.

Subcommands, in the order they run:

  export-extra  (torch + timm)  write weight-stripped skeletons of ShuffleNetV2 and ReXNet, two
                real architectures with unaligned channel counts, to .gpu/extra/
  prepare       (graphopt; no torch)  build every model, run graphopt once per variant, write the
                .onnx files and manifest.json (pass reports, fingerprints)
  bench         (torch + onnxruntime)  check every variant's outputs against the original model
                (GPU FP16 and ORT FP32 on the CPU), then time them interleaved, round by round
  report        (matplotlib)  write the tables into docs/gpu-results.md and the plot

On the device machine (no registry there) graphopt and its dependencies come as wheels, and
`prepare` runs there with verify off, so that no large model travels. The same `prepare` run
here, with graphopt's ONNX Runtime check on, is the equivalence proof. Every variant carries a
fingerprint of its nodes and weights, and `prepare --expect` (or `compare_manifests` afterwards)
checks the device's graphs against the verified ones. docs/gpu-results.md has the exact device
call.

    python scripts/gpu_bench.py prepare --out .gpu/models                  # here, verified
    python scripts/gpu_bench.py bench --models-dir .gpu/models --device cpu --quick --out /tmp/r.json
    python scripts/gpu_bench.py report --results docs/gpu-results.json --md docs/gpu-results.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
EXTRA_DIR = ROOT / ".gpu" / "extra"

# Variant name -> graphopt pipeline spec. `base` is what every other variant is compared with:
# simplified, so that the only difference left is the pass being measured.
NO_CAP = "max-overhead=100"  # no FLOP cap: what pad-channels' default 0.5 keeps out
VARIANTS: dict[str, str] = {
    "base": "simplify",
    "pad8": "simplify,pad-channels(align=8)",
    "pad16": "simplify,pad-channels(align=16)",
    "pad32": "simplify,pad-channels(align=32)",
    "pad8-nocap": f"simplify,pad-channels(align=8,{NO_CAP})",
    "pad16-nocap": f"simplify,pad-channels(align=16,{NO_CAP})",
    "pad32-nocap": f"simplify,pad-channels(align=32,{NO_CAP})",
    "pad8-stem": f"simplify,pad-channels(align=8,{NO_CAP},pad-first-layer=true)",
    "merge": "simplify,merge-convs",
    "merge+pad8": "simplify,merge-convs,pad-channels(align=8)",
    "fc-to-conv": "simplify,fc-to-conv",
    "reduce-to-pool": "simplify,reduce-to-pool",
    "all": "all",
}
# A second, independent capture of `base`, timed like a variant: its "speed-up" is the noise.
REPEAT = "base-again"

PAD = ("pad8", "pad16", "pad32", "pad8-nocap", "pad16-nocap", "pad32-nocap")
REAL = ("base", *PAD, "pad8-stem", "merge", "merge+pad8", "fc-to-conv", "reduce-to-pool", "all")
SYNTHETIC = ("base", *PAD)


@dataclass(frozen=True)
class BenchModel:
    name: str
    source: str  # zoo:<name> | extra:<name> | chain:<channels>:<size>:<kernel>[:<in_channels>:<depth>]
    variants: tuple[str, ...]
    group: str  # "synthetic" or "real"
    about: str = ""


def _chain(channels: int, size: int, kernel: int, about: str, in_channels: int = 16, depth: int = 4,
           variants: tuple[str, ...] = SYNTHETIC) -> BenchModel:
    name = f"chain-{kernel}x{kernel}-c{channels}-{size}" + (f"-in{in_channels}" if in_channels != 16 else "")
    return BenchModel(name, f"chain:{channels}:{size}:{kernel}:{in_channels}:{depth}", variants, "synthetic", about)


MODELS: list[BenchModel] = [
    # Synthetic chains: input 16 ch -> depth x [conv k x k to C, Relu] -> conv 1x1 back to 16.
    _chain(17, 28, 3, "unaligned, as in the per-layer probe (17 -> 24: +41% FLOPs a conv edge)"),
    _chain(30, 28, 3, "unaligned (30 -> 32)"),
    _chain(100, 14, 3, "unaligned (100 -> 104)"),
    _chain(116, 28, 1, "unaligned 1x1, ShuffleNetV2's width (116 -> 120)"),
    _chain(100, 14, 1, "unaligned 1x1 (100 -> 104)"),
    _chain(4, 56, 3, "tiny width (4 -> 8: +100% a conv edge, over the default cap)"),
    _chain(12, 56, 3, "12 -> 16 (+33%)"),
    _chain(20, 56, 3, "20 -> 24 (+20%)"),
    _chain(36, 28, 3, "36 -> 40 (+11%)"),
    _chain(6, 56, 3, "6 -> 8 (+33%)"),
    _chain(10, 56, 3, "10 -> 16 (+60%, over the default cap)"),
    _chain(9, 28, 3, "9 -> 16 (+78%, over the default cap)"),
    _chain(24, 56, 3, "aligned to 8 (control: pad8 has nothing to do; 16/32 pad 24 -> 32)"),
    _chain(40, 56, 3, "aligned to 8 (control: 16 pads to 48, 32 to 64)"),
    _chain(24, 112, 3, "RGB stem: 3 input channels, then 24", in_channels=3, depth=2,
           variants=("base", "pad8-stem")),
    # Real architectures (weight-stripped skeletons, refilled with seeded random weights).
    BenchModel("squeezenet1_0", "zoo:squeezenet1_0", REAL, "real", "fire modules: 1x1 + 3x3 siblings"),
    BenchModel("googlenet", "zoo:googlenet", REAL, "real", "inception blocks: parallel 1x1 convs"),
    BenchModel("inception_v3", "zoo:inception_v3", REAL, "real", "inception blocks, 299x299"),
    BenchModel("det_head", "zoo:det_head", REAL, "real", "detection head: 80 + 4 + 1 parallel 1x1 convs, 160x160"),
    BenchModel("mobilenet_v2", "zoo:mobilenet_v2", REAL, "real", "inverted residuals, all widths multiples of 8"),
    BenchModel("resnet50", "zoo:resnet50", REAL, "real", "bottlenecks, all widths multiples of 64"),
    BenchModel("efficientnet_b0", "zoo:efficientnet_b0", REAL, "real", "SE blocks with unaligned squeeze widths"),
    BenchModel("fc_head_classifier", "zoo:fc_head_classifier", REAL, "real", "small CNN + Flatten -> Gemm -> Gemm head, 32x32"),
    BenchModel("se_block", "zoo:se_block", REAL, "real", "squeeze-excite: ReduceMean -> 1x1 -> 1x1 -> Sigmoid -> Mul, 32 ch 28x28"),
    BenchModel("shufflenet_v2_x1_0", "extra:shufflenet_v2_x1_0", REAL, "real", "ShuffleNetV2: widths 116/232/464, channel shuffles"),
    BenchModel("rexnet_100", "extra:rexnet_100", REAL, "real", "ReXNet: widths 16, 27, 38, 50, 61, ... 185 (almost none aligned)"),
]
MODELS_BY_NAME = {m.name: m for m in MODELS}


# ------------------------------------------------------------------------------------- models


def load_source(source: str) -> onnx.ModelProto:
    """The original (un-optimized) ONNX model named by a BenchModel source."""
    sys.path.append(str(ROOT))  # tests/fixtures travels with the working tree
    from tests.fixtures.zoo import load_zoo_model, refill_external

    kind, _, arg = source.partition(":")
    if kind == "zoo":
        return load_zoo_model(arg)
    if kind == "extra":
        path = EXTRA_DIR / f"{arg}.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run `scripts/gpu_bench.py export-extra` with the torch venv first")
        model = onnx.load(str(path), load_external_data=False)
        refill_external(model, seed=0)
        return model
    if kind == "chain":
        channels, size, kernel, in_channels, depth = (int(v) for v in arg.split(":"))
        return chain_model(channels, size, kernel, in_channels, depth)
    raise ValueError(f"unknown model source {source!r}; expected zoo:, extra: or chain:")


def chain_model(channels: int, size: int, kernel: int, in_channels: int = 16, depth: int = 4, out_channels: int = 16) -> onnx.ModelProto:
    """input [batch, in, size, size] -> depth x (Conv k x k to `channels`, Relu) -> Conv 1x1 to `out`.

    The unaligned tensors are read only by convs, so padding them costs no Slice: the chain
    measures the convolutions themselves, as they sit inside a network.
    """
    sys.path.append(str(ROOT))
    from tests.fixtures.builders import make_model, node

    rng = np.random.default_rng([channels, size, kernel, in_channels, depth])
    widths = [in_channels] + [channels] * depth + [out_channels]
    nodes, inits, x = [], {}, "input"
    for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
        k = kernel if i < depth else 1
        inits[f"w{i}"] = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        inits[f"b{i}"] = (rng.standard_normal(cout) * 0.01).astype(np.float32)
        out = "output" if i == depth else f"conv{i}"
        nodes.append(node("Conv", [x, f"w{i}", f"b{i}"], [out], name=f"conv{i}", kernel_shape=[k, k], pads=[k // 2] * 4))
        if i < depth:
            nodes.append(node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
    return make_model(nodes, {"input": ["batch", in_channels, size, size]}, ["output"], inits)


def input_spec(model: onnx.ModelProto) -> tuple[str, list[int | str]]:
    inits = {t.name for t in model.graph.initializer}
    (graph_input,) = [i for i in model.graph.input if i.name not in inits]
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "batch") for d in graph_input.type.tensor_type.shape.dim]
    return graph_input.name, dims


def fingerprint(model: onnx.ModelProto) -> str:
    """Hash of the nodes and weights (not the inferred value_info, which onnx versions word differently)."""
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.value_info[:]
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()[:16]


# ------------------------------------------------------------------------------------ prepare


@dataclass
class PassSummary:
    name: str
    status: str
    sites_found: int
    sites_applied: int
    rolled_back: int
    skipped: dict[str, int]
    counters: dict[str, int]
    error: str | None


@dataclass
class VariantInfo:
    spec: str
    status: str  # timed | unchanged (same graph as base) | same-as:<variant> | failed: <why>
    file: str | None = None
    fingerprint: str | None = None
    nodes: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    flops: int = 0
    passes: list[PassSummary] = field(default_factory=list)
    verified: bool | None = None  # graphopt's own ORT equivalence check (prepare --verify)
    max_rel_err: float | None = None
    seconds: float = 0.0


def prepare_variant(model: BenchModel, variant: str, out_dir: Path, verify: bool) -> VariantInfo:
    """Run graphopt's pipeline for one variant and save the result (and the original, for base)."""
    import graphopt

    spec = VARIANTS[variant]
    start = time.perf_counter()
    try:
        original = load_source(model.source)
        optimized, report = graphopt.optimize(original, spec, verify=verify)
    except Exception as err:  # a pass not yet registered, a bad spec: record it, measure the rest
        return VariantInfo(spec, f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    folder = out_dir / model.name
    folder.mkdir(parents=True, exist_ok=True)
    if variant == "base":
        onnx.save(original, str(folder / "original.onnx"))
    path = folder / f"{variant}.onnx"
    onnx.save(optimized, str(path))
    passes = [PassSummary(p.name, p.status, p.sites_found, len(p.sites_applied), len(p.rolled_back), dict(p.skipped),
                          dict(p.counters), p.error) for p in report.passes]
    return VariantInfo(
        spec, "timed", str(path.relative_to(out_dir)), fingerprint(optimized), len(optimized.graph.node),
        dict(Counter(n.op_type for n in optimized.graph.node)), report.flops_after, passes,
        report.equivalent if verify else None, report.final.max_rel_err if report.final else None,
        time.perf_counter() - start,
    )


def mark_duplicates(variants: dict[str, VariantInfo], out_dir: Path) -> None:
    """A variant whose graph equals base's (or an earlier variant's) is not timed twice."""
    seen: dict[str, str] = {}
    for name, info in variants.items():
        if info.fingerprint is None:
            continue
        if info.fingerprint in seen:
            info.status = "unchanged" if seen[info.fingerprint] == "base" else f"same-as:{seen[info.fingerprint]}"
            if info.file:
                (out_dir / info.file).unlink(missing_ok=True)
                info.file = None
        else:
            seen[info.fingerprint] = name


def cmd_prepare(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = select_models(args.models)
    jobs = [(m, v) for m in models for v in m.variants]
    start = time.perf_counter()
    print(f"prepare: {len(models)} models, {len(jobs)} variants, verify={args.verify}, {args.jobs} processes", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {(m.name, v): pool.submit(prepare_variant, m, v, out_dir, args.verify) for m, v in jobs}
        manifest: dict[str, Any] = {"verify": args.verify, "models": {}}
        for m in models:
            variants = {v: futures[(m.name, v)].result() for v in m.variants}
            mark_duplicates(variants, out_dir)
            input_name, shape = input_spec(onnx.load(str(out_dir / m.name / "original.onnx"), load_external_data=False)) \
                if variants["base"].status == "timed" else (None, None)
            manifest["models"][m.name] = {"source": m.source, "group": m.group, "about": m.about, "input": input_name,
                                          "shape": shape, "variants": {v: asdict(i) for v, i in variants.items()}}
            print(f"  {m.name:24s} " + " ".join(f"{v}={_short(i.status)}" for v, i in variants.items()), flush=True)
    manifest["seconds"] = time.perf_counter() - start
    manifest["graphopt_source"] = graphopt_source_hash()
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"prepare: done in {manifest['seconds']:.0f} s -> {out_dir / 'manifest.json'}")
    if args.expect:
        mismatches = compare_manifests(json.loads(Path(args.expect).read_text()), manifest)
        (out_dir / "manifest-mismatches.json").write_text(json.dumps(mismatches, indent=1))
        print(f"prepare: {len(mismatches)} variants differ from {args.expect}" + "".join(f"\n  {m}" for m in mismatches))
    failed = [f"{m}/{v}: {i['status']}" for m, d in manifest["models"].items() for v, i in d["variants"].items() if i["status"].startswith("failed")]
    for line in failed:
        print(f"  FAILED {line}")
    return 0


def graphopt_source_hash() -> str:
    """Which graphopt code made the graphs: a hash of the installed package's .py files."""
    import graphopt
    import graphopt.passes

    package, passes = Path(graphopt.__file__).parent, Path(graphopt.passes.__file__).parent
    digest = hashlib.sha256()
    for folder in (package, passes):
        for path in sorted(folder.glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _short(status: str) -> str:
    return status if not status.startswith("failed") else "FAILED"


def compare_manifests(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Variants whose graph differs from the one the verified run produced (by fingerprint)."""
    out = []
    for model, data in actual["models"].items():
        for variant, info in data["variants"].items():
            want = expected.get("models", {}).get(model, {}).get("variants", {}).get(variant)
            if want is None:
                out.append(f"{model}/{variant}: not in the expected manifest")
            elif (want["fingerprint"], want["status"]) != (info["fingerprint"], info["status"]):
                out.append(f"{model}/{variant}: expected {want['status']} {want['fingerprint']}, got {info['status']} {info['fingerprint']}")
    return out


def select_models(names: str | None) -> list[BenchModel]:
    if not names:
        return list(MODELS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in MODELS_BY_NAME and n not in ("synthetic", "real")]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; valid: synthetic, real, {', '.join(MODELS_BY_NAME)}")
    return [m for m in MODELS if m.name in wanted or m.group in wanted]


# -------------------------------------------------------------------------------------- bench


@dataclass
class Check:
    """Output agreement, as ||a - b|| / ||b|| over all outputs, and the max abs difference."""

    rel: float
    max_abs: float

    @staticmethod
    def of(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> Check:
        num = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for o, r in zip(outputs, reference))
        den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
        worst = max(float(np.max(np.abs(o.astype(np.float64) - r))) for o, r in zip(outputs, reference))
        return Check(float(np.sqrt(num / den)) if den else float(np.sqrt(num)), worst)


@dataclass
class Timing:
    model: str
    batch: int
    variant: str
    median_us: float
    p25_us: float
    p75_us: float
    iters: int
    rounds: int
    speedup: float | None = None  # base median / this median
    vs_base: Check | None = None  # this variant on the device vs base on the device
    vs_ort: Check | None = None  # this variant on the device vs the ORIGINAL model in ORT fp32 (CPU)


@dataclass
class BenchConfig:
    device: str
    dtype: str
    channels_last: bool
    batches: tuple[int, ...]
    rounds: int
    target_ms: float
    quick: bool
    global_pool: str  # how onnx_torch runs GlobalAveragePool: "pool" (pooling kernel) or "mean" (reduction)


def environment(device: str) -> dict[str, Any]:
    import onnxruntime
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu,pstate"
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                                                text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"unavailable: {err}"
    return info


class Measurer:
    """Times callables: CUDA graph replays with CUDA events on a GPU, eager calls on the CPU."""

    def __init__(self, config: BenchConfig) -> None:
        import torch

        self.torch = torch
        self.config = config
        self.cuda = config.device == "cuda"

    def capture(self, runner: Any, x: Any) -> tuple[Any, list[Any]]:
        """(something to replay, its output tensors). Warm-up runs first: cudnn.benchmark picks its
        algorithms there, and a graph may only be captured once every allocation and choice is made."""
        torch = self.torch
        if not self.cuda:
            return (lambda: runner(x)), runner(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                runner(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = runner(x)
        graph.replay()
        torch.cuda.synchronize()
        return graph.replay, outputs

    def warm_up(self, seconds: float = 3.0) -> None:
        """Keep the GPU busy for a few seconds first, so the first model is not timed on idle clocks."""
        if not self.cuda:
            return
        torch = self.torch
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()

    def block(self, replay: Any, iters: int) -> float:
        """Microseconds per call over `iters` back-to-back calls."""
        torch = self.torch
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(iters):
                replay()
            return (time.perf_counter() - start) * 1e6 / iters
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            replay()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) * 1e3 / iters

    def interleaved(self, replays: dict[str, Any]) -> dict[str, tuple[list[float], int]]:
        """Per variant: one sample per round, variants in rotating order (drift hits all alike)."""
        iters = {}
        for name, replay in replays.items():
            replay()
            estimate = self.block(replay, 3)
            iters[name] = max(1 if self.config.quick else 3, min(2000, int(self.config.target_ms * 1e3 / max(estimate, 1e-3))))
        samples: dict[str, list[float]] = {name: [] for name in replays}
        names = list(replays)
        for r in range(self.config.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                replays[name]()  # one untimed call: this variant's weights back in L2, like its rivals'
                samples[name].append(self.block(replays[name], iters[name]))
        return {name: (samples[name], iters[name]) for name in names}


def ort_reference(path: Path, input_name: str, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: x})


def bench_model(name: str, data: dict[str, Any], models_dir: Path, config: BenchConfig, measurer: Measurer) -> list[Timing]:
    import torch

    from onnx_torch import OnnxTorch

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[config.dtype]
    variants = [v for v, info in data["variants"].items() if info["status"] == "timed"]
    if "base" not in variants:
        print(f"  {name}: base failed, skipped ({data['variants']['base']['status']})", flush=True)
        return []

    def load_runner(variant: str) -> OnnxTorch:
        model = onnx.load(str(models_dir / data["variants"][variant]["file"]))
        return OnnxTorch(model, config.device, dtype, config.channels_last, config.global_pool)

    runners = {v: load_runner(v) for v in variants}
    runners[REPEAT] = load_runner("base")
    results: list[Timing] = []
    for batch in config.batches:
        shape = [batch if not isinstance(d, int) or i == 0 else d for i, d in enumerate(data["shape"])]
        x_host = np.random.default_rng(batch).standard_normal(shape).astype(np.float32)
        x = torch.from_numpy(x_host).to(config.device, dtype)
        if config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        reference = ort_reference(models_dir / name / "original.onnx", data["input"], x_host) if batch == min(config.batches) else None
        replays, outputs = {}, {}
        for v, runner in runners.items():
            replays[v], outputs[v] = measurer.capture(runner, x)
        host_outputs = {v: [o.float().cpu().numpy() for o in outs] for v, outs in outputs.items()}
        samples = measurer.interleaved(replays)
        base_median = statistics.median(samples["base"][0])
        for v, (times, iters) in samples.items():
            q = np.percentile(times, [25, 50, 75])
            results.append(Timing(
                name, batch, v, float(q[1]), float(q[0]), float(q[2]), iters, len(times), base_median / float(q[1]),
                Check.of(host_outputs[v], host_outputs["base"]), Check.of(host_outputs[v], reference) if reference else None,
            ))
        del replays, outputs
        if measurer.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        row = " ".join(f"{t.variant}={t.speedup:.2f}x" for t in results if t.batch == batch and t.variant != "base")
        base = next(t for t in results if t.batch == batch and t.variant == "base")
        err = max((t.vs_ort.rel for t in results if t.batch == batch and t.vs_ort), default=float("nan"))
        print(f"  {name:24s} b{batch:<3d} base {base.median_us:9.1f} us  {row}  (worst rel err vs ORT {err:.1e})", flush=True)
    return results


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    models_dir = Path(args.models_dir)
    manifest = json.loads((models_dir / "manifest.json").read_text())
    config = BenchConfig(
        device=args.device, dtype=args.dtype or ("fp16" if args.device == "cuda" else "fp32"), channels_last=not args.no_channels_last,
        batches=tuple(int(b) for b in args.batches.split(",")), rounds=2 if args.quick else args.rounds,
        target_ms=1.0 if args.quick else args.target_ms, quick=args.quick, global_pool=args.global_pool,
    )
    if config.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench --device cuda: torch sees no CUDA device; use --device cpu to test the script")
        torch.backends.cudnn.benchmark = True
    mismatches = models_dir / "manifest-mismatches.json"
    out = {
        "environment": environment(config.device), "config": asdict(config), "manifest": manifest,
        "manifest_mismatches": json.loads(mismatches.read_text()) if mismatches.is_file() else None, "timings": [],
        "skipped_for_time": [], "failures": [],
    }
    measurer = Measurer(config)
    measurer.warm_up()
    start = time.perf_counter()
    names = [m.name for m in select_models(args.models) if m.name in manifest["models"]]
    print(f"bench: {len(names)} models on {out['environment'].get('gpu', config.device)}, {config}", flush=True)
    for name in names:
        if args.deadline_s and time.perf_counter() - start > args.deadline_s:
            out["skipped_for_time"].append(name)
            continue
        try:
            timings = bench_model(name, manifest["models"][name], models_dir, config, measurer)
        except Exception as err:  # one model that cannot run must not cost the rest of a device call
            traceback.print_exc()
            out["failures"].append(f"{name}: {type(err).__name__}: {err}")
            timings = []
            if measurer.cuda:
                torch.cuda.empty_cache()
        out["timings"].extend(asdict(t) for t in timings)
        out["seconds"] = time.perf_counter() - start
        Path(args.out).write_text(json.dumps(out, indent=1))  # after every model: a timeout keeps what ran
    if out["skipped_for_time"]:
        print(f"bench: deadline reached, not measured: {','.join(out['skipped_for_time'])}")
    for failure in out["failures"]:
        print(f"bench: FAILED {failure}")
    print(f"bench: done in {time.perf_counter() - start:.0f} s -> {args.out}")
    return 0


# ------------------------------------------------------------------------------------- report

TABLE_START, TABLE_END = "<!-- gpu_bench tables: start -->", "<!-- gpu_bench tables: end -->"
COLUMNS = ("pad8", "pad16", "pad32", "pad8-nocap", "pad16-nocap", "pad32-nocap", "pad8-stem", "merge", "merge+pad8", "fc-to-conv", "reduce-to-pool", "all", REPEAT)


def merge_results(paths: Iterable[str]) -> dict[str, Any]:
    """Several bench runs (one device call each) as one: the first run's environment, all timings."""
    merged: dict[str, Any] | None = None
    for path in paths:
        data = json.loads(Path(path).read_text())
        if merged is None:
            merged = data
            continue
        merged["timings"].extend(data["timings"])
        merged["manifest"]["models"].update(data["manifest"]["models"])
        merged["skipped_for_time"] = [m for m in merged["skipped_for_time"] if m not in data["manifest"]["models"]] + data["skipped_for_time"]
    if merged is None:
        raise SystemExit("report: give at least one --results file")
    return merged


def cell(t: dict[str, Any] | None, status: str) -> str:
    if t is not None:
        return f"{t['speedup']:.2f}x"
    if status == "unchanged":
        return "·"
    if status.startswith("same-as:"):
        return "=" + status.split(":", 1)[1]
    if status.startswith("failed"):
        return "failed"
    return ""


def tables(results: dict[str, Any], with_correctness: bool = True) -> str:
    models = results["manifest"]["models"]
    timings = {(t["model"], t["batch"], t["variant"]): t for t in results["timings"]}
    batches = sorted({t["batch"] for t in results["timings"]})
    lines = []
    for group, title in (("synthetic", "Synthetic conv chains"), ("real", "Real architectures")):
        names = [n for n, d in models.items() if d["group"] == group and any(k[0] == n for k in timings)]
        if not names:
            continue
        columns = [c for c in COLUMNS if any(c in models[n]["variants"] or c == REPEAT for n in names)]
        lines += [f"#### {title}", "", "| model | batch | base µs | " + " | ".join(columns) + " |",
                  "|---|---|---|" + "---|" * len(columns)]
        for name in names:
            for batch in batches:
                base = timings.get((name, batch, "base"))
                if base is None:
                    continue
                cells = [cell(timings.get((name, batch, c)), models[name]["variants"].get(c, {}).get("status", "") if c != REPEAT else "")
                         for c in columns]
                lines.append(f"| {name} | {batch} | {base['median_us']:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    if with_correctness:
        lines += correctness_table(results)
    return "\n".join(lines)


def agreement(results: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """How far two runs' speed-ups differ: what a reader should treat as noise."""
    def speedups(data: dict[str, Any]) -> dict[tuple[str, int, str], float]:
        return {(t["model"], t["batch"], t["variant"]): t["speedup"] for t in data["timings"] if t["variant"] != "base"}

    a, b = speedups(results), speedups(other)
    shared = sorted(set(a) & set(b))
    if not shared:
        return []
    diff = {k: abs(a[k] / b[k] - 1) for k in shared}
    ranked = sorted(shared, key=diff.get, reverse=True)
    flips = [k for k in shared if min(a[k], b[k]) < 0.97 and max(a[k], b[k]) > 1.03]
    q50, q95 = np.percentile(list(diff.values()), [50, 95])
    worst = ", ".join(f"{m} b{bt} {v} ({a[(m, bt, v)]:.2f}x vs {b[(m, bt, v)]:.2f}x)" for m, bt, v in ranked[:4])
    return [
        "#### Run-to-run agreement", "",
        f"{len(shared)} speed-ups were measured in both device calls (each on a freshly started machine). "
        f"They differ by {q50:.1%} at the median and {q95:.1%} at the 95th percentile; the largest differences: {worst}. "
        f"Speed-ups that fall on different sides of 1 (beyond 3%) in the two runs: "
        + (", ".join(f"{m} b{bt} {v}" for m, bt, v in flips) if flips else "none") + ".", "",
    ]


def correctness_table(results: dict[str, Any]) -> list[str]:
    rows = [t for t in results["timings"] if t["vs_ort"] is not None]
    if not rows:
        return []
    worst: dict[str, dict[str, float]] = {}
    for t in rows:
        w = worst.setdefault(t["model"], {"ort": 0.0, "base": 0.0, "base_ort": 0.0})
        w["ort"] = max(w["ort"], t["vs_ort"]["rel"])
        if t["variant"] == "base":
            w["base_ort"] = t["vs_ort"]["rel"]
        else:
            w["base"] = max(w["base"], t["vs_base"]["rel"])
    batch = min(t["batch"] for t in rows)
    lines = ["#### Output agreement (relative L2 error, ||out - ref|| / ||ref||)", "",
             f"At batch {batch}, every timed graph's output (the CUDA-graph replay that was timed) against the original "
             "model in ONNX Runtime FP32 on the CPU, and each variant against base on the same device.", "",
             "| model | base vs ORT fp32 | worst variant vs ORT fp32 | worst variant vs base (device) |", "|---|---|---|---|"]
    for model, w in worst.items():
        lines.append(f"| {model} | {w['base_ort']:.1e} | {w['ort']:.1e} | {w['base']:.1e} |")
    return lines + [""]


def plot(results: dict[str, Any], path: Path) -> None:
    """One row per model, one marker per variant (nudged apart vertically), speed-up on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    low, high = 0.4, 3.5
    models = results["manifest"]["models"]
    batches = sorted({t["batch"] for t in results["timings"]})
    timings = {(t["model"], t["batch"], t["variant"]): t for t in results["timings"]}
    names = [n for n in models if any(k[0] == n for k in timings)]
    shown = [c for c in COLUMNS if any(k[2] == c for k in timings)]
    markers = dict(zip(COLUMNS, "o^v<>DsP*XhdH"))
    palette = plt.get_cmap("tab20").colors
    colors = dict(zip(COLUMNS, palette[::2] + palette[1::2]))
    colors[REPEAT] = (0.45, 0.45, 0.45)
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 0.38 * len(names) + 1.8), sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for y, name in enumerate(names):
            if y % 2:
                ax.axhspan(y - 0.5, y + 0.5, color="0.95", zorder=0)
            for i, column in enumerate(shown):
                t = timings.get((name, batch, column))
                if t is None:
                    continue
                x = min(max(t["speedup"], low * 1.02), high / 1.02)  # off-scale points sit at the edge
                ax.scatter(x, y + (i - (len(shown) - 1) / 2) * 0.8 / len(shown), marker=markers[column], color=colors[column],
                           s=26 if column != REPEAT else 12, label=column, zorder=3, edgecolors="none")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        ticks = [0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"batch {batch}: speed-up over base (right of 1 = faster)", fontsize=10)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_ylim(len(names) - 0.5, -0.5)
    handles = dict(zip(*reversed([sum(x, []) for x in zip(*(ax.get_legend_handles_labels() for ax in axes[0]))])))
    order = [c for c in shown if c in handles]
    fig.legend([handles[c] for c in order], order, loc="lower center", ncol=min(len(order), 7), fontsize=8)
    env, config = results["environment"], results["config"]
    how = "CUDA graph replay" if config["device"] == "cuda" else "eager CPU (script test only)"
    fig.suptitle(f"graphopt passes under cuDNN/PyTorch, not TensorRT: {env.get('gpu', 'cpu')}, torch {env['torch']}, "
                 f"cuDNN {env['cudnn']}, {config['dtype']}, channels_last, {how}; median of {config['rounds']} rounds", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)


def slim(run: dict[str, Any]) -> dict[str, Any]:
    """A bench run without its manifest (the main run's manifest describes the same graphs)."""
    return {key: run[key] for key in ("environment", "config", "timings")}


def cmd_report(args: argparse.Namespace) -> int:
    results = merge_results(args.results)
    if args.repeat:
        results["repeat"] = slim(json.loads(Path(args.repeat).read_text()))
    for path in args.also or ():
        results.setdefault("also", []).append(slim(json.loads(Path(path).read_text())))
    text = tables(results)
    if results.get("repeat"):
        text += "\n" + "\n".join(agreement(results, results["repeat"]))
    for run in results.get("also", []):
        config = run["config"]
        text += (f"\n#### The same graphs with GlobalAveragePool run as a {'reduction' if config['global_pool'] == 'mean' else 'pooling kernel'}"
                 f" (bench --global-pool {config['global_pool']})\n\n")
        text += tables({**run, "manifest": results["manifest"]}, with_correctness=False)
    if args.json:
        Path(args.json).write_text(json.dumps(results, separators=(",", ":")))
    if args.plot:
        plot(results, Path(args.plot))
    doc = Path(args.md) if args.md else None
    if doc is not None and doc.is_file() and TABLE_START in doc.read_text():
        before, rest = doc.read_text().split(TABLE_START, 1)
        after = rest.split(TABLE_END, 1)[1]
        doc.write_text(f"{before}{TABLE_START}\n{text}\n{TABLE_END}{after}")
        print(f"report: tables written into {doc}")
    else:
        print(text)
    return 0


# ------------------------------------------------------------------------------- export-extra


def cmd_export_extra(args: argparse.Namespace) -> int:
    """ShuffleNetV2 and ReXNet skeletons, exported like the zoo (scripts/export_zoo.py), into .gpu/extra."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import export_zoo

    export_zoo.ZOO["shufflenet_v2_x1_0"] = export_zoo.Spec(export_zoo._tv("shufflenet_v2_x1_0"), (1, 3, 224, 224))
    export_zoo.ZOO["rexnet_100"] = export_zoo.Spec(export_zoo._timm("rexnet_100"), (1, 3, 224, 224))
    for name in ("shufflenet_v2_x1_0", "rexnet_100"):
        export_zoo.export_one(name, Path(args.out))
    return 0


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="run graphopt once per model variant; write .onnx files and manifest.json")
    p.add_argument("--out", required=True, help="folder for the models and manifest.json")
    p.add_argument("--models", help="comma-separated model names, or 'synthetic' / 'real' (default: all)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="graphopt's ONNX Runtime equivalence check per pass (default on; the device run turns it off)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="processes (default: CPUs - 1)")
    p.add_argument("--expect", help="a manifest.json from a verified run: report variants whose graphs differ from it")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("bench", help="check and time every prepared variant")
    p.add_argument("--models-dir", required=True, help="the folder `prepare --out` wrote")
    p.add_argument("--out", required=True, help="results JSON (rewritten after every model)")
    p.add_argument("--models", help="comma-separated model names, or 'synthetic' / 'real' (default: all prepared)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=("fp16", "fp32"), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--rounds", type=int, default=15, help="timed blocks per variant; the median is reported")
    p.add_argument("--target-ms", type=float, default=25.0, help="length of one timed block of back-to-back replays")
    p.add_argument("--deadline-s", type=float, default=0.0, help="start no new model after this many seconds (0: no limit)")
    p.add_argument("--quick", action="store_true", help="2 rounds of short blocks: tests the script end to end")
    p.add_argument("--global-pool", choices=("pool", "mean"), default="pool",
                   help="run GlobalAveragePool as a pooling kernel (default) or as the reduction ReduceMean uses")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="tables into docs/gpu-results.md, plot, merged JSON")
    p.add_argument("--results", action="append", required=True, help="bench output (repeatable: merged in order)")
    p.add_argument("--md", help="markdown file with the table markers to fill (else the tables are printed)")
    p.add_argument("--plot", help="PNG path")
    p.add_argument("--json", help="write the merged results here")
    p.add_argument("--repeat", help="an earlier bench run of the same variants: report how far the speed-ups moved")
    p.add_argument("--also", action="append", help="another bench run of the same graphs with other settings: one more table")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export-extra", help="ShuffleNetV2 and ReXNet skeletons (needs torch, torchvision, timm)")
    p.add_argument("--out", default=str(EXTRA_DIR))
    p.set_defaults(func=cmd_export_extra)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
