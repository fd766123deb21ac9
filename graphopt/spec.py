"""Pipeline specs: `all`, `fc-to-conv,pad-channels(align=16)`, parsed into pass instances.

Option values are converted by the type declared on the pass's options dataclass, so
`align=16` becomes an int and `precision=int8` is checked against its Literal choices. A spec
prints back in the same text (`format_spec`), like an MLIR pass pipeline.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterable
from typing import Any

from graphopt.errors import SpecError
from graphopt.passbase import GraphPass
from graphopt.registry import available_passes, default_order, get_pass

_ITEM = re.compile(r"\s*([a-z0-9][a-z0-9-]*)\s*(?:\((.*?)\))?\s*$")


def parse_spec(spec: str, skip: Iterable[str] = ()) -> list[GraphPass]:
    """Turn a spec into pass instances; `all` expands to the default order minus `skip`."""
    skip = [s.strip() for item in skip for s in item.split(",") if s.strip()]
    for name in skip:
        get_pass(name)  # an unknown name in --skip is a typo worth reporting
    passes: list[GraphPass] = []
    for item in _split_items(spec):
        match = _ITEM.match(item)
        if not match:
            raise SpecError(f"cannot parse pass spec item {item!r}; expected name or name(key=value,...)")
        name, args = match.group(1), match.group(2)
        if name == "all":
            if args:
                raise SpecError("`all` takes no options; give options per pass instead")
            passes.extend(get_pass(n)() for n in default_order() if n not in skip)
        elif name not in skip:
            cls = get_pass(name)
            options = parse_options(cls, args or "")
            try:
                passes.append(cls(**options))
            except ValueError as err:  # raised by an Options.__post_init__ range check
                raise SpecError(f"bad options for {name}: {err}") from None
    if not passes:
        raise SpecError(f"pass spec {spec!r} selects no passes; valid passes: {', '.join(available_passes())}")
    return passes


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
    for pair in filter(None, (p.strip() for p in args.split(","))):
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise SpecError(f"unknown option {pair.split('=')[0].strip()!r} for {cls.name}; valid options: {describe_options(cls)}")
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
    return ",".join(format_pass(p) for p in passes)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)
