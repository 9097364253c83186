"""Training entry point (thin): parse the config, run the engine, exit with its code.

    python -m trainer.train --config tiny_cpu --set data.shards=runs/demo/data/train/sa_*.tar
    torchrun --nproc-per-node 2 -m trainer.train --config tiny_cpu --set ...
    python -m trainer.dist --nproc-per-node 8 -m trainer.train --config vit_h --set ...   # in a pod

Exit codes: see ``trainer.dist.ExitCode`` (0 ok, 2 config, 3 non-finite, 143 preempted).
"""

from __future__ import annotations

import sys

from trainer.config import config_from_cli, exit_on_config_error
from trainer.presets import PRESETS, Config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with exit_on_config_error():
        cfg = config_from_cli(Config, argv, PRESETS, default="tiny_cpu", prog="sam-train train")
        from trainer.engine import train

        return train(cfg)


if __name__ == "__main__":
    sys.exit(main())
