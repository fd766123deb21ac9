"""Verification of quantized (Q/DQ) graphs: judged region by region on the reference's own integers.

Graph outputs alone cannot judge a Q/DQ graph: an exact rewrite that reorders float additions
flips values on rounding boundaries by one step, and later quantized layers amplify the flips.
graphopt.layerwise cuts both graphs at the quantizers they share and judges every region on the
reference's integers. These tests pin both halves of the claim: exact rewrites pass (though
their outputs differ), and the wrong rewrites users fear (a weight scale 5% off on one channel,
a zero point one step off, two channels swapped, a dropped bias) fail.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner

from graphopt import optimize
from graphopt.cli import main
from graphopt.graphs import weight
from graphopt.layerwise import cut_points, is_quantized
from graphopt.verify import Verifier
from tests.fixtures.builders import make_model, node, rand
from tests.fixtures.zoo import load_typed_model

LAYERS = 8


def deep_quantized_stack(detour: bool = False) -> onnx.ModelProto:
    """LAYERS 3x3 convs, each behind an int8 per-tensor Q/DQ of its input and with int8 per-channel
    weights. `detour` adds 100 to the first conv's output and takes it away again: the same real
    function, rounded differently in float32 (a rewrite that reorders additions does the same)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], {"offset": np.array(100, np.float32)}, "x"
    for i in range(LAYERS):
        inits |= {f"w{i}": rng.integers(-127, 128, (16, 16, 3, 3), dtype=np.int8), f"ws{i}": np.full(16, 1 / 127 / 12, np.float32),
                  f"wz{i}": np.zeros(16, np.int8), f"s{i}": np.array(1 / 50, np.float32), f"z{i}": np.array(0, np.int8),
                  f"b{i}": rand(16, seed=i, scale=0.5)}
        nodes += [node("QuantizeLinear", [x, f"s{i}", f"z{i}"], [f"q{i}"], name=f"quantize{i}"),
                  node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"dq{i}"]),
                  node("DequantizeLinear", [f"w{i}", f"ws{i}", f"wz{i}"], [f"wdq{i}"], axis=0),
                  node("Conv", [f"dq{i}", f"wdq{i}", f"b{i}"], [f"conv{i}"], pads=[1, 1, 1, 1])]
        if i == 0 and detour:
            nodes += [node("Add", ["conv0", "offset"], ["up"]), node("Sub", ["up", "offset"], ["conv0_detoured"])]
        nodes.append(node("Relu", ["conv0_detoured" if i == 0 and detour else f"conv{i}"], [f"relu{i}"]))
        x = f"relu{i}"
    return make_model(nodes, {"x": [1, 16, 32, 32]}, [x], inits, opset=19)


def test_an_exact_rewrite_whose_outputs_differ_passes_layer_wise():
    reference, candidate = deep_quantized_stack(), deep_quantized_stack(detour=True)
    verifier = Verifier(reference)
    verdict, _ = verifier.check(verifier.reference_of_input(reference), candidate, reference)
    assert verdict.passed, verdict.worst.describe()
    assert verdict.layerwise is not None and verdict.layerwise.cut_points == LAYERS
    assert "0 of" not in verdict.layerwise.describe()  # the reordering did flip values by one step
    assert "relative error 0 " not in verdict.layerwise.end_to_end  # ... and they reached the output


def test_an_identical_graph_is_equal_region_by_region():
    model = deep_quantized_stack()
    verifier = Verifier(model)
    end_to_end, _ = verifier.check(verifier.reference_of_input(model), model, model)
    assert end_to_end.passed and end_to_end.layerwise is None  # bit-identical outputs need no cuts
    # Both graphs are cut alike, so untouched regions compute bit for bit what they did.
    verdict = verifier.layerwise(end_to_end, model, model)
    assert verdict.passed and verdict.max_abs_err == 0 and verdict.layerwise.one_step == 0


# -- wrong rewrites, on the tools' own forms -------------------------------------------------------


def per_channel_convs(graph: gs.Graph) -> list[gs.Node]:
    """Quantized convs (per-channel weights) whose output is quantized again within three ops: the
    regions this check is about. A conv in a float16 tail (a detector's last conv, then Sigmoid to
    the output) is judged as any float16 output is, to 1% of the output's scale."""
    return [n for n in graph.nodes if n.op == "Conv" and (w := weight(n.inputs[1])) is not None
            and w.quantized and w.quantization.per_channel and n.attrs.get("group", 1) == 1 and quantized_soon(n)]


def quantized_soon(conv: gs.Node, depth: int = 3) -> bool:
    frontier = [conv]
    for _ in range(depth):
        frontier = [reader for n in frontier for out in n.outputs for reader in out.outputs]
        if any(n.op == "QuantizeLinear" for n in frontier):
            return True
    return False


def mutated(model: onnx.ModelProto, mutation: str, which: int) -> onnx.ModelProto:
    """`model` with one quantized conv (the `which`-th) wrong in the way `mutation` names."""
    graph = gs.import_onnx(model)
    conv = per_channel_convs(graph)[which]
    q = weight(conv.inputs[1]).quantization
    dequantize = q.dequantize
    if mutation == "scale 5% off on one channel":
        scale = q.scale.copy()
        scale[0] *= 1.05
        dequantize.inputs[1] = gs.Constant(f"{dequantize.name}_wrong_scale", scale)
    elif mutation == "zero point one step off":
        zero_point = q.zero_point.copy()
        zero_point[0] += 1
        dequantize.inputs[2] = gs.Constant(f"{dequantize.name}_wrong_zero_point", zero_point)
    elif mutation == "two output channels swapped":
        holder = q.quantize if q.quantize is not None else dequantize
        swapped = holder.inputs[0].values[[1, 0, *range(2, q.scale.size)]]
        scales = q.scale[[1, 0, *range(2, q.scale.size)]]
        holder.inputs[0] = gs.Constant(f"{dequantize.name}_swapped", swapped)
        for quantizer in [n for n in (q.quantize, dequantize) if n is not None]:
            quantizer.inputs[1] = gs.Constant(f"{quantizer.name}_swapped_scale", scales)
    elif mutation == "bias dropped":
        conv.inputs = conv.inputs[:2]
    graph.cleanup()
    wrong = gs.export_onnx(graph)
    del wrong.opset_import[:]
    wrong.opset_import.extend(model.opset_import)
    return wrong


MUTATIONS = ["scale 5% off on one channel", "zero point one step off", "two output channels swapped", "bias dropped"]
# ONNX Runtime's int8 form (fp32 graph, int32 biases) and ModelOpt's (fp16 graph, fp16 weights -> Q -> DQ).
# In ModelOpt's raw export of the detector head, convs have biases; the detector's convs sit before ReLUs and heads.
FORMS = ["det_head.ort-qdq", "det_head.ort-qdq-sim", "det_head.modelopt-int8", "tiny_yolo.modelopt-int8-sim"]


@pytest.fixture(scope="module", params=FORMS)
def quantized(request) -> tuple[str, onnx.ModelProto]:
    model = load_typed_model(request.param, seed=0)
    canonical, _ = optimize(model, "simplify", verify=False)
    return request.param, canonical


# The limit of a float16 graph (ModelOpt computes everything between quantizers in float16): a
# region may move by a quarter of its quantizer's step, as exact rewrites of float16 regions do
# (up to 0.19 step on the typed corpus). In tiny_yolo's CSP fuse convs the folded BatchNorm's
# bias dominates channel 0, so a 5% weight-scale error (or a zero point one step off) moves it
# by less than that.
FLOAT16_LIMIT = {("tiny_yolo.modelopt-int8-sim", "scale 5% off on one channel"),
                 ("tiny_yolo.modelopt-int8-sim", "zero point one step off")}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_wrong_quantized_rewrite_is_not_equivalent(quantized, mutation, request):
    name, model = quantized
    if (name, mutation) in FLOAT16_LIMIT:
        request.applymarker(pytest.mark.xfail(strict=True, reason="under a quarter step, float16's resolution here (see FLOAT16_LIMIT)"))
    convs = per_channel_convs(gs.import_onnx(model))
    verifier = Verifier(model)
    reference = verifier.reference_of_input(model)
    for which in sorted({len(convs) // 3, len(convs) // 2, len(convs) - 1}):
        if mutation == "bias dropped" and len(convs[which].inputs) < 3:
            continue
        verdict, _ = verifier.check(reference, mutated(model, mutation, which), model)
        assert not verdict.passed, f"{name}: {mutation} in {convs[which].name} passed: {verdict.worst.describe()}"


def test_graphopts_own_output_is_equivalent_by_the_cli(tmp_path):
    source, optimized = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(load_typed_model("tiny_yolo.modelopt-int8-sim", seed=0), source)  # merges change float16 rounding
    runner = CliRunner()
    run = runner.invoke(main, ["run", str(source), "-o", str(optimized), "--passes", "all"])
    assert run.exit_code == 0, run.output
    verify = runner.invoke(main, ["verify", str(source), str(optimized)])
    assert verify.exit_code == 0, verify.output
    assert "judged layer-wise at" in verify.output


def test_the_cli_names_the_failing_region(tmp_path):
    model = load_typed_model("det_head.ort-qdq", seed=0)
    wrong = mutated(model, "two output channels swapped", 1)
    onnx.save(model, tmp_path / "ref.onnx")
    onnx.save(wrong, tmp_path / "wrong.onnx")
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "ref.onnx"), str(tmp_path / "wrong.onnx")])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "quantiz" in result.output and "NOT equivalent" in result.output


def test_cut_points_are_the_activation_quantizers_a_rewrite_kept():
    model = deep_quantized_stack()
    assert is_quantized(model)
    assert [c.name for c in cut_points(model, model)] == [f"q{i}" for i in range(LAYERS)]
    # A quantizer whose scale the candidate changed is not a cut point: its region extends.
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for init in changed.graph.initializer:
        if init.name == "s3":
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(1 / 16, np.float32), "s3"))
    assert "q3" not in [c.name for c in cut_points(model, changed)]


def test_contrib_domain_quantizers_are_never_excused_as_rounding():
    """ORT's com.microsoft Q/DQ (which shape inference does not type) make the graph quantized too:
    with no cut point, the whole graph is one region, judged without the rounding allowance."""
    model = deep_quantized_stack()
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            n.domain = "com.microsoft"
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    assert is_quantized(model)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    for init in wrong.graph.initializer:
        if init.name == "ws3":
            scale = onnx.numpy_helper.to_array(init).copy()
            scale[0] *= 1.05
            init.CopyFrom(onnx.numpy_helper.from_array(scale, "ws3"))
    verifier = Verifier(model)
    verdict, _ = verifier.check(verifier.reference_of_input(model), wrong, model)
    assert not verdict.passed and not verifier.warnings
