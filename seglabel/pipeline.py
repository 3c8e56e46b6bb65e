"""The labeling job: the stages wired together with Ray Data.

    enumerate (driver) → todo list in the output's scratch space
    → read + decode (CPU tasks) → Segmenter (one actor per GPU, one model load each, two
      batches in it at once)
    → encode + write PNGs (CPU tasks) → metadata parts committed by the driver → _SUCCESS

Ray appears only in this module. Ray Data streams blocks between the stages with backpressure,
so a slow stage holds the others back instead of filling memory; the driver holds one part's
rows at a time and commits them as one Parquet file.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .checkpoint import FAMILIES, check_family_settings, detect_task, inspect_checkpoint
from .cluster import connect
from .config import ConfigError, EngineConfig, JobConfig, default_dtype
from .encode import ALIGN, RawPrediction, build_segments, encode_png
from .errors import SeglabelError, get_logger, reason, redact_url, url_identity
from .fetch import fetch, options_for
from .keys import Bits, HashSet, SortedHashes, is_safe_key, key_hashes
from .labels import resolve_labels, thing_ids
from .ledger import MAX_ATTEMPTS, AttemptLedger
from .license import License, check_allowed, checkpoint_license
from .sink import JOB_FILE, SCHEMA, SCRATCH_DIR, SUCCESS_FILE, OutputStore
from .sources import ImageRef, iter_listing, iter_manifest
from .storage import absolute_local

log = get_logger(__name__)

TODO_ROWS_PER_FILE = 100_000
# Refs hashed and classified at a time while enumerating (vectorised lookups, bounded memory).
ENUMERATION_BATCH = 8192
# A part is committed once it holds --rows-per-part rows or this many bytes of rows, whichever
# comes first: rows of large photos with many instances carry megabytes of RLE each.
PART_MAX_BYTES = 64 << 20
# At most a whole core for a decode or encode task (_task_cpus): at a quarter core each, four
# tasks shared a core and each spent 3x the CPU time per image on the same work (36.7 against
# 11.7 ms an image to encode; bench/README.md, "Plumbing").
TASK_CPUS = 1
# The stand-in model (--stand-in) costs nothing but its actor's host work: a whole core
# reserved for it would sit idle and hide the pipeline's own cost.
STAND_IN_CPUS = 0.25
# Rows per block between the stages (fewer on a small job, never less than a model batch; see
# _block_rows): a decode or an encode task takes one block in one call. Each task pays a fixed
# hand-over of ~0.1 s (Ray Data's executor looks for finished tasks every 0.1 s), which a
# 32-row encode task (0.17 s of work on the 2-core bench machine) could not hide: 128 rows ran
# 1.2-1.5x faster steady there, and the driver spent a third to a half less CPU
# (bench/README.md, "Plumbing").
# Ray Data still hands the Segmenter calls of a model batch; the decode stage cuts its blocks
# at DECODE_HELD_BYTES of pixels, and the encode stage reads its block where it lies.
BLOCK_ROWS = 128
# Decoded pixels a decode worker holds before it hands them on (one image may exceed it; its
# own size is bounded by --max-pixels).
DECODE_HELD_BYTES = 256 << 20
# Start the model only once every Segmenter actor has loaded it (so that the first one does not
# take all the early work), and fail with a clear error when the cluster cannot place them.
ACTOR_START_TIMEOUT_S = 1800
# A fraction given as --max-errors is judged only once this many images have been seen, so
# that one bad image among the first few does not stop a job.
MAX_ERRORS_MIN_SEEN = 100


class JobError(SeglabelError, RuntimeError):
    """The job stopped on purpose (e.g. too many errors); the message is one readable line."""

    exit_status = 1


@dataclass
class Summary:
    """What a run did, and the state of the output afterwards."""

    output: str
    task: str
    model: str
    found: int = 0
    already_done: int = 0
    held_back: int = 0  # to do, but left for a later run by --limit
    processed: int = 0
    ok: int = 0
    error: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    actors: dict[str, int] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    # CPU seconds by stage over the run (Ray Data's per-operator CPU; the driver's own).
    stage_cpu_s: dict[str, float] = field(default_factory=dict)
    # The checkpoint's licence, as read before the run (None: the summary of another tool).
    license: License | None = None

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        """A one-screen summary for people."""
        if self.dry_run:
            return (
                f"dry run: {self.found} images found, {self.already_done} already labeled, "
                f"{self.found - self.already_done} to do; output {self.output}"
            )
        if self.found == 0:
            return f"no images found; wrote an empty result to {self.output}"
        lines = []
        if self.processed == 0 and self.held_back:
            lines.append(f"labeled nothing (--limit); {self.already_done} images already have rows")
        elif self.processed == 0:
            lines.append(f"nothing to do: all {self.already_done} images already have rows in {self.output}")
        else:
            lines.append(
                f"labeled {self.processed} images ({self.ok} ok, {self.error} failed) "
                f"in {self.seconds:.1f} s, "
                f"{self.images_per_second:.1f} images/s"
            )
            if self.already_done:
                lines.append(f"skipped {self.already_done} images already labeled")
        if self.held_back:
            lines.append(f"left {self.held_back} images for a later run (--limit): the output is incomplete")
        if self.totals:
            lines.append(
                f"output now holds {self.totals.get('total', 0)} rows: {self.totals.get('ok', 0)} ok, "
                f"{self.totals.get('error', 0)} errors"
            )
            for reason, count in self.totals.get("errors_by_reason", {}).items():
                lines.append(f"  {count:>8}  {reason}")
        lines.append(
            f"masks: {self.output.rstrip('/')}/masks/  metadata: {self.output.rstrip('/')}/metadata/"
        )
        if self.license is not None:
            lines.append(f"checkpoint licence: {self.license}")
        return "\n".join(lines)


# -- stages as Ray Data batch functions ---------------------------------------------------------


def _read_todo(batch: pa.Table, store: OutputStore) -> pa.Table:
    return pa.concat_tables([store.read_parquet(p) for p in batch.column("path").to_pylist()])


def _error(value: Any) -> str | None:
    """An error cell as it travels between stages: "" (not None, which Ray may turn into a
    float NaN when a whole column is empty) means no error."""
    return value if isinstance(value, str) and value else None


_ONE_AT_A_TIME = threading.Lock()


def _bounded(ledger: Any, stage: str, indices: np.ndarray, run: Callable[[list[int]], Iterable]) -> Iterator:
    """``run(positions)``'s results for a batch's rows, in order, as they come; an image that
    kills its worker ``MAX_ATTEMPTS`` times gets ``"<stage>: worker died"`` instead of another
    execution.

    A batch runs whole the first time. Run again (its worker died: Ray retries the task), it
    goes one image at a time, each counted in the ledger, so that the image that kills the
    worker is the only one whose count grows, and the others of its batch are labeled.
    """
    if ledger is None:
        yield from run(list(range(len(indices))))
        return
    rows = [int(i) for i in indices]
    if not any(_ledger_call(ledger.begin, stage, rows)):
        yield from run(list(range(len(rows))))
    else:
        log.warning("%s: a worker died on a batch of %d images; running them one at a time", stage, len(rows))
        for position, row in enumerate(rows):
            # One image at a time in this process, whichever thread runs it (the Segmenter actor
            # runs two calls): a death is charged to the image that was running, no other.
            with _ONE_AT_A_TIME:
                if _ledger_call(ledger.begin, f"{stage}/1", [row])[0] >= MAX_ATTEMPTS - 1:
                    log.warning("%s: row %d killed its worker %d times: giving up", stage, row, MAX_ATTEMPTS)
                    result = [f"{stage}: worker died"]
                else:
                    result = list(run([position]))
                _ledger_call(ledger.end, f"{stage}/1", [row], wait=False)
            yield from result
    _ledger_call(ledger.end, stage, rows, wait=False)


def _ledger_call(method: Any, stage: str, rows: list[int], wait: bool = True) -> list[int]:
    """A call to the ledger; should the ledger itself be lost (its node, say), the work runs as
    a first attempt rather than failing the job: the bound on retries is lost, no image is."""
    import ray

    try:
        ref = method.remote(stage, rows)
        return ray.get(ref) if wait else []
    except Exception as exc:  # ActorDiedError, ActorUnavailableError, ...
        log.warning("the attempt ledger is unavailable (%s): counting no deaths", type(exc).__name__)
        return [0] * len(rows)


def _decode_batch(
    batch: dict[str, np.ndarray],
    base_url: str,
    storage_options: dict,
    max_pixels: int | None,
    max_bytes: int | None,
    ledger: Any = None,
    max_held_bytes: int = DECODE_HELD_BYTES,
) -> Iterator[dict[str, np.ndarray]]:
    """Read and decode a batch's images; yields it in blocks of at most ``max_held_bytes`` of
    pixels (plus one image), so that a batch of large photos never sits whole in a worker."""

    def run(positions: list[int]) -> Iterator:
        uris, errors = batch["uri"], batch["error"]
        for p in positions:  # lazily: an image is decoded when the one before is handed on
            if _error(errors[p]) is not None:
                yield None
            else:
                yield fetch(uris[p], options_for(uris[p], base_url, storage_options), max_pixels, max_bytes)

    def block(start: int, stop: int) -> dict[str, np.ndarray]:
        return {
            "index": batch["index"][start:stop],
            "key": batch["key"][start:stop],
            "uri": batch["uri"][start:stop],
            "image": images.column(),
            "width": np.array(widths, dtype=np.int32),
            "height": np.array(heights, dtype=np.int32),
            "error": _object_array(errors),
        }

    n = len(batch["index"])
    images, widths, heights, errors = _Images(n, max_held_bytes), [], [], []
    start = 0
    results = _bounded(ledger, "decode", batch["index"], run)
    for position, (result, error) in enumerate(zip(results, batch["error"])):
        error = _error(error)
        if isinstance(result, str):
            error, result = result, None
        elif result is not None:
            error = result.error
        ok = result is not None and result.image is not None
        images.add(result.image if ok else None)
        widths.append(result.width if ok else -1)
        heights.append(result.height if ok else -1)
        errors.append(error or "")
        if images.full():
            # Handed on now: a worker holds at most this much decoded pixels, plus one image.
            yield block(start, position + 1)
            start = position + 1
            images, widths, heights, errors = _Images(n - start, max_held_bytes), [], [], []
    if widths or start == 0:
        yield block(start, n)


class _Images:
    """A decode block's images, in the form Ray takes cheapest: written into one (rows, H, W, 3)
    array while they share a size, which Ray puts in the object store as it is (given a list of
    arrays, it copies them into one: 17% of the decode stage's time, measured with py-spy);
    one array a row once they do not (Ray's variable-shaped tensors). A row that failed holds
    zeros in the shared array (an image's worth, counted against the budget), a 1×1 placeholder
    in the list, so that the column stays one tensor type; a failed first row, whose size no
    image gives, starts the list. Full once its pixels reach ``max_bytes`` (or it has ``rows``
    rows)."""

    def __init__(self, rows: int, max_bytes: int):
        self.rows, self.max_bytes = rows, max_bytes
        self.shared: np.ndarray | None = None
        self.listed: list[np.ndarray] | None = None
        self.count = 0
        self.held = 0  # bytes of the listed rows (the shared array's are its rows × a row's)

    def add(self, image: np.ndarray | None) -> None:
        """The next row's image; None for a row that failed."""
        if self.shared is None and self.listed is None:
            if image is None:  # before any image: its size is unknown, so rows of their own
                self.listed = []
            else:
                # As many rows as reach the budget: the block is handed on when it is full.
                rows = min(self.rows, max(1, -(-self.max_bytes // max(1, image.nbytes))))
                self.shared = np.empty((rows, *image.shape), image.dtype)
        shared = self.shared
        if shared is not None and (image is None or _same_kind(image, shared[0])):
            shared[self.count] = 0 if image is None else image
        else:
            if self.listed is None:
                # A second size (or dtype): every row its own array from here on. The rows so far are
                # copied out, so that the shared array, larger than they are, is let go.
                self.listed = [row.copy() for row in shared[: self.count]] if shared is not None else []
                self.held = sum(row.nbytes for row in self.listed)
                self.shared = None
            self.listed.append(np.zeros((1, 1, 3), np.uint8) if image is None else image)
            self.held += self.listed[-1].nbytes
        self.count += 1

    def full(self) -> bool:
        """Whether the block is to be handed on now: the shared array has as many rows as reach
        the budget, so it is full when every row is written; listed rows count their bytes."""
        if self.shared is not None:
            return self.count == len(self.shared)
        return self.held >= self.max_bytes

    def column(self) -> np.ndarray:
        """The rows' images, as one array or an object array of arrays."""
        if self.shared is not None:
            return self.shared[: self.count]
        return _object_array(self.listed or [])


def _same_kind(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def load_segmenter(engine: EngineConfig, cpu_threads: int = 1) -> Any:
    """The engine's Segmenter, loaded; its stand-in where it names one.

    The stand-in runs no model, so it loads neither torch nor transformers: a stand-in actor's
    start is the pipeline's own (their imports took 1.5 s of it on the 2-core machine, which
    the plumbing bench reports apart).
    """
    if engine.stand_in is not None:
        from .standin import StandInSegmenter

        return StandInSegmenter(engine)
    import torch
    from transformers.utils import logging as hf_logging

    from .segment import Segmenter

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, cpu_threads))
    hf_logging.disable_progress_bar()  # one bar per actor start is noise in the job's log
    return Segmenter(config=engine)


class SegmentStage:
    """A Ray Data actor: one loaded Segmenter; runs the model on each batch's decodable images.
    Ray Data calls it from ``SEGMENT_CALLS`` threads at once: it keeps no state of its own
    between calls, and the Segmenter locks what must run one at a time."""

    def __init__(self, engine: EngineConfig, cpu_threads: int = 1, ledger: Any = None):
        import ray

        context = ray.get_runtime_context()
        self.name = f"{context.get_node_id()[:12]}/{os.getpid()}"
        self.ledger = ledger
        # A checkpoint this node refuses (weights that are not the model's) goes to the ledger,
        # whence the driver ends the job with its one line, and fails the first batch: raised
        # here, Ray would print pages about a dead actor and start it again.
        self.refusal: SeglabelError | None = None
        try:
            self.segmenter = load_segmenter(engine, cpu_threads)
        except SeglabelError as exc:
            self.refusal = exc
            if ledger is not None:
                ray.get(ledger.refuse.remote(exc))
            return
        log.info("Segmenter actor %s ready on %s", self.name, self.segmenter.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.refusal is not None:
            raise self.refusal
        n = len(batch["key"])
        errors = [_error(e) or "" for e in batch["error"]]
        raws: list[list[Any]] = [[] for _ in range(n)]
        todo = [i for i in range(n) if not errors[i]]

        def run(positions: list[int]) -> list:
            return self._predict([batch["image"][todo[p]] for p in positions],
                                 [batch["key"][todo[p]] for p in positions])

        indices = np.asarray(batch["index"])[todo]
        # Consumed whole (list): the ledger forgets a batch only once its generator ends.
        for i, raw in zip(todo, list(_bounded(self.ledger, "segment", indices, run))):
            if isinstance(raw, str):
                errors[i] = raw
            else:
                # Instance masks come packed (boxes and bits), never N × H × W arrays.
                raws[i] = raw.parts()
        return {
            "index": batch["index"],
            "key": batch["key"],
            "uri": batch["uri"],
            "width": batch["width"],
            "height": batch["height"],
            "error": _object_array(errors),
            "raw": _binary_column(raws),
            "actor": _object_array([self.name] * n),
        }

    def _predict(self, images: list, keys: list) -> list:
        """Raw predictions; an image the model cannot process gets an error string instead."""
        if not images:
            return []
        try:
            return self.segmenter.predict_raw(images)
        except Exception as exc:
            # Find the culprit(s) one image at a time rather than failing the whole batch.
            log.warning(
                "batch failed (%s: %s); retrying its %d images one by one",
                type(exc).__name__,
                exc,
                len(images),
            )
        out = []
        for image, key in zip(images, keys):
            try:
                out.extend(self.segmenter.predict_raw([image]))
            except Exception as exc:
                log.warning("segment failed for %s: %s", key, exc)
                out.append(reason("segment", exc))
        return out


def _encode_batch(
    batch: pa.Table,
    output: OutputStore,
    task: str,
    model: str,
    id2label: dict[int, str],
    things: frozenset[int] | None,
) -> pa.Table:
    """Encode and write a block's masks; returns its output rows.

    The block comes as Arrow, read where it lies in the object store: each prediction is
    loaded from its own slice of the block when its turn comes (``_pickled_cells``), its arrays
    views of that slice (``RawPrediction.loads``), so that a worker copies no prediction out
    of the block, let alone the whole block's.
    """
    rows = []
    columns = [batch.column(name).to_pylist() for name in ("key", "uri", "width", "height", "error")]
    raws = _pickled_cells(batch.column("raw"))
    for key, uri, width, height, error, raw in zip(*columns, raws):
        error = _error(error)
        row = {"key": key, "image_uri": redact_url(uri), "task": task, "model": model, "status": "error",
               "error": error, "width": None, "height": None, "mask_uri": None, "segments": None}
        if error is None:
            try:
                prediction = RawPrediction.loads(raw)
                segments = build_segments(prediction, task, id2label, things)
                png = encode_png(prediction.id_map, task)
            except Exception as exc:  # a prediction pycocotools or Pillow cannot encode
                log.warning("cannot encode the mask of %s: %s", key, exc)
                row["error"] = reason("encode", exc)
            else:
                try:
                    # The PNG is written before the row that references it is returned.
                    row["mask_uri"] = redact_url(output.write_mask(key, png))
                except Exception as exc:  # storage failures after the client's retries
                    log.warning("cannot write mask for %s: %s", key, exc)
                    row["error"] = reason("write", exc)
                else:
                    row.update(status="ok", segments=[s.to_row() for s in segments])
            row["width"], row["height"] = int(width), int(height)
        if row["status"] != "ok" and is_safe_key(key):
            # An error row has no mask: not even one an earlier, interrupted run wrote for it.
            # (Safe only because each todo row reaches this stage once: Ray Data yields a
            # task's output once even when it retried it, and the driver's guard against a
            # repeat comes after this.)
            try:
                output.remove_mask(key)
            except Exception as exc:
                log.warning("cannot remove an earlier mask of %s: %s", key, exc)
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    table = table.append_column("actor", batch.column("actor").cast(pa.string()))
    return table.append_column("index", batch.column("index").cast(pa.int64()))


# Arrow's binary type has int32 offsets; past this a column of predictions is large_binary.
BINARY_MAX_BYTES = 2**31 - 1


def _binary_column(values: list[list[Any]]) -> pa.Array:
    """A binary column of ``values``, each given in parts (``RawPrediction.parts``), written once
    into one Arrow buffer that Ray takes as it is (Ray's own conversion of a column of bytes
    copies each value again, after ``dumps`` had joined them). Each value starts at a multiple
    of ``ALIGN`` bytes of the buffer, its arrays aligned in the block (it ends in padding)."""
    sizes = [sum(memoryview(part).nbytes for part in parts) for parts in values]
    bounds = np.zeros(len(values) + 1, np.int64)
    np.cumsum(np.array([size + -size % ALIGN for size in sizes], np.int64), out=bounds[1:])
    data = pa.allocate_buffer(int(bounds[-1]))  # Arrow's allocations are 64-byte aligned
    out = np.frombuffer(data, np.uint8)
    for parts, start, stop in zip(values, bounds[:-1].tolist(), bounds[1:].tolist()):
        for part in parts:
            view = np.frombuffer(part, np.uint8)
            out[start : start + len(view)] = view
            start += len(view)
        out[start:stop] = 0
    large = bounds[-1] > BINARY_MAX_BYTES
    kind, offsets = (pa.large_binary(), bounds) if large else (pa.binary(), bounds.astype(np.int32))
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(offsets), data])


def _pickled_cells(column: pa.ChunkedArray) -> Iterator[Any]:
    """Each row's dumped prediction (``RawPrediction.parts``): a slice of the block's own data
    buffer where Arrow holds the column as binary (cut by its offsets: an Arrow scalar would
    copy the value), as the Segment stage builds it (``_binary_column``); Python bytes should
    the column reach encode as Ray's pickled Python objects, which Ray makes of a column of
    bytes objects Arrow cannot hold (no stage of this pipeline hands it one any more)."""
    for chunk in column.iterchunks():
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            yield from chunk.to_pylist()
            continue
        _, offsets, data = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        # A slice of a block (Ray cuts batches out of blocks) keeps the whole buffers: its
        # offsets start at chunk.offset.
        bounds = np.frombuffer(offsets, dtype=width)[chunk.offset:chunk.offset + len(chunk) + 1]
        for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            yield data.slice(start, stop - start) if data is not None else b""


# -- the driver ---------------------------------------------------------------------------------


def _refs(config: JobConfig) -> Iterator[ImageRef]:
    if config.manifest:
        return iter_manifest(config.manifest, storage_options=config.input_storage_options)
    return iter_listing(
        config.input,
        storage_options=config.input_storage_options,
        extensions=config.extensions,
        exclude=[config.output],
    )


def _job_record(
    config: JobConfig,
    task: str,
    revision: str | None,
    id2label: dict[int, str],
    family: str,
    license: License,
) -> dict[str, Any]:
    """job.json: the run's spec and versions, each setting once. ``task``, ``revision`` and
    ``family`` are the ones the run settled on (the checkpoint's task, the Hub commit, its model
    type); the other mask settings as given (``dtype`` null: the device's default). No storage
    options: they may hold credentials."""
    return {
        # A presigned manifest URL's signature or a URL's password is not recorded.
        "input": redact_url(config.input) if config.input else None,
        "manifest": redact_url(config.manifest) if config.manifest else None,
        "output": redact_url(config.output),
        **_mask_settings(config.engine, task, revision, family),
        "model_license": license.record(),
        "id2label": {str(k): v for k, v in sorted(id2label.items())},
        "versions": {
            "seglabel": __version__,
            **{name: _version(name) for name in ("transformers", "torch", "ray")},
        },
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _version(package: str) -> str:
    """An installed package's version, from its metadata: importing torch and transformers only to
    read theirs took the driver 2 s of a CPU machine's start (nothing else in the driver needs
    them for a local checkpoint); the module's own, where the package has no metadata."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return importlib.import_module(package).__version__


def _mask_settings(
    engine: EngineConfig, task: str, revision: str | None, family: str = "mask2former"
) -> dict[str, Any]:
    settings = engine.mask_settings()
    if isinstance(settings.get("model"), str):
        settings["model"] = redact_url(settings["model"])  # a presigned checkpoint URL's signature
    return {**settings, "task": task, "revision": revision, "family": family}


def _check_same_input(previous: dict[str, Any], config: JobConfig) -> None:
    """Refuse to resume an output labeled from another input: keys are relative to their input
    root (or manifest URIs), so two inputs' keys mixed in one output mean nothing."""
    def same_form(url: str | None) -> str | None:
        # As recorded, and without signing parameters: a presigned manifest signed anew is the same.
        return url_identity(absolute_local(url)).rstrip("/") if url else None

    before = [same_form(previous.get(n)) for n in ("input", "manifest")]
    if before != [same_form(config.input), same_form(config.manifest)]:
        was, now = before[0] or before[1], redact_url(config.input or config.manifest)
        raise ConfigError(
            f"{config.output} was labeled from {was!r}, not {now!r}; use the same input to resume, "
            "or --overwrite to start again"
        )


def _check_same_settings(previous: dict[str, Any], engine: EngineConfig, task: str, revision: str | None,
                         output: str, family: str = "mask2former") -> None:
    """Refuse to resume an output labeled with settings that change masks (a checkpoint of
    another family at the same place included; outputs from before families were recorded
    were Mask2Former's)."""
    if isinstance(previous.get("settings"), dict):
        # job.json of seglabel 0.1.0 before settings were recorded once: the mask settings as
        # given sat in "settings" (task and revision as asked, not as resolved), and a local
        # checkpoint's path as typed (now made absolute before this check).
        before, now = dict(previous["settings"]), engine.mask_settings()
        if isinstance(before.get("model"), str):
            before["model"] = _absolute_model(before["model"])
    else:
        before, now = previous, _mask_settings(engine, task, revision, family)
    before = {**before, "family": before.get("family", "mask2former")}
    now.setdefault("family", family)
    # A dtype not given is the device's default, checked once the device is known (settle).
    changed = [
        k for k in now if k in before and before[k] != now[k] and not _settled_later(k, before[k], now[k])
    ]
    if now.get("stand_in") is not None and "stand_in" not in before:
        changed.append("stand_in")  # an output made before stand-ins existed: a real model's
        before = {**before, "stand_in": None}
    if changed:
        diff = "; ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(
            f"{output} was labeled with other mask settings ({diff}); use the same settings to resume, "
            "or --overwrite to start again"
        )


def _settled_later(name: str, before: Any, now: Any) -> bool:
    """Differences the early settings check lets pass: a dtype not given (the device's default,
    checked in ``settle`` once the device is known), and a URL checkpoint recorded without a
    revision by seglabel before its fingerprint was (it is recorded now)."""
    if name == "dtype":
        return now is None
    return name == "revision" and before is None and isinstance(now, str) and now.startswith("files-")


@dataclass
class _Tally:
    """What an enumeration met: distinct images, those already done, those to do (before any
    --limit), and repeated keys (counted once in the others)."""

    found: int = 0
    already_done: int = 0
    todo: int = 0
    repeats: int = 0


def _new_refs(
    refs: Iterator[ImageRef], done: SortedHashes, tally: _Tally, dedupe: bool
) -> Iterator[ImageRef]:
    """The refs without a committed row, in order, each key once; counts into ``tally``.

    Keys are handled as 64-bit hashes, a batch at a time: a done key is found by binary search
    in ``done`` and remembered in one bit, so that a repeat of it is told from its first
    appearance; with ``dedupe`` (a manifest may list an image twice; a listing never does) the
    other keys go into a growing hash set. Nothing is held per key beyond that: an output whose
    images are all done costs its done set and a bit a key.

    A manifest's keys drop the scheme, so ``s3://b/x.jpg`` and ``gs://b/x.jpg`` share a key: the
    later one is not a repeat but another image, and becomes an error row
    (``key: collides with …``) keyed by its full URI (:class:`_Collisions`).
    """
    refs = iter(refs)  # islice on a list would start again at every batch
    seen = HashSet() if dedupe else None
    collisions = _Collisions() if dedupe else None
    while True:
        batch = list(itertools.islice(refs, ENUMERATION_BATCH))
        if not batch:
            return
        hashes = key_hashes([r.key for r in batch])
        state = np.full(len(batch), _TODO, dtype=np.int8)
        if len(done):
            index = done.find(hashes)
            member = np.flatnonzero(index >= 0)
            state[member] = np.where(done.first_visits(index[member]), _DONE, _REPEAT)
        if seen is not None:
            rest = np.flatnonzero(state == _TODO)
            state[rest[~seen.add_new(hashes[rest])]] = _REPEAT
        if collisions is not None:
            for i, ref in collisions.check(batch, hashes, state):
                # Its own key now: done in an earlier run, repeated, or to do as an error row.
                h = key_hashes([ref.key])
                index = done.find(h)
                if index[0] >= 0:
                    state[i] = _DONE if done.first_visits(index)[0] else _REPEAT
                else:
                    state[i] = _TODO if seen.add_new(h)[0] else _REPEAT
                batch[i] = ref
        tally.already_done += int((state == _DONE).sum())
        tally.repeats += int((state == _REPEAT).sum())
        tally.todo += int((state == _TODO).sum())
        tally.found = tally.already_done + tally.todo
        yield from itertools.compress(batch, (state == _TODO).tolist())


# What the enumeration makes of a ref.
_TODO, _DONE, _REPEAT = 0, 1, 2


class _Collisions:
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
        look = sorted(unusual | set(np.flatnonzero(state == _REPEAT).tolist()))
        key_h = hashes[look]
        uri_h = key_hashes([url_identity(batch[i].uri) for i in look])
        known_keys, known_uris = self.other_keys.contains(key_h), self.other_uris.contains(uri_h)
        new_keys: set[int] = set()
        new_uris: set[int] = set()
        for j, i in enumerate(look):
            h, u = int(key_h[j]), int(uri_h[j])
            if state[i] != _REPEAT:  # a key's first entry: remembered if not in the usual form
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


def _stage_todo(store: OutputStore, refs: Iterator[ImageRef], limit: int | None, run_id: str):
    """Write the images still to do as Parquet files the workers read, each row with its index
    in the todo order; returns their paths and the number of rows. Holds one file's rows."""
    paths, todo = [], 0
    buffer: list[ImageRef] = []

    def flush():
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


# Calls a Segmenter actor runs at once: while one batch is in the model, the other's images
# are copied in, or its results post-processed, packed and handed to the object store.
SEGMENT_CALLS = 2


def _actor_pool(actors: int) -> Any:
    """Ray Data's pool of ``actors`` Segmenters, each running ``SEGMENT_CALLS`` calls at once
    (one at a time on an older Ray whose pool has no such settings)."""
    import inspect

    from ray.data import ActorPoolStrategy

    settings = inspect.signature(ActorPoolStrategy).parameters
    if not {"enable_true_multi_threading", "max_concurrent_calls_per_actor"} <= set(settings):
        log.debug("this Ray runs one call per Segmenter at a time")
        return ActorPoolStrategy(size=actors)
    return ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=SEGMENT_CALLS,
                             enable_true_multi_threading=True)


def _block_rows(todo: int, actors: int, batch_size: int) -> int:
    """Rows per block: BLOCK_ROWS, fewer when the job has too few images to give every call of
    every Segmenter a block (a block goes to one task or actor call: 30 images in one block would
    leave a second GPU idle), never less than a model batch."""
    share = -(-todo // max(1, actors * SEGMENT_CALLS))
    return max(batch_size, min(BLOCK_ROWS, share))


def _task_cpus(spare: float) -> float:
    """CPUs of one decode or encode task, given the CPUs the Segmenters leave: a whole core at
    most (more tasks, not bigger ones, use more cores), and a third of the spare CPUs, so that
    three tasks of either stage fit at once.

    A decode and an encode task must fit together: Ray Data runs the upstream stage first, and
    otherwise no mask would be encoded before every image was decoded (measured: the first
    Parquet part after 38 s of 55). One size for both lets encode (twice decode's work) run two
    tasks while decode waits: with encode the larger (⅔ of the spare CPUs, decode ⅓), one
    encode task at a time set the pace on 2 cores (3,000 photos in 22.7–23.9 s against
    20.0–21.3 s in alternating runs; bench/README.md, "Plumbing").
    """
    if spare <= 0:  # a one-CPU node whose core a CPU Segmenter holds
        return 0.25
    return min(TASK_CPUS, spare / 3)


def _actor_resources(config: JobConfig, local: bool) -> tuple[int, dict[str, float]]:
    """How many Segmenter actors, and what each asks for: one GPU each, or a CPU fallback.

    On a cluster that has fewer GPUs than asked for, the GPUs are requested from the
    autoscaler and the job waits for them (up to ACTOR_START_TIMEOUT_S); an embedded local
    Ray cannot grow, so there it is an error at once.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if config.engine.stand_in is not None:  # as many as there would be Segmenters, on no GPU
        return max(1, gpus if config.num_gpus is None else config.num_gpus), {"num_cpus": STAND_IN_CPUS}
    wanted = gpus if config.num_gpus is None else config.num_gpus
    if wanted > gpus:
        if local:
            raise ConfigError(f"--num-gpus {wanted} asks for more GPUs than this machine has ({gpus})")
        from ray.autoscaler.sdk import request_resources

        log.info("the cluster has %d GPUs; asking the autoscaler for %d", gpus, wanted)
        request_resources(bundles=[{"GPU": 1}] * wanted)
    if wanted > 0:
        return wanted, {"num_gpus": 1, "num_cpus": 1}
    log.warning("no GPUs in the Ray cluster: running one Segmenter on the CPU")
    # A whole core, unless that is all there is: the decode and encode tasks need some too.
    cpus = resources.get("CPU", 1)
    return 1, {"num_cpus": 1 if cpus >= 2 else max(0.25, cpus / 2)}


def run(config: JobConfig) -> Summary:
    """Run a labeling job as the config says; returns its summary.

    Raises ConfigError, SourceError, CheckpointError or OutputError (one readable line each)
    before any model runs when the settings, input, checkpoint or output are unusable.
    """
    config = _absolute_paths(config)
    engine = config.engine
    task = detect_task(engine.model, engine.task)
    info = inspect_checkpoint(engine.model, engine.revision)
    id2label, revision = info.id2label, info.revision
    license = checkpoint_license(engine.model, revision, info.family)
    check_allowed(license, config.require_license, engine.model)
    check_family_settings(info.family, engine.resolution, task, info.split, engine.model)
    try:
        things = thing_ids(id2label, engine.thing_labels)
        if engine.labels is not None:
            resolve_labels(id2label, engine.labels)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    summary = Summary(output=redact_url(config.output), task=task, model=engine.model, dry_run=config.dry_run,
                      license=license)

    refs = _refs(config)
    first = next(refs, None)  # a missing input fails here, before anything is written
    refs = _chain(first, refs) if first is not None else iter(())
    # The run's first lines, once its checkpoint, settings and input are known to be usable.
    log.info("checkpoint %s: %s, licence %s", engine.model, FAMILIES[info.family], license)
    if license.noncommercial:
        log.warning("checkpoint %s is licensed %s: its weights may not be used commercially", engine.model,
                    license.id)
    store = OutputStore(config.output, config.output_storage_options)
    previous = store.read_json(JOB_FILE)
    if config.overwrite:
        if not config.dry_run:
            store.clear()
        previous = None  # a dry run of --overwrite counts as the real one would: from scratch
    elif previous is not None:
        _check_same_input(previous, config)
        _check_same_settings(previous, engine, task, revision, config.output, info.family)
    if not config.dry_run:
        store.check_writable()
        store.clean_temporary()
        if config.retry_errors and previous is not None:
            log.info("dropped %d error rows to process them again", store.drop_error_rows())
    done = store.done_keys(include_errors=not config.retry_errors) if previous is not None else SortedHashes()
    tally = _Tally()
    new_refs = _new_refs(refs, done, tally, dedupe=bool(config.manifest))

    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    if config.dry_run:
        for _ in new_refs:
            pass
        summary.found, summary.already_done = tally.found, tally.already_done
        return summary

    todo_paths, todo = _stage_todo(store, new_refs, config.limit, run_id)
    summary.found, summary.already_done = tally.found, tally.already_done
    # _SUCCESS says every input image has a row: not so while --limit holds some back.
    summary.held_back = tally.todo - todo
    if tally.repeats:
        log.info("%d entries repeated an image already listed: each image counts once", tally.repeats)
    del done, new_refs  # the enumeration's memory, before the counts need theirs
    record = _job_record(config, task, revision, id2label, info.family, license) if previous is None else None

    def settle(dtype: str) -> None:
        """Once the Segmenters' device is known: the dtype they will use is recorded, or checked
        against the one recorded (fp32 on a CPU, then bf16 on a GPU, would mix two models)."""
        if record is not None:
            store.write_json(JOB_FILE, {**record, "dtype": dtype})
        elif previous.get("dtype") not in (None, dtype):
            raise ConfigError(
                f"{config.output} was labeled with dtype {previous['dtype']}, and this run would use "
                f"{dtype} (the default on this device); pass --dtype {previous['dtype']} to resume, "
                "or --overwrite to start again"
            )
        elif previous.get("dtype") is None or previous.get("revision") != revision:
            # Recorded before they were known (a first run with nothing to do, an older
            # seglabel): recorded now, so that the next run is checked against them.
            store.write_json(JOB_FILE, {**previous, "dtype": dtype, "revision": revision})
        store.remove(SUCCESS_FILE)  # stale until every new image has a row

    try:
        if todo == 0:
            if record is not None:
                store.write_json(JOB_FILE, record)
            if summary.found == 0:
                log.warning("no images found under %s", config.input or config.manifest)
            if summary.held_back:
                store.remove(SUCCESS_FILE)
            elif summary.found == 0 or not store.exists(SUCCESS_FILE):
                summary.totals = store.counts()
                store.write_json(SUCCESS_FILE, summary.totals)
            return summary
        started = time.perf_counter()
        # Every Segmenter loads the commit the driver resolved (a Hub branch may move meanwhile).
        config = config.replace(engine=engine.replace(revision=revision))
        try:
            _execute(config, store, task=task, id2label=id2label, things=things, todo_paths=todo_paths,
                     todo=todo, run_id=run_id, summary=summary, settle=settle)
        except SeglabelError:
            if record is not None and summary.processed == 0:
                # A new output whose Segmenters refused to label (their checkpoint's weights are
                # not the model's): left empty, so that the next run starts as if it never had.
                store.remove(JOB_FILE)
            raise
        summary.seconds = time.perf_counter() - started
        summary.totals = store.counts()
        if summary.processed < todo:
            # Every row is committed or the job fails; should one be missing all the same,
            # _SUCCESS would lie: the next run labels what is missing.
            log.warning("%d of %d images got no row: not writing _SUCCESS", todo - summary.processed, todo)
        elif not summary.held_back:
            store.write_json(SUCCESS_FILE, {**summary.totals, "actors": summary.actors})
    finally:
        store.remove(f"{SCRATCH_DIR}/todo-{run_id}")
    return summary


def _absolute_paths(config: JobConfig) -> JobConfig:
    """The config with its local paths absolute: they are resolved here, in the driver, since a
    Ray worker's working directory is not the driver's."""
    changes: dict[str, Any] = {
        name: absolute_local(getattr(config, name))
        for name in ("input", "manifest", "output")
        if getattr(config, name)
    }
    model = _absolute_model(config.engine.model)
    if model != config.engine.model:
        changes["engine"] = config.engine.replace(model=model)
    return config.replace(**changes)


def _absolute_model(model: str) -> str:
    """A checkpoint folder's absolute path; a Hub id or URL as given. "org/name" is a relative
    path too, so only one that names a folder here (or starts like a path) is taken for one;
    file:// URLs are absolute already."""
    if "://" not in model and (model.startswith((".", "~", "/")) or os.path.isdir(os.path.expanduser(model))):
        return absolute_local(model)
    return model


def _chain(first: ImageRef, rest: Iterator[ImageRef]) -> Iterator[ImageRef]:
    yield first
    yield from rest


def _execute(
    config: JobConfig,
    store: OutputStore,
    *,
    task: str,
    id2label: dict[int, str],
    things: frozenset[int] | None,
    todo_paths: list[str],
    todo: int,
    run_id: str,
    summary: Summary,
    settle: Callable[[str], None],
) -> None:
    """Build the Ray Data pipeline (todo files -> decode -> Segmenters -> encode) and commit its
    rows: the part of ``run`` that needs Ray. ``settle`` is called with the Segmenters' dtype
    once their device is known, before any image is read."""
    import ray
    from ray.data import DataContext

    with connect(config.address) as connection:
        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        actors, resources = _actor_resources(config, connection.embedded)
        on_gpu = "num_gpus" in resources and (config.engine.device or "cuda").startswith("cuda")
        dtype = config.engine.dtype or default_dtype("cuda" if on_gpu else "cpu")
        settle(dtype)
        config = config.replace(engine=config.engine.replace(dtype=dtype))  # every actor the same
        base_url = config.manifest or config.input
        # No CPU: it only counts, and must not wait for a core the stages hold. On the driver's
        # node (a worker node may go); restarted, it starts again from zero.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        ledger = ray.remote(AttemptLedger).options(
            num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=here
        ).remote()
        spare = ray.cluster_resources().get("CPU", 0) - actors * resources["num_cpus"]
        task_cpus = _task_cpus(spare)
        block_rows = _block_rows(todo, actors, config.engine.batch_size)
        # The todo files are read through the store (fsspec with retries) rather than Ray's
        # own Parquet reader, whose listing does not ride out a throttled object store.
        ds = (
            ray.data.from_items([{"path": p} for p in todo_paths])
            .map_batches(
                _read_todo,
                fn_kwargs={"store": store},
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=task_cpus,
            )
            .repartition(target_num_rows_per_block=block_rows)
        )
        ds = ds.map_batches(
            _decode_batch,
            fn_kwargs={
                "base_url": base_url,
                "storage_options": config.input_storage_options,
                "max_pixels": config.max_pixels,
                "max_bytes": config.max_bytes,
                "ledger": ledger,
            },
            batch_size=block_rows,
            batch_format="numpy",
            num_cpus=task_cpus,
        )
        ds = ds.map_batches(
            SegmentStage,
            fn_constructor_kwargs={"engine": config.engine, "ledger": ledger},
            batch_size=config.engine.batch_size,
            batch_format="numpy",
            # A Segmenter that dies (its process, its node) is replaced and its batches retried:
            # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1.
            compute=_actor_pool(actors),
            **resources,
        )
        ds = ds.map_batches(
            _encode_batch,
            fn_kwargs={
                "output": store,
                "task": task,
                "model": redact_url(config.engine.model),
                "id2label": id2label,
                "things": things,
            },
            batch_size=block_rows,
            batch_format="pyarrow",
            num_cpus=task_cpus,
        )
        cpu = time.process_time()
        try:
            _commit(ds, store, config, todo, run_id, summary)
        except Exception as exc:
            if isinstance(exc, SeglabelError):
                raise
            # A Segmenter that refused its checkpoint (weights that are not the model's) ends
            # the job with its own line, not with Ray's wrapping of it.
            refusal = ray.get(ledger.refusal.remote())
            if refusal is None:
                raise
            raise refusal from None
        finally:
            summary.stage_cpu_s = {**_stage_cpu(ds), "driver": time.process_time() - cpu}


# Ray Data's operator names -> the stages' names.
_STAGES = (("_read_todo", "read todo"), ("Repartition", "repartition"), ("_decode_batch", "read+decode"),
           ("SegmentStage", "segment"), ("_encode_batch", "encode+write"))


def _stage_cpu(ds: Any) -> dict[str, float]:
    """Each stage's CPU seconds over the run, from Ray Data's per-operator statistics (a
    developer API: nothing, with a debug line, should it change)."""
    try:
        pending, out = [ds.get_stats_summary()], {}
        while pending:
            stats = pending.pop()
            pending.extend(stats.parents)
            for op in stats.operators_stats:
                if op.cpu_time is not None:
                    name = next((n for k, n in _STAGES if k in op.operator_name), op.operator_name)
                    out[name] = out.get(name, 0.0) + float(op.cpu_time.sum)
        return out
    except Exception as exc:  # the statistics are a report, never a reason to fail the job
        log.debug("no per-stage CPU times: %s", exc)
        return {}


def _too_many_errors(max_errors: float | None, errors: int, seen: int) -> bool:
    if max_errors is None:
        return False
    if 0 < max_errors < 1:
        return seen >= MAX_ERRORS_MIN_SEEN and errors > max_errors * seen
    return errors > max_errors


def _commit(ds, store: OutputStore, config: JobConfig, todo: int, run_id: str, summary: Summary) -> None:
    """Consume the pipeline's rows and commit them in parts of ``rows_per_part`` rows."""
    from tqdm import tqdm

    rows_per_part = config.rows_per_part
    pending: list[pa.Table] = []
    pending_rows = pending_bytes = 0
    part = 0
    actors: Counter[str] = Counter()
    # One bit per row of this run's todo list (its "index" column), not a set of keys.
    committed = Bits(todo)
    last_log = time.monotonic()
    started = time.perf_counter()

    def write(table: pa.Table) -> None:
        nonlocal part
        store.write_part(table.drop_columns(["actor", "index"]), f"part-{run_id}-{part:05d}.parquet")
        part += 1

    with tqdm(total=todo, unit="img", desc="labeling", disable=None) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            # Ray yields a task's rows once even when it retried the task; this guards the
            # contract (every image exactly once) against any duplicate all the same.
            fresh = committed.first(batch.column("index").to_numpy())
            if not fresh.all():
                log.warning("dropping %d duplicate rows", len(fresh) - int(fresh.sum()))
                batch = batch.filter(pa.array(fresh))
            # Columns, not rows: the driver's CPU is shared with the stages'.
            ok = pa.compute.equal(batch.column("status"), "ok")
            n_ok = int(pa.compute.sum(ok).as_py() or 0)
            summary.ok += n_ok
            summary.error += batch.num_rows - n_ok
            counts = pa.compute.value_counts(batch.column("actor").filter(ok))
            actors.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
            pending.append(batch)
            pending_rows += batch.num_rows
            pending_bytes += batch.nbytes
            while pending_rows >= rows_per_part or (pending_rows and pending_bytes >= PART_MAX_BYTES):
                table = pa.concat_tables(pending).combine_chunks()
                write(table.slice(0, rows_per_part))
                rest = table.slice(rows_per_part)
                pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
                pending_bytes = rest.nbytes if rest.num_rows else 0
            bar.update(batch.num_rows)
            summary.processed += batch.num_rows
            if _too_many_errors(config.max_errors, summary.error, summary.processed):
                # Commit what is done, so that a re-run after fixing the cause resumes here.
                if pending_rows:
                    write(pa.concat_tables(pending))
                raise JobError(
                    f"stopped: {summary.error} of {summary.processed} images failed, over --max-errors "
                    f"{config.max_errors:g}; see the error rows in {store.url}/metadata/ (seglabel inspect)"
                )
            if time.monotonic() - last_log > 30:
                rate = summary.processed / (time.perf_counter() - started)
                log.info("%d / %d images, %.1f images/s", summary.processed, todo, rate)
                last_log = time.monotonic()
        if pending_rows:
            write(pa.concat_tables(pending))
    summary.actors = dict(actors)


def label(input: str | None = None, output: str | None = None, **settings: Any) -> Summary:
    """Label every image under ``input`` (or listed in ``manifest=``) into ``output``.

    ``settings`` are the job's and engine's settings by name (``model``, ``task``,
    ``batch_size``, ``score_threshold``, ``num_gpus``, ``address``, …), as in a YAML job spec.
    """
    values = dict(settings)
    if input is not None:
        values["input"] = input
    if output is not None:
        values["output"] = output
    return run(JobConfig.from_mapping(values))


__all__ = ["AttemptLedger", "SegmentStage", "Summary", "label", "run"]
