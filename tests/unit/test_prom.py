"""The Prometheus sink on its own: series, labels, counters, ports, the final scrape, GPU absence.

Scraped over real HTTP from the real ``prometheus_client`` server and parsed with its
text parser; the end-to-end test with a real Prometheus server is
``tests/integration/test_prometheus.py``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainer import engine
from trainer.config import ConfigError, MetricsConfig, load_config
from trainer.data.sa1b import SKIP_REASONS
from trainer.presets import PRESETS, Config
from trainer.prom import PrometheusSink, node_label, run_label
from trainer.timing import StepTimer

from ..conftest import free_port

LABELS = {"run": "r1", "rank": "3", "local_rank": "1", "node": "1"}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **extra: str) -> float:
    return samples[(name, tuple(sorted({**LABELS, **extra}.items())))]


@pytest.fixture
def sink(caplog: pytest.LogCaptureFixture) -> PrometheusSink:
    base = free_port() - 1  # local_rank 1 serves on base + 1
    cfg = MetricsConfig(port=base, addr="127.0.0.1", final_scrape_wait_s=5)
    with caplog.at_level(logging.INFO):
        out = PrometheusSink(cfg, LABELS, world_size=4, max_iters=10, skip_reasons=SKIP_REASONS, gpu_index=None)
    yield out
    out.cfg.final_scrape_wait_s = 0
    out.close()


def step_values(images: int, masks: int, loss: float) -> dict[str, float]:
    return {"data/images": images, "data/masks": masks, "loss/total": loss, "loss/focal": 0.1,
            "loss/dice": 0.2, "loss/iou": 0.3, "lr": 1e-3, "grad_norm": 2.0, "nonfinite/skipped": 0.0}


def test_series_counters_and_labels(sink: PrometheusSink, caplog: pytest.LogCaptureFixture) -> None:
    for step in range(1, 4):
        sink.on_step(step, step_values(2, 7, 1.5), {"encoder": 0.25, "data_wait": 0.5},
                     {"corrupt_jpeg": step, "not_a_tar": 0}, step_seconds=1.0)
    sink.on_checkpoint(2.5, 1_700_000_000.0)
    sink.on_eval({"point1_conf": 0.4, "box": 0.5})
    samples = scrape(sink.port)
    assert sink.port == sink.cfg.port + 1  # base port + LOCAL_RANK
    assert value(samples, "sam_train_step") == 3 and value(samples, "sam_train_world_size") == 4
    assert value(samples, "sam_train_images_total") == 6 and value(samples, "sam_train_masks_total") == 21
    assert value(samples, "sam_train_loss", part="total") == 1.5
    assert value(samples, "sam_train_section_seconds_total", section="encoder") == pytest.approx(0.75)
    assert value(samples, "sam_train_section_seconds_total", section="optimizer") == 0  # exists from the start
    assert value(samples, "sam_train_data_skipped_total", reason="corrupt_jpeg") == 3  # cumulative -> counter
    assert value(samples, "sam_train_data_skipped_total", reason="decode_error") == 0
    assert value(samples, "sam_train_step_seconds_count") == 3
    assert value(samples, "sam_train_last_checkpoint_timestamp_seconds") == 1_700_000_000.0
    assert value(samples, "sam_train_eval_miou", metric="box") == 0.5
    assert value(samples, "sam_train_images_per_second") > 0
    assert not any(name.startswith("sam_gpu_") for name, _ in samples)  # no GPU: absent
    assert not any(name.endswith("_created") for name, _ in samples)
    assert all(dict(labels).keys() >= LABELS.keys() for _, labels in samples)
    assert any("GPU series absent" in r.getMessage() for r in caplog.get_records("setup"))  # one INFO line


def test_mfu_present_only_with_a_known_peak(sink: PrometheusSink) -> None:
    sink.on_step(1, step_values(2, 7, 1.0), {}, {}, 1.0)
    assert not any(name == "sam_train_mfu" for name, _ in scrape(sink.port))
    sink.set_flops({"encoder": 1e12, "end_to_end": 3e12}, peak_flops=100e12)
    for step in range(2, 5):
        sink.on_step(step, step_values(2, 7, 1.0), {}, {}, 1.0)
    samples = scrape(sink.port)
    throughput = value(samples, "sam_train_images_per_second")
    assert value(samples, "sam_train_mfu", scope="end_to_end") == pytest.approx(throughput * 3e12 / 100e12)
    assert value(samples, "sam_train_flops_per_image", scope="encoder") == 1e12


def test_port_in_use_is_a_config_error_naming_the_setting() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = MetricsConfig(port=port, addr="127.0.0.1")
        with pytest.raises(ConfigError, match=r"metrics\.port: cannot serve on 127\.0\.0\.1:"):
            PrometheusSink(cfg, {**LABELS, "local_rank": "0"}, 1, 1, SKIP_REASONS, None)


def test_close_waits_for_one_scrape_of_the_final_values(sink: PrometheusSink) -> None:
    sink.on_step(1, step_values(1, 1, 1.0), {}, {}, 1.0)
    sink.cfg.final_scrape_wait_s = 10
    seen: dict = {}

    def scraper() -> None:
        time.sleep(0.5)
        seen.update(scrape(sink.port))

    thread = threading.Thread(target=scraper)
    start = time.monotonic()
    thread.start()
    sink.close()
    thread.join()
    assert 0.4 < time.monotonic() - start < 5  # waited for the scrape, not the full 10 s
    assert value(seen, "sam_train_step") == 1
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", sink.port)) != 0  # closed afterwards
    sink.close = lambda: None  # the fixture's close: already done


def test_labels_from_config_environment_and_run_dir() -> None:
    assert run_label("", "gs://b/runs/vit_h-7/", {}) == "vit_h-7"
    assert run_label("", "runs/x", {"SAM_RUN_NAME": "job-a"}) == "job-a"
    assert run_label("named", "runs/x", {"SAM_RUN_NAME": "job-a"}) == "named"
    assert node_label({"GROUP_RANK": "3"}) == "3" and node_label({"PET_NODE_RANK": "2"}) == "2"
    assert node_label({}) == "0"


def test_metrics_config_rejects_bad_ports() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        load_config(Config, "tiny_cpu", ["metrics.port=70000"], PRESETS)


def test_wall_timer_sums_sections_without_a_device() -> None:
    import torch

    timer = StepTimer("events", torch.device("cpu"))  # events fall back to the exact wall clock on CPU
    assert timer.mode == "wall"
    for _ in range(2):
        with timer("encoder"):
            time.sleep(0.01)
    split = timer.end_step()
    assert 0.015 < split["encoder"] < 0.5 and timer.end_step() == {}
    off = StepTimer("off", torch.device("cpu"))
    with off("encoder"):
        pass
    assert off.end_step() == {}


def test_disabled_metrics_open_no_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics.port=0: no Prometheus sink, and nothing listens on the usual port during a step."""
    from trainer import dist
    from trainer.data import write_synthetic_shards

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    write_synthetic_shards(str(tmp_path / "data"), num_images=2, num_shards=1, seed=0, min_side=96,
                           max_side=128, min_masks=2, max_masks=3)
    probes: list[int] = []
    original = engine.SamTrainModel.forward

    def forward(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        with socket.socket() as sock:
            probes.append(sock.connect_ex(("127.0.0.1", 9400)))  # the chart's base port
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine.SamTrainModel, "forward", forward)
    cfg = load_config(Config, "tiny_cpu", [f"data.shards={tmp_path}/data/sa_*.tar", f"train.run_dir={tmp_path}/run",
                                           "checkpoint.every=0", "data.batch_size=1", "metrics.port=0"], PRESETS)
    run = engine.TrainRun(cfg, dist.init_distributed("cpu"))
    assert run.metrics.prom is None and run.timer.mode == "off"  # nothing timed either
    run.train_step(iter(run.loader))
    assert probes and all(code != 0 for code in probes)


class FakeNvml:
    """A stand-in for ``pynvml`` (no NVIDIA driver exists on CPU CI): fixed readings in
    NVML's own units, to check the conversions and labels of the collector."""

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 0, 1

    class _Util:
        gpu = 87

    class _Mem:
        used, total = 30 * 2**30, 80 * 2**30

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802 - NVML's names
        return f"gpu{index}"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> "_Util":  # noqa: N802
        return self._Util()

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> "_Mem":  # noqa: N802
        return self._Mem()

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:  # noqa: N802
        return 412_000  # mW

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:  # noqa: N802
        return 61

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:  # noqa: N802
        return 1980  # MHz


def test_nvml_collector_units_and_labels() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from trainer.gpu_stats import NvmlCollector

    registry = CollectorRegistry()
    registry.register(NvmlCollector(FakeNvml(), 1, LABELS))
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[sample.name] = (sample.value, sample.labels)
    assert samples["sam_gpu_utilization_ratio"][0] == pytest.approx(0.87)
    assert samples["sam_gpu_power_watts"][0] == pytest.approx(412.0)
    assert samples["sam_gpu_sm_clock_hertz"][0] == pytest.approx(1.98e9)
    assert samples["sam_gpu_memory_total_bytes"][0] == 80 * 2**30
    assert samples["sam_gpu_temperature_celsius"][0] == 61
    assert samples["sam_gpu_memory_used_bytes"][1] == {**LABELS, "gpu": "1"}


def test_resume_sets_the_step_and_takes_restored_skips_as_a_baseline(sink: PrometheusSink) -> None:
    sink.on_resume(10, 1_700_000_123.0, {"corrupt_jpeg": 5, "invalid_json": 2})
    samples = scrape(sink.port)
    assert value(samples, "sam_train_step") == 10  # not 0 until the first new step
    assert value(samples, "sam_train_last_checkpoint_timestamp_seconds") == 1_700_000_123.0
    sink.on_step(11, step_values(2, 4, 1.0), {}, {"corrupt_jpeg": 6, "invalid_json": 2}, 1.0)
    samples = scrape(sink.port)
    assert value(samples, "sam_train_data_skipped_total", reason="corrupt_jpeg") == 1  # only the new skip
    assert value(samples, "sam_train_data_skipped_total", reason="invalid_json") == 0


def test_close_without_waiting_returns_at_once(sink: PrometheusSink) -> None:
    sink.on_step(1, step_values(1, 1, 1.0), {}, {}, 1.0)
    sink.cfg.final_scrape_wait_s = 30
    start = time.monotonic()
    sink.close(wait=False)  # after SIGTERM: the grace period goes to the checkpoint
    assert time.monotonic() - start < 3
    sink.close = lambda wait=True: None


def test_sigterm_skips_the_final_scrape_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    from trainer.data import write_synthetic_shards

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    write_synthetic_shards(str(tmp_path / "data"), num_images=4, num_shards=1, seed=0, min_side=96,
                           max_side=128, min_masks=2, max_masks=3)
    original, calls = engine.SamTrainModel.forward, []

    def forward(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a node drain; nobody scrapes this exporter
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine.SamTrainModel, "forward", forward)
    cfg = load_config(Config, "tiny_cpu", [
        f"data.shards={tmp_path}/data/sa_*.tar", f"train.run_dir={tmp_path}/run", "checkpoint.every=0",
        "data.batch_size=1", "optim.max_iters=10", "optim.milestones=", "optim.warmup_iters=0",
        f"metrics.port={free_port()}", "metrics.addr=127.0.0.1", "metrics.final_scrape_wait_s=60"], PRESETS)
    start = time.monotonic()
    assert engine.train(cfg) == 143
    assert time.monotonic() - start < 30  # did not sit out the 60 s wait
