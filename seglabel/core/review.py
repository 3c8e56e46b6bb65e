"""The review score: how soon a person should look at an image's pre-labels, and rows in that order.

Each ``ok`` row's ``review_score`` is in [0, 1], higher meaning "look sooner". It combines three
doubts, each in [0, 1], so that any one of them alone can bring an image forward:

    review_score = 1 - (1 - d_score) * (1 - d_boundary) * (1 - d_overlap)

* ``d_score``, how close the weakest segment came to being dropped: one minus the lowest kept
  segment's margin over the score threshold, ``(score - threshold) / (1 - threshold)``
  (instance, panoptic). Semantic maps have no segment scores: one minus the mean, over the
  image's pixels (model scale, ``GRID`` grid), of the winning class's share of the class scores.
* ``d_boundary``, how much of the masks is undecided: the share of mask pixels whose mask
  probability lies within ``BAND`` of the mask threshold (or half the way to 0 or 1, where that
  is nearer: :func:`mask_band`), over all pixels within that of it or above (instance,
  panoptic; at model scale, where the probabilities are, on a ``GRID`` grid); semantic: the
  share of pixels whose two best classes' shares differ by less than ``2 * BAND``.
* ``d_overlap``, how much the segments fought over pixels: instance, the share of the kept
  masks' pixels that two or more masks cover; panoptic, the share of the kept queries' own
  pixels (probability over the threshold) that other segments took, pooled over the segments,
  relative to the share the overlap threshold lets a segment lose (1: every segment barely
  survived the merge); semantic: 0.

An image with no segments at all scores 1: the model found nothing, which a person should
confirm. The device computes the pixel counts with the work it does anyway and brings them
back with the transfers it already waits for (:mod:`seglabel.engine.postprocess`); the arithmetic
here is on a few numbers per image. Nothing here imports more than numpy: the device's code
uses it. Rows in review order are :mod:`seglabel.outputs.order`'s.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# The Parquet column that holds it.
REVIEW_COLUMN = "review_score"
# How near the mask threshold a probability is "undecided".
BAND = 0.15
# The pixel counts are taken on a grid of every GRID-th row and column of the model-scale
# maps: Mask2Former's and EoMT's mask logits are a quarter of the input's size, so a finer
# grid only repeats interpolated values. Measured on a CPU (tiny model, 480x640): counting
# every pixel made semantic post-processing 1.4x slower, panoptic 1.3x.
GRID = 4


def combine(*doubts: float) -> float:
    """``1 - prod(1 - d)`` over the doubts, each clipped to [0, 1] (a NaN, from a device's
    broken number, counts as full doubt: it should bring the image forward, not hide it)."""
    keep = 1.0
    for doubt in doubts:
        doubt = 1.0 if math.isnan(doubt) else min(1.0, max(0.0, doubt))
        keep *= 1.0 - doubt
    return 1.0 - keep


def score_doubt(scores: Sequence[float] | np.ndarray, threshold: float) -> float:
    """One minus the weakest segment's margin over the score threshold (0 for no segments)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return 0.0
    room = max(1.0 - threshold, 1e-6)
    return 1.0 - float((scores.min() - threshold) / room)


def share(part: float, whole: float) -> float:
    """``part / whole``, 0 for an empty whole."""
    return float(part) / float(whole) if whole > 0 else 0.0


def review_score(segments: int, d_score: float, d_boundary: float, d_overlap: float) -> float:
    """The review score of an image with ``segments`` segments and these doubts."""
    return 1.0 if segments == 0 else combine(d_score, d_boundary, d_overlap)


def logit(p: float) -> float:
    """``log(p / (1 - p))``, ``p`` kept 1e-7 away from 0 and 1."""
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def mask_band(threshold: float) -> tuple[float, float]:
    """The mask probabilities that count as undecided around the probability ``threshold``, as
    logits (lo, hi): within ``BAND`` of it, or half the way to 0 or 1 where that is nearer (a
    band that reached 0 or 1 would call a crisp mask undecided). A logit in (lo, hi) is in the
    band; one over lo is in it or above."""
    half = min(BAND, threshold / 2, (1 - threshold) / 2)
    return logit(threshold - half), logit(threshold + half)
