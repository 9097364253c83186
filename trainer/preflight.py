"""Start-up checks of where a run writes: one readable line naming the setting, exit 2.

Without them a run dir under a regular file, an unknown protocol, missing credentials or
an unreachable bucket surface as a traceback from deep inside the first write (minutes
in, after the model was built and the data listed), and a pod restarts into the same
crash. Rank 0 probes each location once with a small write and delete; the verdict is
broadcast so every rank raises the same :class:`ConfigError` together (no rank waits in
a collective for a rank that died).
"""

from __future__ import annotations

import logging
import os
import uuid

from trainer import dist
from trainer.config import ConfigError
from trainer.storage import StorageError, join_url, protocol_of, url_to_fs

log = logging.getLogger(__name__)


def probe_writable(url: str) -> str | None:
    """Why ``url`` cannot hold run files (create it, write and delete one object), or None."""
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
        return f"{kind}{' '.join(str(err).split()) or type(err).__name__}"
    return None


def check_run_locations(locations: dict[str, str], is_main: bool) -> None:
    """Probe ``{setting: url}`` on rank 0 and raise :class:`ConfigError` on every rank if one fails.

    Args:
        locations: e.g. ``{"train.run_dir": "gs://b/runs/x", "checkpoint.url": ".../checkpoints"}``;
            a URL listed under two settings is probed once.
        is_main: whether this process probes (rank 0).
    """
    verdict: str | None = None
    if is_main:
        seen: set[str] = set()
        for setting, url in locations.items():
            if url in seen:
                continue
            seen.add(url)
            problem = probe_writable(url)
            if problem is not None:
                verdict = f"{setting}: cannot write to {url!r}: {problem}"
                break
    verdict = dist.broadcast_object(verdict, src=0)
    if verdict is not None:
        raise ConfigError(verdict)
