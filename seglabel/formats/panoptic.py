"""COCO panoptic: a folder of ``panoptic.json`` (images, annotations with ``segments_info``,
categories with ``isthing``) and ``panoptic/<key>.png`` (RGB, ``id = R + 256·G + 256²·B``), from
panoptic outputs only. The PNGs are the job's own, byte for byte, unless a filter or a label map
drops or fuses segments (then dropped ids become void, 0, and fused ones take their segment's).
"""

from __future__ import annotations

from typing import IO, Iterable, Mapping

from ..core.masks import decode_png, encode_png
from ..outputs.contract import checked_key
from ..outputs.labelmap import remap_ids
from ..outputs.reader import OutputReader
from .coco import CocoFile, ImageIds, coco_head, coco_image
from .writer import ExportRun, Writer

PANOPTIC_JSON = "panoptic.json"
PANOPTIC_PNG_DIR = "panoptic"


class PanopticWriter(Writer):
    """COCO panoptic: ``panoptic.json`` a shard and ``panoptic/<key>.png``, the PNGs of a shard
    written before its JSON, so that a JSON never names a missing PNG."""

    folder = True
    tasks = ("panoptic",)

    def __init__(self, run: ExportRun):
        super().__init__(run)
        self.ids = ImageIds()
        self.head = coco_head(run, panoptic=True)

    def shard_path(self, index: int | None) -> str:
        return self.run.dest.shard(index, PANOPTIC_JSON)

    def write_shard(self, out: IO[bytes], rows: Iterable[dict]) -> None:
        coco, counts, dest = CocoFile(out, self.head), self.run.counts, self.run.dest
        for row in rows:
            key = checked_key(row["key"])
            image = coco_image(row, self.ids)
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
