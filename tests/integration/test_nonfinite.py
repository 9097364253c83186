"""Non-finite loss handling, in process (one rank, the real engine and data).

The fault is injected by wrapping the training module's forward so that chosen steps
return a NaN loss: there is no natural way to make a healthy tiny model diverge on cue.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer import engine
from trainer.config import load_config
from trainer.presets import PRESETS, Config

from .helpers import FAST, metrics


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


def poison(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int]) -> list[int]:
    """Make the loss NaN on the given 0-based steps; returns the steps seen."""
    seen: list[int] = []
    original = engine.SamTrainModel.forward

    def forward(self, batch, generator, num_masks, amp_dtype, timer):  # noqa: ANN001
        losses = original(self, batch, generator, num_masks, amp_dtype, timer)
        step = len(seen)
        seen.append(step)
        if step in bad_steps:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    monkeypatch.setattr(engine.SamTrainModel, "forward", forward)
    return seen


def config(shards: str, run_dir: Path, *more: str) -> Config:
    return load_config(Config, "tiny_cpu", [f"data.shards={shards}", f"train.run_dir={run_dir}", *FAST, *more], PRESETS)


def test_single_nonfinite_step_is_skipped_and_counted(shards: str, tmp_path: Path, monkeypatch, single_process) -> None:
    poison(monkeypatch, bad_steps={1})
    cfg = config(shards, tmp_path, "optim.max_iters=4", "optim.milestones=", "checkpoint.every=0",
                 "train.max_nonfinite_steps=2")
    assert engine.train(cfg) == 0
    records = [r for r in metrics(tmp_path) if "loss/total" in r]
    assert [r["nonfinite/skipped"] for r in records] == [0.0, 1.0, 0.0, 0.0]
    assert records[-1]["nonfinite/total"] == 1
    state = torch.load(tmp_path / "checkpoints/step-00000004/train_state.pt", weights_only=True)
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {3.0}  # 4 iterations, one update skipped on every parameter


def test_consecutive_nonfinite_steps_abort_with_exit_3_keeping_last_checkpoint(
        shards: str, tmp_path: Path, monkeypatch, single_process) -> None:
    poison(monkeypatch, bad_steps=set(range(2, 100)))
    cfg = config(shards, tmp_path, "optim.max_iters=10", "optim.milestones=", "checkpoint.every=2",
                 "train.max_nonfinite_steps=3")
    assert engine.train(cfg) == 3
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # Steps 3 and 4 were skipped, but step 4 still counts as an iteration and is saved
    # (its weights are those of step 2); step 5 is the third non-finite step: abort.
    assert saved == ["step-00000002", "step-00000004"]
    a = torch.load(tmp_path / "checkpoints/step-00000002/model.pt", weights_only=True)
    b = torch.load(tmp_path / "checkpoints/step-00000004/model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
