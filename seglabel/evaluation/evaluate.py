"""``seglabel eval``: how good a job's labels are, scored against a labeled sample.

A job's output (local or object storage, finished or partial) is scored against ground truth
(:mod:`seglabel.truth`) by the job's task, with the figures the field reports:

* **instance**: mask AP by pycocotools' ``COCOeval`` (``iouType="segm"``): its twelve stats
  (AP, AP50, AP75, AP small/medium/large, AR@1/10/100, AR small/medium/large) and AP per
  category (precision averaged over IoU thresholds and recall, area "all", 100 detections,
  as detectron2 reports it). The job's RLEs and scores go in as COCO results, built as
  ``seglabel export --format coco`` writes them, so the figures are those of pycocotools run
  on the exported JSON.
* **panoptic**: PQ, SQ, RQ overall, for things and for stuff, and per category, with
  panopticapi's ``pq_compute`` semantics (a match is IoU > 0.5 within a category; a truth
  segment's area is its JSON ``area``; void pixels (id 0) leave a prediction's union; crowd
  truth is never missed, and a prediction more than half void or crowd of its category is
  no false positive).
* **semantic**: a confusion matrix accumulated image by image: IoU per class (classes that
  neither truth nor prediction hold are left out), mIoU, pixel accuracy. Truth pixels at
  ``ignore_index`` are not scored; predicted pixels that a job's filters dropped are "no
  label" (wrong for every class).

Images are matched by key (:class:`~seglabel.truth.KeyMatcher`) and categories by name. Only
images that both hold, with an ok row, are scored; truth images the output lacks, output
rows the truth lacks, error rows and ambiguous names are counted and reported. Predicted
segments of labels the truth's categories do not list are left out, and counted (pycocotools
ignores them too; panopticapi would stop).

The review order is checked too: Spearman's rank correlation of each scored image's review score
(:mod:`seglabel.review`) and its quality, over the images that have both (-1: the images the
score puts first are exactly the worst ones).

Memory: panoptic and semantic stream image by image (one image's truth and masks at a time,
plus per image a key and a row of the per-image table); instance holds the sample, truth and
predictions, as COCOeval does.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.stats import spearmanr

from ..core.config import DEFAULT_MAX_BYTES
from ..core.errors import EvalError, LabelMapError, OutputError, one_line
from ..core.redaction import get_logger
from ..formats.coco import coco_annotation
from ..outputs.labelmap import LabelSpace, remap_ids
from ..outputs.reader import OutputReader
from ..outputs.store import OutputStore
from ..storage.filesystem import open_url
from ..storage.location import Destination
from .truth import (
    CocoTruth,
    KeyMatcher,
    PngFolder,
    TruthImage,
    check_known,
    panoptic_folder,
    read_coco,
    read_truth_labels,
    rle_length,
)

log = get_logger(__name__)

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# What the summary line and the table head show first, per task.
HEADLINE = {
    "instance": ("AP", "AP50", "AP75"),
    "panoptic": ("PQ", "SQ", "RQ"),
    "semantic": ("mIoU", "pixel_accuracy"),
}
# panopticapi's: a joint id gt * OFFSET + pred, ids below 256**3.
OFFSET = 256**3
MATCH_IOU = 0.5
PER_IMAGE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("quality", pa.float64()),
    ("truth_segments", pa.int64()),
    ("predicted_segments", pa.int64()),
    ("review_score", pa.float64()),
])


@dataclass(frozen=True)
class EvalOptions:
    """How to score, beyond the output and the truth: ``truth_masks`` (a panoptic truth's PNG
    folder), ``truth_labels`` (names of a semantic truth's ids), ``ignore_index``, ``limit``
    (score the first N matched images, in the truth's order), ``per_image`` (a Parquet file of
    one row per scored image) and ``json`` (the report), ``max_bytes`` (per truth PNG),
    ``label_map`` and ``unmapped`` (score in a team's labels: :mod:`seglabel.labelmap`), and
    fsspec options for the output, the truth, and where the files go."""

    truth_masks: str | None = None
    truth_labels: str | None = None
    label_map: str | None = None
    unmapped: str = "drop"
    ignore_index: int = 255
    limit: int | None = None
    per_image: str | None = None
    json: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    storage_options: Mapping[str, Any] | None = None
    truth_storage_options: Mapping[str, Any] | None = None
    to_storage_options: Mapping[str, Any] | None = None


@dataclass
class Scored:
    """One image's quality (None where nothing is scored) and its segment counts."""

    quality: float | None
    truth_segments: int
    predicted_segments: int


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def truth_categories(id2label: Mapping[int, str], names: Mapping[int, str]) -> dict[int, int]:
    """Model label id -> the truth's category id of the same name (every model id of a name
    the model's label set repeats); labels the truth lacks are absent."""
    by_name = {name: cat for cat, name in names.items()}
    return {label_id: by_name[name] for label_id, name in id2label.items() if name in by_name}


def _check_size(image: TruthImage, row: Mapping[str, Any], truth: str) -> None:
    if (image.width, image.height) != (row["width"], row["height"]):
        raise EvalError(f"{truth}: image {image.name!r} is {image.width}x{image.height} there and "
                        f"{row['width']}x{row['height']} in the output (key {row['key']!r})")


# -- instance ----------------------------------------------------------------------------------


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
        _check_size(image, row, self.truth.url)
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
            categories.append({"id": int(cat), "name": self.truth.names[int(cat)], "AP": _mean(p)})
        return {"overall": overall, "categories": categories}


# -- panoptic ----------------------------------------------------------------------------------


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
    out: dict[str, Any] = {name: _mean([f[name] for f in figures]) for name in ("PQ", "SQ", "RQ")}
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
        _check_size(image, row, self.truth.url)
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


# -- semantic ----------------------------------------------------------------------------------


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


# -- the run -----------------------------------------------------------------------------------


class Scorer(Protocol):
    """What each task's scorer does: score one matched image, then give the figures."""

    left_out: int  # predicted segments of labels the truth does not list

    def score(self, image: TruthImage, row: Mapping[str, Any], reader: OutputReader) -> Scored: ...

    def result(self) -> dict[str, Any]: ...


@dataclass
class _Sample:
    """The truth's images, in its order, and the scorer for the job's task."""

    images: list[TruthImage]
    scorer: Scorer
    strip_extension: bool = False


def _is_folder(url: str, storage_options: Mapping[str, Any] | None) -> bool:
    try:
        fs, path = open_url(url, storage_options)
        return bool(fs.isdir(path))
    except Exception as exc:  # credentials, endpoint
        raise EvalError(f"cannot open the truth {url}: {one_line(exc)}") from exc


def _sample(truth: str, reader: OutputReader, options: EvalOptions) -> _Sample:
    """Read and check the truth, and the scorer for the job's task."""
    job, space = reader.record, reader.space
    if _is_folder(truth, options.truth_storage_options):
        if job.task != "semantic":
            raise EvalError(f"the truth {truth} is a folder of label PNGs (semantic) and the output holds "
                            f"{job.task} masks: give a COCO {job.task} JSON")
        classes = (read_truth_labels(options.truth_labels, options.truth_storage_options)
                   if options.truth_labels else dict(space.names))
        folder = PngFolder(truth, options.truth_storage_options, options.max_bytes, "the truth PNG")
        scorer = SemanticScorer(folder, classes, space, options.ignore_index)
        images = []
        for name, uri in folder.listing():
            scorer.uris[name] = uri
            images.append(TruthImage(name, len(images)))
        return _Sample(images, scorer, strip_extension=True)
    if options.truth_labels:
        raise EvalError("--truth-labels names a semantic truth's ids; a COCO truth names its categories")
    coco = read_coco(truth, options.truth_storage_options, set(space.names.values()))
    if coco.kind != job.task:
        raise EvalError(f"the truth {truth} is COCO {coco.kind} and the output holds {job.task} masks")
    if coco.kind == "instance":
        return _Sample(coco.images, InstanceScorer(coco, space))
    images = coco.images
    folder = PngFolder(panoptic_folder(coco, options.truth_masks), options.truth_storage_options,
                       options.max_bytes, "the truth PNG")
    if not _is_folder(folder.url, options.truth_storage_options):
        raise EvalError(f"the folder of the truth's PNGs, {folder.url}, does not exist "
                        "(give it with --truth-masks)")
    return _Sample(images, PanopticScorer(coco, folder, space))


@dataclass
class _Matched:
    """Which truth images are scored, by key, and what was not."""

    selected: dict[str, TruthImage]
    counts: dict[str, Any]


def _match(store: OutputStore, sample: _Sample, limit: int | None) -> _Matched:
    """Match the output's rows to the truth's images by key (a pass over keys and statuses).
    Every truth image is counted once, as scored or why not; every output row either is a
    truth image's match or counts in ``output_only``."""
    matcher = KeyMatcher((i.name for i in sample.images), strip_extension=sample.strip_extension)
    status: dict[str, str] = {}
    rows = 0
    for batch in store.iter_batches(["key", "status"], 8192):
        for key, state in zip(batch.column("key").to_pylist(), batch.column("status").to_pylist()):
            rows += 1
            if matcher.add(key):
                status[key] = state
    matched = matcher.matched()
    selected: dict[str, TruthImage] = {}
    counts = dict.fromkeys(("truth_only", "ambiguous", "error_rows", "unannotated", "over_limit"), 0)
    for index, image in enumerate(sample.images):
        key = matched.get(index)
        if key is None:
            counts["ambiguous" if matcher.is_ambiguous(index) else "truth_only"] += 1
        elif status[key] != "ok":
            counts["error_rows"] += 1
        elif not image.scorable:
            counts["unannotated"] += 1
        elif limit is not None and len(selected) >= limit:
            counts["over_limit"] += 1
        else:
            selected[key] = image
    return _Matched(selected, {"truth_images": len(sample.images), "output_rows": rows,
                               "scored": len(selected), **counts, "output_only": rows - len(matched)})


class _PerImage:
    """The per-image table, written as rows come (a Parquet row group every 4096 rows) to a
    local temporary file, published with the report once the evaluation succeeds."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()
        self.writer = pq.ParquetWriter(self.file, PER_IMAGE_SCHEMA)
        self.rows: dict[str, list] = {name: [] for name in PER_IMAGE_SCHEMA.names}
        # (review score, quality) of each image that has both: 16 bytes an image.
        self.pairs: list[tuple[float, float]] = []

    def add(self, key: str, scored: Scored, review: float | None) -> None:
        values = (key, scored.quality, scored.truth_segments, scored.predicted_segments, review)
        for name, value in zip(PER_IMAGE_SCHEMA.names, values):
            self.rows[name].append(value)
        if review is not None and scored.quality is not None:
            self.pairs.append((review, scored.quality))
        if len(self.rows["key"]) >= 4096:
            self.flush()

    def review_order(self) -> dict[str, Any]:
        """How well the review score orders the scored images: Spearman's rank correlation of
        review score and quality (-1: the most doubtful are exactly the worst), over the images
        that have both; None where it is undefined (fewer than 2, or one side constant)."""
        rho = None
        if len(self.pairs) >= 2:
            review, quality = np.array(self.pairs).T
            if np.ptp(review) > 0 and np.ptp(quality) > 0:
                rho = float(spearmanr(review, quality).statistic)
        return {"spearman": rho, "images": len(self.pairs)}

    def flush(self) -> None:
        if self.rows["key"]:
            self.writer.write_table(pa.table(self.rows, schema=PER_IMAGE_SCHEMA))
            self.rows = {name: [] for name in PER_IMAGE_SCHEMA.names}

    def close(self) -> None:
        """Finish the Parquet file (and leave it to be copied)."""
        self.flush()
        self.writer.close()
        self.file.seek(0)

    def __enter__(self) -> "_PerImage":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.writer.is_open:  # an evaluation that failed: the table is thrown away
            with contextlib.suppress(Exception):
                self.writer.close()
        self.file.close()


class _Files:
    """Where the report and the per-image table go: checked before anything is scored, and
    written both or neither."""

    def __init__(self, options: EvalOptions):
        self.places = {}
        for flag, url in (("--json", options.json), ("--per-image", options.per_image)):
            if not url:
                continue
            dest = Destination(url, options.to_storage_options)
            if url.endswith("/") or dest.is_dir():
                raise EvalError(f"{flag} must name a file, and {url} is a folder")
            self.places[flag] = dest
        if len(self.places) == 2 and options.json == options.per_image:
            raise EvalError("--json and --per-image name the same file")

    def publish(self, report: Mapping[str, Any], table: _PerImage) -> None:
        written = []
        table.close()
        try:
            for flag, dest in self.places.items():
                if flag == "--per-image":
                    with dest.open(dest.root) as out:
                        shutil.copyfileobj(table.file, out)
                else:
                    dest.write_file(dest.root, json.dumps(report, indent=2, allow_nan=False).encode("utf-8"))
                written.append(dest)
        except (OSError, OutputError) as exc:
            for done in written:  # the other file alone would claim an evaluation that failed
                with contextlib.suppress(OSError):
                    done.fs.rm_file(done.root)
            raise EvalError(f"cannot write {dest.url}: {type(exc).__name__}: {one_line(exc)}") from exc


def evaluate(output: str, truth: str, **options: Any) -> dict[str, Any]:
    """Score a job's output (``output``, any fsspec URL) against the truth at ``truth``.

    ``options`` are :class:`EvalOptions`' fields by name. Returns the report: ``task``,
    ``images`` (``truth_images`` = ``scored`` + ``truth_only`` + ``ambiguous`` +
    ``error_rows`` + ``unannotated`` + ``over_limit``; ``output_rows`` = matched rows +
    ``output_only``), ``overall`` figures, ``categories`` (sorted
    worst first; a category with no figure last) and ``left_out_segments``. Writes the
    per-image table and the JSON report where asked, only when it succeeds. Raises
    :class:`~seglabel.truth.EvalError` with one readable line.
    """
    try:
        settings = EvalOptions(**options)
    except TypeError as exc:
        raise EvalError(f"eval: {exc}") from exc
    if settings.limit is not None and settings.limit < 1:
        raise EvalError(f"--limit must be at least 1, got {settings.limit}")
    try:
        return _evaluate(output, truth, settings)
    except (OutputError, LabelMapError) as exc:
        raise EvalError(str(exc)) from exc


def _evaluate(output: str, truth: str, options: EvalOptions) -> dict[str, Any]:
    reader = OutputReader(output, options.storage_options, options.label_map, options.unmapped)
    job = reader.record
    files = _Files(options)
    sample = _sample(truth, reader, options)
    matched = _match(reader.store, sample, options.limit)
    if not matched.selected:
        log.warning("no image of the truth matched an ok row of the output: nothing to score")
    with _PerImage() as table:
        for row in reader.rows():
            image = matched.selected.get(row["key"])
            if image is not None and row["status"] == "ok":
                table.add(row["key"], sample.scorer.score(image, row, reader), row["review_score"])
        result = sample.scorer.result()
        figure = {"instance": "AP", "panoptic": "PQ", "semantic": "IoU"}[job.task]
        result["categories"].sort(key=lambda c: (c[figure] is None, c[figure] or 0))
        report = {"task": job.task, "output": output, "truth": truth, "model": job.model_version,
                  "images": matched.counts, **result, "left_out_segments": sample.scorer.left_out,
                  "review_order": table.review_order()}
        files.publish(report, table)
    return report


# -- what a person and a script read -------------------------------------------------------------


def _figure(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_line(report: Mapping[str, Any]) -> str:
    """One line of ``name=value`` words: the task, the image counts and the headline figures
    (``nan`` where there is none)."""
    words = [f"task={report['task']}"]
    words += [f"{name}={value}" for name, value in report["images"].items()]
    for name in HEADLINE[report["task"]]:
        value = report["overall"][name]
        words.append(f"{name}={'nan' if value is None else f'{value:.6f}'}")
    rho = report["review_order"]["spearman"]
    words.append(f"review_spearman={'nan' if rho is None else f'{rho:.6f}'}")
    return "seglabel-eval " + " ".join(words)


def report_table(report: Mapping[str, Any]) -> str:
    """The report as a person reads it: overall figures, then categories, worst first."""
    images = report["images"]
    lines = [
        f"{report['task']} labels of {report['output']} ({report['model']}) against {report['truth']}",
        f"images scored {images['scored']} of {images['truth_images']} in the truth; truth only "
        f"{images['truth_only']}, ambiguous {images['ambiguous']}, error rows {images['error_rows']}, "
        f"without a panoptic annotation {images['unannotated']}, over --limit {images['over_limit']}; "
        f"output rows the truth lacks {images['output_only']} of {images['output_rows']}",
    ]
    if report["left_out_segments"]:
        lines.append(f"predicted segments of labels the truth lacks, left out: {report['left_out_segments']}")
    order = report["review_order"]
    lines.append(f"review order: Spearman correlation of review score and image quality "
                 f"{_figure(order['spearman'])} over {order['images']} images (-1: the most doubtful are "
                 "exactly the worst; 0: no better than chance)")
    lines.append("")
    overall = report["overall"]
    width = max(len(name) for name in overall)
    lines += [f"{name:<{width}}  {_figure(value)}" for name, value in overall.items()]
    categories = report["categories"]
    if categories:
        columns = [c for c in categories[0] if c not in ("id", "name")]
        name_width = max(8, *(len(c["name"]) for c in categories))
        lines += ["", f"{'category':<{name_width}}  " + "  ".join(f"{c:>8}" for c in columns)]
        for cat in categories:
            cells = [str(cat[c]) if isinstance(cat[c], (bool, int)) else _figure(cat[c]) for c in columns]
            lines.append(f"{cat['name']:<{name_width}}  " + "  ".join(f"{v:>8}" for v in cells))
    return "\n".join(lines)
