"""Fault tolerance end to end: exact resume, SIGTERM, truncated checkpoints, kill -9, gs://."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer import storage

from .helpers import metrics, overrides, run, torchrun_cmd, train_env, train_losses

pytestmark = pytest.mark.slow

#: Same schedule whatever max_iters is, so a short run and a long run are comparable.
EXACT = ["optim.milestones=", "train.deterministic=true", "data.num_workers=1"]


def final_model(url: str, step: int) -> dict[str, torch.Tensor]:
    with storage.open_url(f"{url}/step-{step:08d}/model.pt") as f:
        return torch.load(f, weights_only=True)


def test_resume_is_bitwise_identical_with_gs_checkpoints(shards: str, tmp_path: Path, gcs_server) -> None:
    """4 steps, stop, resume to 8 (checkpoints on gs://, an incomplete newer step left
    behind) gives the same weights and the same per-step losses as 8 steps in one go."""
    straight = tmp_path / "straight"
    proc = run(torchrun_cmd(2) + overrides(shards, straight, *EXACT, "optim.max_iters=8", "checkpoint.every=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    bucket = gcs_server.bucket("ckpt-resume")
    ckpt_url = f"{bucket}/run1/checkpoints"
    resumed = tmp_path / "resumed"
    common = overrides(shards, resumed, *EXACT, f"checkpoint.url={ckpt_url}", "checkpoint.every=4")
    proc = run(torchrun_cmd(2) + common + ["--set", "optim.max_iters=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A crashed save of a later step: files written, completion marker missing.
    fs, path = storage.url_to_fs(ckpt_url)
    with fs.open(f"{path}/step-00000006/model.pt", "wb") as f:
        f.write(b"partial")
    proc = run(torchrun_cmd(2) + common + ["--set", "optim.max_iters=8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "step-00000004 (step 4)" in log, log[-3000:]

    expected = final_model(str(straight / "checkpoints"), 8)
    got = final_model(ckpt_url, 8)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    a, b = train_losses(straight), train_losses(resumed)
    assert all(a[s] == b[s] for s in range(1, 9)), (a, b)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if max((r["step"] for r in metrics(run_dir)), default=0) >= step:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"training did not reach step {step} in {timeout}s")


def test_sigterm_checkpoints_exits_143_and_next_start_resumes(shards: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd(2) + overrides(shards, run_dir, "optim.max_iters=400", "optim.milestones=",
                                      "checkpoint.every=0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env())
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)  # what the kubelet does on node drain / preemption
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(saved) == 1 and (run_dir / "checkpoints" / saved[0] / "COMPLETE").exists()
    stopped_at = int(saved[0].split("-")[1])
    assert stopped_at >= 3

    more = ["--set", f"optim.max_iters={stopped_at + 2}", "--set", "checkpoint.every=0"]
    proc2 = run(torchrun_cmd(2) + overrides(shards, run_dir, "optim.milestones=") + more)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert f"(step {stopped_at})" in proc2.stdout + proc2.stderr

    # The newest checkpoint is truncated: the next start reports it and uses the previous one.
    newest = run_dir / "checkpoints" / f"step-{stopped_at + 2:08d}" / "model.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    more = ["--set", f"optim.max_iters={stopped_at + 3}", "--set", "checkpoint.every=0"]
    proc3 = run(torchrun_cmd(2) + overrides(shards, run_dir, "optim.milestones=") + more)
    assert proc3.returncode == 0, proc3.stderr[-3000:]
    log = proc3.stdout + proc3.stderr
    assert f"step-{stopped_at + 2:08d}" in log and f"(step {stopped_at})" in log, log[-3000:]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_kill_9_of_one_rank_restarts_and_finishes(shards: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd(2, "--max-restarts=1") + overrides(
        shards, run_dir, "optim.max_iters=14", "optim.milestones=", "checkpoint.every=4")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env())
    _wait_for_step(run_dir, 6, proc)
    workers = [p for p in _children(proc.pid)]
    assert len(workers) == 2, workers
    subprocess.run(["kill", "-9", str(workers[1])], check=True)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert (run_dir / "checkpoints/step-00000014/COMPLETE").exists()
    steps = [r["step"] for r in metrics(run_dir) if "loss/total" in r]
    # Steps after the last checkpoint before the kill are recomputed once, nothing is lost.
    assert set(steps) == set(range(1, 15)) and steps[-1] == 14
    repeated = [s for s in set(steps) if steps.count(s) > 1]
    assert repeated and min(repeated) >= 5
    losses: dict[int, list[float]] = {}
    for r in metrics(run_dir):
        if "loss/total" in r:
            losses.setdefault(r["step"], []).append(r["loss/total"])
    assert all(len(set(v)) == 1 for v in losses.values()), losses  # same data, same result


def test_resume_with_changed_data_settings_warns_and_continues(shards: str, tmp_path: Path) -> None:
    """A pod restarted with other data settings must not crash-loop on the saved position."""
    base = [sys.executable, "-m", "trainer.train", "--config", "tiny_cpu"]
    first = run(base + overrides(shards, tmp_path, "optim.max_iters=2", "optim.milestones=",
                                 "data.num_workers=1", "checkpoint.every=0"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(base + overrides(shards, tmp_path, "optim.max_iters=3", "optim.milestones=",
                                  "data.seed=1", "checkpoint.every=0"))
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "(step 2)" in log and "data position not restored" in log
