"""COCO instances and CVAT: the COCO JSON both are, written as rows come.

* ``coco``: one JSON a shard (images, categories, annotations whose ``segmentation`` is the
  job's COCO compressed RLE, or polygons with ``--mask-format polygon``, with ``score``).
* ``cvat``: a zip CVAT imports as "COCO 1.0" (``annotations/instances_default.json``, the same
  JSON without scores); images are matched by ``file_name`` (the key) against a task's frames.

COCO ``file_name`` is the image's key; image ids count 1..N across all shards; category id =
``label_id + 1`` (COCO reserves 0). A file's ``images`` stream straight out and its
``annotations`` wait in a spool (memory, then disk) until the images are done
(:class:`CocoFile`, which COCO panoptic uses too).
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any, Iterable, Iterator, Mapping

from pycocotools import mask as mask_utils

from ..core.labels import palette_color
from ..core.version import __version__
from ..outputs.labelmap import LabelSpace
from ..outputs.reader import OutputReader
from .polygons import coco_polygons, outline
from .writer import ExportRun, JsonArray, Writer, dump_json

# A COCO file's annotations wait in memory up to this size, then in a temporary file.
SPOOL_MEMORY = 32 << 20
# Where CVAT's "COCO 1.0" importer looks for the annotations of the "default" subset.
CVAT_MEMBER = "annotations/instances_default.json"
CVAT_IMAGES_DIR = "images/"


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


class CocoFile:
    """One COCO JSON being written: ``images`` stream straight out, the other list waits in a
    spool (memory, then a temporary file) until the images are done, then follows them."""

    def __init__(self, out: IO[bytes], head: Mapping[str, Any], spooled: str = "annotations"):
        self.out = out
        self.spooled = spooled
        out.write(b"{")
        for name, value in head.items():
            out.write(dump_json(name) + b":" + dump_json(value) + b",\n")
        out.write(b'"images":[')
        self.images = JsonArray(out)
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
        self.annotations = JsonArray(self._spool)

    def close(self) -> None:
        self.out.write(b"],\n" + dump_json(self.spooled) + b":[")
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, self.out)
        self._spool.close()
        self.out.write(b"]}\n")


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


@dataclass
class ImageIds:
    """Image and annotation ids, unique across every shard of one export."""

    image: int = 0
    annotation: int = 0


class CocoWriter(Writer):
    """COCO instances: one JSON a shard, each segment an annotation with its compressed RLE."""

    things_only = True
    scores = True

    def __init__(self, run: ExportRun):
        super().__init__(run)
        self.ids = ImageIds()
        self.head = coco_head(run, panoptic=False)

    def write_shard(self, out: IO[bytes], rows: Iterable[dict]) -> None:
        coco = CocoFile(out, self.head)
        for row in rows:
            image = coco_image(row, self.ids)
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


def coco_image(row: dict, ids: ImageIds) -> dict:
    ids.image += 1
    return {"id": ids.image, "file_name": row["key"], "width": row["width"], "height": row["height"]}


def coco_head(run: ExportRun, panoptic: bool) -> dict:
    return {
        "info": _info(run.reader),
        # CVAT's own COCO export carries one empty licence; some importers expect the key.
        "licenses": [{"id": 0, "name": "", "url": ""}],
        "categories": _categories(run.reader.space, run.keep.label_ids, panoptic),
    }
