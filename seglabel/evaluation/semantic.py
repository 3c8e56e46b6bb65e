"""Semantic scoring: a confusion matrix (truth × prediction, and a "no label" column)
accumulated image by image; IoU per class, mIoU and pixel accuracy."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from ..core.errors import EvalError
from ..outputs.labelmap import LabelSpace
from ..outputs.reader import OutputReader
from .scoring import Scored, truth_categories
from .truth import (
    PngFolder,
    TruthImage,
    check_known,
)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU of each truth class from a (K, K + 1) confusion matrix (truth rows, predicted
    columns, the last "no label"); NaN for a class neither truth nor prediction holds."""
    k = confusion.shape[0]
    hits = np.diag(confusion[:, :k]).astype(np.float64)
    union = confusion.sum(axis=1) + confusion[:, :k].sum(axis=0) - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, hits / np.maximum(union, 1), np.nan)


class SemanticScorer:
    """A confusion matrix of truth classes × predicted classes, image by image."""

    def __init__(self, folder: PngFolder, classes: Mapping[int, str], space: LabelSpace, ignore_index: int):
        self.folder, self.ignore_index = folder, ignore_index
        self.ids = sorted(classes)
        self.names = [classes[i] for i in self.ids]
        k = len(self.ids)
        # Truth pixel -> class index (-1 ignored, -2 unknown); predicted label -> class index
        # (k: no label, or a label the truth's classes do not list).
        self.truth_index = np.full(1 << 16, -2, dtype=np.int64)
        self.truth_index[self.ids] = np.arange(k)
        if 0 <= ignore_index < 1 << 16:
            self.truth_index[ignore_index] = -1
        self.pred_index = np.full(1 << 16, k, dtype=np.int64)
        for name in self.names:
            check_known(name, set(space.names.values()), "the truth's label")
        to_class = truth_categories(space.names, dict(enumerate(self.names)))
        for model_id in space.model:
            index = to_class.get(space.label_of(model_id))
            if index is not None and 0 <= model_id < 1 << 16:
                self.pred_index[model_id] = index
        self.confusion = np.zeros((k, k + 1), dtype=np.int64)
        self.uris: dict[str, str] = {}
        # Predicted labels the truth's classes lack are "no label" pixels: no segment is left out.
        self.left_out = 0

    def score(self, image: TruthImage, row: Mapping[str, Any], reader: OutputReader) -> Scored:
        uri = self.uris[image.name]
        truth = self.folder.read(uri, row["width"], row["height"], "id")
        pred = reader.mask(row, self.folder.max_bytes)
        index = self.truth_index[truth]
        if (index == -2).any():
            value = int(truth[index == -2][0])
            raise EvalError(f"{uri} has label id {value}, which the truth's labels do not name "
                            f"(see --truth-labels and --ignore-index {self.ignore_index})")
        valid = index >= 0
        k = len(self.ids)
        t, p = index[valid], self.pred_index[pred[valid]]
        confusion = np.bincount(t * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)
        self.confusion += confusion
        ious = iou_per_class(confusion)
        present = ~np.isnan(ious)
        return Scored(float(ious[present].mean()) if present.any() else None,
                      int(np.count_nonzero(confusion.sum(axis=1))),
                      int(np.count_nonzero(confusion[:, :k].sum(axis=0))))

    def result(self) -> dict[str, Any]:
        ious = iou_per_class(self.confusion)
        total = int(self.confusion.sum())
        overall = {
            "mIoU": float(np.nanmean(ious)) if not np.isnan(ious).all() else None,
            "pixel_accuracy": float(np.trace(self.confusion[:, : len(self.ids)]) / total) if total else None,
        }
        categories = [{"id": i, "name": n, "IoU": None if math.isnan(v) else float(v),
                       "truth_pixels": int(self.confusion[c].sum())}
                      for c, (i, n, v) in enumerate(zip(self.ids, self.names, ious.tolist()))]
        return {"overall": overall, "categories": categories}
