"""Saved inputs and outputs in polygraphy's own JSON formats.

Outputs are a polygraphy `RunResults` (what `polygraphy run --save-outputs` writes) and inputs a
list of feed dicts (what `polygraphy run --save-inputs` writes), so files move freely between
graphopt and polygraphy. By default the inputs sit beside the outputs as `NAME.inputs.json`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from polygraphy.comparator import RunResults
from polygraphy.comparator.struct import IterationResult
from polygraphy.json import load_json, to_json

from graphopt.errors import ModelError
from graphopt.modelio import write_text_atomic


def inputs_path_for(outputs_path: str | os.PathLike) -> Path:
    path = Path(outputs_path)
    return path.with_name(path.stem + ".inputs.json")


def save_outputs(path: str | os.PathLike, outputs: Mapping[str, np.ndarray], runner: str = "onnxruntime") -> None:
    """Written atomically, like models: a failure never leaves half a golden."""
    results = RunResults()
    results.append((runner, [IterationResult(OrderedDict(outputs), runner_name=runner)]))
    write_text_atomic(path, to_json(results))


def save_inputs(path: str | os.PathLike, feed: Mapping[str, np.ndarray]) -> None:
    write_text_atomic(path, to_json([OrderedDict(feed)]))


def load_outputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The first iteration of the first runner in a RunResults file."""
    try:
        results = RunResults.load(os.fspath(path))
        _, iterations = next(iter(results.items()))
        return OrderedDict((name, np.asarray(value)) for name, value in iterations[0].items())
    except Exception as err:  # polygraphy raises its own exception types for malformed JSON
        raise ModelError(f"{path}: not a polygraphy RunResults file ({_first_line(err)})") from None


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        feeds = load_json(os.fspath(path), description="input data")
        return OrderedDict((name, np.asarray(value)) for name, value in feeds[0].items())
    except Exception as err:  # as above: polygraphy's own exception types
        raise ModelError(f"{path}: not a polygraphy input-data file ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    """An exception's message folded onto one line, shortened: errors print one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
