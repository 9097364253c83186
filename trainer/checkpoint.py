"""Checkpoints on any fsspec URL (``gs://``, ``s3://``, ``file://``, paths, ``memory://``).

Layout (each key of the state dict given to :meth:`CheckpointManager.save` is one file;
a key without a dot is a ``torch.save`` pickle ``<key>.pt``, a key with a dot such as
``config.toml`` is written verbatim from ``str``/``bytes``)::

    <url>/step-00001200/
        model.pt          model state_dict
        train_state.pt    optimizer, scheduler, scaler, step, data position, RNG states
        config.toml       the resolved config
        COMPLETE          JSON manifest, written last:
                          {"format": 1, "step": 1200, "created": "...",
                           "files": {"model.pt": {"size": N, "sha256": "...", "kind": "torch"}, ...}}

Object stores have no atomic directory rename, so a step dir counts only when its
``COMPLETE`` marker exists and every file it lists exists with the recorded size
(catches interrupted and truncated uploads, checked by listing alone); :meth:`load`
also checks each file's sha256 (catches corrupt bytes of the right size). Local files are
written to a temporary name, fsynced and renamed; GCS/S3 objects appear only when their
upload completes. Unusable step dirs are reported with a WARNING and skipped, falling
back to the previous complete checkpoint.

Saving a step that already has a complete dir never deletes that copy first: the new
files are written under fresh names (``model.pt.<generation>``, recorded as ``"file"`` in
the manifest), the marker is overwritten last (an atomic object/rename), and only then
are the files the new marker does not reference deleted. A process killed anywhere in a
save leaves either the old complete checkpoint or the new one.

When no usable checkpoint is left, :meth:`CheckpointManager.load_latest` starts from
scratch only where a crash can explain it: no step dirs at all, or a single step dir
without a marker (the first save was interrupted). Anything else (several unusable dirs,
a marker whose files fail their checks, complete checkpoints that do not load) raises
:class:`CheckpointError` naming every dir and its problem, unless ``fresh_if_unusable``.

Only rank 0 writes; every rank reads on resume (see :meth:`CheckpointManager.resume`).
Per-rank RNG states: gather :func:`capture_rng_state` from all ranks with
``trainer.dist.all_gather_object`` into ``train_state["rng"]`` and restore entry ``rank``
after resuming with the same world size.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from trainer.storage import join_url, url_to_fs

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")
_CHUNK = 8 << 20  # read/hash granularity; large blocks keep remote reads efficient


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or cannot be loaded."""


class DistOps(Protocol):
    """The collectives :meth:`CheckpointManager.resume` needs (``trainer.dist`` has them)."""

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    def all_agree(self, flag: bool) -> bool: ...


@dataclass(frozen=True)
class SaveInfo:
    """Result of a save: ``seconds`` covers writing and pruning, i.e. the loop's stall."""

    step: int
    url: str
    seconds: float
    num_bytes: int
    written: bool


def step_dirname(step: int) -> str:
    """``step-00001200`` (zero-padded so names sort like steps)."""
    return f"step-{step:08d}"


def _file_name(key: str) -> str:
    name = key if "." in key else f"{key}.pt"
    if "/" in name or name == MARKER or name.startswith("."):
        raise ValueError(f"checkpoint state key {key!r} is not a valid file name")
    return name


def _stored_name(name: str, meta: Mapping[str, Any]) -> str:
    """The file a manifest entry lives in: ``meta["file"]`` (a re-save) or its own name."""
    return str(meta.get("file", name))


def stored_file_url(step_url: str, name: str) -> str:
    """URL of file ``name`` (e.g. ``model.pt``) of the step dir at ``step_url``.

    A re-saved step keeps its files under generation names that only its ``COMPLETE``
    manifest knows (see the module docstring); without a readable marker, ``name`` itself.
    """
    fs, path = url_to_fs(step_url)
    try:
        with fs.open(f"{path.rstrip('/')}/{MARKER}", "rb") as f:
            meta = json.loads(f.read())["files"][name]
        return join_url(step_url, _stored_name(name, meta))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return join_url(step_url, name)


class _HashingWriter:
    """A write-only file wrapper that counts bytes and hashes them on the way through."""

    def __init__(self, f: Any) -> None:
        self.f, self.size, self.sha = f, 0, hashlib.sha256()

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        self.f.write(view)
        return view.nbytes

    def flush(self) -> None:
        self.f.flush()


class CheckpointManager:
    """Save, verify, load, prune and resume step checkpoints under one URL.

    Args:
        url: checkpoint root, e.g. ``gs://bucket/runs/x/checkpoints``.
        keep_last: complete checkpoints kept by :meth:`prune`; 0 keeps all.
        is_main: whether this process writes (rank 0).
        weights_only: passed to ``torch.load``; True refuses arbitrary pickled objects,
            so a tampered checkpoint in a shared bucket cannot run code.
        fresh_if_unusable: when no usable checkpoint is left, start from scratch (the
            user asked for it) instead of raising; see :meth:`load_latest`.
    """

    def __init__(self, url: str, keep_last: int = 3, is_main: bool = True, weights_only: bool = True,
                 fresh_if_unusable: bool = False) -> None:
        if keep_last < 0:
            raise ValueError(f"keep_last: must be >= 0, got {keep_last}")
        self.url = url.rstrip("/")
        self.keep_last = keep_last
        self.is_main = is_main
        self.weights_only = weights_only
        self.fresh_if_unusable = fresh_if_unusable
        self.fs, root = url_to_fs(self.url)
        self.root = root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)

    def step_url(self, step: int) -> str:
        """URL of the step dir for ``step``."""
        return join_url(self.url, step_dirname(step))

    def _path(self, step: int, name: str = "") -> str:
        path = f"{self.root}/{step_dirname(step)}"
        return f"{path}/{name}" if name else path

    # ------------------------------------------------------------------ writing

    def _write(self, path: str, payload: Any) -> dict[str, Any]:
        """Write one file; returns its manifest entry (size, sha256, kind)."""
        kind = "bytes" if isinstance(payload, bytes) else "text" if isinstance(payload, str) else "torch"
        target = f"{path}.tmp-{os.getpid()}" if self._local else path
        with self.fs.open(target, "wb") as f:
            out = _HashingWriter(f)
            if kind == "torch":
                torch.save(payload, out)
            else:
                out.write(payload.encode() if kind == "text" else payload)
            if self._local:  # durable before the rename makes it visible
                f.flush()
                os.fsync(f.fileno())
        if self._local:
            self.fs.mv(target, path)
        return {"size": out.size, "sha256": out.sha.hexdigest(), "kind": kind}

    def _remove(self, step: int) -> None:
        """Delete a step dir, marker first so a half-deleted dir never looks complete."""
        path = self._path(step)
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(path):
            return
        if self.fs.exists(self._path(step, MARKER)):
            self.fs.rm(self._path(step, MARKER))
        self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache(self.root)

    def save(self, step: int, state: Mapping[str, Any]) -> SaveInfo:
        """Write ``state`` as step dir ``step`` (rank 0 only), then prune.

        Other ranks return at once with ``written=False``: the caller barriers after,
        so no rank runs ahead into the next step while rank 0 still writes. A complete
        dir of the same step is replaced without ever being removed first (see the
        module docstring); an incomplete one is leftovers of a crashed save and goes.
        """
        url = self.step_url(step)
        if not self.is_main:
            return SaveInfo(step=step, url=url, seconds=0.0, num_bytes=0, written=False)
        start = time.perf_counter()
        names = {key: _file_name(key) for key in state}  # reject bad keys before deleting
        self.fs.invalidate_cache(self.root)  # another process may have written since
        replacing = self.problem(step) is None  # a missing dir has a problem too: no marker
        suffix = f".{uuid.uuid4().hex[:12]}" if replacing else ""
        if not replacing:
            self._remove(step)  # a stale marker of a crashed save must not survive
        self.fs.makedirs(self._path(step), exist_ok=True)
        files = {}
        for key, value in state.items():
            stored = names[key] + suffix
            files[names[key]] = self._write(self._path(step, stored), value)
            if suffix:
                files[names[key]]["file"] = stored
        manifest = {"format": FORMAT_VERSION, "step": step, "files": files,
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        self._write(self._path(step, MARKER), json.dumps(manifest, indent=1).encode())  # the commit
        if replacing:
            self._remove_unreferenced(step, {_stored_name(n, m) for n, m in files.items()})
        self.fs.invalidate_cache(self.root)
        self.prune()
        seconds = time.perf_counter() - start
        num_bytes = sum(meta["size"] for meta in files.values())
        log.info("saved checkpoint %s (%.1f MB) in %.2f s", url, num_bytes / 1e6, seconds)
        return SaveInfo(step=step, url=url, seconds=seconds, num_bytes=num_bytes, written=True)

    def _remove_unreferenced(self, step: int, keep: set[str]) -> None:
        """Delete the files of step dir ``step`` that its (new) marker does not list."""
        self.fs.invalidate_cache(self._path(step))
        for entry in self.fs.ls(self._path(step), detail=False):
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name != MARKER and name not in keep:
                self.fs.rm(self._path(step, name))

    # ------------------------------------------------------------------ verifying

    def steps(self) -> list[int]:
        """Steps of all step dirs, complete or not, newest first."""
        self.fs.invalidate_cache(self.root)  # another process may have written since
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = {int(m.group(1)) for e in entries
                 if (m := _STEP_RE.match(str(e).rstrip("/").rsplit("/", 1)[-1]))}
        return sorted(found, reverse=True)

    def _manifest(self, step: int) -> dict[str, Any]:
        try:
            with self.fs.open(self._path(step, MARKER), "rb") as f:
                manifest = json.loads(f.read())
            files = manifest["files"]
            if manifest["step"] != step or not all(
                    isinstance(m["size"], int) and m["kind"] in ("torch", "text", "bytes")
                    and "/" not in _stored_name(n, m) for n, m in files.items()):
                raise ValueError("manifest does not describe this step")
        except FileNotFoundError:
            raise CheckpointError("no COMPLETE marker (save interrupted?)") from None
        except NotADirectoryError:
            raise CheckpointError("not a directory") from None
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"unreadable COMPLETE marker: {err}") from err
        return manifest

    def created(self, step: int) -> float | None:
        """Unix time the marker of step ``step`` records, or None when unreadable."""
        try:
            return dt.datetime.fromisoformat(self._manifest(step)["created"]).timestamp()
        except (CheckpointError, KeyError, TypeError, ValueError):
            return None

    def problem(self, step: int) -> str | None:
        """Why step dir ``step`` is unusable (by listing and sizes), or None if complete."""
        try:
            manifest = self._manifest(step)
            sizes = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e.get("size")
                     for e in self.fs.ls(self._path(step), detail=True)}
        except CheckpointError as err:
            return str(err)
        except FileNotFoundError:
            return "step dir vanished"
        except NotADirectoryError:
            return "not a directory"
        for name, meta in manifest["files"].items():
            stored = _stored_name(name, meta)
            if stored not in sizes:
                return f"{stored} is missing"
            if sizes[stored] != meta["size"]:
                return f"{stored} has {sizes[stored]} bytes but COMPLETE records {meta['size']} (truncated?)"
        return None

    def complete_steps(self, warn: bool = True) -> list[int]:
        """Steps of complete checkpoints, newest first; skipped ones logged as WARNING."""
        out = []
        for step in self.steps():
            reason = self.problem(step)
            if reason is None:
                out.append(step)
            elif warn:
                log.warning("skipping checkpoint %s: %s", self.step_url(step), reason)
        return out

    def latest_complete(self) -> int | None:
        """The newest complete step, warning about any newer unusable step dirs."""
        for step in self.steps():
            reason = self.problem(step)
            if reason is None:
                return step
            log.warning("skipping checkpoint %s: %s", self.step_url(step), reason)
        return None

    # ------------------------------------------------------------------ loading

    def _check_hash(self, path: str, meta: Mapping[str, Any]) -> None:
        sha = hashlib.sha256()
        with self.fs.open(path, "rb", block_size=_CHUNK) as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
        if sha.hexdigest() != meta["sha256"]:
            raise CheckpointError(f"{path.rsplit('/', 1)[-1]}: sha256 does not match COMPLETE (corrupt)")

    def load(self, step: int, verify: bool = True) -> dict[str, Any]:
        """Read step ``step`` (tensors on CPU) back into the dict given to :meth:`save`.

        Args:
            verify: also check every file's sha256 (reads each file twice); sizes and the
                marker are always checked.

        Raises:
            CheckpointError: incomplete, truncated, corrupt, or not loadable.
        """
        reason = self.problem(step)
        if reason is not None:
            raise CheckpointError(f"{self.step_url(step)}: {reason}")
        state: dict[str, Any] = {}
        for name, meta in self._manifest(step)["files"].items():
            path = self._path(step, _stored_name(name, meta))
            try:
                if verify:
                    self._check_hash(path, meta)
                with self.fs.open(path, "rb", block_size=_CHUNK) as f:
                    if meta["kind"] == "torch":
                        state[name[: -len(".pt")] if name.endswith(".pt") else name] = torch.load(
                            f, map_location="cpu", weights_only=self.weights_only)
                    else:
                        data = f.read()
                        state[name] = data.decode() if meta["kind"] == "text" else data
            except CheckpointError as err:
                raise CheckpointError(f"{self.step_url(step)}: {err}") from err
            # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...).
            except Exception as err:
                raise CheckpointError(f"{self.step_url(step)}: cannot load {name}: {err!r}") from err
        return state

    def load_latest(self, verify: bool = True) -> tuple[int, dict[str, Any]] | None:
        """``(step, state)`` of the newest loadable checkpoint, or None to start from scratch.

        Unusable checkpoints are logged and skipped in favour of older ones. None means
        there are no step dirs, or only one without a marker (a crash during the very
        first save), or ``fresh_if_unusable`` is set.

        Raises:
            CheckpointError: no checkpoint loads and a crash cannot explain why (complete
                ones that fail to load, several unusable dirs, or a marker whose files
                fail their checks). Starting from scratch then would silently discard the
                run (and pruning and later saves would delete the evidence), so that needs
                a person; the message names every step dir and what is wrong with it.
        """
        problems: dict[int, str | None] = {}
        for step in self.steps():  # newest first
            problems[step] = self.problem(step)
            if problems[step] is not None:
                log.warning("skipping checkpoint %s: %s", self.step_url(step), problems[step])
                continue
            try:
                return step, self.load(step, verify=verify)
            except CheckpointError as err:
                log.warning("checkpoint step %d unusable, falling back to an older one: %s", step, err)
                problems[step] = str(err).removeprefix(f"{self.step_url(step)}: ")
        if not problems:
            return None
        only = next(iter(problems))
        if len(problems) == 1 and not self.fs.exists(self._path(only, MARKER)):
            log.warning("the only step dir %s has no marker (the first save was interrupted): "
                        "starting from step 0", self.step_url(only))
            return None
        listing = "; ".join(f"{step_dirname(s)}: {p}" for s, p in problems.items())
        if self.fresh_if_unusable:
            log.warning("no usable checkpoint under %s (%s); starting from step 0 as asked "
                        "(fresh_if_unusable); those dirs are replaced as the run reaches them", self.url, listing)
            return None
        raise CheckpointError(f"no usable checkpoint under {self.url}, and a crash cannot explain that: "
                              f"{listing}")

    def resume(self, dist_ops: DistOps | None = None) -> tuple[int, dict[str, Any]] | None:
        """Load the same checkpoint on every rank; None on every rank when there is none.

        Rank 0 (``is_main``) picks the newest loadable step (verifying hashes) and
        broadcasts it; the other ranks load that step (sizes checked, no hashing), and all
        ranks agree that every load succeeded. Failures raise on every rank together, so
        no rank hangs in a collective.

        Args:
            dist_ops: collectives; defaults to the ``trainer.dist`` module.
        """
        if dist_ops is None:
            from trainer import dist as dist_ops
        found: tuple[int, dict[str, Any]] | None = None
        decision: Any = None
        if self.is_main:
            try:
                found = self.load_latest()
                decision = found[0] if found else None
            except CheckpointError as err:
                decision = str(err)
        decision = dist_ops.broadcast_object(decision, src=0)
        if isinstance(decision, str):
            raise CheckpointError(decision)
        if decision is None:
            return None
        ok, error = True, ""
        if found is None:
            try:
                found = (decision, self.load(decision, verify=False))
            except CheckpointError as err:
                ok, error = False, str(err)
                log.error("cannot load checkpoint step %d chosen by rank 0: %s", decision, err)
        if not dist_ops.all_agree(ok):
            raise CheckpointError(f"not every rank could load checkpoint step {decision} {error}".strip())
        return found

    # ------------------------------------------------------------------ pruning

    def prune(self) -> list[int]:
        """Delete all but the newest ``keep_last`` complete checkpoints (rank 0 only).

        Incomplete dirs older than the newest complete one go too; the newest complete
        checkpoint is never deleted. Returns the deleted steps.
        """
        if not self.is_main or self.keep_last == 0:
            return []
        steps = self.steps()
        complete = [s for s in steps if self.problem(s) is None]
        if not complete:
            return []
        keep = set(complete[: self.keep_last])
        doomed = [s for s in steps if s not in keep and s < complete[0]]
        for step in doomed:
            self._remove(step)
            log.info("pruned checkpoint %s", self.step_url(step))
        return doomed


# ---------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU and CUDA RNG states (``weights_only``-safe)."""
    algo, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"algo": algo, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states from :func:`capture_rng_state`; CUDA only when the device count matches."""
    random.setstate(state["python"])
    npy = state["numpy"]
    np.random.set_state((npy["algo"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has %d CUDA RNG states, %d devices visible: not restored",
                        len(cuda), torch.cuda.device_count())
