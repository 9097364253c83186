"""Typed config tree: keyword-only dataclasses, TOML files and dotted CLI overrides.

Each module owns one section dataclass (``ModelConfig`` in ``trainer.model.build``,
``DataConfig`` in ``trainer.data.config``, ...); the root ``Config`` in
``trainer.presets`` composes them and ``PRESETS`` names whole recipes. This module holds
the generic machinery (it works on any dataclass tree) plus the sections that the engine
itself owns:
:class:`TrainConfig`, :class:`CheckpointConfig`, :class:`EvalConfig`, :class:`LogConfig`.

Precedence, lowest first::

    preset (or the root's defaults)  <  TOML file  <  --set dotted.key=value

A TOML file mirrors the tree with one table per section and may name the preset it
starts from with a top-level ``preset = "vit_b"``::

    preset = "tiny_cpu"
    [optim]
    lr = 1e-4
    [train]
    run_dir = "gs://bucket/runs/exp1"

Override values are parsed by the field's annotated type (``int``, ``float``, ``bool``,
``str``, ``Literal``, ``Optional``, ``tuple``); tuples take ``a,b,c`` or a TOML array
``[1, 2]``; ``none`` sets an ``Optional`` field to ``None``. Unknown keys, wrong types and
values that a section's ``__post_init__`` rejects raise :class:`ConfigError` naming the
dotted key, e.g. ``optim.lr: must be > 0, got -1.0``. Sections name the bad field first
in their ``ValueError`` message as ``lr: ...``, ``optim.lr ...`` or ``OptimConfig.lr: ...``;
the loader turns each into the dotted key. The root may define ``validate()`` for
cross-section checks; it names full dotted keys itself.

Importing this module imports no torch (launch tooling can use the machinery cheaply);
building a :class:`Config` imports the sections' modules, which do.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import functools
import math
import sys
import tomllib
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence, TypeVar

from trainer.storage import StorageError, open_url

if TYPE_CHECKING:  # the real imports are lazy: these modules import torch
    pass

T = TypeVar("T")

#: Exit status for config and usage errors; same value as ``trainer.dist.ExitCode.CONFIG``
#: (kept here so that this module needs no torch import; a test keeps them equal).
EXIT_CONFIG_ERROR = 2
#: Top-level TOML key naming the preset that a file starts from.
PRESET_KEY = "preset"
_NONE_WORDS = ("none", "null")


class ConfigError(Exception):
    """A config key is unknown, mistyped or impossible; the message names the dotted key."""


# --------------------------------------------------------------------------- sections


@dataclass(kw_only=True)
class TrainConfig:
    """How the training loop runs (iteration counts and schedules live in ``optim``).

    Attributes:
        run_dir: URL or local path of the run directory (``gs://b/runs/x``, ``runs/x``);
            the resolved config, checkpoints and logs go under it.
        seed: base random seed; each rank derives its own from it.
        device: ``auto`` picks CUDA when available, else CPU; ``cuda`` fails without a GPU.
        amp: mixed precision: ``auto`` is bf16 on CUDA and off on CPU; ``off`` is fp32.
        compile: wrap the model in ``torch.compile``.
        grad_accum: micro-batches per optimizer step (effective batch = batch × this × world).
        grad_clip: max global L2 norm of gradients; 0 disables clipping. Not the paper's
            recipe (it states none, SAM_RECIPE.md §1 and Discrepancies 6; SAM 2 clips at
            0.1): the paper presets set 0, ``tiny_cpu`` keeps 1.0 for stable CPU demos. The
            norm before clipping is computed and reported (``grad_norm``) either way.
        find_unused_parameters: DDP flag; needed when some parameters get no gradient in a
            step (e.g. the mask-prompt encoder when no mask prompts are sampled).
        log_every: iterations between metric log lines.
        max_nonfinite_steps: consecutive steps with a non-finite loss that are skipped
            (no optimizer update) before all ranks abort with ``ExitCode.NONFINITE``;
            0 aborts on the first one.
        deterministic: ``torch.use_deterministic_algorithms`` and no cuDNN autotuning
            (slower; for debugging and reproducibility tests).
        allow_tf32: TF32 matmuls/convolutions on Ampere+ (fp32 runs only).
        cpu_retain_memory: on CPU runs, keep freed memory in the process (glibc
            ``mallopt``) instead of returning it to the OS and page-faulting it back
            every round (5-25% faster decoder rounds on a 2-core VM; ``trainer.allocator``).
    """

    run_dir: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"
    compile: bool = False
    grad_accum: int = 1
    grad_clip: float = 1.0
    find_unused_parameters: bool = False
    log_every: int = 10
    max_nonfinite_steps: int = 3
    deterministic: bool = False
    allow_tf32: bool = True
    cpu_retain_memory: bool = True

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir: must not be empty")
        _check(self.grad_accum >= 1, "grad_accum", "must be >= 1", self.grad_accum)
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)", self.grad_clip)
        _check(self.log_every >= 1, "log_every", "must be >= 1", self.log_every)
        _check(self.max_nonfinite_steps >= 0, "max_nonfinite_steps", "must be >= 0",
               self.max_nonfinite_steps)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where and how often checkpoints are written (see ``trainer.checkpoint``).

    Attributes:
        url: checkpoint root URL; empty means ``<train.run_dir>/checkpoints``
            (see :meth:`resolve_url`).
        every: iterations between checkpoints; 0 saves only at the end and on preemption.
        keep_last: complete checkpoints kept after each save; 0 keeps all.
        resume: ``auto`` resumes from the newest complete checkpoint under ``url`` when one
            exists; ``off`` starts from scratch and needs a ``url`` without step dirs (an
            older run's newer steps would win at the next resume and in pruning).
        fresh_if_unusable: with ``resume=auto``, start from step 0 when step dirs exist but
            none is usable. Off by default: then the run refuses to start (exit 2, naming
            each dir and its problem) unless a crash explains it (a single dir without a
            marker: the first save was interrupted). Safe to leave on across pod restarts:
            it only acts while no usable checkpoint exists.
    """

    url: str = ""
    every: int = 1000
    keep_last: int = 3
    resume: Literal["auto", "off"] = "auto"
    fresh_if_unusable: bool = False

    def __post_init__(self) -> None:
        _check(self.every >= 0, "every", "must be >= 0 (0 disables periodic saves)", self.every)
        _check(self.keep_last >= 0, "keep_last", "must be >= 0 (0 keeps all)", self.keep_last)

    def resolve_url(self, run_dir: str) -> str:
        """The checkpoint root: ``url`` or, when empty, ``<run_dir>/checkpoints``."""
        return self.url or f"{run_dir.rstrip('/')}/checkpoints"


@dataclass(kw_only=True)
class EvalConfig:
    """Periodic evaluation on held-out shards.

    Attributes:
        shards: URLs or globs of evaluation shards; empty disables evaluation.
        every: iterations between evaluations; 0 evaluates only at the end.
        num_images: images per evaluation (taken in shard order); 0 uses all.
        batch_size: images per rank per evaluation batch.
        max_masks_per_image: masks scored per image, sampled with a fixed seed (the same
            as ``sam-train eval --max-masks``, whose default is also 64).
        at_end: also evaluate after the last iteration.
    """

    shards: tuple[str, ...] = ()
    every: int = 5000
    num_images: int = 500
    batch_size: int = 4
    max_masks_per_image: int = 64
    at_end: bool = True

    def __post_init__(self) -> None:
        _check(self.every >= 0, "every", "must be >= 0", self.every)
        _check(self.max_masks_per_image >= 1, "max_masks_per_image", "must be >= 1", self.max_masks_per_image)
        _check(self.num_images >= 0, "num_images", "must be >= 0 (0 uses all)", self.num_images)
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)


@dataclass(kw_only=True)
class LogConfig:
    """Log lines (metric sinks beyond the log and ``metrics.jsonl`` come with the metrics work).

    Attributes:
        level: log level on rank 0; other ranks log WARNING and above.
        format: ``auto`` writes human lines to a terminal and JSON lines otherwise (pods);
            the environment variable ``SAM_LOG_FORMAT`` overrides ``auto``.
    """

    level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    format: Literal["auto", "text", "json"] = "auto"


@dataclass(kw_only=True)
class MetricsConfig:
    """Prometheus export (``trainer.prom``); the log and ``metrics.jsonl`` are always on.

    Attributes:
        port: base HTTP port; the process with ``LOCAL_RANK`` l serves ``/metrics`` on
            ``port + l``. 0 disables Prometheus export (no socket is opened).
        addr: address to bind (``0.0.0.0`` in pods so Prometheus can scrape the pod IP).
        run_name: value of the ``run`` label on every series; empty means the environment
            variable ``SAM_RUN_NAME``, else the last path component of ``train.run_dir``.
        peak_tflops: the device's dense bf16 peak per GPU in TFLOP/s for MFU; 0 looks the
            GPU up in ``trainer.flops.PEAK_BF16_TFLOPS`` (unknown devices, CPUs: no MFU).
        final_scrape_wait_s: at the end of a run keep serving until one scrape has read the
            final values, at most this long (0: exit at once; the last values may be lost).
        gpu: export per-GPU series read from NVML at scrape time.
    """

    port: int = 0
    addr: str = "0.0.0.0"
    run_name: str = ""
    peak_tflops: float = 0.0
    final_scrape_wait_s: float = 30.0
    gpu: bool = True

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", "must be in 0..65535 (0 disables)", self.port)
        _check(self.peak_tflops >= 0, "peak_tflops", "must be >= 0 (0 looks the device up)", self.peak_tflops)
        _check(self.final_scrape_wait_s >= 0, "final_scrape_wait_s", "must be >= 0", self.final_scrape_wait_s)
        _check(bool(self.addr), "addr", "must not be empty", self.addr)


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    """Raise the ``ValueError`` form the loader turns into ``section.name: rule, got v``."""
    if not ok:
        raise ValueError(f"{name}: {rule}, got {value!r}")


# --------------------------------------------------------------------------- schema


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """Field annotations of ``cls``; unresolvable ones (sections imported lazily) are None."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        module = vars(sys.modules[cls.__module__])
        hints: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            try:
                hints[f.name] = eval(f.type, module) if isinstance(f.type, str) else f.type
            except NameError:
                hints[f.name] = None  # the default instance tells the section type
        return hints


def _is_section(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _unknown_key(key: str, known: Sequence[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
    return ConfigError(f"{key}: unknown key{hint}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin in (tuple, list):
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))


# --------------------------------------------------------------------------- coercion


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a TOML/Python ``value`` against annotation ``tp``; return it normalized."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is None or tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or
                                   (isinstance(value, str) and value.lower() in _NONE_WORDS)):
            return None
        for arg in args:
            if arg is not type(None):
                with contextlib.suppress(ConfigError):
                    return _coerce(value, arg, key)
        raise bad
    if origin is Literal:
        # `type(a) is type(value)` keeps True from matching 1.
        if any(type(a) is type(value) and a == value for a in args):
            return value
        raise bad
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if args and len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            elem = args[0] if args else Any
            items = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # nan/inf pass every `>= 0` check and fail inside torch
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int and isinstance(value, bool):
        raise bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def _parse_text(text: str, tp: Any, key: str) -> Any:
    """Parse a ``--set`` value string by annotation ``tp``; the result goes to _coerce."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{key}: cannot parse {text!r} as {_type_name(tp)}")
    if tp is None or tp is Any or tp is str:
        return text
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in _NONE_WORDS:
            return None
        for arg in args:
            if arg is not type(None):
                with contextlib.suppress(ConfigError):
                    return _coerce(_parse_text(text, arg, key), arg, key)
        raise bad
    if origin is Literal:
        for arg in args:
            if (str(arg).lower() if isinstance(arg, bool) else str(arg)) == text.strip():
                return arg
        raise ConfigError(f"{key}: must be {_type_name(tp)}, got {text!r}")
    if origin in (tuple, list):
        text = text.strip()
        if text.startswith("["):
            try:
                return tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"{key}: invalid array {text!r}: {err}") from err
        parts = [p.strip() for p in text.split(",")] if text else []
        fixed = origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis)
        elem_types = list(args) if fixed else [args[0] if args else Any] * len(parts)
        if fixed and len(parts) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} comma-separated items, got {text!r}")
        return [_parse_text(p, t, f"{key}[{i}]") for i, (p, t) in enumerate(zip(parts, elem_types, strict=True))]
    if tp is bool:
        word = text.strip().lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off"):
            return False
        raise bad
    if tp is int:
        with contextlib.suppress(ValueError):
            return int(text)
        with contextlib.suppress(ValueError, OverflowError):
            number = float(text)  # accept 1e5 for iteration counts
            if number.is_integer():
                return int(number)
        raise bad
    if tp is float:
        with contextlib.suppress(ValueError):
            return float(text)
        raise bad
    raise ConfigError(f"{key}: --set cannot parse type {_type_name(tp)}; use a TOML file")


# --------------------------------------------------------------------------- building


def _section_error(path: str, cls: type, err: Exception) -> ConfigError:
    """Name the dotted key in a section's ``__post_init__`` error."""
    msg = str(err)
    if path and msg.startswith(path):
        return ConfigError(msg)  # already dotted: "optim.lr must be >= 0"
    if msg.startswith(f"{cls.__name__}."):  # "DataConfig.shards: ..." -> "data.shards: ..."
        msg = msg[len(cls.__name__) + 1:]
    names = [f.name for f in _init_fields(cls)]
    first = msg.split(":", 1)[0].split(" ", 1)[0].split("=", 1)[0]
    if first in names:
        return ConfigError(f"{path}{msg}")  # "lr: must be > 0" -> "optim.lr: must be > 0"
    where = path.rstrip(".") or cls.__name__
    return ConfigError(f"{where}: {msg}")


def _build(cls: type[T], base: T, data: Mapping[str, Any], path: str = "") -> T:
    """A new ``cls`` with ``data`` (nested dict) laid over ``base``, validated."""
    names = [f.name for f in _init_fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(f"{path}{key}", names)
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name in names:
        current = getattr(base, name)
        key = f"{path}{name}"
        if name not in data:
            kwargs[name] = current
        elif _is_section(current):
            raw = data[name]
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{key}: is a section; expected a table, got {raw!r}")
            kwargs[name] = _build(type(current), current, raw, f"{key}.")
        else:
            kwargs[name] = _coerce(data[name], hints.get(name), key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise _section_error(path, cls, err) from err


def _overrides_to_dict(base: Any, overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=1e-4", ...]`` into a nested dict of typed values."""
    out: dict[str, Any] = {}
    for item in overrides:
        dotted, sep, text = item.partition("=")
        dotted = dotted.strip()
        if not sep or not dotted:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
        node, target, parts = base, out, dotted.split(".")
        for depth, part in enumerate(parts):
            key = ".".join(parts[: depth + 1])
            if not _is_section(node):
                raise ConfigError(f"{key}: {'.'.join(parts[:depth])} is not a section")
            names = [f.name for f in _init_fields(type(node))]
            if part not in names:
                raise _unknown_key(key, names)
            if depth == len(parts) - 1:
                if _is_section(getattr(node, part)):
                    raise ConfigError(f"{key}: is a section; set its fields, e.g. {key}.<field>=...")
                target[part] = _parse_text(text, _type_hints(type(node)).get(part), key)
            else:
                node = getattr(node, part)
                target = target.setdefault(part, {})
    return out


def _merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested dicts; ``high`` wins."""
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _validate(cfg: T) -> T:
    """Run the root's cross-section ``validate()`` hook, if it has one."""
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        try:
            hook()
        except ValueError as err:
            raise ConfigError(str(err)) from err
    return cfg


def read_toml(url: str) -> dict[str, Any]:
    """Parse a TOML file from any storage URL; errors become :class:`ConfigError`."""
    try:
        with open_url(url, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as err:
        raise ConfigError(f"{url}: config file not found") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{url}: invalid TOML: {err}") from err
    except (OSError, StorageError) as err:
        raise ConfigError(f"{url}: cannot read config file: {err}") from err


def load_config(
    root_cls: type[T],
    preset_or_file: str = "",
    overrides: Sequence[str] = (),
    presets: Mapping[str, Callable[[], T]] | None = None,
) -> T:
    """Resolve a config: preset or defaults < TOML file < dotted overrides.

    Args:
        root_cls: the root dataclass; ``root_cls()`` gives the defaults.
        preset_or_file: a name in ``presets``, a TOML path/URL (its optional top-level
            ``preset = "name"`` picks the starting preset), or ``""`` for the defaults.
        overrides: ``"section.field=value"`` strings, applied last.
        presets: named factories returning a ``root_cls`` instance.

    Raises:
        ConfigError: unknown preset or key, wrong type, or a value a section rejects.
    """
    cfg, problem = resolve_config(root_cls, preset_or_file, overrides, presets)
    if problem is not None:
        raise ConfigError(problem)
    return cfg


def resolve_config(
    root_cls: type[T],
    preset_or_file: str = "",
    overrides: Sequence[str] = (),
    presets: Mapping[str, Callable[[], T]] | None = None,
) -> tuple[T, str | None]:
    """Like :func:`load_config`, but the root's cross-section ``validate()`` does not raise.

    Returns the config and the validation problem (``None`` when it validates), so a
    preset whose required keys are still placeholders (``data.shards`` of the paper
    presets) can be shown. Section checks and unknown keys still raise ``ConfigError``.
    """
    presets = dict(presets or {})
    file_data: dict[str, Any] = {}
    preset = ""
    if preset_or_file in presets:
        preset = preset_or_file
    elif preset_or_file:
        if not (preset_or_file.endswith(".toml") or "/" in preset_or_file):
            known = ", ".join(sorted(presets)) or "none"
            raise ConfigError(f"{preset_or_file!r} is neither a preset ({known}) nor a .toml file")
        file_data = read_toml(preset_or_file)
        preset = file_data.pop(PRESET_KEY, "")
        if preset and preset not in presets:
            raise ConfigError(f"{preset_or_file}: {PRESET_KEY}: unknown preset {preset!r} "
                              f"(known: {', '.join(sorted(presets)) or 'none'})")
    base = presets[preset]() if preset else root_cls()
    if not isinstance(base, root_cls):
        raise TypeError(f"preset {preset!r} returned {type(base).__name__}, not {root_cls.__name__}")
    data = _merge(file_data, _overrides_to_dict(base, overrides))
    cfg = _build(root_cls, copy.deepcopy(base), data)
    try:
        _validate(cfg)
    except ConfigError as err:
        return cfg, str(err)
    return cfg, None


# --------------------------------------------------------------------------- dumping


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config (tuples become lists), e.g. for JSON logging."""

    def plain(value: Any) -> Any:
        if _is_section(value):
            return {f.name: plain(getattr(value, f.name)) for f in _init_fields(type(value))}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def from_dict(root_cls: type[T], data: Mapping[str, Any], base: T | None = None) -> T:
    """Build ``root_cls`` from a nested dict (missing keys from ``base`` or the defaults)."""
    return _validate(_build(root_cls, copy.deepcopy(base) if base else root_cls(), data))


def _toml_value(value: Any, key: str) -> str:
    if value is None:
        return '"none"'  # TOML has no null; Optional fields read "none" back as None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # inf/nan and 1e-05 are valid TOML
    if isinstance(value, str):
        escaped = "".join(
            {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch)
            or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
            for ch in value)
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, key) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(v, key)}" for k, v in value.items()) + "}"
    raise ConfigError(f"{key}: cannot write {type(value).__name__} to TOML")


def dump_toml(cfg: Any, header: str = "") -> str:
    """The config as TOML that :func:`load_config` reads back to an equal config."""
    lines = [f"# {line}" for line in header.splitlines()]

    def table(node: Any, path: str) -> None:
        subs = []
        for f in _init_fields(type(node)):
            value = getattr(node, f.name)
            if _is_section(value):
                subs.append((f.name, value))
            else:
                lines.append(f"{f.name} = {_toml_value(value, path + f.name)}")
        for name, sub in subs:
            lines.extend(["", f"[{path}{name}]"])
            table(sub, f"{path}{name}.")

    table(cfg, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def config_keys(cfg: Any) -> dict[str, str]:
    """Every dotted leaf key a user can ``--set``, with its type name (for help/freezing)."""
    out: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        hints = _type_hints(type(node))
        for f in _init_fields(type(node)):
            value = getattr(node, f.name)
            if _is_section(value):
                walk(value, f"{path}{f.name}.")
            else:
                out[f"{path}{f.name}"] = _type_name(hints.get(f.name))

    walk(cfg, "")
    return out


# --------------------------------------------------------------------------- CLI


def add_config_arguments(parser: argparse.ArgumentParser, default: str = "") -> None:
    """Add ``--config PRESET|FILE.toml`` and repeatable ``--set KEY=VALUE`` to a parser."""
    parser.add_argument("--config", default=default, metavar="PRESET|FILE.toml",
                        help=f"preset name or TOML file/URL (default: {default or 'defaults'})")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one field, e.g. --set optim.lr=1e-4")


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Turn :class:`ConfigError` into exit status 2 with the message on stderr."""
    try:
        yield
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def config_from_cli(
    root_cls: type[T],
    argv: Sequence[str] | None,
    presets: Mapping[str, Callable[[], T]] | None = None,
    default: str = "",
    prog: str | None = None,
) -> T:
    """Parse ``--config``/``--set`` from ``argv`` and load; exits 2 on any config error."""
    parser = argparse.ArgumentParser(prog=prog)
    add_config_arguments(parser, default)
    args = parser.parse_args(argv)  # argparse exits 2 on usage errors too
    with exit_on_config_error():
        return load_config(root_cls, args.config, args.overrides, presets)
