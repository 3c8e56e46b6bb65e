"""The stand-in model (``--stand-in``): the Segmenter's result types at no model cost, encoded
and read back with independent readers exactly as a real prediction is."""

from __future__ import annotations

import io

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
