"""Training entry point (thin): parse the config, run the engine, exit with its code.

    python -m trainer.train --config tiny_cpu --set data.shards=runs/demo/data/train/sa_*.tar
    torchrun --nproc-per-node 2 -m trainer.train --config tiny_cpu --set ...
    python -m trainer.dist --nproc-per-node 8 -m trainer.train --config vit_h --set ...   # in a pod
    sam-train config --config vit_h        # every --set key with its default and doc

Exit codes: see ``trainer.dist.ExitCode`` (0 ok, 2 config, 3 non-finite, 143 preempted).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from trainer.config import (ConfigError, add_config_arguments, exit_on_config_error, load_config,
                            resolve_config, to_dict)
from trainer.presets import PRESETS, Config

#: Prefix of the placeholder value of a key that has no usable default (``data.shards``).
REQUIRED_PREFIX = "<required"


def required_keys(cfg: Any) -> list[str]:
    """Dotted keys whose value is still a ``<required: ...>`` placeholder."""
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{path}{key}.")
            elif isinstance(value, str) and value.startswith(REQUIRED_PREFIX):
                found.append(f"{path}{key}")

    walk(to_dict(cfg), "")
    return found


def _epilog() -> str:
    """Presets (with what each needs) and where to find every key; built from the presets."""
    lines = ["presets (--config NAME):"]
    for name, factory in PRESETS.items():
        summary = (factory.__doc__ or f"the paper's recipe for {name} (SAM_RECIPE.md §1)").strip().splitlines()[0]
        try:
            required = required_keys(resolve_config(Config, name, (), PRESETS)[0])
        except (ConfigError, ValueError, TypeError) as err:  # a broken preset must not break --help
            required = [f"(cannot build: {err})"]
        needs = f"; requires {', '.join(required)}" if required else ""
        lines.append(f"  {name:9s} {summary.rstrip('.')}{needs}")
    lines += [
        "",
        "data.shards is required (no default dataset): --set data.shards=gs://bucket/sa1b/sa_*.tar",
        "(a glob, a .txt list of URLs or a comma list).",
        "",
        "Every --set key with its default, type and doc (as TOML that --config reads back):",
        "  sam-train config --config PRESET [--set KEY=VALUE ...]",
        "Precedence: preset < TOML file < --set. Exit codes: 0 ok, 2 config error, 3 non-finite loss,",
        "143 preempted (checkpoint written; restart resumes).",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """``sam-train train``'s parser: ``--config`` and ``--set`` (``trainer.config``) and the epilog."""
    from trainer.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="sam-train train", formatter_class=HelpFormatter,
                                     description="Train SAM (one rank; run under torchrun or "
                                                 "python -m trainer.dist for more).", epilog=_epilog())
    add_config_arguments(parser, default="tiny_cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # argparse exits 2 on usage errors
    with exit_on_config_error():
        cfg = load_config(Config, args.config, args.overrides, PRESETS)
        from trainer.engine import train

        return train(cfg)


if __name__ == "__main__":
    from trainer.dist import run_main

    run_main(main)
