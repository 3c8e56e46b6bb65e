"""Instance scoring: mask AP by pycocotools' ``COCOeval`` (``iouType="segm"``), its twelve stats
and AP per category, on the job's RLEs and scores as ``seglabel export --format coco`` writes
them; each image's quality from a greedy match by score within a label at IoU >= 0.5."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..core.errors import EvalError
from ..formats.coco import coco_annotation
from ..outputs.labelmap import LabelSpace
from ..outputs.reader import OutputReader
from .scoring import MATCH_IOU, Scored, check_size, mean, truth_categories
from .truth import (
    CocoTruth,
    TruthImage,
    rle_length,
)

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _quiet_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def match_quality(ious: np.ndarray, dt_cats: Sequence[int], gt_cats: Sequence[int],
                  gt_crowd: Sequence[bool]) -> tuple[float, int, int, int]:
    """Greedy matching of one image's predictions (rows of ``ious``, best score first) to its
    truth (columns), within a category, at IoU ≥ 0.5, as COCOeval matches at that threshold:
    each prediction takes the unmatched truth it overlaps most; one that matches none but a
    crowd region of its category is ignored. Returns (sum of matched IoUs, matched, false
    positives, misses)."""
    matched_gt: set[int] = set()
    total, tp, fp = 0.0, 0, 0
    for d, cat in enumerate(dt_cats):
        best, best_iou, crowd_hit = -1, MATCH_IOU, False
        for g, gcat in enumerate(gt_cats):
            if gcat != cat or g in matched_gt:
                continue
            if gt_crowd[g]:
                crowd_hit = crowd_hit or ious[d, g] >= MATCH_IOU
            elif ious[d, g] >= best_iou:
                best, best_iou = g, ious[d, g]
        if best >= 0:
            matched_gt.add(best)
            total += float(best_iou)
            tp += 1
        elif not crowd_hit:
            fp += 1
    misses = sum(1 for g, crowd in enumerate(gt_crowd) if not crowd and g not in matched_gt)
    return total, tp, fp, misses


def _quality(total: float, tp: int, fp: int, fn: int) -> float:
    """Matched IoU summed over matches, misses and false positives (each counting 0); an image
    with nothing to find and nothing found is perfect."""
    return total / (tp + fp + fn) if tp + fp + fn else 1.0


class InstanceScorer:
    """Mask AP by COCOeval over the scored images; per image, :func:`match_quality`."""

    def __init__(self, truth: CocoTruth, space: LabelSpace):
        self.truth, self.space = truth, space
        self.gt = _quiet_coco(truth.dataset)
        self.to_truth = truth_categories(space.names, truth.names)
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self.left_out = 0

    def score(self, image: TruthImage, row: Mapping[str, Any], reader: OutputReader) -> Scored:
        check_size(image, row, self.truth.url)
        preds = []
        for seg in self.space.apply(row)[0]:
            cat = self.to_truth.get(seg["label_id"])
            if cat is None:
                self.left_out += 1
                continue
            # A damaged row's RLE would send pycocotools past its buffers (or round forever).
            if seg["score"] is None or rle_length(seg["rle"] or "") != row["width"] * row["height"]:
                raise EvalError(f"the output's row of {row['key']!r} has a damaged segment {seg['id']}")
            ann = coco_annotation(row, seg, "instance")
            ann.update(category_id=cat, image_id=image.id)
            preds.append(ann)
        self.results.extend(preds)
        self.image_ids.append(image.id)
        # COCOeval's order: by descending score, ties in input order.
        preds = [preds[i] for i in np.argsort([-p["score"] for p in preds], kind="mergesort")]
        gts = self.gt.imgToAnns.get(image.id, [])
        gt_rles = [self.gt.annToRLE(g) for g in gts]
        crowd = [bool(g["iscrowd"]) for g in gts]
        ious = np.asarray(mask_utils.iou([p["segmentation"] for p in preds], gt_rles, crowd) if preds and gts
                          else np.zeros((len(preds), len(gts))))
        found = match_quality(ious, [p["category_id"] for p in preds], [g["category_id"] for g in gts], crowd)
        return Scored(_quality(*found), sum(1 for c in crowd if not c), len(preds))

    def result(self) -> dict[str, Any]:
        if not self.image_ids:
            return {"overall": dict.fromkeys(COCO_STATS), "categories": []}
        if self.results:
            with contextlib.redirect_stdout(io.StringIO()):
                dt = self.gt.loadRes(self.results)
        else:  # pycocotools' loadRes cannot take an empty list
            dt = _quiet_coco({**self.gt.dataset, "annotations": []})
        evaluation = COCOeval(self.gt, dt, iouType="segm")
        evaluation.params.imgIds = sorted(self.image_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        overall = {name: (float(v) if v > -1 else None) for name, v in zip(COCO_STATS, evaluation.stats)}
        precision = evaluation.eval["precision"]  # [IoU thresholds, recall, category, area, max dets]
        categories = []
        for k, cat in enumerate(evaluation.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            categories.append({"id": int(cat), "name": self.truth.names[int(cat)], "AP": mean(p)})
        return {"overall": overall, "categories": categories}
