"""The pass API: a pass finds its sites first and rewrites them second.

Splitting match from rewrite is what lets the pass manager roll back the one site that is wrong
instead of the whole pass: it can ask a pass to rewrite any subset of the sites it found, on a
fresh copy of the graph, and bisect until only verified sites remain.

A pass subclasses `GraphPass`, sets `name`, `summary` and an `Options` dataclass, and writes
`find_sites` (match + named precondition checks, counting each decline by its reason) and
`rewrite_site`. Passes that work on a whole ModelProto (e.g. `simplify`, which wraps onnxsim)
override `apply` instead and report a single site.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import onnx
import onnx_graphsurgeon as gs

from graphopt.graphs import export_like


@dataclass(frozen=True)
class NoOptions:
    """For passes without options."""


OptionsT = TypeVar("OptionsT")


@dataclass(frozen=True)
class Site:
    """One place a pass will rewrite. `key` names it stably (node names), across re-imports."""

    key: str
    payload: Any = field(default=None, compare=False, repr=False)


@dataclass
class PassStats:
    """Counters a pass keeps while it runs, in the spirit of MLIR pass statistics."""

    rewritten: int = 0
    skipped: Counter = field(default_factory=Counter)
    counters: Counter = field(default_factory=Counter)
    details: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1


@dataclass
class PassResult:
    """What a pass did: the sites it found, the ones it rewrote, and its counters."""

    model: onnx.ModelProto
    sites: list[str]
    applied: list[str]
    stats: PassStats

    @property
    def modified(self) -> bool:
        return bool(self.applied)


class GraphPass(Generic[OptionsT]):
    """Base class of every pass. Subclasses set the class attributes and the two hooks."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    # Position in `--passes all`; None keeps a pass out of `all` (it runs only when named).
    order: ClassVar[int | None] = None

    def __init__(self, options: OptionsT | None = None, **overrides: Any) -> None:
        base = options if options is not None else self.Options()
        self.options: OptionsT = dataclasses.replace(base, **overrides) if overrides else base

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # -- the two hooks a graph pass writes -------------------------------------------------------

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        """Match and check preconditions; return the sites to rewrite, count every decline."""
        raise NotImplementedError

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        """Rewrite one site found by `find_sites` on this same graph."""
        raise NotImplementedError

    # -- driven by the pass manager ---------------------------------------------------------------

    def apply(self, model: onnx.ModelProto, only: Collection[str] | None = None) -> PassResult:
        """Rewrite the sites found in `model` (those whose keys are in `only`, if given).

        Returns a new model; `model` itself is never modified. The manager cleans up, sorts and
        checks the result, so a pass does not.
        """
        graph = gs.import_onnx(model)
        stats = PassStats()
        sites = self.find_sites(graph, stats)
        chosen = [s for s in sites if only is None or s.key in only]
        for site in chosen:
            self.rewrite_site(graph, site, stats)
        stats.rewritten = len(chosen)
        if not chosen:
            return PassResult(model, [s.key for s in sites], [], stats)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(export_like(graph, model), [s.key for s in sites], [s.key for s in chosen], stats)

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls.Options))
