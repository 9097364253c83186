"""Job states, exit codes and the polling watcher of ``sam-train launch``.

A PyTorchJob (training-operator v1.9) reports its life as ``status.conditions`` of types
Created, Running, Restarting, Succeeded, Failed and Suspended. The operator keeps old
conditions (``Created`` stays True for ever; ``Running`` turns False on success), so the
state is the **latest condition with status "True"**, ordered by ``lastTransitionTime``
(list order breaks ties). A TrainJob (Trainer v2) has only Suspended, Complete and Failed;
Created and Running are derived from its JobSet's ``jobsStatus`` and pods, as the kubeflow
SDK does.

:class:`Watcher` polls the job with GET every ``interval`` seconds (simpler and sturdier
than the watch API across API-server restarts and proxies), prints one line whenever the
state or the replica counts change, prints new Warning events once, and on Failed prints
the tail of the master's log and the job's events. Exit codes: :class:`ExitCode`.
"""

from __future__ import annotations

import enum
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TextIO

if TYPE_CHECKING:  # the client imports this module; only the type is needed here
    from trainer.launch.client import JobRef, LaunchClient


class ExitCode(enum.IntEnum):
    """Exit codes of ``sam-train launch`` (the table in ``sam-train launch --help``)."""

    OK = 0  #: done; a watched job Succeeded
    JOB_FAILED = 1  #: the watched job Failed (its master's log tail and events are printed)
    USAGE = 2  #: bad flags, values (-f/--set) or kubeconfig/context: nothing was sent
    API_REFUSED = 3  #: the API server refused: CRD missing, forbidden, quota, invalid, exists, not found
    UNREACHABLE = 4  #: no answer from the API server (connection refused, DNS, TLS, timeout)
    SUSPENDED = 5  #: --timeout passed while the job was Suspended (e.g. waiting for a Kueue quota)
    TIMEOUT = 124  #: --timeout passed while the job was still running (as timeout(1))
    INTERRUPTED = 130  #: Ctrl-C while watching (128 + SIGINT); the job was deleted or left running


class State(enum.Enum):
    """What a job is doing, common to PyTorchJob and TrainJob."""

    PENDING = "Pending"  #: no condition yet (the operator has not seen the job)
    CREATED = "Created"  #: accepted by the operator; pods not all running yet
    RUNNING = "Running"
    RESTARTING = "Restarting"  #: a replica failed with a retryable exit code; its pod is recreated
    SUSPENDED = "Suspended"  #: no pods (runPolicy.suspend, or held by Kueue until admitted)
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (State.SUCCEEDED, State.FAILED)


#: PyTorchJob condition type -> state.
PYTORCHJOB_CONDITIONS: dict[str, State] = {
    "Created": State.CREATED, "Running": State.RUNNING, "Restarting": State.RESTARTING,
    "Succeeded": State.SUCCEEDED, "Failed": State.FAILED, "Suspended": State.SUSPENDED,
}
#: TrainJob condition type -> state (Created/Running come from the JobSet, not conditions).
TRAINJOB_CONDITIONS: dict[str, State] = {
    "Complete": State.SUCCEEDED, "Failed": State.FAILED, "Suspended": State.SUSPENDED,
}
_EPOCH = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class JobStatus:
    """A job's state with the condition that decided it and its replica counts.

    Attributes:
        state: the derived state.
        reason, message: of the deciding condition ("" when derived without one).
        replicas: ``{replica type or replicated job: {"active": n, "succeeded": n, "failed": n}}``,
            zero counts left out.
    """

    state: State
    reason: str = ""
    message: str = ""
    replicas: dict[str, dict[str, int]] = field(default_factory=dict)


def parse_time(value: Any) -> datetime:
    """An RFC 3339 timestamp (``2026-12-01T10:00:00Z``) as an aware datetime; missing -> the epoch."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if not value:
        return _EPOCH
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return _EPOCH
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)  # naive and aware must compare


def latest_true_condition(conditions: Iterable[Mapping[str, Any]] | None,
                          types: Iterable[str]) -> Mapping[str, Any] | None:
    """The condition of one of ``types`` with status "True" and the latest lastTransitionTime.

    Ties (equal or missing times) go to the later entry in the list: the operator appends.
    """
    wanted = set(types)
    candidates = [(parse_time(c.get("lastTransitionTime")), i, c) for i, c in enumerate(conditions or ())
                  if c.get("type") in wanted and str(c.get("status")) == "True"]
    if not candidates:
        return None
    return max(candidates, key=lambda item: (item[0], item[1]))[2]


def _counts(entry: Mapping[str, Any]) -> dict[str, int]:
    return {key: int(entry[key]) for key in ("active", "succeeded", "failed") if entry.get(key)}


def pytorchjob_status(job: Mapping[str, Any]) -> JobStatus:
    """The state of a PyTorchJob object (a dict as the API returns it)."""
    status = job.get("status") or {}
    replicas = {rtype: counts for rtype, entry in sorted((status.get("replicaStatuses") or {}).items())
                if (counts := _counts(entry or {}))}
    cond = latest_true_condition(status.get("conditions"), PYTORCHJOB_CONDITIONS)
    if cond is None:
        return JobStatus(State.PENDING, replicas=replicas)
    return JobStatus(PYTORCHJOB_CONDITIONS[cond["type"]], cond.get("reason") or "", cond.get("message") or "",
                     replicas)


def trainjob_status(job: Mapping[str, Any], pod_phases: Iterable[str] = ()) -> JobStatus:
    """The state of a TrainJob: its conditions, else Running/Created from the JobSet and pods.

    Args:
        job: the TrainJob object.
        pod_phases: ``status.phase`` of the job's pods (label ``jobset.sigs.k8s.io/jobset-name``).
    """
    status = job.get("status") or {}
    replicas = {entry["name"]: counts for entry in status.get("jobsStatus") or ()
                if entry.get("name") and (counts := _counts(entry))}
    cond = latest_true_condition(status.get("conditions"), TRAINJOB_CONDITIONS)
    if cond is not None:
        return JobStatus(TRAINJOB_CONDITIONS[cond["type"]], cond.get("reason") or "", cond.get("message") or "",
                         replicas)
    ready = sum(int(entry.get("ready") or 0) for entry in status.get("jobsStatus") or ())
    if ready or "Running" in set(pod_phases):
        return JobStatus(State.RUNNING, replicas=replicas)
    return JobStatus(State.CREATED, replicas=replicas)


def format_status(kind: str, namespace: str, name: str, status: JobStatus, elapsed_s: float | None = None) -> str:
    """One status line: ``[  12s] PyTorchJob ml/rel: Running (Reason: message) Master: active 1``."""
    head = f"[{elapsed_s:5.0f}s] " if elapsed_s is not None else ""
    line = f"{head}{kind} {namespace}/{name}: {status.state.value}"
    if status.reason or status.message:
        line += f" ({status.reason}: {status.message})" if status.reason else f" ({status.message})"
    if status.replicas:
        parts = [f"{rtype}: " + ", ".join(f"{key} {n}" for key, n in counts.items())
                 for rtype, counts in status.replicas.items()]
        line += "  [" + " | ".join(parts) + "]"
    return line


def sleep(seconds: float) -> None:
    """The poll sleep (module-level so that tests can replace it, e.g. to raise KeyboardInterrupt)."""
    time.sleep(seconds)


@dataclass(frozen=True)
class WatchResult:
    """How a watch ended: the last status, and the exit code of ``sam-train launch wait``."""

    status: JobStatus
    exit_code: ExitCode
    timed_out: bool = False


class Watcher:
    """Polls one job until it Succeeds or Fails, or until ``timeout`` seconds pass.

    Args:
        client: the API client (:class:`trainer.launch.client.LaunchClient`).
        ref: the job.
        interval: seconds between polls.
        timeout: seconds before giving up (None: wait for ever).
        out: where the status lines go.
        log_lines: lines of the master's log printed when the job fails.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, client: LaunchClient, ref: JobRef, *, interval: float = 10.0, timeout: float | None = None,
                 out: TextIO | None = None, log_lines: int = 50, clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.ref = client, ref
        self.interval, self.timeout, self.log_lines = interval, timeout, log_lines
        self.out = out or sys.stdout
        self.clock = clock
        self._seen_events: set[tuple[str, int]] = set()
        self._events_readable = True

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self) -> WatchResult:
        """Poll until the end; KeyboardInterrupt (Ctrl-C) propagates to the caller, which decides."""
        start = self.clock()
        last: tuple[State, str] | None = None
        while True:
            status = self.client.status(self.ref)
            elapsed = self.clock() - start
            line = format_status(self.ref.kind.kind, self.ref.namespace, self.ref.name, status)
            if (status.state, line) != last:  # a new state, or new replica counts or message
                self._print(format_status(self.ref.kind.kind, self.ref.namespace, self.ref.name, status, elapsed))
                last = (status.state, line)
            self._print_new_warnings()
            if status.state.terminal:
                if status.state is State.FAILED:
                    self.print_failure_report()
                return WatchResult(status, ExitCode.OK if status.state is State.SUCCEEDED else ExitCode.JOB_FAILED)
            if self.timeout is not None and elapsed >= self.timeout:
                return self._timed_out(status)
            sleep(self.interval)

    def _timed_out(self, status: JobStatus) -> WatchResult:
        code = ExitCode.SUSPENDED if status.state is State.SUSPENDED else ExitCode.TIMEOUT
        self._print(f"timed out after {self.timeout:g}s: {self.ref.describe()} is {status.state.value} and "
                    f"left as it is; delete it with: {self.ref.delete_command()}")
        return WatchResult(status, code, timed_out=True)

    def _events(self) -> list[dict[str, Any]]:
        """The job's events; an account that may not list events gets a note once, not a crash."""
        from trainer.launch.client import LaunchError

        if not self._events_readable:
            return []
        try:
            return self.client.events(self.ref)
        except LaunchError as err:
            self._events_readable = False
            self._print(f"  (events not shown: {err})")
            return []

    def _print_new_warnings(self) -> None:
        """Warning events of the job (FailedCreatePod: exceeded quota, restarts), each once."""
        for event in self._events():
            key = (event.get("name", ""), int(event.get("count") or 1))
            if event.get("type") != "Warning" or key in self._seen_events:
                continue
            self._seen_events.add(key)
            self._print(f"  warning: {event.get('reason')}: {event.get('message')}")

    def print_failure_report(self) -> None:
        """The tail of the master's log (node 0 of a TrainJob) and the job's events."""
        from trainer.launch.client import LaunchError

        try:
            pod, container, text = self.client.logs(self.ref, tail_lines=self.log_lines)
        except LaunchError as err:  # a missing pod (cleanPodPolicy: All) must not hide the failure
            self._print(f"--- no log of the master: {err}")
        else:
            self._print(f"--- last {self.log_lines} lines of pod {pod} (container {container}) ---")
            self._print(text.rstrip("\n"))
        events = self._events()
        self._print(f"--- events of {self.ref.describe()} ---")
        for event in events:
            self._print(f"{event.get('time') or '':20s} {event.get('type', ''):8s} {event.get('reason', '')}: "
                        f"{event.get('message', '')}")
        if not events:
            self._print("(none)")
