"""The review score: how soon a person should look at an image's pre-labels, and rows in that order.

Each ``ok`` row's ``review_score`` is in [0, 1], higher meaning "look sooner". It combines three
doubts, each in [0, 1], so that any one of them alone can bring an image forward:

    review_score = 1 - (1 - d_score) * (1 - d_boundary) * (1 - d_overlap)

* ``d_score``, how close the weakest segment came to being dropped: one minus the lowest kept
  segment's margin over the score threshold, ``(score - threshold) / (1 - threshold)``
  (instance, panoptic). Semantic maps have no segment scores: one minus the mean, over the
  image's pixels, of the winning class's share of the class scores.
* ``d_boundary``, how much of the masks is undecided: the share of mask pixels whose mask
  probability lies within ``BAND`` of the mask threshold (or half the way to 0 or 1, where that
  is nearer: :func:`mask_band`), over all pixels within that of it or above (instance,
  panoptic; at model scale, where the probabilities are); semantic: the share of pixels whose
  two best classes' shares differ by less than ``2 * BAND``.
* ``d_overlap``, how much the segments fought over pixels: instance, the share of the kept
  masks' pixels that two or more masks cover; panoptic, the share of the kept queries' own
  pixels (probability over the threshold) that other segments took, pooled over the segments,
  relative to the share the overlap threshold lets a segment lose (1: every segment barely
  survived the merge); semantic: 0.

An image with no segments at all scores 1: the model found nothing, which a person should
confirm. The device computes the pixel counts with the work it does anyway and brings them
back with the transfers it already waits for (:mod:`seglabel.postprocess`); the arithmetic
here is on a few numbers per image.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from .errors import one_line
from .sink import OutputError, OutputStore

# How near the mask threshold a probability is "undecided".
BAND = 0.15
REVIEW_COLUMN = "review_score"
# The orders readers of rows offer (export, preview).
ORDERS = ("output", "review")


def combine(*doubts: float) -> float:
    """``1 - prod(1 - d)`` over the doubts, each clipped to [0, 1] (a NaN, from a device's
    broken number, counts as full doubt: it should bring the image forward, not hide it)."""
    keep = 1.0
    for doubt in doubts:
        doubt = 1.0 if math.isnan(doubt) else min(1.0, max(0.0, doubt))
        keep *= 1.0 - doubt
    return 1.0 - keep


def score_doubt(scores: Sequence[float] | np.ndarray, threshold: float) -> float:
    """One minus the weakest segment's margin over the score threshold (0 for no segments)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return 0.0
    room = max(1.0 - threshold, 1e-6)
    return 1.0 - float((scores.min() - threshold) / room)


def share(part: float, whole: float) -> float:
    """``part / whole``, 0 for an empty whole."""
    return float(part) / float(whole) if whole > 0 else 0.0


def review_score(segments: int, d_score: float, d_boundary: float, d_overlap: float) -> float:
    """The review score of an image with ``segments`` segments and these doubts."""
    return 1.0 if segments == 0 else combine(d_score, d_boundary, d_overlap)


def logit(p: float) -> float:
    """``log(p / (1 - p))``, ``p`` kept 1e-7 away from 0 and 1."""
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def mask_band(threshold: float) -> tuple[float, float]:
    """The mask probabilities that count as undecided around the probability ``threshold``, as
    logits (lo, hi): within ``BAND`` of it, or half the way to 0 or 1 where that is nearer (a
    band that reached 0 or 1 would call a crisp mask undecided). A logit in (lo, hi) is in the
    band; one over lo is in it or above."""
    half = min(BAND, threshold / 2, (1 - threshold) / 2)
    return logit(threshold - half), logit(threshold + half)


# -- rows in review order ----------------------------------------------------------------------


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
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}")
    if order == "output":
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


__all__ = ["BAND", "ORDERS", "REVIEW_COLUMN", "combine", "logit", "mask_band", "review_score",
           "rows_in_order", "score_doubt", "share"]
