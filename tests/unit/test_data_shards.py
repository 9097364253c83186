"""Start-up validation of shard lists: every bad line is a one-line ConfigError naming
the setting and the URL, before any step; later failures are skips, not crashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainer import storage
from trainer.config import ConfigError
from trainer.data import DataConfig, ShardListError, build_loader, list_shards
from trainer.data.synth import write_synthetic_shards

SMALL = {"min_side": 48, "max_side": 80, "min_masks": 3, "max_masks": 8}


def _cfg(shards: str, **kw: Any) -> DataConfig:
    base = {"shards": shards, "img_size": 32, "batch_size": 1, "num_workers": 0,
            "retry_backoff_s": 0.0, "shuffle_shards": False}
    return DataConfig(**(base | kw))


def _error(spec: str, setting: str = "data.shards") -> str:
    with pytest.raises(ShardListError) as info:
        build_loader(_cfg(spec), 0, 1, setting=setting)
    assert isinstance(info.value, ConfigError)  # the entry point exits 2 on it
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{setting}: ")
    return message


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good")
    write_synthetic_shards(str(out), 4, 2, seed=2, **SMALL)
    return out


def test_bogus_protocol_line_fails_at_start_naming_the_line(good: Path, tmp_path: Path) -> None:
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{good}/sa_000000.tar\n# comment\nbogus://bucket/sa_000001.tar\n"
                       f"{good}/sa_000001.tar\n")
    message = _error(str(listing))
    assert f"line 3 of {listing}" in message and "'bogus://bucket/sa_000001.tar'" in message
    assert "unknown protocol 'bogus'" in message


@pytest.mark.parametrize("case", ["empty_glob", "missing_txt", "missing_path", "missing_dir"])
def test_listing_errors_name_the_setting_and_url(case: str, good: Path, tmp_path: Path) -> None:
    spec, expected = {
        "empty_glob": (f"{good}/nothing_*.tar", "matched no files"),
        "missing_txt": (f"{tmp_path}/list.txt", "shard list"),
        "missing_path": (f"{good}/sa_000000.tar,{tmp_path}/sa_000009.tar", "does not exist"),
        "missing_dir": (f"{tmp_path}/no/such/dir/*.tar", "matched no files"),
    }[case]
    message = _error(spec, setting="eval.shards")
    assert expected in message and (spec.split(",")[-1] in message)


def test_gcs_credentials_are_looked_up_once_for_a_thousand_shards(
        gcs_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = gcs_server.bucket("sa1b-validate")
    write_synthetic_shards(f"{bucket}/train", 2, 1, seed=1, **SMALL)
    urls = [f"{bucket}/train/sa_{i:06d}.tar" for i in range(1000)]  # only the first exists
    calls: list[str] = []
    real = storage.storage_options
    monkeypatch.setattr(storage, "storage_options",
                        lambda url: calls.append(url) or real(url))
    assert len(list_shards(urls)) == 1000
    assert len(calls) == 1  # not one lookup (nor one request) per shard


def test_unreachable_bucket_fails_at_start(gcs_server: Any) -> None:
    url = "gs://no-such-bucket-sa1b/sa_000000.tar"
    assert f"'{url}' does not exist" in _error(url)
    assert "no-such-bucket-sa1b" in _error("gs://no-such-bucket-sa1b/sa_*.tar")


def test_missing_remote_shard_past_the_first_is_skipped_at_run_time(gcs_server: Any) -> None:
    """Only one request per bucket at start: a later missing object is a run-time
    ``shard_unreadable`` skip (counted, listed), never a crash."""
    bucket = gcs_server.bucket("sa1b-runtime")
    write_synthetic_shards(f"{bucket}/t", 2, 1, seed=1, **SMALL)
    missing = f"{bucket}/t/sa_000007.tar"
    loader = build_loader(_cfg(f"{bucket}/t/sa_000000.tar,{missing}", batch_size=3), 0, 1)
    assert len(next(iter(loader)).image_ids) == 3  # 2 images, the missing shard, 1 again
    assert loader.skip_counts()["shard_unreadable"] == 1
    assert loader.shards_failed == [missing]


def test_a_directory_is_not_a_shard(good: Path) -> None:
    message = _error(str(good))  # passing the folder instead of a glob of its tars
    assert "is a directory, not a tar shard" in message and str(good) in message
