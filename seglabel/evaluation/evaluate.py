"""``seglabel eval``: how good a job's labels are, scored against a labeled sample.

A job's output (local or object storage, finished or partial) is scored against ground truth
(:mod:`seglabel.evaluation.truth`) by the job's task, with the figures the field reports:

One scorer per task (:mod:`.instance`, :mod:`.panoptic`, :mod:`.semantic`); the report and the
per-image table are :mod:`.report`'s.

* **instance**: mask AP by pycocotools' ``COCOeval`` (``iouType="segm"``): its twelve stats
  (AP, AP50, AP75, AP small/medium/large, AR@1/10/100, AR small/medium/large) and AP per
  category (precision averaged over IoU thresholds and recall, area "all", 100 detections,
  as detectron2 reports it). The job's RLEs and scores go in as COCO results, built as
  ``seglabel export --format coco`` writes them, so the figures are those of pycocotools run
  on the exported JSON.
* **panoptic**: PQ, SQ, RQ overall, for things and for stuff, and per category, with
  panopticapi's ``pq_compute`` semantics (a match is IoU > 0.5 within a category; a truth
  segment's area is its JSON ``area``; void pixels (id 0) leave a prediction's union; crowd
  truth is never missed, and a prediction more than half void or crowd of its category is
  no false positive).
* **semantic**: a confusion matrix accumulated image by image: IoU per class (classes that
  neither truth nor prediction hold are left out), mIoU, pixel accuracy. Truth pixels at
  ``ignore_index`` are not scored; predicted pixels that a job's filters dropped are "no
  label" (wrong for every class).

Images are matched by key (:class:`~seglabel.evaluation.matching.KeyMatcher`) and categories by name. Only
images that both hold, with an ok row, are scored; truth images the output lacks, output
rows the truth lacks, error rows and ambiguous names are counted and reported. Predicted
segments of labels the truth's categories do not list are left out, and counted (pycocotools
ignores them too; panopticapi would stop).

The review order is checked too: Spearman's rank correlation of each scored image's review score
(:mod:`seglabel.core.review`) and its quality, over the images that have both (-1: the images the
score puts first are exactly the worst ones).

Memory: panoptic and semantic stream image by image (one image's truth and masks at a time,
plus per image a key and a row of the per-image table); instance holds the sample, truth and
predictions, as COCOeval does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..core.config import DEFAULT_MAX_BYTES
from ..core.errors import ConfigError, EvalError, LabelMapError, OutputError, one_line
from ..core.redaction import get_logger
from ..outputs.reader import OutputReader
from ..outputs.store import OutputStore
from ..storage.filesystem import open_url
from .instance import InstanceScorer
from .matching import KeyMatcher
from .panoptic import PanopticScorer
from .report import PerImageTable, ReportFiles
from .scoring import Scorer
from .semantic import SemanticScorer
from .truth import (
    PngFolder,
    TruthImage,
    panoptic_folder,
    read_coco,
    read_truth_labels,
)

log = get_logger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    """How to score, beyond the output and the truth: ``truth_masks`` (a panoptic truth's PNG
    folder), ``truth_labels`` (names of a semantic truth's ids), ``ignore_index``, ``limit``
    (score the first N matched images, in the truth's order), ``per_image`` (a Parquet file of
    one row per scored image) and ``json`` (the report), ``max_bytes`` (per truth PNG),
    ``label_map`` and ``unmapped`` (score in a team's labels: :mod:`seglabel.outputs.labelmap`), and
    fsspec options for the output, the truth, and where the files go."""

    truth_masks: str | None = None
    truth_labels: str | None = None
    label_map: str | None = None
    unmapped: str = "drop"
    ignore_index: int = 255
    limit: int | None = None
    per_image: str | None = None
    json: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    storage_options: Mapping[str, Any] | None = None
    truth_storage_options: Mapping[str, Any] | None = None
    to_storage_options: Mapping[str, Any] | None = None


# -- instance ----------------------------------------------------------------------------------


# -- panoptic ----------------------------------------------------------------------------------


# -- semantic ----------------------------------------------------------------------------------


# -- the run -----------------------------------------------------------------------------------


@dataclass
class _Sample:
    """The truth's images, in its order, and the scorer for the job's task."""

    images: list[TruthImage]
    scorer: Scorer
    strip_extension: bool = False


def _is_folder(url: str, storage_options: Mapping[str, Any] | None) -> bool:
    try:
        fs, path = open_url(url, storage_options)
        return bool(fs.isdir(path))
    except Exception as exc:  # credentials, endpoint
        raise EvalError(f"cannot open the truth {url}: {one_line(exc)}") from exc


def _sample(truth: str, reader: OutputReader, options: EvalOptions) -> _Sample:
    """Read and check the truth, and the scorer for the job's task."""
    job, space = reader.record, reader.space
    if _is_folder(truth, options.truth_storage_options):
        if job.task != "semantic":
            raise EvalError(f"the truth {truth} is a folder of label PNGs (semantic) and the output holds "
                            f"{job.task} masks: give a COCO {job.task} JSON")
        classes = (read_truth_labels(options.truth_labels, options.truth_storage_options)
                   if options.truth_labels else dict(space.names))
        folder = PngFolder(truth, options.truth_storage_options, options.max_bytes, "the truth PNG")
        scorer = SemanticScorer(folder, classes, space, options.ignore_index)
        images = []
        for name, uri in folder.listing():
            scorer.uris[name] = uri
            images.append(TruthImage(name, len(images)))
        return _Sample(images, scorer, strip_extension=True)
    if options.truth_labels:
        raise EvalError("--truth-labels names a semantic truth's ids; a COCO truth names its categories")
    coco = read_coco(truth, options.truth_storage_options, set(space.names.values()))
    if coco.kind != job.task:
        raise EvalError(f"the truth {truth} is COCO {coco.kind} and the output holds {job.task} masks")
    if coco.kind == "instance":
        return _Sample(coco.images, InstanceScorer(coco, space))
    images = coco.images
    folder = PngFolder(panoptic_folder(coco, options.truth_masks), options.truth_storage_options,
                       options.max_bytes, "the truth PNG")
    if not _is_folder(folder.url, options.truth_storage_options):
        raise EvalError(f"the folder of the truth's PNGs, {folder.url}, does not exist "
                        "(give it with --truth-masks)")
    return _Sample(images, PanopticScorer(coco, folder, space))


@dataclass
class _Matched:
    """Which truth images are scored, by key, and what was not."""

    selected: dict[str, TruthImage]
    counts: dict[str, Any]


def _match(store: OutputStore, sample: _Sample, limit: int | None) -> _Matched:
    """Match the output's rows to the truth's images by key (a pass over keys and statuses).
    Every truth image is counted once, as scored or why not; every output row either is a
    truth image's match or counts in ``output_only``."""
    matcher = KeyMatcher((i.name for i in sample.images), strip_extension=sample.strip_extension)
    status: dict[str, str] = {}
    rows = 0
    for batch in store.iter_batches(["key", "status"], 8192):
        for key, state in zip(batch.column("key").to_pylist(), batch.column("status").to_pylist()):
            rows += 1
            if matcher.add(key):
                status[key] = state
    matched = matcher.matched()
    selected: dict[str, TruthImage] = {}
    counts = dict.fromkeys(("truth_only", "ambiguous", "error_rows", "unannotated", "over_limit"), 0)
    for index, image in enumerate(sample.images):
        key = matched.get(index)
        if key is None:
            counts["ambiguous" if matcher.is_ambiguous(index) else "truth_only"] += 1
        elif status[key] != "ok":
            counts["error_rows"] += 1
        elif not image.scorable:
            counts["unannotated"] += 1
        elif limit is not None and len(selected) >= limit:
            counts["over_limit"] += 1
        else:
            selected[key] = image
    return _Matched(selected, {"truth_images": len(sample.images), "output_rows": rows,
                               "scored": len(selected), **counts, "output_only": rows - len(matched)})


def evaluate(output: str, truth: str, **options: Any) -> dict[str, Any]:
    """Score a job's output (``output``, any fsspec URL) against the truth at ``truth``.

    ``options`` are :class:`EvalOptions`' fields by name. Returns the report: ``task``,
    ``images`` (``truth_images`` = ``scored`` + ``truth_only`` + ``ambiguous`` +
    ``error_rows`` + ``unannotated`` + ``over_limit``; ``output_rows`` = matched rows +
    ``output_only``), ``overall`` figures, ``categories`` (sorted
    worst first; a category with no figure last) and ``left_out_segments``. Writes the
    per-image table and the JSON report where asked, only when it succeeds. Raises
    :class:`~seglabel.core.errors.EvalError` with one readable line.
    """
    try:
        settings = EvalOptions(**options)
    except TypeError as exc:
        raise EvalError(f"eval: {exc}") from exc
    if settings.limit is not None and settings.limit < 1:
        raise EvalError(f"--limit must be at least 1, got {settings.limit}")
    try:
        return _evaluate(output, truth, settings)
    except (OutputError, LabelMapError, ConfigError) as exc:  # unreadable, or refused (a destination)
        if isinstance(exc, EvalError):
            raise
        raise EvalError(str(exc)) from exc


def _evaluate(output: str, truth: str, options: EvalOptions) -> dict[str, Any]:
    reader = OutputReader(output, options.storage_options, options.label_map, options.unmapped)
    job = reader.record
    files = ReportFiles(options.json, options.per_image, options.to_storage_options)
    for flag, dest in files.places.items():
        reader.store.refuse_inside(dest, flag)
    sample = _sample(truth, reader, options)
    matched = _match(reader.store, sample, options.limit)
    if not matched.selected:
        log.warning("no image of the truth matched an ok row of the output: nothing to score")
    with PerImageTable() as table:
        for row in reader.rows():
            image = matched.selected.get(row["key"])
            if image is not None and row["status"] == "ok":
                table.add(row["key"], sample.scorer.score(image, row, reader), row["review_score"])
        result = sample.scorer.result()
        figure = {"instance": "AP", "panoptic": "PQ", "semantic": "IoU"}[job.task]
        result["categories"].sort(key=lambda c: (c[figure] is None, c[figure] or 0))
        report = {"task": job.task, "output": output, "truth": truth, "model": job.model_version,
                  "images": matched.counts, **result, "left_out_segments": sample.scorer.left_out,
                  "review_order": table.review_order()}
        files.publish(report, table)
    return report


# -- what a person and a script read -------------------------------------------------------------
