"""``s3://`` through s3fs against a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.checkpoint import CheckpointManager
from trainer.data import DataConfig, build_loader, write_synthetic_shards


def _batches(spec: str, count: int) -> list:
    cfg = DataConfig(shards=spec, img_size=128, max_masks_per_image=4, num_workers=0, batch_size=2)
    stream = iter(build_loader(cfg, 0, 1))
    return [next(stream) for _ in range(count)]


def test_s3_shards_give_the_same_batches_as_local(s3_server, tmp_path: Path) -> None:
    bucket = s3_server.bucket("sa1b-s3")
    for root in (str(tmp_path), f"{bucket}/train"):
        write_synthetic_shards(root, num_images=6, num_shards=2, seed=3, min_side=96, max_side=160)
    local, remote = _batches(f"{tmp_path}/sa_*.tar", 3), _batches(f"{bucket}/train/sa_*.tar", 3)
    for a, b in zip(local, remote):
        assert a.image_ids == b.image_ids
        assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)


def test_checkpoints_round_trip_and_resume_on_s3(s3_server) -> None:
    url = f"{s3_server.bucket('ckpt-s3')}/run/checkpoints"
    manager = CheckpointManager(url, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, {"model": {"w": torch.full((3,), float(step))}, "config.toml": f"step = {step}\n"})
    assert manager.complete_steps() == [3, 2]  # keep_last=2 pruned step 1
    step, state = CheckpointManager(url, keep_last=2).load_latest()
    assert step == 3 and torch.equal(state["model"]["w"], torch.full((3,), 3.0))
