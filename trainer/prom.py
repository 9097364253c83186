"""Prometheus sink: every rank serves its own series on its own port.

Design: **one HTTP port per local rank** (``metrics.port + LOCAL_RANK``), each process
with its own ``CollectorRegistry``. Chosen over the client's multiprocess mode because
it supports every metric type (histograms with a ``rank`` label, the NVML collector that
reads at scrape time), needs no shared directory that must be wiped before torchrun
starts, and keeps a dead rank visible as a failed target (``up == 0``) rather than as
silently stale files. The cost is N ports per pod, each declared as a container port
and listed in the PodMonitor (the chart does that). Rank 0 exporting all-reduced values
would hide stragglers, the thing these series exist to show.

Every series carries ``run``, ``rank``, ``local_rank`` and ``node``; the only other
labels are bounded enumerations (``section``, ``part``, ``reason``, ``metric``,
``scope``, ``gpu``). Nothing here synchronises the device: values arrive as host floats
the loop already has (see ``trainer.timing`` for the step split). The series list, with
types, is in the README's Metrics section.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from trainer.config import ConfigError, MetricsConfig
from trainer.gpu_stats import gpu_collector

log = logging.getLogger(__name__)

BASE_LABELS = ("run", "rank", "local_rank", "node")
SECTIONS = ("data_wait", "encoder", "prompt_rounds", "loss", "backward", "optimizer")
LOSS_PARTS = ("total", "focal", "dice", "iou")
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60)
THROUGHPUT_WINDOW = 20  # steps in the images/s and masks/s window


class _ScrapeClock(Collector):
    """Records when the registry was last collected (= scraped); exports nothing."""

    def __init__(self) -> None:
        self.last = 0.0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.last = time.time()
        return iter(())

    def describe(self) -> list:
        return []


class PrometheusSink:
    """The Prometheus series of one process (see the module docstring).

    Args:
        cfg: the ``metrics`` config section (``port`` > 0).
        labels: ``run``, ``rank``, ``local_rank``, ``node`` values of this process.
        world_size: processes in the job (``sam_train_world_size``, for the rank-missing alert).
        max_iters: ``optim.max_iters``.
        skip_reasons: every data skip reason, so each counter exists (at 0) from the start.
        gpu_index: this rank's GPU for the NVML series, or None on CPU.

    Raises:
        ConfigError: the port cannot be bound (names ``metrics.port``).
    """

    def __init__(self, cfg: MetricsConfig, labels: Mapping[str, str], world_size: int, max_iters: int,
                 skip_reasons: tuple[str, ...], gpu_index: int | None) -> None:
        self.cfg, self.labels = cfg, dict(labels)
        disable_created_metrics()  # no *_created series: they double the series count for nothing
        self.registry = CollectorRegistry(auto_describe=True)
        # Registered first, so it is collected first: a scrape that began before the final
        # update does not count as the scrape that read it.
        self._clock = _ScrapeClock()
        self.registry.register(self._clock)
        self._define(skip_reasons)
        self._static["world_size"].set(world_size)
        self._static["max_iters"].set(max_iters)
        self._static["last_checkpoint"].set(time.time())  # process start until a checkpoint exists
        # (time, images so far, masks so far) of the last steps: rates are differences.
        self._window: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=THROUGHPUT_WINDOW + 1)
        self._totals = (0, 0)
        self._skips_seen: dict[str, int] = {}
        self._last_update = time.time()
        self._flops: dict[str, float] = {}
        self._peak: float | None = None
        if cfg.gpu and gpu_index is not None:
            collector = gpu_collector(gpu_index, self.labels)
            if collector is not None:
                self.registry.register(collector)
        elif cfg.gpu:
            log.info("no GPU on this rank: GPU series absent")
        self.port = cfg.port + int(self.labels["local_rank"])
        try:
            self._server, self._thread = start_http_server(self.port, cfg.addr, registry=self.registry)
        except OSError as err:
            raise ConfigError(f"metrics.port: cannot serve on {cfg.addr}:{self.port} "
                              f"(port + LOCAL_RANK): {err}") from err
        log.info("Prometheus metrics on http://%s:%d/metrics", cfg.addr, self.port)

    # ------------------------------------------------------------------ series

    def _new(self, kind: type, name: str, doc: str, extra: tuple[str, ...] = (), **kwargs: Any) -> Any:
        metric = kind(name, doc, labelnames=BASE_LABELS + extra, registry=self.registry, **kwargs)
        return metric if extra else metric.labels(**self.labels)

    def _define(self, skip_reasons: tuple[str, ...]) -> None:
        g, c = Gauge, Counter
        self._static = {
            "step": self._new(g, "sam_train_step", "optimizer steps finished"),
            "max_iters": self._new(g, "sam_train_max_iters", "optim.max_iters"),
            "world_size": self._new(g, "sam_train_world_size", "processes in the job"),
            "images": self._new(c, "sam_train_images", "images this rank trained on"),
            "masks": self._new(c, "sam_train_masks", "masks this rank trained on"),
            "images_per_s": self._new(g, "sam_train_images_per_second", "images/s of this rank, sliding window"),
            "masks_per_s": self._new(g, "sam_train_masks_per_second", "masks/s of this rank, sliding window"),
            "step_seconds": self._new(Histogram, "sam_train_step_seconds", "wall time of one optimizer step",
                                      buckets=STEP_BUCKETS),
            "lr": self._new(g, "sam_train_learning_rate", "base learning rate of the last step"),
            "grad_norm": self._new(g, "sam_train_grad_norm", "global gradient norm before clipping"),
            "nonfinite": self._new(c, "sam_train_nonfinite_steps", "skipped non-finite steps"),
            "ckpt_seconds": self._new(g, "sam_train_checkpoint_save_seconds", "duration of the last checkpoint save"),
            "last_checkpoint": self._new(g, "sam_train_last_checkpoint_timestamp_seconds",
                                         "Unix time of the last successful checkpoint (process start until one)"),
        }
        labelled = {
            "section": self._new(c, "sam_train_section_seconds", "step time per section", ("section",)),
            "loss": self._new(g, "sam_train_loss", "loss of the last step", ("part",)),
            "skipped": self._new(c, "sam_train_data_skipped", "skipped data on this rank by reason", ("reason",)),
            "eval": self._new(g, "sam_train_eval_miou", "mIoU of the last evaluation", ("metric",)),
            "mfu": self._new(g, "sam_train_mfu", "model FLOPs utilization (0..1)", ("scope",)),
            "flops": self._new(g, "sam_train_flops_per_image", "analytic training FLOPs per image", ("scope",)),
        }
        self._labelled = {k: (lambda m: lambda **kw: m.labels(**self.labels, **kw))(m) for k, m in labelled.items()}
        for section in SECTIONS:
            self._labelled["section"](section=section)
        for reason in skip_reasons:
            self._labelled["skipped"](reason=reason)

    # ------------------------------------------------------------------ updates

    def set_flops(self, flops_per_image: Mapping[str, float], peak_flops: float | None) -> None:
        """Analytic training FLOPs per image by scope (``encoder``, ``end_to_end``) and the peak."""
        self._flops, self._peak = dict(flops_per_image), peak_flops
        for scope, value in self._flops.items():
            self._labelled["flops"](scope=scope).set(value)

    def on_step(self, step: int, values: Mapping[str, float], sections: Mapping[str, float],
                skip_counts: Mapping[str, int], step_seconds: float) -> None:
        """Everything known after one optimizer step (host floats; called on every rank)."""
        s = self._static
        images, masks = int(values.get("data/images", 0)), int(values.get("data/masks", 0))
        s["step"].set(step)
        s["images"].inc(images)
        s["masks"].inc(masks)
        s["step_seconds"].observe(step_seconds)
        s["lr"].set(values.get("lr", 0.0))
        s["grad_norm"].set(values.get("grad_norm", float("nan")))
        s["nonfinite"].inc(values.get("nonfinite/skipped", 0.0))
        for part in LOSS_PARTS:
            if f"loss/{part}" in values:
                self._labelled["loss"](part=part).set(values[f"loss/{part}"])
        for section, seconds in sections.items():
            self._labelled["section"](section=section).inc(seconds)
        for reason, count in skip_counts.items():  # cumulative counts -> counter increments
            delta = count - self._skips_seen.get(reason, 0)
            if delta > 0:
                self._labelled["skipped"](reason=reason).inc(delta)
            self._skips_seen[reason] = count
        self._update_rates(images, masks)
        self._last_update = time.time()

    def _update_rates(self, images: int, masks: int) -> None:
        self._totals = (self._totals[0] + images, self._totals[1] + masks)
        self._window.append((time.perf_counter(), *self._totals))
        if len(self._window) < 2:
            return
        (start, images0, masks0), (now, images1, masks1) = self._window[0], self._window[-1]
        elapsed = max(now - start, 1e-9)
        images_per_s = (images1 - images0) / elapsed
        self._static["images_per_s"].set(images_per_s)
        self._static["masks_per_s"].set((masks1 - masks0) / elapsed)
        if self._peak:
            from trainer.flops import mfu

            for scope, flops in self._flops.items():
                self._labelled["mfu"](scope=scope).set(mfu(images_per_s, flops, self._peak))

    def on_checkpoint(self, seconds: float, timestamp: float) -> None:
        """A checkpoint was written (or resumed: ``seconds`` 0) at Unix time ``timestamp``."""
        self._static["ckpt_seconds"].set(seconds)
        self._static["last_checkpoint"].set(timestamp)
        self._last_update = time.time()

    def on_eval(self, miou: Mapping[str, float]) -> None:
        """mIoU by metric key of ``trainer.evaluate.metric_keys()``."""
        for metric, value in miou.items():
            self._labelled["eval"](metric=metric).set(value)
        self._last_update = time.time()

    def on_resume(self, step: int, checkpoint_time: float, skip_counts: Mapping[str, int]) -> None:
        """Resumed at ``step``: the step gauge shows it at once, the resumed checkpoint is the
        last one, and the restored cumulative skip counts are a baseline, not new skips."""
        self._static["step"].set(step)
        self._static["last_checkpoint"].set(checkpoint_time)
        self._skips_seen = dict(skip_counts)
        self._last_update = time.time()

    def close(self, wait: bool = True) -> None:
        """Wait (bounded; not when ``wait`` is False) for one scrape after the last update,
        then stop serving."""
        deadline = time.monotonic() + (self.cfg.final_scrape_wait_s if wait else 0.0)
        while self._clock.last <= self._last_update and time.monotonic() < deadline:
            time.sleep(0.05)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def node_label(env: Mapping[str, str]) -> str:
    """This process's node index: torchrun's ``GROUP_RANK``, the operator's ``PET_NODE_RANK``, else 0."""
    for name in ("GROUP_RANK", "PET_NODE_RANK", "NODE_RANK"):
        if env.get(name, "").strip():
            return env[name].strip()
    return "0"



def run_label(cfg_run_name: str, run_dir: str, env: Mapping[str, str]) -> str:
    """The ``run`` label: ``metrics.run_name``, else ``SAM_RUN_NAME``, else the run dir's last part."""
    name = cfg_run_name or env.get("SAM_RUN_NAME", "").strip()
    return name or run_dir.rstrip("/").rsplit("/", 1)[-1] or "run"


def build_prometheus(cfg: Any, rank: int, local_rank: int, world_size: int, gpu_index: int | None,
                     env: Mapping[str, str]) -> PrometheusSink | None:
    """The Prometheus sink of this process, or None when ``metrics.port`` is 0 (no socket).

    Args:
        cfg: the root training config (``metrics``, ``train.run_dir``, ``optim.max_iters``).
        gpu_index: this rank's CUDA device index, None on CPU.
        env: the process environment (run and node labels).
    """
    if cfg.metrics.port == 0:
        return None
    from trainer.data.sa1b import SKIP_REASONS

    labels = {"run": run_label(cfg.metrics.run_name, cfg.train.run_dir, env), "rank": str(rank),
              "local_rank": str(local_rank), "node": node_label(env)}
    return PrometheusSink(cfg.metrics, labels, world_size, cfg.optim.max_iters, SKIP_REASONS, gpu_index)
