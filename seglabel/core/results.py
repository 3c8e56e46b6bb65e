"""Label maps → PNG bytes; segment masks → COCO RLE, areas and boxes (pycocotools).

This is CPU work, kept off the GPU actor: in the job it runs in CPU tasks after the Segmenter.
"""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils

# zlib level 1: a 16-bit 640×480 map encodes in about 3 ms instead of 5 ms at level 6, and
# label maps compress well at any level.
PNG_COMPRESS_LEVEL = 1


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
    # How soon a person should look at it (seglabel.review); None where it is not known.
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


@dataclass
class PackedMasks:
    """(N, H, W) binary masks as each mask's box and the bits inside it: a few kB where the
    array is N × H × W bytes (6 MB for 20 masks of a 640×480 photo). What the Segmenter ships to
    the encode tasks, through pickling and the object store.

    The bits are packed along rows (``numpy.packbits(axis=-1)``: 8 pixels a byte, each row of a
    box its own bytes), and boxes are whole bytes wide: ``left`` a multiple of 8, ``width`` 8
    pixels a byte up to the image's right edge. So a box is cut from the row-packed mask by
    slicing bytes, on the host or straight from what a GPU packed (``from_rows``), never from
    the N × H × W array. ``boxes`` rows are (top, left, height, width), zeros for an empty mask;
    ``bits`` holds the boxes' bytes one after another, ``ends`` where each ends.
    """

    height: int
    width: int
    boxes: np.ndarray
    bits: np.ndarray
    ends: np.ndarray

    @classmethod
    def pack(cls, masks: np.ndarray) -> "PackedMasks":
        """Pack (N, H, W) boolean masks."""
        return cls.from_rows(np.packbits(masks, axis=-1), masks.shape[2])

    @classmethod
    def from_rows(cls, rows: np.ndarray, width: int, extents: np.ndarray | None = None) -> "PackedMasks":
        """Masks from their row-packed bits, (N, H, ceil(W / 8)) uint8; ``extents`` (N, 4):
        each mask's (top, bottom, first byte, last byte), -1 rows for an empty mask, when
        already known (made on the device with the bits); found here otherwise."""
        n, height, _ = rows.shape
        if extents is None:
            extents = _extents(rows)
        boxes = np.zeros((n, 4), dtype=np.int32)
        chunks = []
        for i, (top, bottom, first, last) in enumerate(extents.tolist()):
            if top < 0:
                chunks.append(np.zeros(0, dtype=np.uint8))
                continue
            left = 8 * first
            boxes[i] = (top, left, bottom - top + 1, min(8 * (last - first + 1), width - left))
            chunks.append(rows[i, top : bottom + 1, first : last + 1].ravel())
        ends = np.cumsum([len(c) for c in chunks], dtype=np.int64)
        bits = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
        return cls(height, width, boxes, bits, ends)

    def __len__(self) -> int:
        return len(self.boxes)

    def fortran(self) -> np.ndarray:
        """The masks as the (H, W, N) uint8 Fortran-ordered array pycocotools encodes."""
        out = np.zeros((self.height, self.width, len(self)), dtype=np.uint8, order="F")
        start = 0
        for i, (top, left, h, w) in enumerate(self.boxes.tolist()):
            end = int(self.ends[i])
            if h:
                crop = np.unpackbits(self.bits[start:end].reshape(h, -1), axis=1, count=w)
                out[top : top + h, left : left + w, i] = crop
            start = end
        return out

    def unpack(self) -> np.ndarray:
        """The (N, H, W) boolean masks."""
        return np.moveaxis(self.fortran(), -1, 0).astype(bool)


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
    soon a person should look at it (:mod:`seglabel.review`), None where it is not known.
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


# Arrow's binary type has int32 offsets; past this a column of predictions is large_binary.
BINARY_MAX_BYTES = 2**31 - 1


def pack_column(values: list[list[Any]]) -> pa.Array:
    """A block's column of predictions: ``values``, each given in parts
    (``RawPrediction.parts``; ``[]`` for a row without one), written once into one Arrow buffer
    that Ray takes as it is (Ray's own conversion of a column of bytes copies each value again,
    after ``dumps`` had joined them). Each value starts at a multiple of ``ALIGN`` bytes of the
    buffer, its arrays aligned in the block (it ends in padding). Read back with
    :func:`column_cells`."""
    sizes = [sum(memoryview(part).nbytes for part in parts) for parts in values]
    bounds = np.zeros(len(values) + 1, np.int64)
    np.cumsum(np.array([size + -size % ALIGN for size in sizes], np.int64), out=bounds[1:])
    data = pa.allocate_buffer(int(bounds[-1]))  # Arrow's allocations are 64-byte aligned
    out = np.frombuffer(data, np.uint8)
    for parts, start, stop in zip(values, bounds[:-1].tolist(), bounds[1:].tolist()):
        for part in parts:
            view = np.frombuffer(part, np.uint8)
            out[start : start + len(view)] = view
            start += len(view)
        out[start:stop] = 0
    large = bounds[-1] > BINARY_MAX_BYTES
    kind, offsets = (pa.large_binary(), bounds) if large else (pa.binary(), bounds.astype(np.int32))
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(offsets), data])


def column_cells(column: pa.ChunkedArray) -> Iterator[Any]:
    """Each row's dumped prediction (for ``RawPrediction.loads``): a slice of the block's own
    data buffer where Arrow holds the column as binary (cut by its offsets: an Arrow scalar
    would copy the value), as :func:`pack_column` builds it; Python bytes should the column
    arrive as Ray's pickled Python objects, which Ray makes of a column of bytes objects Arrow
    cannot hold (no stage of the pipeline hands it one any more)."""
    for chunk in column.iterchunks():
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            yield from chunk.to_pylist()
            continue
        _, offsets, data = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        # A slice of a block (Ray cuts batches out of blocks) keeps the whole buffers: its
        # offsets start at chunk.offset.
        bounds = np.frombuffer(offsets, dtype=width)[chunk.offset:chunk.offset + len(chunk) + 1]
        for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            yield data.slice(start, stop - start) if data is not None else b""


def _extents(rows: np.ndarray) -> np.ndarray:
    """(top, bottom, first byte, last byte) of each row-packed mask; -1s for an empty one."""
    n, height, nbytes = rows.shape
    out = np.full((n, 4), -1, dtype=np.int64)
    if n == 0 or height == 0 or nbytes == 0:
        return out
    # Reductions over the short byte axis are slow in numpy; over the rows they are not.
    filled_rows = np.bitwise_or.reduce(rows, axis=2) != 0
    filled_bytes = np.bitwise_or.reduce(rows, axis=1) != 0
    some = filled_rows.any(axis=1)
    out[some, 0] = filled_rows[some].argmax(axis=1)
    out[some, 1] = height - 1 - filled_rows[some, ::-1].argmax(axis=1)
    out[some, 2] = filled_bytes[some].argmax(axis=1)
    out[some, 3] = nbytes - 1 - filled_bytes[some, ::-1].argmax(axis=1)
    return out


def encode_rle(masks: "np.ndarray | PackedMasks") -> list[dict]:
    """COCO compressed RLEs of (N, H, W) binary masks, as an array or packed."""
    if len(masks) == 0:
        return []
    if isinstance(masks, PackedMasks):
        return mask_utils.encode(masks.fortran())
    # A bool array is viewed as bytes, not copied; the Fortran (H, W, N) layout is one copy.
    as_bytes = masks.view(np.uint8) if masks.dtype == bool else masks.astype(np.uint8, copy=False)
    return mask_utils.encode(np.asfortranarray(np.moveaxis(as_bytes, 0, -1)))


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


def panoptic_rgb(id_map: np.ndarray) -> np.ndarray:
    """COCO panoptic encoding of segment ids: id = R + 256·G + 256²·B."""
    ids = id_map.astype(np.uint32, copy=False)
    return np.stack([ids & 0xFF, (ids >> 8) & 0xFF, (ids >> 16) & 0xFF], axis=-1).astype(np.uint8)


def encode_png(id_map: np.ndarray, task: str) -> bytes:
    """PNG bytes of a label map: 8-bit ``L`` or 16-bit semantic, 16-bit instance, RGB panoptic."""
    if task == "panoptic":
        image = Image.fromarray(panoptic_rgb(id_map))
    elif task == "instance" or id_map.dtype != np.uint8:
        image = Image.fromarray(id_map.astype(np.uint16, copy=False))
    else:
        image = Image.fromarray(id_map)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_png(data: bytes, task: str) -> np.ndarray:
    """The label map a seglabel PNG holds (the inverse of :func:`encode_png`)."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.array(image)
    if task == "panoptic":
        array = array.astype(np.uint32)
        return array[..., 0] + (array[..., 1] << 8) + (array[..., 2] << 16)
    return array
