"""Pipeline specs: the same text on the CLI and in the library."""

import re
import subprocess

import pytest

from graphopt import SpecError
from graphopt.registry import default_order
from graphopt.spec import format_spec, parse_spec
from tests.fixtures.cases import case_path
from tests.test_cli import GRAPHOPT


def options_of(passes, name):
    [found] = [p.options for p in passes if p.name == name]
    return found


def test_all_expands_to_the_default_order():
    assert [p.name for p in parse_spec("all")] == default_order()
    assert default_order()[0] == "simplify"


def test_skip_removes_passes_from_all():
    names = [p.name for p in parse_spec("all", skip=["simplify"])]
    assert "simplify" not in names


def test_options_are_converted_to_their_declared_types(plugin_installed):
    [p] = parse_spec("scale-filter(factor=1.5)")
    assert p.options.factor == 1.5 and isinstance(p.options.factor, float)


def test_options_accept_kebab_case_names(plugin_installed):
    [p] = parse_spec("reweight-convs(wrong-at=conv2)")
    assert p.options.wrong_at == "conv2"


def test_a_spec_prints_back_with_only_non_default_options(plugin_installed):
    passes = parse_spec("simplify, scale-filter(factor=2.0),reweight-convs")
    assert format_spec(passes) == "simplify,scale-filter(factor=2.0),reweight-convs"
    assert format_spec(parse_spec(format_spec(passes))) == format_spec(passes)


def test_bool_options_parse_common_spellings():
    [p] = parse_spec("simplify(optimize=false)")
    assert p.options.optimize is False


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-pass", "unknown pass 'no-such-pass'; valid passes: "),
        ("simplify(alignment=16)", "unknown option 'alignment' for simplify; valid options: optimize (bool, default True)"),
        ("simplify(optimize=maybe)", "bad value 'maybe' for option optimize of simplify; expected true or false"),
        ("simplify(", "unbalanced '('"),
        ("simplify,,simplify", "empty item"),
        ("Simplify", "cannot parse pass spec item"),
        ("all(x=1)", "options of `all` name their pass: all(PASS.OPTION=VALUE), not 'x=1'; passes in all: simplify, "),
    ],
)
def test_bad_specs_are_usage_errors_that_list_what_is_valid(spec, message):
    with pytest.raises(SpecError, match=None) as info:
        parse_spec(spec)
    assert message in str(info.value)


def test_unknown_skip_is_reported():
    with pytest.raises(SpecError, match="unknown pass 'simplfy'"):
        parse_spec("all", skip=["simplfy"])


def test_a_bad_float_value_names_the_expected_type(plugin_installed):
    with pytest.raises(SpecError, match="expected float"):
        parse_spec("scale-filter(factor=big)")


def test_a_spec_that_selects_nothing_is_an_error():
    with pytest.raises(SpecError, match="selects no passes"):
        parse_spec("simplify", skip=["simplify"])


# -- a pass runs once unless the spec says otherwise -------------------------------------------------


def test_a_pass_that_all_already_runs_is_a_usage_error_that_says_what_to_write():
    with pytest.raises(SpecError) as info:
        parse_spec("all,pad-channels(precision=int8)")
    message = str(info.value)
    assert "pad-channels is named twice" in message and "`all` includes it" in message
    assert "all(pad-channels.OPTION=VALUE)" in message and "--set pad-channels.OPTION=VALUE" in message
    assert "+pad-channels" in message


def test_a_pass_listed_twice_is_a_usage_error():
    with pytest.raises(SpecError, match="simplify is named twice"):
        parse_spec("simplify,fc-to-conv,simplify")


def test_a_plus_runs_a_pass_again_on_purpose():
    names = [p.name for p in parse_spec("all,+simplify")]
    assert names == [*default_order(), "simplify"]


def test_a_plus_before_the_first_run_of_a_pass_is_an_error():
    with pytest.raises(SpecError, match=r"\+simplify runs simplify again, but .* does not run it before"):
        parse_spec("+simplify,fc-to-conv")


def test_a_spec_with_a_repeated_pass_prints_back_with_its_plus_and_parses_again():
    passes = parse_spec("pad-channels(align=16),+pad-channels(align=32)")
    assert format_spec(passes) == "pad-channels(align=16),+pad-channels(align=32)"
    assert format_spec(parse_spec(format_spec(passes))) == format_spec(passes)


# -- options of the passes in all --------------------------------------------------------------------


def test_all_sets_an_option_of_one_of_its_passes():
    passes = parse_spec("all(pad-channels.precision=int8, merge-convs.max-flop-growth=3)")
    assert [p.name for p in passes] == default_order()
    assert options_of(passes, "pad-channels").precision == "int8"
    assert options_of(passes, "merge-convs").max_flop_growth == 3.0
    assert format_spec(passes).endswith("merge-convs(max-flop-growth=3.0),pad-channels(precision=int8)")


def test_all_with_an_option_for_a_pass_outside_all_is_an_error_listing_alls_passes(plugin_installed):
    with pytest.raises(SpecError, match=r"sets an option of scale-filter, but it is not one of all's passes; passes in all: simplify, "):
        parse_spec("all(scale-filter.factor=2)")


def test_all_with_an_option_for_a_skipped_pass_is_an_error():
    with pytest.raises(SpecError, match="sets an option of pad-channels, but --skip removes it"):
        parse_spec("all(pad-channels.align=16)", skip=["pad-channels"])


def test_all_with_an_unknown_option_lists_the_valid_ones():
    with pytest.raises(SpecError, match=r"unknown option 'alignment' for pad-channels; valid options: precision \(fp16\|int8"):
        parse_spec("all(pad-channels.alignment=16)")


# -- settings (--set) ----------------------------------------------------------------------------------


def test_a_setting_sets_an_option_wherever_the_spec_runs_the_pass():
    passes = parse_spec("all,+pad-channels", settings=["pad-channels.precision=int8"])
    assert [p.options.precision for p in passes if p.name == "pad-channels"] == ["int8", "int8"]


def test_a_setting_for_a_pass_the_spec_does_not_run_lists_the_passes_it_runs():
    with pytest.raises(SpecError, match="names pad-channels, which pass spec 'fc-to-conv' does not run; passes it runs: fc-to-conv"):
        parse_spec("fc-to-conv", settings=["pad-channels.align=16"])


def test_a_setting_that_is_not_pass_dot_option_is_an_error():
    with pytest.raises(SpecError, match="expected PASS.OPTION=VALUE"):
        parse_spec("all", settings=["precision=int8"])


@pytest.mark.parametrize(("spec", "settings"), [
    ("pad-channels(align=16,align=32)", []),
    ("pad-channels(align=16)", ["pad-channels.align=32"]),
    ("all(pad-channels.align=16)", ["pad-channels.align=32"]),
])
def test_an_option_given_twice_is_an_error_not_an_override(spec, settings):
    with pytest.raises(SpecError, match="option align of pad-channels is given twice"):
        parse_spec(spec, settings=settings)


def test_run_takes_settings_and_prints_the_resolved_pipeline(tmp_path):
    result = subprocess.run(
        [GRAPHOPT, "run", str(case_path("core/conv_stack")), "-o", str(tmp_path / "out.onnx"), "--no-verify",
         "--set", "pad-channels.precision=int8", "--skip", "simplify"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    resolved = [name if name != "pad-channels" else "pad-channels(precision=int8)" for name in default_order() if name != "simplify"]
    assert re.search(f"^{re.escape('pipeline: ' + ','.join(resolved))}$", result.stdout, re.MULTILINE)


def test_run_refuses_a_pass_named_twice_before_doing_any_work(tmp_path):
    result = subprocess.run([GRAPHOPT, "run", str(case_path("core/conv_stack")), "-o", str(tmp_path / "out.onnx"),
                             "--passes", "all,pad-channels(precision=int8)"], capture_output=True, text=True)
    assert result.returncode == 2 and "pad-channels is named twice" in result.stderr
    assert not (tmp_path / "out.onnx").exists()
