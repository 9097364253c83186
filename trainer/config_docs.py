"""Config documentation: every key's type and doc, as TOML that loads back (``sam-train config``).

Field docs are read from the section classes in the three styles they use: a ``#:``
comment block above the field, a string literal below it, or the class docstring's
``Attributes:`` section.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from trainer.config import _init_fields, _is_section, _toml_value, _type_hints, _type_name


def _attributes_docs(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Attributes:`` section of a docstring."""
    docs: dict[str, str] = {}
    lines = doc.splitlines()
    if "Attributes:" not in (line.strip() for line in lines):
        return docs
    start = [line.strip() for line in lines].index("Attributes:") + 1
    indent, name = None, ""
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break  # the section ended
        head, sep, text = line.strip().partition(":")
        if depth == indent and sep and head.isidentifier():
            name, docs[head] = head, text.strip()
        elif name:
            docs[name] += " " + line.strip()
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    """Docs of the fields ``cls`` itself declares, in the three styles sections use:
    a ``#:`` comment block above the field, a string literal below it (wins over the
    docstring), or its entry in the class docstring's ``Attributes:`` section."""
    import ast
    import inspect
    import textwrap

    docs = _attributes_docs(inspect.cleandoc(cls.__doc__ or ""))
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. built in a REPL): docstring only
        return docs
    lines = source.splitlines()
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        comments, j = [], node.lineno - 2
        while j >= 0 and lines[j].strip().startswith("#:"):
            comments.insert(0, lines[j].strip()[2:].strip())
            j -= 1
        after = body[i + 1] if i + 1 < len(body) else None
        if comments:
            docs[node.target.id] = " ".join(comments)
        elif (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
              and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> one-paragraph doc for a config dataclass (inherited fields too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def dump_toml_documented(cfg: Any, header: str = "", width: int = 88) -> str:
    """:func:`dump_toml` with each key's type and doc as a ``#`` comment above it.

    The keys and values are exactly :func:`dump_toml`'s, so the text loads back to an
    equal config (``--config printed.toml``); only comments are added.
    """
    import textwrap

    def comment(text: str) -> list[str]:
        return textwrap.wrap(text, width - 2, initial_indent="# ", subsequent_indent="# ",
                             break_long_words=False, break_on_hyphens=False) or ["#"]

    lines = [line for text in header.splitlines() for line in comment(text)]

    def table(node: Any, path: str) -> None:
        hints, docs, subs = _type_hints(type(node)), field_docs(type(node)), []
        for f in _init_fields(type(node)):
            value = getattr(node, f.name)
            if _is_section(value):
                subs.append((f.name, value))
                continue
            kind = _type_name(hints.get(f.name)) if hints.get(f.name) is not None else type(value).__name__
            lines.extend(["", *comment(f"{path}{f.name} ({kind}): {docs.get(f.name, 'undocumented')}")])
            lines.append(f"{f.name} = {_toml_value(value, path + f.name)}")
        for name, sub in subs:
            summary = (type(sub).__doc__ or "").strip().split("\n\n")[0]
            lines.extend(["", "", f"[{path}{name}]", *comment(" ".join(summary.split()))])
            table(sub, f"{path}{name}.")

    table(cfg, "")
    return "\n".join(lines).lstrip("\n") + "\n"
