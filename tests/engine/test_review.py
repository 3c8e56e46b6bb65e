"""The review score: each doubt it is built from moves it, on model outputs made by hand.

The outputs are one image of 32×32 at the model's own scale (no resize: the pixel counts the
test expects are exact), with a few queries whose class and mask logits are set to what each
doubt is about. The expected figures are worked out here from the masks and scores the
post-processing returns and the formula the README documents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seglabel.core.review import BAND, GRID, combine
from seglabel.engine.postprocess import Postprocessor, PostprocessSpec

SIZE = 32
LABELS = 3
CRISP = 9.0  # a mask logit far from any threshold


def outputs(queries: list[tuple[int, float, np.ndarray]], total: int = 6):
    """Class and mask logits for one image: each query (label, class logit, (32, 32) mask
    logits); the rest of ``total`` are "no object" with empty masks."""
    class_logits = torch.zeros(1, total, LABELS + 1)
    class_logits[0, :, LABELS] = 12.0  # no object
    mask_logits = torch.full((1, total, SIZE, SIZE), -CRISP)
    for q, (label, logit, field) in enumerate(queries):
        class_logits[0, q, LABELS] = 0.0
        class_logits[0, q, label] = logit
        mask_logits[0, q] = torch.as_tensor(field, dtype=torch.float32)
    return class_logits, mask_logits


def rect(rows: slice, cols: slice, inside: float = CRISP) -> np.ndarray:
    field = np.full((SIZE, SIZE), -CRISP, dtype=np.float32)
    field[rows, cols] = inside
    return field


def run(task: str, queries, **spec):
    class_logits, mask_logits = outputs(queries)
    post = Postprocessor(PostprocessSpec(task, **spec), LABELS)
    return post(class_logits, mask_logits, [(SIZE, SIZE)], (SIZE, SIZE))[0]


def documented(d_score: float, d_boundary: float, d_overlap: float) -> float:
    """The README's formula, written out here rather than taken from the code under test:
    ``1 - (1 - d_score) * (1 - d_boundary) * (1 - d_overlap)``."""
    return 1 - (1 - d_score) * (1 - d_boundary) * (1 - d_overlap)


def test_the_formula_on_worked_numbers():
    """Figures worked out by hand: any one doubt alone brings an image forward, a full doubt
    makes it 1, and a NaN (a device's broken number) counts as full doubt, never as none."""
    assert combine(0.0, 0.0, 0.0) == 0.0
    assert combine(0.25, 0.5, 0.0) == pytest.approx(0.625)  # 1 - 0.75 * 0.5
    assert combine(0.2, 0.3, 0.5) == pytest.approx(0.72)  # 1 - 0.8 * 0.7 * 0.5
    assert combine(0.9, 0.0, 0.0) == pytest.approx(0.9)
    assert combine(1.0, 0.1, 0.2) == 1.0
    assert combine(float("nan"), 0.0, 0.0) == 1.0
    assert combine(-0.5, 1.5, 0.0) == 1.0 and combine(-0.5, 0.0, 0.0) == 0.0  # clipped to [0, 1]


def margin_doubt(scores, threshold: float) -> float:
    return 1 - (min(scores) - threshold) / (1 - threshold)


def undecided(fields, threshold: float = 0.5) -> float:
    """The share of the masks' pixels within BAND of the threshold among those within or above,
    on the review's grid of pixels."""
    probs = [1 / (1 + np.exp(-f[::GRID, ::GRID].astype(np.float64))) for f in fields]
    near = sum(int((np.abs(p - threshold) < BAND).sum()) for p in probs)
    around = sum(int((p > threshold - BAND).sum()) for p in probs)
    return near / around


A = rect(slice(2, 14), slice(2, 14))
B = rect(slice(18, 30), slice(18, 30))


@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_confident_separate_crisp_segments_score_near_zero(task):
    r = run(task, [(0, 12.0, A), (1, 12.0, B)])
    assert len(r.ids) == 2
    assert 0 <= r.review_score < 0.01


@pytest.mark.parametrize("task", ["instance", "panoptic", "semantic"])
def test_no_segment_scores_one(task):
    r = run(task, [], **({"keep_label_ids": frozenset()} if task == "semantic" else {}))
    assert len(r.ids) == 0
    assert r.review_score == 1.0


@pytest.mark.parametrize("family", ["mask2former", "eomt"])
@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_a_weak_segment_brings_the_image_forward(task, family):
    """A segment whose class probability barely passed the score threshold: the image's score is
    that segment's lost margin, whatever the confident one's."""
    sure = run(task, [(0, 12.0, A), (1, 12.0, B)])
    # softmax over [1.5, 0, 0, 0 (no object)] for label 1: 0.60 (panoptic's merge needs a
    # score-weighted probability over the 0.5 mask threshold); the score threshold is 0.3.
    weak = run(task, [(0, 12.0, A), (1, 1.5, B)], score_threshold=0.3, family=family)
    assert len(weak.ids) == 2 and min(weak.scores) < 0.65
    assert weak.review_score == pytest.approx(margin_doubt(weak.scores, 0.3), abs=1e-6)
    assert weak.review_score > sure.review_score + 0.5


@pytest.mark.parametrize("family", ["mask2former", "eomt"])
@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_masks_near_the_threshold_bring_the_image_forward(task, family):
    """B's probabilities sit at 0.6 over its whole area: half of the masks' pixels are undecided."""
    mushy = rect(slice(18, 30), slice(18, 30), inside=float(np.log(0.6 / 0.4)))
    r = run(task, [(0, 12.0, A), (1, 12.0, mushy)], score_threshold=0.2, family=family)
    assert len(r.ids) == 2
    expected = documented(margin_doubt(r.scores, 0.2), undecided([A, mushy]), 0.0)
    assert undecided([A, mushy]) == pytest.approx(0.5, abs=0.01)
    assert r.review_score == pytest.approx(expected, abs=1e-5)
    assert r.review_score > 0.5


def test_overlapping_instances_bring_the_image_forward():
    """Two confident, crisp instances, one covering part of the other: the overlap share is the
    pixels two masks cover over those any covers, read from the masks returned."""
    over = rect(slice(6, 18), slice(6, 18))
    r = run("instance", [(0, 12.0, A), (1, 12.0, over)])
    masks = r.masks.unpack()
    hits = masks.sum(0)
    doubled = (hits > 1).sum() / (hits > 0).sum()
    assert 0.1 < doubled < 0.5
    assert r.review_score == pytest.approx(documented(margin_doubt(r.scores, 0.5), 0.0, doubled), abs=1e-5)
    separate = run("instance", [(0, 12.0, A), (1, 12.0, B)])
    assert r.review_score > separate.review_score + 0.1


@pytest.mark.parametrize("family", ["mask2former", "eomt"])
def test_a_panoptic_segment_that_barely_survived_the_merge_brings_the_image_forward(family):
    """B loses part of its own pixels to the more confident A: the more it loses (up to what the
    overlap threshold lets it), the higher the score; the figure is the lost share of both
    queries' own pixels over what the threshold allows."""
    scores = []
    for lost_rows in (0, 1, 2):
        b = rect(slice(14 - lost_rows, 26 - lost_rows), slice(2, 14))
        r = run("panoptic", [(0, 12.0, A), (1, 11.0, b)], overlap_threshold=0.8, family=family)
        assert len(r.ids) == 2
        lost = lost_rows * 12
        expected = documented(margin_doubt(r.scores, 0.5), 0.0, lost / (144 + 144) / (1 - 0.8))
        assert r.review_score == pytest.approx(expected, abs=1e-5)
        scores.append(r.review_score)
    assert scores[0] < scores[1] < scores[2]


def test_semantic_ties_between_classes_bring_the_image_forward():
    """Two queries of two labels over the same pixels, equally sure: every pixel there is a tie."""
    everywhere = np.full((SIZE, SIZE), CRISP, dtype=np.float32)
    sure = run("semantic", [(0, 12.0, everywhere)])
    tied = run("semantic", [(0, 12.0, everywhere), (1, 12.0, everywhere)])
    half = run("semantic", [(0, 12.0, everywhere), (1, 12.0, rect(slice(0, 16), slice(0, SIZE)))])
    assert sure.review_score < 0.01
    # A tie: the winner holds half the scores (d_score 0.5) and every pixel is undecided.
    assert tied.review_score == pytest.approx(1.0, abs=1e-4)
    # Half the image tied: d_score = 1 - (0.5 * 0.5 + 0.5 * 1) = 0.25, undecided 0.5, so
    # 1 - 0.75 * 0.5 = 0.625.
    assert half.review_score == pytest.approx(0.625, abs=1e-3)


@pytest.mark.parametrize("threshold", [0.02, 0.1, 0.5, 0.9, 0.98])
@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_crisp_masks_stay_decided_at_any_mask_threshold(task, threshold):
    """The undecided band never reaches 0 or 1: a crisp, confident mask is decided whatever the
    mask threshold (a band clipped at 1 - 1e-6 called every pixel of such a mask undecided)."""
    r = run(task, [(0, 12.0, A), (1, 12.0, B)], mask_threshold=threshold)
    assert len(r.ids) == 2
    assert r.review_score < 0.01
