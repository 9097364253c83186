"""Checkpoint safety end to end: finished runs restarted, SIGTERM in the last step,
non-finite weights, unusable checkpoints, settings changed on resume, bad run dirs.

In-process runs (the real engine, data and checkpoints, one rank) where exit codes need
no launcher; the real entry point or the torchrun wrapper where they do.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import tomllib
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainer import engine
from trainer.config import ConfigError, load_config
from trainer.presets import PRESETS, Config

from .helpers import FAST, metrics, overrides, run, train_env


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


def config(shards: str, run_dir: Path, *more: str) -> Config:
    return load_config(Config, "tiny_cpu", [f"data.shards={shards}", f"train.run_dir={run_dir}", *FAST,
                                            "optim.milestones=", *more], PRESETS)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256 (what a rewrite would change)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_finished_run_restarted_exits_0_and_rewrites_nothing(shards: str, tmp_path: Path, single_process,
                                                             capfd: pytest.CaptureFixture) -> None:
    cfg = config(shards, tmp_path, "optim.max_iters=3", "checkpoint.every=0")
    assert engine.train(cfg) == 0
    before = tree_digest(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    capfd.readouterr()
    assert engine.train(cfg) == 0  # the engine's logging setup writes to stderr
    assert "already reaches optim.max_iters=3" in capfd.readouterr().err
    assert tree_digest(tmp_path) == before  # checkpoints, metrics.jsonl, loss_curve.png
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes


def test_sigterm_during_last_step_finishes_with_exit_0(shards: str, tmp_path: Path, single_process,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = engine.SamTrainModel.forward

    def forward(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(1)
        if len(calls) == 3:  # inside the last of 3 steps, as a node drain would
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine.SamTrainModel, "forward", forward)
    cfg = config(shards, tmp_path, "optim.max_iters=3", "checkpoint.every=0")
    assert engine.train(cfg) == 0  # done: exit 143 would ask for a pointless restart
    assert (tmp_path / "checkpoints/step-00000003/COMPLETE").exists()


def poison_weights_on_update(update: int) -> None:
    """Fault injection: the ``update``-th optimizer step (1-based) leaves an inf weight.

    Loss and gradients stay finite; only the update goes wrong, as with an overflowing
    lr or a bf16 overflow. No natural, portable way makes a tiny model do that on cue
    (an lr that overflows float32 makes torch raise before updating).
    """
    original = torch.optim.AdamW.step
    count = [0]

    def step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        out = original(self, *args, **kwargs)
        count[0] += 1
        if count[0] == update:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    torch.optim.AdamW.step = step


@pytest.mark.parametrize("every, saved", [(1, ["step-00000001"]), (0, [])])
def test_update_to_nonfinite_weights_exits_3_and_never_checkpoints_them(
        shards: str, tmp_path: Path, single_process, monkeypatch: pytest.MonkeyPatch, every: int,
        saved: list[str]) -> None:
    # every=1: the save after the bad update refuses it; every=0: the next step's agreement stops.
    monkeypatch.setattr(torch.optim.AdamW, "step", torch.optim.AdamW.step)  # undone after the test
    poison_weights_on_update(2)
    cfg = config(shards, tmp_path, "optim.max_iters=4", f"checkpoint.every={every}")
    assert engine.train(cfg) == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == saved


def _poisoned_rank(rank: int, port: int, shards: str, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if rank == 1:  # one rank alone goes wrong: all must stop with exit 3 together
        poison_weights_on_update(2)
    code = engine.train(config(shards, Path(run_dir), "optim.max_iters=4", "checkpoint.every=1"))
    Path(run_dir, f"exit{rank}").write_text(str(code))


def test_two_ranks_nonfinite_weights_exit_3_not_replicas_differ(shards: str, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # spawn, not fork: this pytest process has run in-process training already, and a
    # child forked from a process whose OpenMP pool is started can deadlock in it.
    mp.start_processes(_poisoned_rank, args=(port, shards, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    assert [(tmp_path / f"exit{r}").read_text() for r in range(2)] == ["3", "3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]


def test_unusable_checkpoints_refuse_to_start_with_exit_2(shards: str, tmp_path: Path) -> None:
    cmd = ["python", "-m", "trainer.train", "--config", "tiny_cpu",
           *overrides(shards, tmp_path, "optim.max_iters=4", "optim.milestones=", "checkpoint.every=2",
                            "checkpoint.keep_last=0")]
    assert run(cmd).returncode == 0
    for step in (2, 4):  # every checkpoint truncated
        model = tmp_path / f"checkpoints/step-{step:08d}/model.pt"
        model.write_bytes(model.read_bytes()[:100])
    proc = run(cmd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "step-00000002" in proc.stderr and "step-00000004" in proc.stderr and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert run(cmd + ["--set", "checkpoint.fresh_if_unusable=true"]).returncode == 0  # asked: starts over
    assert (tmp_path / "checkpoints/step-00000004/COMPLETE").exists()


def test_settings_changed_on_resume_are_applied_or_kept_and_recorded_as_in_effect(
        shards: str, tmp_path: Path, single_process, capfd: pytest.CaptureFixture) -> None:
    assert engine.train(config(shards, tmp_path, "optim.max_iters=2", "checkpoint.every=0",
                               "optim.warmup_iters=0")) == 0
    resumed = config(shards, tmp_path, "optim.max_iters=4", "checkpoint.every=0", "optim.lr=3e-4",
                     "optim.warmup_iters=0",
                     "train.grad_clip=0.5", "model.pe_seed=7")
    capfd.readouterr()
    assert engine.train(resumed) == 0
    err = capfd.readouterr().err
    assert "optim.lr changed on resume (0.001 -> 0.0003): in effect from step 3" in err
    assert "optim.max_iters changed on resume (2 -> 4)" in err
    assert "model.pe_seed changed on resume (0 -> 7): ignored" in err
    lrs = {r["step"]: r["lr"] for r in metrics(tmp_path) if "lr" in r}
    assert lrs[1] == pytest.approx(1e-3) and lrs[3] == pytest.approx(3e-4) and lrs[4] == pytest.approx(3e-4)
    saved = tomllib.loads((tmp_path / "checkpoints/step-00000004/config.toml").read_text())
    assert saved["optim"]["lr"] == 3e-4 and saved["train"]["grad_clip"] == 0.5
    assert saved["model"]["pe_seed"] == 0  # the PE buffer came from the checkpoint
    state = torch.load(tmp_path / "checkpoints/step-00000004/train_state.pt", weights_only=True)
    last = state["optimizer"]["param_groups"][-1]
    assert last["initial_lr"] == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="model.variant"):
        engine.train(config(shards, tmp_path, "optim.max_iters=6", "checkpoint.every=0", "model.variant=vit_b",
                            "data.img_size=1024"))


@pytest.mark.parametrize("setting, value, message", [
    ("train.run_dir", "{tmp}/afile/run", "train.run_dir: cannot write"),
    ("train.run_dir", "bogus://bucket/run", "train.run_dir: cannot write"),
    ("checkpoint.url", "{tmp}/afile/ckpt", "checkpoint.url: cannot write"),
    ("eval.shards", "{tmp}/nothing_*.tar", "eval.shards: "),  # found at start, not after training
])
def test_unusable_locations_are_one_line_exit_2_at_start(shards: str, tmp_path: Path, setting: str,
                                                         value: str, message: str) -> None:
    (tmp_path / "afile").write_text("a regular file where a directory should be")
    cmd = ["python", "-m", "trainer.train", "--config", "tiny_cpu",
           *overrides(shards, tmp_path / "run", "checkpoint.every=0", f"{setting}={value.format(tmp=tmp_path)}")]
    proc = run(cmd, env=train_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and message in proc.stderr
    assert "step 1/" not in proc.stderr  # nothing trained


def test_grad_norm_before_clipping_is_reported_with_and_without_clipping(
        shards: str, tmp_path: Path, single_process, capfd: pytest.CaptureFixture) -> None:
    norms = {}
    for clip in ("0", "1e-6"):
        run_dir = tmp_path / clip
        assert engine.train(config(shards, run_dir, "optim.max_iters=2", "checkpoint.every=0",
                                   f"train.grad_clip={clip}")) == 0
        norms[clip] = [r["grad_norm"] for r in metrics(run_dir) if "grad_norm" in r]
    assert "grad norm" in capfd.readouterr().err  # in the progress line
    assert len(norms["0"]) == 2 and all(n > 1e-6 for n in norms["0"])
    assert norms["1e-6"][0] == pytest.approx(norms["0"][0])  # before clipping, not after


def test_step_dir_that_is_a_file_is_reported_not_a_traceback(shards: str, tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/step-00000002").write_text("not a directory")
    (tmp_path / "checkpoints/step-00000004").mkdir()  # a second unusable one: refuse, naming both
    cmd = ["python", "-m", "trainer.train", "--config", "tiny_cpu",
           *overrides(shards, tmp_path, "optim.max_iters=2", "optim.milestones=", "checkpoint.every=0")]
    proc = run(cmd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "step-00000002: not a directory" in proc.stderr and "Traceback" not in proc.stderr
