"""``sam-train``: the command-line entry point.

    sam-train selfcheck                 # build every variant, run the tiny model, print sizes
    sam-train synth --out DIR ...       # write synthetic SA-1B shards
    sam-train --help

Subcommands are small adapters over library functions; each one's ``--help`` works
without a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch


def _selfcheck(argv: list[str]) -> int:
    """Build each variant on the meta device, then run the tiny model forward and backward."""
    parser = argparse.ArgumentParser(prog="sam-train selfcheck", description=_selfcheck.__doc__)
    parser.parse_args(argv)
    from trainer.model import VARIANTS, build_sam

    for name in VARIANTS:
        with torch.device("meta"):
            model = build_sam(name)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:6s} {params / 1e6:8.2f}M parameters, {len(model.state_dict())} state_dict keys")
    model = build_sam("tiny")
    start = time.perf_counter()
    image = torch.randn(1, 3, 256, 256)
    emb = model.image_encoder(image)
    sparse, dense = model.prompt_encoder((torch.tensor([[[128.0, 128.0]]]), torch.ones(1, 1, dtype=torch.long)), None, None)
    masks, iou = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
    (masks.mean() + iou.mean()).backward()
    print(f"tiny forward+backward OK: embedding {tuple(emb.shape)}, masks {tuple(masks.shape)}, "
          f"{time.perf_counter() - start:.2f}s")
    return 0


def _synth(argv: list[str]) -> int:
    from trainer.data.synth import main as synth_main

    return synth_main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "selfcheck": (_selfcheck, "build every model variant and run the tiny model once"),
    "synth": (_synth, "write synthetic SA-1B-format shards (real JPEG + COCO RLE JSON)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: sam-train COMMAND [ARGS]\n\ncommands:\n{lines}\n\nsam-train COMMAND --help for details")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    func, _ = COMMANDS[argv[0]]
    return func(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
