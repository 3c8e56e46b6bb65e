"""Write masks and metadata to the output URL, commit atomically, and tell a re-run what is done.

Layout (the output contract in DESIGN.md): ``job.json``, ``masks/<key>.png``,
``metadata/part-*.parquet``, ``_SUCCESS``; seglabel's own scratch space is ``_seglabel/``.

What is atomic:
* every file becomes visible whole: local files are written under a hidden temporary name
  in the same folder and renamed; object stores get a single PUT;
* a PNG is written before the metadata row that references it, and a row counts as done only
  once the Parquet part holding it has been committed; a part is written by the driver alone,
  with a name no other run uses;
* ``_SUCCESS`` is written last, when every input image has a committed row.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from collections import Counter
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from .errors import SeglabelError, get_logger, one_line
from .keys import HashSpool, SortedHashes, key_hashes, repeated
from .storage import is_local, is_temporary, open_url, write_atomic

log = get_logger(__name__)

SEGMENT_TYPE = pa.struct(
    [
        ("id", pa.int32()),
        ("label_id", pa.int32()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.float32())),
        ("rle", pa.string()),
        ("is_thing", pa.bool_()),
    ]
)

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image_uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mask_uri", pa.string()),
        ("task", pa.string()),
        ("model", pa.string()),
        ("segments", pa.list_(SEGMENT_TYPE)),
    ]
)

JOB_FILE = "job.json"
SUCCESS_FILE = "_SUCCESS"
MASKS_DIR = "masks"
METADATA_DIR = "metadata"
SCRATCH_DIR = "_seglabel"


class OutputError(SeglabelError, RuntimeError):
    """The output cannot be read or written; the message is one readable line."""


class OutputStore:
    """One job's output folder on any fsspec filesystem."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, root = open_url(url, self.storage_options)
        except Exception as exc:
            raise OutputError(f"cannot open output {url!r}: {one_line(exc)}") from exc
        self.root = root.rstrip("/") or root
        self.local = is_local(self.fs)

    def __reduce__(self):
        # Workers rebuild the store from its URL; fsspec caches filesystem instances per process.
        return (OutputStore, (self.url, self.storage_options))

    # -- paths ------------------------------------------------------------------------------

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def uri(self, rel: str) -> str:
        """The full URI of a path under the output (``s3://…``, ``file:///abs/…``)."""
        return self.fs.unstrip_protocol(self.path(rel))

    @staticmethod
    def mask_relpath(key: str) -> str:
        return f"{MASKS_DIR}/{key}.png"

    # -- writing ----------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file so that it only ever becomes visible complete."""
        write_atomic(self.fs, self.path(rel), data)

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def write_mask(self, key: str, png: bytes) -> str:
        """Write one mask PNG; returns its full URI."""
        rel = self.mask_relpath(key)
        self.write_bytes(rel, png)
        return self.uri(rel)

    def remove_mask(self, key: str) -> None:
        """Delete the mask of ``key`` if there is one (a folder of that name is left alone)."""
        try:
            self.fs.rm_file(self.path(self.mask_relpath(key)))
        except (FileNotFoundError, IsADirectoryError):
            pass

    def write_part(self, table: pa.Table, name: str) -> str:
        """Commit one Parquet part of metadata rows; returns its path."""
        buf = io.BytesIO()
        pq.write_table(table.cast(SCHEMA), buf, compression="zstd")
        rel = f"{METADATA_DIR}/{name}"
        self.write_bytes(rel, buf.getvalue())
        return self.path(rel)

    def check_writable(self) -> None:
        """Fail early, with one line, when the output cannot be written."""
        rel = f"{SCRATCH_DIR}/.probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(rel, b"ok")
            self.fs.rm(self.path(rel))
        except Exception as exc:
            raise OutputError(
                f"cannot write to output {self.url}: {type(exc).__name__}: {one_line(exc)}"
            ) from exc

    # -- reading ----------------------------------------------------------------------------

    def read_json(self, rel: str) -> Any | None:
        try:
            return json.loads(self.fs.cat_file(self.path(rel)))
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def parts(self) -> list[str]:
        """Committed Parquet parts, sorted (temporary files are hidden and skipped)."""
        self.fs.invalidate_cache(self.path(METADATA_DIR))
        try:
            names = self.fs.ls(self.path(METADATA_DIR), detail=False)
        except FileNotFoundError:
            return []
        return sorted(
            n for n in names if n.endswith(".parquet") and not posixpath.basename(n).startswith(".")
        )

    def iter_part_columns(self, columns: list[str]) -> Iterator[pa.Table]:
        """Some columns of every committed part, one part at a time.

        Parts are read from their bytes, not through a Python file object: pyarrow reads those
        on its I/O threads, and one of them can release the last reference to a Python buffer
        during interpreter shutdown and abort the process (seen with pyarrow 26).
        """
        for path in self.parts():
            yield self.read_parquet(path, columns)

    def iter_batches(self, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        """Some columns of every committed row, part by part, ``batch_size`` rows at a time
        (a part's compressed bytes in memory, never all of its decoded rows)."""
        for path in self.parts():
            parquet = pq.ParquetFile(pa.BufferReader(self.fs.cat_file(path)))
            yield from parquet.iter_batches(batch_size=batch_size, columns=columns, use_threads=False)

    def read_parquet(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file under the output, read whole."""
        # Whole parts are small (one driver buffer's worth of rows); reading them from bytes
        # keeps pyarrow off Python file objects (see iter_part_columns).
        return pq.ParquetFile(pa.BufferReader(self.fs.cat_file(path))).read(
            columns=columns, use_threads=False
        )

    def done_keys(self, include_errors: bool = True) -> SortedHashes:
        """Keys with a committed row (``include_errors=False``: only ``ok`` rows count), as a
        set of hashes: 8 bytes a key, read one part at a time."""
        spool = HashSpool()
        for table in self.iter_part_columns(["key", "status"]):
            if not include_errors:
                table = table.filter(pa.compute.equal(table.column("status"), "ok"))
            spool.add(key_hashes(table.column("key").to_pylist()))
        return SortedHashes.from_spool(spool)

    def counts(self) -> dict[str, Any]:
        """Rows, ok and error counts (errors by reason) over all committed parts.

        Every key has one row: the commit refuses repeats within a run and a run skips what
        earlier runs committed. Should a key still have two rows (a part replaced while another
        run wrote), the later row wins. Memory: the keys' hashes, 8 bytes a row, to find such
        repeats; the rows themselves are counted one part at a time.
        """
        statuses: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        spool = HashSpool()
        for table in self.iter_part_columns(["key", "status", "error"]):
            statuses.update(_value_counts(table.column("status")))
            failed = table.filter(pa.compute.not_equal(table.column("status"), "ok"))
            reasons.update(_reason(e) for e in failed.column("error").to_pylist())
            spool.add(key_hashes(table.column("key").to_pylist()))
        repeats = repeated(spool.sorted())
        if len(repeats):
            self._discount_replaced_rows(repeats, statuses, reasons)
        return {
            "total": sum(statuses.values()),
            "ok": statuses.get("ok", 0),
            "error": sum(v for k, v in statuses.items() if k != "ok"),
            "errors_by_reason": dict(sorted((k, v) for k, v in reasons.items() if v)),
        }

    def _discount_replaced_rows(self, repeats: np.ndarray, statuses: Counter, reasons: Counter) -> None:
        """Take out of the counts every row of a repeated key but its last (parts are read in
        name order, which is commit order: part names start with the run's UTC time)."""
        rows_of: dict[int, list[tuple[str, str | None]]] = {}
        wanted = SortedHashes(repeats, is_sorted=True)
        for table in self.iter_part_columns(["key", "status", "error"]):
            hashes = key_hashes(table.column("key").to_pylist())
            hit = wanted.find(hashes) >= 0
            if not hit.any():
                continue
            status, error = table.column("status").to_pylist(), table.column("error").to_pylist()
            for i in np.flatnonzero(hit).tolist():
                rows_of.setdefault(int(hashes[i]), []).append((status[i], error[i]))
        for rows in rows_of.values():
            for status, error in rows[:-1]:
                statuses[status] -= 1
                if status != "ok":
                    reasons[_reason(error)] -= 1

    def inspect(self) -> dict[str, Any]:
        """The state of an output, from storage alone: rows committed, errors by reason,
        whether it is complete, and how many images a running (or killed) job queued."""
        job = self.read_json(JOB_FILE)
        success = self.read_json(SUCCESS_FILE)
        queued = 0
        try:
            todo_dirs = [n for n in self.fs.ls(self.path(SCRATCH_DIR), detail=False) if "todo-" in n]
        except FileNotFoundError:
            todo_dirs = []
        for folder in todo_dirs:
            for path in self.fs.ls(folder, detail=False):
                queued += pq.ParquetFile(pa.BufferReader(self.fs.cat_file(path))).metadata.num_rows
        return {
            "output": self.url,
            "job": {k: job.get(k) for k in ("input", "manifest", "model", "revision", "task", "started")}
            if job
            else None,
            "complete": success is not None,
            "parts": len(self.parts()),
            "queued_by_running_job": queued,
            **self.counts(),
        }

    # -- housekeeping -----------------------------------------------------------------------

    def remove(self, rel: str) -> None:
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def clear(self) -> None:
        """Delete a previous job's outputs (``--overwrite``)."""
        for rel in (SUCCESS_FILE, METADATA_DIR, MASKS_DIR, SCRATCH_DIR, JOB_FILE):
            self.remove(rel)

    def clean_temporary(self) -> int:
        """Remove what a killed run left behind: temporary files in ``metadata/`` and the
        scratch space (its todo lists). Returns how many entries went.

        Temporary PNGs a killed encode task left in ``masks/`` are hidden files that no reader
        lists; walking a corpus-sized folder to find them is not worth it.
        """
        stale = []
        for rel in (METADATA_DIR, SCRATCH_DIR):
            try:
                names = self.fs.ls(self.path(rel), detail=False)
            except FileNotFoundError:
                continue
            stale += [n for n in names if is_temporary(n) or posixpath.basename(n).startswith("todo-")]
        for n in stale:
            self.fs.rm(n, recursive=True)
        return len(stale)

    def drop_error_rows(self) -> int:
        """Remove ``error`` rows from the committed parts, so that they are processed again.

        Each part is replaced whole (atomically) or deleted when nothing is left; the rows are
        gone before any new row for the same key can be written, so that a crash in between
        loses no image (the next run sees it missing) and never duplicates one.
        """
        dropped = 0
        for path in self.parts():
            table = self.read_parquet(path)
            keep = pa.compute.equal(table.column("status"), "ok")
            kept = table.filter(keep)
            if kept.num_rows == table.num_rows:
                continue
            dropped += table.num_rows - kept.num_rows
            rel = posixpath.relpath(path, self.root)
            if kept.num_rows:
                self.write_part(kept, posixpath.basename(rel))
            else:
                self.fs.rm(path)
        return dropped


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pa.compute.value_counts(column)
    return {v.as_py(): c.as_py() for v, c in zip(counts.field("values"), counts.field("counts"))}


def _reason(error: str | None) -> str:
    """The reason class of an error message: ``decode: truncated image`` stays as it is,
    ``read: <long botocore text>`` becomes ``read``."""
    if not error:
        return "unknown"
    stage, _, detail = error.partition(":")
    return error if len(detail) < 40 else stage
