"""Two "pods" of one job, and one of them killed outright: the other must exit retryably.

Each node is its own ``python -m trainer.dist`` (the pod command) with exactly the
environment a PyTorchJob injects (``PET_NNODES``, ``PET_NODE_RANK``, ``MASTER_ADDR``, ...),
so the two torchrun agents rendezvous over TCP as two pods do. Killing one node's whole
process group with SIGKILL is what an eviction without grace, an OOM kill of the pod or a
reclaimed spot VM does. Before ``ExitCode.PEER_LOST`` the survivor died of gloo's
"Connection reset by peer" with exit 1, which ``restartPolicy: ExitCode`` treats as
permanent: one lost pod failed the whole job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.helpers import overrides, train_env
from trainer.dist import ExitCode

pytestmark = pytest.mark.slow


def _node(rank: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    env = train_env(MASTER_ADDR="127.0.0.1", PET_MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                    PET_MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), PET_NODE_RANK=str(rank),
                    PET_NNODES="2", PET_NPROC_PER_NODE="1")
    cmd = [sys.executable, "-m", "trainer.dist", "-m", "trainer.train", "--config", "tiny_cpu", *args]
    with open(log, "w") as out:  # a file, not a pipe: nobody reads it while the node runs
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _kill_pod(node: subprocess.Popen) -> None:
    """SIGKILL the node's agent and every descendant, as a pod's cgroup is killed.

    torchrun starts each worker in a session of its own, so killing the agent's process
    group alone would leave the worker training as an orphan.
    """
    def descendants(pid: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    child = int(stat.parent.name)
                    found += [child, *descendants(child)]
            except (OSError, ValueError, IndexError):
                continue
        return found

    for pid in [node.pid, *descendants(node.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _complete_steps(ckpt: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in ckpt.glob("step-*/COMPLETE"))


def test_survivor_of_a_killed_pod_exits_peer_lost_and_the_job_resumes(shards: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = overrides(shards, run_dir, "optim.max_iters=40", "optim.milestones=", "checkpoint.every=5")
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    port = free_port()
    nodes = [_node(r, port, args, logs[r]) for r in range(2)]
    try:
        deadline = time.time() + 240
        while not _complete_steps(run_dir / "checkpoints"):
            assert time.time() < deadline and all(n.poll() is None for n in nodes), logs[0].read_text()[-3000:]
            time.sleep(0.2)
        _kill_pod(nodes[1])
        killed_at = time.time()
        code = nodes[0].wait(timeout=120)
        survivor_log = logs[0].read_text()
        assert code == ExitCode.PEER_LOST, survivor_log[-3000:]
        assert 128 <= code <= 255  # retried by PyTorchJob restartPolicy: ExitCode
        assert "another rank died or stopped answering" in survivor_log
        assert time.time() - killed_at < 60
    finally:
        for n in nodes:
            if n.poll() is None:
                _kill_pod(n)
                n.wait()
    last = _complete_steps(run_dir / "checkpoints")[-1]

    # The operator restarts both pods: they resume from the newest complete checkpoint.
    port = free_port()
    nodes = [_node(r, port, args, tmp_path / f"again{r}.log") for r in range(2)]
    codes = [n.wait(timeout=300) for n in nodes]
    again = (tmp_path / "again0.log").read_text()
    assert codes == [0, 0], again[-3000:]
    assert f"(step {last})" in again, again[-3000:]
    assert _complete_steps(run_dir / "checkpoints")[-1] == 40
