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


def _strict_loads(line: str) -> dict:
    """``json.loads`` that rejects the NaN/Infinity tokens Python's json accepts by default."""
    def reject(token: str) -> None:
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(line, parse_constant=reject)


def test_nonfinite_values_are_strict_json_nulls_and_warn_with_the_progress_step(tmp_path, caplog) -> None:
    import torch

    metrics = MetricsLogger(str(tmp_path), enabled=True)
    with caplog.at_level(logging.INFO, logger="trainer.metrics"):
        metrics.train(5, 10, {"loss/total": float("nan"), "loss/dice": float("inf"),
                              "loss/iou": torch.tensor(float("-inf")), "lr": 1e-3}, eta_s=float("inf"))
        metrics.event(5, {"eval/point_conf": float("nan"), "eval/masks": 3}, "eval step 5")
        metrics.train(6, 10, {"loss/total": 1.0}, eta_s=1)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [_strict_loads(line) for line in lines]
    assert records[0]["loss/total"] is None and records[0]["loss/dice"] is None and records[0]["loss/iou"] is None
    assert records[0]["lr"] == 1e-3 and records[1]["eval/point_conf"] is None and records[1]["eval/masks"] == 3
    assert records[2]["loss/total"] == 1.0
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 5/10")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert progress and len(warnings) == 1  # warned once, not on every record
    assert warnings[0].startswith("step 5: non-finite loss/total, loss/dice, loss/iou")


def test_pod_log_fields_are_strict_json_too(tmp_path) -> None:
    stream = io.StringIO()
    setup_logging(0, "INFO", "json", stream=stream)
    try:
        MetricsLogger(str(tmp_path), enabled=True).train(1, 2, {"loss/total": float("nan")}, eta_s=float("nan"))
    finally:
        logging.getLogger().handlers.clear()
    line = [x for x in stream.getvalue().splitlines() if "step 1/2" in x][0]
    assert _strict_loads(line)["loss/total"] is None


def _is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_close_draws_the_loss_curve_beside_metrics_jsonl(tmp_path) -> None:
    metrics = MetricsLogger(str(tmp_path), enabled=True)
    for step in range(1, 4):
        metrics.train(step, 3, {"loss/total": 3.0 / step, "loss/focal": 1.0, "loss/dice": float("nan")}, eta_s=0)
    metrics.close()
    assert _is_png((tmp_path / "loss_curve.png").read_bytes())


def test_remote_run_dir_gets_history_and_curve_at_close_and_resume_keeps_history() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    run_dir = "memory://metrics-test/run"
    metrics = MetricsLogger(run_dir, enabled=True)
    metrics.train(1, 2, {"loss/total": 2.0}, eta_s=0)
    metrics.close()  # no checkpoint flushed it: close must upload the records
    assert _is_png(fs.cat("/metrics-test/run/loss_curve.png"))
    resumed = MetricsLogger(run_dir, enabled=True)
    resumed.train(2, 2, {"loss/total": 1.0}, eta_s=0)
    resumed.close()
    history = [_strict_loads(x) for x in fs.cat("/metrics-test/run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in history] == [1, 2]


def test_a_plotting_failure_warns_and_does_not_raise(tmp_path, caplog) -> None:
    (tmp_path / "loss_curve.png").mkdir()  # savefig cannot write a file where a folder is
    metrics = MetricsLogger(str(tmp_path), enabled=True)
    metrics.train(1, 1, {"loss/total": 1.0}, eta_s=0)
    with caplog.at_level(logging.WARNING, logger="trainer.metrics"):
        metrics.close()
    assert any("could not draw" in r.getMessage() for r in caplog.records)


def test_no_curve_without_a_finished_step_and_none_off_rank_zero(tmp_path) -> None:
    MetricsLogger(str(tmp_path / "a"), enabled=True).close()
    assert not (tmp_path / "a/loss_curve.png").exists()
    off = MetricsLogger(str(tmp_path / "b"), enabled=False)
    off.train(1, 1, {"loss/total": 1.0}, eta_s=0)
    off.close()
    assert not (tmp_path / "b").exists()
