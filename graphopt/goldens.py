"""Saved inputs and outputs in polygraphy's own JSON formats.

Outputs are a polygraphy `RunResults` (what `polygraphy run --save-outputs` writes), one
iteration per input set, and inputs a list of feed dicts (what `polygraphy run --save-inputs`
writes), so files move freely between graphopt and polygraphy. By default the inputs sit beside
the outputs as `NAME.inputs.json`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from polygraphy.comparator import RunResults
from polygraphy.comparator.struct import IterationResult
from polygraphy.json import to_json

from graphopt.errors import InputDataError
from graphopt.inputs import quiet_polygraphy
from graphopt.modelio import write_text_atomic

Outputs = Mapping[str, np.ndarray]


def inputs_path_for(outputs_path: str | os.PathLike) -> Path:
    path = Path(outputs_path)
    return path.with_name(path.stem + ".inputs.json")


def save_outputs(path: str | os.PathLike, outputs: Outputs | Sequence[Outputs], runner: str = "onnxruntime") -> None:
    """One iteration per input set; written atomically, like models: a failure never leaves half a golden."""
    per_set = [outputs] if isinstance(outputs, Mapping) else list(outputs)
    results = RunResults()
    results.append((runner, [IterationResult(OrderedDict(saveable(o)), runner_name=runner) for o in per_set]))
    write_text_atomic(path, to_json(results))


def save_inputs(path: str | os.PathLike, feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]]) -> None:
    per_set = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    write_text_atomic(path, to_json([OrderedDict(saveable(feed)) for feed in per_set]))


def saveable(values: Mapping[str, object]) -> dict[str, object]:
    """Values as polygraphy's JSON holds them: it saves arrays with np.save, without pickle.

    String tensors go as numpy unicode arrays, and types numpy lacks (bfloat16, float8, 4-bit) as
    raw bytes of their width, which loading reads back as the type the model declares (numpy would
    record float8_e5m2 as a one-byte float it cannot load).
    """
    return {name: _saveable_value(value) for name, value in values.items()}


def _saveable_value(value: object) -> object:
    if isinstance(value, list):
        return [_saveable_value(item) for item in value]
    if not isinstance(value, np.ndarray):
        return value
    if value.dtype == object:
        return value.astype(str)
    if value.dtype.type.__module__ != "numpy":
        return value.view(f"V{value.dtype.itemsize}")
    return value


def load_outputs(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> list[dict[str, np.ndarray]]:
    """Every iteration of the first runner in a RunResults file: one Outputs per input set.

    Raw bytes saved for types numpy lacks are read as the type `model` declares for that output.
    """
    declared = {o.name: o.type.tensor_type.elem_type for o in model.graph.output if o.type.HasField("tensor_type")} if model else {}
    try:
        with quiet_polygraphy():
            results = RunResults.load(os.fspath(path))
        _, iterations = next(iter(results.items()))
        loaded = [OrderedDict((name, _loaded(value, declared.get(name))) for name, value in iteration.items()) for iteration in iterations]
    except Exception as err:  # polygraphy raises its own exception types for malformed JSON
        raise InputDataError(f"{path}: not a polygraphy RunResults file ({_first_line(err)})") from None
    if not loaded:
        raise InputDataError(f"{path}: a RunResults file without iterations")
    return loaded


def _loaded(value: object, elem_type: int | None) -> object:
    if isinstance(value, (list, type(None))):
        return value
    value = np.asarray(value)
    if value.dtype.kind == "U":
        return value.astype(object)  # ONNX Runtime returns string tensors as object arrays
    if value.dtype.kind == "V" and elem_type:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
        if dtype.itemsize == value.dtype.itemsize:
            return value.view(dtype)
    return value


def _first_line(err: BaseException) -> str:
    """An exception's message folded onto one line, shortened: errors print one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
