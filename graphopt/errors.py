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
    """An --input-shape is malformed or names no graph input."""


class EquivalenceError(GraphoptError):
    """Two models do not compute the same outputs within tolerance.

    Carries the pipeline's report when it comes from a `--strict` run, so callers can see why.
    """

    exit_code = EXIT_NOT_EQUIVALENT

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report
