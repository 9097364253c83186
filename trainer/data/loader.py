"""Dealing shards to (rank, worker) slots, resumable position, batching.

Sharding (:class:`trainer.data.shards.ShardOrder`): one infinite sequence of shard
indices, each epoch a seeded permutation of all shards (the same on every rank), dealt
round-robin to all ``world_size × num_workers`` slots; slot ``rank · num_workers +
worker`` reads positions ``slot, slot + S, slot + 2S, ...``. So every shard is read the
same number of times to within one over a run, for any shard count, world size and
worker count, as long as the slots advance through the sequence together, i.e. when
shards hold equally many images (SA-1B's tars nearly do; with very unequal shards the
spread grows by the slots' lag) (a per-(rank, worker) split of each epoch would read some shards 2-4× as
often when the count does not divide). Fewer shards than slots is allowed: a shard is
then read by several slots in the same round, in different epochs. Within a shard,
images come in stored order; a worker streams forever (training runs by iteration
count, and every DDP rank must always get a batch); batches may span shards and epochs.

Bad data (:mod:`trainer.data.sa1b`) is skipped and counted. Training stops for bad data
only when no rank can produce a sample: a slot sees every shard of the list over time,
and it raises :class:`~trainer.data.shards.NoUsableDataError` (a ``ConfigError``: exit
2) only once it has read every distinct shard of the list, since its last usable sample,
without one usable sample; the message names the shards and why each gave nothing. A
slot that merely passes through bad shards keeps going.

Position: each worker yields whole batches together with its position after that batch
(its turn in the dealt sequence, byte offset of the next tar member in that shard,
cumulative skip counts). :class:`SA1BLoader` records, per logical worker, the position of
the last batch handed to the caller and which logical worker is next; prefetched batches
do not count. torch's DataLoader takes batches round-robin from workers 0, 1, ...; on
restore, physical worker ``p`` plays logical worker ``(p + next) % num_workers``, so the
resumed stream continues exactly where the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import cv2
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.config import DataConfig
from trainer.data.sa1b import (
    SHARD_FAILURES,
    SKIP_REASONS,
    RawPair,
    Sample,
    Skip,
    decode_event,
    iter_shard,
)
from trainer.data.shards import NoUsableDataError, ShardOrder, list_shards
from trainer.data.transforms import normalize_into

logger = logging.getLogger(__name__)

#: 2: position is the slot's turn in the round-robin sequence (1 was epoch + shard index).
STATE_VERSION = 2


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
    return {"turn": 0, "offset": 0, "skips": {}, "shards_failed": []}


def _copy_position(pos: dict[str, Any]) -> dict[str, Any]:
    return {**pos, "skips": dict(pos["skips"]), "shards_failed": list(pos["shards_failed"])}


def _why_empty(skips: dict[str, int]) -> str:
    """Why one shard gave no usable sample, from its skip counts."""
    if not skips:
        return "no sa_<id>.jpg/.json pairs"
    return ", ".join(f"{reason}×{n}" if n > 1 else reason for reason, n in sorted(skips.items()))


def no_usable_data_message(setting: str, shards: Sequence[str], why: dict[int, str],
                           where: str) -> str:
    """One line naming up to 5 shards that gave nothing, why, and how many in all."""
    listed = "; ".join(f"{shards[i]} ({why[i]})" for i in sorted(why)[:5])
    more = f"; and {len(why) - 5} more" if len(why) > 5 else ""
    return (f"{setting}: none of the {len(shards)} shards gives a usable sample ({where} "
            f"read every one): {listed}{more}")


class _SA1BStream(IterableDataset):
    """Yields ``(batch, position after it, logical worker)`` forever."""

    def __init__(self, cfg: DataConfig, shards: list[str], rank: int, world_size: int,
                 num_logical: int, positions: list[dict[str, Any]], rotation: int,
                 setting: str) -> None:
        super().__init__()
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.num_logical, self.positions, self.rotation = num_logical, positions, rotation
        self.setting = setting
        self.order = ShardOrder(len(shards), world_size * num_logical, cfg.seed,
                                cfg.shuffle_shards)

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, Any], int]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        logical = (physical + self.rotation) % self.num_logical
        return self.iter_logical(logical)

    def iter_logical(self, logical: int) -> Iterator[tuple[Batch, dict[str, Any], int]]:
        cfg, pos = self.cfg, _copy_position(self.positions[logical])
        slot = self.rank * self.num_logical + logical
        pending: list[Sample] = []
        fruitless: dict[int, str] = {}  # shards read whole since the last usable sample
        while True:
            epoch, index = self.order.locate(slot, pos["turn"])
            url, shard_skips = self.shards[index], {}
            # Only a whole reading proves a shard sample-less (a resumed one began mid-way).
            whole, produced = pos["offset"] == 0, False
            for event in iter_shard(url, pos["offset"], cfg.shard_open_retries,
                                    cfg.retry_backoff_s):
                sample = self._decode(event, url, epoch, pos, shard_skips)
                if sample is None:
                    continue
                produced = True
                fruitless.clear()
                pending.append(sample)
                pos["offset"] = event.next_offset
                if len(pending) == cfg.batch_size:
                    yield collate(pending, cfg.img_size), _copy_position(pos), logical
                    pending = []
            pos["turn"], pos["offset"] = pos["turn"] + 1, 0
            if whole and not produced:
                fruitless[index] = _why_empty(shard_skips)
            if len(fruitless) == len(self.shards):
                where = f"rank {self.rank} data worker {logical}"
                raise NoUsableDataError(no_usable_data_message(self.setting, self.shards,
                                                               fruitless, where))

    def _decode(self, event: RawPair | Skip, url: str, epoch: int, pos: dict[str, Any],
                shard_skips: dict[str, int]) -> Sample | None:
        """The sample of ``event``, or None after counting the skip in ``pos`` and in
        ``shard_skips`` (this reading of the shard)."""
        sample, reason = decode_event(event, url, self.cfg, epoch, pos["skips"])
        if reason is not None:
            shard_skips[reason] = shard_skips.get(reason, 0) + 1
            if reason in SHARD_FAILURES and url not in pos["shards_failed"]:
                pos["shards_failed"].append(url)
        return sample


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
    position as plain JSON-able values. ``setting`` names the config key the shards came
    from (``data.shards``, ``eval.shards``) in start-up and no-usable-data errors.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int,
                 setting: str = "data.shards") -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size, self.setting = cfg, rank, world_size, setting
        self.shards = list_shards(cfg.shards, setting)
        self.num_logical_workers = max(1, cfg.num_workers)
        slots = world_size * self.num_logical_workers
        if len(self.shards) < slots:
            logger.warning("data: %d shards for %d (rank, worker) slots: some shards are read by "
                           "several slots in the same round", len(self.shards), slots)
        self._positions = [new_position() for _ in range(self.num_logical_workers)]
        self._next_worker = 0

    @property
    def shards_digest(self) -> str:
        """Digest of the shard file names (not their location), to detect list changes."""
        names = "\n".join(os.path.basename(u.rstrip("/")) for u in self.shards)
        return hashlib.sha256(names.encode("utf-8")).hexdigest()[:16]

    def _stream(self) -> Iterator[tuple[Batch, dict[str, Any], int]]:
        dataset = _SA1BStream(self.cfg, self.shards, self.rank, self.world_size,
                              self.num_logical_workers,
                              [_copy_position(p) for p in self._positions], self._next_worker,
                              self.setting)
        if self.cfg.num_workers == 0:
            return dataset.iter_logical(0)
        # Forked workers inherit OpenCV's thread-pool state but not its threads: if this
        # process already ran a parallel OpenCV call (e.g. wrote synthetic shards), the
        # first one in a worker waits forever. One thread here before forking keeps
        # workers off the pool. (A forkserver would avoid it too, but workers would then
        # miss memory:// data and later environment changes.)
        cv2.setNumThreads(1)
        return iter(DataLoader(
            dataset, batch_size=None, num_workers=self.num_logical_workers,
            collate_fn=_passthrough, worker_init_fn=_worker_init,
            prefetch_factor=self.cfg.prefetch_factor,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available()))

    def __iter__(self) -> Iterator[Batch]:
        stream = self._stream()
        while True:
            try:
                batch, position, logical = next(stream)
            except NoUsableDataError as err:
                # From a worker, torch re-raises it with the worker's traceback as the
                # message; the entry point prints the message: keep it one line.
                raise NoUsableDataError.unwrap(err) from None
            self._positions[logical] = position
            self._next_worker = (logical + 1) % self.num_logical_workers
            yield batch

    def _identity(self) -> dict[str, Any]:
        """What a saved position is only valid for."""
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_logical_workers, "seed": self.cfg.seed,
                "shuffle_shards": self.cfg.shuffle_shards, "num_shards": len(self.shards),
                "shards_digest": self.shards_digest}

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch returned (plain JSON-able values)."""
        return {**self._identity(), "next_worker": self._next_worker,
                "workers": [_copy_position(p) for p in self._positions]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` with the same shards, seed,
        rank, world size and worker count; the next iterator resumes from it.

        Raises ValueError if ``state`` does not fit this loader (another setup, or an
        older ``STATE_VERSION``); the caller then restarts the data order.
        """
        for key, value in self._identity().items():
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
        """THIS rank's skipped items by reason, summed over its workers, up to the last
        batch returned: every name of SKIP_REASONS, 0 when none (summing across ranks is
        the caller's job)."""
        total = dict.fromkeys(SKIP_REASONS, 0)
        for pos in self._positions:
            for reason, count in pos["skips"].items():
                total[reason] = total.get(reason, 0) + count
        return total

    @property
    def shards_failed(self) -> list[str]:
        """Shards of which nothing could be read (``not_a_tar``, ``shard_unreadable``),
        so far (up to the last batch returned)."""
        return sorted({url for pos in self._positions for url in pos["shards_failed"]})


def build_loader(cfg: DataConfig, rank: int, world_size: int,
                 setting: str = "data.shards") -> SA1BLoader:
    """The SA-1B batch stream of ``rank`` out of ``world_size``. Lists and validates the
    shards up front (:mod:`trainer.data.shards`), so a bad list fails here with a
    ``ConfigError`` naming ``setting`` (exit 2), not in a worker mid-run."""
    return SA1BLoader(cfg, rank, world_size, setting)
