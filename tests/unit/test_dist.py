"""Rank helpers: single-process fallback, a real 2-process gloo group, signals, exit codes."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.multiprocessing as mp

from trainer import dist
from trainer.config import EXIT_CONFIG_ERROR, ConfigError
from trainer.dist import DistEnvError, ExitCode, GracefulShutdown

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_exit_codes() -> None:
    assert (ExitCode.OK, ExitCode.CONFIG, ExitCode.NONFINITE, ExitCode.PREEMPTED) == (0, 2, 3, 143)
    assert ExitCode.CONFIG == EXIT_CONFIG_ERROR
    assert 1 <= ExitCode.NONFINITE <= 127  # permanent under restartPolicy ExitCode
    assert 128 <= ExitCode.PREEMPTED <= 255  # retried
    assert dist.exit_code_of(-signal.SIGKILL) == 137 and dist.exit_code_of(3) == 3


def test_single_process_fallback(no_torchrun_env: None) -> None:
    info = dist.init_distributed("cpu")
    assert (info.rank, info.local_rank, info.world_size, info.backend, info.is_main) == (0, 0, 1, None, True)
    assert info.device == torch.device("cpu")
    dist.barrier()
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert dist.all_gather_object(5) == [5]
    assert dist.all_agree(True) and not dist.all_agree(False)
    assert dist.any_rank(True) and not dist.any_rank(False)
    assert dist.all_reduce_sum(torch.tensor([2.0])).item() == 2.0
    assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    dist.destroy()


def test_pytorchjob_without_torchrun_is_refused() -> None:
    # What the operator injects into a Master/Worker container: node RANK, no LOCAL_RANK.
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}
    with pytest.raises(DistEnvError, match="without torchrun") as err:
        dist.read_env(env)
    assert isinstance(err.value, ConfigError)  # so the CLI maps it to exit status 2


def test_elastic_pytorchjob_without_torchrun_is_refused() -> None:
    # Elastic Worker-only jobs get no RANK, only torchrun's PET_* defaults.
    env = {"PET_NNODES": "1:4", "PET_NPROC_PER_NODE": "8", "PET_RDZV_ENDPOINT": "job-worker-0:23456"}
    with pytest.raises(DistEnvError, match="PET_NNODES=1:4 is set but LOCAL_RANK is not"):
        dist.read_env(env)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE is not set"),
    ({"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "inconsistent"),
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
])
def test_bad_env(env: dict[str, str], message: str) -> None:
    with pytest.raises(DistEnvError, match=message):
        dist.read_env(env)


def test_read_env_torchrun_and_none() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert dist.read_env(env) == (3, 1, 4)
    assert dist.read_env({}) is None


def test_cuda_request_without_gpu(no_torchrun_env: None) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(DistEnvError, match="no CUDA device"):
        dist.init_distributed("cuda")


def test_graceful_shutdown_on_sigterm() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with GracefulShutdown() as shutdown:
        assert not shutdown.requested and not shutdown.agree()
        os.kill(os.getpid(), signal.SIGTERM)
        assert shutdown.requested and shutdown.signal_name == "SIGTERM"
        assert shutdown.agree()  # single process: its own flag
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigint_interrupts() -> None:
    with GracefulShutdown() as shutdown:
        os.kill(os.getpid(), signal.SIGINT)
        assert shutdown.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_logging_json_when_not_a_tty(restore_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dist.LOG_FORMAT_ENV, raising=False)
    stream = io.StringIO()
    dist.setup_logging(0, stream=stream)
    logging.getLogger("trainer.x").info("hello %d", 1)
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert (line["msg"], line["level"], line["rank"], line["logger"]) == ("hello 1", "INFO", 0, "trainer.x")


def test_logging_text_and_rank_levels(restore_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dist.LOG_FORMAT_ENV, "text")
    stream = io.StringIO()
    dist.setup_logging(1, stream=stream)
    logging.getLogger("trainer.x").info("hidden on rank 1")
    logging.getLogger("trainer.x").warning("shown")
    out = stream.getvalue()
    assert "hidden" not in out and "W rank1 trainer.x: shown" in out


# ---------------------------------------------------------------- 2-process gloo group


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = dist.init_distributed("cpu", timeout_s=60)
    with GracefulShutdown() as shutdown:
        if rank == 1:  # only one rank gets the signal; both must agree to stop
            os.kill(os.getpid(), signal.SIGTERM)
        stop = shutdown.agree()
    result: dict[str, Any] = {
        "info": [info.rank, info.world_size, info.backend, info.is_main],
        "broadcast": dist.broadcast_object({"step": 42} if rank == 0 else None),
        "agree_all": dist.all_agree(True),
        "agree_one": dist.all_agree(rank == 0),
        "agree_each": dist.all_agree_each(torch.tensor([True, rank == 0, rank == 1])),
        "any_one": dist.any_rank(rank == 1),
        "sum": dist.all_reduce_sum(torch.tensor([rank + 1.0])).item(),
        "gather": dist.all_gather_object(rank * 10),
        "stop": stop,
    }
    dist.barrier()
    dist.destroy()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path_factory.mktemp("ranks")
    # fork: children start in milliseconds (spawn would re-import torch in each). Python
    # 3.12 warns about forking a threaded process; torch's own gloo tests fork as well.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        mp.start_processes(_worker, args=(2, port, str(out)), nprocs=2, join=True, start_method="fork")
    return [json.loads((out / f"{r}.json").read_text()) for r in range(2)]


def test_two_rank_group(two_ranks: list[dict[str, Any]]) -> None:
    assert [r["info"] for r in two_ranks] == [[0, 2, "gloo", True], [1, 2, "gloo", False]]
    assert [r["sum"] for r in two_ranks] == [3.0, 3.0]
    assert [r["gather"] for r in two_ranks] == [[0, 10], [0, 10]]


def test_two_rank_broadcast_and_agree(two_ranks: list[dict[str, Any]]) -> None:
    for r in two_ranks:
        assert r["broadcast"] == {"step": 42}
        assert (r["agree_all"], r["agree_one"], r["any_one"]) == (True, False, True)
        assert r["agree_each"] == [True, False, False]


def test_two_rank_shutdown_agreement(two_ranks: list[dict[str, Any]]) -> None:
    assert [r["stop"] for r in two_ranks] == [True, True]


def test_torchrun_wrapper_keeps_worker_exit_code(tmp_path: Path) -> None:
    # The plain torchrun command would exit 1 here, which ExitCode policy never retries.
    script = tmp_path / "w.py"
    script.write_text("import sys\nsys.exit(143)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.dist", "--standalone", "--nproc_per_node=2",
         "--monitor_interval=0.1", str(script)],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )
    assert proc.returncode == ExitCode.PREEMPTED, proc.stderr[-2000:]


@pytest.mark.parametrize("worker_code, pod_code", [(143, 143), (0, 0), (3, 3)])
def test_torchrun_wrapper_sigterm_is_retryable(tmp_path: Path, worker_code: int, pod_code: int) -> None:
    # A pod being preempted: kubelet SIGTERMs the container's main process (the agent),
    # which forwards it to the workers; they checkpoint and exit 143, and the pod must exit
    # 143. Workers that finished anyway (the signal came in the last step) exit 0, and so
    # must the pod; a permanent worker code stays permanent.
    script = tmp_path / "w.py"
    script.write_text(
        "import os, signal, sys, time, pathlib\n"
        "stop = []\n"
        "signal.signal(signal.SIGTERM, lambda *a: stop.append(1))\n"
        f"pathlib.Path({str(tmp_path)!r}, 'ready' + os.environ['RANK']).touch()\n"
        "while not stop: time.sleep(0.02)\n"
        f"sys.exit({worker_code})\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.dist", "--standalone", "--nproc_per_node=2",
         "--monitor_interval=0.1", str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
    )
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == pod_code, out[-2000:]


@pytest.mark.parametrize("code, attempts", [(2, 1), (3, 1), (1, 3), (143, 3)])
def test_torchrun_wrapper_restarts_only_retryable_failures(tmp_path: Path, code: int, attempts: int) -> None:
    # Exit 2 (config) and 3 (non-finite) fail the same way again: never restarted, even
    # with restarts left; other failures are restarted until --max-restarts is used up.
    script = tmp_path / "w.py"
    script.write_text(
        "import os, pathlib, sys\n"
        f"pathlib.Path({str(tmp_path)!r}, 'attempt' + os.environ['TORCHELASTIC_RESTART_COUNT']).touch()\n"
        f"sys.exit({code})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.dist", "--standalone", "--nproc_per_node=1", "--max-restarts=2",
         "--monitor_interval=0.1", str(script)],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )
    assert proc.returncode == code, proc.stderr[-2000:]
    assert len(list(tmp_path.glob("attempt*"))) == attempts, proc.stderr[-2000:]


def test_peer_failures_are_told_apart_from_own_errors() -> None:
    import torch.distributed as tdist

    from trainer.dist import is_peer_failure

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:25493: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging")
    assert is_peer_failure(gloo)
    assert is_peer_failure(RuntimeError("[gloo] Timed out waiting 1800000ms for recv operation to complete"))
    assert is_peer_failure(tdist.DistBackendError("NCCL error: remote process exited"))
    assert is_peer_failure(tdist.DistNetworkError("connection refused"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_peer_failure(ValueError("Connection reset by peer"))  # only collectives' RuntimeErrors


def test_start_up_probe_retries_transient_storage_errors_then_exits_retryably(monkeypatch) -> None:
    """A 503 or a timeout is retried, then 201 (retried by ExitCode); a bad setting is 2 at once."""
    from trainer import preflight
    from trainer.dist import ExitCode

    class HttpError(Exception):
        def __init__(self, code: int) -> None:
            super().__init__(f"HTTP {code}")
            self.code = code

    calls: list[str] = []
    outcomes = iter([HttpError(503), TimeoutError("read timed out"), None])

    def flaky_once(url: str):
        calls.append(url)
        err = next(outcomes)
        return None if err is None else (str(err), preflight.is_transient(err))

    monkeypatch.setattr(preflight, "_probe_once", flaky_once)
    monkeypatch.setattr(preflight.time, "sleep", lambda s: None)
    assert preflight.probe_writable("gs://b/run") is None and len(calls) == 3  # recovered on the third try

    monkeypatch.setattr(preflight, "_probe_once", lambda url: ("HTTP 503", True))
    with pytest.raises(preflight.StorageUnavailableError, match="transient"):
        preflight.check_run_locations({"train.run_dir": "gs://b/run"}, is_main=True)
    assert 128 <= ExitCode.UNAVAILABLE <= 255

    monkeypatch.setattr(preflight, "_probe_once", lambda url: ("Forbidden", preflight.is_transient(PermissionError())))
    with pytest.raises(ConfigError, match="train.run_dir: cannot write"):
        preflight.check_run_locations({"train.run_dir": "gs://b/run"}, is_main=True)
    assert not preflight.is_transient(ValueError("unknown protocol"))
    assert preflight.is_transient(HttpError(429)) and not preflight.is_transient(HttpError(403))


EXIT_SCRIPT = """
import atexit, sys
from trainer import dist
mode, marker = sys.argv[1], sys.argv[2]
if mode.startswith("group"):  # a real 1-rank gloo group, created and destroyed like a trainer's
    dist.init_distributed("cpu")
    assert dist._created_process_group and dist._active()
    dist.destroy()
atexit.register(lambda: open(marker, "w").write("atexit ran"))
sys.stdout.write("buffered, no newline")
def main():
    if mode.endswith("raise"):
        raise ValueError("boom")
    if mode.endswith("usage"):
        raise SystemExit(2)
    return 3
dist.run_main(main)
"""


@pytest.mark.parametrize("mode,code", [("plain", 3), ("group", 3), ("group-raise", 1), ("group-usage", 2),
                                       ("plain-raise", 1)])
def test_run_main_exit_code_survives_teardown(tmp_path: Path, mode: str, code: int) -> None:
    """Entry points leave through ``run_main``: with a (real, destroyed) gloo group the exit
    is ``os._exit`` after the atexit handlers and a flush, so C++ teardown cannot turn 3
    into 134; the code, buffered output, atexit work and tracebacks are all kept."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("PET_")}
    if mode.startswith("group"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    marker = tmp_path / "atexit.txt"
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, mode, str(marker)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.startswith("buffered, no newline")
    assert marker.read_text() == "atexit ran"
    assert ("ValueError: boom" in proc.stderr) == mode.endswith("raise")
