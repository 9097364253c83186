"""The local demo: synthetic SA-1B shards, 2-process DDP training, eval, export, pictures.

    sam-train demo                       # everything under runs/demo, < 5 min on 2 cores
    sam-train demo --out /tmp/demo --steps 100 --nproc 2

Steps: write training and held-out shards with ``sam-train synth``; evaluate the
untrained model (same seed, so the same initial weights as the run); train the
``tiny_cpu`` preset under ``torchrun`` (gloo, 2 processes); evaluate, export the
official-format ``.pth``; plot the loss curve and a grid of held-out predictions for a
point and a box prompt; print where everything went.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from trainer.config import load_config
from trainer.presets import PRESETS, Config


def _config(out: Path, steps: int, overrides: list[str]) -> tuple[Config, list[str]]:
    sets = [
        f"data.shards={out / 'data/train'}/sa_*.tar",
        f"train.run_dir={out / 'run'}",
        f"optim.max_iters={steps}",
        f"optim.warmup_iters={min(20, steps // 10)}",
        # Decay late: a model trained from scratch leaves its initial plateau after
        # ~150 steps and needs the full lr for the rest of a short run.
        f"optim.milestones={steps * 9 // 10},{steps * 29 // 30}",
        f"checkpoint.every={max(steps // 3, 1)}",
        f"eval.shards={out / 'data/eval'}/sa_000000.tar",
        f"eval.every={max(steps // 3, 1)}",
        "eval.num_images=16",
        "train.log_every=10",
        *overrides,
    ]
    return load_config(Config, "tiny_cpu", sets, PRESETS), sets


def _run_training(sets: list[str], nproc: int, log_path: Path) -> int:
    cmd = [sys.executable, "-m", "trainer.dist", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "trainer.train", "--config", "tiny_cpu"]
    for item in sets:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)), SAM_LOG_FORMAT="text")
    print(f"[demo] training: {' '.join(cmd)}\n[demo] log: {log_path}", flush=True)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            if "trainer.metrics" in line or "ERROR" in line or "Traceback" in line:
                print("   " + line.rstrip(), flush=True)
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    from trainer.cli import HelpFormatter  # keeps the docstring's layout, shows defaults

    parser = argparse.ArgumentParser(prog="sam-train demo", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--steps", type=int, default=300, help="training iterations (default 300)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    parser.add_argument("--train-images", type=int, default=192, help="synthetic training images")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra training config override (repeatable; see sam-train config)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    start = time.perf_counter()

    from trainer.data import write_synthetic_shards
    from trainer.evaluate import eval_data_config, evaluate_shards
    from trainer.model import build_model, export_official, read_state_dict
    from trainer.visualize import plot_loss_curve, prediction_grid, read_metrics

    if (out / "run").exists():
        print(f"[demo] {out / 'run'} exists: training resumes from its newest checkpoint "
              "(delete the folder for a fresh run)")
    # Fewer, larger shapes than the synth default: a model trained from scratch for a few
    # hundred CPU steps learns these visibly; SA-1B-like small masks need far longer.
    scene = dict(min_masks=3, max_masks=8, radius_frac=(0.1, 0.4))
    write_synthetic_shards(str(out / "data/train"), num_images=args.train_images, num_shards=8, seed=0, **scene)
    write_synthetic_shards(str(out / "data/eval"), num_images=16, num_shards=1, seed=12345, **scene)
    print(f"[demo] synthetic SA-1B shards in {out / 'data'} ({time.perf_counter() - start:.0f}s)")

    cfg, sets = _config(out, args.steps, args.overrides)
    torch.manual_seed(cfg.train.seed)  # the engine's seeding: the same initial weights
    model = build_model(cfg.model)

    eval_cfg = eval_data_config(cfg.eval.shards, cfg.data.img_size)  # as the training-time eval
    before = evaluate_shards(model, eval_cfg, cfg.eval.num_images, torch.device("cpu")).miou()
    print("[demo] mIoU before training: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items()))

    code = _run_training(sets, args.nproc, out / "train.log")
    if code != 0:
        print(f"[demo] training failed with exit code {code}; see {out / 'train.log'}")
        return code

    ckpt_url = cfg.checkpoint.resolve_url(cfg.train.run_dir)
    model.load_state_dict(read_state_dict(f"{ckpt_url}/step-{args.steps:08d}"))
    export_path = export_official(model, str(out / "sam_tiny.pth"))
    scored = evaluate_shards(model, eval_cfg, cfg.eval.num_images, torch.device("cpu"), keep_images=4)
    after = scored.miou()
    records = read_metrics(out / "run/metrics.jsonl")
    losses = [r["loss/total"] for r in records if "loss/total" in r]
    curve = plot_loss_curve(records, out / "loss_curve.png", before=before)
    grid = prediction_grid(model, scored.kept, out / "predictions.png")

    print(f"\n[demo] done in {time.perf_counter() - start:.0f}s")
    print(f"  loss (first -> last logged step): {losses[0]:.3f} -> {losses[-1]:.3f}")
    for key in before:
        print(f"  mIoU {key:13s} before {before[key]:.3f} -> after {after[key]:.3f}")
    print(f"  data:        {out / 'data'}\n  checkpoints: {ckpt_url}\n  metrics:     {out / 'run/metrics.jsonl'}")
    print(f"  train log:   {out / 'train.log'}\n  export:      {export_path} (official SAM .pth layout)")
    print(f"  loss curve:  {curve}\n  predictions: {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
