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

import itertools
import json
import math
import posixpath
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np
from pycocotools import mask as mask_utils

from ..core.errors import ConfigError, ExportError, LabelMapError, OutputError, one_line
from ..core.labels import palette_color, resolve_labels
from ..core.masks import decode_png, encode_png
from ..core.redaction import get_logger
from ..core.version import __version__
from ..outputs.contract import checked_key
from ..outputs.labelmap import LabelSpace, remap_ids
from ..outputs.order import check_order
from ..outputs.reader import OutputReader
from ..storage.location import Destination
from .polygons import DEFAULT_TOLERANCE, coco_polygons, outline

log = get_logger(__name__)

# A COCO file's annotations wait in memory up to this size, then in a temporary file.
SPOOL_MEMORY = 32 << 20
# Where CVAT's "COCO 1.0" importer looks for the annotations of the "default" subset.
CVAT_MEMBER = "annotations/instances_default.json"
CVAT_IMAGES_DIR = "images/"
PANOPTIC_JSON = "panoptic.json"
PANOPTIC_PNG_DIR = "panoptic"


def _write_label_map(dest: Destination, folder: bool, record: Mapping[str, Any]) -> str:
    """The label map an export used, beside it: ``DEST/label-map.json`` for a folder,
    ``<DEST without its extension>.label-map.json`` for a file."""
    path = dest.path("label-map.json") if folder else posixpath.splitext(dest.root)[0] + ".label-map.json"
    dest.write_file(path, json.dumps(record, indent=2, ensure_ascii=False).encode("utf-8"))
    return path


# -- filters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentFilter:
    """Which segments to export: at least ``min_score``, and one of ``label_ids``."""

    min_score: float | None = None
    label_ids: frozenset[int] | None = None
    # For COCO instances from panoptic outputs: stuff segments (is_thing false) are left out.
    things_only: bool = False

    def keep(self, seg: Mapping[str, Any]) -> bool:
        if self.label_ids is not None and seg["label_id"] not in self.label_ids:
            return False
        if self.min_score is not None and (seg["score"] is None or seg["score"] < self.min_score):
            return False
        if self.things_only and seg.get("is_thing") is False:
            return False
        return True

    def apply(self, segments: Iterable[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
        return [s for s in segments or () if self.keep(s)]


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


def _categories(space: LabelSpace, label_ids: frozenset[int] | None, panoptic: bool) -> list[dict]:
    """COCO categories: id = label_id + 1 (COCO reserves 0), only the labels kept."""
    out = []
    for label_id, name in sorted(space.names.items()):
        if label_ids is not None and label_id not in label_ids:
            continue
        category: dict[str, Any] = {"id": label_id + 1, "name": name, "supercategory": ""}
        if panoptic:
            # Unknown things: every segment is its own region (nothing was fused), as things are.
            category["isthing"] = 1 if space.things is None or label_id in space.things else 0
            category["color"] = list(palette_color(label_id))
        out.append(category)
    return out


# -- writing files ---------------------------------------------------------------------------


def _dump(value: Any) -> bytes:
    # ASCII JSON (non-ASCII as \\u escapes): every reader decodes it, whatever its locale.
    return json.dumps(value, separators=(",", ":")).encode("ascii")


class _JsonArray:
    """Items of one JSON array, written to a stream as they come."""

    def __init__(self, out: IO[bytes]):
        self.out = out
        self.count = 0

    def add(self, item: Any) -> None:
        self.out.write(b",\n" if self.count else b"\n")
        self.out.write(_dump(item))
        self.count += 1


class _CocoFile:
    """One COCO JSON being written: ``images`` stream straight out, the other list waits in a
    spool (memory, then a temporary file) until the images are done, then follows them."""

    def __init__(self, out: IO[bytes], head: Mapping[str, Any], spooled: str = "annotations"):
        self.out = out
        self.spooled = spooled
        out.write(b"{")
        for name, value in head.items():
            out.write(_dump(name) + b":" + _dump(value) + b",\n")
        out.write(b'"images":[')
        self.images = _JsonArray(out)
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
        self.annotations = _JsonArray(self._spool)

    def close(self) -> None:
        self.out.write(b"],\n" + _dump(self.spooled) + b":[")
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, self.out)
        self._spool.close()
        self.out.write(b"]}\n")


def _shards(rows: Iterator[dict], size: int | None) -> Iterator[tuple[int | None, Iterator[dict]]]:
    """Consecutive groups of at most ``size`` rows (all rows when ``size`` is None), lazily.

    Always yields at least one (possibly empty) group, so an export always writes a file. Each
    group must be consumed before the next is asked for.
    """
    if size is None:
        yield None, rows
        return
    first = next(rows, None)
    index = 0
    if first is None:
        yield 0, iter(())
        return
    while first is not None:
        yield index, itertools.chain([first], itertools.islice(rows, size - 1))
        index += 1
        first = next(rows, None)


def _info(reader: OutputReader) -> dict:
    now = datetime.now(timezone.utc)
    job, space = reader.record, reader.space
    mapping = {"label_map": space.record} if space.record else {}
    return {
        "description": f"seglabel {job.task} labels from {reader.url}",
        "contributor": "seglabel",
        "url": "",
        "version": __version__,
        "year": now.year,
        "date_created": now.isoformat(timespec="seconds"),
        "model": job.model_version,
        "task": job.task,
        **mapping,
    }


# -- one writer per format -------------------------------------------------------------------


@dataclass(frozen=True)
class ExportOptions:
    """How to export, beyond the format and where: ``min_score`` and ``labels`` (names or ids)
    filter segments; ``shard_size`` splits the export into numbered files of at most that many
    images; ``from_name`` / ``to_name`` are the Label Studio control and object tag names;
    ``image_prefix_map`` rewrites image URIs for Label Studio
    (``{"s3://bucket/": "https://cdn.example/"}``); ``label_map`` (a file's URL) and
    ``unmapped`` put the export in a team's labels (:mod:`seglabel.labelmap`); ``mask_format``
    ``"polygon"`` writes polygons (:mod:`seglabel.polygons`) simplified within
    ``polygon_tolerance`` pixels, for COCO, CVAT and Label Studio; ``order`` ``"review"``
    writes the images most doubtful first (:func:`seglabel.order.rows_in_order`)."""

    min_score: float | None = None
    labels: Sequence[str] | None = None
    shard_size: int | None = None
    from_name: str = "label"
    to_name: str = "image"
    image_prefix_map: Mapping[str, str] | None = None
    label_map: str | None = None
    unmapped: str = "drop"
    mask_format: str = "rle"
    polygon_tolerance: float = DEFAULT_TOLERANCE
    order: str = "output"


@dataclass
class ExportRun:
    """One export under way: what every writer reads, and the counts it adds to."""

    reader: OutputReader
    dest: Destination
    keep: SegmentFilter
    options: ExportOptions
    counts: dict[str, Any]


class Writer:
    """One format: writes an export's ok rows to its destination, shard by shard. ``folder``:
    the destination is a folder (else a file); ``tasks``: the outputs it takes; ``things_only``:
    a panoptic output's stuff segments are left out (instances are things)."""

    folder: ClassVar[bool] = False
    tasks: ClassVar[tuple[str, ...]] = ("instance", "semantic", "panoptic")
    things_only: ClassVar[bool] = False

    def __init__(self, run: ExportRun):
        self.run = run

    def write(self, rows: Iterator[dict]) -> None:
        """Write every shard of ``rows``, each file whole or not at all."""
        for index, shard in _shards(rows, self.run.options.shard_size):
            path = self.shard_path(index)
            with self.run.dest.open(path) as f:
                self.write_shard(f, shard)
            self.run.counts["files"].append(path)

    def shard_path(self, index: int | None) -> str:
        return self.run.dest.shard(index)

    def write_shard(self, out: IO[bytes], rows: Iterable[dict]) -> None:
        raise NotImplementedError


@dataclass
class _Ids:
    """Image and annotation ids, unique across every shard of one export."""

    image: int = 0
    annotation: int = 0


class CocoWriter(Writer):
    """COCO instances: one JSON a shard, each segment an annotation with its compressed RLE."""

    things_only = True
    scores = True

    def __init__(self, run: ExportRun):
        super().__init__(run)
        self.ids = _Ids()
        self.head = _coco_head(run, panoptic=False)

    def write_shard(self, out: IO[bytes], rows: Iterable[dict]) -> None:
        coco = _CocoFile(out, self.head)
        for row in rows:
            image = _coco_image(row, self.ids)
            coco.images.add(image)
            for ann in self.annotations(row, image["id"]):
                coco.annotations.add(ann)
                self.run.counts["annotations"] += 1
            self.run.counts["images"] += 1
        coco.close()

    def annotations(self, row: dict, image_id: int) -> Iterator[dict]:
        for seg in self.run.keep.apply(row["segments"]):
            self.ids.annotation += 1
            ann = {"id": self.ids.annotation, "image_id": image_id}
            ann.update(coco_annotation(row, seg, self.run.reader.task, self.scores))
            options = self.run.options
            if options.mask_format == "polygon" and not ann["iscrowd"]:
                ann["segmentation"] = _polygons_or_rle(ann["segmentation"], options.polygon_tolerance)
            yield ann


def _polygons_or_rle(rle: dict, tolerance: float) -> Any:
    """A COCO segmentation as polygons: each outer contour of the mask; a mask with holes stays
    RLE (COCO's polygons would fill them; RLE is exact)."""
    mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
    shape = outline(mask, tolerance, holes_stop=True)
    return rle if shape.holes or not shape.polygons else coco_polygons(shape.polygons)


def coco_annotation(row: Mapping[str, Any], seg: Mapping[str, Any], task: str, scores: bool = True) -> dict:
    """One segment of a row as a COCO annotation, without ``id`` and ``image_id``: category
    ``label_id + 1``, the job's RLE as it is, its area and box, and its score to 6 decimals
    (what ``seglabel eval`` scores too, so that its AP is the exported JSON's)."""
    ann = {
        "category_id": seg["label_id"] + 1,
        # pycocotools compressed counts; size = height, width.
        "segmentation": {"size": [row["height"], row["width"]], "counts": seg["rle"]},
        "area": int(seg["area"]),
        "bbox": [float(v) for v in seg["bbox"]],
        # A semantic segment is every pixel of a label: possibly many objects, a "crowd".
        "iscrowd": 1 if task == "semantic" else 0,
    }
    if scores and seg["score"] is not None:
        ann["score"] = round(float(seg["score"]), 6)
    return ann


class CvatWriter(CocoWriter):
    """CVAT "COCO 1.0": a zip a shard, with ``annotations/instances_<subset>.json``. CVAT shapes
    carry no score (an unknown "score" attribute is not part of a task's labels)."""

    scores = False

    def write_shard(self, out: IO[bytes], rows: Iterable[dict]) -> None:
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            # An empty images/ folder: CVAT matches frames by file name and needs no images, but
            # datumaro's COCO importer (what CVAT's is built on) wants one.
            archive.writestr(zipfile.ZipInfo(CVAT_IMAGES_DIR), b"")
            with archive.open(CVAT_MEMBER, "w", force_zip64=True) as member:
                super().write_shard(member, rows)


def _coco_image(row: dict, ids: _Ids) -> dict:
    ids.image += 1
    return {"id": ids.image, "file_name": row["key"], "width": row["width"], "height": row["height"]}


def _coco_head(run: ExportRun, panoptic: bool) -> dict:
    return {
        "info": _info(run.reader),
        # CVAT's own COCO export carries one empty licence; some importers expect the key.
        "licenses": [{"id": 0, "name": "", "url": ""}],
        "categories": _categories(run.reader.space, run.keep.label_ids, panoptic),
    }


class PanopticWriter(Writer):
    """COCO panoptic: ``panoptic.json`` a shard and ``panoptic/<key>.png``, the PNGs of a shard
    written before its JSON, so that a JSON never names a missing PNG."""

    folder = True
    tasks = ("panoptic",)

    def __init__(self, run: ExportRun):
        super().__init__(run)
        self.ids = _Ids()
        self.head = _coco_head(run, panoptic=True)

    def shard_path(self, index: int | None) -> str:
        return self.run.dest.shard(index, PANOPTIC_JSON)

    def write_shard(self, out: IO[bytes], rows: Iterable[dict]) -> None:
        coco, counts, dest = _CocoFile(out, self.head), self.run.counts, self.run.dest
        for row in rows:
            key = checked_key(row["key"])
            image = _coco_image(row, self.ids)
            coco.images.add(image)
            segments = row["segments"] or []
            kept = self.run.keep.apply(segments)
            kept_ids = {int(s["id"]) for s in kept}
            remap = row.get("remap") or {int(s["id"]): int(s["id"]) for s in segments}
            png_name = f"{key}.png"
            png = _panoptic_png(self.run.reader, row, {old: new if new in kept_ids else 0
                                                       for old, new in remap.items()})
            dest.write_file(dest.path(PANOPTIC_PNG_DIR, png_name), png)
            counts["masks"] += 1
            coco.annotations.add({
                "image_id": image["id"],
                "file_name": png_name,
                "segments_info": [
                    {
                        "id": int(s["id"]),
                        "category_id": s["label_id"] + 1,
                        "area": int(s["area"]),
                        "bbox": [float(v) for v in s["bbox"]],
                        "iscrowd": 0,
                    }
                    for s in kept
                ],
            })
            counts["images"] += 1
            counts["annotations"] += len(kept)
        coco.close()


def _panoptic_png(reader: OutputReader, row: dict, remap: Mapping[int, int]) -> bytes:
    """The job's panoptic PNG (already COCO's encoding), each segment id made ``remap``'s: a
    segment fused into another takes its id, a dropped one is void (0)."""
    data = reader.mask_png(row)
    if all(old == new for old, new in remap.items()):
        return data
    return encode_png(remap_ids(decode_png(data, "panoptic"), remap), "panoptic")


# -- Label Studio ----------------------------------------------------------------------------

# Label Studio's brush RLE (label_studio_converter.brush.encode_rle, after thi.ng/rle-pack): a
# bit stream of a 32-bit value count, a 5-bit word size - 1, four 4-bit run-length field sizes
# - 1, then chunks "1 | size index (2 bits) | count - 1 | word" (a repeated word) or
# "0 | size index | count - 1 | words" (literal words), padded to whole bytes.
_LS_WORD = 8
_LS_RLE_SIZES = (3, 4, 8, 16)
_LS_HEADER_TAIL = f"{_LS_WORD - 1:05b}" + "".join(f"{s - 1:04b}" for s in _LS_RLE_SIZES)
_LS_MAX_RUN = 1 << _LS_RLE_SIZES[-1]


def _ls_run(count: int, word: str) -> str:
    """The chunk of one repeated word, ``count`` ≤ 2**16 times."""
    c = count - 1
    if c < 1 << _LS_RLE_SIZES[0]:
        return f"100{c:03b}{word}"
    if c < 1 << _LS_RLE_SIZES[1]:
        return f"101{c:04b}{word}"
    if c < 1 << _LS_RLE_SIZES[2]:
        return f"110{c:08b}{word}"
    return f"111{c:016b}{word}"


def label_studio_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush ``rle`` of a binary (H, W) mask.

    Label Studio stores a brush mask as the RGBA 8-bit image flattened row by row, every
    channel 255 inside the mask and 0 outside (what ``label_studio_converter.brush.mask2rle``
    encodes). Runs are found on the H×W mask, each pixel being 4 equal bytes, so the 4·H·W
    array is never built.
    """
    flat = np.ascontiguousarray(mask).reshape(-1) != 0
    n = 4 * flat.size
    if n >= 1 << 32:
        raise ExportError(f"a {mask.shape[1]}x{mask.shape[0]} mask is too large for Label Studio's brush RLE")
    bits = [f"{n:032b}", _LS_HEADER_TAIL]
    if flat.size:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate(([0], change))
        lengths = np.diff(np.concatenate((starts, [flat.size]))) * 4
        for length, inside in zip(lengths.tolist(), flat[starts].tolist()):
            word = "11111111" if inside else "00000000"
            while length > 0:
                chunk = min(length, _LS_MAX_RUN)
                bits.append(_ls_run(chunk, word))
                length -= chunk
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return np.packbits(np.frombuffer(text.encode("ascii"), dtype=np.uint8) - ord("0")).tolist()


class _UriMap:
    """Rewrites image URIs by prefix (longest prefix wins), for tools that cannot read s3://."""

    def __init__(self, mapping: Mapping[str, str] | None):
        self.pairs = sorted((mapping or {}).items(), key=lambda kv: len(kv[0]), reverse=True)
        self._warned = False

    def __call__(self, uri: str) -> str:
        for old, new in self.pairs:
            if uri.startswith(old):
                rest = uri[len(old):]
                if new.startswith(("http://", "https://", "/")) and not old.startswith(("http://", "https://")):
                    # A key with spaces, '#', '?', '&' or '+' is a valid object name but not a
                    # valid URL path or query value (Label Studio's local files take the path in
                    # "?d="): encoded, it reads back as the key.
                    rest = quote(rest, safe="/")
                return new + rest
        if uri.startswith("file://") and not self._warned:
            self._warned = True
            log.warning(
                "image URIs are local files (%s): Label Studio cannot open file:// URLs; map them "
                "with --image-prefix-map, e.g. file:///data/=/data/local-files/?d=", uri
            )
        return uri


class LabelStudioWriter(Writer):
    """Label Studio: a JSON list of tasks a shard, each with one prediction of ``brushlabels``
    results in Label Studio's own brush RLE."""

    def __init__(self, run: ExportRun):
        super().__init__(run)
        self.uri: Callable[[str], str] = _UriMap(run.options.image_prefix_map)

    def write(self, rows: Iterator[dict]) -> None:
        """The tasks, then the labeling config that shows them (``<DEST stem>.labeling-config.xml``):
        every label the export can hold (``--labels``' or all), so that annotators can also draw
        what the model missed."""
        super().write(rows)
        path = posixpath.splitext(self.run.dest.root)[0] + ".labeling-config.xml"
        kept = self.run.keep.label_ids
        labels = {i: name for i, name in self.run.reader.space.names.items() if kept is None or i in kept}
        config = labeling_config(labels, self.run.options.mask_format, self.run.options.from_name,
                                 self.run.options.to_name)
        self.run.dest.write_file(path, config.encode("utf-8"))
        self.run.counts["labeling_config"] = path

    def write_shard(self, out: IO[bytes], rows: Iterable[dict]) -> None:
        out.write(b"[")
        tasks = _JsonArray(out)
        for row in rows:
            task = self.task(row)
            tasks.add(task)
            self.run.counts["images"] += 1
            self.run.counts["annotations"] += len(task["predictions"][0]["result"])
        out.write(b"\n]\n")

    def task(self, row: dict) -> dict:
        """One image's Label Studio task, its segments as one prediction."""
        width, height = row["width"], row["height"]
        results = []
        for seg in self.run.keep.apply(row["segments"]):
            mask = mask_utils.decode({"size": [height, width], "counts": seg["rle"].encode("ascii")})
            base: dict[str, Any] = {
                "from_name": self.run.options.from_name,
                "to_name": self.run.options.to_name,
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
            }
            if seg["score"] is not None:
                base["score"] = round(float(seg["score"]), 6)
            results += [{"id": f"seg{seg['id']}{suffix}", **base, **value}
                        for suffix, value in self.regions(mask, seg["label"])]
        model_version = self.run.reader.record.model_version
        prediction: dict[str, Any] = {"model_version": model_version, "result": results}
        data = {"image": self.uri(row["image_uri"]), "key": row["key"]}
        if row.get("review_score") is not None:
            # Label Studio reads a prediction's score as the model's confidence: its uncertainty
            # sampling serves the lowest first (projects/functions/next_task.py orders by
            # predictions__score). 1 - review score puts the most doubtful first there; the
            # review score itself is a data column the Data Manager shows and sorts by. A row
            # written before seglabel had it carries neither.
            prediction["score"] = round(1.0 - float(row["review_score"]), 6)
            data["review_score"] = round(float(row["review_score"]), 6)
        return {"data": data, "predictions": [prediction]}

    def regions(self, mask: np.ndarray, label: str) -> list[tuple[str, dict]]:
        """A segment's Label Studio regions (id suffix, type and value): one brush mask, or one
        polygon per outer contour, in percent of the image, holes filled (a Label Studio
        polygon has none)."""
        if self.run.options.mask_format == "rle":
            return [("", {"type": "brushlabels",
                          "value": {"format": "rle", "rle": label_studio_rle(mask), "brushlabels": [label]}})]
        height, width = mask.shape
        shape = outline(mask, self.run.options.polygon_tolerance)
        return [(f"-{k}", {"type": "polygonlabels", "value": {
                    "points": [[round(float(x) * 100 / width, 4), round(float(y) * 100 / height, 4)]
                               for x, y in polygon],
                    "closed": True, "polygonlabels": [label]}})
                for k, polygon in enumerate(shape.polygons)]


def labeling_config(labels: Mapping[int, str], mask_format: str, from_name: str, to_name: str) -> str:
    """The Label Studio labeling config for tasks of these labels (id -> name): an Image tag named
    ``to_name`` over ``$image``, and BrushLabels (RLE) or PolygonLabels named ``from_name`` with a
    Label per label value, coloured as the label's palette colour (as COCO panoptic's
    categories). Label Studio shows no prediction whose labels its config lacks."""
    tag = "PolygonLabels" if mask_format == "polygon" else "BrushLabels"
    items = "".join(
        f"    <Label value={quoteattr(name)} background=\"#{bytes(palette_color(label_id)).hex()}\"/>\n"
        for label_id, name in sorted(labels.items()))
    control = f"<{tag} name={quoteattr(from_name)} toName={quoteattr(to_name)}>"
    return (f"<View>\n  <Image name={quoteattr(to_name)} value=\"$image\" zoom=\"true\"/>\n"
            f"  {control}\n{items}  </{tag}>\n</View>\n")


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
    if settings.unmapped != "drop" and settings.label_map is None:
        raise ExportError("--unmapped applies with --label-map only")
    if settings.shard_size is not None and settings.shard_size < 1:
        raise ExportError(f"--shard-size must be at least 1, got {settings.shard_size}")
    try:
        return _export(output, writer, fmt, to, settings, storage_options, to_storage_options)
    except OutputError as exc:  # the output or the destination cannot be read or written
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
