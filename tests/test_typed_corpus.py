"""The typed corpus: INT8 Q/DQ (ModelOpt, ONNX Runtime) and FP16 (AutoCast) forms of real models.

Each fixture in tests/fixtures/typed is refilled with seeded weights (tests/fixtures/zoo.py), must
be a valid model ONNX Runtime runs with finite, input-dependent outputs and live quantizers, and
must go through `--passes all` with equivalent outputs, reaching a fixed point.

The default run checks every fixture, each pass alone and `all` (about 90 s on two cores: most
rewrites leave outputs bit-identical, which needs no layer-wise check);
`GRAPHOPT_TYPED_CORPUS=quick` leaves out the two largest models (RegNetY-400MF, MixNet-S) and
runs each pass alone on the small models only.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper

import graphopt
from graphopt.graphs import weight
from graphopt.registry import default_order
from tests.fixtures.zoo import TYPED_DIR, load_typed_model, typed_names

TYPED = typed_names()
QUANTIZED = [name for name in TYPED if "int8" in name or "qdq" in name]
# Every form of these is in the corpus (the others: the forms issue 15 is about).
SMALL_SOURCES = ("fc_head_classifier", "det_head", "se_block")
# Left out of the default run: 1000-node graphs, 5-15 s each through `--passes all`.
SLOW_SOURCES = ("regnet_y_400mf", "mixnet_s")
RUN_ALL = os.environ.get("GRAPHOPT_TYPED_CORPUS", "all") != "quick"
# Refilled weights must keep activations inside the tools' calibrated ranges: over a whole model
# few quantized values may sit at the ends of their range. One tensor may saturate more (RegNetY's
# first SE squeeze has 8 values a sample, calibrated on 4 samples), never entirely.
MAX_SATURATED_IN_MODEL = 0.05
MAX_SATURATED_IN_TENSOR = 0.75
# Random-weight ImageNet models barely depend on their input (the exported float MnasNet's output
# moves by 0.1% of its scale between two random inputs); constant outputs are what must not pass.
MIN_INPUT_DEPENDENCE = 1e-4


def source(name: str) -> str:
    return name.split(".")[0]


SLOW = [pytest.mark.slow, pytest.mark.skipif(not RUN_ALL, reason="GRAPHOPT_TYPED_CORPUS=quick")]


def params(names: list[str]) -> list:
    return [pytest.param(n, marks=SLOW) if source(n) in SLOW_SOURCES else n for n in names]


def pass_params() -> list:
    """(fixture, pass) for every pass but the canonicalizer, which runs around each anyway."""
    return [pytest.param(name, graph_pass, marks=() if source(name) in SMALL_SOURCES else SLOW)
            for name in TYPED for graph_pass in default_order() if graph_pass != "simplify"]


@functools.cache
def _refilled(name: str) -> bytes:
    return load_typed_model(name).SerializeToString()


def refilled(name: str) -> onnx.ModelProto:
    """The fixture with its weights refilled (seed 0), loaded once per session."""
    return onnx.ModelProto.FromString(_refilled(name))


def session(model: onnx.ModelProto, extra_outputs: list[str] = ()) -> ort.InferenceSession:
    """ONNX Runtime on CPU with its graph optimizations off; `extra_outputs` come after the outputs."""
    if extra_outputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in extra_outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def random_feed(model: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for graph_input in model.graph.input:
        tensor_type = graph_input.type.tensor_type
        shape = (batch, *(d.dim_value for d in tensor_type.shape.dim[1:]))
        feed[graph_input.name] = rng.uniform(-1, 1, shape).astype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    return feed


def node_list(model: onnx.ModelProto) -> list[tuple]:
    return [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]


# -- the fixtures ------------------------------------------------------------------------------------


def test_every_small_model_comes_in_every_form_and_every_fixture_in_a_known_one() -> None:
    forms = {"modelopt-int8", "modelopt-int8-sim", "ort-qdq", "ort-qdq-sim", "fp16", "fp16-keepio"}
    by_source: dict[str, set[str]] = {}
    for name in TYPED:
        by_source.setdefault(source(name), set()).add(name.split(".", 1)[1])
    assert {s: by_source.get(s) for s in SMALL_SOURCES} == {s: forms for s in SMALL_SOURCES}
    assert set().union(*by_source.values()) == forms


def test_the_readme_describes_every_fixture() -> None:
    readme = (TYPED_DIR / "README.md").read_text()
    assert [name for name in TYPED if f"`{name}.onnx`" not in readme] == []


@pytest.mark.parametrize("name", TYPED)
def test_fixture_is_a_skeleton_whose_big_tensors_are_all_external_but_quantization_parameters(name: str) -> None:
    skeleton = onnx.load(str(TYPED_DIR / f"{name}.onnx"), load_external_data=False)
    inline = {t.name: t.ByteSize() for t in skeleton.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    quantization_parameters = {i for n in skeleton.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    assert {t: size for t, size in inline.items() if size >= 1024 and t not in quantization_parameters} == {}
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in skeleton.graph.initializer)


def test_refill_depends_on_the_seed_only() -> None:
    name = "det_head.ort-qdq"
    assert load_typed_model(name, seed=0).SerializeToString() == load_typed_model(name, seed=0).SerializeToString()
    assert load_typed_model(name, seed=0).SerializeToString() != load_typed_model(name, seed=1).SerializeToString()


@pytest.mark.parametrize("name", params(TYPED))
def test_refilled_model_passes_the_full_checker(name: str) -> None:
    onnx.checker.check_model(refilled(name), full_check=True)


@pytest.mark.parametrize("name", params(TYPED))
def test_refilled_model_gives_finite_input_dependent_outputs_at_batch_1_and_2(name: str) -> None:
    model = refilled(name)
    runner = session(model)
    pair, other = random_feed(model, 2, seed=1), random_feed(model, 2, seed=2)
    first = {k: v[:1] for k, v in pair.items()}
    for single, batched, changed in zip(runner.run(None, first), runner.run(None, pair), runner.run(None, other)):
        batched, changed = batched.astype(np.float32), changed.astype(np.float32)
        assert np.isfinite(batched).all()
        assert batched.std() > 0
        scale = np.abs(batched).max()
        np.testing.assert_allclose(single[0].astype(np.float32), batched[0], atol=1e-3 * scale)
        assert np.abs(batched - changed).max() > MIN_INPUT_DEPENDENCE * scale


@pytest.mark.parametrize("name", params(QUANTIZED))
def test_refilled_quantizers_are_live_not_saturated(name: str) -> None:
    model = refilled(name)
    quantized = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    values = session(model, quantized).run(None, random_feed(model, 2, seed=1))[len(model.graph.output):]
    saturated, total = {}, 0
    for tensor, value in zip(quantized, values):
        limits = np.iinfo(value.dtype)
        assert len(np.unique(value)) > 1, f"{tensor} is constant"
        saturated[tensor] = int(np.count_nonzero((value == limits.min) | (value == limits.max)))
        total += value.size
    assert {t: n for (t, n), v in zip(saturated.items(), values) if n > MAX_SATURATED_IN_TENSOR * v.size} == {}
    assert sum(saturated.values()) <= MAX_SATURATED_IN_MODEL * total


@pytest.mark.parametrize("name", params(QUANTIZED))
def test_refilled_quantized_weights_are_read_as_such_and_reach_the_end_of_their_range(name: str) -> None:
    """Every conv and linear weight behind a DequantizeLinear is a quantized weight to graphopt (a
    ModelOpt weight's QuantizeLinear and DequantizeLinear got equal scales), and its integers (or
    floats / scale) reach the end of the int8 range in every output channel, as the tools'
    max-abs calibration of the exported weights did, never beyond it."""
    graph = gs.import_onnx(refilled(name))
    layers = [n for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul") and n.inputs[1].inputs and n.inputs[1].inputs[0].op == "DequantizeLinear"]
    assert layers
    for node in layers:
        w = weight(node.inputs[1])
        assert w is not None and w.quantized, node.name
        q = w.quantization
        steps = w.stored.astype(np.float32)
        if q.quantize is not None:  # ModelOpt's form: the float weight in front of QuantizeLinear
            shape = [1] * steps.ndim
            if q.axis is not None:
                shape[q.axis] = -1
            steps = steps / q.scale.astype(np.float32).reshape(shape)
        axes = tuple(i for i in range(steps.ndim) if i != q.axis)
        reach = np.abs(steps).max(axis=axes)
        assert np.allclose(reach, 127, rtol=1e-3), f"{node.name}: {reach}"


# -- the passes on them ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "graph_pass"), pass_params())
def test_each_pass_alone_keeps_outputs_equivalent(name: str, graph_pass: str) -> None:
    _, report = graphopt.optimize(refilled(name), graph_pass)
    assert [(p.name, p.error) for p in report.passes if p.error] == []
    assert report.equivalent, (report.rolled_back, report.final)


@pytest.mark.parametrize("name", params(TYPED))
def test_all_passes_keep_outputs_equivalent_and_reach_a_fixed_point(name: str) -> None:
    optimized, report = graphopt.optimize(refilled(name), "all")
    assert [(p.name, p.error) for p in report.passes if p.error] == []
    assert report.equivalent, report.final
    again, second = graphopt.optimize(optimized, "all", verify=False)
    assert [p.name for p in second.passes if p.changed and not p.canonicalization] == []
    assert node_list(again) == node_list(optimized)
