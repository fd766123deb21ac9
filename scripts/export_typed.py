#!/usr/bin/env python
"""Export the typed corpus: INT8 Q/DQ and FP16 forms of real models, as weight-stripped fixtures.

Runs in a venv of its own with nvidia-modelopt (NOT the project venv), e.g.::

    python3 -m venv /work/typedvenv
    /work/typedvenv/bin/pip install "nvidia-modelopt[onnx]==0.47.0" onnxsim onnxconverter-common
    /work/typedvenv/bin/python scripts/export_typed.py --realmodels /work/realmodels/raw

Why: users bring quantized and half-precision graphs to graphopt, in the forms the common tools
write them, and every pass must be tested on those forms. For each source model (a zoo skeleton
refilled by ``tests/fixtures/zoo.py``, or a raw torch export named with ``--realmodels``) it writes

- ``<model>.modelopt-int8[-sim].onnx``: ModelOpt's ONNX INT8 quantization (CPU calibration on seeded
  random inputs; per-channel weights stored as FLOAT16 constants behind QuantizeLinear ->
  DequantizeLinear, the rest of the graph converted to FP16, opset 19), of the export as it is and
  of its onnxsim-simplified form (``-sim``);
- ``<model>.ort-qdq[-sim].onnx``: ONNX Runtime's ``quantize_static`` in QDQ format, per-channel,
  symmetric INT8 weights and activations (TensorRT's form), weights stored as int8 initializers;
- ``<model>.fp16[-keepio].onnx``: ModelOpt AutoCast to FP16 (``keep_io_types`` off / on).

Every tensor of 1 KiB or more is stored as external data and the data file deleted, as
``scripts/export_zoo.py`` does; QuantizeLinear/DequantizeLinear scales and zero points always stay
inline (they are the calibration, and the refill derives the weights from them).
``tests/fixtures/zoo.py::load_typed_model`` refills the rest.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
from multiprocessing import get_context
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx.external_data_helper import convert_model_to_external_data  # noqa: E402

from tests.fixtures.zoo import TYPED_DIR, load_zoo_model  # noqa: E402

CALIBRATION_SAMPLES = 4
SEED = 0
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

# Small zoo skeletons (tests/fixtures/zoo) and raw exports of /work/realmodels (export_real.py there).
ZOO_SOURCES = ("fc_head_classifier", "det_head", "se_block", "squeezenet1_0", "mobilenet_v3_small")
REAL_SOURCES = ("regnet_y_400mf", "mixnet_s", "mnasnet0_5", "tiny_yolo")


@dataclass(frozen=True)
class Form:
    """One typed form of a model: the file suffix and how it is made from a float model path."""

    suffix: str
    simplified: bool
    make: Callable[[Path, Path, dict[str, np.ndarray]], None]


# --------------------------------------------------------------------------- the tools
def modelopt_int8(src: Path, dst: Path, calibration: dict[str, np.ndarray]) -> None:
    from modelopt.onnx.quantization import quantize

    quantize(str(src), quantize_mode="int8", calibration_data=calibration, calibration_eps=["cpu"],
             calibration_shapes=_shapes_spec(calibration, batch=1), output_path=str(dst), log_level="ERROR")


def ort_qdq(src: Path, dst: Path, calibration: dict[str, np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Samples(CalibrationDataReader):
        def __init__(self) -> None:
            count = next(iter(calibration.values())).shape[0]
            self.samples = iter([{k: v[i:i + 1] for k, v in calibration.items()} for i in range(count)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.samples, None)

    quantize_static(str(src), str(dst), Samples(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": True})


def autocast_fp16(src: Path, dst: Path, calibration: dict[str, np.ndarray], keep_io_types: bool) -> None:
    from modelopt.onnx.autocast import convert_to_mixed_precision

    onnx.save(convert_to_mixed_precision(str(src), "fp16", keep_io_types=keep_io_types, providers=["cpu"]), str(dst))


FORMS = (
    Form("modelopt-int8", False, modelopt_int8),
    Form("modelopt-int8-sim", True, modelopt_int8),
    Form("ort-qdq", False, ort_qdq),
    Form("ort-qdq-sim", True, ort_qdq),
    Form("fp16", False, partial(autocast_fp16, keep_io_types=False)),
    Form("fp16-keepio", False, partial(autocast_fp16, keep_io_types=True)),
)


def _shapes_spec(calibration: dict[str, np.ndarray], batch: int) -> str:
    return ",".join(f"{k}:{'x'.join(str(d) for d in (batch, *v.shape[1:]))}" for k, v in calibration.items())


def calibration_data(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) samples for every float input, batch dim = CALIBRATION_SAMPLES."""
    rng = np.random.default_rng(SEED)
    data = {}
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        shape = (CALIBRATION_SAMPLES, *(d.dim_value for d in dims[1:]))
        if any(d <= 0 for d in shape):
            raise ValueError(f"input {graph_input.name!r} has a dynamic dim besides batch: {shape}")
        data[graph_input.name] = rng.standard_normal(shape, dtype=np.float32)
    return data


def simplified(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as `onnxsim in.onnx out.onnx` writes it."""
    import onnxsim

    with contextlib.redirect_stdout(io.StringIO()):
        model, ok = onnxsim.simplify(model, check_n=0)
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model")
    return model


# --------------------------------------------------------------------------- stripping
def strip_weights(model: onnx.ModelProto, dst: Path) -> None:
    """Save `model` to `dst` with every tensor of 1 KiB or more external, then delete the data.

    Q/DQ scales and zero points stay inline whatever their size: they are the calibration, and the
    refill derives the quantized weights from them.
    """
    # The zoo's stripping rules; imported here, as export_zoo imports torch, which the tool workers need not.
    from export_zoo import SIZE_THRESHOLD, constants_to_initializers

    constants_to_initializers(model, SIZE_THRESHOLD)
    quantization_parameters = {name for n in model.graph.node if n.op_type in QDQ_OPS for name in n.input[1:]}
    weights = dst.with_suffix(".weights")
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=weights.name, size_threshold=SIZE_THRESHOLD)
    for tensor in model.graph.initializer:
        if tensor.name in quantization_parameters:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    model.producer_name = f"{model.producer_name} via graphopt scripts/export_typed.py"
    onnx.save_model(model, str(dst))  # writes the external tensors to `weights`, which is never committed
    weights.unlink(missing_ok=True)


# --------------------------------------------------------------------------- driver
def source_models(realmodels: Path | None, only: set[str] | None) -> dict[str, onnx.ModelProto]:
    sources: dict[str, onnx.ModelProto] = {}
    for name in ZOO_SOURCES:
        if only is None or name in only:
            sources[name] = load_zoo_model(name, seed=SEED)
    for name in REAL_SOURCES:
        if only is not None and name not in only:
            continue
        if realmodels is None or not (realmodels / f"{name}.onnx").is_file():
            print(f"{name}: skipped (no {realmodels}/{name}.onnx)", flush=True)
            continue
        sources[name] = onnx.load(str(realmodels / f"{name}.onnx"))
    return sources


def export(name: str, model: onnx.ModelProto, out: Path, forms: tuple[Form, ...]) -> None:
    calibration = calibration_data(model)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path, sim_path = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.sim.onnx"
        onnx.save(model, str(raw_path))
        onnx.save(simplified(model), str(sim_path))
        for form in forms:
            typed_path = Path(tmp) / f"{name}.{form.suffix}.onnx"
            start = time.perf_counter()
            # Each tool in a process of its own: importing ModelOpt patches onnxruntime.quantization,
            # after which ORT's quantize_static finds no calibration range for the graph input.
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as worker:
                worker.submit(form.make, sim_path if form.simplified else raw_path, typed_path, calibration).result()
            typed = onnx.load(str(typed_path))
            onnx.checker.check_model(typed, full_check=True)
            dst = out / f"{name}.{form.suffix}.onnx"
            strip_weights(typed, dst)
            print(f"{dst.name:44s} {dst.stat().st_size / 1024:7.1f} KiB  nodes {len(typed.graph.node):4d}  "
                  f"{time.perf_counter() - start:5.1f} s", flush=True)


def tool_versions() -> str:
    return ", ".join(f"{p} {version(p)}" for p in ("nvidia-modelopt", "onnxruntime-gpu", "onnx", "onnxsim", "numpy"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TYPED_DIR, help="output directory")
    parser.add_argument("--realmodels", type=Path, help="folder of raw float exports (regnet_y_400mf.onnx, ...)")
    parser.add_argument("--only", action="append", metavar="MODEL", help="export only this source model (repeatable)")
    parser.add_argument("--form", action="append", choices=[f.suffix for f in FORMS], help="export only this form (repeatable)")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer warns once per tensor
    print(tool_versions(), flush=True)
    forms = tuple(f for f in FORMS if args.form is None or f.suffix in args.form)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, model in source_models(args.realmodels, set(args.only) if args.only else None).items():
        export(name, model, args.out, forms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
