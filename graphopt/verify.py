"""Equivalence checking with polygraphy: the same seeded inputs through two graphs, judged per output.

Reference: ONNX Runtime on the graph before a rewrite, with every ORT graph optimization turned
off (so ORT's own fusions cannot hide or cause a difference). Candidate: TensorRT through
polygraphy's TrtRunner on the rewritten graph when `tensorrt` imports, otherwise ONNX Runtime.

Polygraphy's own comparison is lenient in ways that matter for rewrites of random-weight models:
its relative error is taken element by element, and its absolute tolerance accepts any change of
an output whose values are all below it. `ScaledErrorCompare` closes those gaps: it judges the
worst error against the scale of each output (`max |ref|`), so tiny and large outputs get the
same verdict, requires identical names, dtypes and shapes, requires NaN/Inf to sit exactly where
the reference has them, and requires integer and boolean outputs to match exactly.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, DataLoader, RunResults
from polygraphy.comparator.struct import IterationResult
from polygraphy.logger import G_LOGGER

from graphopt.errors import InputShapeError
from graphopt.modelio import weights_apart

Outputs = Mapping[str, np.ndarray]
ORT = "onnxruntime"
TRT = "tensorrt"

# Unknown dimensions without an --input-shape get this size (batch 1, sequence 1, ...).
DEFAULT_DYNAMIC_DIM = 1


@dataclass(frozen=True)
class Tolerance:
    """An output passes when max|candidate - reference| <= atol + rtol * max|reference|."""

    atol: float
    rtol: float


# fp32 rewrites only reorder float additions: errors stay near 1e-7..1e-6 of the output's scale,
# while scaling one filter of ResNet-50's last conv (1 of 2048) by 1.02 moves the logits by 8e-5
# of theirs (tests/test_verify.py measures both).
FP32_TOLERANCE = Tolerance(atol=1e-8, rtol=1e-5)
# fp16 keeps about 3 decimal digits, and accumulation order moves the last of them.
FP16_TOLERANCE = Tolerance(atol=1e-5, rtol=1e-2)


def default_tolerance(model: onnx.ModelProto) -> Tolerance:
    low_precision = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    elem_types = {vi.type.tensor_type.elem_type for vi in [*model.graph.input, *model.graph.output]}
    elem_types |= {init.data_type for init in model.graph.initializer}
    return FP16_TOLERANCE if elem_types & low_precision else FP32_TOLERANCE


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str = "auto") -> str:
    if requested == "auto":
        return TRT if tensorrt_available() else ORT
    if requested == TRT and not tensorrt_available():
        raise InputShapeError("--backend tensorrt asked for, but the tensorrt package is not importable; install graphopt[trt]")
    return requested


# -- per-output verdicts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputVerdict:
    """The comparison of one output. Truthy when it passed (polygraphy's compare_func protocol)."""

    name: str
    passed: bool
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0  # max_abs_err / max|reference|
    scale: float = 0.0
    reason: str | None = None  # why it failed, when the failure is not a numeric one

    def __bool__(self) -> bool:
        return self.passed

    def describe(self) -> str:
        if self.reason:
            return f"{self.name}: {self.reason}"
        return f"{self.name}: max abs error {self.max_abs_err:.3g}, relative to output scale {self.max_rel_err:.3g}"


@dataclass(frozen=True)
class Verdict:
    """The comparison of all outputs of two graphs, and who computed the candidate's."""

    backend: str
    outputs: tuple[OutputVerdict, ...]
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return all(self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def worst(self) -> OutputVerdict:
        failing = [o for o in self.outputs if not o.passed]
        if failing:
            return next((o for o in failing if o.reason), max(failing, key=lambda o: o.max_rel_err))
        return max(self.outputs, key=lambda o: o.max_rel_err)

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((o.max_rel_err for o in self.outputs), default=0.0)


class ScaledErrorCompare:
    """A polygraphy compare_func: `(reference, candidate) -> OrderedDict[name, OutputVerdict]`."""

    def __init__(self, tolerance: Tolerance) -> None:
        self.tolerance = tolerance

    def __call__(self, reference: IterationResult, candidate: IterationResult) -> OrderedDict[str, OutputVerdict]:
        verdicts: OrderedDict[str, OutputVerdict] = OrderedDict()
        for name in reference.keys():
            if name not in candidate:
                verdicts[name] = OutputVerdict(name, False, reason="missing from the candidate's outputs")
            else:
                verdicts[name] = compare_arrays(name, np.asarray(reference[name]), np.asarray(candidate[name]), self.tolerance)
        for name in candidate.keys():
            if name not in reference:
                verdicts[name] = OutputVerdict(name, False, reason="not an output of the reference")
        if list(reference.keys()) != list(candidate.keys()) and all(verdicts.values()):
            order = OutputVerdict("(output order)", False, reason=f"outputs reordered: {list(candidate.keys())}")
            verdicts[order.name] = order
        return verdicts


def compare_arrays(name: str, ref: np.ndarray, cand: np.ndarray, tol: Tolerance) -> OutputVerdict:
    if ref.dtype != cand.dtype:
        return OutputVerdict(name, False, reason=f"dtype changed from {ref.dtype} to {cand.dtype}")
    if ref.shape != cand.shape:
        return OutputVerdict(name, False, reason=f"shape changed from {ref.shape} to {cand.shape}")
    if ref.size == 0:
        return OutputVerdict(name, True)
    if not np.issubdtype(ref.dtype, np.inexact):
        mismatches = int(np.count_nonzero(ref != cand))
        if mismatches:
            return OutputVerdict(name, False, reason=f"{mismatches} of {ref.size} values differ (exact match required for {ref.dtype})")
        return OutputVerdict(name, True)
    ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
    ref_finite, cand_finite = np.isfinite(ref64), np.isfinite(cand64)
    same_specials = np.array_equal(ref_finite, cand_finite) and np.array_equal(
        np.nan_to_num(ref64[~ref_finite], nan=0.0), np.nan_to_num(cand64[~cand_finite], nan=0.0)
    ) and np.array_equal(np.isnan(ref64), np.isnan(cand64))
    if not same_specials:
        return OutputVerdict(name, False, reason=f"NaN/Inf differ: reference has {int((~ref_finite).sum())}, candidate {int((~cand_finite).sum())}")
    finite = ref_finite
    if not finite.any():
        return OutputVerdict(name, True)
    diff = np.abs(ref64[finite] - cand64[finite])
    scale = float(np.max(np.abs(ref64[finite])))
    max_abs = float(diff.max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    passed = max_abs <= tol.atol + tol.rtol * scale
    return OutputVerdict(name, passed, max_abs, max_rel, scale)


# -- inputs ----------------------------------------------------------------------------------------


def parse_input_shapes(specs: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """`name:1x3x224x224` (repeatable) -> {name: (1, 3, 224, 224)}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 0 for d in shape):
            raise InputShapeError(f"bad --input-shape {spec!r}; expected NAME:DIMxDIM..., e.g. input:1x3x224x224")
        shapes[name] = shape
    return shapes


def input_metadata(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> TensorMetadata:
    """Concrete shapes and dtypes for every real graph input (initializers are not inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in initializers]
    unknown = set(shapes) - {vi.name for vi in inputs}
    if unknown:
        raise InputShapeError(f"--input-shape names {', '.join(sorted(unknown))}, not an input; inputs: {', '.join(vi.name for vi in inputs)}")
    meta = TensorMetadata()
    for vi in inputs:
        tensor_type = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise InputShapeError(f"input {vi.name} is not a tensor; graphopt can only feed tensor inputs")
        dims = [d.dim_value if d.HasField("dim_value") else DEFAULT_DYNAMIC_DIM for d in tensor_type.shape.dim]
        shape = shapes.get(vi.name, tuple(dims))
        if vi.name in shapes and tensor_type.HasField("shape") and len(shape) != len(dims):
            raise InputShapeError(f"--input-shape {vi.name} has rank {len(shape)}, the model's input has rank {len(dims)}")
        meta.add(vi.name, onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type), shape)
    return meta


def make_feed(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Seeded random inputs through polygraphy's DataLoader, in a range safe for each dtype.

    Floats are drawn from [-1, 1] (negative values exercise Relu/Clip paths), integers from
    [0, 4) so that index-like inputs stay in range, booleans from {0, 1}.
    """
    meta = input_metadata(model, shapes)
    ranges = {}
    for name, (dtype, _) in meta.items():
        np_dtype = np.dtype(dtype.numpy()) if hasattr(dtype, "numpy") else np.dtype(dtype)
        if np_dtype == np.bool_:
            ranges[name] = (0, 1)
        elif np.issubdtype(np_dtype, np.integer):
            ranges[name] = (0, 3)
        else:
            ranges[name] = (-1.0, 1.0)
    with _quiet_polygraphy():
        return dict(DataLoader(seed=seed, iterations=1, input_metadata=meta, val_range=ranges)[0])


# -- runners ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_polygraphy() -> Iterator[None]:
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        yield


def _ort_session(graph: onnx.ModelProto, weights: Mapping[str, ort.OrtValue]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Ours to verify, not ORT's to optimize: its fusions would change what is being compared.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    # ORT starts a thread per core; many graphopt processes side by side (CI jobs, the parallel
    # fuzz run in scripts/fuzz_long.py) would each start that many and spin against each other.
    options.intra_op_num_threads = _ort_threads()
    if weights:
        options.add_external_initializers(list(weights), list(weights.values()))
    return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_threads() -> int:
    """GRAPHOPT_ORT_THREADS, or 0: ONNX Runtime's default (one thread per core)."""
    value = os.environ.get("GRAPHOPT_ORT_THREADS", "0")
    return int(value) if value.isdigit() else 0


def run_onnxruntime(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> Outputs:
    # The weights go to ORT as arrays, not serialized with the graph: that cost more than running
    # ResNet-50 once. ORT reads the arrays in place, so they live until the run is over.
    graph, arrays = weights_apart(model)
    weights = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    return _run(OnnxrtRunner(lambda: _ort_session(graph, weights), name="onnxruntime"), feed)


def run_tensorrt(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> Outputs:
    """Build a TensorRT engine for exactly the fed shapes and run it (needs `tensorrt`)."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner

    profile = Profile()
    for name, value in feed.items():
        profile.add(name, min=value.shape, opt=value.shape, max=value.shape)
    fp16 = default_tolerance(model) is FP16_TOLERANCE
    # TF32 stays off (polygraphy's default): it would turn fp32 convolutions into 10-bit-mantissa math.
    config = CreateConfig(fp16=fp16, profiles=[profile])
    with tempfile.TemporaryDirectory(prefix="graphopt-trt-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=model.ByteSize() > 2**30, location="model.onnx.data")
        runner = TrtRunner(EngineFromNetwork(NetworkFromOnnxPath(path), config=config), name="tensorrt")
        return _run(runner, feed)


def _run(runner, feed: Mapping[str, np.ndarray]) -> Outputs:
    with _quiet_polygraphy():
        results = Comparator.run([runner], data_loader=[dict(feed)])
    [(_, [iteration])] = list(results.items())
    return OrderedDict((name, np.asarray(value)) for name, value in iteration.items())


def compare_outputs(reference: Outputs, candidate: Outputs, tolerance: Tolerance, backend: str) -> Verdict:
    """Judge candidate outputs against reference outputs through polygraphy's compare_accuracy."""
    results = RunResults()
    results.append(("reference", [IterationResult(OrderedDict(reference), runner_name="reference")]))
    results.append((backend, [IterationResult(OrderedDict(candidate), runner_name=backend)]))
    with _quiet_polygraphy():
        accuracy = Comparator.compare_accuracy(results, compare_func=ScaledErrorCompare(tolerance))
    [per_iteration] = accuracy[0].values()
    verdicts: Mapping[str, OutputVerdict] = per_iteration[0]
    return Verdict(backend, tuple(verdicts.values()), tolerance)


class Verifier:
    """Runs graphs on one fixed set of inputs and judges them against reference outputs."""

    def __init__(
        self,
        model: onnx.ModelProto,
        *,
        input_shapes: Mapping[str, tuple[int, ...]] | None = None,
        seed: int = 0,
        tolerance: Tolerance | None = None,
        backend: str = "auto",
        feed: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """`feed` (e.g. loaded from a golden file) replaces the seeded random inputs."""
        self.feed = dict(feed) if feed is not None else make_feed(model, input_shapes or {}, seed)
        self.tolerance = tolerance or default_tolerance(model)
        self.backend = resolve_backend(backend)

    def reference(self, model: onnx.ModelProto) -> Outputs:
        return run_onnxruntime(model, self.feed)

    def check(self, reference: Outputs, model: onnx.ModelProto) -> tuple[Verdict, Outputs | None]:
        """Verdict of `model` against `reference`, plus its ORT outputs when ORT computed them.

        Those outputs are exactly what `reference(model)` would return, so the pass manager
        reuses them as the next pass's reference instead of running the graph again.
        """
        if self.backend == TRT:
            return compare_outputs(reference, run_tensorrt(model, self.feed), self.tolerance, TRT), None
        outputs = run_onnxruntime(model, self.feed)
        return compare_outputs(reference, outputs, self.tolerance, ORT), outputs
