"""The stages as Ray Data runs them: each a small callable on one base, over one batch.

    TodoReader → DecodeStage (CPU tasks) → SegmentStage (one actor per GPU) → EncodeStage (CPU
    tasks) → the driver's commit (``commit.py``)

Each stage's plain work lives in its own module (``inputs.fetch``/``inputs.decode``,
``engine.segmenter``, ``core.results``/``core.masks``/``outputs.store``); here are its Ray
halves: which columns a batch carries, how a failed image becomes an error cell instead of a
failed batch, and how an image that kills its worker is found and given up on (the attempt
ledger). Decode and encode run as Ray tasks, each given
an instance (pickled into the task); the Segmenter is a class Ray Data starts as actors.

Columns between the stages:

============  =========================================================================
stage         hands on
============  =========================================================================
TodoReader    ``index`` (the row's place in this run's to-do order), ``key``, ``uri``,
              ``error`` (an enumeration error: "" for none)
DecodeStage   those (``CARRIED``) + ``image``, ``width``, ``height`` (-1 when it failed)
SegmentStage  ``CARRIED`` + ``width``, ``height`` + ``raw`` (``transport.pack_column``) and
              ``actor`` (which Segmenter made it)
EncodeStage   the output contract's row (``contract.SCHEMA``) + ``actor``, ``index``
============  =========================================================================
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np
import pyarrow as pa

from ..core.config import EngineConfig
from ..core.errors import SeglabelError, reason
from ..core.keys import is_safe_key
from ..core.masks import encode_png
from ..core.redaction import get_logger, redact_url
from ..core.results import RawPrediction, build_segments
from ..engine.load import load_segmenter
from ..engine.resolve import ResolvedCheckpoint
from ..inputs.fetch import fetch
from ..outputs.contract import SCHEMA
from ..outputs.store import OutputStore
from ..storage.filesystem import options_for
from .ledger import MAX_ATTEMPTS
from .transport import column_cells, pack_column

log = get_logger(__name__)

# Decoded pixels a decode worker holds before it hands them on (one image may exceed it; its
# own size is bounded by --max-pixels).
DECODE_HELD_BYTES = 256 << 20
# Calls a Segmenter actor runs at once: while one batch is in the model, the other's images
# are copied in, or its results post-processed, packed and handed to the object store.
SEGMENT_CALLS = 2
# Every stage hands these on as they came.
CARRIED = ("index", "key", "uri")


def error_cell(value: Any) -> str | None:
    """An error cell as it travels between stages: "" (not None, which Ray may turn into a
    float NaN when a whole column is empty) means no error."""
    return value if isinstance(value, str) and value else None


def object_array(values: list) -> np.ndarray:
    """A 1-D object array of ``values`` (numpy would make a 2-D array of equal-length lists)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


_ONE_AT_A_TIME = threading.Lock()


def bounded(ledger: Any, stage: str, indices: np.ndarray, run: Callable[[list[int]], Iterable]) -> Iterator:
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


class Stage:
    """One stage as Ray Data calls it: ``stage(batch)`` gives the next stage's batch (or
    yields it in blocks). ``name`` is the stage's in the ledger, the logs and its error rows
    (``decode: worker died``); ``work`` what its per-stage CPU seconds are reported as;
    ``batch_format`` the form Ray Data hands it its batches in."""

    name: ClassVar[str]
    work: ClassVar[str]
    batch_format: ClassVar[str] = "numpy"

    def __init__(self, ledger: Any = None):
        self.ledger = ledger

    def bounded(self, indices: np.ndarray, run: Callable[[list[int]], Iterable]) -> Iterator:
        """:func:`bounded` under this stage's name."""
        return bounded(self.ledger, self.name, indices, run)


class TodoReader(Stage):
    """Reads this run's to-do files (one path a row) into their rows. Through the store (fsspec
    with retries) rather than Ray's own Parquet reader, whose listing does not ride out a
    throttled object store."""

    name = work = "read todo"
    batch_format = "pyarrow"

    def __init__(self, store: OutputStore):
        super().__init__()
        self.store = store

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([self.store.read_parquet(p) for p in batch.column("path").to_pylist()])


class DecodeStage(Stage):
    """Reads and decodes a batch's images; yields it in blocks of at most ``max_held_bytes`` of
    pixels (plus one image), so that a batch of large photos never sits whole in a worker."""

    name, work = "decode", "read+decode"

    def __init__(self, base_url: str, storage_options: dict, max_pixels: int | None, max_bytes: int | None,
                 ledger: Any = None, max_held_bytes: int = DECODE_HELD_BYTES):
        super().__init__(ledger)
        self.base_url, self.storage_options = base_url, storage_options
        self.max_pixels, self.max_bytes, self.max_held_bytes = max_pixels, max_bytes, max_held_bytes

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        n = len(batch["index"])
        images, widths, heights, errors = ImageBlock(n, self.max_held_bytes), [], [], []

        def block(start: int, stop: int) -> dict[str, np.ndarray]:
            return {
                **{name: batch[name][start:stop] for name in CARRIED},
                "image": images.column(),
                "width": np.array(widths, dtype=np.int32),
                "height": np.array(heights, dtype=np.int32),
                "error": object_array(errors),
            }

        start = 0
        results = self.bounded(batch["index"], lambda positions: self._read(batch, positions))
        for position, (result, error) in enumerate(zip(results, batch["error"])):
            error = error_cell(error)
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
                images, widths, heights, errors = ImageBlock(n - start, self.max_held_bytes), [], [], []
        if widths or start == 0:
            yield block(start, n)

    def _read(self, batch: dict[str, np.ndarray], positions: list[int]) -> Iterator:
        uris, errors = batch["uri"], batch["error"]
        for p in positions:  # lazily: an image is decoded when the one before is handed on
            if error_cell(errors[p]) is not None:
                yield None
            else:
                options = options_for(uris[p], self.base_url, self.storage_options)
                yield fetch(uris[p], options, self.max_pixels, self.max_bytes)


class ImageBlock:
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
        return object_array(self.listed or [])


def _same_kind(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype


class SegmentStage(Stage):
    """A Ray Data actor: one loaded Segmenter; runs the model on each batch's decodable images.
    Ray Data calls it from ``SEGMENT_CALLS`` threads at once: it keeps no state of its own
    between calls, and the Segmenter locks what must run one at a time."""

    name = work = "segment"

    def __init__(self, engine: EngineConfig, checkpoint: ResolvedCheckpoint | None = None,
                 cpu_threads: int = 1, ledger: Any = None):
        import ray

        super().__init__(ledger)
        context = ray.get_runtime_context()
        self.actor = f"{context.get_node_id()[:12]}/{os.getpid()}"
        # A checkpoint this node refuses (weights that are not the model's) goes to the ledger,
        # whence the driver ends the job with its one line, and fails the first batch: raised
        # here, Ray would print pages about a dead actor and start it again.
        self.refusal: SeglabelError | None = None
        try:
            self.segmenter = load_segmenter(engine, cpu_threads, checkpoint)
        except SeglabelError as exc:
            self.refusal = exc
            if ledger is not None:
                ray.get(ledger.refuse.remote(exc))
            return
        log.info("Segmenter actor %s ready on %s", self.actor, self.segmenter.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.refusal is not None:
            raise self.refusal
        n = len(batch["key"])
        errors = [error_cell(e) or "" for e in batch["error"]]
        raws: list[list[Any]] = [[] for _ in range(n)]
        todo = [i for i in range(n) if not errors[i]]

        def run(positions: list[int]) -> list:
            return self._predict([batch["image"][todo[p]] for p in positions],
                                 [batch["key"][todo[p]] for p in positions])

        # Consumed whole (list): the ledger forgets a batch only once its generator ends.
        for i, raw in zip(todo, list(self.bounded(np.asarray(batch["index"])[todo], run))):
            if isinstance(raw, str):
                errors[i] = raw
            else:
                # Instance masks come packed (boxes and bits), never N × H × W arrays.
                raws[i] = raw.parts()
        return {
            **{name: batch[name] for name in (*CARRIED, "width", "height")},
            "error": object_array(errors),
            "raw": pack_column(raws),
            "actor": object_array([self.actor] * n),
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


class EncodeStage(Stage):
    """Encodes and writes a block's masks; returns its output rows.

    The block comes as Arrow, read where it lies in the object store: each prediction is
    loaded from its own slice of the block when its turn comes (``transport.column_cells``), its
    arrays views of that slice (``RawPrediction.loads``), so that a worker copies no prediction
    out of the block, let alone the whole block's.
    """

    name, work = "encode", "encode+write"
    batch_format = "pyarrow"

    def __init__(self, output: OutputStore, checkpoint: ResolvedCheckpoint, model: str):
        super().__init__()
        # ``model``: the checkpoint as the rows name it (redacted).
        self.output, self.task, self.model = output, checkpoint.task, model
        self.id2label, self.things = checkpoint.id2label, checkpoint.things

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = [batch.column(name).to_pylist() for name in ("key", "uri", "width", "height", "error")]
        rows = [self._row(*cells) for cells in zip(*columns, column_cells(batch.column("raw")))]
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        table = table.append_column("actor", batch.column("actor").cast(pa.string()))
        return table.append_column("index", batch.column("index").cast(pa.int64()))

    def _row(self, key: str, uri: str, width: int, height: int, error: Any, raw: Any) -> dict[str, Any]:
        """One image's output row; its mask written first, or an earlier run's removed."""
        error = error_cell(error)
        row = {"key": key, "image_uri": redact_url(uri), "task": self.task, "model": self.model,
               "status": "error", "error": error, "width": None, "height": None, "mask_uri": None,
               "segments": None, "review_score": None}
        if error is None:
            try:
                prediction = RawPrediction.loads(raw)
                segments = build_segments(prediction, self.task, self.id2label, self.things)
                png = encode_png(prediction.id_map, self.task)
            except Exception as exc:  # a prediction pycocotools or Pillow cannot encode
                log.warning("cannot encode the mask of %s: %s", key, exc)
                row["error"] = reason("encode", exc)
            else:
                try:
                    # The PNG is written before the row that references it is returned.
                    row["mask_uri"] = redact_url(self.output.write_mask(key, png))
                except Exception as exc:  # storage failures after the client's retries
                    log.warning("cannot write mask for %s: %s", key, exc)
                    row["error"] = reason("write", exc)
                else:
                    row.update(status="ok", segments=[s.to_row() for s in segments],
                               review_score=prediction.review_score)
            row["width"], row["height"] = int(width), int(height)
        if row["status"] != "ok" and is_safe_key(key):
            # An error row has no mask: not even one an earlier, interrupted run wrote for it.
            # (Safe only because each todo row reaches this stage once: Ray Data yields a
            # task's output once even when it retried it, and the driver's guard against a
            # repeat comes after this.)
            try:
                self.output.remove_mask(key)
            except Exception as exc:
                log.warning("cannot remove an earlier mask of %s: %s", key, exc)
        return row


# Ray Data names an operator for its callable's class ("MapBatches(DecodeStage)").
STAGES: tuple[type[Stage], ...] = (TodoReader, DecodeStage, SegmentStage, EncodeStage)
