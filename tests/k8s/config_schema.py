"""Generate the JSON schema of ``training.config`` in the chart's ``values.schema.json``.

``training.config`` becomes the trainer's ``config.toml`` (section -> key -> value). Its schema
is derived from the trainer's own config tree, the one ``sam-train config`` prints: every
section of ``trainer.presets.Config`` and every field of it (``trainer.config._init_fields``),
with the field's annotated type (``trainer.config._type_hints``) and its doc
(``trainer.config_docs.field_docs``). So a misspelt key (``optim.lrr``), a wrong type
(``optim.max_iters: "many"``, ``data.batch_size: "2"``) or a table where a value belongs
(``data.x.y``) fails at ``helm install``, naming the key, instead of in the pod (exit 2).

Types: ``int`` -> ``integer``; ``float`` -> ``number`` (integers allowed, as the trainer
allows); ``bool`` -> ``boolean``; ``str`` -> ``string``; ``Literal[...]`` -> ``enum``;
``tuple``/``list`` -> ``array`` with the item types (a fixed-length tuple also fixes the
length); ``Optional[X]`` / ``X | None`` adds ``null``; other unions -> a type list (or
``anyOf``). Every section and the table itself refuse unknown keys
(``additionalProperties: false``). The keys the chart sets itself (``data.shards``,
``train.run_dir``, ``checkpoint.url``, ``metrics.port``) are listed without a type: the
template refuses them with a message naming the chart value to use instead.

Run ``python -m tests.k8s.config_schema --write`` after changing a config section of the
trainer; ``--check`` exits 1 when ``values.schema.json`` is stale (and
``tests/unit/test_chart_config_schema.py`` fails).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "charts" / "sam-train" / "values.schema.json"
COMMAND = "python -m tests.k8s.config_schema --write"

#: (section, key) -> the chart value that sets it (templates/_toml.tpl refuses it in training.config).
CHART_OWNED: dict[tuple[str, str], str] = {
    ("data", "shards"): "training.dataShards",
    ("train", "run_dir"): "training.runDir",
    ("checkpoint", "url"): "training.checkpointUrl",
    ("metrics", "port"): "monitoring.port",
}
_SIMPLE: dict[Any, str] = {int: "integer", float: "number", bool: "boolean", str: "string"}


class SchemaError(TypeError):
    """A config field has a type this generator cannot express; the message names the key."""


def type_schema(tp: Any, key: str) -> dict[str, Any]:
    """The JSON schema of one annotated config type (``key`` names it in errors)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SIMPLE:
        return {"type": _SIMPLE[tp]}
    if origin is Literal:
        kinds = sorted({_SIMPLE[type(a)] for a in args if type(a) in _SIMPLE})
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin in (tuple, list):
        return _array_schema(origin, args, key)
    if origin in (typing.Union, types.UnionType):
        return _union_schema(args, key)
    raise SchemaError(f"{key}: no JSON schema for the type {tp!r}; extend tests/k8s/config_schema.py")


def _array_schema(origin: Any, args: tuple[Any, ...], key: str) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "array"}
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        items = [type_schema(a, f"{key}[{i}]") for i, a in enumerate(args)]
        # One item schema when all agree (clearer messages); the positional form otherwise.
        out["items"] = items[0] if all(i == items[0] for i in items) else items
        if isinstance(out["items"], list):
            out["additionalItems"] = False
        out["minItems"] = out["maxItems"] = len(args)
    elif args:
        out["items"] = type_schema(args[0], f"{key}[]")
    return out


def _union_schema(args: tuple[Any, ...], key: str) -> dict[str, Any]:
    """``X | Y [| None]``: one schema with a type list when the arms differ in their JSON type
    only (``str | list[str]`` -> ``["string", "array"]`` + the array's items), else ``anyOf``."""
    arms = [type_schema(a, key) for a in args if a is not type(None)]
    nullable = type(None) in args
    kinds = [arm["type"] for arm in arms]
    extras = [{k: v for k, v in arm.items() if k != "type"} for arm in arms]
    mergeable = (all(isinstance(k, str) for k in kinds) and len(set(kinds)) == len(kinds)
                 and not any("enum" in e for e in extras)
                 and sum(len(e) for e in extras) == len({k for e in extras for k in e}))
    if not mergeable:
        return {"anyOf": arms + ([{"type": "null"}] if nullable else [])}
    merged: dict[str, Any] = {"type": kinds + (["null"] if nullable else [])}
    for extra in extras:
        merged.update(extra)
    if len(merged["type"]) == 1:
        merged["type"] = merged["type"][0]
    return merged


def section_schema(name: str, section: Any) -> dict[str, Any]:
    """One config section (a dataclass instance) as a closed JSON-schema object."""
    from trainer.config import _init_fields, _is_section, _type_hints
    from trainer.config_docs import field_docs

    cls = type(section)
    hints, docs = _type_hints(cls), field_docs(cls)
    properties: dict[str, Any] = {}
    for f in _init_fields(cls):
        key = f"{name}.{f.name}"
        value = getattr(section, f.name)
        doc = docs.get(f.name, "")
        if _is_section(value):
            properties[f.name] = section_schema(key, value)
            continue
        owner = CHART_OWNED.get((name, f.name))
        if owner:
            properties[f.name] = {"description": f"Set by the chart from `{owner}`; refused here. {doc}".strip()}
            continue
        if hints.get(f.name) is None:
            raise SchemaError(f"{key}: no type annotation the generator can resolve")
        properties[f.name] = {**type_schema(hints[f.name], key), "description": doc}
    summary = " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split())
    owned = [f"`{k}` comes from `{o}`" for (s, k), o in CHART_OWNED.items() if s == name]
    where = f"{cls.__module__}.{cls.__qualname__}"
    description = f"{summary} ({where}{'; ' + ', '.join(owned) if owned else ''})."
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "description": description}


def config_properties() -> dict[str, Any]:
    """``training.config``'s properties: one closed object per section of the trainer's Config."""
    from trainer.config import _init_fields, _is_section
    from trainer.presets import Config

    cfg = Config()
    out: dict[str, Any] = {}
    for f in _init_fields(Config):
        section = getattr(cfg, f.name)
        if not _is_section(section):
            raise SchemaError(f"{f.name}: a top-level config key that is no section has no TOML table")
        out[f.name] = section_schema(f.name, section)
    return out


def generate(schema_text: str) -> str:
    """``values.schema.json``'s text with ``training.config``'s properties regenerated.

    Everything else (the other values, the table's own description) is kept as it is.
    """
    schema = json.loads(schema_text)
    node = schema["properties"]["training"]["properties"]["config"]
    description = node.get("description", "")
    node.clear()
    node.update({"type": "object", "additionalProperties": False, "properties": config_properties(),
                 "description": description})
    return json.dumps(schema, indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``--write`` regenerates the schema file; ``--check`` exits 1 when it is out of date."""
    parser = argparse.ArgumentParser(prog="python -m tests.k8s.config_schema",
                                     description=(__doc__ or "").split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"rewrite {SCHEMA_PATH.relative_to(REPO_ROOT)}")
    mode.add_argument("--check", action="store_true", help="exit 1 if it differs from a fresh generation")
    args = parser.parse_args(argv)
    current = SCHEMA_PATH.read_text()
    fresh = generate(current)
    if args.write:
        SCHEMA_PATH.write_text(fresh)
        print(f"{SCHEMA_PATH.relative_to(REPO_ROOT)}: {'rewritten' if fresh != current else 'unchanged'}")
        return 0
    if fresh != current:
        print(f"{SCHEMA_PATH.relative_to(REPO_ROOT)}: training.config is out of date with the trainer's "
              f"config; run `{COMMAND}`", file=sys.stderr)
        return 1
    print(f"{SCHEMA_PATH.relative_to(REPO_ROOT)}: training.config up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
