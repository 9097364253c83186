"""Metric sinks: human progress lines and a JSON-lines history on rank 0.

Keys are grouped (``loss/…``, ``time/…``, ``data/…``, ``eval/…``). Every record goes to
the log (one line a person can follow in a terminal; JSON fields in a pod, through the
logging setup of ``trainer.dist``) and to ``<run_dir>/metrics.jsonl``, which the demo
plots. Off rank 0 every call is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from trainer import storage

log = logging.getLogger("trainer.metrics")


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h02m``; ``75`` -> ``1m15s``."""
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class MetricsLogger:
    """Writes metric records; only the main rank does anything."""

    def __init__(self, run_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.url = storage.join_url(run_dir, "metrics.jsonl")
        self._local = storage.protocol_of(run_dir) in ("file", "local")
        self._buffer: list[str] = []
        if enabled and self._local:
            fs, path = storage.url_to_fs(self.url)
            fs.makedirs(os.path.dirname(path), exist_ok=True)
            if fs.exists(path):  # a resumed run keeps its history
                with fs.open(path, "r") as f:
                    self._buffer = [line.rstrip("\n") for line in f if line.strip()]

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=float)
        self._buffer.append(line)
        if self._local:
            fs, path = storage.url_to_fs(self.url)
            with fs.open(path, "a") as f:
                f.write(line + "\n")

    def flush(self) -> None:
        """Rewrite the history to object storage (remote run dirs; called at checkpoints)."""
        if self.enabled and not self._local:
            with storage.open_url(self.url, "w") as f:
                f.write("\n".join(self._buffer) + "\n")

    def train(self, step: int, max_steps: int, values: dict[str, float], eta_s: float) -> None:
        """One training progress record and log line."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        self._append(record)
        parts = " ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in values.items() if k.startswith("loss/"))
        log.info("step %d/%d | %s | lr %.2e | %.2f img/s | data wait %.0f%% | ETA %s",
                 step, max_steps, parts, values.get("lr", 0.0), values.get("time/images_per_s", 0.0),
                 100 * values.get("time/data_share", 0.0), format_duration(eta_s),
                 extra={"fields": {**record, "max_steps": max_steps, "eta_s": eta_s}})

    def event(self, step: int, values: dict[str, Any], message: str) -> None:
        """A non-periodic record (eval results, checkpoint, skips) with its own log line."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        self._append(record)
        log.info("%s", message, extra={"fields": record})
