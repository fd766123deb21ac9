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

Graphs run on several input sets (graphopt.inputs): one ONNX Runtime session per graph runs
every set, and reference outputs are computed once per set. A verdict is the worst over all sets
and names the set it came from.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from polygraphy.comparator import Comparator
from polygraphy.comparator.struct import IterationResult

from graphopt.errors import OptionError
from graphopt.inputs import InputSet, InputShapes, default_input_sets, is_float_dtype, quiet_polygraphy
from graphopt.inputs import parse_input_shapes  # noqa: F401  (the CLI's and tests' entry point, kept here)
from graphopt.layerwise import (
    OWN_SUFFIX, CutPoint, RegionError, StepDifferences, candidate_probe, cut_points, injected_feed, is_quantized, reference_cut,
    reference_probe, region_error, step_differences,
)
from graphopt.modelio import weights_apart
from graphopt.report import InputSetRecord

Outputs = Mapping[str, np.ndarray]
References = tuple[Outputs, ...]  # one Outputs per input set, in the verifier's order
ORT = "onnxruntime"
TRT = "tensorrt"


@dataclass(frozen=True)
class Tolerance:
    """An output passes when max|candidate - reference| <= atol + rtol * max|reference|."""

    atol: float
    rtol: float

    def __post_init__(self) -> None:
        # NaN compares false with everything: a NaN tolerance would pass no rewrite and report "max error 0".
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise OptionError(f"--{name} {value}: a tolerance must be a finite number >= 0")


# fp32 rewrites only reorder float additions: errors stay near 1e-7..1e-6 of the output's scale,
# while scaling one filter of ResNet-50's last conv (1 of 2048) by 1.02 moves the logits by 8e-5
# of theirs (tests/test_verify.py measures both).
FP32_TOLERANCE = Tolerance(atol=1e-8, rtol=1e-5)
# fp16 keeps about 3 decimal digits, and accumulation order moves the last of them.
FP16_TOLERANCE = Tolerance(atol=1e-5, rtol=1e-2)
# An input set on which a graph amplifies rounding (a random-weight network fed [0, 255] grows its
# activations 1e5-fold) moves its outputs by more than rtol when the float inputs and weights move
# by one rounding step; a rewrite that only reorders float operations, or rounds folded weights
# anew, moves them by as much (measured on EfficientNet-B0: 0.1x to 5x; RegNetY in float16, its
# 53 BatchNorms folded: 5x). Within NOISE_FACTOR times that sensitivity, an error cannot be told
# from rounding; the other, well-conditioned sets still judge with rtol alone.
NOISE_FACTOR = 10.0


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
        raise OptionError("--backend tensorrt asked for, but the tensorrt package is not importable; install graphopt[trt]")
    return requested


# -- per-output verdicts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputVerdict:
    """The comparison of one output. Truthy when it passed (polygraphy's compare_func protocol)."""

    name: str
    passed: bool
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0  # max_abs_err / max|reference|
    scale: float = 0.0  # max|reference|
    reason: str | None = None  # why it failed, when the failure is not a numeric one
    input_set: str | None = None  # the input set this verdict (the worst over all sets) comes from
    exact: bool = False  # judged by equality (integers, booleans, strings), not by a tolerance
    noise: float = 0.0  # how far the reference moves when its float inputs move by one rounding step

    def __bool__(self) -> bool:
        return self.passed

    def describe(self) -> str:
        where = f" on input set ({self.input_set})" if self.input_set and not self.passed else ""
        if self.reason:
            return f"{self.name}: {self.reason}{where}"
        if self.exact:
            return f"{self.name}: equal{where}"
        noisy = (f", within {NOISE_FACTOR:g}x this input set's fp32 sensitivity, relative {self.noise / self.scale:.3g}"
                 if self.passed and self.within_noise and self.scale > 0 else "")
        return (f"{self.name}: max abs error {self.max_abs_err:.3g}, relative error {self.max_rel_err:.3g} "
                f"(output scale {self.scale:.3g}{noisy}){where}")

    @property
    def within_noise(self) -> bool:
        """Whether the error is within NOISE_FACTOR times the input set's measured fp32 sensitivity."""
        return 0 < self.max_abs_err <= NOISE_FACTOR * self.noise

    def worse_than(self, other: OutputVerdict) -> bool:
        """Failing beats passing, a structural failure beats a numeric one, then the larger relative error."""
        if self.passed != other.passed:
            return not self.passed
        if bool(self.reason) != bool(other.reason):
            return bool(self.reason)
        return self.max_rel_err > other.max_rel_err


@dataclass(frozen=True)
class Layerwise:
    """How a quantized graph was judged region by region (graphopt.layerwise)."""

    cut_points: int  # quantizers both graphs share, fed the reference's integers
    one_step: int  # quantized values one step from the reference's (a value on a rounding boundary)
    compared: int  # quantized values compared, over all cut points and input sets
    end_to_end: str  # the graph outputs compared without cuts: what int8 rounding flips did to them

    def describe(self) -> str:
        integers = (f"{self.one_step} of {self.compared} quantized values one step apart, none more" if self.compared
                    else "no integer quantizers to compare step by step")
        return (f"judged layer-wise at {self.cut_points} quantizers ({integers}); "
                f"end to end, rounding flips propagated: {self.end_to_end}")


@dataclass(frozen=True)
class Verdict:
    """The comparison of all outputs of two graphs, and who computed the candidate's."""

    backend: str
    outputs: tuple[OutputVerdict, ...]
    tolerance: Tolerance
    layerwise: Layerwise | None = None  # set when a quantized graph was judged region by region

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

    def __init__(self, tolerance: Tolerance, noise: Mapping[str, float] | None = None) -> None:
        self.tolerance = tolerance
        self.noise = dict(noise or {})  # per output: the reference's fp32 sensitivity on this input set

    def __call__(self, reference: IterationResult, candidate: IterationResult) -> OrderedDict[str, OutputVerdict]:
        verdicts: OrderedDict[str, OutputVerdict] = OrderedDict()
        for name in reference.keys():
            if name not in candidate:
                verdicts[name] = OutputVerdict(name, False, reason="missing from the candidate's outputs")
            else:
                verdicts[name] = compare_values(name, reference[name], candidate[name], self.tolerance, self.noise.get(name, 0.0))
        for name in candidate.keys():
            if name not in reference:
                verdicts[name] = OutputVerdict(name, False, reason="not an output of the reference")
        if list(reference.keys()) != list(candidate.keys()) and all(verdicts.values()):
            order = OutputVerdict("(output order)", False, reason=f"outputs reordered: {list(candidate.keys())}")
            verdicts[order.name] = order
        return verdicts


def compare_values(name: str, ref: object, cand: object, tol: Tolerance, noise: float = 0.0) -> OutputVerdict:
    """Tensors, and the sequences (lists) and optionals (None) ONNX Runtime returns for other outputs."""
    if ref is None or cand is None:
        return OutputVerdict(name, ref is None and cand is None, reason=None if ref is cand else "an optional output is empty on one side only")
    if isinstance(ref, list) or isinstance(cand, list):
        if not (isinstance(ref, list) and isinstance(cand, list)) or len(ref) != len(cand):
            return OutputVerdict(name, False, reason="sequence length or kind changed")
        items = [compare_values(name, r, c, tol) for r, c in zip(ref, cand)]
        worst = OutputVerdict(name, True)
        for item in items:
            worst = item if item.worse_than(worst) else worst
        return worst
    return compare_arrays(name, np.asarray(ref), np.asarray(cand), tol, noise)


def compare_arrays(name: str, ref: np.ndarray, cand: np.ndarray, tol: Tolerance, noise: float = 0.0) -> OutputVerdict:
    """`noise`: the reference's own fp32 sensitivity on this input (see NOISE_FACTOR); 0 judges by `tol` alone."""
    if ref.dtype != cand.dtype:
        return OutputVerdict(name, False, reason=f"dtype changed from {ref.dtype} to {cand.dtype}")
    if ref.shape != cand.shape:
        return OutputVerdict(name, False, reason=f"shape changed from {ref.shape} to {cand.shape}")
    if ref.size == 0:
        return OutputVerdict(name, True)
    if not (np.issubdtype(ref.dtype, np.complexfloating) or is_float_dtype(ref.dtype)):
        mismatches = int(np.count_nonzero(ref != cand))
        if mismatches:
            return OutputVerdict(name, False, reason=f"{mismatches} of {ref.size} values differ (exact match required for {ref.dtype})")
        return OutputVerdict(name, True, exact=True)
    if np.issubdtype(ref.dtype, np.complexfloating):  # judged as pairs of reals
        ref, cand = np.stack([ref.real, ref.imag]), np.stack([cand.real, cand.imag])
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
    passed = max_abs <= max(tol.atol + tol.rtol * scale, NOISE_FACTOR * noise)
    return OutputVerdict(name, passed, max_abs, max_rel, scale, noise=noise)


def fp32_sensitivity(reference: Outputs, perturbed: Outputs) -> dict[str, float]:
    """Per float output, max |reference - perturbed| where both are finite: what one rounding step of the inputs moves."""
    noise = {}
    for name, ref in reference.items():
        moved = perturbed.get(name)
        if not isinstance(ref, np.ndarray) or not isinstance(moved, np.ndarray) or ref.shape != moved.shape or not is_float_dtype(ref.dtype):
            continue
        ref64, moved64 = ref.astype(np.float64), moved.astype(np.float64)
        finite = np.isfinite(ref64) & np.isfinite(moved64)
        noise[name] = float(np.max(np.abs(ref64[finite] - moved64[finite]))) if finite.any() else 0.0
    return noise


def one_rounding_step_away(feed: Mapping[str, object], rng: np.random.Generator) -> dict[str, object]:
    """The feed with every float input moved up or down (at random) by one step of its own precision."""
    moved = {}
    for name, value in feed.items():
        if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating) and value.size:
            step = np.spacing(np.abs(value))
            value = np.where(rng.random(value.shape) < 0.5, value - step, value + step).astype(value.dtype)
        moved[name] = value
    return moved


def weights_one_rounding_step_away(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """A copy of `model` with every float initializer moved up or down by one step of its own precision."""
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    for tensor in moved.graph.initializer:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE) \
                and tensor.data_location != onnx.TensorProto.EXTERNAL:
            [value] = one_rounding_step_away({"w": numpy_helper.to_array(tensor)}, rng).values()
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return moved


# -- inputs ----------------------------------------------------------------------------------------


def make_feed(model: onnx.ModelProto, shapes: InputShapes, seed: int) -> dict[str, np.ndarray]:
    """The first default input set's feed (uniform floats in [-1, 1], dynamic dims at 1)."""
    return default_input_sets(model, shapes, seed)[0].feed


# -- runners ---------------------------------------------------------------------------------------


# ORT's Python binding converts these tensor types to and from numpy itself; others (bfloat16,
# float8, 4-bit) go in and out as raw bytes (see _to_ort_value/_from_ort_value).
_NUMPY_ORT_TYPES = {f"tensor({t})" for t in ("float", "float16", "double", "int8", "int16", "int32", "int64", "uint8",
                                             "uint16", "uint32", "uint64", "bool", "string")}
# FATAL only: ORT logs errors (a failed allocation, an empty graph) on stderr itself, before
# graphopt's own one-line message.
_ORT_LOG_FATAL = 4


class OrtGraph:
    """One ONNX Runtime session for a graph, run on as many feeds as there are input sets.

    polygraphy's OnnxrtRunner feeds numpy arrays only, so it cannot run bfloat16, float8 or
    4-bit tensors; this runs them through OrtValues, and everything else through session.run.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        # The weights go to ORT as arrays, not serialized with the graph: that cost more than running
        # ResNet-50 once. ORT reads the arrays in place, so they live as long as the session.
        graph, arrays = weights_apart(model)
        self._weights = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        self.session = _ort_session(graph, self._weights)
        self.output_names = [o.name for o in self.session.get_outputs()]
        types = [value.type for value in [*self.session.get_inputs(), *self.session.get_outputs()]]
        self._raw = any(t.startswith("tensor(") and t not in _NUMPY_ORT_TYPES for t in types)
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = _ORT_LOG_FATAL

    def run(self, feed: Mapping[str, np.ndarray]) -> Outputs:
        if self._raw:
            values = {name: _to_ort_value(value) for name, value in feed.items()}
            results = [_from_ort_value(value) for value in self.session.run_with_ort_values(None, values, self._run_options)]
        else:
            results = self.session.run(None, dict(feed), self._run_options)
        return OrderedDict(zip(self.output_names, results))


def _to_ort_value(array: np.ndarray) -> ort.OrtValue:
    if array.dtype.kind in "biuf" and array.dtype.type.__module__ == "numpy":
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
    tensor = numpy_helper.from_array(array)  # onnx's own packing (4-bit pairs, little-endian)
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), tensor.data_type, "cpu", 0)
    ctypes.memmove(value.data_ptr(), tensor.raw_data, len(tensor.raw_data))
    return value


def _from_ort_value(value: ort.OrtValue) -> object:
    if not value.is_tensor() or value.data_type() in _NUMPY_ORT_TYPES:
        return value.numpy()
    tensor = onnx.TensorProto(dims=value.shape(), data_type=value.element_type())
    tensor.raw_data = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
    return numpy_helper.to_array(tensor)


def _ort_session(graph: onnx.ModelProto, weights: Mapping[str, ort.OrtValue]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Ours to verify, not ORT's to optimize: its fusions would change what is being compared.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = _ORT_LOG_FATAL
    # ORT starts a thread per core; many graphopt processes side by side (CI jobs, the parallel
    # fuzz run in scripts/fuzz_long.py) would each start that many and spin against each other.
    options.intra_op_num_threads = ort_threads()
    # Idle threads sleep instead of spinning: verification runs big kernels, where waking costs
    # nothing, and a spinning pool on a busy machine (CI, other jobs) halved ResNet-50's speed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if weights:
        options.add_external_initializers(list(weights), list(weights.values()))
    return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_threads() -> int:
    """GRAPHOPT_ORT_THREADS, capped at the cores this process may use; 0 (unset): ORT's default, one per core."""
    value = os.environ.get("GRAPHOPT_ORT_THREADS", "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise OptionError(f"GRAPHOPT_ORT_THREADS={value}: expected a whole number of threads (0: one per core)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(int(value), cores)  # more threads than cores only spin against each other


def run_onnxruntime_sets(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[Outputs]:
    """`model` on every feed, through one session: creating it costs more than a run."""
    graph = OrtGraph(model)
    return [graph.run(feed) for feed in feeds]


def run_onnxruntime(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> Outputs:
    [outputs] = run_onnxruntime_sets(model, [feed])
    return outputs


def run_tensorrt(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[Outputs]:
    """Build one TensorRT engine whose profile spans every feed's shapes and run each (needs `tensorrt`)."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner

    profile = Profile()
    for name in feeds[0]:
        shapes = [np.shape(feed[name]) for feed in feeds]
        profile.add(name, min=tuple(map(min, zip(*shapes))), opt=shapes[0], max=tuple(map(max, zip(*shapes))))
    fp16 = default_tolerance(model) is FP16_TOLERANCE
    # TF32 stays off (polygraphy's default): it would turn fp32 convolutions into 10-bit-mantissa math.
    config = CreateConfig(fp16=fp16, profiles=[profile])
    with tempfile.TemporaryDirectory(prefix="graphopt-trt-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=model.ByteSize() > 2**30, location="model.onnx.data")
        runner = TrtRunner(EngineFromNetwork(NetworkFromOnnxPath(path), config=config), name="tensorrt")
        with quiet_polygraphy():
            results = Comparator.run([runner], data_loader=[dict(feed) for feed in feeds])
        [(_, iterations)] = list(results.items())
        return [OrderedDict((name, np.asarray(value)) for name, value in iteration.items()) for iteration in iterations]


def compare_outputs(reference: Outputs, candidate: Outputs, tolerance: Tolerance, backend: str) -> Verdict:
    """Judge one input set's candidate outputs against its reference outputs."""
    return compare_sets((reference,), (candidate,), tolerance, backend)


def compare_sets(reference: Sequence[Outputs], candidate: Sequence[Outputs], tolerance: Tolerance, backend: str,
                 labels: Sequence[str] | None = None, noise: Sequence[Mapping[str, float]] | None = None) -> Verdict:
    """Judge every input set and keep each output's worst verdict, naming the set (`labels`) it came from.

    ScaledErrorCompare is called directly rather than through polygraphy's compare_accuracy,
    which formats statistics of every output for its log whether or not they are shown: on
    SqueezeNet that cost about as much as running the graph once, per check.
    """
    labels = list(labels) if labels is not None and len(reference) > 1 else [None] * len(reference)
    noise = list(noise) if noise is not None else [{}] * len(reference)
    worst: OrderedDict[str, OutputVerdict] = OrderedDict()
    for ref, cand, label, set_noise in zip(reference, candidate, labels, noise):
        compare = ScaledErrorCompare(tolerance, set_noise)
        verdicts = compare(IterationResult(OrderedDict(ref), runner_name="reference"), IterationResult(OrderedDict(cand), runner_name=backend))
        for name, verdict in verdicts.items():
            verdict = dataclasses.replace(verdict, input_set=label)
            if name not in worst or verdict.worse_than(worst[name]):
                worst[name] = verdict
    return Verdict(backend, tuple(worst.values()), tolerance)


class Verifier:
    """Runs graphs on fixed input sets and judges them against reference outputs, set by set."""

    def __init__(
        self,
        model: onnx.ModelProto,
        *,
        input_shapes: InputShapes | None = None,
        seed: int = 0,
        tolerance: Tolerance | None = None,
        backend: str = "auto",
        feed: Mapping[str, np.ndarray] | None = None,
        input_sets: Sequence[InputSet] | None = None,
    ) -> None:
        """`input_sets` (the user's data: graphopt.inputs.load_input_sets) or one `feed` replace the seeded sets."""
        if feed is not None:
            input_sets = [InputSet("given feed", dict(feed))]
        self.input_sets = list(input_sets) if input_sets is not None else default_input_sets(model, input_shapes or {}, seed)
        self.tolerance = tolerance or default_tolerance(model)
        self.backend = resolve_backend(backend)
        self.warnings: list[str] = []
        self._input_model: onnx.ModelProto | None = None  # kept to measure its fp32 sensitivity, if ever needed
        self._input_outputs: References = ()
        self._sensitivity: list[dict[str, float]] | None = None
        self._quantized: bool | None = None

    @property
    def feed(self) -> dict[str, np.ndarray]:
        """The first input set's feed."""
        return self.input_sets[0].feed

    @property
    def feeds(self) -> list[dict[str, np.ndarray]]:
        return [input_set.feed for input_set in self.input_sets]

    def describe_input_sets(self) -> list[InputSetRecord]:
        return [InputSetRecord(s.label, s.seed, s.distribution, s.shapes) for s in self.input_sets]

    def reference(self, model: onnx.ModelProto) -> References:
        return tuple(run_onnxruntime_sets(model, self.feeds))

    def reference_of_input(self, model: onnx.ModelProto) -> References:
        """Reference outputs of the model verification starts from; sets it cannot run are dropped.

        A graph may accept only some sizes (a Reshape to a constant batch of 1): a seeded set it
        rejects says nothing about a rewrite, so it is dropped with a warning. When no set runs,
        the error of the first is raised. The user's own sets are never dropped.
        """
        graph = OrtGraph(model)
        self._input_model = model
        if any(s.seed is None for s in self.input_sets):
            self._input_outputs = tuple(graph.run(feed) for feed in self.feeds)
            return self._input_outputs
        kept, outputs, first_error = [], [], None
        for input_set in self.input_sets:
            try:
                outputs.append(graph.run(input_set.feed))
                kept.append(input_set)
            except Exception as err:  # ORT raises its own pybind types for shapes a graph rejects
                first_error = first_error or err
                self.warnings.append(f"input set {input_set.label} was dropped: ONNX Runtime cannot run the input model on it "
                                     f"({_one_line(err)})")
        if not kept:
            self.warnings.clear()
            raise first_error
        self.input_sets = kept
        self._input_outputs = tuple(outputs)
        return self._input_outputs

    def check(self, reference: References, model: onnx.ModelProto,
              reference_model: onnx.ModelProto | None = None) -> tuple[Verdict, References | None]:
        """Verdict of `model` against `reference`, plus its ORT outputs when ORT computed them.

        `reference_model` (the graph `reference` came from) lets a quantized graph be judged
        layer-wise when its outputs differ. The outputs returned are exactly what
        `reference(model)` would return, so the pass manager reuses them as the next pass's
        reference instead of running the graph again.
        """
        if self.backend == TRT:
            return self.compare(reference, run_tensorrt(model, self.feeds)), None
        outputs = tuple(run_onnxruntime_sets(model, self.feeds))
        return self.compare(reference, outputs, reference_model, model), outputs

    def compare(self, reference: Sequence[Outputs], candidate: Sequence[Outputs],
                reference_model: onnx.ModelProto | None = None, candidate_model: onnx.ModelProto | None = None) -> Verdict:
        """Judge by the tolerance. A quantized graph whose outputs are not bit-identical is judged
        layer-wise instead, when both graphs are given (graphopt.layerwise); in any other graph an
        error beyond the tolerance is judged again against the input sets' fp32 sensitivity.

        The sensitivity is measured on the input model (never on a candidate, whose own flaw could
        make it sensitive), once, and only when a numeric failure asks for it: it costs a run per set.
        On a quantized graph it measures rounding chaos, which would excuse any error, so it is
        not used there.
        """
        labels = [s.label for s in self.input_sets]
        verdict = compare_sets(reference, candidate, self.tolerance, self.backend, labels)
        structural_failure = any(not o.passed and o.reason is not None for o in verdict.outputs)
        if self._input_model is None or structural_failure:
            return verdict
        # Outputs bit-identical on every input set: nothing the inputs reach changed (as for any graph).
        exact = verdict.passed and all(o.max_abs_err == 0 for o in verdict.outputs)
        if self.quantized and not exact and reference_model is not None and candidate_model is not None and self.backend == ORT:
            # Even when the outputs agree: a region's error can hide under the output tolerance
            # (a float16 graph's), and the cuts judge each region at the precision it computes in.
            try:
                return self.layerwise(verdict, reference_model, candidate_model)
            except Exception as err:  # a cut form ORT cannot run: the outputs' own verdict stands
                self.warnings.append(f"quantized graph judged by its outputs only: the layer-wise check could not run ({_one_line(err)})")
                return verdict
        if verdict.passed or self.quantized:
            return verdict
        return compare_sets(reference, candidate, self.tolerance, self.backend, labels, self.fp32_sensitivity())

    @property
    def quantized(self) -> bool:
        if self._quantized is None:
            self._quantized = self._input_model is not None and is_quantized(self._input_model)
        return self._quantized

    def layerwise(self, end_to_end: Verdict, reference_model: onnx.ModelProto, candidate_model: onnx.ModelProto) -> Verdict:
        """Each region between the quantizers both graphs share, judged on the reference's own integers."""
        cuts = cut_points(reference_model, candidate_model)
        # The reference is judged in the same cut form as the candidate, not as it ran: ONNX
        # Runtime computes float16 ops in float32 between Casts it places itself, and where a
        # graph's inputs and outputs are changes where it rounds (one float16 step).
        own_cuts = [reference_cut(cut) for cut in cuts]
        integers_graph = OrtGraph(reference_probe(reference_model, cuts))
        reference_graph = OrtGraph(candidate_probe(reference_model, own_cuts))
        candidate_graph = OrtGraph(candidate_probe(candidate_model, cuts))
        outputs = [o.name for o in reference_model.graph.output]
        graph_outputs: tuple[list[Outputs], list[Outputs]] = ([], [])
        regions: dict[str, OutputVerdict] = {}
        steps: dict[str, list[tuple[str, StepDifferences]]] = {c.name: [] for c in cuts}
        tol = self.tolerance
        for input_set in self.input_sets:
            integers = integers_graph.run(input_set.feed)
            ref = reference_graph.run({**input_set.feed, **injected_feed(own_cuts, integers)})
            cand = candidate_graph.run({**input_set.feed, **injected_feed(cuts, integers)})
            graph_outputs[0].append(OrderedDict((n, ref[n]) for n in outputs))
            graph_outputs[1].append(OrderedDict((n, cand[n]) for n in outputs))
            for cut in cuts:
                own_ref, own_cand = ref[cut.name + OWN_SUFFIX], cut.reference_part(cand[cut.name + OWN_SUFFIX])
                error = region_error(cut, ref[cut.reference_input], cut.reference_part(cand[cut.candidate_input]),
                                     own_ref, own_cand, tol.atol, tol.rtol)
                verdict = _region_verdict(cut, error, input_set.label)
                if cut.name not in regions or verdict.worse_than(regions[cut.name]):
                    regions[cut.name] = verdict
                if (differences := step_differences(own_ref, own_cand)) is not None:
                    steps[cut.name].append((input_set.label, differences))
        labels = [s.label for s in self.input_sets]
        ends = compare_sets(graph_outputs[0], graph_outputs[1], tol, ORT, labels)
        jumps = [OutputVerdict(f"{name} (quantized)", False, reason=f"{d.more} of {d.size} quantized values differ by more than one step "
                               f"(up to {d.max_steps})", input_set=label)
                 for name, per_set in steps.items() for label, d in per_set if d.more]
        summary = Layerwise(len(cuts), sum(d.one_step for per_set in steps.values() for _, d in per_set),
                            sum(d.size for per_set in steps.values() for _, d in per_set), end_to_end.worst.describe())
        return Verdict(ORT, (*ends.outputs, *regions.values(), *jumps), tol, summary)

    def fp32_sensitivity(self) -> list[dict[str, float]]:
        """Per input set and float output: how far the input model's outputs move when its float
        inputs and weights move by one rounding step (a rewrite that folds weights, BatchNorm into
        a float16 conv, rounds every one of them anew)."""
        if self._sensitivity is None:
            assert self._input_model is not None, "reference_of_input first"
            rng = np.random.default_rng(0)
            graph = OrtGraph(weights_one_rounding_step_away(self._input_model, rng))
            self._sensitivity = [fp32_sensitivity(outputs, graph.run(one_rounding_step_away(feed, rng)))
                                 for feed, outputs in zip(self.feeds, self._input_outputs)]
        return self._sensitivity


def _region_verdict(cut: CutPoint, error: RegionError, input_set: str) -> OutputVerdict:
    """A region's error as an output verdict, named after the quantizer that reads it."""
    name = f"{cut.name} (quantizer input)"
    relative = error.max_abs_err / error.scale if error.scale > 0 else (0.0 if error.max_abs_err == 0 else float("inf"))
    reason = None if error.passed else (f"max abs error {error.max_abs_err:.3g}, {error.steps:.3g} steps of its quantizer "
                                        f"(allowed {error.allowed_steps:.3g}; scale {error.scale:.3g})")
    return OutputVerdict(name, error.passed, error.max_abs_err, relative, error.scale, reason=reason, input_set=input_set)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
