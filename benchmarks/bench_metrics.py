"""Step time with the Prometheus sink on vs off, alternating in one run (goal: < 1% overhead).

Runs the real engine (``trainer.engine.TrainRun``) in one process with the Prometheus
exporter serving on a loopback port. Steps alternate between "on" (section timer,
per-step ``Metrics.step`` update, and a real HTTP scrape of ``/metrics`` in a thread
during the step, as a 1 Hz Prometheus would do to ~1 s steps) and "off" (no timer, no
update, no scrape). The baseline for the ratio is the "off" step measured in the same
run; medians over the pairs, so drifts (thermal, page cache) hit both sides alike.

    python benchmarks/bench_metrics.py                     # tiny_cpu on this CPU
    python benchmarks/bench_metrics.py --preset vit_b --pairs 10 --set model.encoder_init=random   # a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import dist  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import write_synthetic_shards  # noqa: E402
from trainer.engine import TrainRun  # noqa: E402
from trainer.presets import PRESETS, Config  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_step(run: TrainRun, batches, on: bool, port: int) -> float:  # noqa: ANN001
    """One optimizer step; with ``on``, the metrics work a real run does around it."""
    run.timer.mode = ("events" if run.device.type == "cuda" else "wall") if on else "off"
    scraper = threading.Thread(target=lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read())
    start = time.perf_counter()
    if on:
        scraper.start()
    values = run.train_step(batches)
    if on:
        run.metrics.step(run.step, values, run.last_sections, run.loader.skip_counts(), values["time/step_s"])
        scraper.join()
    if run.device.type == "cuda":
        torch.cuda.synchronize()  # the benchmark's own fence, the same for both sides
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny_cpu", choices=sorted(PRESETS))
    parser.add_argument("--pairs", type=int, default=20, help="on/off step pairs (after 2 warm-up steps)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(var, None)
    work = Path(tempfile.mkdtemp(prefix="bench_metrics_"))
    big = args.preset != "tiny_cpu"
    write_synthetic_shards(str(work / "data"), num_images=2 * args.pairs + 8, num_shards=2, seed=0,
                           min_side=1024 if big else 192, max_side=1500 if big else 384,
                           min_masks=40 if big else 4, max_masks=60 if big else 30)
    port = free_port()
    cfg = load_config(Config, args.preset, [
        f"data.shards={work}/data/sa_*.tar", f"train.run_dir={work}/run", "data.num_workers=1", "eval.shards=",
        "train.log_every=100000", "checkpoint.every=0", f"metrics.port={port}", "metrics.addr=127.0.0.1",
        "metrics.final_scrape_wait_s=0", f"optim.max_iters={2 * args.pairs + 4}", "optim.milestones=",
        "optim.warmup_iters=0",
        *args.overrides], PRESETS)
    info = dist.init_distributed(cfg.train.device)
    dist.setup_logging(0, "WARNING")
    run = TrainRun(cfg, info)
    batches = iter(run.loader)
    for i in range(2):
        timed_step(run, batches, on=i % 2 == 0, port=port)
    on, off = [], []
    for i in range(args.pairs):
        first_on = i % 2 == 0  # alternate which side goes first within a pair
        for side in ((True, False) if first_on else (False, True)):
            (on if side else off).append(timed_step(run, batches, side, port))
    run.metrics.close(draw=False)
    med_on, med_off = statistics.median(on), statistics.median(off)
    print(f"preset {args.preset}, device {run.device}, {args.pairs} pairs, torch {torch.__version__}")
    print(f"step with metrics off (baseline): median {med_off * 1000:.1f} ms")
    print(f"step with metrics on:             median {med_on * 1000:.1f} ms")
    print(f"ratio on/off: {med_on / med_off:.4f}  ({(med_on / med_off - 1) * 100:+.2f}% overhead; goal < 1%)")


if __name__ == "__main__":
    main()
