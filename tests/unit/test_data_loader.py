"""Shard listing, rank/worker partition, resumable position and storage backends."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.config import ConfigError
from trainer.data import Batch, DataConfig, SA1BLoader, build_loader, list_shards
from trainer.data.synth import write_synthetic_shards
from trainer.storage import open_url

SMALL = {"min_side": 48, "max_side": 80, "min_masks": 3, "max_masks": 8}


@pytest.fixture(scope="module")
def shards_3x4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shards × 3 images."""
    out = tmp_path_factory.mktemp("sa1b_3x4")
    write_synthetic_shards(str(out), 12, 4, seed=3, **SMALL)
    return out


def _cfg(shards: str, **kw: Any) -> DataConfig:
    base = {"shards": shards, "img_size": 64, "batch_size": 2, "num_workers": 0}
    return DataConfig(**(base | kw))


def _take(loader: SA1BLoader, n: int) -> list[Batch]:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()  # shuts DataLoader workers down now
    return out


def _assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert [x.image_ids for x in a] == [y.image_ids for y in b]
    for x, y in zip(a, b):
        for name in ("images", "masks", "boxes", "valid", "input_sizes", "original_sizes"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_list_shards_glob_txt_comma_and_list(shards_3x4: Path, tmp_path: Path) -> None:
    names = [f"sa_{i:06d}.tar" for i in range(4)]
    glob = list_shards(f"{shards_3x4}/sa_*.tar")
    assert [os.path.basename(u) for u in glob] == names
    assert all(u.startswith(str(shards_3x4)) for u in glob)  # plain paths stay plain
    assert [os.path.basename(u) for u in list_shards(f"file://{shards_3x4}/sa_*.tar")] == names
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# SA-1B subset\n{shards_3x4}/sa_000002.tar\n\n"
                       f"{shards_3x4}/sa_000000.tar  # first\n")
    assert list_shards(str(listing)) == [f"{shards_3x4}/sa_000002.tar",
                                         f"{shards_3x4}/sa_000000.tar"]
    assert list_shards("a.tar, b.tar", validate=False) == ["a.tar", "b.tar"]
    assert list_shards(["a.tar", f"{shards_3x4}/sa_000001.tar"],
                       validate=False)[1].endswith("sa_000001.tar")
    with pytest.raises(ValueError, match="shards"):
        list_shards(f"{tmp_path}/nothing_*.tar")


def test_two_ranks_two_workers_read_each_shard_once(tmp_path: Path) -> None:
    write_synthetic_shards(str(tmp_path), 16, 8, seed=5, **SMALL)
    seen = []
    for rank in range(2):
        cfg = _cfg(f"{tmp_path}/sa_*.tar", batch_size=1, num_workers=2, seed=11)
        # 8 shards / 2 ranks / 2 workers = 2 shards = 4 images per worker and epoch,
        # and batches alternate between the two workers: 8 batches = one epoch.
        seen.append([i for b in _take(build_loader(cfg, rank, 2), 8) for i in b.image_ids])
    assert sorted(seen[0] + seen[1]) == list(range(1, 17))


def test_fewer_shards_than_ranks_still_trains(shards_3x4: Path) -> None:
    """4 shards on 5 ranks: every rank gets batches (dealt from later epochs)."""
    for rank in range(5):
        batches = _take(build_loader(_cfg(f"{shards_3x4}/sa_*.tar", batch_size=3), rank, 5), 1)
        assert len(batches[0].image_ids) == 3


def test_stream_is_infinite_across_epochs(shards_3x4: Path) -> None:
    loader = build_loader(_cfg(f"{shards_3x4}/sa_*.tar", batch_size=5), 0, 1)
    ids = [i for b in _take(loader, 6) for i in b.image_ids]  # 30 images > 12
    assert sorted(ids[:12]) == list(range(1, 13)) and sorted(ids[12:24]) == list(range(1, 13))
    assert loader.state_dict()["workers"][0]["turn"] // 4 == 2  # 4 shards a turn each: epoch 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restore_reproduces_next_batches(shards_3x4: Path, num_workers: int) -> None:
    cfg = _cfg(f"{shards_3x4}/sa_*.tar", num_workers=num_workers, seed=1)
    reference = build_loader(cfg, 0, 1)
    it = iter(reference)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(reference.state_dict()))  # plain values only
    assert any(w["offset"] > 0 for w in state["workers"])  # resumes mid-shard (seek)
    expected = [next(it) for _ in range(5)]  # crosses into epoch 1
    it.close()
    resumed = build_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 5), expected)
    assert resumed.state_dict() == reference.state_dict()


def test_restore_rejects_other_setup(shards_3x4: Path) -> None:
    state = build_loader(_cfg(f"{shards_3x4}/sa_*.tar", num_workers=2), 0, 1).state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        build_loader(_cfg(f"{shards_3x4}/sa_*.tar", num_workers=0), 0, 1).load_state_dict(state)


def test_file_memory_and_gcs_give_identical_batches(gcs_server: Any, tmp_path: Path) -> None:
    bucket = gcs_server.bucket("sa1b-data-test")
    sources = [f"file://{tmp_path}", "memory://sa1b-data-test", f"{bucket}/train"]
    for src in sources:
        write_synthetic_shards(src, 6, 3, seed=9, **SMALL)
    with open_url(f"{bucket}/train/sa_000001.tar") as fileobj:  # really stored in GCS
        assert fileobj.read(512)[:9] == b"sa_3.jpg\0"
    batches = [_take(build_loader(_cfg(f"{src}/sa_*.tar"), 0, 1), 4) for src in sources]
    _assert_same(batches[0], batches[1])
    _assert_same(batches[0], batches[2])
    # gcsfs inside forked DataLoader workers, too
    workers = _cfg(f"{bucket}/train/sa_*.tar", num_workers=2)
    _assert_same(_take(build_loader(workers, 0, 1), 3),
                 _take(build_loader(_cfg(f"{tmp_path}/sa_*.tar", num_workers=2), 0, 1), 3))


def test_gcs_without_credentials_fails_early(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.delenv("SAM_GCS_TOKEN", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud ADC file
    with pytest.raises(ConfigError, match="^data.shards: .*credentials"):
        build_loader(_cfg("gs://some-bucket/sa_*.tar"), 0, 1)
    with pytest.raises(ConfigError, match="^data.shards: .*credentials"):  # not globbed
        build_loader(_cfg("gs://some-bucket/sa_000000.tar"), 0, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pin_memory(shards_3x4: Path) -> None:
    batch = _take(build_loader(_cfg(f"{shards_3x4}/sa_*.tar"), 0, 1), 1)[0]
    assert batch.pin_memory().images.is_pinned()
