"""Per-GPU series read through NVML (``nvidia-ml-py``'s ``pynvml``) at scrape time.

Reading happens only when Prometheus scrapes (a custom collector), never on the training
step. Without NVIDIA devices (CPU CI, laptops) or without the library, :func:`gpu_collector`
returns None after one INFO line, and the series are absent: nothing fails.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: (series name, help) of every GPU series; values come from :meth:`NvmlCollector._read`.
GPU_SERIES = (
    ("sam_gpu_utilization_ratio", "GPU busy share over NVML's last sample period (0..1)"),
    ("sam_gpu_memory_used_bytes", "device memory in use"),
    ("sam_gpu_memory_total_bytes", "device memory in total"),
    ("sam_gpu_power_watts", "board power draw"),
    ("sam_gpu_temperature_celsius", "GPU core temperature"),
    ("sam_gpu_sm_clock_hertz", "current SM clock"),
)


class NvmlCollector(Collector):
    """Reads one GPU (this rank's) on every scrape.

    Args:
        nvml: the imported ``pynvml`` module, already initialised.
        index: the device index (this rank's ``LOCAL_RANK`` GPU).
        labels: the process's constant labels (``run``, ``rank``, ...); ``gpu`` is added.
    """

    def __init__(self, nvml: Any, index: int, labels: dict[str, str]) -> None:
        self.nvml, self.index = nvml, index
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.labels = {**labels, "gpu": str(index)}

    def _read(self) -> dict[str, float]:
        nvml, handle = self.nvml, self.handle
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return {
            "sam_gpu_utilization_ratio": nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
            "sam_gpu_memory_used_bytes": float(memory.used),
            "sam_gpu_memory_total_bytes": float(memory.total),
            "sam_gpu_power_watts": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # mW
            "sam_gpu_temperature_celsius": float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            "sam_gpu_sm_clock_hertz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM) * 1e6,  # MHz
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            values = self._read()
        except Exception as err:  # noqa: BLE001 - a scrape must not fail because NVML hiccuped
            log.debug("NVML read failed: %s", err)
            return
        names, label_values = list(self.labels), list(self.labels.values())
        for name, help_text in GPU_SERIES:
            family = GaugeMetricFamily(name, help_text, labels=names)
            family.add_metric(label_values, values[name])
            yield family

    def describe(self) -> list:
        return []  # values are read at scrape time only, not when registering


def gpu_collector(index: int, labels: dict[str, str]) -> NvmlCollector | None:
    """An :class:`NvmlCollector` for device ``index``, or None (INFO line) without NVIDIA GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        if index >= count:
            log.info("NVML sees %d GPUs, none with index %d: GPU series absent", count, index)
            return None
        return NvmlCollector(pynvml, index, labels)
    except Exception as err:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, driver errors
        log.info("no NVIDIA GPU metrics (%s: %s): GPU series absent", type(err).__name__, err)
        return None
