"""Chart values <-> the dataclass tree of :class:`trainer.launch.spec.JobSpec`, merged the way Helm merges.

Each value field carries its camelCase key and its check (:mod:`trainer.launch.fields`) in its
metadata; sections are nested dataclasses. Reading values merges them over the field defaults
(Helm's coalescing of user values over values.yaml); writing them back marks removed default
keys with ``null`` so that Helm removes them too.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any, Mapping

from trainer.launch import fields as fl


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _value_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("key")]


def section_kwargs(cls: type, values: Any, path: str) -> dict[str, Any]:
    """Constructor arguments of section ``cls`` from a values mapping at dotted ``path``."""
    if not isinstance(values, Mapping):
        raise fl.fail(path, f"expected a mapping, got {fl.show(values)}")
    known = {f.metadata["key"]: f for f in _value_fields(cls)}
    for key in values:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(known)}"
            raise fl.fail(_join(path, str(key)), f"unknown key (the chart has no such value{hint})")
    kwargs: dict[str, Any] = {}
    for key, f in known.items():
        default = _field_default(f)
        dotted = _join(path, key)
        if key not in values:
            kwargs[f.name] = default
        elif dataclasses.is_dataclass(default):
            kwargs[f.name] = type(default)(**section_kwargs(type(default), values[key], dotted))
        else:
            raw = values[key]
            if raw is None and isinstance(default, (dict, list)):
                raw = type(default)()  # Helm drops the key; the chart reads a missing map or list as empty
            elif isinstance(default, dict) and isinstance(raw, Mapping):
                raw = helm_coalesce(default, raw)
            kwargs[f.name] = f.metadata["check"](raw, dotted)
    return kwargs


def section_values(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in _value_fields(type(obj)):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.metadata["key"]] = section_values(value)
        elif isinstance(value, dict):
            out[f.metadata["key"]] = _with_removed_defaults(_field_default(f), value)
        else:
            out[f.metadata["key"]] = copy.deepcopy(value)
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def helm_coalesce(default: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's merge of a user map over the chart's default map.

    Maps merge key by key; a ``null`` for a key the default has removes that key; any other
    override value (lists too) replaces the default's.
    """
    out = copy.deepcopy(dict(default))
    for key, value in override.items():
        if value is None and key in out:
            del out[key]
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = helm_coalesce(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _with_removed_defaults(default: Any, value: Any) -> Any:
    """``value`` plus ``null`` for each default key it lacks (so a Helm merge removes it too)."""
    if not isinstance(default, Mapping) or not isinstance(value, Mapping):
        return copy.deepcopy(value)
    out = {key: _with_removed_defaults(default.get(key), item) for key, item in value.items()}
    for key in default:
        if key not in value:
            out[key] = None
    return out
