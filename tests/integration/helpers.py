"""Helpers for end-to-end tests: synthetic shards and the real training entry points.

Every test here runs the trainer as users do: ``python -m trainer.train`` for one
process, and ``python -m trainer.dist`` (torchrun in-process, the pod command) or the
``torchrun`` launcher for 2 gloo processes on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence


#: Small and fast: 1 image of 4 masks per rank and step, 4 prompt rounds, no workers.
FAST = [
    "data.batch_size=1", "data.max_masks_per_image=4", "data.num_workers=0",
    "optim.warmup_iters=2", "optim.milestones=50,60", "optim.max_iters=60",
    "train.log_every=1", "eval.shards=", "log.format=text",
]


def train_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SAM_LOG_FORMAT="text", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def overrides(shard_glob: str, run_dir: Path | str, *more: str) -> list[str]:
    args: list[str] = []
    for item in [f"data.shards={shard_glob}", f"train.run_dir={run_dir}", *FAST, *more]:
        args += ["--set", item]
    return args


def torchrun_cmd(nproc: int, *extra: str) -> list[str]:
    """The pod command: our torchrun wrapper (exit codes preserved), standalone rendezvous."""
    return [sys.executable, "-m", "trainer.dist", "--standalone", f"--nproc-per-node={nproc}", *extra,
            "-m", "trainer.train", "--config", "tiny_cpu"]


def run(cmd: Sequence[str], timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env or train_env())


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss/total"] for r in metrics(run_dir) if "loss/total" in r}
