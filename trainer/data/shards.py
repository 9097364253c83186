"""Shard lists: listing and start-up validation, and the order shards are dealt in.

Listing (:func:`list_shards`): a spec is a glob, a ``.txt`` file of URLs or globs, a
comma list, or a list of these. Everything that can be checked before training is
checked here, once, so a bad list fails at start with exit 2 (:class:`ShardListError`,
a ``ConfigError``) instead of at the step that reaches the bad line, on every resume:

- every glob matches at least one file, every ``.txt`` list exists;
- every URL's protocol is known and installed, and its credentials resolve: once per
  distinct protocol, not per URL (1000 ``gs://`` shards cost one credential lookup);
- local and ``memory://`` shards exist (a cheap stat each); for remote stores, the first
  listed URL of each bucket is reachable (one request per bucket, not per shard).

A shard that fails later (deleted, network down) is skipped and counted at run time.

Dealing (:class:`ShardOrder`): one infinite sequence of shard indices, epoch after epoch,
each epoch a permutation of all shards; position ``g`` of the sequence goes to slot
``g % num_slots``, slot ``rank · num_workers + worker``. So any prefix the slots have
consumed evenly reads every shard the same number of times to within one, whatever the
shard count, world size and worker count, and one integer per slot (its turn) is an
exact resumable position. (SA-1B ships as 1000 tars, SAM_RECIPE.md §4, and the paper
trains on 256 GPUs, §1: 1000 shards over 512 slots do not divide, which is where a
per-epoch split per slot read some shards twice as often as others.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np

from trainer.config import ConfigError
from trainer.storage import StorageError, check_protocol, protocol_of, url_to_fs

_GLOB_CHARS = "*?["
_CHEAP_PROTOCOLS = ("file", "local", "memory")  # existence checks cost no network request
_ORDER_STREAM = 0x5348_4152  # "SHAR": keeps shard orders apart from per-image sampling streams


class ShardListError(ConfigError, ValueError):
    """The shard setting cannot be used; the message names the setting and the URL."""


class NoUsableDataError(ConfigError):
    """Every shard of the list was tried and none gave a usable sample (exit 2).

    One line, so it survives torch re-raising it from a DataLoader worker (the same
    type, with the worker's traceback as the single argument): see :meth:`unwrap`.
    """

    @classmethod
    def unwrap(cls, err: NoUsableDataError) -> NoUsableDataError:
        """The original one-line error from one re-raised by a DataLoader worker."""
        lines = str(err).strip().splitlines()
        for line in reversed(lines):
            name, sep, message = line.partition(": ")
            if sep and name.endswith(cls.__name__):
                return cls(message)
        return err


@dataclass(frozen=True)
class ShardEntry:
    """A shard URL and where it came from (for error messages)."""

    url: str
    origin: str  # "" for a URL given directly, "line 3 of gs://b/list.txt" otherwise
    globbed: bool  # found by listing a glob, so known to exist at start


def _where(entry: ShardEntry) -> str:
    return f"{entry.origin}: " if entry.origin else ""


def _expand(url: str, origin: str, setting: str) -> list[ShardEntry]:
    if not any(c in url for c in _GLOB_CHARS):
        return [ShardEntry(url, origin, False)]
    try:
        fs, path = url_to_fs(url)
        matches = sorted(fs.glob(path))
    except Exception as err:  # noqa: BLE001 - fsspec backends raise many types
        raise ShardListError(f"{setting}: {origin + ': ' if origin else ''}cannot list "
                             f"{url!r}: {' '.join(str(err).split())[:300]}") from err
    if not matches:
        raise ShardListError(f"{setting}: {origin + ': ' if origin else ''}{url!r} matched "
                             "no files")
    if protocol_of(url) == "file" and "://" not in url:
        return [ShardEntry(m, origin, True) for m in matches]  # keep plain paths plain
    return [ShardEntry(fs.unstrip_protocol(m), origin, True) for m in matches]


def _read_list(part: str, setting: str) -> list[ShardEntry]:
    try:
        fs, path = url_to_fs(part)
        with fs.open(path, "rb") as fileobj:
            lines = fileobj.read().decode("utf-8").splitlines()
    except FileNotFoundError as err:
        raise ShardListError(f"{setting}: shard list {part!r} not found") from err
    except Exception as err:  # noqa: BLE001 - unreachable bucket, bad credentials, bad bytes
        raise ShardListError(f"{setting}: cannot read shard list {part!r}: "
                             f"{' '.join(str(err).split())[:300]}") from err
    entries: list[ShardEntry] = []
    for number, line in enumerate(lines, 1):
        url = line.split("#", 1)[0].strip()
        if url:
            entries += _expand(url, f"line {number} of {part}", setting)
    return entries


def list_shard_entries(spec: str | Sequence[str], setting: str = "data.shards",
                       validate: bool = True) -> list[ShardEntry]:
    """Expand ``spec`` (see the module docstring) and, with ``validate``, check every
    entry as described there. Raises :class:`ShardListError` naming ``setting``."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    entries: list[ShardEntry] = []
    for part in (p.strip() for item in parts for p in str(item).split(",")):
        if part:
            entries += _read_list(part, setting) if part.endswith(".txt") else _expand(
                part, "", setting)
    if not entries:
        raise ShardListError(f"{setting}: {spec!r} names no shard files")
    if validate:
        validate_shards(entries, setting)
    return entries


def list_shards(spec: str | Sequence[str], setting: str = "data.shards",
                validate: bool = True) -> list[str]:
    """The shard URLs of ``spec``, in listed order (globs sorted); see
    :func:`list_shard_entries`."""
    return [e.url for e in list_shard_entries(spec, setting, validate)]


def validate_shards(entries: Sequence[ShardEntry], setting: str) -> None:
    """Protocol and credentials once per protocol, existence of cheap (local) shards,
    reachability once per remote bucket. Raises :class:`ShardListError`."""
    protocols: dict[str, object] = {}
    buckets: set[tuple[str, str]] = set()
    for entry in entries:
        protocol = protocol_of(entry.url)
        if protocol not in protocols:
            try:
                options = check_protocol(entry.url)  # the one credential lookup
                protocols[protocol] = fsspec.core.url_to_fs(entry.url, **options)[0]
            except (StorageError, ImportError, ValueError) as err:
                raise ShardListError(f"{setting}: {_where(entry)}{err}") from err
        if entry.globbed:
            continue  # just listed, so it exists and its bucket is reachable
        fs = protocols[protocol]
        if protocol in _CHEAP_PROTOCOLS:
            path = url_to_fs(entry.url)[1]
            if not fs.exists(path):  # type: ignore[attr-defined]
                raise ShardListError(f"{setting}: {_where(entry)}{entry.url!r} does not exist")
            if fs.isdir(path):  # type: ignore[attr-defined]
                raise ShardListError(f"{setting}: {_where(entry)}{entry.url!r} is a directory, not a tar "
                                     "shard (use a glob such as dir/sa_*.tar)")
            continue
        bucket = entry.url.split("://", 1)[1].split("/", 1)[0]
        if (protocol, bucket) in buckets:
            continue
        buckets.add((protocol, bucket))
        _check_remote(fs, entry, setting)


def _check_remote(fs: object, entry: ShardEntry, setting: str) -> None:
    try:
        fs.info(entry.url)  # type: ignore[attr-defined]
    except FileNotFoundError as err:
        raise ShardListError(f"{setting}: {_where(entry)}{entry.url!r} does not exist (or "
                             "its bucket is not reachable with these credentials)") from err
    except Exception as err:  # noqa: BLE001 - 401/403/DNS from any backend
        raise ShardListError(f"{setting}: {_where(entry)}cannot reach {entry.url!r}: "
                             f"{' '.join(str(err).split())[:300]}") from err


# --------------------------------------------------------------------------- dealing


def shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool = True,
                num_slots: int = 1) -> list[int]:
    """Shard indices in the order of ``epoch`` (the same on every rank).

    Shuffled: a permutation drawn from ``default_rng([tag, seed, epoch])`` (a SeedSequence
    hash), so different seeds give independent orders, not shifted copies of one
    another (``seed + epoch`` would make seed 1's epoch 0 seed 0's epoch 1).

    Unshuffled: the listed order, rotated by one every ``num_slots / d`` epochs
    (d = gcd(num_shards, num_slots); no rotation when d = 1, e.g. a single slot). Plain
    listed order would let a slot see only the shards at positions ≡ slot (mod d)
    forever; the rotation makes every slot read every shard exactly once in each run of
    ``num_shards`` turns.
    """
    if shuffle:
        return np.random.default_rng([_ORDER_STREAM, seed, epoch]).permutation(num_shards).tolist()
    d = math.gcd(num_shards, num_slots)
    shift = (epoch // (num_slots // d)) % d
    return [(i + shift) % num_shards for i in range(num_shards)]


class ShardOrder:
    """The infinite dealt sequence: which shard a slot reads on its ``turn``-th shard.

    Slot ``s`` of ``num_slots`` reads sequence positions ``s, s + S, s + 2S, ...``; position
    ``g`` is shard ``shard_order(epoch = g // N)[g % N]``. Orders are cached per epoch.
    """

    def __init__(self, num_shards: int, num_slots: int, seed: int, shuffle: bool) -> None:
        assert num_shards > 0 and num_slots > 0
        self.num_shards, self.num_slots, self.seed, self.shuffle = (
            num_shards, num_slots, seed, shuffle)
        self._cache: dict[int, list[int]] = {}

    def locate(self, slot: int, turn: int) -> tuple[int, int]:
        """``(epoch, shard index)`` of ``slot``'s ``turn``-th shard."""
        epoch, i = divmod(slot + turn * self.num_slots, self.num_shards)
        if epoch not in self._cache:
            if len(self._cache) > 4:  # a slot moves forward; old epochs are not needed
                self._cache.pop(min(self._cache))
            self._cache[epoch] = shard_order(self.num_shards, epoch, self.seed, self.shuffle,
                                             self.num_slots)
        return epoch, self._cache[epoch][i]
