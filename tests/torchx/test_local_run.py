"""Real training through TorchX's built-in ``local_cwd`` scheduler (no mocks).

The component runs ``python -m trainer.dist`` (torchrun in-process) with 2 gloo processes on
CPU, on synthetic shards: once from the ``torchx`` command line with the component given by
file path (1 node x 2 processes), once through the runner API with the entry-point name
``sam_train`` (2 nodes x 1 process: two torchrun agents meeting at rank 0's host through the
``${rank0_env}`` macro). The trainer is deterministic on CPU, so both runs must compute the
same losses.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.torchx import require_torchx

require_torchx()

from tests.torchx.conftest import COMPONENT_FILE, SHORT_RUN, cli_env  # noqa: E402
from trainer.checkpoint import CheckpointManager  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 6


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss/total"] for r in records if "loss/total" in r}


def assert_complete_checkpoint(run_dir: Path) -> None:
    manager = CheckpointManager(str(run_dir / "checkpoints"))
    assert manager.latest_complete() == STEPS
    assert manager.problem(STEPS) is None
    assert (run_dir / "checkpoints" / f"step-{STEPS:08d}" / "COMPLETE").is_file()


@pytest.fixture(scope="module")
def cli_run(torchx_cli: str, shards: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``torchx run -s local_cwd <file>:sam_train``, 1 node x 2 CPU processes: (run dir, output)."""
    work = tmp_path_factory.mktemp("cli-run")
    run_dir = work / "run"
    cmd = [torchx_cli, "run", "-s", "local_cwd", "--scheduler_args", f"log_dir={work / 'logs'}",
           f"{COMPONENT_FILE}:sam_train", "--config", "tiny_cpu", "--nodes", "1", "--nproc_per_node", "0",
           "--cpu_procs", "2", "--data_shards", shards, "--run_dir", str(run_dir),
           # one --set, comma-separated (a repeated --set would replace it); milestones=4,5 holds a comma
           "--set", ",".join(SHORT_RUN)]
    proc = subprocess.run(cmd, cwd=work, env=cli_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return run_dir, output


def test_cli_local_cwd_trains_two_processes(cli_run: tuple[Path, str]) -> None:
    run_dir, output = cli_run
    assert "Job finished: SUCCEEDED" in output
    assert "1 per rank x 2 ranks" in output, output[-3000:]  # the engine's global-batch line: world size 2
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert_complete_checkpoint(run_dir)


def test_runner_api_two_nodes_gives_the_same_losses(cli_run: tuple[Path, str], shards: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from torchx.runner import get_runner
    from torchx.specs import AppState

    from tests.conftest import free_port

    monkeypatch.setenv("PATH", cli_env()["PATH"])  # local_cwd starts `python` and `bash` from PATH
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SAM_LOG_FORMAT", "text")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    args = ["--config", "tiny_cpu", "--nodes", "2", "--nproc_per_node", "0", "--cpu_procs", "1",
            "--rdzv_port", str(free_port()), "--data_shards", shards, "--run_dir", str(run_dir),
            "--set", ",".join(SHORT_RUN)]
    with get_runner() as runner:
        handle = runner.run_component("sam_train", args, "local_cwd", cfg={"log_dir": str(tmp_path / "logs")})
        status = runner.wait(handle, wait_interval=0.5)
        app_id = handle.rsplit("/", 1)[-1]
    log_text = "".join(p.read_text() for p in sorted((tmp_path / "logs").rglob("*.log")))
    assert status is not None and status.state == AppState.SUCCEEDED, f"{status}\n{log_text[-4000:]}"
    assert_complete_checkpoint(run_dir)
    assert losses(run_dir) == losses(cli_run[0])
    assert app_id.startswith("sam-train-")
