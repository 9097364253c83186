"""Start-up checks of where a run writes: one readable line naming the setting, exit 2.

Without them a run dir under a regular file, an unknown protocol, missing credentials or
an unreachable bucket surface as a traceback from deep inside the first write (minutes
in, after the model was built and the data listed), and a pod restarts into the same
crash. Rank 0 probes each location once with a small write and delete; the verdict is
broadcast so every rank raises the same :class:`ConfigError` together (no rank waits in
a collective for a rank that died). Failures that look transient (5xx, 429, timeouts,
dropped connections) are retried for about two minutes and then end the process with
exit 201 (``ExitCode.UNAVAILABLE``, retried by ``restartPolicy: ExitCode``), not 2.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

from trainer import dist
from trainer.config import ConfigError
from trainer.storage import StorageError, join_url, protocol_of, url_to_fs

log = logging.getLogger(__name__)


#: HTTP statuses that say "try again later" (timeout, throttling, server trouble).
_TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
#: Seconds slept between probe attempts while the failure looks transient (about 2 minutes
#: in all): a Workload Identity metadata server that is not ready yet, a GCS 503, a timeout.
RETRY_DELAYS_S = (2.0, 4.0, 8.0, 16.0, 30.0, 60.0)


class StorageUnavailableError(RuntimeError):
    """The run's storage kept failing with transient errors at start-up (exit 201, retried).

    A 5xx, 429, timeout or dropped connection says nothing about the settings; failing the
    job for good (exit 2) on one would end a multi-day run at one of its many restarts.
    """


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` looks like a passing storage or network failure, not a bad setting."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    for attr in ("code", "status", "status_code"):
        value = getattr(err, attr, None)
        if isinstance(value, int) and value in _TRANSIENT_HTTP:
            return True
    name = type(err).__name__
    return any(word in name for word in ("Timeout", "ServerDisconnected", "ClientConnector", "EndpointConnection",
                                          "ConnectionClosed", "ServiceUnavailable", "Throttl"))


def _probe_once(url: str) -> tuple[str, bool] | None:
    """``(why url cannot hold run files, whether that looks transient)``, or None when it can."""
    try:
        fs, path = url_to_fs(url)
        if protocol_of(url) in ("file", "local"):
            fs.makedirs(path, exist_ok=True)  # object stores have no directories to make
        probe = join_url(url, f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        probe_fs, probe_path = url_to_fs(probe)
        with probe_fs.open(probe_path, "wb") as f:
            f.write(b"ok")
        probe_fs.rm(probe_path)
    # fsspec backends raise many types: unknown protocol (ValueError), missing backend
    # (ImportError), credentials (StorageError), a file in the way (OSError), HTTP errors.
    except Exception as err:  # noqa: BLE001 - any failure here is the user's location
        kind = "" if isinstance(err, (OSError, StorageError, ValueError)) else f"{type(err).__name__}: "
        return f"{kind}{' '.join(str(err).split()) or type(err).__name__}", is_transient(err)
    return None


def probe_writable(url: str, delays_s: tuple[float, ...] = RETRY_DELAYS_S) -> str | None:
    """Why ``url`` cannot hold run files (create it, write and delete one object), or None.

    Transient failures (:func:`is_transient`) are retried after each of ``delays_s``; if
    they persist, :class:`StorageUnavailableError` is raised instead of a verdict.
    """
    for attempt, delay in enumerate((*delays_s, None)):
        result = _probe_once(url)
        if result is None:
            return None
        problem, transient = result
        if not transient:
            return problem
        if delay is None:
            raise StorageUnavailableError(f"{url!r} kept failing with transient errors "
                                          f"({len(delays_s) + 1} attempts): {problem}")
        log.warning("probe of %s failed (attempt %d, transient: %s); retrying in %.0f s", url, attempt + 1,
                    problem, delay)
        time.sleep(delay)
    return None


def check_run_locations(locations: dict[str, str], is_main: bool) -> None:
    """Probe ``{setting: url}`` on rank 0 and raise :class:`ConfigError` on every rank if one fails.

    Args:
        locations: e.g. ``{"train.run_dir": "gs://b/runs/x", "checkpoint.url": ".../checkpoints"}``;
            a URL listed under two settings is probed once.
        is_main: whether this process probes (rank 0).
    """
    verdict: tuple[str, bool] | None = None  # (message, transient)
    if is_main:
        seen: set[str] = set()
        for setting, url in locations.items():
            if url in seen:
                continue
            seen.add(url)
            try:
                problem = probe_writable(url)
            except StorageUnavailableError as err:
                verdict = (f"{setting}: {err}", True)
                break
            if problem is not None:
                verdict = (f"{setting}: cannot write to {url!r}: {problem}", False)
                break
    verdict = dist.broadcast_object(verdict, src=0)
    if verdict is not None:
        message, transient = verdict
        raise StorageUnavailableError(message) if transient else ConfigError(message)
