"""Helm's ways of giving values: ``-f`` files merged in order and ``--set`` / ``--set-string``.

``--set`` follows Helm's syntax (``helm.sh/helm/v3/pkg/strvals``):

- ``a.b=c,d=e``: several assignments separated by commas; ``\\,`` ``\\.`` ``\\=`` escape;
- ``list={a,b}``: a list; ``items[0].name=x``: a list element (the list grows as needed);
- values are typed: ``true``/``false`` (any case), ``null`` (removes a default key), integers
  without a leading zero (``8``, but ``08`` and ``1.5`` stay strings); everything else is a string.
  ``--set-string`` keeps every value a string.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from trainer.launch.fields import SpecError


def deep_merge(base: Mapping[str, Any], *overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: maps merged key by key, anything else (lists, nulls) replaced, as Helm merges ``-f`` files."""
    merged = copy.deepcopy(dict(base))
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = deep_merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
    return merged


def read_values_file(path: str) -> dict[str, Any]:
    """One ``-f`` file (YAML; empty means no values).

    Raises:
        SpecError: not readable, not YAML, or not a mapping.
    """
    try:
        import yaml
    except ImportError as err:  # the launch extras bring PyYAML (through kubernetes)
        raise SpecError(f"{path}: reading values files needs PyYAML (pip install 'sam-k8s-trainer[launch]')") from err
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise SpecError(f"{path}: cannot read the values file: {err.strerror or err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SpecError(f"{path}: a values file must hold a mapping, got {type(data).__name__}")
    return dict(data)


def layered_values(value_files: Sequence[str] = (), set_values: Sequence[str] = (),
                   set_string_values: Sequence[str] = ()) -> dict[str, Any]:
    """The values of ``-f`` files, then ``--set``, then ``--set-string`` (Helm's precedence)."""
    values: dict[str, Any] = {}
    for path in value_files:
        values = deep_merge(values, read_values_file(path))
    for expr in set_values:
        parse_set(expr, values, typed=True)
    for expr in set_string_values:
        parse_set(expr, values, typed=False)
    return values


def typed_value(text: str) -> Any:
    """A ``--set`` value as Helm types it: bool, null, int (no leading zero), else the string."""
    lowered = text.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    if lowered == "null":
        return None
    if text == "0":
        return 0
    if text and text[0] != "0":
        body = text[1:] if text[0] in "+-" else text
        if body.isdigit() and body.isascii():
            value = int(text)
            if -(2**63) <= value < 2**63:
                return value
    return text


def _split(text: str, sep: str, keep_braces: bool = False) -> list[str]:
    """Split on unescaped ``sep`` (escapes kept for the next stage); ``keep_braces`` ignores seps inside ``{}``."""
    parts, current, depth, i = [], [], 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            current.append(text[i:i + 2])
            i += 2
            continue
        if keep_braces and char == "{":
            depth += 1
        elif keep_braces and char == "}" and depth:
            depth -= 1
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


_SEGMENT = re.compile(r"^(?P<name>[^\[\]]+)(?P<index>(\[[0-9]+\])*)$")


def _path(key: str, expr: str) -> list[str | int]:
    """``a.b[0].c`` -> ``["a", "b", 0, "c"]``."""
    steps: list[str | int] = []
    for segment in _split(key, "."):
        found = _SEGMENT.match(segment)
        if not found:
            raise SpecError(f"--set {expr}: bad key {key!r} (want a.b.c or a.list[N].b)")
        steps.append(_unescape(found["name"]))
        steps.extend(int(i) for i in re.findall(r"\[([0-9]+)\]", found["index"]))
    return steps


def _assign(dest: Any, steps: list[str | int], value: Any) -> Any:
    """``dest`` with ``value`` stored at ``steps`` (maps and lists created or replaced as needed)."""
    step, rest = steps[0], steps[1:]
    if isinstance(step, int):
        items = list(dest) if isinstance(dest, list) else []
        items.extend([None] * (step + 1 - len(items)))
        items[step] = _assign(items[step], rest, value) if rest else value
        return items
    mapping = dest if isinstance(dest, dict) else {}
    mapping[step] = _assign(mapping.get(step), rest, value) if rest else value
    return mapping


def parse_set(expr: str, values: dict[str, Any], typed: bool = True) -> dict[str, Any]:
    """Apply one ``--set`` expression to ``values`` (in place; also returned).

    Raises:
        SpecError: a part without ``=``, an empty key or a bad index, quoting the expression.
    """
    for assignment in _split(expr, ",", keep_braces=True):
        if not assignment:
            continue
        parts = _split(assignment, "=")
        if len(parts) < 2:
            raise SpecError(f"--set {expr}: key {_unescape(assignment)!r} has no value (want key=value)")
        key, raw = parts[0], "=".join(parts[1:])
        if raw.startswith("{") and raw.endswith("}"):
            items = [_unescape(p) for p in _split(raw[1:-1], ",")]  # Helm reads {} as [""]
            value: Any = [typed_value(p) if typed else p for p in items]
        else:
            value = typed_value(_unescape(raw)) if typed else _unescape(raw)
        _assign(values, _path(key, expr), value)
    return values
