"""An output's life, decided in one place.

    new ──(record written)──> recorded ──(masks, then parts)──> labeled ──(every image has a
    row)──> _SUCCESS

* **new**: no ``job.json``. A folder without one that holds ``masks/`` or ``metadata/`` is not
  seglabel's (a dataset's own masks), or lost its record: refused, with or without
  ``--overwrite``, before anything is written.
* **recorded**: ``job.json`` names the input, the checkpoint and every setting that changes
  masks; it is written before any mask, and the dtype once the Segmenters' device is known. A
  resume must match it; ``--overwrite`` clears what the previous run made and writes the new
  record at once; ``--retry-errors`` drops the error rows so they are labeled again.
* **labeled**: masks are written before the rows that name them; parts are committed by the
  driver (:mod:`seglabel.job.commit`); a killed run leaves whole parts, and its temporary files
  are swept by the next.
* **_SUCCESS**: written last, once every input image has a row (not while ``--limit`` holds
  some back); removed as soon as a run will add rows.
* **abandoned**: a new output whose run labeled nothing (its Segmenters refused the checkpoint,
  say) loses its record again, so the next run starts as if this one never had; one that holds
  masks keeps it, or the folder would no longer be seglabel's to resume or overwrite.

The record's contents and its comparisons are :mod:`seglabel.outputs.record`'s; the files are
the output store's (:mod:`seglabel.outputs.store`); this module decides when each is written.
"""

from __future__ import annotations

from typing import Any

from ..core.config import JobConfig
from ..core.errors import OutputError
from ..core.redaction import get_logger, redact_url
from ..engine.resolve import ResolvedCheckpoint
from ..outputs.contract import JOB_FILE, MASKS_DIR, METADATA_DIR, SUCCESS_FILE
from ..outputs.record import JobRecord
from ..outputs.store import OutputStore

log = get_logger(__name__)


def new_record(config: JobConfig, checkpoint: ResolvedCheckpoint) -> JobRecord:
    """The record a new output gets."""
    return JobRecord.new(config, checkpoint.task, checkpoint.revision, checkpoint.id2label, checkpoint.family,
                         checkpoint.license)


class OutputLife:
    """One run's dealings with its output's state: checked before the run takes the output's
    lease (:meth:`check`), made ready under it (:meth:`prepare`), the dtype recorded once known
    (:meth:`settle`), and finished (:meth:`finish`) or abandoned (:meth:`abandon`)."""

    def __init__(self, store: OutputStore, config: JobConfig, checkpoint: ResolvedCheckpoint):
        self.store = store
        self.config = config
        self.checkpoint = checkpoint
        # The record this run labels under (None until a new output's is first written), and
        # whether this run made it (a new output, or one --overwrite cleared); set by prepare().
        self.record: JobRecord | None = None
        self.fresh = True

    @property
    def resuming(self) -> bool:
        """Whether the output's committed rows count as done for this run."""
        return not self.fresh

    def check(self) -> None:
        """Refuse, before anything is written, an output folder that is not seglabel's or
        whose record is damaged."""
        if JobRecord.read(self.store) is None:
            self._refuse_foreign()

    def prepare(self) -> JobRecord | None:
        """The output made ready for the run, under its lease; returns the record it had (None:
        a new output, or one that ``--overwrite`` clears). A folder that is not seglabel's, or a
        resume with another input or other mask settings, is refused; a killed run's temporary
        files go; with ``--retry-errors`` the error rows go."""
        store, config, checkpoint = self.store, self.config, self.checkpoint
        previous = JobRecord.read(store)
        if previous is None:
            self._refuse_foreign()
        if config.overwrite:
            if not config.dry_run and previous is not None:
                log.info("--overwrite: removed the previous job's %d masks and its metadata", store.clear())
                # The new record at once: masks a killed run wrote but never committed stay, and a
                # folder with masks and no record would be refused by the next run.
                new_record(config, checkpoint).write(store)
            previous = None  # a dry run of --overwrite counts as the real one would: from scratch
        elif previous is not None:
            previous.check_resume(config, checkpoint.task, checkpoint.revision, checkpoint.family)
        if not config.dry_run:
            store.clean_temporary()
            if config.retry_errors and previous is not None:
                log.info("dropped %d error rows to process them again", store.drop_error_rows())
        self.fresh = previous is None
        self.record = previous  # a new output's is made when first written: started after enumeration
        return previous

    def settle(self, dtype: str) -> None:
        """Once the Segmenters' device is known, before any image is read: the dtype they will
        use is recorded (a new output's record is written now), or checked against the one
        recorded. ``_SUCCESS`` goes: it is stale until every new image has a row."""
        record, revision = self._record(), self.checkpoint.revision
        if self.fresh:
            record.replace(dtype=dtype).write(self.store)
        else:
            record.check_dtype(dtype, self.store.url)
            if record.values.get("dtype") is None or record.revision != revision:
                # Recorded before they were known (a first run with nothing to do, an older
                # seglabel): recorded now, so that the next run is checked against them.
                record.replace(dtype=dtype, revision=revision).write(self.store)
        self.store.remove(SUCCESS_FILE)

    def abandon(self, rows_seen: int) -> None:
        """After a failed run that got ``rows_seen`` rows from its stages: a new output that got
        none and holds no mask loses its record (the next run starts as if this one never
        had)."""
        if self.fresh and rows_seen == 0 and not self.store.holds(MASKS_DIR):
            self.store.remove(JOB_FILE)

    def finish_idle(self, found: int, held_back: int) -> dict[str, Any]:
        """A run with nothing to label: the output's record and ``_SUCCESS`` made right;
        returns the output's totals (empty where they were not counted)."""
        if self.fresh:
            self._record().write(self.store)
        if found == 0:
            log.warning("no images found under %s", self.config.input or self.config.manifest)
        if held_back:
            self.store.remove(SUCCESS_FILE)
        elif found == 0 or not self.store.exists(SUCCESS_FILE):
            totals = self.store.counts(remember=True)
            self.store.write_json(SUCCESS_FILE, totals)
            return totals
        return {}

    def finish(self, todo: int, processed: int, held_back: int, actors: dict[str, int]) -> dict[str, Any]:
        """The output's totals after a run that labeled ``processed`` of its ``todo`` images,
        and ``_SUCCESS`` once every input image has a row."""
        totals = self.store.counts(remember=True)
        if processed < todo:
            # Every row is committed or the job fails; should one be missing all the same,
            # _SUCCESS would lie: the next run labels what is missing.
            log.warning("%d of %d images got no row: not writing _SUCCESS", todo - processed, todo)
        elif not held_back:
            self.store.write_json(SUCCESS_FILE, {**totals, "actors": actors})
        return totals

    def _record(self) -> JobRecord:
        """The record this run labels under: the output's, or a new one made now."""
        if self.record is None:
            self.record = new_record(self.config, self.checkpoint)
        return self.record

    def _refuse_foreign(self) -> None:
        """Refuse an output folder without a record that holds ``masks/`` or ``metadata/``: not
        an output of seglabel's (a dataset keeping its ground truth in ``masks/``), or one whose
        record is lost, whose rows' settings are then unknown. Either way its files are not ours
        to overwrite or to add rows to."""
        held = [f"{rel}/" for rel in (MASKS_DIR, METADATA_DIR) if self.store.holds(rel)]
        if not held:
            return
        where = f"{redact_url(self.config.output)} has {' and '.join(held)} but no {JOB_FILE}"
        if self.config.overwrite:
            raise OutputError(f"{where}: it is not an output of seglabel's, and --overwrite clears only "
                              "those; move those folders away or choose another output")
        raise OutputError(f"{where}: the settings of its rows are unknown, so it cannot be resumed; "
                          f"restore its {JOB_FILE}, or choose another output")
