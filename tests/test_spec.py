"""Pipeline specs: the same text on the CLI and in the library."""

import pytest

from graphopt import SpecError
from graphopt.registry import default_order
from graphopt.spec import format_spec, parse_spec


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
        ("all(x=1)", "`all` takes no options"),
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
