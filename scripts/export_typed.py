#!/usr/bin/env python
"""Export the typed corpus: INT8 Q/DQ and FP16 forms of real models, as weight-stripped fixtures.

Runs in a venv of its own with nvidia-modelopt (NOT the project venv), e.g.::

    python3 -m venv /work/typedvenv
    /work/typedvenv/bin/pip install "nvidia-modelopt[onnx]==0.47.0" onnxsim
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

Weights are stored as external data and the data file deleted, as ``scripts/export_zoo.py`` does
(see ``strip_weights`` for which tensors); ``tests/fixtures/zoo.py::load_typed_model`` refills
them. The tools' full outputs can be kept (``--keep DIR``) so that a change of the stripping rules
does not run the tools again.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402
from onnx.external_data_helper import set_external_data  # noqa: E402

from tests.fixtures.zoo import TYPED_DIR, load_zoo_model, refillable_initializers  # noqa: E402

CALIBRATION_SAMPLES = 4
SEED = 0
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

# Zoo skeletons (tests/fixtures/zoo) and raw torch exports (--realmodels), with the forms committed
# to tests/fixtures/typed: every form of the small models; of the ImageNet-size ones (200-700 KiB a
# form, names included) the forms issue 15's measurements are about, keeping the corpus under 2 MB.
# `--all-forms` writes every form of every model.
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
ALL_FORMS = tuple(form.suffix for form in FORMS)
COMMITTED_FORMS = {
    "fc_head_classifier": ALL_FORMS,
    "det_head": ALL_FORMS,
    "se_block": ALL_FORMS,
    "squeezenet1_0": ("modelopt-int8", "ort-qdq", "fp16-keepio"),
    "mobilenet_v3_small": ("ort-qdq-sim",),
    "regnet_y_400mf": ("modelopt-int8", "fp16"),
    "mixnet_s": ("modelopt-int8-sim",),
    "mnasnet0_5": ("ort-qdq-sim",),
    "tiny_yolo": ("modelopt-int8-sim",),
}


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
    """Save `model` to `dst` with its weights external, then delete the data file.

    External: every tensor of 1 KiB or more (as scripts/export_zoo.py) but quantization parameters
    the refill cannot reproduce, and every tensor of more than one element that the refill restores
    in meaning however small (weights, biases, normalization parameters, quantized constants,
    all-zero zero points, scales defined by other scales). Inline: the tools' scales (activations'
    and layer weights'), shape-like constants. value_info goes: every reader infers shapes again,
    and it was a fifth of the bytes.
    """
    # The zoo's stripping rules; imported here, as export_zoo imports torch, which the tool workers need not.
    from export_zoo import SIZE_THRESHOLD, constants_to_initializers

    constants_to_initializers(model, SIZE_THRESHOLD)
    del model.graph.value_info[:]
    refillable = refillable_initializers(model.graph)
    quantization_parameters = {name for n in model.graph.node if n.op_type in QDQ_OPS for name in n.input[1:]}
    weights = dst.with_suffix(".weights")
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor)
        if tensor.name in quantization_parameters:
            external = value.size > 1 and tensor.name in refillable
        else:
            external = tensor.ByteSize() >= SIZE_THRESHOLD or (value.size > 1 and tensor.name in refillable)
        if external:
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))  # onnx writes raw_data only
            set_external_data(tensor, location=weights.name)
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


def export(name: str, model: onnx.ModelProto, out: Path, forms: tuple[Form, ...], keep: Path | None) -> None:
    calibration = calibration_data(model)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path, sim_path = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.sim.onnx"
        onnx.save(model, str(raw_path))
        onnx.save(simplified(model), str(sim_path))
        for form in forms:
            typed_path = (keep or Path(tmp)) / f"{name}.{form.suffix}.onnx"
            start = time.perf_counter()
            if not typed_path.is_file():
                # Each tool in a process of its own: importing ModelOpt patches onnxruntime.quantization,
                # after which ORT's quantize_static finds no calibration range for the graph input.
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as worker:
                    worker.submit(form.make, sim_path if form.simplified else raw_path, typed_path, calibration).result()
            typed = onnx.load(str(typed_path))
            onnx.checker.check_model(typed, full_check=True)
            if (failure := ort_failure(typed, calibration)) is not None:
                print(f"{name}.{form.suffix}: not written, ONNX Runtime cannot run the tool's output: {failure}", flush=True)
                continue
            dst = out / f"{name}.{form.suffix}.onnx"
            strip_weights(typed, dst)
            print(f"{dst.name:44s} {dst.stat().st_size / 1024:7.1f} KiB  nodes {len(typed.graph.node):4d}  "
                  f"{time.perf_counter() - start:5.1f} s", flush=True)


def ort_failure(model: onnx.ModelProto, calibration: dict[str, np.ndarray]) -> str | None:
    """Why ONNX Runtime cannot run `model` on one calibration sample, or None."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {k: v[:1].astype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
                           for (k, v), i in zip(calibration.items(), model.graph.input)})
    except Exception as err:  # ORT raises its own Fail/InvalidArgument types
        return str(err).strip().splitlines()[-1]
    return None


def tool_versions() -> str:
    return ", ".join(f"{p} {version(p)}" for p in ("nvidia-modelopt", "onnxruntime-gpu", "onnx", "onnxsim", "numpy"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TYPED_DIR, help="output directory")
    parser.add_argument("--realmodels", type=Path, help="folder of raw float exports (regnet_y_400mf.onnx, ...)")
    parser.add_argument("--only", action="append", metavar="MODEL", help="export only this source model (repeatable)")
    parser.add_argument("--keep", type=Path, help="keep the tools' full outputs here, and reuse those already there")
    parser.add_argument("--form", action="append", choices=ALL_FORMS, help="export only this form (repeatable)")
    parser.add_argument("--all-forms", action="store_true", help="every form of every model, not only the committed ones")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer warns once per tensor
    print(tool_versions(), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    for name, model in source_models(args.realmodels, set(args.only) if args.only else None).items():
        wanted = ALL_FORMS if args.all_forms else COMMITTED_FORMS[name]
        forms = tuple(f for f in FORMS if f.suffix in wanted and (args.form is None or f.suffix in args.form))
        export(name, model, args.out, forms, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
