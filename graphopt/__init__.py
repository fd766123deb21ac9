"""graphopt: a verified pass pipeline that rewrites ONNX graphs into what TensorRT runs best."""

from graphopt.errors import EquivalenceError, GraphoptError, ModelError, OutputPathError, SpecError
from graphopt.passbase import GraphPass, NoOptions, PassResult, PassStats, Site
from graphopt.pipeline import Pipeline, optimize
from graphopt.registry import available_passes
from graphopt.report import PassRecord, Report
from graphopt.verify import Tolerance, Verdict

__version__ = "0.1.0"

__all__ = [
    "EquivalenceError",
    "GraphPass",
    "GraphoptError",
    "ModelError",
    "NoOptions",
    "OutputPathError",
    "PassRecord",
    "PassResult",
    "PassStats",
    "Pipeline",
    "Report",
    "Site",
    "SpecError",
    "Tolerance",
    "Verdict",
    "available_passes",
    "optimize",
]
