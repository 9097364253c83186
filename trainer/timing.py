"""Where a training step's time goes, without slowing the step down to find out.

The loop wraps its sections (``data_wait``, ``encoder``, ``prompt_rounds``, ``loss``,
``backward``, ``optimizer``) in ``with timer(name):``. Three modes:

- ``off``: the context manager does nothing.
- ``wall``: host wall clock per section, no device synchronisation. Exact on CPU,
  where every op runs synchronously; used for CPU runs with metrics on.
- ``events``: on CUDA, a pair of ``torch.cuda.Event`` is recorded around each section
  (recording is asynchronous: no sync). The elapsed times are read **one step later**,
  by :meth:`StepTimer.end_step`, when those events have long completed (the loop
  already synchronises on the loss every step), so reading them never waits. The
  split reported after step N is therefore that of step N-1. ``data_wait`` is host
  time (the loader), timed with the wall clock in every mode.
- ``sync``: ``torch.cuda.synchronize`` around each section, exact but slow; for
  benchmarks and profiling (``profile=True``), with running ``totals``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Literal

import torch

Mode = Literal["off", "wall", "events", "sync"]
#: Sections timed on the host in every mode (no device work inside).
HOST_SECTIONS = frozenset({"data_wait"})


class StepTimer:
    """Named sections of a training step; see the module docstring for the modes.

    Attributes:
        totals: seconds per section summed over all steps (``sync`` and ``wall`` modes,
            and ``events`` once read); benchmarks read it.
    """

    def __init__(self, mode: Mode, device: torch.device) -> None:
        if mode == "events" and device.type != "cuda":
            mode = "wall"  # CPU ops are synchronous: the wall clock is exact
        self.mode, self.device = mode, device
        self.totals: dict[str, float] = {}
        self._current: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.mode == "off":
            yield
            return
        if self.mode == "events" and name not in HOST_SECTIONS:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
            return
        sync = self.mode == "sync" and self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        begin = time.perf_counter()
        yield
        if sync:
            torch.cuda.synchronize(self.device)
        self._add(self._current, name, time.perf_counter() - begin)

    @staticmethod
    def _add(into: dict[str, float], name: str, seconds: float) -> None:
        into[name] = into.get(name, 0.0) + seconds

    def end_step(self) -> dict[str, float]:
        """Seconds per section of the last step whose times are known (see the modes).

        In ``events`` mode: the device sections of the *previous* step (read now, without
        waiting) plus this step's host sections; empty for the first step.
        """
        out, self._current = self._current, {}
        if self.mode == "events":
            for name, start, end in self._pending:
                if end.query():  # completed long ago; never blocks
                    self._add(out, name, start.elapsed_time(end) / 1000.0)
            self._pending, self._events = self._events, []
        for name, seconds in out.items():
            self._add(self.totals, name, seconds)
        return out
