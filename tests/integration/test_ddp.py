"""2-process DDP on CPU through the real torchrun entry point (gloo)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import metrics, overrides, run, torchrun_cmd, train_env, train_losses

pytestmark = pytest.mark.slow


def test_two_ranks_stay_identical_and_loss_decreases(shards: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd(2) + overrides(shards, run_dir, "optim.max_iters=24", "checkpoint.every=12",
                                      "optim.milestones=20,22", "data.num_workers=1")
    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    # The engine compares all ranks' weights at every checkpoint and fails if they differ.
    assert log.count("parameters identical on all 2 ranks") == 2, log[-3000:]
    assert "global batch 2 images = 1 per rank x 2 ranks x 1 accumulation" in log
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 25))
    first, last = sum(losses[s] for s in range(1, 5)) / 4, sum(losses[s] for s in range(21, 25)) / 4
    assert last < 0.8 * first, losses


def test_plain_torchrun_launcher_with_gradient_accumulation(shards: str, tmp_path: Path) -> None:
    """``torchrun`` itself (not our wrapper) also runs the entry point; 2 micro-batches per step."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "trainer.train", "--config", "tiny_cpu"] + overrides(
               shards, run_dir, "optim.max_iters=3", "optim.milestones=", "checkpoint.every=0", "train.grad_accum=2")
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 4 images = 1 per rank x 2 ranks x 2 accumulation" in proc.stdout + proc.stderr
    assert [r["data/images"] for r in metrics(run_dir) if "data/images" in r] == [2, 2, 2]
    state = torch.load(run_dir / "checkpoints/step-00000003/train_state.pt", weights_only=True)
    assert state["step"] == 3 and len(state["data"]) == 2 and len(state["rng"]) == 2


def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    cases = {
        "optim.lr=-1": "optim.lr",
        "optim.warmup_iters=500": "optim.warmup_iters",
        "train.grad_acum=2": "train.grad_acum",
        "data.batch_size=two": "data.batch_size",
    }
    for setting, field in cases.items():
        proc = subprocess.run([sys.executable, "-m", "trainer.train", "--config", "tiny_cpu",
                               "--set", f"data.shards={tmp_path}/x.tar", "--set", setting],
                              capture_output=True, text=True, timeout=60, env=train_env())
        assert proc.returncode == 2, (setting, proc.stderr)
        assert field in proc.stderr, (setting, proc.stderr)
