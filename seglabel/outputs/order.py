"""Rows of an output in the order a reader asks for: the output's own, or review order (the
images a person should look at first: :mod:`seglabel.core.review`), for the exports and the preview."""

from __future__ import annotations

import os
import tempfile
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from ..core.errors import ConfigError, OutputError, one_line
from ..core.review import REVIEW_COLUMN
from .store import OutputStore

# The orders readers of rows offer.
ORDERS = ("output", "review")


def check_order(order: str) -> str:
    """``order``, when it is one of ``ORDERS``; the one line every reader's ``--order`` says
    otherwise."""
    if order not in ORDERS:
        raise ConfigError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
    return order


class _Order:
    """Collects each batch's rows' statuses and scores (17 bytes a row), then gives the
    positions in review order: ok rows by review score descending, ties in output order; then
    ok rows without a score (written before seglabel had it), then error rows, each in output
    order (the sort itself takes about 45 bytes a row for a moment)."""

    def __init__(self) -> None:
        self.scores: list[np.ndarray] = []
        self.ok: list[np.ndarray] = []
        self.rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self.ok.append(np.asarray(batch.column("status").to_numpy(zero_copy_only=False) == "ok"))
        self.scores.append(batch.column(REVIEW_COLUMN).to_numpy(zero_copy_only=False).astype(np.float64))
        self.rows += batch.num_rows

    def positions(self) -> np.ndarray:
        if not self.rows:
            return np.zeros(0, dtype=np.int64)
        score, ok = np.concatenate(self.scores), np.concatenate(self.ok)
        missing = np.isnan(score)
        position = np.arange(self.rows)
        # lexsort's last key is the first.
        return np.lexsort((position, -np.nan_to_num(score, nan=0.0), missing, ~ok))


def rows_in_order(store: OutputStore, columns: Sequence[str], batch_size: int,
                  order: str = "output") -> Iterator[dict]:
    """The rows that count, as dicts of ``columns``: in part order, or with ``order="review"``
    the ok rows most doubtful first (review score descending, ties in output order), then ok
    rows without a score (written before seglabel had it), then error rows.

    The review order needs every row before the first: one pass over the output spools the
    rows, as Arrow, to a local temporary file (the decoded size of those columns; ``TMPDIR``
    says where), read back through a memory map ``batch_size`` rows at a time. A spool that
    cannot be written (a full disk) is an OutputError."""
    if check_order(order) == "output":
        return store.iter_rows(columns, batch_size)
    return _in_review_order(store, list(columns), batch_size)


def _in_review_order(store: OutputStore, columns: list[str], batch_size: int) -> Iterator[dict]:
    read = list(dict.fromkeys([*columns, "status", REVIEW_COLUMN]))
    with tempfile.TemporaryDirectory(prefix="seglabel-order-") as folder:
        path = os.path.join(folder, "rows.arrow")
        ranking = _Order()
        writer = None
        try:
            for batch in store.iter_batches(read, batch_size):
                ranking.add(batch)
                writer = writer or pa.ipc.new_file(path, batch.schema)
                writer.write_batch(batch)
            if writer is not None:
                writer.close()
        except OSError as exc:  # the temporary folder's disk, not the output's
            raise OutputError(f"cannot spool the rows to {folder} for the review order (set TMPDIR "
                              f"to a disk with room): {type(exc).__name__}: {one_line(exc)}") from exc
        wanted = ranking.positions()
        if not len(wanted):
            return
        with pa.memory_map(path) as source:
            reader = pa.ipc.open_file(source)
            ends = np.cumsum([reader.get_batch(i).num_rows for i in range(reader.num_record_batches)])
            for i in range(0, len(wanted), batch_size):
                for row in _take(reader, ends, wanted[i : i + batch_size]):
                    yield {name: row[name] for name in columns}


def _take(reader: pa.ipc.RecordBatchFileReader, ends: np.ndarray, positions: np.ndarray) -> list[dict]:
    """The rows at ``positions`` (of the whole file), in that order, a batch's rows taken at once."""
    batch_of = np.searchsorted(ends, positions, side="right")
    rows: list[dict | None] = [None] * len(positions)
    for b in np.unique(batch_of):
        at = np.flatnonzero(batch_of == b)
        first = ends[b - 1] if b else 0
        taken = reader.get_batch(int(b)).take(pa.array(positions[at] - first)).to_pylist()
        for slot, row in zip(at, taken):
            rows[slot] = row
    return rows  # type: ignore[return-value]
