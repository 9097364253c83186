"""Checkpoints: round trips on memory://, file:// and gs://, verification, fallback, pruning."""

from __future__ import annotations

import json
import logging
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
    step_dirname,
)
from trainer.storage import join_url, open_url, url_to_fs


def make_state(step: int) -> dict[str, Any]:
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(step)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "train_state": {"optimizer": opt.state_dict(), "step": step, "data": {"epoch": 0, "index": step * 8},
                        "rng": [capture_rng_state()]},
        "config.toml": f"[train]\nseed = {step}\n",
    }


@pytest.fixture(params=["memory", "file", "gs"])
def ckpt_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    name = uuid.uuid4().hex[:8]
    if request.param == "memory":
        return f"memory://ckpt-{name}/run"
    if request.param == "file":
        return f"file://{tmp_path}/ckpt"
    bucket = request.getfixturevalue("gcs_server").bucket(f"ckpt-{name}")
    return f"{bucket}/runs/x/checkpoints"


def write_bytes(url: str, data: bytes) -> None:
    with open_url(url, "wb") as f:
        f.write(data)


def read_bytes(url: str) -> bytes:
    with open_url(url, "rb") as f:
        return f.read()


def test_round_trip(ckpt_url: str) -> None:
    manager = CheckpointManager(ckpt_url, keep_last=3)
    assert manager.latest_complete() is None and manager.load_latest() is None
    state = make_state(5)
    info = manager.save(5, state)
    assert info.written and info.seconds > 0 and info.url == join_url(ckpt_url, "step-00000005")
    manifest = json.loads(read_bytes(join_url(info.url, MARKER)))
    assert manifest["step"] == 5 and set(manifest["files"]) == {"model.pt", "train_state.pt", "config.toml"}
    assert info.num_bytes == sum(f["size"] for f in manifest["files"].values())
    step, loaded = CheckpointManager(ckpt_url).load_latest()  # a fresh manager, e.g. after restart
    assert step == 5
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["train_state"]["data"] == {"epoch": 0, "index": 40}
    assert torch.equal(loaded["train_state"]["optimizer"]["state"][0]["exp_avg"],
                       state["train_state"]["optimizer"]["state"][0]["exp_avg"])
    assert loaded["config.toml"] == "[train]\nseed = 5\n"


def test_keep_last_pruning(ckpt_url: str) -> None:
    manager = CheckpointManager(ckpt_url, keep_last=2)
    for step in (10, 20, 30, 40):
        manager.save(step, {"model": {"w": torch.tensor([float(step)])}})
    assert manager.steps() == [40, 30]
    assert CheckpointManager(ckpt_url, keep_last=0).prune() == []  # 0 keeps all


def test_prune_removes_old_incomplete_and_keeps_newest_complete() -> None:
    manager = CheckpointManager(f"memory://prune-{uuid.uuid4().hex[:8]}", keep_last=1)
    manager.keep_last = 0  # fill without pruning
    for step in (1, 2, 3, 4):
        manager.save(step, {"model": {"w": torch.zeros(1)}})
    manager.fs.rm(f"{manager._path(2)}/{MARKER}")  # old incomplete
    manager.fs.rm(f"{manager._path(4)}/{MARKER}")  # newer than the newest complete (3)
    manager.keep_last = 1
    assert sorted(manager.prune()) == [1, 2]
    assert manager.steps() == [4, 3] and manager.latest_complete() == 3


def test_truncated_newest_is_skipped(ckpt_url: str, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(ckpt_url, keep_last=3)
    manager.save(1, make_state(1))
    manager.save(2, make_state(2))
    model_url = join_url(manager.step_url(2), "model.pt")
    write_bytes(model_url, read_bytes(model_url)[:-10])
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert manager.latest_complete() == 1
        step, state = manager.load_latest()
    assert step == 1 and state["train_state"]["step"] == 1
    assert "step-00000002" in caplog.text and "truncated" in caplog.text


def test_missing_marker_is_skipped(ckpt_url: str, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(ckpt_url, keep_last=3)
    manager.save(1, make_state(1))
    manager.save(2, make_state(2))
    fs, path = url_to_fs(join_url(manager.step_url(2), MARKER))
    fs.rm(path)  # a save interrupted before its marker
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert manager.load_latest()[0] == 1
    assert "no COMPLETE marker" in caplog.text


def test_partial_upload_without_marker_on_gcs(gcs_server: Any) -> None:
    url = gcs_server.bucket(f"partial-{uuid.uuid4().hex[:8]}") + "/ckpt"
    manager = CheckpointManager(url)
    manager.save(100, make_state(1))
    # What a preempted rank 0 leaves on GCS: some objects of step 200, no marker.
    write_bytes(join_url(url, step_dirname(200), "model.pt"), b"\x00" * 100)
    assert manager.steps() == [200, 100]
    assert manager.latest_complete() == 100
    assert manager.load_latest()[0] == 100


def test_corrupt_file_of_right_size_falls_back(ckpt_url: str, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(ckpt_url, keep_last=3)
    manager.save(1, make_state(1))
    manager.save(2, make_state(2))
    state_url = join_url(manager.step_url(2), "train_state.pt")
    write_bytes(state_url, b"\xff" * len(read_bytes(state_url)))
    assert manager.latest_complete() == 2  # listing alone cannot tell
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        step, state = manager.load_latest()
    assert step == 1 and "sha256" in caplog.text


def test_unloadable_file_falls_back_without_hash_check() -> None:
    manager = CheckpointManager(f"memory://garbage-{uuid.uuid4().hex[:8]}")
    manager.save(1, make_state(1))
    manager.save(2, make_state(2))
    path = f"{manager._path(2)}/model.pt"
    size = manager.fs.size(path)
    with manager.fs.open(path, "wb") as f:
        f.write(b"\x00" * size)
    assert manager.load_latest(verify=False)[0] == 1  # torch.load fails -> previous one
    with pytest.raises(CheckpointError, match="cannot load model.pt"):
        manager.load(2, verify=False)


def test_no_loadable_checkpoint_raises_instead_of_starting_over() -> None:
    manager = CheckpointManager(f"memory://allbad-{uuid.uuid4().hex[:8]}")
    manager.save(1, {"model": {"w": torch.zeros(3)}})
    path = f"{manager._path(1)}/model.pt"
    size = manager.fs.size(path)
    with manager.fs.open(path, "wb") as f:
        f.write(b"\x01" * size)
    with pytest.raises(CheckpointError, match="no usable checkpoint.*step-00000001: model.pt: sha256"):
        manager.load_latest()


def test_resave_same_step_replaces_stale_marker() -> None:
    manager = CheckpointManager(f"memory://resave-{uuid.uuid4().hex[:8]}")
    manager.save(7, {"model": {"w": torch.zeros(100)}, "notes.txt": "old"})
    manager.save(7, {"model": {"w": torch.ones(2)}})
    state = manager.load(7)
    assert set(state) == {"model"} and torch.equal(state["model"]["w"], torch.ones(2))


def test_non_main_rank_does_not_write() -> None:
    url = f"memory://nonmain-{uuid.uuid4().hex[:8]}"
    info = CheckpointManager(url, is_main=False).save(3, {"model": {"w": torch.zeros(1)}})
    assert not info.written and info.seconds == 0.0
    assert CheckpointManager(url).steps() == []


class FakeDist:
    """Collectives of a 2-rank job seen from one rank; rank 0's broadcast is injected."""

    def __init__(self, from_rank0: Any = None, others_ok: bool = True) -> None:
        self.from_rank0, self.others_ok, self.sent = from_rank0, others_ok, []

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        self.sent.append(obj)
        return obj if self.from_rank0 is None else self.from_rank0

    def all_agree(self, flag: bool) -> bool:
        return flag and self.others_ok


def test_resume_rank0_decides_and_others_follow() -> None:
    url = f"memory://resume-{uuid.uuid4().hex[:8]}"
    main = CheckpointManager(url)
    main.save(1, make_state(1))
    main.save(2, make_state(2))
    ops = FakeDist()
    step, state = main.resume(ops)
    assert step == 2 and ops.sent == [2]
    # Rank 1 loads whatever rank 0 chose, even when a newer dir appeared meanwhile.
    step, state = CheckpointManager(url, is_main=False).resume(FakeDist(from_rank0=1))
    assert step == 1 and state["train_state"]["step"] == 1
    with pytest.raises(CheckpointError, match="not every rank"):
        main.resume(FakeDist(others_ok=False))


def test_resume_fresh_and_error_on_all_ranks() -> None:
    url = f"memory://fresh-{uuid.uuid4().hex[:8]}"
    assert CheckpointManager(url).resume(FakeDist()) is None
    assert CheckpointManager(url, is_main=False).resume(FakeDist(from_rank0=None)) is None
    with pytest.raises(CheckpointError, match="rank 0 failed"):
        CheckpointManager(url, is_main=False).resume(FakeDist(from_rank0="rank 0 failed"))


def test_rng_state_round_trip() -> None:
    url = f"memory://rng-{uuid.uuid4().hex[:8]}"
    manager = CheckpointManager(url)
    manager.save(1, {"train_state": {"rng": capture_rng_state()}})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(manager.load(1)["train_state"]["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_bad_state_key_rejected() -> None:
    manager = CheckpointManager(f"memory://keys-{uuid.uuid4().hex[:8]}")
    manager.save(1, {"model": {"w": torch.zeros(1)}})
    for key in ("a/b.txt", ".hidden"):
        with pytest.raises(ValueError, match="not a valid file name"):
            manager.save(1, {"model": {}, key: b"x"})
    assert manager.latest_complete() == 1  # nothing was deleted


def _truncate(manager: CheckpointManager, step: int, name: str = "model.pt") -> None:
    path = f"{manager._path(step)}/{name}"
    data = manager.fs.cat_file(path)
    with manager.fs.open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _drop_marker(manager: CheckpointManager, step: int) -> None:
    manager.fs.rm(f"{manager._path(step)}/{MARKER}")


def test_resave_of_complete_step_never_removes_it_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A save of an existing complete step killed at any file leaves a complete checkpoint."""
    manager = CheckpointManager(f"memory://resave-kill-{uuid.uuid4().hex[:8]}")
    manager.save(5, make_state(5))
    original = CheckpointManager._write
    for fail_at in range(4):  # model.pt, train_state.pt, config.toml, COMPLETE
        calls = []

        def dying_write(self: CheckpointManager, path: str, payload: Any) -> dict[str, Any]:
            calls.append(path)
            if len(calls) > fail_at:
                raise KeyboardInterrupt("killed")  # stands in for SIGKILL mid-save
            return original(self, path, payload)

        monkeypatch.setattr(CheckpointManager, "_write", dying_write)
        with pytest.raises(KeyboardInterrupt):
            manager.save(5, make_state(6))
        monkeypatch.setattr(CheckpointManager, "_write", original)
        step, state = manager.load_latest()
        assert step == 5 and state["train_state"]["step"] == 5  # the old copy, intact
    manager.save(5, make_state(6))  # an uninterrupted re-save replaces it...
    assert manager.load(5)["train_state"]["step"] == 6
    names = {p.rsplit("/", 1)[-1] for p in manager.fs.ls(manager._path(5), detail=False)}
    assert len(names) == 4 and MARKER in names  # ...and leaves no stale files behind


def test_no_usable_checkpoint_refuses_unless_a_crash_explains_it(caplog: pytest.LogCaptureFixture) -> None:
    url = f"memory://unusable-{uuid.uuid4().hex[:8]}"
    manager = CheckpointManager(url)
    manager.save(1, make_state(1))
    _drop_marker(manager, 1)
    assert manager.load_latest() is None  # the very first save was interrupted: start over
    manager.save(1, make_state(1))
    manager.save(2, make_state(2))
    _drop_marker(manager, 2)  # a crash leaves only the newest dir incomplete...
    _truncate(manager, 1)  # ...so a truncated older one as well is not a crash
    with pytest.raises(CheckpointError) as err:
        manager.load_latest()
    assert "step-00000002: no COMPLETE marker" in str(err.value)
    assert "step-00000001: model.pt has" in str(err.value) and "truncated" in str(err.value)
    only_truncated = CheckpointManager(f"memory://unusable1-{uuid.uuid4().hex[:8]}")
    only_truncated.save(3, make_state(3))
    _truncate(only_truncated, 3)
    with pytest.raises(CheckpointError, match="step-00000003: model.pt has"):  # a marker that lies
        only_truncated.load_latest()
    with caplog.at_level(logging.WARNING):
        assert CheckpointManager(url, fresh_if_unusable=True).load_latest() is None
    assert "starting from step 0 as asked" in caplog.text


def test_manifest_with_stored_names_survives_format_one_readers() -> None:
    """A re-saved step's manifest maps names to generation files; sizes and hashes still check."""
    manager = CheckpointManager(f"memory://gen-{uuid.uuid4().hex[:8]}")
    manager.save(4, make_state(4))
    manager.save(4, make_state(4))
    manifest = json.loads(manager.fs.cat_file(f"{manager._path(4)}/{MARKER}"))
    assert all(meta["file"].startswith(name + ".") for name, meta in manifest["files"].items())
    assert manager.problem(4) is None
    _truncate(manager, 4, manifest["files"]["model.pt"]["file"])
    assert "truncated" in manager.problem(4)


def test_weights_of_a_resaved_step_are_found_by_readers(tmp_path: Path) -> None:
    """Export/eval/init read a step dir's model through its manifest, also after a re-save."""
    from trainer.cli import resolve_weights
    from trainer.model import read_state_dict

    root = f"file://{tmp_path}/ckpt"
    manager = CheckpointManager(root)
    manager.save(3, make_state(3))
    manager.save(3, make_state(5))  # re-save: files under generation names
    assert not (tmp_path / "ckpt" / step_dirname(3) / "model.pt").exists()
    for url in (root, manager.step_url(3)):
        weights = read_state_dict(resolve_weights(url))
        assert float(weights["weight"].mean()) == pytest.approx(5.0, abs=0.01)  # the new copy
