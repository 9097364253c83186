"""Process group, rank helpers, logging setup, exit codes and graceful shutdown.

Environment. Under ``torchrun`` every worker gets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads only
those. In a Kubeflow PyTorchJob the operator injects ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``/``PET_MASTER_PORT`` (and
``PET_RDZV_*`` for elastic jobs); torchrun reads them as its flag defaults, so the pod
command needs no rendezvous flags: ``python -m trainer.dist -m trainer.train ...`` (our
torchrun, see below; a bare ``torchrun`` works too but loses exit codes). The operator also sets ``RANK`` (the
*node* index) and ``WORLD_SIZE`` but not ``LOCAL_RANK``: seeing ``RANK`` or ``PET_*``
without ``LOCAL_RANK`` means the trainer was started without torchrun, which would give
every GPU of a node the same rank (or, in an elastic job, train each pod alone), so it is
refused with a clear error. ``PET_*`` are read only for that check. With none of these
variables set the trainer runs as one process with no process group; all helpers here
still work (collectives become identities).

Exit codes (:class:`ExitCode`). With PyTorchJob ``restartPolicy: ExitCode``, codes 1-127
are permanent failures and 128-255 are retried:

=====  =========  ==============================================================
code   name       meaning
=====  =========  ==============================================================
0      OK         training finished
1      ERROR      uncaught exception (Python's default); permanent
2      CONFIG     bad config or usage (argparse uses 2 too); permanent
3      NONFINITE  loss non-finite for ``train.max_nonfinite_steps`` steps; permanent
143    PREEMPTED  SIGTERM/SIGINT received, checkpoint written: restart me (128+15)
200    PEER_LOST  a collective failed because another rank died or stopped answering
                  (its pod was killed, evicted, OOM): restart me; retried, resuming
                  from the last checkpoint (:func:`is_peer_failure`). 200 is no
                  signal's 128+N, so it cannot be mistaken for one
201    UNAVAILABLE  the run's storage kept failing with transient errors (5xx, 429,
                  timeouts) in the start-up probe: restart me (``trainer.preflight``)
128+N  (none)     a worker killed by signal N (137: OOM kill), as reported by
                  :func:`run_torchrun`; retried, resuming from the last checkpoint
=====  =========  ==============================================================

torchrun itself exits 1 whenever a worker fails, whatever the worker's code, and also
when it is sent SIGTERM, which would turn every preemption into a permanent failure.
Run ``python -m trainer.dist [torchrun args] -m trainer.train ...`` instead: it runs
torchrun in-process and exits with the first failed worker's code (see
:func:`run_torchrun`).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, NoReturn, Sequence, TextIO

import torch
import torch.distributed as tdist

from trainer.config import ConfigError

log = logging.getLogger(__name__)
LOG_FORMAT_ENV = "SAM_LOG_FORMAT"
_PET_VARS = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK")


class ExitCode(enum.IntEnum):
    """Process exit codes; see the module docstring for retry semantics."""

    OK = 0
    ERROR = 1
    CONFIG = 2
    NONFINITE = 3
    PREEMPTED = 128 + signal.SIGTERM  # 143: retried by restartPolicy ExitCode
    PEER_LOST = 200  # another rank vanished mid-collective: retried by restartPolicy ExitCode
    UNAVAILABLE = 201  # storage kept failing transiently at start-up: retried (trainer.preflight)


#: Text of the ``RuntimeError``s gloo raises when the other end of a collective is gone or
#: silent (torch raises ``DistError`` subclasses for NCCL and the store, but gloo's
#: transport errors are plain ``RuntimeError``s).
_PEER_FAILURE_TEXT = ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                      "Broken pipe", "Timed out waiting", "Socket Timeout", "NCCL communicator was aborted")


#: ``torch.distributed.DistError`` where this torch has it (DistBackendError for NCCL,
#: DistNetworkError, DistStoreError): the errors of the process group and its store.
DIST_ERRORS: tuple[type[BaseException], ...] = (
    (tdist.DistError,) if isinstance(getattr(tdist, "DistError", None), type) else ())


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` means another rank died or hung, not that this rank is broken.

    A pod killed in a multi-node job (node drain without grace, OOM kill, spot
    reclaim) leaves every other rank failing in its next collective. Exiting 1 there
    would make PyTorchJob ``restartPolicy: ExitCode`` fail the whole job permanently;
    these ranks exit :attr:`ExitCode.PEER_LOST` instead, a retried code, and the job
    resumes from the last checkpoint when the pods are back.
    """
    if isinstance(err, DIST_ERRORS):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _PEER_FAILURE_TEXT)


class DistEnvError(ConfigError):
    """The launch environment is wrong (a usage error: exit code 2)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0..world_size-1.
        local_rank: rank on this node; selects the GPU.
        world_size: number of processes in the job.
        device: this rank's device (``cuda:<local_rank>`` or ``cpu``).
        backend: ``nccl``/``gloo``, or None when no process group was created.
        is_main: rank 0, the one that writes checkpoints and logs at INFO.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None
    is_main: bool


def _env_int(env: dict[str, str] | os._Environ, name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise DistEnvError(f"{name} is not set but RANK is; start the trainer with torchrun") from None
    except ValueError:
        raise DistEnvError(f"{name}={env[name]!r} is not an integer") from None


def read_env(env: dict[str, str] | os._Environ | None = None) -> tuple[int, int, int] | None:
    """``(rank, local_rank, world_size)`` from torchrun's variables; None when not set.

    Raises:
        DistEnvError: a PyTorchJob replica started without torchrun, or inconsistent values.
    """
    env = os.environ if env is None else env
    # The operator's own variables: RANK (Master jobs) or PET_* (always; the only ones in
    # elastic Worker-only jobs, which would otherwise silently train as one process).
    operator = [name for name in ("RANK", *_PET_VARS) if name in env]
    if "LOCAL_RANK" not in env:
        if not operator:
            return None
        raise DistEnvError(
            f"{operator[0]}={env[operator[0]]} is set but LOCAL_RANK is not: this looks like a "
            "PyTorchJob replica started without torchrun (the operator sets RANK to the node "
            "index and PET_* for torchrun). "
            "Use `torchrun -m trainer.train ...` (or `python -m trainer.dist -m trainer.train "
            "...`) as the container command; torchrun reads the operator's PET_* variables."
        )
    rank, local_rank = _env_int(env, "RANK"), _env_int(env, "LOCAL_RANK")
    world_size = _env_int(env, "WORLD_SIZE")
    if not 0 <= rank < world_size or not 0 <= local_rank <= rank:
        raise DistEnvError(f"inconsistent RANK={rank} LOCAL_RANK={local_rank} WORLD_SIZE={world_size}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if world_size > 1 and not env.get(name):
            raise DistEnvError(f"{name} is not set; start the trainer with torchrun")
    return rank, local_rank, world_size


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref not in ("auto", "cpu", "cuda"):
        raise DistEnvError(f"train.device: must be auto, cpu or cuda, got {pref!r}")
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistEnvError("train.device=cuda but no CUDA device is visible")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistEnvError(f"LOCAL_RANK={local_rank} but only {count} GPU(s) are visible; "
                           "lower --nproc_per_node (PyTorchJob nprocPerNode)")
    return torch.device("cuda", local_rank)


def _restart_safe_store(rank: int, world_size: int, timeout: dt.timedelta) -> tdist.Store | None:
    """The rendezvous store, namespaced by torchrun's restart count.

    After ``torchrun --max-restarts`` restarts the workers, the new process group can
    meet the previous attempt's keys in the agent's store (gloo then connects to the dead
    workers' ports: "Connection refused", seen here in about 1 of 3 restarts). A prefix per
    attempt keeps each attempt's keys apart. None (plain ``env://``) outside torchelastic.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = tdist.TCPStore(
        os.environ["MASTER_ADDR"], _env_int(os.environ, "MASTER_PORT"), world_size,
        is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=not agent_store,
    )
    return tdist.PrefixStore(f"sam-trainer/attempt-{attempt}", store)


def init_distributed(device_pref: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Create the process group from torchrun's environment (or run as one process).

    Args:
        device_pref: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        timeout_s: collective timeout; generous, because rank 0 may be writing a
            multi-GB checkpoint while the others wait at a barrier.

    Returns:
        This process's :class:`DistInfo`; NCCL on CUDA, gloo on CPU.
    """
    ranks = read_env()
    rank, local_rank, world_size = ranks or (0, 0, 1)
    device = _pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = None
    if ranks is not None:  # under torchrun, even with world 1, so DDP code paths stay uniform
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not tdist.is_initialized():
            global _created_process_group
            _created_process_group = True
            timeout = dt.timedelta(seconds=timeout_s)
            tdist.init_process_group(
                backend, rank=rank, world_size=world_size, timeout=timeout,
                store=_restart_safe_store(rank, world_size, timeout),
                device_id=device if device.type == "cuda" else None,
            )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                    backend=backend, is_main=rank == 0)


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


#: Whether this process created a process group (``exit_process`` then skips C++ teardown).
_created_process_group = False


def exit_process(code: int) -> NoReturn:
    """End a trainer process with ``code``, which teardown cannot replace.

    A gloo rank that returned its code can still die in interpreter teardown, after
    ``destroy_process_group``: a c10d/gloo thread object destroyed while still joinable
    aborts with "terminate called without an active exception" (SIGABRT, exit 134). That
    was seen once in CI after both ranks had returned 3. Under ``restartPolicy: ExitCode``
    134 counts as a signal and is retried, so a permanent stop (3, non-finite) would be
    restarted forever. So after a process group, this runs the ``atexit`` handlers
    (logging's flush, multiprocessing's reaping of DataLoader workers), flushes stdout and
    stderr, and leaves with ``os._exit``, skipping C++ static destruction. Without a
    process group it is plain ``sys.exit``.
    """
    if not _created_process_group:
        sys.exit(code)
    import atexit  # noqa: PLC0415

    atexit._run_exitfuncs()  # noqa: SLF001 (CPython's own exit path runs exactly these)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to lose
            pass
    os._exit(code)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """``sys.exit(main())`` for the trainer's entry points, through :func:`exit_process`.

    An uncaught exception prints its traceback and exits 1 (Python's own rule), a
    ``SystemExit`` keeps its code (argparse's 2), Ctrl-C exits 130, so every way out of a
    rank that had a process group gets the teardown-proof exit.
    """
    try:
        code = main()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 (printed like Python does, then exit 1)
        traceback.print_exc()
        code = 1
    exit_process(int(code or 0))


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return tdist.get_rank() if _active() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return tdist.get_world_size() if _active() else 1


def _flag_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for all ranks (no-op as one process)."""
    if _active():
        tdist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` as a list indexed by rank (e.g. per-rank RNG states)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it."""
    if _active():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def sum_over_ranks(values: Sequence[int]) -> list[int]:
    """Element-wise sum of every rank's ``values`` (same length on all ranks; a collective)."""
    if not _active():
        return [int(v) for v in values]
    tensor = torch.tensor([int(v) for v in values], dtype=torch.int64, device=_flag_device())
    tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return [int(v) for v in tensor.tolist()]


def _reduce_flag(flag: bool, op: str) -> bool:
    if not _active():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_flag_device())
    tdist.all_reduce(value, op=tdist.ReduceOp.MIN if op == "and" else tdist.ReduceOp.MAX)
    return bool(value.item())


def all_agree_each(flags: torch.Tensor) -> list[bool]:
    """Logical AND over ranks of each of several flags in ONE collective and one sync.

    Args:
        flags: K bool tensor, on any device (e.g. ``torch.isfinite`` results that never
            went through the host), the same K on every rank.
    """
    values = flags.to(device=_flag_device() if _active() else flags.device, dtype=torch.int32)
    if _active():
        tdist.all_reduce(values, op=tdist.ReduceOp.MIN)
    return [bool(v) for v in values.tolist()]


def all_agree(flag: bool) -> bool:
    """Logical AND of ``flag`` over ranks (e.g. "every rank loaded the checkpoint")."""
    return _reduce_flag(flag, "and")


def any_rank(flag: bool) -> bool:
    """Logical OR of ``flag`` over ranks (e.g. "some rank got SIGTERM")."""
    return _reduce_flag(flag, "or")


def destroy() -> None:
    """Tear down the process group, if any."""
    if _active():
        tdist.destroy_process_group()


# --------------------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line (what log collectors in pods parse)."""

    def __init__(self, rank: int | None, node: str | None = None) -> None:
        super().__init__()
        self.rank = rank
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "rank": self.rank,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.node is not None:
            out["node"] = self.node
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # metric records travel as fields, not only as text
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _use_json(fmt: str, stream: TextIO) -> bool:
    env = os.environ.get(LOG_FORMAT_ENV, "").strip().lower()
    if env in ("json", "text"):
        return env == "json"
    if fmt != "auto":
        return fmt == "json"
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty())


def setup_logging(rank: int | None, level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None,
                  node: str | None = None) -> None:
    """Configure the root logger once: ``level`` on rank 0, WARNING elsewhere.

    Args:
        rank: this process's global rank (stamped on every line); None for the launcher
            (``python -m trainer.dist``), which logs at ``level`` on every node.
        level: rank 0's level name.
        fmt: ``text`` (human lines), ``json`` (JSON lines) or ``auto``: JSON unless
            ``stream`` is a terminal. ``SAM_LOG_FORMAT=json|text`` overrides ``fmt``.
        stream: where lines go (default stderr).
        node: the node index stamped on every line (the launcher's ``PET_NODE_RANK``).
    """
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if _use_json(fmt, stream):
        handler.setFormatter(JsonFormatter(rank, node))
    else:
        who = f"rank{rank}" if rank is not None else f"launcher{'' if node is None else ' node' + node}"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname).1s {who} %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):  # idempotent: replace, never stack handlers
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if rank in (0, None) else logging.WARNING)


# --------------------------------------------------------------------------- shutdown


class GracefulShutdown:
    """Turn SIGTERM/SIGINT into a flag that the training loop polls.

    The handler only records the signal: saving a checkpoint from inside a signal
    handler could interrupt a collective half-way. The loop calls :meth:`agree` every
    step (or every few) so all ranks stop at the same step, saves, and exits
    :attr:`ExitCode.PREEMPTED`. A second SIGINT raises ``KeyboardInterrupt`` so Ctrl-C
    twice still stops an interactive run at once.

    Example::

        with GracefulShutdown() as shutdown:
            for step in ...:
                ...
                if shutdown.agree():
                    save(); sys.exit(ExitCode.PREEMPTED)
    """

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self._received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._received = signal.Signals(signum)

    def __enter__(self) -> GracefulShutdown:
        if threading.current_thread() is not threading.main_thread():
            log.warning("GracefulShutdown: not the main thread; signal handlers not installed")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """Whether this process received one of the signals."""
        return self._received is not None

    @property
    def signal_name(self) -> str | None:
        """Name of the received signal, e.g. ``SIGTERM``."""
        return self._received.name if self._received is not None else None

    def agree(self) -> bool:
        """True on every rank when any rank received a signal.

        One tiny all-reduce plus a host sync: cheap, but call it at most once per step.
        """
        stop = any_rank(self.requested)
        if stop and not self.requested:
            log.warning("another rank received a shutdown signal; stopping too")
        return stop


# --------------------------------------------------------------------------- torchrun
# The pod command's torchrun wrapper lives in ``trainer.torchrun``; these names stay here
# because ``python -m trainer.dist`` is the documented entry point.


def run_torchrun(argv: Sequence[str]) -> int:
    """See :func:`trainer.torchrun.run_torchrun`."""
    from trainer.torchrun import run_torchrun as run

    return run(argv)


def exit_code_of(code: int) -> int:
    """See :func:`trainer.torchrun.exit_code_of`."""
    from trainer.torchrun import exit_code_of as convert

    return convert(code)


if __name__ == "__main__":
    # python -m trainer.dist --nproc_per_node=2 -m trainer.train --config ...
    sys.exit(run_torchrun(sys.argv[1:]))
