"""A stand-in for the model: the Segmenter's results at no model cost.

``--stand-in "segments=20,coverage=0.05"`` replaces the network by a function that returns, per
image and at the image's own size, ``segments`` segments each covering ``coverage`` of it,
through the same :class:`~seglabel.core.results.RawPrediction` the real Segmenter returns
(instance: N exact, overlapping masks, packed, and a 16-bit id map; semantic: a label map; panoptic:
segment ids with labels and scores), with a review score of its own (the photo's
brightness). Everything around the model (reading, decoding, moving
results between processes, encoding, writing, committing) then runs as in a real job, so that
the pipeline's own cost can be measured on any machine, and a fault can be injected:
``kill=WxH`` makes the process kill itself (SIGKILL, as the kernel's OOM killer does) on an
image of that size, to test what a job does with an image that kills its worker.

The checkpoint still names the task and the label set (its config is read; no weights).
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from typing import Sequence

import numpy as np

from ..core.config import EngineConfig, StandIn
from ..core.masks import PackedMasks
from ..core.results import RawPrediction
from ..core.review import review_score
from .resolve import ResolvedCheckpoint, resolve_checkpoint

# What the made predictions may hold at once (counted as segments × H × W bytes a size: what
# making one takes, more than a packed prediction keeps).
STAND_IN_CACHE_BYTES = 512 << 20


class StandInSegmenter:
    """Drop-in for :class:`~seglabel.engine.segmenter.Segmenter` in the pipeline (``predict_raw``)."""

    def __init__(self, config: EngineConfig, checkpoint: ResolvedCheckpoint | None = None):
        self.config = config
        self.spec = config.stand_in or StandIn()
        # The checkpoint's files are read (as the driver reads them), its weights never.
        checkpoint = checkpoint or resolve_checkpoint(config)
        self.task, self.id2label, self.revision = checkpoint.task, checkpoint.id2label, checkpoint.revision
        self.labels = np.array(sorted(self.id2label) or [0], dtype=np.int32)
        self.device = "stand-in"
        self.timings: dict[str, float] = {}
        # The same size gives the same prediction: made once, so that it costs nothing after.
        self._made: dict[tuple[int, int], RawPrediction] = {}

    def predict_raw(self, images: Sequence[np.ndarray]) -> list[RawPrediction]:
        """One prediction per (H, W, 3) image, in order."""
        out = []
        for image in images:
            height, width = image.shape[:2]
            if self.spec.kill == (width, height):
                os.kill(os.getpid(), signal.SIGKILL)
            # Read once: another thread (the actor runs two calls) may clear the cache meanwhile.
            made = self._made.get((height, width))
            if made is None:
                if len(self._made) * height * width * max(1, self.spec.segments) > STAND_IN_CACHE_BYTES:
                    self._made.clear()  # photos of many sizes: bounded memory
                made = self._made[(height, width)] = self._predict(height, width)
            out.append(replace(made, review_score=self._review(image, made)))
        return out

    @staticmethod
    def _review(image: np.ndarray, made: RawPrediction) -> float:
        """The stand-in's review score: 1 for no segments, else the photo's mean brightness (a
        sample of its pixels), so that images differ and an order by it can be checked."""
        if len(made.ids) == 0:
            return review_score(0, 0, 0, 0)
        return float(image[::8, ::8].mean()) / 255.0

    def _predict(self, height: int, width: int) -> RawPrediction:
        n = self.spec.segments
        labels = self.labels[np.arange(n) % len(self.labels)]
        scores = np.linspace(0.99, 0.5, n, dtype=np.float32) if n else np.zeros(0, np.float32)
        # Boxes of `coverage` of the image each, at staggered places (they overlap, as instances do).
        box_h = max(1, min(height, round(height * self.spec.coverage**0.5)))
        box_w = max(1, min(width, round(width * self.spec.coverage**0.5)))
        tops = (np.arange(n) * 7919) % max(1, height - box_h + 1)
        lefts = (np.arange(n) * 104729) % max(1, width - box_w + 1)
        if self.task == "instance":
            masks = np.zeros((n, height, width), dtype=bool)
            for i, (top, left) in enumerate(zip(tops, lefts)):
                masks[i, top : top + box_h, left : left + box_w] = True
            id_map = np.zeros((height, width), dtype=np.uint16)
            for i in range(n - 1, -1, -1):  # the highest score (lowest id) painted last wins
                id_map[masks[i]] = i + 1
            # Packed, as the Segmenter's come off the device.
            packed = PackedMasks.pack(masks)
            return RawPrediction(id_map, np.arange(1, n + 1, dtype=np.int32), labels, scores, packed)
        id_map = np.zeros((height, width), dtype=np.int32)
        for i, (top, left) in enumerate(zip(tops, lefts)):
            id_map[top : top + box_h, left : left + box_w] = i + 1
        present = np.unique(id_map)
        present = present[present > 0]
        if self.task == "semantic":
            # Pixel = label id; each box's label, the background the first label.
            label_map = np.where(id_map > 0, labels[np.maximum(id_map - 1, 0)], self.labels[0])
            ids = np.unique(label_map).astype(np.int32)
            dtype = np.uint8 if self.labels.max() < 256 else np.uint16
            return RawPrediction(label_map.astype(dtype), ids, ids, None)
        ids = present.astype(np.int32)
        return RawPrediction(id_map, ids, labels[ids - 1], scores[ids - 1])
