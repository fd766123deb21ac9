"""Third-party passes register through the same entry-point group as the built-in ones."""

import subprocess
import sys
from pathlib import Path

from graphopt import available_passes, optimize
from tests.fixtures.cases import load_case


def test_built_in_passes_come_from_the_entry_point_group():
    assert available_passes()["simplify"].__module__ == "graphopt.passes.simplify"


def test_an_installed_plugin_pass_is_listed(plugin_installed):
    assert {"scale-filter", "reweight-convs", "raise-at"} <= set(available_passes())


def test_an_installed_plugin_pass_runs_in_a_pipeline(plugin_installed):
    _, report = optimize(load_case("core/conv_stack"), "simplify,reweight-convs", canonicalize=False)
    assert [p.name for p in report.passes] == ["simplify", "reweight-convs"]
    assert report.passes[1].status == "changed"
    assert report.passes[1].counters == {"convs_reweighted": 3}


def test_plugin_passes_stay_out_of_all_unless_they_ask_for_a_position(plugin_installed):
    _, report = optimize(load_case("core/conv_stack"), "all", verify=False)
    assert not {"scale-filter", "reweight-convs"} & {p.name for p in report.passes}


def test_the_installed_command_lists_a_plugin_pass(plugin_env):
    listing = subprocess.run([str(Path(sys.executable).parent / "graphopt"), "list"], capture_output=True, text=True, env=plugin_env, check=True).stdout
    assert "reweight-convs  [not in all]" in listing
    assert "simplify  [all #1]" in listing


def test_graphopt_does_not_claim_the_global_module_name_passes():
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('passes') is not None)"
    # Run from a directory without a passes/ folder, so only installed packages are visible.
    assert subprocess.run([sys.executable, "-c", probe], cwd="/").returncode == 0
