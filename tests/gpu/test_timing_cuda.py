"""CUDA-event step split (``trainer.timing``): read a step late, never waiting (opt-in, -m gpu)."""

from __future__ import annotations

import pytest
import torch

from trainer.timing import StepTimer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_events_report_the_previous_step_and_host_sections_now() -> None:
    device = torch.device("cuda")
    timer = StepTimer("events", device)
    x = torch.randn(2048, 2048, device=device)
    for step in range(3):
        with timer("data_wait"):
            pass
        with timer("encoder"):
            for _ in range(20):
                x = x @ x / 2048
        float(x.sum())  # the loop's own per-step sync (the loss)
        split = timer.end_step()
        assert "data_wait" in split  # host time: this step
        assert ("encoder" in split) == (step > 0)  # device time: the previous step's
    assert split["encoder"] > 0
    assert timer.totals["encoder"] > 0
