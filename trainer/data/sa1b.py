"""Streaming SA-1B tar shards and decoding one image + its masks.

A shard is read front to back as a stream from any fsspec URL (:func:`iter_shard`): no
extraction, no full download. Members are grouped into ``sa_<id>.jpg`` +
``sa_<id>.json`` pairs by stem; the two may come in either order but must be adjacent,
as in the released tars (webdataset's grouping rule). Within a shard the stored order
is kept; only the shard order is shuffled (see :mod:`trainer.data.loader`).

The tar headers are parsed here (with :meth:`tarfile.TarInfo.frombuf`) rather than by
``tarfile.open(mode="r|")``, for two reasons: every member's byte offset is known
exactly, so a resumed run can ``seek`` to the next unread member; and a truncated
archive is told apart from a clean end (``r|`` silently stops at either).

Bad data is skipped, never raised into training. Each skip is counted every time under
a stable reason name (:data:`SKIP_REASONS`), and logged as ONE warning line the first
time this process meets that (shard, member) — not again every epoch:

- ``corrupt_jpeg``: the image is not a complete, decodable JPEG.
- ``invalid_json``: not JSON, or required SA-1B fields are missing or malformed.
- ``invalid_rle``: an RLE ``counts`` string does not describe an H×W mask.
- ``rle_size_mismatch``: the ``size`` of any annotation's RLE (all are checked, from the
  JSON header only, sampled or not) differs from the JPEG's size.
- ``no_annotations``: no annotations, or none left after the area filter.
- ``empty_after_transform``: every mask vanished after resize/crop (tiny or cropped out).
- ``missing_json`` / ``missing_jpg``: one half of a pair is absent.
- ``truncated_member``: the archive ends inside a member's data (rest of shard lost).
- ``truncated_tar``: the archive ends inside a header or without the end-of-archive
  block (rest of shard lost).
- ``corrupt_tar``: a header after the first fails its checksum; the stream cannot be
  resynchronised (rest of shard lost).
- ``not_a_tar``: the file does not start with a tar header (any size, including empty):
  the whole shard is skipped and listed in ``SA1BLoader.shards_failed``.
- ``shard_unreadable``: the shard could not be opened or read, even after retries (also
  listed in ``shards_failed``).
- ``decode_error``: any other exception while decoding one sample (a safety net; the
  warning names the exception so the cause can be fixed).
"""

from __future__ import annotations

import json
import logging
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

from trainer.data.config import DataConfig
from trainer.data.transforms import (
    decode_jpeg,
    decode_masks,
    jpeg_size,
    masks_to_boxes,
    plan_geometry,
    resize_image,
)
from trainer.storage import StorageError, open_url

logger = logging.getLogger(__name__)

SKIP_REASONS = (
    "corrupt_jpeg", "invalid_json", "invalid_rle", "rle_size_mismatch", "no_annotations",
    "empty_after_transform", "missing_json", "missing_jpg", "truncated_member",
    "truncated_tar", "corrupt_tar", "not_a_tar", "shard_unreadable", "decode_error",
)
#: Reasons that mean nothing of the shard could be read (listed in ``shards_failed``).
SHARD_FAILURES = ("not_a_tar", "shard_unreadable")

_BLOCK = 512
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".json": "json"}


class SkipSample(Exception):
    """A sample (or the rest of a shard) is bad; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_warned: set[tuple[str, str]] = set()  # (reason, where) already logged by this process


def warn_skip(counts: dict[str, int], reason: str, where: str, detail: str) -> None:
    """Count one skip; log it as a single warning line the first time this process
    skips ``where`` (``shard`` or ``shard:member``) for ``reason``.

    Every epoch re-reads the same bad members: the count grows each time (it measures
    lost samples), the log does not repeat itself. One entry per bad member is small
    even for SA-1B (11M images).
    """
    counts[reason] = counts.get(reason, 0) + 1
    if (reason, where) in _warned:
        return
    _warned.add((reason, where))
    detail = " ".join(str(detail).split())  # exception texts may span lines
    logger.warning("skipped %s (%s): %s (logged once; every repeat is counted)",
                   where, reason, detail[:300])


# ---------------------------------------------------------------------------- tar stream


@dataclass
class TarMember:
    """A regular file in a tar stream; offsets are bytes from the start of the shard."""

    name: str
    data: bytes
    offset: int
    next_offset: int


def _read_exact(fileobj: IO[bytes], size: int) -> bytes:
    parts, left = [], size
    while left > 0:
        chunk = fileobj.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _pax_fields(data: bytes) -> dict[str, str]:
    """Records ``"<len> <key>=<value>\\n"`` of a pax extended header."""
    fields, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        fields[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return fields


def _check_first_block(header: bytes) -> None:
    """Raise ``not_a_tar`` unless a file's first 512 bytes are a tar header (or the
    all-zero end block of an empty archive): one reason for "not a tar" whatever the
    file's size, instead of ``truncated_tar`` when small and ``corrupt_tar`` when large."""
    if len(header) == _BLOCK and header.count(0) == _BLOCK:
        return
    try:
        if len(header) < _BLOCK:
            raise tarfile.HeaderError("shorter than one tar header")
        tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError as err:
        raise SkipSample("not_a_tar", f"the file does not start with a tar header ({err})") from err


def iter_tar_members(fileobj: IO[bytes], offset: int = 0,
                     want: Callable[[str], bool] = lambda name: True) -> Iterator[TarMember]:
    """Yield the regular files of a tar stream that starts (or resumes) at ``offset``.

    Handles ustar, GNU long names and pax ``path``/``size``. Data of members that
    ``want`` rejects is read and dropped (``b""``). Raises SkipSample with reason
    ``not_a_tar`` (the first block of the file is not a tar header), ``truncated_member``,
    ``truncated_tar`` or ``corrupt_tar``; I/O errors propagate.
    """
    pos, start, long_name, pax = offset, None, None, {}
    while True:
        header = _read_exact(fileobj, _BLOCK)
        if pos == 0:
            _check_first_block(header)
        if len(header) < _BLOCK:
            raise SkipSample("truncated_tar", f"archive ends at byte {pos + len(header)} "
                             "without an end-of-archive block")
        if header.count(0) == _BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            raise SkipSample("corrupt_tar", f"bad tar header at byte {pos}: {err}") from err
        start = pos if start is None else start  # extension headers belong to the member
        size = int(pax.get("size", info.size))
        name = pax.get("path") or long_name or info.name
        keep = info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE) or (
            info.type in _REGULAR_TYPES and want(name))
        data = _read_exact(fileobj, size) if keep else b""
        if not keep:  # drop unwanted data in bounded chunks, still noticing truncation
            left = size
            while left > 0 and (chunk := fileobj.read(min(left, 1 << 20))):
                left -= len(chunk)
            got = size - left
        else:
            got = len(data)
        if got < size:
            raise SkipSample("truncated_member", f"{name}: archive ends after {got} of "
                             f"{size} bytes")
        fileobj.read(-size % _BLOCK)  # padding; a short read surfaces at the next header
        pos += _BLOCK + size + (-size % _BLOCK)
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            pax = _pax_fields(data)
        elif info.type in (tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK):
            pass  # global pax / long link names: nothing we use
        else:
            if info.type in _REGULAR_TYPES and keep:
                yield TarMember(name, data, start, pos)
            start, long_name, pax = None, None, {}


# ------------------------------------------------------------------------ pairs of a shard


@dataclass
class RawPair:
    """The undecoded members of one SA-1B sample."""

    stem: str
    jpg: bytes
    json: bytes
    next_offset: int  # where the member after this pair starts


@dataclass
class Skip:
    """Something in a shard that was skipped (reason in SKIP_REASONS)."""

    reason: str
    where: str
    detail: str


def split_member_name(name: str) -> tuple[str, str | None]:
    """``("dir/sa_1", "jpg")`` for ``"./dir/sa_1.jpg"``; kind None for unrelated files."""
    name = name.removeprefix("./")
    dot = name.rfind(".")
    if dot <= name.rfind("/"):
        return name, None
    return name[:dot], _EXTENSIONS.get(name[dot:].lower())


class _PairGrouper:
    """Pairs adjacent members by stem; a lone member becomes a ``missing_*`` skip."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stem: str | None = None
        self.parts: dict[str, bytes] = {}

    def add(self, member: TarMember) -> list[RawPair | Skip]:
        stem, kind = split_member_name(member.name)
        if kind is None:
            return []
        out = self.finish() if stem != self.stem or kind in self.parts else []
        self.stem, self.parts[kind] = stem, member.data
        if len(self.parts) == 2:
            out.append(RawPair(stem, self.parts["jpg"], self.parts["json"], member.next_offset))
            self.stem, self.parts = None, {}
        return out

    def finish(self) -> list[RawPair | Skip]:
        if not self.parts:
            return []
        have, lack = ("jpg", "json") if "jpg" in self.parts else ("json", "jpg")
        skip = Skip(f"missing_{lack}", f"{self.url}:{self.stem}", f"{have} without {lack}")
        self.stem, self.parts = None, {}
        return [skip]


def _is_sample_member(name: str) -> bool:
    return split_member_name(name)[1] is not None


def _sleep(seconds: float) -> None:
    time.sleep(seconds)  # module-level so tests can replace it


def _open_at(url: str, offset: int) -> IO[bytes]:
    fileobj = open_url(url, "rb")
    if offset:
        fileobj.seek(offset)
    return fileobj


def iter_shard(url: str, offset: int = 0, retries: int = 3,
               backoff_s: float = 1.0) -> Iterator[RawPair | Skip]:
    """Stream the pairs of one shard, starting at member offset ``offset``.

    Opening, and reading after an I/O error (reopened at the failed member), is
    retried up to ``retries`` times per shard with exponential backoff
    (``backoff_s · 2^k``); then one ``shard_unreadable`` Skip ends the shard. A missing
    file, or a :class:`trainer.storage.StorageError` (bad URL, missing credentials), is
    not retried: it is a ``shard_unreadable`` Skip at once. Nothing here is fatal: shard
    lists are validated at start (:mod:`trainer.data.shards`), and a shard that breaks
    later must not stop a run, nor every resume of it at the same step.
    """
    grouper, failures = _PairGrouper(url), 0
    while True:
        try:
            fileobj = _open_at(url, offset)
        except StorageError as err:
            yield Skip("shard_unreadable", url, str(err))
            return
        except FileNotFoundError as err:
            yield Skip("shard_unreadable", url, f"not found: {err}")
            return
        except Exception as err:  # noqa: BLE001 - fsspec backends raise many types
            failures += 1
            if failures > retries:
                yield Skip("shard_unreadable", url, f"open failed {failures} times: {err!r}")
                return
            logger.info("retrying %s after open error: %r", url, err)
            _sleep(backoff_s * 2 ** (failures - 1))
            continue
        with fileobj:
            members = iter_tar_members(fileobj, offset, _is_sample_member)
            while True:
                try:
                    member = next(members, None)
                except SkipSample as err:
                    yield from grouper.finish()
                    yield Skip(err.reason, url, err.detail)
                    return
                except Exception as err:  # noqa: BLE001 - I/O error mid-stream: reopen here
                    failures += 1
                    if failures > retries:
                        yield from grouper.finish()
                        yield Skip("shard_unreadable", url, f"read failed at byte {offset} "
                                   f"{failures} times: {err!r}")
                        return
                    logger.info("reopening %s at byte %d after read error: %r", url, offset, err)
                    _sleep(backoff_s * 2 ** (failures - 1))
                    break
                if member is None:
                    yield from grouper.finish()
                    return
                offset = member.next_offset
                yield from grouper.add(member)


# -------------------------------------------------------------------------- one sample


@dataclass
class Sample:
    """One decoded, transformed image with its masks (input frame, not yet padded)."""

    image: np.ndarray  # h×w×3 uint8 RGB
    masks: list[np.ndarray]  # M arrays, h×w bool, all non-empty
    boxes: np.ndarray  # M×4 float32 XYXY pixels (inclusive max), input frame
    input_size: tuple[int, int]  # (h, w)
    original_size: tuple[int, int]  # (H, W) of the JPEG
    image_id: int


def parse_sa1b_json(data: bytes) -> tuple[int, list[dict]]:
    """``(image_id, annotations)`` of an SA-1B per-image JSON, with the fields we use
    (``segmentation.size``, ``segmentation.counts``, ``area``) checked. Raises SkipSample."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise SkipSample("invalid_json", f"not JSON: {err}") from err
    try:
        image_id = int(doc["image"]["image_id"])
        annotations = doc["annotations"]
        if not isinstance(annotations, list):
            raise TypeError("annotations is not a list")
        for ann in annotations:
            seg = ann["segmentation"]
            if len(seg["size"]) != 2 or not isinstance(seg["counts"], (str, list)):
                raise TypeError("segmentation needs size [h, w] and counts")
            int(seg["size"][0]), int(seg["size"][1]), float(ann["area"])
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise SkipSample("invalid_json", f"missing or malformed field: {err!r}") from err
    return image_id, annotations


def sample_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """Per-image generator: reproducible without saving RNG state (resume-safe)."""
    return np.random.default_rng([seed, epoch, image_id & (2**64 - 1)])


def select_annotations(annotations: list[dict], height: int, width: int, max_area_frac: float,
                       max_masks: int, rng: np.random.Generator) -> list[dict]:
    """Drop empty masks and masks with ``area > max_area_frac · H · W`` (no decoding),
    then draw up to ``max_masks`` without replacement, kept in stored order."""
    limit = max_area_frac * height * width
    kept = [a for a in annotations if 0 < float(a["area"]) <= limit]
    if not kept:
        raise SkipSample("no_annotations", f"{len(annotations)} annotations, none with "
                         f"0 < area <= {max_area_frac:g} of the image")
    if len(kept) > max_masks:
        chosen = np.sort(rng.choice(len(kept), size=max_masks, replace=False))
        kept = [kept[i] for i in chosen]
    return kept


def decode_sample(pair: RawPair, cfg: DataConfig, epoch: int) -> Sample:
    """JSON → area filter → mask sampling → JPEG decode → geometry → only the sampled
    RLEs decoded into the input frame → boxes from those masks. Raises SkipSample."""
    image_id, annotations = parse_sa1b_json(pair.json)
    try:
        height, width = jpeg_size(pair.jpg)
    except ValueError as err:
        raise SkipSample("corrupt_jpeg", str(err)) from err
    # Every annotation, not only the sampled ones: a size disagreeing with the image means
    # the JSON belongs to another image (or is broken), whichever masks this epoch draws.
    for ann in annotations:
        if [int(v) for v in ann["segmentation"]["size"]] != [height, width]:
            raise SkipSample("rle_size_mismatch", f"annotation {ann.get('id', '?')}: RLE size "
                             f"{ann['segmentation']['size']} but the JPEG is {height}×{width}")
    rng = sample_rng(cfg.seed, epoch, image_id)
    chosen = select_annotations(annotations, height, width, cfg.max_mask_area_frac,
                                cfg.max_masks_per_image, rng)
    flip = (cfg.lsj or cfg.hflip) and bool(rng.random() < 0.5)
    geo = plan_geometry(height, width, cfg.img_size, rng, cfg.lsj_scale if cfg.lsj else None, flip)
    target = (geo.resized_h, geo.resized_w) if cfg.jpeg_dct_downscale else None
    try:
        pixels = decode_jpeg(pair.jpg, cfg.jpeg_decoder, (height, width), target)
    except ValueError as err:
        raise SkipSample("corrupt_jpeg", str(err)) from err
    image = resize_image(pixels, geo)
    try:
        masks = decode_masks([a["segmentation"] for a in chosen], geo, cfg.mask_decoder)
    except ValueError as err:
        raise SkipSample("invalid_rle", str(err)) from err
    boxes, nonempty = masks_to_boxes(masks)
    if not nonempty.any():
        raise SkipSample("empty_after_transform", f"all {len(masks)} masks empty in the "
                         f"{geo.crop_h}×{geo.crop_w} input")
    masks = [m for m, keep in zip(masks, nonempty) if keep]
    return Sample(image, masks, boxes[nonempty], geo.input_size, (height, width), image_id)


def decode_event(event: RawPair | Skip, url: str, cfg: DataConfig, epoch: int,
                 counts: dict[str, int]) -> tuple[Sample | None, str | None]:
    """One event of :func:`iter_shard` as ``(sample, None)``, or ``(None, reason)`` after
    counting the skip in ``counts`` and warning about it (once per member, :func:`warn_skip`).

    The one place bad data turns into a count, for training and evaluation alike.
    """
    if isinstance(event, Skip):  # from the tar level
        reason, where, detail = event.reason, event.where, event.detail
    else:
        try:
            return decode_sample(event, cfg, epoch), None
        except SkipSample as err:
            reason, where, detail = err.reason, f"{url}:{event.stem}", err.detail
        except Exception as err:  # noqa: BLE001 - one odd sample must not end a long run
            reason, where, detail = "decode_error", f"{url}:{event.stem}", repr(err)
    warn_skip(counts, reason, where, detail)
    return None, reason
