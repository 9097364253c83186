"""Metric sinks: human progress lines and a JSON-lines history on rank 0.

Keys are grouped (``loss/…``, ``time/…``, ``data/…``, ``eval/…``). Every record goes to
the log (one line a person can follow in a terminal; JSON fields in a pod, through the
logging setup of ``trainer.dist``) and to ``<run_dir>/metrics.jsonl``; at the end of a
run (finished, stopped or interrupted) :meth:`MetricsLogger.close` draws
``<run_dir>/loss_curve.png`` beside it. Off rank 0 every call is a no-op.

``metrics.jsonl`` is strict JSON (RFC 8259), one object per line: JSON has no NaN or
Infinity, so a non-finite value (a skipped step's NaN loss) is written as ``null``, and
any JSON parser reads every line. The ``step`` of a record, of its progress line and of
any warning logged here is the same number: optimizer steps finished so far (1-based).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import tempfile
import time
from typing import Any

from trainer import storage

log = logging.getLogger("trainer.metrics")

#: Name of the picture :meth:`MetricsLogger.close` draws beside ``metrics.jsonl``.
LOSS_CURVE_NAME = "loss_curve.png"


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h02m``; ``75`` -> ``1m15s``; ``inf``/``nan`` (no estimate) -> ``?``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def strict_json_value(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (nested dicts/lists too).

    Numbers that are not Python floats (0-d tensors, numpy scalars) become floats first,
    so nothing can reach ``json.dumps`` as NaN.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(v) for v in value]
    if isinstance(value, numbers.Real) or hasattr(value, "item"):  # tensors, numpy scalars
        number = float(value)
        return number if math.isfinite(number) else None
    return str(value)


def nonfinite_keys(values: dict[str, Any]) -> list[str]:
    """Keys of ``values`` whose value is a non-finite number."""
    bad = []
    for key, value in values.items():
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) or hasattr(value, "item")):
            continue
        try:
            if not math.isfinite(float(value)):
                bad.append(key)
        except (TypeError, ValueError):  # a multi-element tensor is not a metric value
            continue
    return bad


class MetricsLogger:
    """Writes metric records; only the main rank does anything."""

    def __init__(self, run_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.url = storage.join_url(run_dir, "metrics.jsonl")
        self.plot_url = storage.join_url(run_dir, LOSS_CURVE_NAME)
        self._local = storage.protocol_of(run_dir) in ("file", "local")
        self._buffer: list[str] = []
        self._warned_nonfinite = False
        if enabled:
            fs, path = storage.url_to_fs(self.url)
            if self._local:
                fs.makedirs(os.path.dirname(path), exist_ok=True)
            if fs.exists(path):  # a resumed run keeps its history (remote run dirs too)
                with fs.open(path, "r") as f:
                    self._buffer = [line.rstrip("\n") for line in f if line.strip()]

    def _append(self, record: dict[str, Any]) -> None:
        """Add one already-strict record (see :func:`strict_json_value`) to the history."""
        line = json.dumps(record, allow_nan=False)  # raises rather than writing a NaN token
        self._buffer.append(line)
        if self._local:
            fs, path = storage.url_to_fs(self.url)
            with fs.open(path, "a") as f:
                f.write(line + "\n")

    def _record(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        """The strict-JSON record of ``values`` at ``step``; warns once about non-finite values."""
        bad = nonfinite_keys(values)
        if bad:
            # The same step number as this record's progress line (steps finished, 1-based).
            log.log(logging.DEBUG if self._warned_nonfinite else logging.WARNING,
                    "step %d: non-finite %s written as null to %s (strict JSON has no NaN)",
                    step, ", ".join(bad), self.url)
            self._warned_nonfinite = True
        return strict_json_value({"step": step, "time": time.time(), **values})

    def flush(self) -> None:
        """Rewrite the history to object storage (remote run dirs; called at checkpoints)."""
        if self.enabled and not self._local:
            with storage.open_url(self.url, "w") as f:
                f.write("\n".join(self._buffer) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every record of this run's history, resumed runs' earlier records included."""
        return [json.loads(line) for line in self._buffer]

    def write_plots(self) -> str | None:
        """Draw ``loss_curve.png`` beside ``metrics.jsonl``; returns its URL (None: nothing drawn).

        Never raises: a picture must not change a training run's exit code, so a failure
        (no matplotlib, an unwritable bucket) is logged as a warning.
        """
        if not self.enabled:
            return None
        try:
            records = self.records()
            if not any("loss/total" in r for r in records):
                return None  # no training step finished: no curve to draw
            from trainer.visualize import plot_loss_curve  # matplotlib: only when drawing

            if self._local:
                plot_loss_curve(records, storage.url_to_fs(self.plot_url)[1])
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    local = plot_loss_curve(records, os.path.join(tmp, LOSS_CURVE_NAME))
                    with storage.open_url(self.plot_url, "wb") as f:
                        f.write(local.read_bytes())
            log.info("loss curve: %s", self.plot_url)
            return self.plot_url
        except Exception as err:  # noqa: BLE001 - plotting is best effort by design
            log.warning("could not draw %s: %s: %s", self.plot_url, type(err).__name__, err)
            return None

    def close(self) -> None:
        """End of a run (finished, failed or interrupted): final upload and the loss curve.

        Never raises (see :meth:`write_plots`); the engine calls it in ``finally``.
        """
        if not self.enabled:
            return
        try:
            self.flush()  # remote run dirs: records since the last checkpoint (final eval)
        except Exception as err:  # noqa: BLE001 - the run's own outcome must win
            log.warning("could not upload %s: %s: %s", self.url, type(err).__name__, err)
        self.write_plots()

    def train(self, step: int, max_steps: int, values: dict[str, float], eta_s: float) -> None:
        """One training progress record and log line; ``step``: steps finished (1-based)."""
        if not self.enabled:
            return
        record = self._record(step, values)
        self._append(record)
        parts = " ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in values.items() if k.startswith("loss/"))
        mfu = f" | MFU {100 * values['mfu/end_to_end']:.1f}%" if "mfu/end_to_end" in values else ""
        log.info("step %d/%d | %s | lr %.2e | grad norm %.3g | %.2f img/s%s | data wait %.0f%% | ETA %s",
                 step, max_steps, parts, values.get("lr", 0.0), values.get("grad_norm", float("nan")),
                 values.get("time/images_per_s", 0.0), mfu,
                 100 * values.get("time/data_share", 0.0), format_duration(eta_s),
                 extra={"fields": {**record, "max_steps": max_steps, "eta_s": strict_json_value(eta_s)}})

    def event(self, step: int, values: dict[str, Any], message: str) -> None:
        """A non-periodic record (eval results, checkpoint, skips) with its own log line."""
        if not self.enabled:
            return
        record = self._record(step, values)
        self._append(record)
        log.info("%s", message, extra={"fields": record})


class Metrics:
    """The one interface the training loop calls; it fans out to the sinks.

    Sinks: the log and ``metrics.jsonl`` (:class:`MetricsLogger`, rank 0 only) and, when
    ``metrics.port`` > 0, Prometheus (``trainer.prom.PrometheusSink``, every rank).
    Every call is a cheap no-op for a sink that is off.
    """

    def __init__(self, history: MetricsLogger, prom: Any | None = None) -> None:
        self.history, self.prom = history, prom

    def step(self, step: int, values: dict[str, float], sections: dict[str, float],
             skip_counts: dict[str, int], step_seconds: float) -> None:
        """After every optimizer step, on every rank (counters must see every step)."""
        if self.prom is not None:
            self.prom.on_step(step, values, sections, skip_counts, step_seconds)

    def train(self, step: int, max_steps: int, values: dict[str, float], eta_s: float) -> None:
        """A progress line and ``metrics.jsonl`` record (every ``train.log_every`` steps)."""
        self.history.train(step, max_steps, values, eta_s)

    def event(self, step: int, values: dict[str, Any], message: str) -> None:
        self.history.event(step, values, message)

    def eval(self, step: int, miou: dict[str, float], counts: dict[str, Any], message: str) -> None:
        """An evaluation's mIoU by metric key and its counts (masks, images, skipped)."""
        self.history.event(step, {f"eval/{k}": v for k, v in miou.items()} | counts, message)
        if self.prom is not None:
            self.prom.on_eval(miou)

    def checkpoint(self, seconds: float, timestamp: float) -> None:
        """A checkpoint was saved in ``seconds`` (0 for the one resumed) at Unix ``timestamp``."""
        if self.prom is not None:
            self.prom.on_checkpoint(seconds, timestamp)

    def resumed(self, step: int, checkpoint_time: float, skip_counts: dict[str, int]) -> None:
        """Resumed at ``step`` from a checkpoint written at ``checkpoint_time``; the data
        position brought the run's cumulative ``skip_counts`` back (not new skips)."""
        if self.prom is not None:
            self.prom.on_resume(step, checkpoint_time, skip_counts)

    def set_flops(self, flops_per_image: dict[str, float], peak_flops: float | None) -> None:
        if self.prom is not None:
            self.prom.set_flops(flops_per_image, peak_flops)

    def flush(self) -> None:
        self.history.flush()

    def close(self, draw: bool = True, final_scrape: bool = True) -> None:
        """End of the run: history upload and loss curve (``draw``), final scrape, port closed.

        ``final_scrape=False`` skips waiting for a last scrape: after a shutdown signal the
        pod's grace period (and torchrun's) must go to the checkpoint, not to metrics.
        """
        if draw:
            self.history.close()
        if self.prom is not None:
            self.prom.close(wait=final_scrape)
