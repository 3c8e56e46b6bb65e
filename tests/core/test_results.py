"""The result types: packed masks give the same RLEs as the full array; a dumped prediction
loads back as views of its buffer."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from pycocotools import mask as mask_utils


def test_packed_masks_give_the_same_rles_as_the_full_array():
    """What the Segmenter ships (boxes and bits) decodes to exactly the masks, and pycocotools
    gives the same RLEs from both: empty, full, one-pixel and ragged masks included."""
    from seglabel.core.masks import PackedMasks, encode_rle

    rng = np.random.default_rng(0)
    masks = rng.random((7, 37, 53)) > 0.7
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, 36, 52] = True
    masks[3] = False
    masks[3, 5:9, 40:41] = True
    packed = PackedMasks.pack(masks)
    assert packed.bits.nbytes < masks.nbytes / 4
    assert (packed.unpack() == masks).all()
    # Boxes are whole bytes wide: the pixel at column 52 of 53 is in byte 6 (columns 48-55),
    # cut at the image's edge; an empty mask has no box.
    assert packed.boxes[2].tolist() == [36, 48, 1, 5] and packed.boxes[0].tolist() == [0, 0, 0, 0]
    assert packed.boxes[3].tolist() == [5, 40, 4, 8]
    assert encode_rle(packed) == encode_rle(masks) == mask_utils.encode(
        np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
    assert encode_rle(PackedMasks.pack(masks[:0])) == []


@pytest.mark.parametrize("masks", ["packed", "array", "none"])
def test_a_dumped_prediction_loads_as_views_of_its_buffer(masks):
    """What the Segmenter hands on (one bytes value a prediction) loads back equal, its arrays
    views of the buffer it is read from (64-byte aligned within it) rather than copies; a
    truncated value or some other pickle is refused."""
    import pickle

    from seglabel.core.masks import PackedMasks
    from seglabel.core.results import RawPrediction

    rng = np.random.default_rng(1)
    bits = rng.random((3, 17, 29)) > 0.6
    mask = {"packed": PackedMasks.pack(bits), "array": bits, "none": None}[masks]
    scores = None if masks == "none" else np.ones(3, np.float32)
    raw = RawPrediction(rng.integers(0, 4, (17, 29)).astype(np.uint16), np.arange(1, 4, dtype=np.int32),
                        np.array([5, 0, 2], np.int32), scores, mask)
    value = raw.dumps()
    buffer = np.frombuffer(b"\0" * 7 + value, np.uint8)[7:]  # a slice of a larger buffer, as a cell is
    back = RawPrediction.loads(buffer)
    for name in ("id_map", "ids", "label_ids", "scores"):
        got, want = getattr(back, name), getattr(raw, name)
        assert (got is None and want is None) or (np.array_equal(got, want) and got.dtype == want.dtype)
    assert np.array_equal(back.id_map, raw.id_map) and not back.id_map.flags.writeable
    start = buffer.ctypes.data
    assert start <= back.id_map.ctypes.data < start + len(buffer)
    assert (back.id_map.ctypes.data - start) % 64 == 0
    if masks == "packed":
        assert np.array_equal(back.masks.unpack(), bits)
    elif masks == "array":
        assert np.array_equal(back.masks, bits)
    else:
        assert back.masks is None
    for broken in (value[:-1], b"", b"\0" * 16, struct.pack("<I", 1 << 30)):
        with pytest.raises(ValueError, match="truncated"):
            RawPrediction.loads(broken)
    other = pickle.dumps({"not": "a prediction"}, protocol=5)
    with pytest.raises(TypeError, match="not a prediction"):
        RawPrediction.loads(struct.pack("<IQ", 1, len(other)) + b"\0" * (-12 % 64) + other)
