"""One front for the readers of an output (exports, the preview, eval):

    open (its record, a partial job allowed) → the label space (a team's label map, if any)
    → the rows that count, in output or review order → the ok ones, counted → their masks

:class:`OutputReader` is that front; :func:`inspect_output` is ``seglabel inspect``'s look at
an output's state, from storage alone.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..core.errors import ConfigError, OutputError, one_line
from ..core.masks import decode_png
from ..core.redaction import get_logger
from .contract import JOB_FILE, LABEL_COLUMNS, SUCCESS_FILE, checked_key
from .labelmap import UNMAPPED, UNMAPPED_WITHOUT_MAP, LabelSpace
from .order import rows_in_order
from .record import JobRecord
from .store import OutputStore, RowCounts

log = get_logger(__name__)

# Rows decoded from Parquet at a time: bounds memory by a batch, not by a part (parts hold up to
# --rows-per-part rows, each with its segments' RLEs).
ROW_BATCH = 256


class OutputReader:
    """A job's output as its readers take it: ``store`` and ``record`` (opened by
    :func:`open_output`), ``space`` (the model's labels, or a team's through ``label_map``:
    :class:`~seglabel.outputs.labelmap.LabelSpace`), its rows in order, the ok ones counted
    into ``counts``, and each row's mask read as an image is (a regular file, bounded: an output
    can be damaged too). Raises OutputError or LabelMapError with one line."""

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None,
                 label_map: str | None = None, unmapped: str = "drop"):
        if unmapped != UNMAPPED[0] and label_map is None:
            raise ConfigError(UNMAPPED_WITHOUT_MAP)
        self.url = output
        self.store, self.record = open_output(output, storage_options)
        self.counts = RowCounts()
        self._label_map = (label_map, unmapped, storage_options)

    @property
    def task(self) -> str:
        return self.record.task

    @cached_property
    def space(self) -> LabelSpace:
        """The labels rows are read in; a label map is read (and refused) when first asked for,
        so that a reader's own checks of the output come first."""
        label_map, unmapped, storage_options = self._label_map
        return LabelSpace.of_output(self.record, label_map, unmapped, (self.url, storage_options))

    def rows(self, order: str = "output", columns: Sequence[str] = LABEL_COLUMNS) -> Iterator[dict]:
        """Every row that counts, as dicts of ``columns``, in ``order``
        (:func:`~seglabel.outputs.order.rows_in_order`)."""
        return rows_in_order(self.store, columns, ROW_BATCH, order)

    def ok_rows(self, order: str = "output") -> Iterator[dict]:
        """The ok rows in ``order``, every row counted into ``counts`` as it passes (error rows
        have no masks: they are counted and skipped)."""
        for row in self.rows(order):
            if self.counts.add_row(row):
                yield row

    def mapped(self, rows: Iterable[dict]) -> Iterator[dict]:
        """Rows in the space's labels, each with ``remap``, its segment ids -> the ids they
        become (:meth:`LabelSpace.apply`); the rows as they are without a label map."""
        if self.space.record is None:
            yield from rows
            return
        for row in rows:
            segments, remap = self.space.apply(row)
            yield {**row, "segments": segments, "remap": remap}

    def mask_png(self, row: Mapping[str, Any], max_bytes: int | None = None) -> bytes:
        """The PNG of a row's mask, as stored; its key checked before it names a file."""
        return self.store.read_mask(checked_key(row["key"]), max_bytes)

    def mask(self, row: Mapping[str, Any], max_bytes: int | None = None) -> np.ndarray:
        """A row's mask as the label map it encodes, of the row's size (else an OutputError:
        the output is damaged)."""
        key = row["key"]
        data = self.mask_png(row, max_bytes)
        try:
            mask = decode_png(data, self.task)
        except (OSError, ValueError, IndexError) as exc:
            raise OutputError(f"cannot read the mask of {key!r}: {one_line(exc)}") from exc
        if mask.ndim != 2 or mask.shape != (row["height"], row["width"]):
            raise OutputError(f"the mask of {key!r} is not a {self.task} map of "
                              f"{row['width']}x{row['height']}, as its row says: the output is damaged")
        return mask


def open_output(output: str,
                storage_options: Mapping[str, Any] | None = None) -> tuple[OutputStore, JobRecord]:
    """An existing output's store and record, for the tools that read one (exports, preview,
    and later readers). A partial job (no ``_SUCCESS``) is allowed, with a warning; no record is an
    :class:`~seglabel.core.errors.OutputError`."""
    try:
        store = OutputStore(output, storage_options)
        record = JobRecord.read(store)
    except OutputError:
        raise
    except Exception as exc:  # credentials, endpoint, permissions
        raise OutputError(f"cannot read {output}: {type(exc).__name__}: {one_line(exc)}") from exc
    if record is None:
        raise OutputError(f"{output} has no {JOB_FILE}: not a seglabel output")
    record.task  # noqa: B018  (a record without a known task is refused before any row is read)
    if not store.exists(SUCCESS_FILE):
        log.warning("%s has no %s: the job is unfinished; exporting the rows committed so far", output,
                    SUCCESS_FILE)
    return store, record


def inspect_output(store: OutputStore) -> dict[str, Any]:
    """The state of an output, from storage alone: its record, rows committed, errors by
    reason, whether it is complete, and how many images a running (or killed) job queued."""
    record = JobRecord.read(store)
    return {
        "output": store.url,
        "job": record.summary() if record is not None else None,
        "complete": store.read_json(SUCCESS_FILE) is not None,
        "parts": len(store.parts()),
        "queued_by_running_job": store.queued(),
        **store.counts(),
    }
