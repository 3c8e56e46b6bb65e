"""One job's output folder on any fsspec filesystem (:class:`OutputStore`): masks and metadata
written and committed atomically, read back part by part, counted, and told to a re-run.

The layout and the rows' schema are the output contract's (:mod:`seglabel.outputs.contract`).

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
import os
import posixpath
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from ..core.errors import ConfigError, OutputError, Unreadable, WriteFailed, one_line
from ..core.keys import HashSpool, SortedHashes, is_safe_key, key_hashes, repeated
from ..core.redaction import get_logger, redact_url
from ..storage.atomic import is_temporary
from ..storage.filesystem import innermost, is_local, protocols
from ..storage.location import Location
from ..storage.read import read_bytes
from .contract import (
    JOB_FILE,
    KEYS_CHECKED,
    MASKS_DIR,
    METADATA_DIR,
    OPTIONAL_COLUMNS,
    SCHEMA,
    SCRATCH_DIR,
    SUCCESS_FILE,
    with_columns,
)

log = get_logger(__name__)


# The most a JSON file of the output (job.json, _SUCCESS, the lease) may hold: a record is a
# few kB.
MAX_JSON_BYTES = 16 << 20
# Files deleted in one request (S3's DeleteObjects takes up to 1,000 keys).
REMOVE_BATCH = 1000


class OutputStore(Location):
    """One job's output folder on any fsspec filesystem."""

    def __reduce__(self):
        # Workers rebuild the store from its URL; fsspec caches filesystem instances per process.
        return (OutputStore, (self.url, self.storage_options))

    # -- paths ------------------------------------------------------------------------------

    def uri(self, rel: str) -> str:
        """The full URI of a path under the output (``s3://…``, ``file:///abs/…``)."""
        return self.fs.unstrip_protocol(self.path(rel))

    @staticmethod
    def mask_relpath(key: str) -> str:
        return f"{MASKS_DIR}/{key}.png"

    # -- writing ----------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file so that it only ever becomes visible complete; a storage failure (a
        full disk, a permission) is an OutputError naming the file."""
        try:
            self.write_file(self.path(rel), data)
        except OSError as exc:
            raise WriteFailed(f"cannot write {self.uri(rel)}: {type(exc).__name__}: {one_line(exc)}") from exc

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def write_mask(self, key: str, png: bytes) -> str:
        """Write one mask PNG; returns its full URI."""
        rel = self.mask_relpath(key)
        self.write_bytes(rel, png)
        return self.uri(rel)

    def read_mask(self, key: str, max_bytes: int | None = None) -> bytes:
        """The PNG of ``key``'s mask, for the readers of an output (exports, eval): a regular
        file, at most ``max_bytes``, as an image is read (an output can be damaged too);
        missing or unreadable is an OutputError naming the key."""
        try:
            return read_bytes(self.uri(self.mask_relpath(key)), self.storage_options, max_bytes)
        except FileNotFoundError:
            raise OutputError(f"the mask of {key!r} is missing from the output") from None
        except (Unreadable, OSError) as exc:
            raise OutputError(f"cannot read the mask of {key!r}: {one_line(exc)}") from exc

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

    def refuse_inside(self, dest: Location, flag: str) -> None:
        """Refuse a destination among this output's own files (``job.json``, ``_SUCCESS``,
        ``masks/``, ``metadata/``, ``_seglabel/``): an export or a report written there destroys
        the job's record, or makes every later read fail. A folder beside them (``OUT/exports/``)
        is fine. Paths are compared on the innermost filesystem of each (a chain such as
        ``simplecache::file://OUT/job.json`` writes through to ``OUT/job.json``), links resolved
        on a local disk."""
        own_fs, dest_fs = innermost(self.fs), innermost(dest.fs)
        if protocols(dest_fs) != protocols(own_fs):
            return

        def real(path: str) -> str:
            return os.path.realpath(path) if is_local(own_fs) else posixpath.normpath(path)

        own, target = real(self.root), real(dest.root)
        if not target.startswith(own.rstrip("/") + "/"):
            return
        rel = target[len(own.rstrip("/")) + 1:]
        if rel in (JOB_FILE, SUCCESS_FILE) or rel.split("/")[0] in (MASKS_DIR, METADATA_DIR, SCRATCH_DIR):
            raise ConfigError(f"{flag} {dest.url} is inside the output's own files ({rel}); write it "
                              "beside them (a folder such as OUT/exports/) or elsewhere")

    # -- reading ----------------------------------------------------------------------------

    def read_json(self, rel: str) -> dict[str, Any] | None:
        """A JSON object under the output (every one seglabel writes is an object); None where
        there is none. Anything else by that name (a folder, a FIFO, a file that is not a JSON
        object) is an OutputError naming it: damaged state is never read as if it were whole."""
        try:
            data = self._cat(self.path(rel), MAX_JSON_BYTES)
        except FileNotFoundError:
            return None
        where = redact_url(self.uri(rel))
        try:
            value = json.loads(data)
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested past the limit
            raise OutputError(f"{where} is not valid JSON ({type(exc).__name__}): damaged, or not "
                              "a file seglabel wrote") from exc
        if not isinstance(value, dict):
            what = "null" if value is None else f"a {type(value).__name__}"
            raise OutputError(f"{where} holds {what}, not a JSON object: damaged, or not a file "
                              "seglabel wrote")
        return value

    def _cat(self, path: str, max_bytes: int | None = None) -> bytes:
        """A file under the output, whole (at most ``max_bytes``: a record is small, and one of
        gigabytes would only fill the reader's memory). On a local disk only a regular file is
        read: a FIFO named like a part or job.json would block every reader, and a run holding
        the lease, for ever; a folder is named as one. FileNotFoundError where there is nothing."""
        where = self.fs.unstrip_protocol(path)
        try:
            return read_bytes(where, self.storage_options, max_bytes)
        except Unreadable as exc:  # not a regular file, or over max_bytes
            if self.local and not os.path.isfile(path):
                what = "a folder" if os.path.isdir(path) else "not a regular file (a FIFO or a device)"
                raise OutputError(f"{where} is {what}: not a file seglabel wrote") from exc
            message = f"{redact_url(where)} is over {max_bytes} bytes: not a file seglabel wrote"
            raise OutputError(message) from exc

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def parts(self) -> list[str]:
        """Committed Parquet parts, sorted (temporary files are hidden and skipped). A folder
        named like a part, or a ``metadata`` that is a file, is an OutputError: its rows, if
        any, would be lost to every reader (read as none, an empty export). A reader lists
        them once per read and passes the list on, so that a part committed meanwhile is
        either read whole, checks included, or not at all."""
        folder = self.path(METADATA_DIR)
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        except NotADirectoryError as exc:
            raise OutputError(f"{self.uri(METADATA_DIR)} is a file, not the metadata folder") from exc
        if len(entries) == 1 and entries[0].get("type") != "directory" and \
                entries[0]["name"].rstrip("/") == folder.rstrip("/"):
            raise OutputError(f"{self.uri(METADATA_DIR)} is a file, not the metadata folder")
        names = []
        for entry in entries:
            name = entry["name"]
            if not name.endswith(".parquet") or posixpath.basename(name).startswith("."):
                continue
            if entry.get("type") == "directory":
                raise OutputError(f"{self.fs.unstrip_protocol(name)} is a folder, not a Parquet part")
            names.append(name)
        return sorted(names)

    def iter_part_columns(self, columns: list[str], parts: list[str] | None = None) -> Iterator[pa.Table]:
        """Some columns of every committed part (of ``parts``, as listed), one part at a time.

        Parts are read from their bytes, not through a Python file object: pyarrow reads those
        on its I/O threads, and one of them can release the last reference to a Python buffer
        during interpreter shutdown and abort the process (seen with pyarrow 26).
        """
        for path in self.parts() if parts is None else parts:
            yield self.read_parquet(path, columns)

    def iter_batches(self, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        """Some columns of every row that counts (:meth:`superseded`), part by part,
        ``batch_size`` rows at a time (a part's compressed bytes in memory, never all of its
        decoded rows). The parts are listed once: those the check for repeated keys read."""
        parts = self.parts()
        dropped = self.superseded(parts)
        for path in parts:
            parquet = self._part(path, columns)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            where = self.fs.unstrip_protocol(path)
            batches = (
                with_columns(batch, columns, where)
                for batch in parquet.iter_batches(batch_size=batch_size, columns=present, use_threads=False)
            )
            if path not in dropped:
                yield from batches
                continue
            start = 0
            for batch in batches:
                positions = np.arange(start, start + batch.num_rows)
                start += batch.num_rows
                yield batch.filter(pa.array(~np.isin(positions, dropped[path])))

    def iter_rows(self, columns: Sequence[str], batch_size: int) -> Iterator[dict]:
        """Every row that counts (:meth:`superseded`) as a dict of ``columns``, decoded
        ``batch_size`` rows at a time (never a whole part in memory)."""
        for batch in self.iter_batches(list(columns), batch_size):
            yield from batch.to_pylist()

    def read_parquet(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file under the output, read whole."""
        # Whole parts are small (one driver buffer's worth of rows); reading them from bytes
        # keeps pyarrow off Python file objects (see iter_part_columns).
        parquet = self._part(path, columns)
        try:
            if columns is None:
                return parquet.read(use_threads=False)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            table = parquet.read(columns=present, use_threads=False)
            return with_columns(table, columns, self.fs.unstrip_protocol(path))
        except (pa.ArrowException, OSError) as exc:
            raise OutputError(f"{self.fs.unstrip_protocol(path)} cannot be read: {one_line(exc)}") from exc

    def _part(self, path: str, columns: Sequence[str] | None) -> pq.ParquetFile:
        """A Parquet file under the output, opened from its bytes; one that is damaged (cut
        short, not Parquet) or lacks a column asked for is an OutputError naming it."""
        where = self.fs.unstrip_protocol(path)
        try:
            parquet = pq.ParquetFile(pa.BufferReader(self._cat(path)))
        except (pa.ArrowException, OSError) as exc:
            raise OutputError(f"{where} is not a readable Parquet file: {one_line(exc)}") from exc
        present = parquet.schema_arrow.names
        missing = [c for c in columns or () if c not in present and c not in OPTIONAL_COLUMNS]
        if missing:
            raise OutputError(f"{where} has no column {missing[0]!r}: not a part of seglabel's metadata")
        return parquet

    def done_keys(self, include_errors: bool = True) -> SortedHashes:
        """Keys with a committed row (``include_errors=False``: only ``ok`` rows count), as a
        set of hashes: 8 bytes a key, read one part at a time."""
        spool = HashSpool()
        for table in self.iter_part_columns(["key", "status"]):
            if not include_errors:
                table = table.filter(pa.compute.equal(table.column("status"), "ok"))
            spool.add(_hashes(table))
        return SortedHashes.from_spool(spool)

    def superseded(self, parts: list[str] | None = None) -> dict[str, np.ndarray]:
        """The rows that do not count, by part: a key's row that counts is its last committed
        one (parts are read in name order, which is commit order: part names start with the
        run's UTC time), as every reader of rows takes it. Empty while every key has one row,
        as the commit and the run's lease ensure; an output written by an older seglabel (two
        runs at once) may hold two.

        The check is a pass over every part's keys (8 bytes a row), which the end of each run
        makes and remembers (:meth:`counts`); a reader skips it while the parts are the ones a
        run checked, and makes it on a partial output. ``parts``: as the reader listed them."""
        parts = self.parts() if parts is None else parts
        checked = self._keys_checked()
        if checked is not None and checked.get("repeated") == 0 and checked.get("parts") == _names(parts):
            return {}
        spool = HashSpool()
        for table in self.iter_part_columns(["key"], parts):
            spool.add(_hashes(table))
        repeats = repeated(spool.sorted())
        return self._rows_replaced(repeats, parts) if len(repeats) else {}

    def _keys_checked(self) -> dict[str, Any] | None:
        try:
            checked = self.read_json(KEYS_CHECKED)
        except Exception:  # damaged: the check is made again
            return None
        return checked if isinstance(checked, dict) else None

    def _rows_replaced(self, repeats: np.ndarray, parts: list[str]) -> dict[str, np.ndarray]:
        """The positions, by part, of every row of a repeated key but its last."""
        wanted = SortedHashes(repeats, is_sorted=True)
        rows_of: dict[int, list[tuple[str, int]]] = {}
        for path in parts:
            hashes = _hashes(self.read_parquet(path, ["key"]))
            for i in np.flatnonzero(wanted.find(hashes) >= 0).tolist():
                rows_of.setdefault(int(hashes[i]), []).append((path, i))
        out: dict[str, list[int]] = {}
        for rows in rows_of.values():
            for path, i in rows[:-1]:
                out.setdefault(path, []).append(i)
        return {path: np.array(sorted(positions), dtype=np.int64) for path, positions in out.items()}

    def counts(self, remember: bool = False) -> dict[str, Any]:
        """Rows, ok and error counts (errors by reason) over the rows that count (see
        :meth:`superseded`), read one part at a time: every row is counted in one pass, and the
        rows a later one replaced, should there be any, are taken out again. ``remember`` (a
        run, under its lease): which parts were checked for repeated keys, so that readers can
        skip that pass."""
        parts = self.parts()
        counts, spool = RowCounts(), HashSpool()
        for path in parts:
            table = self.read_parquet(path, ["key", "status", "error"])
            counts.add(table)
            spool.add(_hashes(table))
        repeats = repeated(spool.sorted())
        if len(repeats):
            for path, positions in self._rows_replaced(repeats, parts).items():
                counts.add(self.read_parquet(path, ["status", "error"]).take(positions), sign=-1)
        if remember:
            self.write_json(KEYS_CHECKED, {"parts": _names(parts), "repeated": int(len(repeats))})
        return counts.as_dict()

    def queued(self) -> int:
        """Images the to-do lists of running (or killed) jobs hold. A run's temporaries are
        skipped, and so is a list (or a run's folder) that goes while it is counted: its run
        ended meanwhile."""
        queued = 0
        try:
            todo_dirs = [n for n in self.fs.ls(self.path(SCRATCH_DIR), detail=False) if "todo-" in n]
        except FileNotFoundError:
            todo_dirs = []
        for folder in todo_dirs:
            try:
                paths = [p for p in self.fs.ls(folder, detail=False) if not is_temporary(p)]
            except FileNotFoundError:
                continue
            for path in paths:
                try:
                    queued += pq.ParquetFile(pa.BufferReader(self._cat(path))).metadata.num_rows
                except (FileNotFoundError, pa.ArrowException, OutputError) as exc:
                    log.debug("not counting %s: %s", path, exc)
        return queued

    # -- housekeeping -----------------------------------------------------------------------

    def remove(self, rel: str) -> None:
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def clear(self) -> int:
        """Delete what a previous job made (``--overwrite``), and nothing else: the masks its
        rows name, its Parquet parts, ``_SUCCESS``, the scratch space, then ``job.json`` last
        (so that an overwrite cut short is still an output of seglabel's, and can be run again).
        Other files in ``masks/`` or ``metadata/`` (a dataset's own masks, notes) stay. Returns
        how many masks went. The caller checks that the output is seglabel's (its record)."""
        removed = 0
        for part in self.parts():  # one part's masks at a time: memory does not grow with the rows
            try:
                table = self.read_parquet(part, ["key", "status"])
            except OutputError as exc:  # a damaged part: its masks cannot be named, and stay
                log.warning("--overwrite: %s; its masks, if any, stay", exc)
                table = pa.table({"key": pa.array([], pa.string()), "status": pa.array([], pa.string())})
            ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
            masks = [self.path(self.mask_relpath(k)) for k in ok.column("key").to_pylist() if is_safe_key(k)]
            for start in range(0, len(masks), REMOVE_BATCH):
                self._remove_files(masks[start:start + REMOVE_BATCH])
            removed += len(masks)
        self._remove_files(self.parts())
        self.remove(SUCCESS_FILE)
        self.remove(KEYS_CHECKED)
        self.clean_temporary()  # the scratch space's to-do lists; the run's own lease stays
        self.remove(JOB_FILE)
        return removed

    def _remove_files(self, paths: list[str]) -> None:
        """Delete files (one request a batch on an object store); those already gone are fine."""
        if not paths:
            return
        try:
            self.fs.rm(paths)
        except FileNotFoundError:  # one of them was gone: the others one by one
            for path in paths:
                try:
                    self.fs.rm_file(path)
                except FileNotFoundError:
                    pass

    def holds(self, rel: str) -> bool:
        """Whether the folder ``rel`` exists and holds anything (an object store's prefix
        exists only while it holds something; a local folder may be empty)."""
        path = self.path(rel)
        try:
            if not self.fs.isdir(path):
                return bool(self.fs.exists(path))
            return not self.local or bool(self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return False

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


@dataclass
class RowCounts:
    """Rows by status, and error rows by reason class: one count for the commit, ``_SUCCESS``,
    ``inspect`` and the exports."""

    ok: int = 0
    error: int = 0
    reasons: Counter = field(default_factory=Counter)

    def add(self, table: pa.Table | pa.RecordBatch, sign: int = 1) -> pa.Array:
        """Count a table's rows by its ``status`` column (and ``error``'s reasons, where it has
        one), or with ``sign=-1`` take them out of the counts; returns which rows are ok.
        Columns, not rows: the driver's CPU is shared with the stages'."""
        ok = pa.compute.fill_null(pa.compute.equal(table.column("status"), "ok"), False)
        n_ok = int(pa.compute.sum(ok).as_py() or 0)
        self.ok += sign * n_ok
        self.error += sign * (table.num_rows - n_ok)
        if "error" in table.column_names and table.num_rows > n_ok:
            failed = table.filter(pa.compute.invert(ok))
            for reason in failed.column("error").to_pylist():
                self.reasons[reason_class(reason)] += sign
        return ok

    def add_row(self, row: Mapping[str, Any]) -> bool:
        """Count one row read as a dict (``status``, and ``error`` where it was read); returns
        whether it is ok."""
        if row["status"] == "ok":
            self.ok += 1
            return True
        self.error += 1
        self.reasons[reason_class(row.get("error"))] += 1
        return False

    @property
    def total(self) -> int:
        return self.ok + self.error

    def as_dict(self) -> dict[str, Any]:
        """The counts as ``_SUCCESS`` and ``inspect`` give them."""
        return {
            "total": self.total,
            "ok": self.ok,
            "error": self.error,
            "errors_by_reason": dict(sorted((k, v) for k, v in self.reasons.items() if v)),
        }


def _names(paths: list[str]) -> list[str]:
    return [posixpath.basename(p) for p in paths]


def _hashes(table: pa.Table) -> np.ndarray:
    """The keys' hashes (a null key, which seglabel never writes, as the empty key)."""
    return key_hashes(pa.compute.fill_null(table.column("key"), "").to_pylist())


def reason_class(error: str | None) -> str:
    """The reason class of an error message: ``decode: truncated image`` stays as it is,
    ``read: <long botocore text>`` becomes ``read``."""
    if not error:
        return "unknown"
    stage, _, detail = error.partition(":")
    return error if len(detail) < 40 else stage
