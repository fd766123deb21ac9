#!/usr/bin/env python
"""Export weight-stripped ONNX skeletons of real architectures for graphopt's tests.

Runs under a venv with torch/torchvision/timm (NOT the project venv), e.g.::

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm onnx onnxscript numpy
    /work/torchvenv/bin/python scripts/export_zoo.py --out tests/fixtures/zoo

Why skeletons: CI must not need torch or weight downloads. Every model is exported
with RANDOM weights (pretrained=False / weights=None), in eval mode, with a dynamic
batch dim named "batch", through the TorchScript exporter (dynamo=False), and is NOT
simplified (graphopt's own simplify pass must cope with raw exporter output).
Tensors > 1 KiB are saved as external data to ``<name>.weights`` which is then
deleted; small tensors (Reshape shapes, axes, ...) stay inline.
``tests/fixtures/zoo.py::load_zoo_model`` refills the missing weights with seeded
random values.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import torch
import torch.nn as nn

SIZE_THRESHOLD = 1024  # bytes; tensors at least this large are externalized


# --------------------------------------------------------------------------- models
class FcHeadClassifier(nn.Module):
    """Tiny CNN with an FC head (Flatten -> Gemm -> ReLU -> Dropout -> Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((4, 4)),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DetHead(nn.Module):
    """Detection-style head: stride-8 backbone, three parallel 1x1 convs, channel Concat."""

    def __init__(self, num_classes: int = 80) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 96, 3, stride=2, padding=1),
            nn.BatchNorm2d(96),
            nn.ReLU(inplace=True),
        )
        self.cls = nn.Conv2d(96, num_classes, 1)
        self.box = nn.Conv2d(96, 4, 1)
        self.obj = nn.Conv2d(96, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        return torch.cat([torch.sigmoid(self.cls(f)), self.box(f), torch.sigmoid(self.obj(f))], dim=1)


class SEBlock(nn.Module):
    """Standalone squeeze-excite: mean(H,W) -> 1x1 conv -> ReLU -> 1x1 conv -> Sigmoid -> Mul."""

    def __init__(self, channels: int = 32, reduction: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s


def _tv(name: str, **kw: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)

    return build


def _timm(name: str, random_batchnorm: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        model = timm.create_model(name, pretrained=False)
        if random_batchnorm:
            randomize_batchnorm(model)
        return model

    return build


def randomize_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm random statistics and affine parameters (seeded by the caller).

    A fresh BatchNorm is nearly the identity (scale 1, shift 0, mean 0, variance 1), and the
    exporter folds it into the Conv before it. Its parameters stay inline in the skeleton when
    they are under 1 KiB, so without this a training-form block's identity BatchNorm and the
    folded conv biases would be near-trivial in the tests (RepVGG, MobileOne).
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)


@dataclass(frozen=True)
class Spec:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    opset: int = 17


ZOO: dict[str, Spec] = {
    "resnet50": Spec(_tv("resnet50"), (1, 3, 224, 224)),
    "mobilenet_v2": Spec(_tv("mobilenet_v2"), (1, 3, 224, 224)),
    "mobilenet_v3_small": Spec(_tv("mobilenet_v3_small"), (1, 3, 224, 224)),
    "efficientnet_b0": Spec(_tv("efficientnet_b0"), (1, 3, 224, 224)),
    "squeezenet1_0": Spec(_tv("squeezenet1_0"), (1, 3, 224, 224)),
    "googlenet": Spec(_tv("googlenet", aux_logits=False, init_weights=True), (1, 3, 224, 224)),
    "densenet121": Spec(_tv("densenet121"), (1, 3, 224, 224)),
    "inception_v3": Spec(_tv("inception_v3", aux_logits=False, init_weights=True), (1, 3, 299, 299)),
    "vit_tiny_patch16_224": Spec(_timm("vit_tiny_patch16_224"), (1, 3, 224, 224)),
    # Training-form reparameterizable blocks (3x3 + 1x1 + identity BatchNorm, summed by Add).
    "repvgg_a0": Spec(_timm("repvgg_a0", random_batchnorm=True), (1, 3, 224, 224)),
    "mobileone_s0": Spec(_timm("mobileone_s0", random_batchnorm=True), (1, 3, 224, 224)),
    "fc_head_classifier": Spec(FcHeadClassifier, (1, 3, 32, 32)),
    "det_head": Spec(DetHead, (1, 3, 160, 160)),
    "se_block": Spec(SEBlock, (1, 32, 28, 28)),
    "se_block_opset18": Spec(SEBlock, (1, 32, 28, 28), opset=18),
}


# --------------------------------------------------------------------------- export
def constants_to_initializers(model: onnx.ModelProto, min_bytes: int = SIZE_THRESHOLD) -> int:
    """Move big top-level ``Constant`` tensors into initializers so they get externalized."""
    g = model.graph
    keep: list[onnx.NodeProto] = []
    moved = 0
    for node in g.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None and attr.t.ByteSize() >= min_bytes:
                t = onnx.TensorProto()
                t.CopyFrom(attr.t)
                t.name = node.output[0]
                g.initializer.append(t)
                moved += 1
                continue
        keep.append(node)
    if moved:
        del g.node[:]
        g.node.extend(keep)
    return moved


def export_one(name: str, out_dir: Path) -> Path:
    spec = ZOO[name]
    torch.manual_seed(0)
    model = spec.build().eval()
    x = torch.randn(*spec.input_shape)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{name}.onnx"
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td) / f"{name}.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                dynamo=False,  # TorchScript exporter: the classic, most common ONNX in the wild
                opset_version=spec.opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
        m = onnx.load(str(tmp))
    moved = constants_to_initializers(m)
    m.producer_name = f"{m.producer_name} via graphopt scripts/export_zoo.py"
    # Write next to the destination, then drop the weights file: it is never committed.
    weights = out_dir / f"{name}.weights"
    onnx.save_model(
        m,
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=weights.name,
        size_threshold=SIZE_THRESHOLD,
    )
    if weights.exists():
        weights.unlink()
    skel = onnx.load(str(dst), load_external_data=False)
    n_ext = sum(t.data_location == onnx.TensorProto.EXTERNAL for t in skel.graph.initializer)
    print(
        f"{name:24s} opset {spec.opset}  {dst.stat().st_size / 1024:8.1f} KiB  "
        f"nodes {len(skel.graph.node):4d}  initializers {len(skel.graph.initializer):4d} "
        f"(external {n_ext}, constants moved {moved})",
        flush=True,
    )
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("tests/fixtures/zoo"), help="output directory")
    p.add_argument("--only", action="append", choices=sorted(ZOO), metavar="NAME",
                   help="export only this model (repeatable); choices: " + ", ".join(ZOO))
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, onnx {onnx.__version__}", flush=True)
    for name in args.only or list(ZOO):
        export_one(name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
