"""Shard listing, rank/worker sharding, resumable position, batching.

Sharding: every epoch the shard list is shuffled with ``seed + epoch`` (the same on all
ranks), rank ``r`` takes ``shuffled[r::world_size]`` and its worker ``w`` takes every
``num_workers``-th of those. So each shard is read by exactly one (rank, worker) per
epoch. Within a shard, images come in stored order. A worker streams its shards epoch
after epoch forever (training runs by iteration count, and every DDP rank must always
get a batch); batches may span shard and epoch boundaries.

Position: each worker yields whole batches together with its position after that batch
(epoch, index into its shard list, byte offset of the next tar member, cumulative skip
counts). :class:`SA1BLoader` records, per logical worker, the position of the last
batch handed to the caller and which logical worker is next; prefetched batches do
not count. torch's DataLoader takes batches round-robin from workers 0, 1, ...; on
restore, physical worker ``p`` plays logical worker ``(p + next) % num_workers``, so the
resumed stream continues exactly where the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import cv2
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.config import DataConfig
from trainer.data.sa1b import (
    RawPair,
    Sample,
    Skip,
    SkipSample,
    decode_sample,
    iter_shard,
    warn_skip,
)
from trainer.data.transforms import normalize_into
from trainer.storage import open_url, protocol_of, url_to_fs

logger = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_EMPTY_EPOCHS = 2  # a worker that finds no usable sample this often stops training
_GLOB_CHARS = "*?["


# ---------------------------------------------------------------------------- shards


def list_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into URLs.

    ``spec``: a glob (``gs://b/sa_*.tar``, ``/data/*.tar``; matches sorted), a ``.txt``
    file of URLs or globs (one per line, ``#`` comments), a comma-separated list of any
    of these, or a list of them. Raises ValueError if nothing matches.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for part in (p.strip() for item in parts for p in item.split(",")):
        if not part:
            continue
        if part.endswith(".txt"):
            with open_url(part, "rb") as fileobj:
                lines = fileobj.read().decode("utf-8").splitlines()
            for line in lines:
                url = line.split("#", 1)[0].strip()
                if url:
                    urls += _expand_glob(url)
        else:
            urls += _expand_glob(part)
    if not urls:
        raise ValueError(f"DataConfig.shards: {spec!r} matched no shard files")
    return urls


def _expand_glob(url: str) -> list[str]:
    if not any(c in url for c in _GLOB_CHARS):
        return [url]
    fs, path = url_to_fs(url)
    matches = sorted(fs.glob(path))
    if protocol_of(url) == "file" and "://" not in url:
        return matches  # keep plain paths plain
    return [fs.unstrip_protocol(m) for m in matches]


def shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
    """Shard indices in the order of ``epoch`` (same on every rank)."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    return order


def worker_shards(shards: Sequence[str], epoch: int, seed: int, rank: int, world_size: int,
                  worker: int, num_workers: int, shuffle: bool = True) -> list[str]:
    """The shards (rank, worker) reads in ``epoch``, in reading order."""
    order = shard_order(len(shards), epoch, seed, shuffle)
    return [shards[i] for i in order[rank::world_size][worker::num_workers]]


def effective_num_workers(num_shards: int, world_size: int, num_workers: int) -> int:
    """Logical workers per rank: at least 1, at most one per shard of the rank."""
    if num_shards < world_size:
        raise ValueError(f"DataConfig.shards: {num_shards} shards for world_size {world_size}; "
                         "every rank needs at least one shard per epoch")
    return max(1, min(num_workers, num_shards // world_size))


# ----------------------------------------------------------------------------- batch


@dataclass
class Batch:
    """A batch of B images with a variable number of masks each, padded to M.

    All pixel coordinates are in the S×S input frame (resized, padded bottom/right).
    """

    images: torch.Tensor  # B×3×S×S float32, normalized; padding 0
    masks: torch.Tensor  # B×M×S×S bool GT masks; padding False
    boxes: torch.Tensor  # B×M×4 float32 XYXY (x2, y2 inclusive); padding rows 0
    valid: torch.Tensor  # B×M bool, True for real masks
    input_sizes: torch.Tensor  # B×2 int64 (h, w) after resize, before pad
    original_sizes: torch.Tensor  # B×2 int64 (H, W) of the JPEG
    image_ids: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy every tensor to ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copy (DataLoader calls this when ``pin_memory`` is on)."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn: Any) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros; inside a DataLoader worker allocated straight in shared memory, as torch's
    ``default_collate`` does, so the batch (64 MiB of masks per 1024² image) is not
    copied again on its way to the main process (~40% less worker time per batch)."""
    if get_worker_info() is None:
        return torch.zeros(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).resize_(shape).zero_()


def collate(samples: Sequence[Sample], img_size: int) -> Batch:
    """Pad images to ``img_size`` and mask lists to the batch's largest M."""
    num, most = len(samples), max(len(s.masks) for s in samples)
    images = _zeros((num, 3, img_size, img_size), torch.float32)
    masks = _zeros((num, most, img_size, img_size), torch.bool)
    boxes = _zeros((num, most, 4), torch.float32)
    valid = _zeros((num, most), torch.bool)
    for i, sample in enumerate(samples):
        normalize_into(sample.image, images[i])
        h, w = sample.input_size
        for j, mask in enumerate(sample.masks):
            masks[i, j, :h, :w] = torch.from_numpy(mask)
        boxes[i, :len(sample.masks)] = torch.from_numpy(sample.boxes)
        valid[i, :len(sample.masks)] = True
    return Batch(images, masks, boxes, valid,
                 torch.tensor([s.input_size for s in samples], dtype=torch.int64),
                 torch.tensor([s.original_size for s in samples], dtype=torch.int64),
                 [s.image_id for s in samples])


# -------------------------------------------------------------------------- position


def new_position() -> dict[str, Any]:
    """A worker's position at the very start: JSON-able plain values."""
    return {"epoch": 0, "shard_index": 0, "offset": 0, "skips": {}, "shards_failed": []}


def _copy_position(pos: dict[str, Any]) -> dict[str, Any]:
    return {**pos, "skips": dict(pos["skips"]), "shards_failed": list(pos["shards_failed"])}


class _SA1BStream(IterableDataset):
    """Yields ``(batch, position after it, logical worker)`` forever."""

    def __init__(self, cfg: DataConfig, shards: list[str], rank: int, world_size: int,
                 num_logical: int, positions: list[dict[str, Any]], rotation: int) -> None:
        super().__init__()
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.num_logical, self.positions, self.rotation = num_logical, positions, rotation

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, Any], int]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        logical = (physical + self.rotation) % self.num_logical
        return self.iter_logical(logical)

    def iter_logical(self, logical: int) -> Iterator[tuple[Batch, dict[str, Any], int]]:
        cfg, pos = self.cfg, _copy_position(self.positions[logical])
        pending: list[Sample] = []
        empty_epochs = 0
        while True:
            urls = worker_shards(self.shards, pos["epoch"], cfg.seed, self.rank, self.world_size,
                                 logical, self.num_logical, cfg.shuffle_shards)
            produced = False
            while pos["shard_index"] < len(urls):
                url = urls[pos["shard_index"]]
                for event in iter_shard(url, pos["offset"], cfg.shard_open_retries,
                                        cfg.retry_backoff_s):
                    sample = self._decode(event, url, pos)
                    if sample is None:
                        continue
                    produced = True
                    pending.append(sample)
                    pos["offset"] = event.next_offset
                    if len(pending) == cfg.batch_size:
                        yield collate(pending, cfg.img_size), _copy_position(pos), logical
                        pending = []
                pos["shard_index"], pos["offset"] = pos["shard_index"] + 1, 0
            pos["epoch"], pos["shard_index"] = pos["epoch"] + 1, 0
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= MAX_EMPTY_EPOCHS:
                raise RuntimeError(
                    f"rank {self.rank} data worker {logical} read {MAX_EMPTY_EPOCHS} epochs of "
                    f"its shards without one usable sample; skips so far: {pos['skips']}, "
                    f"unreadable shards: {pos['shards_failed'][:5]}")

    def _decode(self, event: RawPair | Skip, url: str, pos: dict[str, Any]) -> Sample | None:
        skips = pos["skips"]
        if isinstance(event, Skip):  # from the tar level
            warn_skip(skips, event.reason, event.where, event.detail)
            if event.reason == "shard_unreadable" and url not in pos["shards_failed"]:
                pos["shards_failed"].append(url)
            return None
        try:
            return decode_sample(event, self.cfg, pos["epoch"])
        except SkipSample as err:
            warn_skip(skips, err.reason, f"{url}:{event.stem}", err.detail)
        except Exception as err:  # noqa: BLE001 - one odd sample must not end a long run
            warn_skip(skips, "decode_error", f"{url}:{event.stem}", repr(err))
        return None


def _passthrough(item: Any) -> Any:
    return item


def _worker_init(worker_id: int) -> None:
    # One OpenCV thread per worker: parallelism comes from the workers themselves.
    cv2.setNumThreads(1)


# ---------------------------------------------------------------------------- loader


class SA1BLoader:
    """Infinite iterable of :class:`Batch` for one rank, with a resumable position.

    Iterating (again) starts from the position of the last batch returned; use one
    iterator at a time. ``state_dict()`` / ``load_state_dict()`` save and restore that
    position as plain JSON-able values.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.shards = list_shards(cfg.shards)
        self.num_logical_workers = effective_num_workers(len(self.shards), world_size,
                                                         cfg.num_workers)
        if cfg.num_workers > self.num_logical_workers:
            logger.warning("data: %d shards over %d ranks: using %d workers per rank, not %d",
                           len(self.shards), world_size, self.num_logical_workers, cfg.num_workers)
        self._positions = [new_position() for _ in range(self.num_logical_workers)]
        self._next_worker = 0

    @property
    def shards_digest(self) -> str:
        """Digest of the shard file names (not their location), to detect list changes."""
        names = "\n".join(os.path.basename(u.rstrip("/")) for u in self.shards)
        return hashlib.sha256(names.encode("utf-8")).hexdigest()[:16]

    def __iter__(self) -> Iterator[Batch]:
        dataset = _SA1BStream(self.cfg, self.shards, self.rank, self.world_size,
                              self.num_logical_workers,
                              [_copy_position(p) for p in self._positions], self._next_worker)
        if self.cfg.num_workers == 0:
            stream: Any = dataset.iter_logical(0)
        else:
            # Forked workers inherit OpenCV's thread-pool state but not its threads: if
            # this process already ran a parallel OpenCV call (e.g. wrote synthetic
            # shards), the first one in a worker waits forever. One thread here before
            # forking keeps workers off the pool. (A forkserver would avoid it too, but
            # workers would then miss memory:// data and later environment changes.)
            cv2.setNumThreads(1)
            stream = DataLoader(
                dataset, batch_size=None, num_workers=self.num_logical_workers,
                collate_fn=_passthrough, worker_init_fn=_worker_init,
                prefetch_factor=self.cfg.prefetch_factor,
                pin_memory=self.cfg.pin_memory and torch.cuda.is_available())
        for batch, position, logical in stream:
            self._positions[logical] = position
            self._next_worker = (logical + 1) % self.num_logical_workers
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch returned (plain JSON-able values)."""
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_logical_workers, "seed": self.cfg.seed,
                "num_shards": len(self.shards), "shards_digest": self.shards_digest,
                "next_worker": self._next_worker,
                "workers": [_copy_position(p) for p in self._positions]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` with the same shards, seed,
        rank, world size and worker count; the next iterator resumes from it."""
        expected = {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                    "num_workers": self.num_logical_workers, "seed": self.cfg.seed,
                    "num_shards": len(self.shards), "shards_digest": self.shards_digest}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"data state has {key}={state.get(key)!r}, this loader has "
                                 f"{value!r}; the data position cannot be restored")
        workers = state["workers"]
        if len(workers) != self.num_logical_workers:
            raise ValueError(f"data state has {len(workers)} worker positions, expected "
                             f"{self.num_logical_workers}")
        self._positions = [_copy_position({**new_position(), **p}) for p in workers]
        self._next_worker = int(state["next_worker"]) % self.num_logical_workers

    def skip_counts(self) -> dict[str, int]:
        """Skipped items by reason (see trainer.data.sa1b), summed over workers, up to the
        last batch returned."""
        total: dict[str, int] = {}
        for pos in self._positions:
            for reason, count in pos["skips"].items():
                total[reason] = total.get(reason, 0) + count
        return dict(sorted(total.items()))

    @property
    def shards_failed(self) -> list[str]:
        """Shards skipped as unreadable so far (up to the last batch returned)."""
        return sorted({url for pos in self._positions for url in pos["shards_failed"]})


def build_loader(cfg: DataConfig, rank: int, world_size: int) -> SA1BLoader:
    """The SA-1B batch stream of ``rank`` out of ``world_size`` (lists shards up front,
    so missing credentials or an empty glob fail here, not in a worker)."""
    return SA1BLoader(cfg, rank, world_size)
