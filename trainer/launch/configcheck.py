"""Checks of ``training.config`` against the trainer's own config tree.

values.schema.json's ``training.config`` is generated from ``trainer.presets.Config`` (every
section and field, with the field's annotated type; ``tests/k8s/config_schema.py``). The same
tree is in this package, so these checks read it directly instead of a copy of the schema:
a misspelt key (``optim.lrr``), a wrong type (``optim.max_iters: "many"``) or a table where a
value belongs is refused naming the dotted key, as ``helm install`` refuses it.

The type rules are the generator's: ``int`` an integer (a whole float counts, as in JSON
Schema), ``float`` any number, ``bool``, ``str``, ``Literal`` one of its values, ``tuple``/``list``
an array of the item type (a fixed-length tuple fixes the length), ``Optional`` adds null,
other unions any arm. The chart-owned keys (``data.shards``, ...) have no type here: the build
refuses them naming the chart value to set instead.

Reading the tree imports the trainer's sections (and torch): it happens once, and only for a
non-empty ``training.config``.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Any, Literal, Mapping

from trainer.launch.fields import fail, show

#: (section, key) set by the chart itself (see trainer.launch.configtoml.CHART_OWNED).
CHART_OWNED = {("data", "shards"), ("train", "run_dir"), ("checkpoint", "url"), ("metrics", "port")}
_ANY = object()  # the type of a chart-owned key: anything passes here


@functools.lru_cache(maxsize=1)
def config_tree() -> dict[str, Any]:
    """``{section: {key: annotated type | nested dict}}`` of the trainer's Config."""
    from trainer.config import _init_fields, _is_section
    from trainer.presets import Config

    def section_types(name: str, section: Any) -> dict[str, Any]:
        from trainer.config import _type_hints

        hints = _type_hints(type(section))
        out: dict[str, Any] = {}
        for f in _init_fields(type(section)):
            value = getattr(section, f.name)
            if _is_section(value):
                out[f.name] = section_types(f"{name}.{f.name}", value)
            elif (name, f.name) in CHART_OWNED:
                out[f.name] = _ANY
            else:
                out[f.name] = hints[f.name]
        return out

    cfg = Config()
    return {f.name: section_types(f.name, getattr(cfg, f.name)) for f in _init_fields(Config)}


def check_config(value: Any, key: str) -> None:
    """Raise SpecError naming the dotted key of the first value the trainer's config refuses."""
    if not value:
        return
    _check_table(value, config_tree(), key)


def _check_table(table: Mapping[str, Any], types_: Mapping[str, Any], key: str) -> None:
    for name, item in table.items():
        sub = f"{key}.{name}"
        if name not in types_:
            known = ", ".join(types_)
            raise fail(sub, f"unknown key {name!r} (the trainer's config has: {known})")
        expected = types_[name]
        if isinstance(expected, dict):
            if not isinstance(item, Mapping):
                raise fail(sub, f"expected a table, got {show(item)}")
            _check_table(item, expected, sub)
        elif expected is not _ANY and not matches(item, expected):
            raise fail(sub, f"expected {describe(expected)}, got {show(item)}{_bool_hint(item, expected)}")


def _bool_hint(value: Any, expected: Any) -> str:
    # YAML 1.1 reads off/on/yes/no as booleans, the common surprise for `train.amp: off`.
    return " (quote it: YAML reads off/on/yes/no as booleans)" if isinstance(value, bool) and \
        matches("off", expected) else ""


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` (from YAML/JSON) is of the annotated type ``tp``, by the schema's rules."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return not isinstance(value, bool) and (isinstance(value, int) or
                                                (isinstance(value, float) and value.is_integer()))
    if tp is float:
        return not isinstance(value, bool) and isinstance(value, (int, float))
    if tp is str:
        return isinstance(value, str)
    if origin is Literal:
        return any(_json_equal(value, a) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        return not args or all(matches(v, args[0]) for v in value)
    if origin in (typing.Union, types.UnionType):
        return (value is None and type(None) in args) or any(matches(value, a) for a in args if a is not type(None))
    return False


def _json_equal(a: Any, b: Any) -> bool:
    """JSON Schema's equality: booleans apart from numbers, 1 equal to 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b)


def describe(tp: Any) -> str:
    """The annotated type in words (``an integer``, ``one of 'auto', 'off'``, ``a list of numbers``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in words:
        return words[tp]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} items ({', '.join(describe(a) for a in args)})"
        return f"a list of items that are each {describe(args[0])}" if args else "a list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    return repr(tp)
