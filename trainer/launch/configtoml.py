"""The trainer's ``config.toml``, byte for byte as ``charts/sam-train/templates/_toml.tpl`` writes it.

Byte for byte matters: the pods carry ``checksum/config`` = sha256 of this text, and a builder
job must look unchanged next to a Helm release of the same values. So the Go formatting that
the chart's template functions use is reproduced here:

- Helm reads every number of the values as a float64 (YAML/JSON), so ints are treated as floats:
  a whole number below 2^53 is written as an integer (``max_iters = 90000``), others as Go's
  ``encoding/json`` writes a float64 (``0.00008``, ``1e-7``, ``1e+21``);
- strings as Go's JSON strings (valid TOML basic strings; ``<``, ``>``, ``&`` become ``\\u003c`` ...);
- ``toString`` of a number is Go's ``%v`` of a float64 (``1e+06`` for 1000000).
"""

from __future__ import annotations

import copy
import math
from decimal import Decimal
from typing import Any, Mapping

from trainer.launch.fields import SpecError

#: Keys the chart sets from its own values: (section, key, the value that owns it).
CHART_OWNED = (("data", "shards", "training.dataShards"), ("train", "run_dir", "training.runDir"),
               ("checkpoint", "url", "training.checkpointUrl"), ("metrics", "port", "monitoring.port"))
HEADER = ("# The trainer's config file (rendered by the sam-train chart). Precedence: the preset below <\n"
          "# this file < the container's --set arguments (training.extraArgs).\n")
_EXACT_INT = 2.0 ** 53


# --------------------------------------------------------------------------- Go number and string formatting


def _digits(value: float) -> tuple[str, int]:
    """The shortest round-trip digits of ``|value|`` and the decimal point position (value = 0.DIGITS x 10^point)."""
    sign, digits, exponent = Decimal(repr(abs(value))).as_tuple()
    text = "".join(map(str, digits)).lstrip("0")
    if not text:
        return "0", 1
    stripped = text.rstrip("0")
    point = len(text) + int(exponent)
    return stripped, point


def _format_f(digits: str, point: int) -> str:
    if point <= 0:
        return "0." + "0" * -point + digits
    if point >= len(digits):
        return digits + "0" * (point - len(digits))
    return digits[:point] + "." + digits[point:]


def _format_e(digits: str, point: int) -> str:
    exponent = point - 1
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


def go_json_float(value: float) -> str:
    """Go's ``json.Marshal`` of a float64 (what Sprig's ``toJson`` writes)."""
    if math.isnan(value) or math.isinf(value):
        raise SpecError(f"{value!r} has no JSON/TOML form")
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0"
    digits, point = _digits(value)
    if abs(value) < 1e-6 or abs(value) >= 1e21:
        text = _format_e(digits, point)
        if text[-4:-1] == "e-0":  # Go cleans e-07 to e-7
            text = text[:-2] + text[-1]
        return sign + text
    return sign + _format_f(digits, point)


def go_format_v(value: float) -> str:
    """Go's ``%v`` of a float64 (``fmt``'s shortest ``%g``, exponent from 1e+06 or below 1e-04)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0"
    digits, point = _digits(value)
    exponent = point - 1
    if exponent < -4 or exponent >= 6:
        return sign + _format_e(digits, point)
    return sign + _format_f(digits, point)


def go_string(value: Any) -> str:
    """Sprig's ``toString`` of a values scalar (numbers are float64 in Helm's values)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return go_format_v(float(value))
    if value is None:
        return "<nil>"
    raise SpecError(f"cannot turn {value!r} into a string")


_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f",
                 "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_json_string(text: str) -> str:
    """Go's ``json.Marshal`` of a string (HTML-safe escapes, other control characters as ``\\u00XX``)."""
    out = []
    for char in text:
        if char in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[char])
        elif ord(char) < 0x20:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def go_kind(value: Any) -> str:
    """Sprig's ``kindOf`` of a values item (the names the chart's messages use)."""
    if value is None:
        return "invalid"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "slice"
    if isinstance(value, Mapping):
        return "map"
    return type(value).__name__


# --------------------------------------------------------------------------- TOML


def toml_key(key: str) -> str:
    """A bare key when it is ``[A-Za-z0-9_-]+``, else a quoted one."""
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return go_json_string(key)


def toml_value(value: Any, path: str) -> str:
    """One TOML value; raises SpecError (the chart's message) for null, a table in a list, others."""
    if isinstance(value, str):
        return go_json_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        number = float(value)
        if number.is_integer() and -_EXACT_INT < number < _EXACT_INT:
            return str(int(number))
        return go_json_float(number)
    if isinstance(value, (list, tuple)):
        items = []
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                raise SpecError(f"{path}[{i}]: a table in a list has no place in the trainer's config (lists hold "
                                f"scalars)")
            items.append(toml_value(item, f"{path}[{i}]"))
        return "[" + ", ".join(items) + "]"
    if value is None:
        raise SpecError(f"{path}: null has no TOML form; remove the key to keep the preset's value")
    raise SpecError(f"{path}: cannot write a {go_kind(value)} as TOML")


def toml_table(table: Mapping[str, Any], header: str, path: str) -> str:
    """A table's ``key = value`` lines, then its sub-tables (``[a.b]``), keys sorted, as the chart writes them."""
    out = [f"\n\n[{header}]"] if header else []
    for key in sorted(table):
        if not isinstance(table[key], Mapping):
            out.append(f"\n{toml_key(key)} = {toml_value(table[key], f'{path}.{key}')}")
    for key in sorted(table):
        if isinstance(table[key], Mapping):
            sub = toml_key(key) if not header else f"{header}.{toml_key(key)}"
            out.append(toml_table(table[key], sub, f"{path}.{key}"))
    return "".join(out)


def config_toml(preset: str, config: Mapping[str, Any], data_shards: str, run_dir: str, checkpoint_url: str,
                metrics_port: int) -> str:
    """The config text (no trailing newline: the checksum is of this; the ConfigMap adds one).

    Raises:
        SpecError: training.config sets a chart-owned key or a non-table section, a required value is
            empty, or a value has no TOML form (the chart's messages).
    """
    cfg = copy.deepcopy(dict(config))
    for section, key, owner in CHART_OWNED:
        if isinstance(cfg.get(section), Mapping) and key in cfg[section]:
            raise SpecError(f"training.config.{section}.{key} is set by the chart from {owner}; set it there and "
                            f"remove training.config.{section}.{key}")
    for name in sorted(cfg):
        if not isinstance(cfg[name], Mapping):
            raise SpecError(f"training.config.{name} must be a table (section -> key -> value), got "
                            f"{go_kind(cfg[name])}")
    if not data_shards:
        raise SpecError("training.dataShards is required: the SA-1B tar shards, e.g. "
                        "--set training.dataShards='gs://bucket/sa1b/sa_*.tar'")
    if not run_dir:
        raise SpecError("training.runDir is required: the run directory on object storage, e.g. "
                        "--set training.runDir=gs://bucket/runs/vit-h-1")
    cfg["data"] = {"shards": data_shards, **dict(cfg.get("data") or {})}
    cfg["train"] = {"run_dir": run_dir, **dict(cfg.get("train") or {})}
    if checkpoint_url:
        cfg["checkpoint"] = {"url": checkpoint_url, **dict(cfg.get("checkpoint") or {})}
    cfg["metrics"] = {"port": int(metrics_port), **dict(cfg.get("metrics") or {})}
    return HEADER + f"preset = {go_json_string(preset)}" + toml_table(cfg, "", "training.config")
