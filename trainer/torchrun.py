"""The pod command: torchrun run in this process, keeping the workers' exit codes.

``python -m trainer.dist [torchrun args] -m trainer.train ...`` (``trainer.dist`` runs
:func:`run_torchrun` from here). torchrun itself exits 1 whenever a worker fails,
whatever the worker's code, and also when it is sent SIGTERM, which would turn every
preemption into a permanent failure under PyTorchJob ``restartPolicy: ExitCode``. Here the
pod exits with the first failed worker's code, with 0 when a signal met workers that had
all finished, and workers that exit with a permanent code (2, 3) are not restarted
whatever ``--max-restarts`` says. Exit codes: ``trainer.dist.ExitCode``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterator, Mapping, Sequence

from trainer.dist import DIST_ERRORS, DistEnvError, ExitCode

log = logging.getLogger(__name__)


def exit_code_of(code: int) -> int:
    """A worker's ``Popen``-style code as a shell exit status (killed by signal N: 128+N)."""
    return 128 - code if code < 0 else min(code, 255)


#: Worker exit codes that no restart can fix: a bad config or launch environment, and a
#: diverged run (its checkpoint would diverge again). torchrun restarts on any failure.
PERMANENT_EXIT_CODES = frozenset({ExitCode.CONFIG, ExitCode.NONFINITE})


@contextlib.contextmanager
def _patched_agent(worker_codes: list[int]) -> Iterator[None]:
    """Two changes to torchrun's agent, in this process while torchrun runs.

    1. Give up at once when a worker exits with a permanent code. The elastic agent
       restarts the worker group on any failure while ``--max-restarts`` remain;
       training again after exit 2 or 3 only repeats the failure (and, for 3, rewrites
       checkpoints). ``SimpleElasticAgent`` has no hook for this, so ``_monitor_workers``
       is wrapped: a FAILED result with a permanent exit code sets the remaining
       restarts to 0, and the agent stops the group and returns the failure as usual.
    2. Remember the workers' exit codes when the agent shuts them down (``_shutdown``,
       after forwarding a signal and waiting), into ``worker_codes``: torchrun then
       raises ``SignalException`` without them, and a SIGTERM that arrives during the
       last step must not turn a finished run (every worker exited 0) into 143.
    3. Give the workers :func:`shutdown_grace_s` to exit after the forwarded signal
       before they are SIGKILLed (torchrun waits 30 s: too short for the checkpoint a
       worker writes on SIGTERM, e.g. ViT-H's weights and AdamW state). The wait is
       ``PContext.close``'s timeout, wrapped on the instance for the call.
    """
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor_orig = getattr(LocalElasticAgent, "_monitor_workers", None)
    shutdown_orig = getattr(LocalElasticAgent, "_shutdown", None)
    if monitor_orig is None or shutdown_orig is None:  # a torch without them: torchrun's own behaviour
        log.warning("torchrun agent has no _monitor_workers/_shutdown: exit codes %s will be restarted",
                    sorted(int(c) for c in PERMANENT_EXIT_CODES))
        yield
        return

    def monitor(self: Any, worker_group: Any) -> Any:
        result = monitor_orig(self, worker_group)
        if result.state == WorkerState.FAILED:
            codes = {f.exitcode for f in result.failures.values()}
            if codes & PERMANENT_EXIT_CODES and getattr(self, "_remaining_restarts", 0) > 0:
                log.error("a worker exited with %s (permanent): not restarting",
                          sorted(int(c) for c in codes & PERMANENT_EXIT_CODES))
                self._remaining_restarts = 0
        return result

    def shutdown(self: Any, *args: Any, **kwargs: Any) -> None:
        pcontext = getattr(self, "_pcontext", None)
        if pcontext is not None and "close" not in vars(pcontext):
            close_orig, grace = pcontext.close, shutdown_grace_s()

            def close(death_sig: Any = None, timeout: float = 30) -> Any:
                return close_orig(death_sig, grace)

            pcontext.close = close
        shutdown_orig(self, *args, **kwargs)
        handlers = getattr(pcontext, "subprocess_handlers", None) or {}
        codes = [h.proc.returncode for h in handlers.values()]
        if codes and None not in codes:
            worker_codes[:] = codes

    LocalElasticAgent._monitor_workers, LocalElasticAgent._shutdown = monitor, shutdown
    try:
        yield
    finally:
        LocalElasticAgent._monitor_workers, LocalElasticAgent._shutdown = monitor_orig, shutdown_orig


#: Seconds the workers get to exit after the launcher forwards SIGTERM (their checkpoint);
#: the chart sets it a little below the pod's terminationGracePeriodSeconds.
SHUTDOWN_GRACE_ENV = "SAM_SHUTDOWN_TIMEOUT_S"


def shutdown_grace_s(env: Mapping[str, str] | None = None) -> float:
    """``SAM_SHUTDOWN_TIMEOUT_S`` (default 30, torchrun's own); a bad value is a config error."""
    text = (os.environ if env is None else env).get(SHUTDOWN_GRACE_ENV, "").strip()
    if not text:
        return 30.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise DistEnvError(f"{SHUTDOWN_GRACE_ENV}: expected seconds >= 0, got {text!r}")
    return value


def exit_code_after_signal(sigval: int, worker_codes: Sequence[int]) -> int:
    """The pod's exit status when torchrun itself got signal ``sigval``.

    0 when every worker had finished successfully (the signal came during the last
    step), a permanent worker code when one exited with it, else 128+``sigval`` (the
    workers checkpointed on the forwarded signal: restart me).
    """
    codes = [exit_code_of(c) for c in worker_codes]
    if codes and all(c == ExitCode.OK for c in codes):
        return ExitCode.OK
    permanent = [c for c in codes if c in PERMANENT_EXIT_CODES]
    return permanent[0] if permanent else 128 + int(sigval)


def setup_launcher_logging() -> None:
    """Log lines of the launcher (this process) in the trainer's format: JSON in pods.

    torch's elastic agent logs through loggers under ``torch`` that carry their own
    glog-style stderr handlers and do not propagate, so a pod's log mixed JSON lines of the
    workers with text lines of the agent (``E1201 ... failed (exitcode: 143)``). Those
    handlers are removed here and the records propagate to the root handler, which
    ``trainer.dist.setup_logging`` sets up; the lines carry ``rank`` None (the launcher is
    no rank) and ``node`` (``PET_NODE_RANK``). Call after importing ``torch.distributed.run``.
    """
    from trainer.dist import setup_logging

    setup_logging(rank=None, level="INFO", node=os.environ.get("PET_NODE_RANK"))
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name == "torch" or name.startswith("torch."):
            if isinstance(logger, logging.Logger):
                for handler in list(logger.handlers):
                    if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                        logger.removeHandler(handler)
                logger.propagate = True


def run_torchrun(argv: Sequence[str]) -> int:
    """Run torchrun in this process and return the exit status the pod should have.

    Unlike the ``torchrun`` command, which exits 1 for any worker failure, this returns
    the first failed worker's exit code (so ``ExitCode.PREEMPTED`` reaches the
    PyTorchJob ``ExitCode`` restart policy), and 128+N when torchrun itself gets signal N
    (it forwards the signal to the workers and waits for them first), or 0 when every
    worker finished successfully anyway (:func:`exit_code_after_signal`). Workers that exit
    with a code of :data:`PERMANENT_EXIT_CODES` are not restarted, whatever
    ``--max-restarts`` says.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    setup_launcher_logging()
    try:
        shutdown_grace_s()
    except DistEnvError as err:
        log.error("%s", err)
        return ExitCode.CONFIG
    worker_codes: list[int] = []
    try:
        with _patched_agent(worker_codes):
            torchrun.run(torchrun.parse_args(list(argv)))
    except (RendezvousError, *DIST_ERRORS) as err:
        # The other pods did not join in time (Pending, still starting) or their agent
        # vanished (the store host, an elastic peer): this pod is fine, the job is not
        # whole. 1 would make restartPolicy ExitCode fail the job for good.
        log.error("rendezvous with the other pods failed (%s: %s); exiting %d so the pod is restarted",
                  type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "", ExitCode.PEER_LOST)
        return ExitCode.PEER_LOST
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = exit_code_of(failure.exitcode)
        log.error("worker rank %s failed first with exit code %s", rank, code)
        return code
    except SignalException as err:
        code = exit_code_after_signal(int(err.sigval), worker_codes)
        log.warning("torchrun received signal %s; workers exited %s: exit %d", int(err.sigval), worker_codes, code)
        return code
    return ExitCode.OK
