"""Value checks of the job description: ``charts/sam-train/values.schema.json`` in Python.

The launcher must work from a pip-installed wheel, without the chart on disk, so the schema's
rules (types, ranges, enums, patterns, lengths) are written here as small check functions,
one per kind of value. Each check takes the raw value and its dotted camelCase key (as Helm
names it in ``--set``) and returns the value to store, or raises :class:`SpecError` naming the
key: ``gpusPerNode: expected an integer, got 'eight'``. ``tests/unit/test_launch_spec.py`` feeds
the schema's own bad cases to both the chart and these checks.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

#: A check: (raw value, dotted key) -> the value to keep. Raises SpecError.
Check = Callable[[Any, str], Any]


class SpecError(ValueError):
    """A job description value is wrong; the message starts with the dotted camelCase key."""


def _anchored(pattern: str) -> re.Pattern[str]:
    """The schema's pattern for ``re.search``; a final ``$`` becomes ``\\Z``.

    JSON Schema patterns are RE2/ECMA: ``$`` matches only at the very end, while Python's ``$``
    also matches before a trailing newline (``"8\\n"`` would pass).
    """
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


#: A Kubernetes quantity (``8``, ``500m``, ``64Gi``, ``1e3``), the schema's pattern.
QUANTITY = _anchored(r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?"
                     r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
#: Resource names: the standard ones or a domain-prefixed extended resource.
RESOURCE_NAME = _anchored(r"^(cpu|memory|ephemeral-storage|hugepages-[0-9A-Za-z]+|"
                          r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
#: A size with a unit (shmSize: ``16Gi``, ``512Mi``, ``1G``).
SIZE_WITH_UNIT = _anchored(r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[kMGTPE])$")
#: Prometheus durations (``30s``, ``15m``, ``1h30m``).
DURATION = _anchored(r"^(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?$")
DNS1035_OR_EMPTY = _anchored(r"^([a-z]([-a-z0-9]*[a-z0-9])?)?$")
DNS1123_LABEL_OR_EMPTY = _anchored(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$")
DNS1123_SUBDOMAIN_OR_EMPTY = _anchored(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$")
ENV_NAME = _anchored(r"^[A-Za-z_][A-Za-z0-9_]*$")
EXTRA_ARG = _anchored(r"^[a-z_]+\.[a-z0-9_]+=")
GCP_SERVICE_ACCOUNT = _anchored(r"^([^@\s]+@[^@\s]+\.iam\.gserviceaccount\.com)?$")
AWS_ROLE_ARN = _anchored(r"^(arn:aws[a-z-]*:iam::[0-9]{12}:role/\S+)?$")
HTTP_URL_OR_EMPTY = _anchored(r"^(https?://\S+)?$")
SEVERITY = _anchored(r"^[a-z][a-z0-9_-]*$")

#: The alerts of files/prometheus-rules.yaml plus the chart's Kubernetes-level ones (severity keys, `disabled`).
ALERTS = ("SamTrainNoProgress", "SamTrainNonFiniteSteps", "SamTrainThroughputDrop", "SamTrainGpuUtilizationLow",
          "SamTrainCheckpointStale", "SamTrainRankMissing", "SamTrainDataSkipsHigh", "SamTrainNotScraped",
          "SamTrainPodsPending", "SamTrainRestartingOften")


def show(value: Any) -> str:
    """A value as an error message shows it: strings quoted, YAML words for bool/null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value)


def go_quote(text: str) -> str:
    """Go's ``%q`` of a plain string (what the chart's messages show)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fail(key: str, message: str) -> SpecError:
    """A SpecError for ``key`` (callers raise it)."""
    return SpecError(f"{key}: {message}" if key else message)


def _bool_hint(value: Any) -> str:
    # YAML 1.1 reads off/on/yes/no as booleans: the most common surprise in values files.
    return " (quote it: YAML reads off/on/yes/no as booleans)" if isinstance(value, bool) else ""


# --------------------------------------------------------------------------- scalars


def integer(minimum: int | None = None, maximum: int | None = None, nullable: bool = False) -> Check:
    """An integer (a whole float such as ``2.0`` counts, as in JSON Schema), optionally null."""
    def check(value: Any, key: str) -> int | None:
        if value is None and nullable:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(key, f"expected an integer{' or null' if nullable else ''}, got {show(value)}")
        _check_range(value, key, minimum, maximum)
        return value
    return check


def number(exclusive_minimum: float | None = None, maximum: float | None = None) -> Check:
    """A number (int or float, not bool) within the bounds."""
    def check(value: Any, key: str) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(key, f"expected a number, got {show(value)}")
        if exclusive_minimum is not None and not value > exclusive_minimum:
            raise fail(key, f"must be greater than {exclusive_minimum}, got {show(value)}")
        _check_range(value, key, None, maximum)
        return value
    return check


def _check_range(value: float, key: str, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise fail(key, f"must be at least {minimum}, got {show(value)}")
    if maximum is not None and value > maximum:
        raise fail(key, f"must be at most {maximum}, got {show(value)}")


def boolean() -> Check:
    """true or false."""
    def check(value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise fail(key, f"expected true or false, got {show(value)}")
        return value
    return check


def string(enum: Sequence[str] | None = None, pattern: re.Pattern[str] | None = None,
           min_length: int | None = None, max_length: int | None = None, what: str = "") -> Check:
    """A string, optionally one of ``enum``, matching ``pattern`` (``what`` describes it), of bounded length."""
    def check(value: Any, key: str) -> str:
        _string(value, key, enum, pattern, min_length, max_length, what)
        return value
    return check


def _string(value: Any, key: str, enum: Sequence[str] | None = None, pattern: re.Pattern[str] | None = None,
            min_length: int | None = None, max_length: int | None = None, what: str = "") -> None:
    if not isinstance(value, str):
        raise fail(key, f"expected a string, got {show(value)}{_bool_hint(value)}")
    if enum is not None and value not in enum:
        raise fail(key, f"expected one of {', '.join(repr(e) for e in enum)}, got {show(value)}")
    if min_length is not None and len(value) < min_length:
        raise fail(key, "must not be empty" if min_length == 1 else f"must have at least {min_length} characters")
    if max_length is not None and len(value) > max_length:
        raise fail(key, f"{show(value)} is {len(value)} characters long; at most {max_length} are allowed")
    if pattern is not None and not pattern.search(value):
        raise fail(key, f"{show(value)} is not {what or 'valid'} (pattern {pattern.pattern})")


def quantity() -> Check:
    """A Kubernetes quantity: a string like ``64Gi`` or a non-negative number."""
    def check(value: Any, key: str) -> str | int | float:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise fail(key, f"expected a quantity (e.g. \"64Gi\", \"500m\", 8), got {show(value)}")
        if isinstance(value, str):
            _string(value, key, pattern=QUANTITY, what="a Kubernetes quantity (e.g. 64Gi, 500m, 8)")
        elif value < 0:
            raise fail(key, f"must be at least 0, got {show(value)}")
        return value
    return check


# --------------------------------------------------------------------------- containers


def mapping() -> Check:
    """A free-form mapping (affinity, security contexts): only its type is checked."""
    def check(value: Any, key: str) -> dict:
        _mapping(value, key)
        return copy.deepcopy(dict(value))
    return check


def _mapping(value: Any, key: str) -> None:
    if not isinstance(value, Mapping):
        raise fail(key, f"expected a mapping, got {show(value)}")
    for k in value:
        if not isinstance(k, str):
            raise fail(key, f"keys must be strings, got {show(k)}")


def string_map(key_pattern: re.Pattern[str] | None = None, key_enum: Sequence[str] | None = None,
               value_pattern: re.Pattern[str] | None = None, scalars: bool = False) -> Check:
    """name -> string (or, with ``scalars``, string/number/bool) with checked names and values."""
    def check(value: Any, key: str) -> dict:
        _mapping(value, key)
        for name, item in value.items():
            sub = f"{key}.{name}"
            if key_pattern is not None and not key_pattern.search(name):
                raise fail(sub, f"the name {name!r} does not match {key_pattern.pattern}")
            if key_enum is not None and name not in key_enum:
                raise fail(sub, f"unknown name {name!r}; one of {', '.join(key_enum)}")
            if scalars:
                if item is None or not isinstance(item, (str, int, float, bool)):
                    raise fail(sub, f"expected a string, number or boolean, got {show(item)}")
            else:
                _string(item, sub, pattern=value_pattern, what="valid")
        return copy.deepcopy(dict(value))
    return check


def resource_map() -> Check:
    """resources.requests/limits: resource name -> quantity."""
    each = quantity()

    def check(value: Any, key: str) -> dict:
        _mapping(value, key)
        for name, item in value.items():
            if not RESOURCE_NAME.search(name):
                raise fail(f"{key}.{name}", f"{name!r} is not a resource name (cpu, memory, ephemeral-storage, "
                                            f"hugepages-<size> or a domain-prefixed name like vpc.amazonaws.com/efa)")
            each(item, f"{key}.{name}")
        return copy.deepcopy(dict(value))
    return check


def object_list(required: Iterable[str] = ("name",), named: bool = False) -> Check:
    """A list of objects (EnvVar, Volume, VolumeMount, Toleration) with ``required`` keys.

    ``named``: ``name`` must also be a non-empty string (the schema says so for env).
    """
    required = tuple(required)

    def check(value: Any, key: str) -> list:
        if not isinstance(value, (list, tuple)):
            raise fail(key, f"expected a list, got {show(value)}")
        for i, item in enumerate(value):
            sub = f"{key}[{i}]"
            _mapping(item, sub)
            for field in required:
                if field not in item:
                    raise fail(sub, f"{field!r} is required")
            if named:
                _string(item["name"], f"{sub}.name", min_length=1)
        return copy.deepcopy(list(value))
    return check


def string_list(pattern: re.Pattern[str] | None = None, enum: Sequence[str] | None = None,
                unique: bool = False, what: str = "") -> Check:
    """A list of strings, each matching ``pattern`` / in ``enum``; ``unique`` forbids repeats."""
    def check(value: Any, key: str) -> list:
        if not isinstance(value, (list, tuple)):
            raise fail(key, f"expected a list, got {show(value)}")
        for i, item in enumerate(value):
            _string(item, f"{key}[{i}]", enum=enum, pattern=pattern, what=what)
        if unique and len(set(value)) != len(value):
            raise fail(key, "items must be unique")
        return list(value)
    return check


def pull_secrets() -> Check:
    """image.pullSecrets: Secret names, or ``{name: ...}`` objects."""
    def check(value: Any, key: str) -> list:
        if not isinstance(value, (list, tuple)):
            raise fail(key, f"expected a list, got {show(value)}")
        for i, item in enumerate(value):
            sub = f"{key}[{i}]"
            if isinstance(item, str):
                _string(item, sub, min_length=1)
            elif isinstance(item, Mapping):
                if "name" not in item:
                    raise fail(sub, "'name' is required")
                _string(item["name"], f"{sub}.name", min_length=1)
            else:
                raise fail(sub, f"expected a Secret name or {{name: ...}}, got {show(item)}")
        return copy.deepcopy(list(value))
    return check


def training_config() -> Check:
    """training.config: the trainer's sections and keys with their types (:mod:`trainer.launch.configcheck`)."""
    def check(value: Any, key: str) -> dict:
        from trainer.launch.configcheck import check_config

        _mapping(value, key)
        check_config(value, key)
        return copy.deepcopy(dict(value))
    return check
