"""The pod command's launcher (``python -m trainer.dist``) on its own: grace and rendezvous.

Workers here are small scripts, not the trainer: what is tested is what the launcher does
with them (how long it lets them finish after SIGTERM, what it exits with when the other
pods never join).
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
from trainer.dist import ExitCode

pytestmark = pytest.mark.slow

#: A worker that needs ``SAVE_S`` seconds to "write its checkpoint" after SIGTERM.
SLOW_SAVER = """
import os, signal, sys, time
from pathlib import Path

def on_term(signum, frame):
    time.sleep(float(os.environ["SAVE_S"]))
    Path(os.environ["MARKER"]).write_text("saved")
    sys.exit(143)

signal.signal(signal.SIGTERM, on_term)
Path(os.environ["MARKER"] + ".started").write_text("up")
while True:
    time.sleep(0.1)
"""


def _launcher(script: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer.dist", "--standalone", "--nproc-per-node=1", *args,
                             str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("grace, save_s, saved", [(20, 4, True), (2, 8, False)])
def test_workers_get_the_configured_grace_after_sigterm(tmp_path: Path, grace: int, save_s: float,
                                                        saved: bool) -> None:
    script = tmp_path / "saver.py"
    script.write_text(SLOW_SAVER)
    marker = tmp_path / "marker"
    env = dict(os.environ, SAM_SHUTDOWN_TIMEOUT_S=str(grace), SAVE_S=str(save_s), MARKER=str(marker),
               SAM_LOG_FORMAT="text")
    proc = _launcher(script, env)
    deadline = time.time() + 60
    while not Path(str(marker) + ".started").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    start = time.time()
    proc.send_signal(signal.SIGTERM)  # the kubelet, at the start of the pod's grace period
    out = proc.communicate(timeout=120)[0]
    elapsed = time.time() - start
    assert proc.returncode == ExitCode.PREEMPTED, out[-3000:]
    assert marker.exists() == saved, out[-3000:]
    if saved:  # waited for the save, not torchrun's 30 s
        assert save_s <= elapsed < 20, out[-3000:]
    else:  # killed after the grace, before the save would have ended
        assert grace <= elapsed < save_s, out[-3000:]


def test_bad_grace_value_is_a_config_error(tmp_path: Path) -> None:
    script = tmp_path / "noop.py"
    script.write_text("print('never')\n")
    env = dict(os.environ, SAM_SHUTDOWN_TIMEOUT_S="soon", SAM_LOG_FORMAT="text")
    proc = _launcher(script, env)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == ExitCode.CONFIG
    assert "SAM_SHUTDOWN_TIMEOUT_S" in out and "never" not in out


@pytest.mark.parametrize("node_rank", ["0", "1"])
def test_pods_that_never_join_exit_retryably(tmp_path: Path, node_rank: str) -> None:
    """Node 0 hosts the store and waits for node 1; node 1 cannot reach a store: both 200."""
    script = tmp_path / "noop.py"
    script.write_text("print('never')\n")
    port = str(free_port())
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", PET_MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               PET_MASTER_PORT=port, PET_NNODES="2", PET_NODE_RANK=node_rank, PET_NPROC_PER_NODE="1",
               SAM_LOG_FORMAT="text")
    proc = subprocess.run([sys.executable, "-m", "trainer.dist", "--rdzv-conf=join_timeout=4,timeout=4", str(script)],
                          env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == ExitCode.PEER_LOST, out[-3000:]
    assert 128 <= proc.returncode <= 255  # retried by restartPolicy: ExitCode
    assert "rendezvous with the other pods failed" in out and "never" not in out
