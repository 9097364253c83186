"""Tar streaming, pairing and bad-data handling: every skip reason, then a good sample."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainer.config import ConfigError
from trainer.data import DataConfig, NoUsableDataError, build_loader, sa1b
from trainer.data.sa1b import SKIP_REASONS, RawPair, Skip, iter_shard, iter_tar_members
from trainer.data.synth import synth_sample


def _sample(image_id: int, h: int = 48, w: int = 64, shapes: int = 5) -> tuple[bytes, dict]:
    return synth_sample(np.random.default_rng(image_id), h, w, shapes, image_id)


def _pair(image_id: int, **kw: Any) -> list[tuple[str, bytes]]:
    jpg, doc = _sample(image_id, **kw)
    return [(f"sa_{image_id}.jpg", jpg), (f"sa_{image_id}.json", json.dumps(doc).encode())]


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _json_with(image_id: int, **changes: Any) -> bytes:
    _, doc = _sample(image_id)
    for key, fn in changes.items():
        doc[key] = fn(doc[key])
    return json.dumps(doc).encode()


def _bad_case(reason: str) -> list[tuple[str, bytes]]:
    jpg, doc = _sample(90)
    js = json.dumps(doc).encode()
    big = doc["annotations"][0] | {"area": 48 * 64}
    seg = doc["annotations"][0]["segmentation"]
    tiny = np.zeros((48, 64), np.uint8)  # one pixel that nearest sampling at 1/4 skips
    tiny[1, 1] = 1
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(tiny))
    one_px = doc["annotations"][0] | {"area": 1, "segmentation": {
        "size": [48, 64], "counts": rle["counts"].decode()}}
    cases = {
        "corrupt_jpeg": [("sa_90.jpg", b"\xff\xd8not a jpeg\xff\xd9"), ("sa_90.json", js)],
        "corrupt_jpeg/truncated": [("sa_90.jpg", jpg[: len(jpg) // 2]), ("sa_90.json", js)],
        "invalid_json": [("sa_90.jpg", jpg), ("sa_90.json", b"{not json")],
        "invalid_json/fields": [("sa_90.jpg", jpg), ("sa_90.json", b'{"image": {}}')],
        "invalid_rle": [("sa_90.jpg", jpg), ("sa_90.json", json.dumps(
            doc | {"annotations": [doc["annotations"][0] | {"segmentation": {
                "size": seg["size"], "counts": "0" + seg["counts"]}}]}).encode())],
        "rle_size_mismatch": [("sa_90.jpg", jpg), ("sa_90.json", json.dumps(
            doc | {"annotations": [a | {"segmentation": a["segmentation"] | {"size": [49, 64]}}
                                   for a in doc["annotations"]]}).encode())],
        "no_annotations": [("sa_90.jpg", jpg), ("sa_90.json", json.dumps(
            doc | {"annotations": []}).encode())],
        "no_annotations/area": [("sa_90.jpg", jpg), ("sa_90.json", json.dumps(
            doc | {"annotations": [big]}).encode())],
        "empty_after_transform": [("sa_90.jpg", jpg), ("sa_90.json", json.dumps(
            doc | {"annotations": [one_px]}).encode())],
        "missing_json": [("sa_90.jpg", jpg)],
        "missing_jpg": [("sa_90.json", js)],
    }
    return cases[reason]


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    assert set(counts) == set(SKIP_REASONS)  # every reason present, stable names
    return {k: v for k, v in counts.items() if v}


def _loader_cfg(shards: str, **kw: Any) -> DataConfig:
    base = {"shards": shards, "img_size": 16, "batch_size": 1, "num_workers": 0,
            "shuffle_shards": False, "retry_backoff_s": 0.0}
    return DataConfig(**(base | kw))


@pytest.mark.parametrize("case", [
    "corrupt_jpeg", "corrupt_jpeg/truncated", "invalid_json", "invalid_json/fields",
    "invalid_rle", "rle_size_mismatch", "no_annotations", "no_annotations/area",
    "empty_after_transform", "missing_json", "missing_jpg"])
def test_bad_sample_is_skipped_and_counted(case: str, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    reason = case.split("/")[0]
    path = tmp_path / "sa_000000.tar"
    path.write_bytes(_tar(_bad_case(case) + _pair(1)))
    loader = build_loader(_loader_cfg(str(path)), 0, 1)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        batch = next(iter(loader))
    assert batch.image_ids == [1]
    assert _nonzero(loader.skip_counts()) == {reason: 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def _without_end_blocks(data: bytes) -> bytes:
    """The archive up to the end of its last member (tarfile pads to 10 KiB records)."""
    return data[:-(-len(data.rstrip(b"\0")) // 512) * 512]


@pytest.mark.parametrize("reason", ["truncated_member", "truncated_tar", "corrupt_tar"])
def test_broken_archive_keeps_earlier_pairs_and_next_shard(reason: str, tmp_path: Path) -> None:
    head = _without_end_blocks(_tar(_pair(1)))
    tail = _tar(_pair(2))
    if reason == "truncated_member":
        broken = head + tail[:700]  # inside sa_2.jpg's data
    elif reason == "truncated_tar":
        broken = head + tail[:100]  # inside sa_2.jpg's header
    else:
        bad = bytearray(tail)
        bad[148:156] = b"0000000\0"  # wrong header checksum
        broken = head + bytes(bad)
    (tmp_path / "a.tar").write_bytes(broken)
    (tmp_path / "b.tar").write_bytes(_tar(_pair(3)))
    loader = build_loader(_loader_cfg(f"{tmp_path}/a.tar,{tmp_path}/b.tar", batch_size=2), 0, 1)
    assert next(iter(loader)).image_ids == [1, 3]
    assert _nonzero(loader.skip_counts()) == {reason: 1}


def test_archive_without_end_block_is_truncated_tar(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(_without_end_blocks(_tar(_pair(1))))
    (tmp_path / "b.tar").write_bytes(_tar(_pair(2)))
    loader = build_loader(_loader_cfg(f"{tmp_path}/a.tar,{tmp_path}/b.tar", batch_size=2), 0, 1)
    assert next(iter(loader)).image_ids == [1, 2]
    assert _nonzero(loader.skip_counts()) == {"truncated_tar": 1}


def test_shard_gone_at_run_time_is_reported_and_skipped(tmp_path: Path) -> None:
    """Validated at start, deleted before it is read: skipped and listed, not fatal."""
    (tmp_path / "a.tar").write_bytes(_tar(_pair(1)))
    (tmp_path / "b.tar").write_bytes(_tar(_pair(2)))
    loader = build_loader(_loader_cfg(f"{tmp_path}/a.tar,{tmp_path}/b.tar"), 0, 1)
    (tmp_path / "a.tar").unlink()
    assert next(iter(loader)).image_ids == [2]
    assert _nonzero(loader.skip_counts()) == {"shard_unreadable": 1}
    assert loader.shards_failed == [f"{tmp_path}/a.tar"]


def test_storage_error_at_run_time_is_a_skip_not_a_crash() -> None:
    events = list(iter_shard("bogus://bucket/sa_000000.tar", retries=0))
    assert [(type(e), e.reason) for e in events] == [(Skip, "shard_unreadable")]
    assert "bogus" in events[0].detail


@pytest.mark.parametrize("content", [b"", b"hello\n" * 10, b"PK\x03\x04" + b"x" * 20000],
                         ids=["empty", "small", "large"])
def test_file_that_is_not_a_tar_is_one_reason_and_listed(content: bytes, tmp_path: Path) -> None:
    """Empty, small and large non-tar files: all ``not_a_tar`` (small ones used to be
    ``truncated_tar``, large ones ``corrupt_tar``), and listed in ``shards_failed``."""
    (tmp_path / "a.tar").write_bytes(content)
    (tmp_path / "b.tar").write_bytes(_tar(_pair(2)))
    loader = build_loader(_loader_cfg(f"{tmp_path}/a.tar,{tmp_path}/b.tar"), 0, 1)
    assert next(iter(loader)).image_ids == [2]
    assert _nonzero(loader.skip_counts()) == {"not_a_tar": 1}
    assert loader.shards_failed == [f"{tmp_path}/a.tar"]


def test_empty_archive_is_not_a_failure(tmp_path: Path) -> None:
    assert list(iter_shard(_write(tmp_path / "e.tar", _tar([])))) == []


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_no_usable_data_anywhere_is_one_line_config_error(tmp_path: Path) -> None:
    """Every shard bad (not a tar, no pairs, only bad samples): exit-2 error naming each
    shard and why, once the slot has read all of them (not after N epochs of its own)."""
    jpg, _ = _sample(5)
    urls = [_write(tmp_path / "a.tar", b"not a tar"), _write(tmp_path / "b.tar", _tar([])),
            _write(tmp_path / "c.tar", _tar([("sa_5.jpg", jpg), ("sa_5.json", b"{")]))]
    loader = build_loader(_loader_cfg(",".join(urls)), 0, 1)
    with pytest.raises(NoUsableDataError) as info:
        next(iter(loader))
    message = str(info.value)
    assert isinstance(info.value, ConfigError) and "\n" not in message
    assert message.startswith("data.shards: none of the 3 shards")
    for url, why in zip(urls, ["not_a_tar", "no sa_<id>.jpg/.json pairs", "invalid_json"]):
        assert f"{url} ({why})" in message


def test_pairs_in_either_order_and_other_members(tmp_path: Path) -> None:
    a, b = _pair(1), _pair(2)
    members = [a[1], a[0], ("README.txt", b"hello"), b[0], b[1]]
    path = tmp_path / "x.tar"
    path.write_bytes(_tar(members))
    events = list(iter_shard(str(path)))
    assert [type(e) for e in events] == [RawPair, RawPair]
    assert [e.stem for e in events] == ["sa_1", "sa_2"]


def test_member_offsets_allow_resuming_mid_archive(tmp_path: Path) -> None:
    long_dir = "d" * 120  # forces GNU long-name / pax extension headers
    members = [(f"{long_dir}/sa_{i}.{ext}", data) for i in (1, 2, 3)
               for ext, data in zip(("jpg", "json"), (b"J" * (100 * i), b"{}"))]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        data = _tar(members, fmt)
        got = list(iter_tar_members(io.BytesIO(data)))
        assert [m.name for m in got] == [n for n, _ in members]
        assert [m.data for m in got] == [d for _, d in members]
        resumed = io.BytesIO(data)
        resumed.seek(got[2].offset)
        rest = list(iter_tar_members(resumed, got[2].offset))
        assert [(m.name, m.offset, m.next_offset) for m in rest] == [
            (m.name, m.offset, m.next_offset) for m in got[2:]]


def test_open_is_retried_with_exponential_backoff(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.tar"
    path.write_bytes(_tar(_pair(1)))
    real_open, calls, sleeps = sa1b._open_at, [], []

    def flaky_open(url: str, offset: int) -> Any:
        calls.append(offset)
        if len(calls) <= 2:
            raise OSError("503 service unavailable")
        return real_open(url, offset)

    monkeypatch.setattr(sa1b, "_open_at", flaky_open)
    monkeypatch.setattr(sa1b, "_sleep", sleeps.append)
    events = list(iter_shard(str(path), retries=3, backoff_s=0.5))
    assert [type(e) for e in events] == [RawPair] and sleeps == [0.5, 1.0]

    calls.clear(), sleeps.clear()
    monkeypatch.setattr(sa1b, "_open_at", lambda url, offset: (_ for _ in ()).throw(OSError("x")))
    events = list(iter_shard(str(path), retries=3, backoff_s=0.5))
    assert [(type(e), e.reason) for e in events] == [(Skip, "shard_unreadable")]
    assert sleeps == [0.5, 1.0, 2.0]


def test_read_error_mid_shard_resumes_at_failed_member(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.tar"
    path.write_bytes(_tar(_pair(1) + _pair(2) + _pair(3)))
    real_open, offsets = sa1b._open_at, []

    class Flaky:
        def __init__(self, inner: Any) -> None:
            self.inner, self.reads = inner, 0

        def read(self, n: int = -1) -> bytes:
            self.reads += 1
            if self.reads == 9:  # somewhere inside the second pair
                raise ConnectionResetError("connection reset")
            return self.inner.read(n)

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()

    def open_once_flaky(url: str, offset: int) -> Any:
        offsets.append(offset)
        inner = real_open(url, offset)
        return Flaky(inner) if len(offsets) == 1 else inner

    monkeypatch.setattr(sa1b, "_open_at", open_once_flaky)
    monkeypatch.setattr(sa1b, "_sleep", lambda s: None)
    events = list(iter_shard(str(path)))
    assert [e.stem for e in events] == ["sa_1", "sa_2", "sa_3"]
    assert offsets[0] == 0 and offsets[1] > 0


def test_unexpected_decoder_error_is_skipped_as_decode_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.data import sa1b as sa1b_module  # decode_event (training and eval) calls it there

    real = sa1b_module.decode_sample

    def fragile(pair: RawPair, cfg: DataConfig, epoch: int) -> Any:
        if pair.stem == "sa_90":
            raise RuntimeError("simulated decoder bug")
        return real(pair, cfg, epoch)

    monkeypatch.setattr(sa1b_module, "decode_sample", fragile)
    path = tmp_path / "x.tar"
    path.write_bytes(_tar(_pair(90) + _pair(1)))
    loader = build_loader(_loader_cfg(str(path)), 0, 1)
    assert next(iter(loader)).image_ids == [1]
    assert _nonzero(loader.skip_counts()) == {"decode_error": 1}


@pytest.mark.parametrize("unsampled", ["area_filtered", "not_drawn"])
def test_rle_size_of_every_annotation_is_checked(unsampled: str, tmp_path: Path) -> None:
    """A wrong RLE size on an annotation the sampler would never decode (dropped by the
    area filter, or not among the drawn masks) still skips the image."""
    jpg, doc = _sample(90, shapes=6)
    anns = doc["annotations"]
    bad = anns[-1] | {"segmentation": anns[-1]["segmentation"] | {"size": [49, 64]}}
    if unsampled == "area_filtered":
        bad["area"] = 48 * 64  # > 90% of the image: never sampled
    doc["annotations"] = anns[:-1] + [bad]
    members = [("sa_90.jpg", jpg), ("sa_90.json", json.dumps(doc).encode())] + _pair(1)
    (tmp_path / "x.tar").write_bytes(_tar(members))
    for seed in range(4):  # whichever masks a seed draws
        loader = build_loader(_loader_cfg(str(tmp_path / "x.tar"), max_masks_per_image=1,
                                          seed=seed), 0, 1)
        assert next(iter(loader)).image_ids == [1]
        assert _nonzero(loader.skip_counts()) == {"rle_size_mismatch": 1}


def test_bad_member_warns_once_per_process_but_counts_every_epoch(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "x.tar"
    path.write_bytes(_tar(_bad_case("corrupt_jpeg") + _pair(1)))
    loader = build_loader(_loader_cfg(str(path)), 0, 1)
    stream = iter(loader)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        assert [next(stream).image_ids for _ in range(3)] == [[1]] * 3  # 3 epochs
    assert loader.skip_counts()["corrupt_jpeg"] == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sa_90" in warnings[0].getMessage()
