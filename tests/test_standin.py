"""The stand-in model (``--stand-in``): the Segmenter's result types at no model cost, encoded
and read back with independent readers exactly as a real prediction is."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from seglabel.core.config import EngineConfig, StandIn
from seglabel.core.labels import thing_ids
from seglabel.core.masks import encode_png
from seglabel.core.results import build_segments
from seglabel.engine.standin import StandInSegmenter


@pytest.mark.parametrize("task", ["instance", "semantic", "panoptic"])
def test_stand_in_predictions_encode_like_real_ones(checkpoints, task):
    engine = EngineConfig(model=str(checkpoints[task]), stand_in="segments=6,coverage=0.04")
    segmenter = StandInSegmenter(engine)
    image = np.zeros((120, 200, 3), np.uint8)
    (raw,) = segmenter.predict_raw([image])
    assert raw.id_map.shape == (120, 200)
    segments = build_segments(raw, task, segmenter.id2label, thing_ids(segmenter.id2label, None))
    png = Image.open(io.BytesIO(encode_png(raw.id_map, task)))
    assert png.size == (200, 120)
    box = round(120 * 0.2) * round(200 * 0.2)  # each segment covers 4% of the image
    if task == "instance":
        assert len(segments) == 6
        # Exact, overlapping masks: each RLE is a whole box, read back by pycocotools.
        for segment in segments:
            rle = {"size": [120, 200], "counts": segment.rle.encode()}
            assert mask_utils.area(rle) == box == segment.area
        assert [s.score for s in segments] == sorted((s.score for s in segments), reverse=True)
        # The PNG's ids are the segments' ids, the best score on top.
        assert set(np.unique(np.array(png))) - {0} == {s.id for s in segments}
    else:
        # Label/segment maps: each RLE is exactly that segment's pixels of the PNG.
        values = np.array(png)
        if task == "panoptic":
            values = values.astype(np.int64)
            values = values[..., 0] + 256 * values[..., 1] + 65536 * values[..., 2]
        for segment in segments:
            rle = {"size": [120, 200], "counts": segment.rle.encode()}
            decoded = mask_utils.decode(rle).astype(bool)
            pixel = segment.label_id if task == "semantic" else segment.id
            assert (decoded == (values == pixel)).all()
        assert 1 < len(segments) <= 7


def test_stand_in_spec_round_trips():
    spec = StandIn.parse("segments=5,coverage=0.1,kill=13x7")
    assert (spec.segments, spec.coverage, spec.kill) == (5, 0.1, (13, 7))
    assert StandIn.parse(str(spec)) == spec and StandIn.parse("default") == StandIn()
    assert EngineConfig(stand_in="segments=2").mask_settings()["stand_in"] == "segments=2,coverage=0.05"


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


def test_an_encode_task_needs_no_torch(checkpoints, tmp_path):
    """A prediction, as pickled by the Segmenter's actor, is unpickled and encoded in a process
    that never imports torch: encode workers start without its second of imports."""
    import subprocess
    import sys

    engine = EngineConfig(model=str(checkpoints["instance"]), stand_in="segments=3")
    (raw,) = StandInSegmenter(engine).predict_raw([np.zeros((30, 40, 3), np.uint8)])
    (tmp_path / "raw.pickle").write_bytes(raw.dumps())
    code = (
        "import sys; import seglabel.job.pipeline; from seglabel.core import results, masks; "
        f"raw = results.RawPrediction.loads(open({str(tmp_path / 'raw.pickle')!r}, 'rb').read()); "
        "segments = results.build_segments(raw, 'instance', {0: 'a', 1: 'b'}, None); "
        "masks.encode_png(raw.id_map, 'instance'); print(len(segments), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["3", "False"]


def test_a_stand_in_actor_loads_no_torch(checkpoints):
    """The stand-in Segmenter, loaded as a Segmenter actor loads it, imports neither torch nor
    transformers (their imports are a model's cost, not the pipeline's); the real one does."""
    import subprocess
    import sys

    code = (
        "import sys; from seglabel.core.config import EngineConfig; "
        "from seglabel.job.stages import load_segmenter; "
        "s = load_segmenter(EngineConfig(model=sys.argv[1], stand_in=sys.argv[2] or None)); "
        "print(type(s).__name__, sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    for stand_in, expected in (("segments=3", "StandInSegmenter []"),
                               ("", "Segmenter ['torch', 'transformers']")):
        command = [sys.executable, "-c", code, str(checkpoints["instance"]), stand_in]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == expected, out.stderr[-2000:]


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
