"""Pipeline specs: `all`, `fc-to-conv,pad-channels(align=16)`, parsed into pass instances.

    spec  := item ("," item)*
    item  := ["+"] pass ["(" option=value, ... ")"]
           | ["+"] "all" ["(" pass.option=value, ... ")"]

Option values are converted by the type declared on the pass's options dataclass, so
`align=16` becomes an int and `precision=int8` is checked against its Literal choices. `all`
expands to every pass in the default order (less `skip`); its options name their pass:
`all(pad-channels.precision=int8)`. `settings` (the CLI's `--set pad-channels.precision=int8`)
set an option of a pass wherever the spec runs it.

A pass runs once unless the spec says otherwise: naming it twice (`all,pad-channels`, where
`all` already runs pad-channels) is an error, and `+pass` runs it again on purpose
(`all,+simplify`). Giving one option twice (in the item and in `settings`) is an error too,
never a silent override. A spec prints back in the same text (`format_spec`), like an MLIR pass
pipeline, and parses again to the same passes.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from graphopt.errors import SpecError
from graphopt.passbase import GraphPass
from graphopt.registry import available_passes, default_order, get_pass

ALL = "all"
AGAIN = "+"  # before a pass: run it again, on purpose
_ITEM = re.compile(r"\s*(\+)?\s*([a-z0-9][a-z0-9-]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)
_SETTING = re.compile(r"\s*([a-z0-9][a-z0-9-]*)\.([A-Za-z0-9_-]+)\s*=(.*)$", re.DOTALL)


@dataclass
class _Planned:
    """A pass the spec runs, with its options as parsed so far."""

    cls: type[GraphPass]
    options: dict[str, Any] = field(default_factory=dict)
    again: bool = False
    from_all: bool = False

    @property
    def name(self) -> str:
        return self.cls.name


def parse_spec(spec: str, skip: Iterable[str] = (), settings: Iterable[str] = ()) -> list[GraphPass]:
    """Turn a spec into pass instances; `all` expands to the default order minus `skip`.

    `settings` are `pass.option=value` strings applied to every run of that pass in the spec.
    """
    skip = [s.strip() for item in skip for s in item.split(",") if s.strip()]
    for name in skip:
        get_pass(name)  # an unknown name in --skip is a typo worth reporting
    planned: list[_Planned] = []
    for item in _split_items(spec):
        match = _ITEM.match(item)
        if not match:
            raise SpecError(f"cannot parse pass spec item {item!r}; expected name, name(key=value,...) or +name to run a pass again")
        again, name, args = bool(match.group(1)), match.group(2), match.group(3) or ""
        if name == ALL:
            planned += _expand_all(args, skip, again)
        elif name not in skip:
            cls = get_pass(name)
            planned.append(_Planned(cls, parse_options(cls, args), again))
    _check_repeats(planned, spec)
    _apply_settings(planned, settings, spec)
    if not planned:
        raise SpecError(f"pass spec {spec!r} selects no passes; valid passes: {', '.join(available_passes())}")
    passes = []
    for p in planned:
        try:
            passes.append(p.cls(**p.options))
        except ValueError as err:  # raised by an Options.__post_init__ range check
            raise SpecError(f"bad options for {p.name}: {err}") from None
    return passes


def _expand_all(args: str, skip: list[str], again: bool) -> list[_Planned]:
    """`all`'s passes, each with the options `all(pass.option=value, ...)` gives it."""
    names = [n for n in default_order() if n not in skip]
    planned = {name: _Planned(get_pass(name), again=again, from_all=True) for name in names}
    for pair in _pairs(args):
        setting = _SETTING.match(pair)
        if setting is None:
            raise SpecError(f"options of `all` name their pass: all(PASS.OPTION=VALUE), not {pair!r}; passes in all: {', '.join(names)}")
        name, key, raw = setting.groups()
        if name not in planned:
            get_pass(name)  # an unknown pass is reported as such
            why = "--skip removes it" if name in skip else "it is not one of all's passes"
            raise SpecError(f"all({pair}) sets an option of {name}, but {why}; passes in all: {', '.join(names)}")
        _merge(planned[name], parse_options(planned[name].cls, f"{key}={raw}"))
    return list(planned.values())


def _check_repeats(planned: list[_Planned], spec: str) -> None:
    """A pass named twice is a mistake unless its later runs are marked `+pass`."""
    seen: set[str] = set()
    for p in planned:
        if p.name in seen and not p.again:
            included = " (`all` includes it)" if p.from_all or any(q.from_all and q.name == p.name for q in planned) else ""
            raise SpecError(
                f"{p.name} is named twice in pass spec {spec!r}{included}; to set its options within all write "
                f"all({p.name}.OPTION=VALUE) or --set {p.name}.OPTION=VALUE, to run it again on purpose write +{p.name}"
            )
        if p.again and p.name not in seen:
            raise SpecError(f"+{p.name} runs {p.name} again, but pass spec {spec!r} does not run it before; drop the +")
        seen.add(p.name)


def _apply_settings(planned: list[_Planned], settings: Iterable[str], spec: str) -> None:
    for setting in settings:
        match = _SETTING.match(setting)
        if match is None:
            raise SpecError(f"cannot parse setting {setting!r}; expected PASS.OPTION=VALUE, e.g. pad-channels.precision=int8")
        name, key, raw = match.groups()
        runs = [p for p in planned if p.name == name]
        if not runs:
            get_pass(name)
            raise SpecError(f"setting {setting!r} names {name}, which pass spec {spec!r} does not run; "
                            f"passes it runs: {', '.join(dict.fromkeys(p.name for p in planned))}")
        for p in runs:
            _merge(p, parse_options(p.cls, f"{key}={raw}"))


def _merge(planned: _Planned, options: dict[str, Any]) -> None:
    for key, value in options.items():
        if key in planned.options:
            raise SpecError(f"option {key.replace('_', '-')} of {planned.name} is given twice")
        planned.options[key] = value


def _pairs(args: str) -> list[str]:
    return [p.strip() for p in args.split(",") if p.strip()]


def _split_items(spec: str) -> list[str]:
    """Split on commas outside parentheses."""
    items, depth, current = [], 0, []
    for ch in spec:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced ')' in pass spec {spec!r}")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise SpecError(f"unbalanced '(' in pass spec {spec!r}")
    items.append("".join(current))
    if any(not item.strip() for item in items):
        raise SpecError(f"empty item in pass spec {spec!r}")
    return items


def parse_options(cls: type[GraphPass], args: str) -> dict[str, Any]:
    fields = {f.name: f for f in cls.option_fields()}
    hints = typing.get_type_hints(cls.Options)
    values: dict[str, Any] = {}
    for pair in _pairs(args):
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise SpecError(f"unknown option {pair.split('=')[0].strip()!r} for {cls.name}; valid options: {describe_options(cls)}")
        if key in values:
            raise SpecError(f"option {key.replace('_', '-')} of {cls.name} is given twice")
        values[key] = _convert(cls, key, hints[key], raw.strip())
    return values


def _convert(cls: type[GraphPass], key: str, hint: Any, raw: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):  # Optional[X]
        if raw.lower() in ("none", ""):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = f"bad value {raw!r} for option {key.replace('_', '-')} of {cls.name}"
    if origin is typing.Literal:
        choices = [str(a) for a in args]
        if raw not in choices:
            raise SpecError(f"{bad}; choose one of: {', '.join(choices)}")
        return args[choices.index(raw)]
    if hint is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SpecError(f"{bad}; expected true or false")
    if hint in (int, float, str):
        try:
            return hint(raw)
        except ValueError:
            raise SpecError(f"{bad}; expected {hint.__name__}") from None
    raise SpecError(f"option {key} of {cls.name} has unsupported type {hint!r}")


def describe_options(cls: type[GraphPass]) -> str:
    hints = typing.get_type_hints(cls.Options)
    parts = [f"{f.name.replace('_', '-')} ({_type_name(hints[f.name])}, default {_default(f)})" for f in cls.option_fields()]
    return ", ".join(parts) or "(this pass takes no options)"


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(hint))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return _type_name(args[0]) + " or none"
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def format_pass(p: GraphPass) -> str:
    """A pass in spec syntax, with only the options that differ from their defaults."""
    changed = [
        f"{f.name.replace('_', '-')}={_format_value(getattr(p.options, f.name))}"
        for f in p.option_fields()
        if getattr(p.options, f.name) != _default(f)
    ]
    return f"{p.name}({','.join(changed)})" if changed else p.name


def format_spec(passes: Iterable[GraphPass]) -> str:
    """The spec that parses back to these passes: a pass's later runs are marked `+pass`."""
    seen: set[str] = set()
    items = []
    for p in passes:
        items.append((AGAIN if p.name in seen else "") + format_pass(p))
        seen.add(p.name)
    return ",".join(items)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)
