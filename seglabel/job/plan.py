"""From a job's config to a plan of work; no Ray.

    the model (checkpoint, task, labels, licence: refused before anything is read)
    → the work (enumeration against what the output holds: what is done, repeated or
      colliding; the to-do lists)

The output's own state (new, resumed, overwritten) is :mod:`seglabel.job.lifecycle`'s.

The to-do lists are Parquet files in the output's scratch space that the workers read, each
row with its index in this run's to-do order; the driver never holds more than one file's rows.
"""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import split_protocol

from ..core.config import JobConfig
from ..core.errors import ConfigError
from ..core.keys import HashSet, SortedHashes, key_hashes
from ..core.redaction import get_logger, redact_url, url_identity
from ..engine.checkpoint import FAMILIES
from ..engine.resolve import ResolvedCheckpoint, resolve_checkpoint
from ..inputs.listing import is_under, iter_listing
from ..inputs.manifest import iter_manifest
from ..inputs.refs import ImageRef
from ..outputs.contract import SCRATCH_DIR
from ..outputs.store import OutputStore
from ..storage.filesystem import absolute_local, absolute_model

log = get_logger(__name__)

TODO_ROWS_PER_FILE = 100_000
# Refs hashed and classified at a time while enumerating (vectorised lookups, bounded memory).
ENUMERATION_BATCH = 8192


# -- the model ----------------------------------------------------------------------------------


def resolve_model(config: JobConfig) -> ResolvedCheckpoint:
    """The config's checkpoint, read and checked, with its licence: a checkpoint that cannot be
    used, a licence not allowed, settings it cannot take and labels it does not have are each a
    one-line refusal here, before anything is read or written."""
    return resolve_checkpoint(config.engine, config.require_license, read_license=True)


def announce(checkpoint: ResolvedCheckpoint) -> None:
    """The run's first lines, once its checkpoint, settings and input are known to be usable."""
    model, license = checkpoint.model, checkpoint.license
    log.info("checkpoint %s: %s, licence %s", model, FAMILIES[checkpoint.family], license)
    if license is not None and license.noncommercial:
        log.warning("checkpoint %s is licensed %s: its weights may not be used commercially", model,
                    license.id)


def absolute_paths(config: JobConfig) -> JobConfig:
    """The config with its local paths absolute: they are resolved here, in the driver, since a
    Ray worker's working directory is not the driver's."""
    changes: dict[str, Any] = {
        name: absolute_local(getattr(config, name))
        for name in ("input", "manifest", "output")
        if getattr(config, name)
    }
    model = absolute_model(config.engine.model)
    if model != config.engine.model:
        changes["engine"] = config.engine.replace(model=model)
    return config.replace(**changes)


# -- the work -----------------------------------------------------------------------------------


def input_refs(config: JobConfig) -> Iterator[ImageRef]:
    """The input's images, lazily; a missing input fails here, at the first one, before anything
    is written."""
    if config.manifest:
        refs = iter_manifest(config.manifest, storage_options=config.input_storage_options)
    else:
        refs = iter_listing(config.input, storage_options=config.input_storage_options,
                            extensions=config.extensions, exclude=output_places(config.input, config.output))
    first = next(refs, None)
    return itertools.chain([first], refs) if first is not None else iter(())


def output_places(input: str, output: str) -> list[str]:
    """The output as a listing of ``input`` may meet it, so that its masks are never listed as
    images: as given, and, for local folders, as its real path and as seen through the input
    (a symlink either way round). An input inside the output (or the output itself, through a
    symlink) is refused."""
    def inside(path: str, folder: str) -> bool:
        return is_under(path.rstrip("/"), [folder.rstrip("/")])

    local = split_protocol(input)[0] is None and split_protocol(output)[0] is None
    one_file = local and os.path.isfile(input)  # a single image labeled into its own folder is fine
    if inside(input, output) and not one_file:
        raise ConfigError(f"the input {redact_url(input)} is inside the output {redact_url(output)}: "
                          "choose an output outside the input's folder")
    places = [output]
    if local:
        real_in, real_out = os.path.realpath(input), os.path.realpath(output)
        if inside(real_in, real_out) and not one_file:
            raise ConfigError(f"the input {input} is the output {output}, or inside it, through a symlink "
                              f"({real_in} in {real_out}): choose an output outside the input's folder")
        places.append(real_out)
        if inside(real_out, real_in):
            places.append(os.path.join(input, os.path.relpath(real_out, real_in)))
    return places


@dataclass
class Tally:
    """What an enumeration met: distinct images, those already done, those to do (before any
    --limit), and repeated keys (counted once in the others)."""

    found: int = 0
    already_done: int = 0
    todo: int = 0
    repeats: int = 0


@dataclass(frozen=True)
class Work:
    """What this run is to do: its to-do files (``todo`` rows, indexed 0..todo-1) and the
    counts its summary reports."""

    run_id: str
    todo_paths: tuple[str, ...]
    todo: int
    found: int
    already_done: int
    held_back: int  # to do, but left for a later run by --limit

    @property
    def scratch(self) -> str:
        """This run's folder in the output's scratch space (relative to the output)."""
        return f"{SCRATCH_DIR}/todo-{self.run_id}"


def plan_work(store: OutputStore, config: JobConfig, refs: Iterator[ImageRef], resuming: bool) -> Work:
    """Enumerate the input against what the output holds and stage the to-do lists (a dry run
    only counts). ``resuming``: the output's committed rows count as done."""
    done = store.done_keys(include_errors=not config.retry_errors) if resuming else SortedHashes()
    tally = Tally()
    new = new_refs(refs, done, tally, dedupe=bool(config.manifest))
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    if config.dry_run:
        for _ in new:
            pass
        paths, todo = [], tally.todo
    else:
        paths, todo = stage_todo(store, new, config.limit, run_id)
    if tally.repeats:
        log.info("%d entries repeated an image already listed: each image counts once", tally.repeats)
    # _SUCCESS says every input image has a row: not so while --limit holds some back.
    return Work(run_id, tuple(paths), todo, tally.found, tally.already_done, tally.todo - todo)


# What the enumeration makes of a ref.
TODO, DONE, REPEAT = 0, 1, 2


def new_refs(refs: Iterator[ImageRef], done: SortedHashes, tally: Tally, dedupe: bool) -> Iterator[ImageRef]:
    """The refs without a committed row, in order, each key once; counts into ``tally``.

    Keys are handled as 64-bit hashes, a batch at a time: a done key is found by binary search
    in ``done`` and remembered in one bit, so that a repeat of it is told from its first
    appearance; with ``dedupe`` (a manifest may list an image twice; a listing never does) the
    other keys go into a growing hash set. Nothing is held per key beyond that: an output whose
    images are all done costs its done set and a bit a key.

    A manifest's keys drop the scheme, so ``s3://b/x.jpg`` and ``gs://b/x.jpg`` share a key: the
    later one is not a repeat but another image, and becomes an error row
    (``key: collides with …``) keyed by its full URI (:class:`Collisions`).
    """
    refs = iter(refs)  # islice on a list would start again at every batch
    seen = HashSet() if dedupe else None
    collisions = Collisions() if dedupe else None
    while True:
        batch = list(itertools.islice(refs, ENUMERATION_BATCH))
        if not batch:
            return
        hashes = key_hashes([r.key for r in batch])
        state = np.full(len(batch), TODO, dtype=np.int8)
        if len(done):
            index = done.find(hashes)
            member = np.flatnonzero(index >= 0)
            state[member] = np.where(done.first_visits(index[member]), DONE, REPEAT)
        if seen is not None:
            rest = np.flatnonzero(state == TODO)
            state[rest[~seen.add_new(hashes[rest])]] = REPEAT
        if collisions is not None:
            for i, ref in collisions.check(batch, hashes, state):
                state[i] = _classify(ref, done, seen)
                batch[i] = ref
        tally.already_done += int((state == DONE).sum())
        tally.repeats += int((state == REPEAT).sum())
        tally.todo += int((state == TODO).sum())
        tally.found = tally.already_done + tally.todo
        yield from itertools.compress(batch, (state == TODO).tolist())


def _classify(ref: ImageRef, done: SortedHashes, seen: HashSet) -> int:
    """A colliding entry under its own key: done in an earlier run, repeated, or to do (as an
    error row)."""
    h = key_hashes([ref.key])
    index = done.find(h)
    if index[0] >= 0:
        return DONE if done.first_visits(index)[0] else REPEAT
    return TODO if seen.add_new(h)[0] else REPEAT


class Collisions:
    """Tells a manifest's repeated entry from another URI with the same key (another scheme).

    Costs nothing per key while every entry is the run's first scheme followed by its key (the
    usual manifest): a key's first entry in another form (another scheme, an http query) is
    remembered as two 64-bit hashes (its key's and its URI's), so that a later entry with that
    key is a repeat only if its URI is the same.
    """

    def __init__(self) -> None:
        self.usual: str | None = None  # the scheme part of the run's first URI ("s3://")
        self.other_keys = HashSet()
        self.other_uris = HashSet()
        self.mixed = False  # whether any key was first met with another scheme

    def check(self, batch: list[ImageRef], hashes: np.ndarray, state: np.ndarray):
        """Yield (position, error ref) for each entry of ``batch`` that collides; ``state``
        says which entries are first visits of their key and which repeat one. A batch's
        lookups are one vectorised call per set; only this batch's additions are Python sets."""
        if self.usual is None and batch:
            first = batch[0]
            # An http(s) URL with a query is longer than its scheme and key: never "usual".
            self.usual = first.uri[: len(first.uri) - len(first.key)] if first.uri.endswith(first.key) else (
                first.uri.partition("://")[0] + "://")
        unusual = {i for i, ref in enumerate(batch) if ref.uri != self.usual + ref.key}
        if not unusual and not self.mixed:
            return  # the fast path: nothing to tell apart
        self.mixed = True
        look = sorted(unusual | set(np.flatnonzero(state == REPEAT).tolist()))
        key_h = hashes[look]
        uri_h = key_hashes([url_identity(batch[i].uri) for i in look])
        known_keys, known_uris = self.other_keys.contains(key_h), self.other_uris.contains(uri_h)
        new_keys: set[int] = set()
        new_uris: set[int] = set()
        for j, i in enumerate(look):
            h, u = int(key_h[j]), int(uri_h[j])
            if state[i] != REPEAT:  # a key's first entry: remembered if not in the usual form
                if i in unusual:
                    new_keys.add(h)
                    new_uris.add(u)
                continue
            other_first = bool(known_keys[j]) or h in new_keys
            if i not in unusual:
                if other_first:
                    yield i, _collision(batch[i], "an earlier entry")
            elif not (known_uris[j] or u in new_uris):
                earlier = "an earlier entry" if other_first else self.usual + batch[i].key
                yield i, _collision(batch[i], earlier)
        self.other_keys.add_new(np.fromiter(new_keys, dtype=np.uint64, count=len(new_keys)))
        self.other_uris.add_new(np.fromiter(new_uris, dtype=np.uint64, count=len(new_uris)))


def _collision(ref: ImageRef, earlier: str) -> ImageRef:
    """The error ref of an entry whose key an earlier entry has: keyed by its URI, as recorded."""
    return ImageRef(redact_url(ref.uri), ref.uri, f"key: collides with {redact_url(earlier)}")


def stage_todo(store: OutputStore, refs: Iterator[ImageRef], limit: int | None,
               run_id: str) -> tuple[list[str], int]:
    """Write the images still to do as Parquet files the workers read, each row with its index
    in the todo order; returns their paths and the number of rows. Holds one file's rows."""
    paths: list[str] = []
    todo = 0
    buffer: list[ImageRef] = []

    def flush() -> None:
        if buffer:
            table = pa.table({
                "index": pa.array(range(todo - len(buffer), todo), pa.int64()),
                "key": [r.key for r in buffer],
                "uri": [r.uri for r in buffer],
                "error": pa.array([r.error for r in buffer], pa.string()),
            })
            rel = f"{SCRATCH_DIR}/todo-{run_id}/todo-{len(paths):05d}.parquet"
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            store.write_bytes(rel, sink.getvalue().to_pybytes())
            paths.append(store.path(rel))
            buffer.clear()

    for ref in refs:
        if limit is not None and todo >= limit:
            continue  # counted all the same: the summary says how many are found
        buffer.append(ref)
        todo += 1
        if len(buffer) >= TODO_ROWS_PER_FILE:
            flush()
    flush()
    return paths, todo
