"""``sam-train``: the command-line entry point.

    sam-train demo                                  # the local demo (see trainer.demo)
    sam-train train --config tiny_cpu --set data.shards=DIR/sa_*.tar
    sam-train config --config vit_h                 # every --set key: value, type, doc (TOML)
    sam-train synth --out DIR --images N --shards K # synthetic SA-1B shards
    sam-train eval --checkpoint URL --shards SPEC   # point and box mIoU
    sam-train export --checkpoint URL --out FILE    # official segment_anything .pth
    sam-train selfcheck                             # build every variant, run tiny once
    sam-train launch submit NAME -f PRESET.yaml --set ...  # a job on a cluster, through the Kubernetes API

Subcommands are small adapters over library functions; each one's ``--help`` works
without a GPU and shows every option with its default. An unknown command exits 2.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from typing import Callable

import torch


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps description/epilog line breaks and appends ``(default: X)`` to each option's help.

    Skipped where the help already names its default, for required options and for
    defaults that say nothing (None, False, empty list).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        says_nothing = default is None or default is False or (isinstance(default, (list, tuple)) and not default)
        if ("default" in text or action.required or default is argparse.SUPPRESS or says_nothing
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def _selfcheck(argv: list[str]) -> int:
    """Build each variant on the meta device, then run the tiny model forward and backward."""
    parser = argparse.ArgumentParser(prog="sam-train selfcheck", description=_selfcheck.__doc__,
                                     formatter_class=HelpFormatter)
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
    from trainer.checkpoint import MARKER, CheckpointManager

    fs, path = storage.url_to_fs(url)
    is_step_dir = fs.exists(f"{path}/model.pt") or fs.exists(f"{path}/{MARKER}")
    if fs.isdir(path) and not is_step_dir:
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


#: Variants that ``segment_anything.sam_model_registry`` builds (SAM_RECIPE.md §2 "Builders").
OFFICIAL_VARIANTS = ("vit_b", "vit_l", "vit_h")


def _export(argv: list[str]) -> int:
    """Write a checkpoint's weights as the official SAM .pth (segment_anything loads vit_b/l/h)."""
    parser = argparse.ArgumentParser(prog="sam-train export", description=_export.__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint root (newest complete step), "
                        "step dir or weights URL")
    parser.add_argument("--out", required=True, help="output .pth path or URL")
    args = parser.parse_args(argv)
    from trainer.model import export_official, read_state_dict
    from trainer.model.build import guess_variant

    source = resolve_weights(args.checkpoint)
    state = read_state_dict(source)
    export_official(state, args.out)
    print(f"exported {source} -> {args.out}")
    variant = guess_variant(state)
    if variant in OFFICIAL_VARIANTS:
        print(f"load it with segment_anything.sam_model_registry[{variant!r}](checkpoint={args.out!r})")
    else:  # the file is still written: our own build_sam and tests load it
        print(f"note: variant {variant or 'unknown'!r} is not in segment_anything's sam_model_registry "
              f"({', '.join(OFFICIAL_VARIANTS)}): no official registry entry loads this file; build the "
              "official modules at its sizes (trainer.model.spec_for) or load it with "
              "trainer.model.build_sam", file=sys.stderr)
    return 0


def _config(argv: list[str]) -> int:
    """Print the resolved training config as TOML: every key `--set` accepts, with its
    value (the default of the chosen preset), type and doc as comments. The output loads
    back unchanged: save it, edit it, and pass it with --config FILE.toml.

    A preset whose required keys are still placeholders (data.shards: "<required: ...>")
    is printed as it is, with the problem in the header and on stderr, and exit 0: the
    printout is how to see what is missing (sam-train train exits 2 on it).
    """
    from trainer.config import add_config_arguments, exit_on_config_error, resolve_config
    from trainer.config_docs import dump_toml_documented
    from trainer.presets import PRESETS, Config

    parser = argparse.ArgumentParser(prog="sam-train config", description=inspect.cleandoc(_config.__doc__ or ""),
                                     formatter_class=HelpFormatter)
    add_config_arguments(parser, default="tiny_cpu")
    args = parser.parse_args(argv)
    with exit_on_config_error():
        cfg, problem = resolve_config(Config, args.config, args.overrides, PRESETS)
        sets = "".join(f" --set {item}" for item in args.overrides)
        header = [f"sam-train config --config {args.config}{sets}",
                  "Every key below: --set section.key=VALUE, or edit this file and run "
                  "sam-train train --config FILE.toml (it loads back to the same config)."]
        if problem:
            header.append(f"NOT VALID YET (sam-train train exits 2): {problem}")
            print(f"note: {problem}", file=sys.stderr)
        print(dump_toml_documented(cfg, header="\n".join(header)), end="")
    return 0


def _eval(argv: list[str]) -> int:
    """Multi-point (1, 2, 3, 5, 9 clicks) and box mIoU of a checkpoint on held-out shards
    (SAM_RECIPE.md §6; protocol and metric names in trainer.evaluate). One in-order pass:
    shards as listed, images in stored order, each image read once."""
    parser = argparse.ArgumentParser(prog="sam-train eval", description=_eval.__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint root, step dir, or .pth URL")
    parser.add_argument("--shards", required=True, help="glob, .txt list or comma list of SA-1B shards "
                        "(read in the listed order)")
    parser.add_argument("--num-images", type=int, default=100, help="images to score, in order; 0 = all")
    parser.add_argument("--variant", default=None, help="model variant; inferred from the weights when not given")
    parser.add_argument("--max-masks", type=int, default=64,
                        help="masks scored per image (sampled with a fixed seed, as the training-time eval)")
    parser.add_argument("--points", default="1,2,3,5,9", help="report IoU after these numbers of clicks")
    parser.add_argument("--batch-size", type=int, default=1, help="images per image-encoder call")
    parser.add_argument("--grid", default=None, metavar="PNG",
                        help="also draw predictions for the first scored images into this PNG")
    args = parser.parse_args(argv)
    from trainer.config import ConfigError
    from trainer.evaluate import eval_data_config, evaluate, iter_eval_batches, parse_points
    from trainer.visualize import prediction_grid

    skips: dict[str, int] = {}
    try:  # bad flags or shard specs are usage errors (exit 2), found before any scoring
        points = parse_points(args.points)
        for name, value, low in (("--num-images", args.num_images, 0), ("--max-masks", args.max_masks, 1),
                                 ("--batch-size", args.batch_size, 1)):
            if value < low:
                raise ValueError(f"{name}: must be >= {low}, got {value}")
        model = _load_for_cli(args.checkpoint, args.variant)
        data = eval_data_config(args.shards, model.image_encoder.img_size, args.max_masks)
        batches = iter_eval_batches(data, args.num_images, args.batch_size, skips, "--shards")
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate(model.to(device), batches, device, points, keep_images=4 if args.grid else 0)
    result.skips = dict(sorted(skips.items()))
    for key, value in result.miou().items():
        print(f"{key:13s} mIoU {value:.4f}")
    skipped = f", {sum(result.skips.values())} skipped: {result.skips}" if result.skips else ""
    print(f"({result.num_masks} masks in {result.num_images} images{skipped})")
    if result.num_masks == 0:
        print(f"error: no mask scored in {args.shards}", file=sys.stderr)
        return 1
    if args.grid:
        print(f"predictions: {prediction_grid(model, result.kept, args.grid, num_points=max(points))}")
    return 0


def _launch(argv: list[str]) -> int:
    from trainer.launch.cli import main as launch_main

    return launch_main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "demo": (_demo, "local demo: synth data, 2-process training, eval, export, plots"),
    "train": (_train, "train (one rank; run under torchrun or python -m trainer.dist)"),
    "config": (_config, "print the resolved config: every --set key with its default and doc"),
    "synth": (_synth, "write synthetic SA-1B-format shards (real JPEG + COCO RLE JSON)"),
    "eval": (_eval, "point and box mIoU of a checkpoint on held-out shards"),
    "export": (_export, "write a checkpoint as the official SAM .pth"),
    "selfcheck": (_selfcheck, "build every model variant and run the tiny model once"),
    "launch": (_launch, "submit, watch, log and delete a training job on a cluster (PyTorchJob/TrainJob)"),
}


def usage() -> str:
    """The top-level help: every command with its one-line summary."""
    lines = "\n".join(f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: sam-train COMMAND [ARGS]\n\ncommands:\n{lines}\n\nsam-train COMMAND --help for details"


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; ``--help`` -> stdout, exit 0; none or unknown -> stderr, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"sam-train: {problem}\n\n{usage()}", file=sys.stderr)
        return 2
    func, _ = COMMANDS[argv[0]]
    return func(argv[1:])


def console_main() -> None:
    """The ``sam-train`` console script: :func:`main` with :func:`trainer.dist.run_main`'s exit."""
    from trainer.dist import run_main

    run_main(main)


if __name__ == "__main__":
    console_main()
