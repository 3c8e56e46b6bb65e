"""Masks as seglabel stores them: label maps as PNG bytes (and back), instance masks packed 8
pixels a byte (:class:`PackedMasks`), and COCO RLEs (pycocotools) of either.

This is CPU work, kept off the GPU actor: in the job it runs in CPU tasks after the Segmenter.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# zlib level 1: a 16-bit 640×480 map encodes in about 3 ms instead of 5 ms at level 6, and
# label maps compress well at any level.
PNG_COMPRESS_LEVEL = 1


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
