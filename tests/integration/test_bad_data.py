"""Bad shard lists and bad shards through the real entry points.

- A bad ``data.shards`` (empty glob, unknown protocol, missing path) ends in ONE stderr
  line naming the setting, exit 2, no traceback, before any step.
- 2 ranks on 3 shards, one of them not a tar: the rank that draws only the bad shard
  skips it and trains on (exit 0); only when no shard gives a sample does the job stop,
  with exit 2 and a line naming the shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trainer.data import write_synthetic_shards

from .helpers import metrics, overrides, run, torchrun_cmd

pytestmark = pytest.mark.slow
SHORT = ["optim.max_iters=8", "optim.milestones=", "checkpoint.every=0"]


def _config_error_line(stderr: str, setting: str = "data.shards") -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if setting in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("spec", ["{tmp}/none_*.tar", "bogus://bucket/sa_000000.tar",
                                  "{tmp}/missing.txt", "{shards},{tmp}/sa_000099.tar"])
def test_bad_shard_setting_is_one_line_exit_2(spec: str, shards: str, tmp_path: Path) -> None:
    spec = spec.format(tmp=tmp_path, shards=shards)
    proc = run([sys.executable, "-m", "trainer.train", "--config", "tiny_cpu"]
               + overrides(spec, tmp_path / "run", "checkpoint.every=0"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _config_error_line(proc.stderr)
    assert line.startswith("config error: data.shards: ") and spec.split(",")[-1] in line


def test_rank_with_only_a_bad_shard_trains_on_and_all_bad_stops_with_exit_2(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_synthetic_shards(str(data), num_images=4, num_shards=2, seed=0, min_side=96, max_side=160,
                           min_masks=2, max_masks=4)
    (data / "sa_000002.tar").write_bytes(b"<Error>AccessDenied</Error>")  # a proxy's error page
    proc = run(torchrun_cmd(2) + overrides(f"{data}/sa_*.tar", tmp_path / "run", *SHORT), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = [r for r in metrics(tmp_path / "run") if "loss/total" in r][-1]
    assert last["step"] == 8

    for name in ("sa_000000.tar", "sa_000001.tar"):
        (data / name).write_bytes(b"")
    proc = run(torchrun_cmd(2) + overrides(f"{data}/sa_*.tar", tmp_path / "run2", *SHORT), timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "none of the 3 shards gives a usable sample" in proc.stderr
    assert f"{data}/sa_000002.tar (not_a_tar)" in proc.stderr
