"""Pass discovery through the `graphopt.passes` entry-point group.

Built-in passes are registered in graphopt's own pyproject.toml exactly as a third-party plugin
registers its passes in its own, so there is one mechanism and plugins are first-class.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from graphopt.errors import SpecError
from graphopt.passbase import GraphPass

ENTRY_POINT_GROUP = "graphopt.passes"


@functools.cache
def available_passes() -> dict[str, type[GraphPass]]:
    """Every registered pass by name, built-ins and plugins alike, sorted by name."""
    found: dict[str, type[GraphPass]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, GraphPass)):
            raise SpecError(f"entry point {ep.name} = {ep.value} is not a GraphPass subclass")
        if cls.name != ep.name:
            raise SpecError(f"entry point {ep.name} = {ep.value} registers a pass named {cls.name!r}")
        found.setdefault(ep.name, cls)
    return dict(sorted(found.items()))


def refresh() -> None:
    """Forget the cached registry (after installing a plugin at run time, e.g. in tests)."""
    available_passes.cache_clear()


def get_pass(name: str) -> type[GraphPass]:
    passes = available_passes()
    if name not in passes:
        raise SpecError(f"unknown pass {name!r}; valid passes: {', '.join(passes) or '(none registered)'}")
    return passes[name]


def default_order() -> list[str]:
    """The passes `--passes all` runs, in order."""
    ordered = [(cls.order, name) for name, cls in available_passes().items() if cls.order is not None]
    return [name for _, name in sorted(ordered)]
