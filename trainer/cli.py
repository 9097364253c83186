"""``sam-train``: the command-line entry point.

    sam-train demo                                  # the local demo (see trainer.demo)
    sam-train train --config tiny_cpu --set data.shards=DIR/sa_*.tar
    sam-train synth --out DIR --images N --shards K # synthetic SA-1B shards
    sam-train eval --checkpoint URL --shards SPEC   # center-point / box mIoU
    sam-train export --checkpoint URL --out FILE    # official segment_anything .pth
    sam-train selfcheck                             # build every variant, run tiny once

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


def _train(argv: list[str]) -> int:
    from trainer.train import main as train_main

    return train_main(argv)


def _demo(argv: list[str]) -> int:
    from trainer.demo import main as demo_main

    return demo_main(argv)


def resolve_weights(url: str) -> str:
    """A checkpoint root (newest complete step), a step dir, or a weights file -> loadable URL."""
    from trainer import storage
    from trainer.checkpoint import CheckpointManager

    fs, path = storage.url_to_fs(url)
    if fs.isdir(path) and not fs.exists(f"{path}/model.pt"):
        step = CheckpointManager(url, keep_last=0, is_main=False).latest_complete()
        if step is None:
            raise SystemExit(f"error: no complete checkpoint under {url}")
        return CheckpointManager(url, keep_last=0, is_main=False).step_url(step)
    return url


def _load_for_cli(url: str, variant: str | None) -> "torch.nn.Module":
    from trainer.model import build_sam, read_state_dict
    from trainer.model.build import guess_variant

    state = read_state_dict(resolve_weights(url))
    variant = variant or guess_variant(state)
    if variant is None:
        raise SystemExit(f"error: cannot tell the model variant of {url}; pass --variant")
    model = build_sam(variant)
    model.load_state_dict(state, strict=True)
    return model


def _export(argv: list[str]) -> int:
    """Write a checkpoint's weights as the official SAM .pth (segment_anything loads it)."""
    parser = argparse.ArgumentParser(prog="sam-train export", description=_export.__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint root, step dir or weights URL")
    parser.add_argument("--out", required=True, help="output .pth path or URL")
    args = parser.parse_args(argv)
    from trainer.model import export_official, read_state_dict

    source = resolve_weights(args.checkpoint)
    export_official(read_state_dict(source), args.out)
    print(f"exported {source} -> {args.out}")
    return 0


def _eval(argv: list[str]) -> int:
    """Center-point and box mIoU (most confident and oracle) of a checkpoint on shards."""
    parser = argparse.ArgumentParser(prog="sam-train eval", description=_eval.__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint root, step dir, or .pth URL")
    parser.add_argument("--shards", required=True, help="glob, .txt list or comma list of SA-1B shards")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--variant", default=None, help="model variant (default: inferred from weights)")
    parser.add_argument("--max-masks", type=int, default=64, help="masks evaluated per image")
    args = parser.parse_args(argv)
    from trainer.data import DataConfig, build_loader
    from trainer.evaluate import evaluate

    model = _load_for_cli(args.checkpoint, args.variant)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    data = DataConfig(shards=args.shards, img_size=model.image_encoder.img_size, num_workers=0,
                      max_masks_per_image=args.max_masks)
    result = evaluate(model, iter(build_loader(data, 0, 1)), args.num_images, device)
    for key, value in result.miou().items():
        print(f"{key:13s} mIoU {value:.4f}")
    print(f"({result.num_masks} masks in {result.num_images} images)")
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "demo": (_demo, "local demo: synth data, 2-process training, eval, export, plots"),
    "train": (_train, "train (one rank; run under torchrun or python -m trainer.dist)"),
    "synth": (_synth, "write synthetic SA-1B-format shards (real JPEG + COCO RLE JSON)"),
    "eval": (_eval, "center-point and box mIoU of a checkpoint"),
    "export": (_export, "write a checkpoint as the official SAM .pth"),
    "selfcheck": (_selfcheck, "build every model variant and run the tiny model once"),
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
