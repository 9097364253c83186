"""SA-1B input pipeline: streamed tar shards → decoded, resized, padded batches.

Entry point: ``build_loader(DataConfig(shards=...), rank, world_size)`` validates the
shard list (:mod:`trainer.data.shards`) and returns an infinite, resumable iterable of
:class:`Batch`. Synthetic SA-1B-format shards for
tests and smoke runs come from :func:`write_synthetic_shards`.
"""

from trainer.data.config import DataConfig
from trainer.data.loader import Batch, SA1BLoader, build_loader, collate
from trainer.data.sa1b import SKIP_REASONS, Sample, SkipSample
from trainer.data.shards import (
    NoUsableDataError,
    ShardListError,
    ShardOrder,
    list_shards,
    shard_order,
)
from trainer.data.transforms import PIXEL_MEAN, PIXEL_STD

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "SKIP_REASONS",
    "Batch",
    "DataConfig",
    "NoUsableDataError",
    "SA1BLoader",
    "Sample",
    "ShardListError",
    "ShardOrder",
    "SkipSample",
    "build_loader",
    "collate",
    "list_shards",
    "shard_order",
    "write_synthetic_shards",
]


def __getattr__(name: str) -> object:
    # Lazy, so `python -m trainer.data.synth` does not import synth twice.
    if name == "write_synthetic_shards":
        from trainer.data.synth import write_synthetic_shards

        return write_synthetic_shards
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
