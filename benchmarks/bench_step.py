"""Training-step time split: data wait, encoder, prompt rounds, loss, backward, optimizer.

Runs the real engine (``trainer.engine.TrainRun``) in one process on synthetic SA-1B
shards and times each section of the step (CUDA-synchronised on a GPU). Also times one
checkpoint save and reports it as a share of the checkpoint interval. The baseline for
the ratios is the whole step.

    python benchmarks/bench_step.py                                  # tiny_cpu on this CPU
    python benchmarks/bench_step.py --preset vit_h --steps 6        # on a GPU: bf16, 64 masks

Synthetic images for 1024² presets are drawn at 1024-1500 px with many shapes so that
64 masks per image exist, as in SA-1B.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import dist  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.presets import PRESETS, Config  # noqa: E402
from trainer.data import write_synthetic_shards  # noqa: E402
from trainer.engine import TrainRun  # noqa: E402

SECTIONS = ("data_wait", "encoder", "prompt_rounds", "loss", "backward", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny_cpu", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(var, None)

    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    big = args.preset != "tiny_cpu"
    write_synthetic_shards(str(work / "data"), num_images=args.steps + 4, num_shards=2, seed=0,
                           min_side=1024 if big else 192, max_side=1500 if big else 384,
                           min_masks=40 if big else 4, max_masks=60 if big else 30)
    cfg = load_config(Config, args.preset, [f"data.shards={work}/data/sa_*.tar", f"train.run_dir={work}/run",
                                            "data.num_workers=1", "eval.shards=", "train.log_every=1000",
                                            "checkpoint.every=0", *args.overrides], PRESETS)
    info = dist.init_distributed(cfg.train.device)
    dist.setup_logging(0, "WARNING")
    run = TrainRun(cfg, info, profile=True)
    batches = iter(run.loader)
    for _ in range(2):
        run.train_step(batches)
    run.timer.totals.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        run.train_step(batches)
    step_s = (time.perf_counter() - start) / args.steps
    save_start = time.perf_counter()
    run.save()
    save_s = time.perf_counter() - save_start

    where = torch.cuda.get_device_name() if info.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    masks = cfg.data.max_masks_per_image
    print(f"{args.preset}: {cfg.data.batch_size} image(s)/step, up to {masks} masks, {cfg.prompts.num_rounds} rounds, "
          f"amp {run.amp_dtype or 'off'}, {where}")
    print(f"  step {step_s * 1e3:9.1f} ms  (baseline 1.00)")
    for name in SECTIONS:
        value = run.timer.totals.get(name, 0.0) / args.steps
        print(f"  {name:13s} {value * 1e3:9.1f} ms  {value / step_s:5.2f}")
    other = step_s - sum(run.timer.totals.get(n, 0.0) for n in SECTIONS) / args.steps
    print(f"  {'other':13s} {other * 1e3:9.1f} ms  {other / step_s:5.2f}")
    print(f"  images/s {cfg.data.batch_size / step_s:.2f}")
    if info.device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    every = PRESETS[args.preset]().checkpoint.every
    print(f"checkpoint save {save_s:.2f} s = {save_s / (every * step_s):.4f} of a {every}-step interval "
          f"({save_s / step_s:.1f} steps)")


if __name__ == "__main__":
    main()
