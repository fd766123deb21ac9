"""The typed corpus: INT8 Q/DQ (ModelOpt, ONNX Runtime) and FP16 (AutoCast) forms of real models.

Each fixture in tests/fixtures/typed is refilled with seeded weights (tests/fixtures/zoo.py), must
be a valid model ONNX Runtime runs with finite, input-dependent outputs and live quantizers, and
must go through `--passes all` with equivalent outputs, reaching a fixed point.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.graphs import weight
from tests.fixtures.zoo import TYPED_DIR, load_typed_model, typed_names

TYPED = typed_names()
QUANTIZED = [name for name in TYPED if "int8" in name or "qdq" in name]
# Fixtures of the full-size ImageNet models (/work/realmodels exports): a few seconds each.
SLOW_SOURCES = ("regnet_y_400mf", "mixnet_s", "mnasnet0_5", "tiny_yolo")
# A quantizer whose output sits at the ends of its range this often has lost its input's information.
MAX_SATURATED = 0.25


def source(name: str) -> str:
    return name.split(".")[0]


def params(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if source(n) in SLOW_SOURCES else n for n in names]


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray], extra_outputs: list[str] = ()) -> list[np.ndarray]:
    """ONNX Runtime on CPU with its graph optimizations off; `extra_outputs` are returned after the outputs."""
    if extra_outputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in extra_outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


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


def test_the_corpus_holds_every_form_of_every_source_model() -> None:
    forms = {"modelopt-int8", "modelopt-int8-sim", "ort-qdq", "ort-qdq-sim", "fp16", "fp16-keepio"}
    by_source: dict[str, set[str]] = {}
    for name in TYPED:
        by_source.setdefault(source(name), set()).add(name.split(".", 1)[1])
    assert by_source and all(found == forms for found in by_source.values()), by_source


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
    onnx.checker.check_model(load_typed_model(name), full_check=True)


@pytest.mark.parametrize("name", params(TYPED))
def test_refilled_model_gives_finite_input_dependent_outputs_at_batch_1_and_2(name: str) -> None:
    model = load_typed_model(name)
    pair, other = random_feed(model, 2, seed=1), random_feed(model, 2, seed=2)
    first = {k: v[:1] for k, v in pair.items()}
    for single, batched, changed in zip(run(model, first), run(model, pair), run(model, other)):
        batched, changed = batched.astype(np.float32), changed.astype(np.float32)
        assert np.isfinite(batched).all()
        assert batched.std() > 0
        scale = np.abs(batched).max()
        np.testing.assert_allclose(single[0].astype(np.float32), batched[0], atol=1e-3 * scale)
        assert np.abs(batched - changed).max() > 0.01 * scale


@pytest.mark.parametrize("name", params(QUANTIZED))
def test_refilled_quantizers_are_live_not_saturated(name: str) -> None:
    model = load_typed_model(name)
    quantized = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    values = run(model, random_feed(model, 2, seed=1), quantized)[len(model.graph.output):]
    saturated = {}
    for tensor, value in zip(quantized, values):
        limits = np.iinfo(value.dtype)
        assert len(np.unique(value)) > 1, f"{tensor} is constant"
        saturated[tensor] = float(np.mean((value == limits.min) | (value == limits.max)))
    assert {t: f for t, f in saturated.items() if f > MAX_SATURATED} == {}


@pytest.mark.parametrize("name", QUANTIZED)
def test_refilled_quantized_weights_span_their_calibrated_range(name: str) -> None:
    """Integers (or floats / scale) of every quantized conv and linear weight reach past half the
    int8 range in every output channel and never beyond it: the tool's scales fit the refill."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(load_typed_model(name))
    checked = 0
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or (w := weight(node.inputs[1])) is None or not w.quantized:
            continue
        q = w.quantization
        steps = w.stored.astype(np.float32)
        if q.quantize is not None:  # ModelOpt's form: the float weight in front of QuantizeLinear
            shape = [1] * steps.ndim
            if q.axis is not None:
                shape[q.axis] = -1
            steps = steps / q.scale.astype(np.float32).reshape(shape)
        axes = tuple(i for i in range(steps.ndim) if i != q.axis)
        reach = np.abs(steps).max(axis=axes) if q.axis is not None else np.abs(steps).max()
        assert (reach >= 64).all() and (reach <= 127.5).all(), f"{node.name}: {reach}"
        checked += 1
    assert checked > 0


# -- the passes on them ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", params(TYPED))
def test_all_passes_keep_outputs_equivalent_and_reach_a_fixed_point(name: str) -> None:
    model = load_typed_model(name)
    optimized, report = graphopt.optimize(model, "all")
    assert [(p.name, p.error) for p in report.passes if p.error] == []
    assert report.equivalent, report.final
    again, second = graphopt.optimize(optimized, "all", verify=False)
    assert [p.name for p in second.passes if p.changed and not p.canonicalization] == []
    assert node_list(again) == node_list(optimized)
