"""Hand a job's labels to annotation tools: COCO, COCO panoptic, Label Studio and CVAT.

``seglabel export OUTPUT --format FMT --to DEST`` reads a finished (or partial) job's outputs
from any fsspec URL and writes them in the tool's own import format:

============== ============================================================================
format         what ``--to`` names, and what is written
============== ============================================================================
coco           a JSON file: COCO instances (images, categories, annotations whose
               ``segmentation`` is COCO compressed RLE, with ``score``)
coco-panoptic  a folder: ``panoptic.json`` (COCO panoptic: images, annotations with
               ``segments_info``, categories with ``isthing``) and ``panoptic/<key>.png``
               (RGB, ``id = R + 256·G + 256²·B``); panoptic outputs only
label-studio   a JSON file: a list of tasks, each with one prediction of ``brushlabels``
               results in Label Studio's own brush RLE
cvat           a zip CVAT imports as "COCO 1.0": ``annotations/instances_default.json``
               (the COCO instances JSON above, without scores); images are matched by
               ``file_name`` (the key) against the task's frames
============== ============================================================================

With ``shard_size`` every file holds at most that many images and is numbered
(``coco.json`` → ``coco-00000.json``, ``coco-00001.json``, …; ``panoptic-00000.json``;
``cvat-00000.zip``), since one JSON for 10^7 images is of no use to any tool.

Decisions (also in ``export --help``):

* Rows are streamed: Parquet parts are read one at a time, in row batches, and each image's
  output is written as soon as it is read; memory does not grow with the corpus (but for the
  check for repeated keys on a partial output: 8 bytes a row, see ``OutputStore.superseded``;
  on an output a run finished it is skipped). A COCO file
  streams its ``images`` straight out and keeps its ``annotations`` in a temporary spool
  (memory, then disk) until the images are done.
* Only ``ok`` rows are exported; ``error`` rows (which have no masks) are counted and skipped,
  which also drops an error row that a ``--retry-errors`` run replaced by an ok row.
* Images come in the output's order, or with ``order="review"`` most doubtful first (review
  score descending; the rows are spooled to a local temporary file first). A Label Studio
  task's prediction ``score`` is one minus the row's review score (Label Studio takes it for
  confidence and serves the lowest first), and its data holds ``review_score`` itself.
* COCO ``file_name`` is the image's key; image ids count 1..N across all shards; category id
  = ``label_id + 1`` (COCO reserves 0), names from ``job.json``'s ``id2label``.
* COCO from **instance** outputs: one annotation per segment (the exact, possibly overlapping
  mask). From **panoptic** outputs: the thing segments (``is_thing`` true); when the label set's
  things were unknown at run time (``is_thing`` null, no stuff was fused) every segment is
  exported, with a warning. From **semantic** outputs: one annotation per label present in an
  image, as COCO-Stuff does, with ``iscrowd: 1`` because such a region may hold many objects,
  and no score (semantic segments have none; ``min_score`` is then an error).
* The masks are copied as they are: COCO RLE ``counts`` straight from the Parquet rows, the
  panoptic PNGs byte for byte unless a filter drops segments (then dropped ids become void, 0).
* ``labels`` keep only those labels (names or ids), and only their categories are listed;
  ``min_score`` keeps segments scoring at least that.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Any, Mapping, Sequence

from ..core.errors import ConfigError, ExportError, LabelMapError, OutputError, one_line
from ..core.labels import resolve_labels
from ..core.redaction import get_logger
from ..outputs.labelmap import LabelSpace
from ..outputs.order import check_order
from ..outputs.reader import OutputReader
from ..storage.location import Destination
from .coco import CocoWriter, CvatWriter
from .label_studio import LabelStudioWriter
from .panoptic import PanopticWriter
from .writer import ExportOptions, ExportRun, SegmentFilter, Writer

log = get_logger(__name__)


def _write_label_map(dest: Destination, folder: bool, record: Mapping[str, Any]) -> str:
    """The label map an export used, beside it: ``DEST/label-map.json`` for a folder,
    ``<DEST without its extension>.label-map.json`` for a file."""
    path = dest.path("label-map.json") if folder else posixpath.splitext(dest.root)[0] + ".label-map.json"
    dest.write_file(path, json.dumps(record, indent=2, ensure_ascii=False).encode("utf-8"))
    return path


def _segment_filter(space: LabelSpace, things_only: bool, min_score: float | None,
                    labels: Sequence[str] | None) -> SegmentFilter:
    """The segments to export (``labels`` name the export's labels: the team's, with a label
    map); ``things_only``: the format's instances are things only."""
    if min_score is not None and space.task == "semantic":
        raise ExportError("--min-score does not apply: semantic outputs have no scores")
    label_ids = None
    if labels is not None:
        names = [str(x).strip() for x in labels if str(x).strip()]
        if not names:
            raise ExportError("--labels is empty: name at least one label")
        try:
            owner = "the label map" if space.record is not None else "this model"
            label_ids = resolve_labels(space.names, names, owner=owner)
        except ValueError as exc:
            raise ExportError(str(exc)) from exc
    things_only = things_only and space.task == "panoptic"
    if things_only and space.things is None:
        log.warning(
            "the label set's things are unknown (give --thing-labels when running the job): "
            "exporting every panoptic segment as an instance"
        )
    return SegmentFilter(min_score, label_ids, things_only)


# One writer per format (seglabel.formats.coco, .panoptic, .label_studio).
WRITERS: dict[str, type[Writer]] = {
    "coco": CocoWriter,
    "coco-panoptic": PanopticWriter,
    "label-studio": LabelStudioWriter,
    "cvat": CvatWriter,
}
FORMATS = tuple(WRITERS)
MASK_FORMATS = ("rle", "polygon")


# -- the entry point -------------------------------------------------------------------------


def export(
    output: str,
    fmt: str,
    to: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    to_storage_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict:
    """Export a job's output (``output``, any fsspec URL) to ``to`` in format ``fmt``.

    ``storage_options`` are fsspec options for ``output``, ``to_storage_options`` for ``to``;
    ``options`` are :class:`ExportOptions`' fields by name (``min_score``, ``labels``,
    ``shard_size``, ``from_name``, ``to_name``, ``image_prefix_map``).

    Returns counts: ``images`` (exported), ``annotations`` (segments exported),
    ``error_rows`` (skipped), ``masks`` (PNGs written) and ``files`` (the JSON or zip files
    written, in order). Raises :class:`ExportError` with one readable line.
    """
    try:
        settings = ExportOptions(**options)
    except TypeError as exc:
        raise ExportError(f"export: {exc}") from exc
    writer = WRITERS.get(fmt)
    if writer is None:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if settings.mask_format not in MASK_FORMATS:
        raise ExportError(f"--mask-format must be one of {', '.join(MASK_FORMATS)}, "
                          f"got {settings.mask_format!r}")
    if settings.mask_format == "polygon" and fmt == "coco-panoptic":
        raise ExportError("--mask-format polygon: COCO panoptic holds its masks as PNGs")
    if not (math.isfinite(settings.polygon_tolerance) and settings.polygon_tolerance >= 0):
        raise ExportError("--polygon-tolerance must be a number of pixels, 0 or more, "
                          f"got {settings.polygon_tolerance}")
    try:
        check_order(settings.order)
    except ConfigError as exc:
        raise ExportError(str(exc)) from exc
    if settings.shard_size is not None and settings.shard_size < 1:
        raise ExportError(f"--shard-size must be at least 1, got {settings.shard_size}")
    try:
        return _export(output, writer, fmt, to, settings, storage_options, to_storage_options)
    except (OutputError, ConfigError) as exc:  # the output or the destination: unreadable, refused
        if isinstance(exc, ExportError):
            raise
        raise ExportError(str(exc)) from exc


def _export(output: str, writer: type[Writer], fmt: str, to: str, options: ExportOptions,
            storage_options: Mapping[str, Any] | None, to_storage_options: Mapping[str, Any] | None) -> dict:
    reader = OutputReader(output, storage_options, options.label_map, options.unmapped)
    if reader.task not in writer.tasks:
        needs = " or ".join(writer.tasks)
        raise ExportError(f"{fmt} needs a {needs} output; {output} holds {reader.task} masks "
                          "(use --format coco)")
    try:
        space = reader.space
    except LabelMapError as exc:
        raise ExportError(str(exc)) from exc
    keep = _segment_filter(space, writer.things_only, options.min_score, options.labels)
    dest = Destination(to, to_storage_options)
    reader.store.refuse_inside(dest, "--to")
    if not writer.folder and (to.endswith("/") or dest.is_dir()):
        raise ExportError(f"--to must name a file for {fmt}, and {to} is a folder")
    counts: dict[str, Any] = {"format": fmt, "images": 0, "annotations": 0, "masks": 0, "files": []}
    try:
        run = ExportRun(reader, dest, keep, options, counts)
        writer(run).write(reader.mapped(reader.ok_rows(options.order)))
        if space.record is not None:
            counts["label_map"] = _write_label_map(dest, writer.folder, space.record)
    except OSError as exc:  # storage: permissions, a full disk, an unreachable endpoint
        raise ExportError(f"export to {to} failed: {type(exc).__name__}: {one_line(exc)}") from exc
    counts["error_rows"] = reader.counts.error
    log.info(
        "exported %d images, %d annotations (%d error rows skipped) from %s as %s to %d file(s) under %s",
        counts["images"], counts["annotations"], reader.counts.error, output, fmt, len(counts["files"]), to,
    )
    return counts
