"""Metric records: a human line in a terminal, JSON fields in a pod, and metrics.jsonl."""

from __future__ import annotations

import io
import json
import logging

from trainer.dist import setup_logging
from trainer.metrics import MetricsLogger, format_duration


def test_pod_log_lines_carry_metric_fields(tmp_path) -> None:
    stream = io.StringIO()
    setup_logging(0, "INFO", "json", stream=stream)
    try:
        metrics = MetricsLogger(str(tmp_path), enabled=True)
        metrics.train(10, 300, {"loss/total": 1.5, "loss/dice": 0.5, "lr": 1e-3, "time/images_per_s": 6.0}, eta_s=75)
        metrics.event(10, {"eval/point_conf": 0.4}, "eval step 10")
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    train, event = lines
    assert train["step"] == 10 and train["loss/total"] == 1.5 and train["max_steps"] == 300
    assert "step 10/300" in train["msg"] and "ETA 1m15s" in train["msg"]
    assert event["eval/point_conf"] == 0.4
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [10, 10] and history[0]["loss/dice"] == 0.5


def test_rank_other_than_zero_writes_nothing(tmp_path) -> None:
    metrics = MetricsLogger(str(tmp_path), enabled=False)
    metrics.train(1, 2, {"loss/total": 1.0}, eta_s=1)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_format_duration() -> None:
    assert (format_duration(3725), format_duration(75), format_duration(9)) == ("1h02m", "1m15s", "9s")
