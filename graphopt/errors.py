"""The error family of graphopt and the exit code each maps to on the command line."""

from __future__ import annotations

EXIT_OK = 0
EXIT_NOT_EQUIVALENT = 1
EXIT_USAGE = 2


class GraphoptError(Exception):
    """Base class: a problem graphopt reports in one line, never as a traceback."""

    exit_code = EXIT_USAGE


class SpecError(GraphoptError):
    """A pipeline spec names an unknown pass or option, or gives an option a bad value."""


class ModelError(GraphoptError):
    """The input is not a model graphopt can work on (missing, unreadable, invalid)."""


class OutputPathError(GraphoptError):
    """The output cannot be written where it was asked for."""


class InputShapeError(GraphoptError):
    """An --input-shape is malformed, names no graph input or dimension, or contradicts the model."""


class InputDataError(GraphoptError):
    """Verification inputs cannot be drawn or read: a type graphopt cannot sample, a bad seed, a
    feed too large to hold, or a --load-inputs file or data-loader script that does not fit the model."""


class OptionError(GraphoptError):
    """An option's value is out of range: a tolerance that is not a finite number >= 0, a bad thread count."""


class EquivalenceError(GraphoptError):
    """Two models do not compute the same outputs within tolerance.

    Carries the pipeline's report when it comes from a `--strict` run, so callers can see why.
    """

    exit_code = EXIT_NOT_EQUIVALENT

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report
