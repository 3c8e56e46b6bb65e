"""What a Segmenter returns: one image's :class:`Prediction` and its :class:`Segment` records,
and :class:`RawPrediction`, a result before encoding.

A raw prediction is what travels from the Segmenter to the encode tasks: torch-free (encode
tasks unpickle it and never import torch), dumped as one value with its arrays out of band so
that the encode stage reads them where they lie. :func:`build_segments` makes the contract's
segment records of it (COCO RLE, areas and boxes through pycocotools): CPU work, kept off the
GPU actor.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from pycocotools import mask as mask_utils

from .masks import PackedMasks, encode_png, encode_rle


@dataclass(frozen=True)
class Segment:
    """One segment, with the fields of the output contract's ``segments`` column."""

    id: int
    label_id: int
    label: str
    score: float | None
    area: int
    bbox: tuple[float, float, float, float]
    rle: str
    is_thing: bool | None

    def to_row(self) -> dict:
        """The segment as a Parquet struct value."""
        return {
            "id": self.id,
            "label_id": self.label_id,
            "label": self.label,
            "score": self.score,
            "area": self.area,
            "bbox": list(self.bbox),
            "rle": self.rle,
            "is_thing": self.is_thing,
        }


@dataclass
class Prediction:
    """One image's result: the label map at the original size and its segments.

    ``id_map`` holds what the PNG encodes: label ids (semantic) or segment ids (instance,
    panoptic), 0 = no segment for the latter two.
    """

    task: str
    id_map: np.ndarray
    segments: list[Segment] = field(default_factory=list)
    # How soon a person should look at it (seglabel.core.review); None where it is not known.
    review_score: float | None = None

    @property
    def height(self) -> int:
        return int(self.id_map.shape[0])

    @property
    def width(self) -> int:
        return int(self.id_map.shape[1])

    def png(self) -> bytes:
        """The PNG the output contract specifies for this task."""
        return encode_png(self.id_map, self.task)


# Out-of-band arrays start at multiples of this from the dumped value's start (a cache line);
# in memory they are as aligned as the value is: a block's binary cells lie end to end.
ALIGN = 64


@dataclass
class RawPrediction:
    """One image's result before encoding (here, not beside the torch code that makes it:
    encode tasks unpickle it and need no torch).

    ``id_map`` holds segment ids (semantic: label ids) at the original resolution; ``ids``,
    ``label_ids`` and ``scores`` describe the segments; ``masks`` holds the exact, possibly
    overlapping, instance masks (instance task only), packed on the device
    (:class:`PackedMasks`; an (N, H, W) boolean array is accepted too); ``review_score`` how
    soon a person should look at it (:mod:`seglabel.core.review`), None where it is not known.
    """

    id_map: np.ndarray
    ids: np.ndarray
    label_ids: np.ndarray
    scores: np.ndarray | None
    masks: PackedMasks | np.ndarray | None = None
    review_score: float | None = None

    def dumps(self) -> bytes:
        """The prediction as one value for a block's column: a pickle (protocol 5) with its
        arrays after it, out of band, each at a multiple of 64 bytes from the value's start.

        ``loads`` then makes the arrays views of the block, where an in-band pickle copies each
        one out (its id map is most of the 650 kB of a 640×480 prediction: 0.43 of the encode
        stage's CPU ms an image, measured).
        """
        return b"".join(self.parts())

    def parts(self) -> list[bytes | memoryview]:
        """``dumps``' value as the pieces it is joined from, the arrays not copied (views of
        them), so that a column of predictions is written with one copy of each."""
        buffers: list[pickle.PickleBuffer] = []
        head = pickle.dumps(self, protocol=5, buffer_callback=buffers.append)
        parts = [head, *(b.raw() for b in buffers)]
        sizes = [memoryview(part).nbytes for part in parts]
        header = struct.pack(f"<I{len(sizes)}Q", len(sizes), *sizes)
        out: list[bytes | memoryview] = [header]
        position = len(header)
        for part, size in zip(parts, sizes):
            pad = -position % ALIGN
            out += [b"\0" * pad, part]
            position += pad + size
        return out

    @staticmethod
    def loads(value: "bytes | memoryview | Any") -> "RawPrediction":
        """A prediction from ``dumps``' value (any buffer: a slice of a block); its arrays are
        read-only views of that buffer."""
        view = memoryview(value).cast("B")
        count = struct.unpack_from("<I", view)[0] if len(view) >= 4 else 0
        if count < 1 or 4 + 8 * count > len(view):
            raise ValueError("a truncated prediction")
        sizes = struct.unpack_from(f"<{count}Q", view, 4)
        position, parts = 4 + 8 * count, []
        for size in sizes:
            position += -position % ALIGN
            if position + size > len(view):
                raise ValueError("a truncated prediction")
            parts.append(view[position : position + size])
            position += size
        prediction = pickle.loads(parts[0], buffers=parts[1:])
        if not isinstance(prediction, RawPrediction):
            raise TypeError(f"not a prediction: {type(prediction).__name__}")
        return prediction


def build_segments(
    raw: RawPrediction,
    task: str,
    id2label: Mapping[int, str],
    thing_ids: frozenset[int] | None,
) -> list[Segment]:
    """Segment records (id, label, score, area, bbox, RLE, is_thing) of one raw prediction.

    Instance segments take area, bbox and RLE from their exact masks (overlaps included);
    semantic and panoptic segments from the label map, so that each RLE decodes to exactly the
    pixels the PNG gives that segment.
    """
    if raw.masks is not None:
        masks = raw.masks
    else:
        masks = raw.id_map[None, :, :] == raw.ids.astype(raw.id_map.dtype)[:, None, None]
    rles = encode_rle(masks)
    if not rles:
        return []
    areas = mask_utils.area(rles)
    boxes = mask_utils.toBbox(rles)
    out = []
    for i, rle in enumerate(rles):
        label_id = int(raw.label_ids[i])
        is_thing = None
        if task == "panoptic" and thing_ids is not None:
            is_thing = label_id in thing_ids
        out.append(
            Segment(
                id=int(raw.ids[i]),
                label_id=label_id,
                label=id2label.get(label_id, str(label_id)),
                score=None if raw.scores is None else float(raw.scores[i]),
                area=int(areas[i]),
                bbox=tuple(float(v) for v in boxes[i]),  # type: ignore[arg-type]
                rle=rle["counts"].decode("ascii"),
                is_thing=is_thing,
            )
        )
    return out
