"""The compiled path (``train.compile=true``: ``torch.compile`` of the image encoder) on tiny.

The performance issue keeps compilation out of CI tests except one run of the compiled path
on ``tiny`` if it fits in a minute: compiling the tiny encoder's forward and backward takes
about 40 s on 2 cores. One real engine step each, compiled and eager, from the same
weights, batch and seed: the same losses and gradients within fp32 kernel differences.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch

from trainer import dist
from trainer.config import load_config
from trainer.data import write_synthetic_shards
from trainer.engine import TrainRun
from trainer.presets import PRESETS, Config
from tests.conftest import unavailable

pytestmark = pytest.mark.slow


def _run(shards: Path, run_dir: Path, compile_: bool) -> TrainRun:
    cfg = load_config(Config, "tiny_cpu", [
        f"data.shards={shards}/sa_*.tar", f"train.run_dir={run_dir}", "data.num_workers=0", "eval.shards=",
        "checkpoint.every=0", "data.batch_size=1", "data.max_masks_per_image=4", f"train.compile={str(compile_).lower()}",
        "train.grad_clip=0"], PRESETS)
    return TrainRun(cfg, dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"),
                                       backend=None, is_main=True))


def test_compiled_encoder_step_matches_eager(tmp_path: Path) -> None:
    if shutil.which("g++") is None:  # inductor's CPU backend compiles C++ (make install-system installs it)
        unavailable("no g++ for torch.compile's CPU backend")
    write_synthetic_shards(str(tmp_path / "data"), num_images=2, num_shards=1, seed=0, min_side=96,
                           max_side=160, min_masks=2, max_masks=4)
    eager, compiled = _run(tmp_path / "data", tmp_path / "eager", False), _run(tmp_path / "data", tmp_path / "c", True)
    assert compiled.sam.image_encoder._compiled_call_impl is not None  # nn.Module.compile() in place
    batch = next(iter(eager.loader))
    results = []
    for run in (eager, compiled):
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        losses = run.module(batch, generator, torch.tensor(float(batch.valid.sum())), None,
                            lambda _name: contextlib.nullcontext())
        losses["loss"].backward()
        grads = {n: p.grad.detach().clone() for n, p in run.sam.named_parameters() if p.grad is not None}
        results.append((float(losses["loss"].detach()), grads))
    (loss_e, grads_e), (loss_c, grads_c) = results
    assert loss_c == pytest.approx(loss_e, rel=1e-4)
    assert grads_c.keys() == grads_e.keys()
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-3, atol=1e-5, msg=name)

