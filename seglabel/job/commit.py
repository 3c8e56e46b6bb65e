"""The driver's end of the pipeline: rows in, Parquet parts committed, the error budget kept.

A row counts as done only once the part holding it is committed; a part is written by the
driver alone, with a name no other run uses (``part-<run id>-<n>.parquet``), so that a killed
run leaves whole parts and a resume labels only what no part holds.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from ..core.errors import JobError
from ..core.keys import Bits
from ..core.redaction import get_logger
from ..outputs.store import OutputStore, RowCounts

log = get_logger(__name__)

# A part is committed once it holds --rows-per-part rows or this many bytes of rows, whichever
# comes first: rows of large photos with many instances carry megabytes of RLE each.
PART_MAX_BYTES = 64 << 20
# A fraction given as --max-errors is judged only once this many images have been seen, so
# that one bad image among the first few does not stop a job.
MAX_ERRORS_MIN_SEEN = 100
# Seconds between progress lines in the log.
PROGRESS_EVERY_S = 30


def too_many_errors(max_errors: float | None, errors: int, seen: int) -> bool:
    """Whether ``errors`` of ``seen`` images exceed ``--max-errors`` (a count, or a fraction)."""
    if max_errors is None:
        return False
    if 0 < max_errors < 1:
        return seen >= MAX_ERRORS_MIN_SEEN and errors > max_errors * seen
    return errors > max_errors


@dataclass
class Committer:
    """Commits one run's rows in parts of ``rows_per_part`` rows (or ``PART_MAX_BYTES``)."""

    store: OutputStore
    run_id: str
    rows_per_part: int
    pending: list[pa.Table] = field(default_factory=list)
    # Called before each part is written: raises when this run may no longer commit (its lease lost).
    guard: Callable[[], None] = lambda: None
    pending_rows: int = 0
    pending_bytes: int = 0
    part: int = 0

    def add(self, table: pa.Table) -> None:
        """Hold a batch of rows; commit every part they fill."""
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.pending_bytes += table.nbytes
        while self.pending_rows >= self.rows_per_part or (
                self.pending_rows and self.pending_bytes >= PART_MAX_BYTES):
            table = pa.concat_tables(self.pending).combine_chunks()
            self._write(table.slice(0, self.rows_per_part))
            rest = table.slice(self.rows_per_part)
            self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
            self.pending_bytes = rest.nbytes if rest.num_rows else 0

    def flush(self) -> None:
        """Commit what is held."""
        if self.pending_rows:
            self._write(pa.concat_tables(self.pending))
            self.pending, self.pending_rows, self.pending_bytes = [], 0, 0

    def _write(self, table: pa.Table) -> None:
        self.guard()
        name = f"part-{self.run_id}-{self.part:05d}.parquet"
        self.store.write_part(table.drop_columns(["actor", "index"]), name)
        self.part += 1


@dataclass(frozen=True)
class Committed:
    """What a run committed: rows by status, and ok rows by the Segmenter actor that made them."""

    processed: int = 0
    ok: int = 0
    error: int = 0
    actors: dict[str, int] = field(default_factory=dict)


# The rows' store, this run's id and to-do count, and its limits, as the job passes them.
def commit_rows(batches: Iterable[pa.Table], store: OutputStore, run_id: str, todo: int, rows_per_part: int,
                max_errors: float | None, guard: Callable[[], None] = lambda: None,
                counts: RowCounts | None = None) -> Committed:
    """Consume the pipeline's rows (this run's ``todo`` of them, each with its ``index`` in the
    to-do order and the ``actor`` that labeled it), commit them, and say what was committed.
    Stops with :class:`JobError`, once what is done is committed, past ``max_errors``; ``guard``
    is called before each part is written. Every row taken is counted into ``counts`` as it
    comes (the caller's, to read should the commit fail: whether the run got any row)."""
    from tqdm import tqdm

    committer = Committer(store, run_id, rows_per_part, guard=guard)
    counts = RowCounts() if counts is None else counts
    actors: Counter[str] = Counter()
    # One bit per row of this run's todo list (its "index" column), not a set of keys.
    committed = Bits(todo)
    last_log = time.monotonic()
    started = time.perf_counter()
    with tqdm(total=todo, unit="img", desc="labeling", disable=None) as bar:
        for batch in batches:
            # Ray yields a task's rows once even when it retried the task; this guards the
            # contract (every image exactly once) against any duplicate all the same.
            fresh = committed.first(batch.column("index").to_numpy())
            if not fresh.all():
                log.warning("dropping %d duplicate rows", len(fresh) - int(fresh.sum()))
                batch = batch.filter(pa.array(fresh))
            ok = counts.add(batch)
            by_actor = pa.compute.value_counts(batch.column("actor").filter(ok))
            actors.update(dict(zip(by_actor.field("values").to_pylist(),
                                   by_actor.field("counts").to_pylist())))
            committer.add(batch)
            bar.update(batch.num_rows)
            if too_many_errors(max_errors, counts.error, counts.total):
                # Commit what is done, so that a re-run after fixing the cause resumes here.
                committer.flush()
                raise JobError(
                    f"stopped: {counts.error} of {counts.total} images failed, over --max-errors "
                    f"{max_errors:g}; see the error rows in {store.url}/metadata/ (seglabel inspect)"
                )
            if time.monotonic() - last_log > PROGRESS_EVERY_S:
                rate = counts.total / (time.perf_counter() - started)
                log.info("%d / %d images, %.1f images/s", counts.total, todo, rate)
                last_log = time.monotonic()
        committer.flush()
    return Committed(counts.total, counts.ok, counts.error, dict(actors))
