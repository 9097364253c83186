"""Round-robin dealing of shards: equal coverage, independent seeds, exact resume, and
bad shards that only stop training when no rank can produce a sample."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.config import ConfigError
from trainer.data import (
    Batch,
    DataConfig,
    NoUsableDataError,
    SA1BLoader,
    ShardOrder,
    build_loader,
    shard_order,
)
from trainer.data.synth import write_synthetic_shards

SMALL = {"min_side": 48, "max_side": 80, "min_masks": 3, "max_masks": 8}
COMBOS = [(1000, 256, 2), (3, 2, 1), (3, 2, 2), (1, 4, 1), (7, 3, 2), (10, 4, 1), (5, 1, 3),
          (64, 8, 4), (100, 7, 3), (2, 4, 1), (12, 2, 3)]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("num_shards,world_size,num_workers", COMBOS)
def test_every_shard_is_read_equally_often_to_within_one(
        num_shards: int, world_size: int, num_workers: int, shuffle: bool) -> None:
    """After every slot has read t shards, counts differ by at most one, for any t (the
    old per-(rank, worker) split read 24 of 1000 shards ~4x and the rest ~2x on 256x2)."""
    slots = world_size * num_workers
    order = ShardOrder(num_shards, slots, seed=3, shuffle=shuffle)
    counts: Counter[int] = Counter()
    for turn in range(max(4, 3 * num_shards // slots + 2)):
        counts.update(order.locate(slot, turn)[1] for slot in range(slots))
        reads = [counts[i] for i in range(num_shards)]
        assert max(reads) - min(reads) <= 1, (turn, min(reads), max(reads))


@pytest.mark.parametrize("num_shards,world_size,num_workers", COMBOS)
def test_unshuffled_slots_read_every_shard_once_per_num_shards_turns(
        num_shards: int, world_size: int, num_workers: int) -> None:
    """Listed order alone would keep a slot on positions = slot (mod gcd) forever (e.g.
    4 shards, 2 slots: slot 0 only ever reads shards 0 and 2)."""
    slots = world_size * num_workers
    order = ShardOrder(num_shards, slots, seed=0, shuffle=False)
    for slot in range(min(slots, 16)):
        seen = [order.locate(slot, turn)[1] for turn in range(num_shards)]
        assert sorted(seen) == list(range(num_shards)), slot
    assert shard_order(9, 5, 0, shuffle=False, num_slots=1) == list(range(9))  # eval order


def test_seeds_give_independent_orders_not_shifted_copies() -> None:
    assert shard_order(50, epoch=0, seed=1) != shard_order(50, epoch=1, seed=0)
    assert shard_order(50, epoch=3, seed=2) != shard_order(50, epoch=4, seed=1)
    assert shard_order(50, epoch=0, seed=1) == shard_order(50, epoch=0, seed=1)
    assert sorted(shard_order(50, epoch=7, seed=5)) == list(range(50))


# ------------------------------------------------------------------------ real loaders


def _cfg(shards: str, **kw: Any) -> DataConfig:
    base = {"shards": shards, "img_size": 32, "batch_size": 1, "num_workers": 0,
            "retry_backoff_s": 0.0}
    return DataConfig(**(base | kw))


def _take(loader: SA1BLoader, n: int) -> list[Batch]:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards x 2 images."""
    out = tmp_path_factory.mktemp("sa1b_2x3")
    write_synthetic_shards(str(out), 6, 3, seed=4, **SMALL)
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restore_mid_stream_continues_exactly_with_fewer_shards_than_slots(
        three_shards: Path, num_workers: int) -> None:
    """2 ranks x 2 workers on 3 shards; save mid-shard, restore: same continuation."""
    cfg = _cfg(f"{three_shards}/sa_*.tar", num_workers=num_workers, seed=2)
    for rank in range(2):
        reference = build_loader(cfg, rank, 2)
        it = iter(reference)
        [next(it) for _ in range(3)]
        state = json.loads(json.dumps(reference.state_dict()))
        expected = [next(it).image_ids for _ in range(7)]  # into later epochs
        it.close()
        resumed = build_loader(cfg, rank, 2)
        resumed.load_state_dict(state)
        assert [b.image_ids for b in _take(resumed, 7)] == expected
        assert resumed.state_dict() == reference.state_dict()


def test_old_or_foreign_state_is_rejected_with_value_error(three_shards: Path) -> None:
    loader = build_loader(_cfg(f"{three_shards}/sa_*.tar"), 0, 1)
    state = loader.state_dict()
    for change in ({"version": 1}, {"shuffle_shards": False}, {"seed": 9}):
        with pytest.raises(ValueError, match=next(iter(change))):
            loader.load_state_dict(state | change)


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_rank_whose_epoch_shards_are_all_bad_keeps_training(tmp_path: Path) -> None:
    """3 shards, 2 ranks, one not a tar: a rank that draws only the bad shard for a while
    skips it and goes on (it used to stop the job after 2 such epochs)."""
    write_synthetic_shards(str(tmp_path), 4, 2, seed=1, **SMALL)
    (tmp_path / "sa_000002.tar").write_bytes(b"<html>403 Forbidden</html>")
    for seed in range(4):
        for rank in range(2):
            loader = build_loader(_cfg(f"{tmp_path}/sa_*.tar", seed=seed), rank, 2)
            assert len(_take(loader, 16)) == 16  # 16 batches = many epochs of this rank
            assert loader.skip_counts()["not_a_tar"] >= 1
            assert loader.shards_failed == [f"{tmp_path}/sa_000002.tar"]


def test_no_usable_data_from_workers_is_the_same_one_line_error(tmp_path: Path) -> None:
    """Raised in a DataLoader worker, re-raised by torch with a traceback as message:
    the loader hands on the original type and one-line message, naming the setting."""
    for i in range(2):
        (tmp_path / f"sa_{i}.tar").write_bytes(_tar_bytes([(f"sa_{i}.jpg", b"\xff\xd8bad"),
                                                           (f"sa_{i}.json", b"{}")]))
    loader = build_loader(_cfg(f"{tmp_path}/sa_*.tar", num_workers=2), 0, 2,
                          setting="eval.shards")
    with pytest.raises(NoUsableDataError) as info:
        next(iter(loader))
    assert isinstance(info.value, ConfigError)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("eval.shards: none of the 2 shards gives a usable sample")
    assert f"{tmp_path}/sa_0.tar (invalid_json)" in message


def test_pinned_batches_unchanged(three_shards: Path) -> None:
    """Sanity: batches are real tensors of the configured size."""
    batch = _take(build_loader(_cfg(f"{three_shards}/sa_*.tar"), 0, 1), 1)[0]
    assert batch.images.shape == (1, 3, 32, 32) and batch.images.dtype == torch.float32
