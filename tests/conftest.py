"""Shared fixtures: the stand-in plugin package, and the hypothesis profiles."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphopt import registry

PLUGIN_DIR = Path(__file__).parent / "plugins"


@pytest.fixture
def plugin_installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Put the test plugin's distribution on sys.path, as `pip install` would, and rescan."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    registry.refresh()
    yield PLUGIN_DIR
    registry.refresh()
    sys.modules.pop("graphopt_testplugin", None)


@pytest.fixture
def plugin_env() -> dict[str, str]:
    """Environment for a subprocess that should see the test plugin as installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN_DIR), env.get("PYTHONPATH")]))
    return env


# -- hypothesis profiles (tests/test_fuzz.py) --------------------------------------------------------
# `ci` (the default) keeps the fuzz suite within about three minutes on two cores and draws the
# same examples every run; `HYPOTHESIS_PROFILE=long` explores thousands of new ones per spec.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=120, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
# HYPOTHESIS_MAX_EXAMPLES splits the long profile into chunks (one seed each) for many cores.
settings.register_profile("long", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "2000")), deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
