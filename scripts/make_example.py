"""Build examples/tiny_cnn.onnx: a small CNN with one instance of the patterns graphopt rewrites.

Random weights (seeded). The graph, as an exporter emits a training-form RepVGG block:
  conv 3->32 -> Relu -> [3x3 conv 32->32 + 1x1 conv 32->32 + BatchNormalization] summed -> Relu
  -> squeeze-excite (ReduceMean over H,W -> 1x1 -> Relu -> 1x1 -> Sigmoid -> Mul)
  -> Mul by 1 (an identity scale) -> MaxPool -> Flatten -> Gemm -> Relu -> Gemm
`graphopt run --passes all` makes it denser without growing its FLOPs: the three branches become
one 3x3 Conv (reparameterize), the mean a GlobalAveragePool, the head Convs, the Mul by 1 goes.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from tests.fixtures.builders import make_model, node, rand  # noqa: E402


def build() -> onnx.ModelProto:
    he = lambda fan_in: float(np.sqrt(2.0 / fan_in))  # noqa: E731
    weights = {
        "stem_w": rand(32, 3, 3, 3, seed=1, scale=he(27)), "stem_b": rand(32, seed=2, scale=0.1),
        "rep3_w": rand(32, 32, 3, 3, seed=3, scale=he(288)), "rep3_b": rand(32, seed=4, scale=0.1),
        "rep1_w": rand(32, 32, 1, 1, seed=5, scale=he(32)), "rep1_b": rand(32, seed=6, scale=0.1),
        "bn_scale": rand(32, seed=15, scale=0.1) + 1.0, "bn_bias": rand(32, seed=16, scale=0.1),
        "bn_mean": rand(32, seed=17, scale=0.1), "bn_var": np.abs(rand(32, seed=18, scale=0.2)) + 0.5,
        "se_reduce_w": rand(8, 32, 1, 1, seed=7, scale=he(32)), "se_reduce_b": rand(8, seed=8, scale=0.1),
        "se_expand_w": rand(32, 8, 1, 1, seed=9, scale=he(8)), "se_expand_b": rand(32, seed=10, scale=0.1),
        "one": np.array(1.0, np.float32),
        "fc1_w": rand(64, 32 * 4 * 4, seed=11, scale=he(512)), "fc1_b": rand(64, seed=12, scale=0.1),
        "fc2_w": rand(10, 64, seed=13, scale=he(64)), "fc2_b": rand(10, seed=14, scale=0.1),
    }
    nodes = [
        node("Conv", ["images", "stem_w", "stem_b"], ["stem"], name="stem_conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Relu", ["stem"], ["stem_relu"], name="stem_relu"),
        node("Conv", ["stem_relu", "rep3_w", "rep3_b"], ["branch3x3"], name="rep_3x3", pads=[1, 1, 1, 1]),
        node("Conv", ["stem_relu", "rep1_w", "rep1_b"], ["branch1x1"], name="rep_1x1"),
        node("BatchNormalization", ["stem_relu", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["identity"], name="rep_identity"),
        node("Add", ["branch3x3", "branch1x1"], ["rep_sum"], name="rep_add"),
        node("Add", ["rep_sum", "identity"], ["rep"], name="rep_add_identity"),
        node("Relu", ["rep"], ["fire"], name="rep_relu"),
        node("ReduceMean", ["fire"], ["se_pool"], name="se_mean", axes=[2, 3], keepdims=1),
        node("Conv", ["se_pool", "se_reduce_w", "se_reduce_b"], ["se_r"], name="se_reduce"),
        node("Relu", ["se_r"], ["se_r_relu"], name="se_relu"),
        node("Conv", ["se_r_relu", "se_expand_w", "se_expand_b"], ["se_e"], name="se_expand"),
        node("Sigmoid", ["se_e"], ["se_gate"], name="se_sigmoid"),
        node("Mul", ["fire", "se_gate"], ["se_out"], name="se_scale"),
        node("Mul", ["se_out", "one"], ["scaled"], name="identity_scale"),
        node("MaxPool", ["scaled"], ["pooled"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        node("Gemm", ["flat", "fc1_w", "fc1_b"], ["fc1"], name="fc1", transB=1),
        node("Relu", ["fc1"], ["fc1_relu"], name="fc1_relu"),
        node("Gemm", ["fc1_relu", "fc2_w", "fc2_b"], ["logits"], name="fc2", transB=1),
    ]
    return make_model(nodes, {"images": ["batch", 3, 16, 16]}, ["logits"], weights)


if __name__ == "__main__":
    path = ROOT / "examples" / "tiny_cnn.onnx"
    onnx.save_model(build(), str(path))
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
