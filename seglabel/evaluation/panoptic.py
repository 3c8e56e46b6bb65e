"""Panoptic scoring: PQ, SQ and RQ overall, for things, for stuff and per category, with
panopticapi's ``pq_compute`` semantics (:func:`panoptic_image_stats`), streamed image by image."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.errors import EvalError
from ..outputs.labelmap import LabelSpace, remap_ids
from ..outputs.reader import OutputReader
from .scoring import MATCH_IOU, Scored, check_size, mean, truth_categories
from .truth import (
    CocoTruth,
    PngFolder,
    TruthImage,
)

# panopticapi's: a joint id gt * OFFSET + pred, ids below 256**3.
OFFSET = 256**3


@dataclass
class PQStat:
    """One category's panoptic sums, as panopticapi's PQStatCat."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, other: "PQStat") -> None:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn

    def figures(self) -> dict[str, float] | None:
        """PQ, SQ, RQ; None for a category neither truth nor prediction holds."""
        if self.tp + self.fp + self.fn == 0:
            return None
        denominator = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return {"PQ": self.iou / denominator, "SQ": self.iou / self.tp if self.tp else 0.0,
                "RQ": self.tp / denominator}


def panoptic_image_stats(gt: np.ndarray, gt_segments: Mapping[int, Mapping[str, Any]], pred: np.ndarray,
                         pred_categories: Mapping[int, int]) -> dict[int, PQStat]:
    """One image's panoptic sums per category, as panopticapi's ``pq_compute_single_core``.

    ``gt``/``pred``: id maps; ``gt_segments``: id -> its ``category_id``, ``iscrowd``, ``area``
    (the JSON's); ``pred_categories``: id -> category of the predicted segments (pixels of
    other ids count as void in the prediction).
    """
    stats: dict[int, PQStat] = defaultdict(PQStat)
    ids, counts = np.unique(pred, return_counts=True)
    pred_area = {int(i): int(c) for i, c in zip(ids, counts) if int(i) in pred_categories}
    joint, counts = np.unique(gt.astype(np.uint64) * OFFSET + pred.astype(np.uint64), return_counts=True)
    overlap = {(int(j // OFFSET), int(j % OFFSET)): int(c) for j, c in zip(joint, counts)}
    gt_matched, pred_matched = set(), set()
    for (g, p), intersection in overlap.items():
        seg = gt_segments.get(g)
        if seg is None or p not in pred_area or seg["iscrowd"] == 1:
            continue
        if seg["category_id"] != pred_categories[p]:
            continue
        union = pred_area[p] + seg["area"] - intersection - overlap.get((0, p), 0)
        iou = intersection / union
        if iou > MATCH_IOU:
            stats[seg["category_id"]].tp += 1
            stats[seg["category_id"]].iou += iou
            gt_matched.add(g)
            pred_matched.add(p)
    crowd_of: dict[int, int] = {}
    for g, seg in gt_segments.items():
        if g in gt_matched:
            continue
        if seg["iscrowd"] == 1:
            crowd_of[seg["category_id"]] = g
            continue
        stats[seg["category_id"]].fn += 1
    for p, area in pred_area.items():
        if p in pred_matched:
            continue
        cat = pred_categories[p]
        ignored = overlap.get((0, p), 0)
        if cat in crowd_of:
            ignored += overlap.get((crowd_of[cat], p), 0)
        if ignored / area > MATCH_IOU:
            continue
        stats[cat].fp += 1
    return stats


def _check_areas(gt: np.ndarray, segments: Sequence[Mapping[str, Any]], uri: str) -> None:
    """A truth segment's JSON area is its pixel count in the PNG (panopticapi takes the JSON's
    word for it; one that lies changes PQ without a word)."""
    ids, counts = np.unique(gt, return_counts=True)
    pixels = dict(zip(ids.tolist(), counts.tolist()))
    for seg in segments:
        if seg["area"] != pixels.get(seg["id"], 0):
            raise EvalError(f"{uri}: segment {seg['id']} has area {seg['area']} in the JSON and "
                            f"{pixels.get(seg['id'], 0)} pixels in the PNG")


def _pq_average(stats: Mapping[int, PQStat], categories: Sequence[int]) -> dict[str, Any]:
    """Mean PQ, SQ, RQ over the categories that hold a segment (panopticapi's ``pq_average``),
    and ``n``, how many; figures None when there are none."""
    figures = [f for f in (stats[c].figures() if c in stats else None for c in categories) if f]
    out: dict[str, Any] = {name: mean([f[name] for f in figures]) for name in ("PQ", "SQ", "RQ")}
    out["n"] = len(figures)
    return out


class PanopticScorer:
    """PQ / SQ / RQ summed image by image."""

    def __init__(self, truth: CocoTruth, folder: PngFolder, space: LabelSpace):
        self.truth, self.folder, self.space = truth, folder, space
        self.to_truth = truth_categories(space.names, truth.names)
        self.stats: dict[int, PQStat] = defaultdict(PQStat)
        self.left_out = 0

    def score(self, image: TruthImage, row: Mapping[str, Any], reader: OutputReader) -> Scored:
        check_size(image, row, self.truth.url)
        ann = image.annotation or {}
        uri = self.folder.uri(ann["file_name"])
        gt = self.folder.read(uri, row["width"], row["height"], "rgb")
        _check_areas(gt, ann["segments_info"], uri)
        pred = reader.mask(row, self.folder.max_bytes)
        segments, remap = self.space.apply(row)
        if self.space.from_model is not None:  # fused and dropped segments' pixels
            pred = remap_ids(pred, remap)
        categories = {}
        for seg in segments:
            cat = self.to_truth.get(seg["label_id"])
            if cat is None:
                self.left_out += 1
            else:
                categories[int(seg["id"])] = cat
        image_stats = panoptic_image_stats(gt, {s["id"]: s for s in ann["segments_info"]}, pred, categories)
        for cat, stat in image_stats.items():
            self.stats[cat].add(stat)
        quality = _pq_average(image_stats, list(image_stats))["PQ"]
        truth_segments = sum(1 for s in ann["segments_info"] if s["iscrowd"] != 1)
        predicted = len(set(np.unique(pred).tolist()) & set(categories))
        return Scored(1.0 if quality is None else quality, truth_segments, predicted)

    def result(self) -> dict[str, Any]:
        cats = list(self.truth.names)
        things = [c for c in cats if c in self.truth.things]
        stuff = [c for c in cats if c not in self.truth.things]
        overall = {"all": _pq_average(self.stats, cats), "things": _pq_average(self.stats, things),
                   "stuff": _pq_average(self.stats, stuff)}
        names = ("PQ", "SQ", "RQ")
        flat = {**{k: overall["all"][k] for k in names},
                **{f"{k}_{part}": overall[part][k] for part in ("things", "stuff") for k in names}}
        categories = []
        for cat in cats:
            figures = self.stats[cat].figures() if cat in self.stats else None
            stat = self.stats.get(cat, PQStat())
            categories.append({"id": cat, "name": self.truth.names[cat], "isthing": cat in self.truth.things,
                               **(figures or dict.fromkeys(("PQ", "SQ", "RQ"))),
                               "tp": stat.tp, "fp": stat.fp, "fn": stat.fn})
        return {"overall": flat, "counted_categories": {k: v["n"] for k, v in overall.items()},
                "categories": categories}
