"""`seglabel eval` on the outputs of real jobs (a local Ray, tiny random-weight checkpoints and the
stand-in model, photos from scikit-image), against truths the tests write from those outputs.

The figures are checked three ways:
* against the reference implementations run on the same files: pycocotools' COCOeval on the
  JSON `seglabel export --format coco` writes, panopticapi's `pq_compute` (panopticapi-lite,
  in a virtual environment of its own: it needs numpy < 2) on `export --format coco-panoptic`,
  and a confusion matrix computed here with numpy;
* on truths that agree with the predictions everywhere (every figure 1);
* on truths with one instance removed, one label swapped, one mask eroded, against amounts
  worked out here from COCOeval's and panopticapi's published definitions.

The job's outputs are read with tests/readback.py (pyarrow, Pillow, pycocotools; no seglabel code).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from readback import id_map, read_png, read_rows
from scipy import ndimage
from skimage import data, measure

from helpers import ROOT, tool_python
from seglabel.cli import main
from seglabel.core.errors import EvalError
from seglabel.evaluation.evaluate import evaluate
from seglabel.evaluation.matching import KeyMatcher
from seglabel.evaluation.panoptic import panoptic_image_stats
from seglabel.evaluation.scoring import truth_categories
from seglabel.formats.export import export

# Keys with a space, '#', '%', non-ASCII and nested folders; one file that is not an image.
PHOTOS = {
    "astronaut.jpg": data.astronaut,
    "street/coffee 1.png": data.coffee,
    "street/cats/chelsea #2 é%.png": data.chelsea,
    "rocket.jpg": data.rocket,
}
BROKEN = "broken.jpg"
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-images")
    for key, make in PHOTOS.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make()).save(path)
    (root / BROKEN).write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def run_job(tmp_path_factory, corpus, checkpoint, name: str, **settings) -> str:
    from seglabel.job.pipeline import label

    out = tmp_path_factory.mktemp(f"eval-{name}") / "labels"
    summary = label(str(corpus), str(out), model=str(checkpoint), **settings)
    assert (summary.ok, summary.error) == (len(PHOTOS), 1)
    return str(out)


@pytest.fixture(scope="module")
def instance_out(ray_session, tmp_path_factory, corpus, checkpoints) -> str:
    # The tiny model's masks are large and overlap: a hard case for matching.
    return run_job(tmp_path_factory, corpus, checkpoints["instance"], "instance", score_threshold=0.3)


@pytest.fixture(scope="module")
def boxes_out(ray_session, tmp_path_factory, corpus, checkpoints) -> str:
    # The stand-in: boxes with known scores, 2 per label per image (a case to work out by hand).
    return run_job(tmp_path_factory, corpus, checkpoints["instance"], "boxes",
                   stand_in="segments=10,coverage=0.02")


@pytest.fixture(scope="module")
def panoptic_out(ray_session, tmp_path_factory, corpus, checkpoints) -> str:
    return run_job(tmp_path_factory, corpus, checkpoints["panoptic"], "panoptic",
                   stand_in="segments=12,coverage=0.03", thing_labels="label0,label1")


@pytest.fixture(scope="module")
def semantic_out(ray_session, tmp_path_factory, corpus, checkpoints) -> str:
    return run_job(tmp_path_factory, corpus, checkpoints["semantic"], "semantic",
                   stand_in="segments=8,coverage=0.05")


def ok_rows(output: str) -> list[dict]:
    return sorted((r for r in read_rows(output) if r["status"] == "ok"), key=lambda r: r["key"])


def seg_mask(row: dict, seg: dict) -> np.ndarray:
    rle = {"size": [row["height"], row["width"]], "counts": seg["rle"].encode()}
    return mask_utils.decode(rle).astype(bool)


def compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major runs, starting with 0s), as iscrowd truth has it."""
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def polygons(mask: np.ndarray) -> list[list[float]]:
    out = []
    for contour in measure.find_contours(np.pad(mask, 1).astype(np.uint8), 0.5):
        if len(contour) >= 3:
            out.append([float(v) for yx in contour[:, ::-1] - 1 for v in yx])
    return out


def disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


# -- instance ----------------------------------------------------------------------------------

# Truth category ids that are not the export's (label_id + 1), in another order: categories are
# matched by name.
def coco_categories(names) -> list[dict]:
    return [{"id": 100 - i, "name": name, "supercategory": ""} for i, name in enumerate(names)]


def instance_truth(rows: list[dict], perturb=None) -> dict:
    """COCO instances truth holding the rows' segments exactly; ``perturb(row, seg, mask, ann)``
    may change an annotation (return None to drop it)."""
    names = sorted({s["label"] for r in rows for s in r["segments"]} | {f"label{i}" for i in range(5)})
    cats = coco_categories(names)
    by_name = {c["name"]: c["id"] for c in cats}
    images, anns = [], []
    for i, row in enumerate(rows):
        image_id = 10 + 3 * i
        images.append({"id": image_id, "file_name": row["key"], "width": row["width"],
                       "height": row["height"]})
        for seg in row["segments"]:
            mask = seg_mask(row, seg)
            ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": by_name[seg["label"]],
                   "segmentation": compressed(mask), "area": int(mask.sum()), "bbox": [0, 0, 1, 1],
                   "iscrowd": 0}
            if perturb is not None:
                ann = perturb(row, seg, mask, ann, by_name)
            if ann is not None:
                anns.append(ann)
    return {"images": images, "annotations": anns, "categories": cats}


def write_json(path: Path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def reference_coco(truth_path: str, output: str, tmp_path: Path, image_ids=None) -> COCOeval:
    """pycocotools run on the exported JSON, its categories and images mapped to the truth's by
    name (here, independently of seglabel's matching)."""
    exported = tmp_path / "exported.json"
    export(output, "coco", str(exported))
    exp = json.loads(exported.read_text())
    gt = quiet(COCO, truth_path)
    truth_cat = {c["name"]: c["id"] for c in gt.dataset["categories"]}
    truth_image = {i["file_name"]: i["id"] for i in gt.dataset["images"]}
    exp_cat = {c["id"]: c["name"] for c in exp["categories"]}
    exp_image = {i["id"]: i["file_name"] for i in exp["images"]}
    results = []
    for ann in exp["annotations"]:
        name = exp_image[ann["image_id"]]
        if name in truth_image and exp_cat[ann["category_id"]] in truth_cat:
            category = truth_cat[exp_cat[ann["category_id"]]]
            results.append({**ann, "image_id": truth_image[name], "category_id": category})
    dt = quiet(gt.loadRes, results)
    ev = COCOeval(gt, dt, iouType="segm")
    if image_ids is not None:
        ev.params.imgIds = sorted(image_ids)
    quiet(ev.evaluate)
    quiet(ev.accumulate)
    quiet(ev.summarize)
    return ev


def test_instance_agreeing_truth_scores_one(boxes_out, tmp_path):
    rows = ok_rows(boxes_out)
    truth = write_json(tmp_path / "truth.json", instance_truth(rows))
    per_image = tmp_path / "per-image.parquet"
    report = evaluate(boxes_out, truth, per_image=str(per_image))
    assert report["images"]["scored"] == len(rows)
    assert (report["overall"]["AP"], report["overall"]["AP50"], report["overall"]["AP75"]) == (1.0, 1.0, 1.0)
    assert all(c["AP"] == 1.0 for c in report["categories"])
    table = pq.read_table(per_image).to_pylist()
    assert sorted(r["key"] for r in table) == [r["key"] for r in rows]
    assert all(r["quality"] == 1.0 and r["truth_segments"] == r["predicted_segments"] == 10 for r in table)


def test_instance_figures_equal_pycocotools(instance_out, tmp_path):
    """A truth unlike the predictions in every way COCO allows: dropped, eroded, dilated and
    relabelled instances, crowd regions, polygons and uncompressed RLE, extra instances; one
    truth image the output lacks and one output image the truth lacks."""
    rng = np.random.default_rng(7)
    rows = ok_rows(instance_out)

    def perturb(row, seg, mask, ann, by_name):
        roll = rng.random()
        if roll < 0.15:
            return None
        if roll < 0.3:
            mask = ndimage.binary_erosion(mask, disk(int(rng.integers(2, 12))))
        elif roll < 0.4:
            mask = ndimage.binary_dilation(mask, disk(int(rng.integers(2, 12))))
        elif roll < 0.5:
            ann["category_id"] = by_name[f"label{int(rng.integers(5))}"]
        elif roll < 0.6:
            ann["iscrowd"] = 1
        if not mask.any():
            return None
        form = rng.integers(3)
        ann["segmentation"] = (uncompressed(mask) if ann["iscrowd"] or form == 0
                               else polygons(mask) if form == 1 else compressed(mask))
        if not ann["segmentation"]:
            return None
        ann["area"] = int(mask.sum())
        return ann

    scored, left_out = rows[:-1], rows[-1]
    truth = instance_truth(scored, perturb)
    extra = np.zeros((scored[0]["height"], scored[0]["width"]), bool)
    extra[10:60, 20:90] = True
    truth["annotations"].append({"id": 9999, "image_id": truth["images"][0]["id"], "category_id": 100,
                                 "segmentation": compressed(extra), "area": int(extra.sum()), "iscrowd": 0})
    truth["images"].append({"id": 5, "file_name": "not/in/the/output.jpg", "width": 40, "height": 30})
    path = write_json(tmp_path / "truth.json", truth)
    report = evaluate(instance_out, path)

    images = report["images"]
    assert (images["scored"], images["truth_only"], images["error_rows"]) == (len(scored), 1, 0)
    assert images["output_only"] == 2  # the left-out photo and the broken file's error row
    assert left_out["key"] not in [i["file_name"] for i in truth["images"]]
    reference = reference_coco(path, instance_out, tmp_path, [i["id"] for i in truth["images"][:-1]])
    expected = [None if v == -1 else float(v) for v in reference.stats]
    assert [report["overall"][name] for name in COCO_STATS] == expected
    assert 0 < report["overall"]["AP"] < 1
    precision = reference.eval["precision"]
    for k, cat in enumerate(reference.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        got = next(c for c in report["categories"] if c["id"] == cat)
        assert got["AP"] == (float(np.mean(p)) if p.size else None)
    aps = [c["AP"] for c in report["categories"] if c["AP"] is not None]
    assert aps == sorted(aps)  # worst first


# 101 recall thresholds and 10 IoU thresholds: COCOeval's published parameters.
def recall_share(max_recall: float) -> float:
    """The share of COCO's recall thresholds 0, 0.01, ..., 1 at or below ``max_recall``
    (precision is 1 up to there and 0 beyond)."""
    return (int(np.floor(max_recall * 100 + 1e-9)) + 1) / 101


def test_instance_changes_worked_out_by_hand(boxes_out, tmp_path):
    rows = ok_rows(boxes_out)  # sorted by key: the truth's image ids ascend in this order
    labels = sorted({s["label"] for r in rows for s in r["segments"]})
    per_label = {lab: sum(1 for r in rows for s in r["segments"] if s["label"] == lab) for lab in labels}
    assert set(per_label.values()) == {2 * len(rows)}  # 10 segments, 5 labels: 2 each per image
    m = 2 * len(rows)
    for row in rows:  # boxes of one label never overlap by half: each matches only its truth
        for a in row["segments"]:
            for b in row["segments"]:
                if a is not b and a["label"] == b["label"]:
                    inter = (seg_mask(row, a) & seg_mask(row, b)).sum()
                    assert inter / (a["area"] + b["area"] - inter) < 0.5
    n_cats = len(labels)

    def run(perturb, name):
        path = write_json(tmp_path / f"{name}.json", instance_truth(rows, perturb))
        return evaluate(boxes_out, path, per_image=str(tmp_path / f"{name}.parquet"))

    # 1. The truth of the best label0 box in the first image removed: that box is a false
    # positive ranked first of label0's (ties keep image order), so precision is m/(m+1)... at
    # every recall: AP(label0) = (m-1)/m over its m-1 remaining truths... (m-1 truths, m boxes).
    first = rows[0]["key"]
    best0 = max((s for s in rows[0]["segments"] if s["label"] == "label0"), key=lambda s: s["score"])
    removed = run(lambda row, seg, mask, ann, _: None if (row["key"], seg["id"]) == (first, best0["id"])
                  else ann, "removed")
    ap0 = (m - 1) / m
    assert {c["name"]: c["AP"] for c in removed["categories"]}["label0"] == pytest.approx(ap0, abs=1e-12)
    assert removed["overall"]["AP"] == pytest.approx((n_cats - 1 + ap0) / n_cats, abs=1e-12)
    quality = {r["key"]: r["quality"] for r in pq.read_table(tmp_path / "removed.parquet").to_pylist()}
    assert quality[first] == pytest.approx(9 / 10)  # 9 matched at IoU 1, one false positive
    assert all(q == 1.0 for k, q in quality.items() if k != first)

    # 2. The worst label1 box of the last image labelled label2 in the truth: label1 gains a
    # false positive ranked last (AP stays 1), label2 a truth never found (recall m/(m+1)).
    last = rows[-1]["key"]
    worst1 = min((s for s in rows[-1]["segments"] if s["label"] == "label1"), key=lambda s: s["score"])

    def swap(row, seg, mask, ann, by_name):
        if (row["key"], seg["id"]) == (last, worst1["id"]):
            ann["category_id"] = by_name["label2"]
        return ann

    swapped = run(swap, "swapped")
    ap = {c["name"]: c["AP"] for c in swapped["categories"]}
    assert ap["label1"] == 1.0
    assert ap["label2"] == pytest.approx(recall_share(m / (m + 1)), abs=1e-12)
    ap2 = recall_share(m / (m + 1))
    assert swapped["overall"]["AP"] == pytest.approx((n_cats - 1 + ap2) / n_cats, abs=1e-12)

    # 3. The worst label3 box of the last image eroded in the truth, to IoU `iou`: a match at
    # the IoU thresholds up to `iou`; above, a false positive ranked last and a miss.
    worst3 = min((s for s in rows[-1]["segments"] if s["label"] == "label3"), key=lambda s: s["score"])
    target = next(r for r in rows if r["key"] == last)
    eroded_mask = ndimage.binary_erosion(seg_mask(target, worst3), np.ones((7, 7)))
    iou = eroded_mask.sum() / worst3["area"]
    thresholds = np.linspace(0.5, 0.95, 10)
    assert 0.5 < iou < 0.95 and np.abs(thresholds - iou).min() > 1e-6

    def erode(row, seg, mask, ann, by_name):
        if (row["key"], seg["id"]) == (last, worst3["id"]):
            ann["segmentation"] = compressed(eroded_mask)
        return ann

    eroded = run(erode, "eroded")
    per_threshold = [1.0 if t <= iou else recall_share((m - 1) / m) for t in thresholds]
    ap3 = float(np.mean(per_threshold))
    assert {c["name"]: c["AP"] for c in eroded["categories"]}["label3"] == pytest.approx(ap3, abs=1e-12)
    assert eroded["overall"]["AP"] == pytest.approx((n_cats - 1 + ap3) / n_cats, abs=1e-12)
    assert eroded["overall"]["AP50"] == 1.0
    quality = {r["key"]: r["quality"] for r in pq.read_table(tmp_path / "eroded.parquet").to_pylist()}
    assert quality[last] == pytest.approx((9 + iou) / 10)


def test_review_order_correlation_worked_out_by_hand(boxes_out, corpus, tmp_path):
    """The stand-in's review score is each photo's brightness (four different values); truths
    that drop k of an image's 10 boxes give it quality (10 - k) / 10 (k false positives at IoU
    1 besides 10 - k matches), so that the rank correlation is known."""
    rows = ok_rows(boxes_out)
    review = {r["key"]: r["review_score"] for r in rows}
    for key, score in review.items():
        photo = np.asarray(Image.open(corpus / key).convert("RGB"))
        assert score == pytest.approx(photo[::8, ::8].mean() / 255, abs=1e-6)
    least_doubtful_first = sorted(review, key=review.get)
    assert len(set(review.values())) == len(rows) == 4

    def spearman(dropped: list[int], name: str) -> dict:
        k = dict(zip(least_doubtful_first, dropped))
        truth = instance_truth(rows, lambda row, seg, mask, ann, _: None if seg["id"] <= k[row["key"]]
                               else ann)
        report = evaluate(boxes_out, write_json(tmp_path / f"{name}.json", truth),
                          per_image=str(tmp_path / f"{name}.parquet"))
        table = pq.read_table(tmp_path / f"{name}.parquet").to_pylist()
        assert {r["key"]: r["quality"] for r in table} == pytest.approx({key: (10 - k[key]) / 10
                                                                        for key in k})
        assert {r["key"]: r["review_score"] for r in table} == pytest.approx(review)
        assert report["review_order"]["images"] == 4
        return report["review_order"]["spearman"]

    # The more doubtful, the worse: the order is exactly right.
    assert spearman([0, 1, 2, 3], "right") == pytest.approx(-1.0)
    # The more doubtful, the better: exactly wrong.
    assert spearman([3, 2, 1, 0], "wrong") == pytest.approx(1.0)
    # Qualities .9, 1, .7, .8 in review order: quality ranks 3, 4, 1, 2 against 1, 2, 3, 4;
    # 1 - 6 * (4 + 4 + 4 + 4) / (4 * (16 - 1)) = -0.6.
    assert spearman([1, 0, 3, 2], "mixed") == pytest.approx(-0.6)
    # Every image equally good: no order to check.
    assert spearman([0, 0, 0, 0], "flat") is None


# -- panoptic ----------------------------------------------------------------------------------


def rgb(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def panoptic_truth(rows: list[dict], root: Path, things=("label0", "label1"), perturb=None) -> str:
    """A COCO panoptic truth (JSON and PNG folder) holding the rows' segments exactly;
    ``perturb(row, ids, segments)`` may change an image's id map and segments_info in place."""
    names = [f"label{i}" for i in range(5)]
    cats = [{"id": 100 - i, "name": n, "isthing": int(n in things), "supercategory": ""}
            for i, n in enumerate(names)]
    by_name = {c["name"]: c["id"] for c in cats}
    folder = root / "truth"
    folder.mkdir(parents=True)
    images, anns = [], []
    for i, row in enumerate(rows):
        ids = id_map(read_png(row["mask_uri"]), "panoptic").astype(np.int64)
        segments = [{"id": int(s["id"]), "category_id": by_name[s["label"]], "iscrowd": 0,
                     "area": int((ids == s["id"]).sum()), "bbox": [0, 0, 1, 1]} for s in row["segments"]]
        if perturb is not None:
            perturb(row, ids, segments, by_name)
        png = f"{i:03d} {row['key'].replace('/', '_')}.png"
        Image.fromarray(rgb(ids)).save(folder / png)
        images.append({"id": 7 + i, "file_name": row["key"], "width": row["width"], "height": row["height"]})
        anns.append({"image_id": 7 + i, "file_name": png, "segments_info": segments})
    return write_json(root / "truth.json", {"images": images, "annotations": anns, "categories": cats})


def pq_reference(truth: str, output: str, tmp_path: Path) -> dict:
    """panopticapi's pq_compute on the truth and `export --format coco-panoptic`, its category
    ids mapped to the truth's by name and its image ids by file name."""
    exported = tmp_path / "exported"
    export(output, "coco-panoptic", str(exported))
    exp = json.loads((exported / "panoptic.json").read_text())
    gt = json.loads(Path(truth).read_text())
    cat = {c["name"]: c["id"] for c in gt["categories"]}
    exp_cat = {c["id"]: cat[c["name"]] for c in exp["categories"]}
    image = {i["file_name"]: i["id"] for i in gt["images"]}
    exp_image = {i["id"]: image[i["file_name"]] for i in exp["images"]}
    for ann in exp["annotations"]:
        ann["image_id"] = exp_image[ann["image_id"]]
        for seg in ann["segments_info"]:
            seg["category_id"] = exp_cat[seg["category_id"]]
    write_json(exported / "mapped.json", exp)
    script = (
        "import json, sys\n"
        "from panopticapi.evaluation import pq_compute\n"
        "r = pq_compute(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])\n"
        "print('RESULT' + json.dumps(r, default=float))\n"
    )
    done = subprocess.run(
        [tool_python("panopticapi"), "-c", script, truth, str(exported / "mapped.json"),
         truth[: -len(".json")], str(exported / "panoptic")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_panoptic_agreeing_truth_scores_one(panoptic_out, tmp_path):
    rows = ok_rows(panoptic_out)
    report = evaluate(panoptic_out, panoptic_truth(rows, tmp_path), per_image=str(tmp_path / "q.parquet"))
    assert report["images"]["scored"] == len(rows)
    overall = report["overall"]
    assert (overall["PQ"], overall["SQ"], overall["RQ"]) == (1.0, 1.0, 1.0)
    assert overall["PQ_things"] == overall["PQ_stuff"] == 1.0
    assert [r["quality"] for r in pq.read_table(tmp_path / "q.parquet").to_pylist()] == [1.0] * len(rows)


def test_panoptic_figures_equal_panopticapi(panoptic_out, tmp_path):
    """Eroded, removed, relabelled, split and crowd segments, void pixels, and a segment only the
    truth has; checked against panopticapi to 1e-9."""
    rng = np.random.default_rng(3)
    rows = ok_rows(panoptic_out)

    def perturb(row, ids, segments, by_name):
        next_id = max([s["id"] for s in segments] + [0]) + 1
        for seg in list(segments):
            mask = ids == seg["id"]
            roll = rng.random()
            if roll < 0.15:  # removed: its pixels void
                ids[mask] = 0
                segments.remove(seg)
            elif roll < 0.35:  # eroded: the rim void, or given to a new crowd region
                inner = ndimage.binary_erosion(mask, np.ones((int(rng.integers(3, 15)),) * 2))
                rim = mask & ~inner
                if rng.random() < 0.5:
                    ids[rim] = 0
                else:
                    ids[rim] = next_id
                    segments.append({"id": next_id, "category_id": seg["category_id"], "iscrowd": 1,
                                     "area": int(rim.sum()), "bbox": [0, 0, 1, 1]})
                    next_id += 1
            elif roll < 0.5:  # relabelled
                seg["category_id"] = by_name[f"label{int(rng.integers(5))}"]
            elif roll < 0.6:  # a crowd region
                seg["iscrowd"] = 1
        extra = np.zeros_like(ids, dtype=bool)
        extra[5:40, 5:50] = True
        ids[extra] = next_id
        segments.append({"id": next_id, "category_id": by_name["label4"], "iscrowd": 0, "area": 0,
                         "bbox": [0, 0, 1, 1]})
        for seg in segments:  # the JSON's areas, as panopticapi reads them
            seg["area"] = int((ids == seg["id"]).sum())
        segments[:] = [s for s in segments if s["area"] > 0]

    truth = panoptic_truth(rows, tmp_path, perturb=perturb)
    report = evaluate(panoptic_out, truth)
    reference = pq_reference(truth, panoptic_out, tmp_path)
    overall = report["overall"]
    for ours, theirs in (("", "All"), ("_things", "Things"), ("_stuff", "Stuff")):
        for figure in ("PQ", "SQ", "RQ"):
            assert overall[figure + ours] == pytest.approx(reference[theirs][figure.lower()], abs=1e-9)
    assert 0 < overall["PQ"] < 1
    for cat in report["categories"]:
        theirs = reference["per_class"][str(cat["id"])]
        if cat["PQ"] is None:
            assert theirs == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
        else:
            for figure in ("PQ", "SQ", "RQ"):
                assert cat[figure] == pytest.approx(theirs[figure.lower()], abs=1e-9)


def test_panoptic_changes_worked_out_by_hand(panoptic_out, tmp_path):
    rows = ok_rows(panoptic_out)
    row = rows[0]
    ids = id_map(read_png(row["mask_uri"]), "panoptic")
    thing = max((s for s in row["segments"] if s["label"] == "label0"), key=lambda s: s["area"])
    counts = {lab: sum(1 for r in rows for s in r["segments"] if s["label"] == lab) for lab in
              {s["label"] for r in rows for s in r["segments"]}}
    n_cats = len(counts)

    # Removed: its pixels given to a crowd region of another category, so the prediction is a
    # false positive (crowd forgives only its own category): PQ(label0) = tp / (tp + fp/2).
    def remove(row_, ids_, segments, by_name):
        if row_["key"] != row["key"]:
            return
        seg = next(s for s in segments if s["id"] == thing["id"])
        seg.update(category_id=by_name["label2"], iscrowd=1)

    tp = counts["label0"] - 1
    removed = evaluate(panoptic_out, panoptic_truth(rows, tmp_path / "removed", perturb=remove))
    pq_label0 = tp / (tp + 0.5)
    assert next(c for c in removed["categories"] if c["name"] == "label0")["PQ"] == pytest.approx(pq_label0)
    assert removed["overall"]["PQ"] == pytest.approx((n_cats - 1 + pq_label0) / n_cats)

    # Swapped to label1: a false positive of label0 and a miss of label1.
    def swap(row_, ids_, segments, by_name):
        if row_["key"] == row["key"]:
            next(s for s in segments if s["id"] == thing["id"])["category_id"] = by_name["label1"]

    swapped = evaluate(panoptic_out, panoptic_truth(rows, tmp_path / "swapped", perturb=swap))
    pq_label1 = counts["label1"] / (counts["label1"] + 0.5)
    by_name = {c["name"]: c for c in swapped["categories"]}
    assert by_name["label0"]["PQ"] == pytest.approx(pq_label0)
    assert by_name["label1"]["PQ"] == pytest.approx(pq_label1)
    assert (by_name["label0"]["fp"], by_name["label1"]["fn"]) == (1, 1)
    assert swapped["overall"]["PQ"] == pytest.approx((n_cats - 2 + pq_label0 + pq_label1) / n_cats)

    # Eroded: its rim given to a crowd region of its own category: IoU = inner / whole (the
    # rim is in the union, and crowd is neither missed nor a false positive).
    mask = ids == thing["id"]
    inner = ndimage.binary_erosion(mask, np.ones((5, 5)))
    iou = inner.sum() / mask.sum()
    assert 0.5 < iou < 1

    def erode(row_, ids_, segments, by_name):
        if row_["key"] != row["key"]:
            return
        new = max(s["id"] for s in segments) + 1
        ids_[mask & ~inner] = new
        seg = next(s for s in segments if s["id"] == thing["id"])
        seg["area"] = int(inner.sum())
        segments.append({"id": new, "category_id": seg["category_id"], "iscrowd": 1,
                         "area": int((mask & ~inner).sum()), "bbox": [0, 0, 1, 1]})

    eroded = evaluate(panoptic_out, panoptic_truth(rows, tmp_path / "eroded", perturb=erode),
                      per_image=str(tmp_path / "eroded.parquet"))
    n0 = counts["label0"]
    sq_label0 = (n0 - 1 + iou) / n0
    cat0 = next(c for c in eroded["categories"] if c["name"] == "label0")
    assert (cat0["PQ"], cat0["SQ"], cat0["RQ"]) == (pytest.approx(sq_label0), pytest.approx(sq_label0), 1.0)
    quality = {r["key"]: r for r in pq.read_table(tmp_path / "eroded.parquet").to_pylist()}
    cats_in_image = {s["label"] for s in row["segments"]}
    in_image = sum(1 for s in row["segments"] if s["label"] == "label0")
    image_pq = (len(cats_in_image) - 1 + (in_image - 1 + iou) / in_image) / len(cats_in_image)
    assert quality[row["key"]]["quality"] == pytest.approx(image_pq)
    assert quality[row["key"]]["truth_segments"] == len(row["segments"])


# -- semantic ----------------------------------------------------------------------------------


def semantic_truth(rows: list[dict], root: Path, perturb=None, name=lambda key: key.rsplit(".", 1)[0]) -> str:
    """Label PNGs named like the images (``x.png`` for ``x.jpg``), holding the predictions;
    ``perturb(row, labels)`` may change one in place."""
    for row in rows:
        labels = np.asarray(read_png(row["mask_uri"])).astype(np.uint8)
        if perturb is not None:
            perturb(row, labels)
        path = root / f"{name(row['key'])}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(path)
    return str(root)


def confusion(rows, truth_root: Path, k: int, ignore: int = 255, name=lambda key: key.rsplit(".", 1)[0]):
    """Truth × prediction pixel counts, written here from the PNGs alone."""
    total = np.zeros((k, k), dtype=np.int64)
    for row in rows:
        truth = np.asarray(Image.open(truth_root / f"{name(row['key'])}.png")).astype(np.int64)
        pred = np.asarray(read_png(row["mask_uri"])).astype(np.int64)
        keep = truth != ignore
        total += np.bincount(truth[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
    return total


def test_semantic_figures_equal_a_confusion_matrix(semantic_out, tmp_path):
    rng = np.random.default_rng(5)
    rows = ok_rows(semantic_out)

    def perturb(row, labels):
        h, w = labels.shape
        for _ in range(6):
            y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
            labels[y:y + 40, x:x + 40] = rng.integers(5)
        labels[:8, :] = 255  # ignored

    truth = semantic_truth(rows, tmp_path / "truth", perturb)
    report = evaluate(semantic_out, truth, per_image=str(tmp_path / "q.parquet"))
    cm = confusion(rows, Path(truth), 5)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    ious = {f"label{c}": inter[c] / union[c] for c in range(5) if union[c]}
    assert {c["name"]: c["IoU"] for c in report["categories"] if c["IoU"] is not None} == pytest.approx(ious)
    assert report["overall"]["mIoU"] == pytest.approx(np.mean(list(ious.values())), abs=1e-12)
    assert report["overall"]["pixel_accuracy"] == pytest.approx(inter.sum() / cm.sum(), abs=1e-12)
    assert 0 < report["overall"]["mIoU"] < 1
    quality = {r["key"]: r["quality"] for r in pq.read_table(tmp_path / "q.parquet").to_pylist()}
    for row in rows:
        one = confusion([row], Path(truth), 5)
        i, u = np.diag(one), one.sum(0) + one.sum(1) - np.diag(one)
        assert quality[row["key"]] == pytest.approx(np.mean(i[u > 0] / u[u > 0]))


def test_semantic_agreement_and_a_swap_worked_out_by_hand(semantic_out, tmp_path):
    rows = ok_rows(semantic_out)
    same = evaluate(semantic_out, semantic_truth(rows, tmp_path / "same"))
    assert (same["overall"]["mIoU"], same["overall"]["pixel_accuracy"]) == (1.0, 1.0)
    present = {c["name"] for c in same["categories"] if c["IoU"] is not None}
    assert all(c["IoU"] == 1.0 for c in same["categories"] if c["name"] in present)

    # Every label1 pixel of the first image labelled label2 in the truth: label1 keeps its other
    # images' pixels, label2 gains a region it never predicted there.
    first = rows[0]
    labels = np.asarray(read_png(first["mask_uri"]))
    moved = int((labels == 1).sum())
    pixels = {c: sum(int((np.asarray(read_png(r["mask_uri"])) == c).sum()) for r in rows) for c in (1, 2)}
    assert moved and pixels[2]

    def swap(row, truth):
        if row["key"] == first["key"]:
            truth[truth == 1] = 2

    report = evaluate(semantic_out, semantic_truth(rows, tmp_path / "swap", swap))
    iou = {c["name"]: c["IoU"] for c in report["categories"]}
    # label1: hits = its pixels elsewhere; union = all its predicted pixels.
    assert iou["label1"] == pytest.approx((pixels[1] - moved) / pixels[1])
    # label2: hits = its own predictions; union = those + the moved truth pixels.
    assert iou["label2"] == pytest.approx(pixels[2] / (pixels[2] + moved))
    total = sum(r["width"] * r["height"] for r in rows)
    assert report["overall"]["pixel_accuracy"] == pytest.approx(1 - moved / total)


def test_semantic_truth_labels_and_mask_style_names(semantic_out, tmp_path):
    """Truth ids of its own (named in --truth-labels), PNGs named as the job's masks (x.jpg.png)."""
    rows = ok_rows(semantic_out)
    # Truth id = 10 + model id; 0 marks pixels not to score.
    truth = semantic_truth(rows, tmp_path / "truth",
                           perturb=lambda row, labels: labels.__setitem__(..., labels + 10),
                           name=lambda key: key)
    names = tmp_path / "names.yaml"
    names.write_text("\n".join(f"{10 + i}: label{i}" for i in range(5)) + "\n")
    report = evaluate(semantic_out, truth, truth_labels=str(names), ignore_index=0)
    assert report["images"]["scored"] == len(rows)
    assert report["overall"]["mIoU"] == 1.0


# -- matching, the command line, bad input -------------------------------------------------------


def test_keys_match_by_path_and_limit(boxes_out, corpus, tmp_path):
    """Truth names that are the images' full paths, or paths under a parent of the input root;
    --limit scores the first N matched images in the truth's order."""
    rows = ok_rows(boxes_out)
    truth = instance_truth(rows)
    truth["images"][0]["file_name"] = str(corpus / rows[0]["key"])
    truth["images"][1]["file_name"] = f"{corpus.name}/{rows[1]['key']}"
    truth["images"][2]["file_name"] = Path(rows[2]["key"]).name  # its folder left out
    path = write_json(tmp_path / "truth.json", truth)
    report = evaluate(boxes_out, path, limit=3, per_image=str(tmp_path / "q.parquet"))
    assert report["images"]["scored"] == 3
    assert report["images"]["over_limit"] == len(rows) - 3
    assert report["images"]["output_only"] == 1  # the broken file's error row
    assert_counts_add_up(report["images"])
    assert sorted(r["key"] for r in pq.read_table(tmp_path / "q.parquet").to_pylist()) == sorted(
        r["key"] for r in rows[:3])


def test_key_matching_takes_the_closest_fit_and_never_guesses():
    matcher = KeyMatcher(["a.jpg", "b/c.jpg", "d.jpg", "https://h.example/p/e.jpg?X-Amz-Signature=1",
                          "photos/f.jpg", "q/photos/f.jpg"])
    assert matcher.add("x/a.jpg") and matcher.add("y/a.jpg")  # both end with a.jpg: ambiguous
    assert matcher.add("b/c.jpg") and matcher.add("z/b/c.jpg")  # the exact key wins
    assert not matcher.add("d.jpg.png") and not matcher.add("xd.jpg")  # whole segments only
    assert matcher.add("h.example/p/e.jpg")  # an http(s) image's key: host and path, no query
    assert matcher.add("data/q/photos/f.jpg")  # three segments shared with one, two with the other
    assert matcher.matched() == {1: "b/c.jpg", 3: "h.example/p/e.jpg", 5: "data/q/photos/f.jpg"}
    assert matcher.is_ambiguous(0) and not matcher.is_ambiguous(4)
    stems = KeyMatcher(["photos/x", "x.jpg"], strip_extension=True)
    stems.add("data/photos/x.jpg")  # photos/x shares two segments, x.jpg one
    assert stems.matched() == {0: "data/photos/x.jpg"}
    both = KeyMatcher(["p/x.jpg", "q/x.jpg"])
    assert not both.add("x.jpg")  # a key two truth images fit equally matches neither
    with pytest.raises(EvalError, match="twice"):
        KeyMatcher(["x.jpg", "./x.jpg"])


def test_a_label_set_that_repeats_a_name_maps_every_id():
    assert truth_categories({0: "a", 1: "a", 2: "b", 3: "c"}, {5: "a", 6: "b"}) == {0: 5, 1: 5, 2: 6}


def test_error_rows_and_unmatched_names_are_counted(boxes_out, tmp_path):
    rows = ok_rows(boxes_out)
    truth = instance_truth(rows)
    truth["images"].append({"id": 1, "file_name": BROKEN, "width": 10, "height": 10})
    truth["images"].append({"id": 2, "file_name": "coffee 1.png.other", "width": 10, "height": 10})
    report = evaluate(boxes_out, write_json(tmp_path / "truth.json", truth))
    images = report["images"]
    assert (images["error_rows"], images["truth_only"], images["scored"]) == (1, 1, len(rows))
    assert_counts_add_up(images)
    assert images["output_only"] == 0  # every row, the error row too, is a truth image's


def assert_counts_add_up(images: dict) -> None:
    """Every truth image counted once, as scored or why not."""
    assert images["truth_images"] == sum(images[k] for k in (
        "scored", "truth_only", "ambiguous", "error_rows", "unannotated", "over_limit"))


def test_cli_table_json_and_summary_line(boxes_out, tmp_path, capsys):
    rows = ok_rows(boxes_out)
    truth = write_json(tmp_path / "truth.json", instance_truth(rows))
    capsys.readouterr()
    status = main(["eval", boxes_out, "--truth", truth, "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out.splitlines()
    assert status == 0
    summary = dict(word.split("=", 1) for word in out[-1].split()[1:])
    assert out[-1].startswith("seglabel-eval ")
    assert (summary["task"], summary["scored"], float(summary["AP"])) == ("instance", str(len(rows)), 1.0)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["overall"]["AP"] == 1.0 and report["images"]["scored"] == len(rows)
    assert any(line.startswith("AP ") for line in out)


def bad_cases(instance_out, panoptic_out, semantic_out, root: Path):
    """(what, output, truth, extra flags, words the error must hold)."""
    rows = ok_rows(instance_out)
    good = instance_truth(rows)
    cases = []
    cases.append(("not COCO", instance_out, write_json(root / "list.json", [1, 2]), [], "is not COCO"))
    (root / "text.json").write_bytes(b"\x89PNG not json at all")
    cases.append(("not JSON", instance_out, str(root / "text.json"), [], "is not JSON"))
    cases.append(("no truth", instance_out, str(root / "absent.json"), [], "does not exist"))
    unknown = copy.deepcopy(good)
    unknown["categories"][0]["name"] = "gown, evening"
    cases.append(("unknown category", instance_out, write_json(root / "unknown.json", unknown), [],
                  "'gown, evening' is not one of the model's labels"))
    short = copy.deepcopy(good)
    short["annotations"][0]["segmentation"]["counts"] = "0"
    cases.append(("RLE short of its image", instance_out, write_json(root / "short.json", short), [],
                  "do not cover the image"))
    cases.append(("task", panoptic_out, write_json(root / "inst.json", good), [],
                  "is COCO instance and the output holds panoptic masks"))
    prow = ok_rows(panoptic_out)
    no_pngs = root / "pan"
    truth = panoptic_truth(prow, no_pngs)
    for png in (no_pngs / "truth").iterdir():
        png.unlink()
    (no_pngs / "truth").rmdir()
    cases.append(("panoptic PNG folder missing", panoptic_out, truth, [], "does not exist"))
    one_missing = root / "pan2"
    truth2 = panoptic_truth(prow, one_missing)
    next((one_missing / "truth").iterdir()).unlink()
    cases.append(("panoptic PNG missing", panoptic_out, truth2, [], "is missing"))
    escape = json.loads(Path(truth2).read_text())
    escape["annotations"][0]["file_name"] = "../../etc/passwd"
    cases.append(("panoptic PNG outside its folder", panoptic_out,
                  write_json(one_missing / "escape.json", escape),
                  ["--truth-masks", str(one_missing / "truth")], "not a file in the PNG folder"))
    srows = ok_rows(semantic_out)
    sized = semantic_truth(srows, root / "sem")
    first = root / "sem" / f"{srows[0]['key'].rsplit('.', 1)[0]}.png"
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(first)
    cases.append(("semantic PNG of another size", semantic_out, sized, [], "is 9x7, its image"))
    cases.append(("semantic truth for an instance output", instance_out, sized, [], "folder of label PNGs"))
    cases += hostile_cases(good, instance_out, prow, panoptic_out, srows, semantic_out, root)
    return cases


def variant(base: dict, change) -> dict:
    value = copy.deepcopy(base)
    change(value)
    return value


def hostile_cases(good, instance_out, prow, panoptic_out, srows, semantic_out, root: Path):
    """What a hostile or careless truth holds that would change the figures without a word, or
    crash pycocotools' C code, or forge a line of output."""
    ann = lambda t: t["annotations"][0]  # noqa: E731
    instance = {
        "far polygon": (lambda t: ann(t).update(segmentation=[[0, 0, 1e8, 0, 0, 10]]),
                        "far outside the image"),
        "twice the same id": (lambda t: t["annotations"][1].update(id=ann(t)["id"]), "the id is used twice"),
        "id 0": (lambda t: ann(t).update(id=0), "of at least 1"),
        "area over the image": (lambda t: ann(t).update(area=1e12), "is not a pixel count"),
        "negative area": (lambda t: ann(t).update(area=-1), "is not a pixel count"),
        "iscrowd 2": (lambda t: ann(t).update(iscrowd=2), "not 0 or 1"),
        "RLE size as floats": (lambda t: ann(t)["segmentation"].update(
            size=[float(v) for v in ann(t)["segmentation"]["size"]]), "not of size"),
        "a newline in an id": (lambda t: ann(t).update(id="7\nseglabel-eval task=instance AP=1.000000"),
                               "no whole 'id'"),
    }
    cases = [(what, instance_out, write_json(root / f"i-{i}.json", variant(good, change)), [], words)
             for i, (what, (change, words)) in enumerate(instance.items())]
    panoptic = json.loads(Path(panoptic_truth(prow, root / "pan3")).read_text())
    seg = lambda t: t["annotations"][0]["segments_info"][0]  # noqa: E731
    for i, (what, change, words) in enumerate([
        ("panoptic area 0", lambda t: seg(t).update(area=0), "pixels in the PNG"),
        ("panoptic area 1", lambda t: seg(t).update(area=1), "pixels in the PNG"),
        ("panoptic iscrowd '1'", lambda t: seg(t).update(iscrowd="1"), "not 0 or 1"),
        ("isthing '1'", lambda t: t["categories"][0].update(isthing="1"), "not 0 or 1"),
    ]):
        path = write_json(root / "pan3" / f"p-{i}.json", variant(panoptic, change))
        cases.append((what, panoptic_out, path, ["--truth-masks", str(root / "pan3" / "truth")], words))
    truth = semantic_truth(srows, root / "sem2")
    for i, (what, text, words) in enumerate([
        ("a name twice in --truth-labels", "0: label0\n1: label1\n7: label0\n", "listed twice"),
        ("an .inf key in --truth-labels", ".inf: label0\n", "is not a label id"),
        ("a 1.9 key in --truth-labels", "1.9: label0\n", "is not a label id"),
        ("--truth-labels nested past the limit", "[" * 5000 + "]" * 5000, "neither YAML nor JSON"),
    ]):
        (root / f"labels-{i}.yaml").write_text(text)
        cases.append((what, semantic_out, truth, ["--truth-labels", str(root / f"labels-{i}.yaml")], words))
    return cases


def test_bad_input_is_one_line_exit_2_and_nothing_written(instance_out, panoptic_out, semantic_out, tmp_path,
                                                           capsys):
    for what, output, truth, flags, words in bad_cases(instance_out, panoptic_out, semantic_out, tmp_path):
        report, table = tmp_path / f"{what}.json", tmp_path / f"{what}.parquet"
        capsys.readouterr()
        status = main(["eval", output, "--truth", truth, "--json", str(report), "--per-image", str(table),
                       *flags])
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2, what
        # One error line, last (log lines of progress may come before it), and no traceback.
        assert [line for line in lines if "error" in line.lower()] == lines[-1:], (what, lines)
        assert lines[-1].startswith("seglabel: error: ") and words in lines[-1], (what, lines)
        assert not any("Traceback" in line for line in lines), what
        assert not report.exists() and not table.exists(), what
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")], what


@pytest.mark.parametrize("task", ["semantic", "panoptic"])
def test_panoptic_and_semantic_memory_does_not_hold_the_pixels(task, tmp_path):
    """bench/eval_memory.py at 20 and 200 images of 256²: holding each image's truth and masks
    (over 1 MB an image in the arrays scoring uses) would add 200 MB; names and keys add little."""
    figures = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "eval_memory.py"), "--task", task,
                           "--images", "20,200", "--size", "256", "--json", str(figures)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    by_images = json.loads(figures.read_text())["by_images"]
    assert by_images["200"]["scored"] == 200
    assert by_images["200"]["traced_peak_mb"] - by_images["20"]["traced_peak_mb"] < 10, by_images


def test_panoptic_match_needs_iou_over_half():
    """panopticapi matches at IoU > 0.5, strictly: a prediction covering half its truth is a
    miss and a false positive; one pixel more is a match."""
    gt = np.zeros((2, 4), np.uint32)
    gt[0, :] = 1
    truth = {1: {"category_id": 3, "iscrowd": 0, "area": 4}}
    half = np.zeros((2, 4), np.uint32)
    half[0, :2] = 9
    stats = panoptic_image_stats(gt, truth, half, {9: 3})[3]
    assert (stats.tp, stats.fp, stats.fn) == (0, 1, 1)
    more = half.copy()
    more[0, 2] = 9
    stats = panoptic_image_stats(gt, truth, more, {9: 3})[3]
    assert (stats.tp, stats.fp, stats.fn, stats.iou) == (1, 0, 0, 0.75)


def test_a_damaged_output_is_one_line_too(boxes_out, semantic_out, tmp_path, capsys):
    """The output's own rows and masks are read with the truth's guards: an RLE whose runs do
    not cover its image (pycocotools would read past it, or spin), a mask that is not a label
    map, a FIFO where a mask should be."""
    damaged = tmp_path / "boxes"
    shutil.copytree(boxes_out, damaged)
    part = sorted((damaged / "metadata").glob("*.parquet"))[0]
    table = pq.read_table(part).to_pylist()
    table[0]["segments"][0]["rle"] = "0ooooooo1"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(part)), part)
    truth = write_json(tmp_path / "truth.json", instance_truth(ok_rows(boxes_out)))
    semantic = tmp_path / "semantic"
    shutil.copytree(semantic_out, semantic)
    rows = ok_rows(semantic_out)
    truth_pngs = semantic_truth(rows, tmp_path / "sem-truth")
    mask = semantic / "masks" / f"{rows[0]['key']}.png"
    Image.new("RGB", (rows[0]["width"], rows[0]["height"])).save(mask)
    fifo = semantic.parent / "fifo-out"
    shutil.copytree(semantic_out, fifo)
    fifo_mask = fifo / "masks" / f"{rows[0]['key']}.png"
    fifo_mask.unlink()
    os.mkfifo(fifo_mask)
    for output, truth_url, words in ((str(damaged), truth, "damaged segment"),
                                     (str(semantic), truth_pngs, "the output is damaged"),
                                     (str(fifo), truth_pngs, "not a regular file")):
        capsys.readouterr()
        assert main(["eval", output, "--truth", truth_url]) == 2, words
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("seglabel: error: ") and words in lines[-1], lines


def test_files_appear_both_or_neither(boxes_out, tmp_path):
    truth = write_json(tmp_path / "truth.json", instance_truth(ok_rows(boxes_out)))
    (tmp_path / "a-file").write_text("")
    table = tmp_path / "per-image.parquet"
    with pytest.raises(EvalError, match="cannot write"):
        evaluate(boxes_out, truth, per_image=str(table), json=str(tmp_path / "a-file" / "report.json"))
    assert not table.exists()
    with pytest.raises(EvalError, match="must name a file"):
        evaluate(boxes_out, truth, per_image=str(tmp_path))


def test_a_one_bit_label_png_is_labels_0_and_1_and_other_modes_are_named(tmp_path):
    """Issue 35: a 1-bit semantic truth PNG was refused as "is 1: a label PNG has one channel",
    which it has. It reads as labels 0 and 1; an RGB one is named for what it is."""
    from seglabel.core.errors import EvalError
    from seglabel.evaluation.truth import PngFolder

    bits = np.zeros((4, 6), dtype=bool)
    bits[1:3, 2:5] = True
    Image.fromarray(bits).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "1"
    folder = PngFolder(str(tmp_path), None, 1 << 20, "truth PNG")
    labels = folder.read(folder.uri("a.png"), 6, 4, "id")
    assert labels.tolist() == bits.astype(int).tolist()
    Image.new("RGB", (6, 4)).save(tmp_path / "b.png")
    with pytest.raises(EvalError, match="is a RGB image of 3 channels: a label PNG has one"):
        folder.read(folder.uri("b.png"), 6, 4, "id")


def test_a_truth_image_declared_past_32_bit_sizes_is_one_line(tmp_path):
    """Issue 35: an instance truth image declared 80000 x 60000 (with an uncompressed RLE) failed
    as OverflowError, exit 1, even when the image is not in the output."""
    from seglabel.core.errors import EvalError
    from seglabel.evaluation.truth import read_coco

    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "huge.png", "width": 80000, "height": 60000}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 1.0,
                         "bbox": [0, 0, 1, 1],
                         "segmentation": {"size": [60000, 80000], "counts": [0, 80000 * 60000]}}],
        "categories": [{"id": 1, "name": "label0"}]}))
    with pytest.raises(EvalError, match=r"'huge.png' is declared 80000x60000, over 2147483647 pixels"):
        read_coco(str(truth), None, ["label0"])
