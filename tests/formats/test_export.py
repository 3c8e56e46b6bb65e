"""`seglabel export` and `seglabel preview`, on the outputs of real jobs (a local Ray cluster,
tiny random-weight checkpoints, photos from scikit-image). Every test on a job's output runs
for both model families, Mask2Former and EoMT.

Everything an export writes is read back with the tools' own readers or independent ones:
pycocotools' COCO API, Pillow, zipfile, and a Label Studio brush RLE decoder written here from
the published format. The job's outputs are read with tests/readback.py (no seglabel code).
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import shutil
import subprocess
import tracemalloc
import zipfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlencode

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from readback import id_map, read_png, read_rows
from skimage import data

from helpers import chromium, hand_made_output, ok_row, one_line_error, tool_python
from seglabel.cli import main
from seglabel.core.errors import ConfigError, EvalError, ExportError
from seglabel.evaluation.evaluate import evaluate
from seglabel.formats import coco as coco_module
from seglabel.formats.export import export
from seglabel.formats.label_studio import label_studio_rle
from seglabel.preview import preview

# Key -> (file bytes maker, format). Nested folders, a space, non-ASCII, HTML-special characters,
# and one file that is not an image (an error row, which exports must skip).
PHOTOS = {
    "astronaut.jpg": (data.astronaut, "JPEG"),
    "photos/coffee.png": (data.coffee, "PNG"),
    "photos/cats/chelsea cat é.webp": (data.chelsea, "WEBP"),
    "odd/tom & jerry's #1.png": (lambda: data.camera()[::4, ::4], "PNG"),
}
BROKEN = "broken.jpg"


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-images")
    for key, (make, fmt) in PHOTOS.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(make(), fmt))
    (root / BROKEN).write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def run_job(tmp_path_factory, corpus, checkpoint, task: str, **settings) -> str:
    from seglabel.job.pipeline import label

    out = tmp_path_factory.mktemp(f"out-{task}") / "labels"
    summary = label(str(corpus), str(out), model=str(checkpoint), score_threshold=0.3, **settings)
    assert (summary.ok, summary.error) == (len(PHOTOS), 1)
    return str(out)


@pytest.fixture(scope="module", params=["mask2former", "eomt"])
def job_checkpoints(request, checkpoints, eomt_checkpoints) -> dict:
    """The tiny checkpoints of one family, by task: each test on outputs runs for both."""
    return checkpoints if request.param == "mask2former" else eomt_checkpoints


@pytest.fixture(scope="module")
def instance_out(ray_session, tmp_path_factory, corpus, job_checkpoints) -> str:
    # Parts of 2 rows: the export must stream across several parts.
    return run_job(tmp_path_factory, corpus, job_checkpoints["instance"], "instance", rows_per_part=2)


@pytest.fixture(scope="module")
def panoptic_out(ray_session, tmp_path_factory, corpus, job_checkpoints) -> str:
    # With label0/label1 as things and no overlap filter, the tiny model gives thing segments
    # next to a fused stuff segment in each image.
    return run_job(tmp_path_factory, corpus, job_checkpoints["panoptic"], "panoptic",
                   thing_labels="label0,label1", overlap_threshold=0.0)


@pytest.fixture(scope="module")
def semantic_out(ray_session, tmp_path_factory, corpus, job_checkpoints) -> str:
    # Only label3 kept: sparse masks, so a preview has pixels far from any segment.
    return run_job(tmp_path_factory, corpus, job_checkpoints["semantic"], "semantic", labels="label3")


def ok_rows(output: str) -> dict[str, dict]:
    return {r["key"]: r for r in read_rows(output) if r["status"] == "ok"}


def job_mask(row: dict, seg: dict) -> np.ndarray:
    return mask_utils.decode({"size": [row["height"], row["width"]], "counts": seg["rle"].encode()}).astype(
        bool
    )


def mask_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def check_coco(
    coco: COCO, rows: dict[str, dict], task: str, keep=lambda seg: True, scores: bool = True
) -> int:
    """Every ok image once; each annotation is exactly its job segment; returns annotations."""
    images = coco.dataset["images"]
    assert sorted(i["file_name"] for i in images) == sorted(rows)
    assert len({i["id"] for i in images}) == len(images)
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    total = 0
    for image in images:
        row = rows[image["file_name"]]
        assert (image["width"], image["height"]) == (row["width"], row["height"])
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])), key=lambda a: a["id"])
        segs = [s for s in row["segments"] if keep(s)]
        assert len(anns) == len(segs)
        ids = id_map(read_png(row["mask_uri"]), task)
        for ann, seg in zip(anns, segs):
            assert ann["category_id"] == seg["label_id"] + 1
            assert coco.cats[ann["category_id"]]["name"] == seg["label"]
            assert ann["segmentation"]["size"] == [row["height"], row["width"]]
            mask = coco.annToMask(ann).astype(bool)
            assert np.array_equal(mask, job_mask(row, seg))
            owned = ids == seg["id"]
            if task == "instance":
                assert not (owned & ~mask).any()  # the PNG's pixels of a segment lie in its mask
            else:
                assert np.array_equal(owned, mask)
            assert ann["area"] == int(mask.sum()) == seg["area"]
            assert ann["bbox"] == mask_bbox(mask)
            assert ann["iscrowd"] == (1 if task == "semantic" else 0)
            if scores and seg["score"] is not None:
                assert ann["score"] == pytest.approx(seg["score"], abs=1e-6)
            else:
                assert "score" not in ann
        total += len(anns)
    return total


def load_coco(path) -> COCO:
    return COCO(str(path))


# -- COCO ------------------------------------------------------------------------------------


def test_coco_from_instance_outputs(instance_out, tmp_path):
    rows = ok_rows(instance_out)
    to = tmp_path / "coco.json"
    counts = export(instance_out, "coco", str(to))
    coco = load_coco(to)
    n = check_coco(coco, rows, "instance")
    assert n == sum(len(r["segments"]) for r in rows.values()) > 0
    assert counts["images"] == len(PHOTOS) and counts["annotations"] == n and counts["error_rows"] == 1
    assert counts["files"] == [str(to)]
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [
        (i + 1, f"label{i}") for i in range(5)
    ]
    assert BROKEN not in {i["file_name"] for i in coco.dataset["images"]}
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left behind


def test_coco_from_panoptic_outputs_keeps_the_things(panoptic_out, tmp_path):
    rows = ok_rows(panoptic_out)
    segments = [s for r in rows.values() for s in r["segments"]]
    assert any(s["is_thing"] for s in segments) and any(s["is_thing"] is False for s in segments)
    export(panoptic_out, "coco", str(tmp_path / "coco.json"))
    n = check_coco(load_coco(tmp_path / "coco.json"), rows, "panoptic", keep=lambda s: s["is_thing"])
    assert n == sum(1 for s in segments if s["is_thing"])


def test_coco_from_semantic_outputs_is_one_crowd_annotation_per_label(semantic_out, tmp_path):
    rows = ok_rows(semantic_out)
    export(semantic_out, "coco", str(tmp_path / "coco.json"))
    n = check_coco(load_coco(tmp_path / "coco.json"), rows, "semantic", scores=False)
    assert n == sum(len(r["segments"]) for r in rows.values()) > 0
    with pytest.raises(ExportError, match="semantic outputs have no scores"):
        export(semantic_out, "coco", str(tmp_path / "other.json"), min_score=0.5)


def test_sharding_covers_every_image_once(instance_out, tmp_path):
    rows = ok_rows(instance_out)
    counts = export(instance_out, "coco", str(tmp_path / "coco.json"), shard_size=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["coco-00000.json", "coco-00001.json"]  # 4 images: 3 + 1
    assert counts["files"] == [str(tmp_path / n) for n in names]
    seen, image_ids, ann_ids, total = [], [], [], 0
    for name, size in zip(names, (3, 1)):
        coco = load_coco(tmp_path / name)
        assert len(coco.dataset["images"]) == size
        shard_rows = {i["file_name"]: rows[i["file_name"]] for i in coco.dataset["images"]}
        total += check_coco(coco, shard_rows, "instance")
        seen += [i["file_name"] for i in coco.dataset["images"]]
        image_ids += [i["id"] for i in coco.dataset["images"]]
        ann_ids += [a["id"] for a in coco.dataset["annotations"]]
    assert sorted(seen) == sorted(rows)
    assert len(set(image_ids)) == len(image_ids) and len(set(ann_ids)) == len(ann_ids)  # unique across shards
    assert total == counts["annotations"] == sum(len(r["segments"]) for r in rows.values())


def test_min_score_and_labels_filter(instance_out, tmp_path):
    rows = ok_rows(instance_out)
    scores = sorted(s["score"] for r in rows.values() for s in r["segments"])
    cut = scores[len(scores) // 2]
    export(instance_out, "coco", str(tmp_path / "scored.json"), min_score=cut)
    n = check_coco(load_coco(tmp_path / "scored.json"), rows, "instance", keep=lambda s: s["score"] >= cut)
    assert 0 < n < len(scores)

    labels = {s["label"] for r in rows.values() for s in r["segments"]}
    chosen = sorted(labels)[-1]
    export(instance_out, "coco", str(tmp_path / "labels.json"), labels=[chosen])
    coco = load_coco(tmp_path / "labels.json")
    n = check_coco(coco, rows, "instance", keep=lambda s: s["label"] == chosen)
    assert 0 < n < len(scores)
    assert [c["name"] for c in coco.dataset["categories"]] == [chosen]

    with pytest.raises(ExportError, match="unknown label 'zebra'"):
        export(instance_out, "coco", str(tmp_path / "x.json"), labels=["zebra"])


# -- COCO panoptic ---------------------------------------------------------------------------


def check_panoptic(folder: Path, rows: dict[str, dict], keep=lambda seg: True) -> int:
    doc = json.loads((folder / "panoptic.json").read_text())
    assert {c["id"]: (c["name"], c["isthing"]) for c in doc["categories"]} == {
        i + 1: (f"label{i}", int(i in (0, 1))) for i in range(5)
    }
    assert sorted(i["file_name"] for i in doc["images"]) == sorted(rows)
    image_keys = {i["id"]: i["file_name"] for i in doc["images"]}
    assert sorted(a["image_id"] for a in doc["annotations"]) == sorted(image_keys)
    total = 0
    for ann in doc["annotations"]:
        key = image_keys[ann["image_id"]]
        row = rows[key]
        assert ann["file_name"] == f"{key}.png"
        png = Image.open(folder / "panoptic" / ann["file_name"])
        assert png.mode == "RGB" and png.size == (row["width"], row["height"])
        rgb = np.array(png).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        info = ann["segments_info"]
        info_ids = [s["id"] for s in info]
        assert len(set(info_ids)) == len(info_ids)
        assert set(np.unique(ids).tolist()) - {0} == set(info_ids)  # every PNG id has one entry
        segs = {s["id"]: s for s in row["segments"] if keep(s)}
        assert set(info_ids) == set(segs)
        for s in info:
            mask = ids == s["id"]
            assert np.array_equal(mask, job_mask(row, segs[s["id"]]))
            assert s["area"] == int(mask.sum()) and s["bbox"] == mask_bbox(mask)
            assert s["category_id"] == segs[s["id"]]["label_id"] + 1 and s["iscrowd"] == 0
        total += len(info)
    return total


def test_coco_panoptic_round_trips(panoptic_out, instance_out, tmp_path):
    rows = ok_rows(panoptic_out)
    counts = export(panoptic_out, "coco-panoptic", str(tmp_path / "all"))
    assert (
        check_panoptic(tmp_path / "all", rows)
        == counts["annotations"]
        == sum(len(r["segments"]) for r in rows.values())
    )
    assert counts["masks"] == len(PHOTOS)

    # A filter drops segments: their pixels become void, and the rest still round-trips.
    scores = sorted(s["score"] for r in rows.values() for s in r["segments"])
    cut = scores[len(scores) // 2]
    export(panoptic_out, "coco-panoptic", str(tmp_path / "some"), min_score=cut)
    n = check_panoptic(tmp_path / "some", rows, keep=lambda s: s["score"] >= cut)
    assert 0 < n < len(scores)

    with pytest.raises(ExportError, match="coco-panoptic needs a panoptic output"):
        export(instance_out, "coco-panoptic", str(tmp_path / "nope"))


# -- Label Studio ----------------------------------------------------------------------------


def ls_decode(rle: list[int]) -> np.ndarray:
    """Label Studio's brush RLE, decoded as its published format says (thi.ng/rle-pack, which
    Label Studio's front end and label_studio_converter.brush.decode_rle implement): 32 bits of
    value count, 5 bits of word size - 1, four 4-bit run-length field sizes - 1; then chunks of
    a repeat flag, a 2-bit field-size index, count - 1, and one word (repeat) or count words."""
    assert all(0 <= b <= 255 for b in rle)
    bits = "".join(f"{b:08b}" for b in rle)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        assert pos + n <= len(bits), "truncated RLE"
        value = int(bits[pos:pos + n], 2)
        pos += n
        return value

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        assert j <= num, "a run past the end"
        if repeat:
            out[i:j] = read(word)
            i = j
        else:
            while i < j:
                out[i] = read(word)
                i += 1
    assert set(bits[pos:]) <= {"0"}  # only padding is left
    return out


def ls_mask(rle: list[int], width: int, height: int) -> np.ndarray:
    rgba = ls_decode(rle)
    assert rgba.size == width * height * 4
    rgba = rgba.reshape(height, width, 4)
    assert (rgba == rgba[..., :1]).all() and set(np.unique(rgba).tolist()) <= {0, 255}
    return rgba[..., 3] > 0  # Label Studio reads the alpha channel


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (300, 300), (37, 1000)])
@pytest.mark.parametrize("kind", ["empty", "full", "random", "pixel", "blob"])
def test_label_studio_rle_decodes_to_the_mask(shape, kind):
    rng = np.random.default_rng(sum(shape))
    mask = {
        "empty": np.zeros(shape, bool),
        "full": np.ones(shape, bool),
        "random": rng.random(shape) < 0.5,
        "pixel": np.zeros(shape, bool),
        "blob": np.zeros(shape, bool),
    }[kind]
    if kind == "pixel":
        mask[shape[0] // 2, shape[1] // 2] = True
    if kind == "blob":
        mask[shape[0] // 4: shape[0] // 2 + 1, : shape[1] // 3 + 1] = True
    assert np.array_equal(ls_mask(label_studio_rle(mask), shape[1], shape[0]), mask)


def test_label_studio_tasks(instance_out, tmp_path):
    rows = ok_rows(instance_out)
    prefix = rows["astronaut.jpg"]["image_uri"][: -len("astronaut.jpg")]
    to = tmp_path / "tasks.json"
    counts = export(instance_out, "label-studio", str(to), from_name="mask", to_name="photo",
                    image_prefix_map={prefix: "https://cdn.example/img/", "s3://elsewhere/": "https://x/"})
    tasks = json.loads(to.read_text())
    assert isinstance(tasks, list) and len(tasks) == len(rows) == counts["images"]
    job = json.loads((Path(instance_out) / "job.json").read_text())
    assert {t["data"]["image"] for t in tasks} == {
        "https://cdn.example/img/astronaut.jpg",
        "https://cdn.example/img/photos/coffee.png",
        "https://cdn.example/img/photos/cats/chelsea%20cat%20%C3%A9.webp",
        "https://cdn.example/img/odd/tom%20%26%20jerry%27s%20%231.png",
    }
    total = 0
    for task in tasks:
        row = rows[task["data"]["key"]]
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == job["model"]
        results = prediction["result"]
        assert len(results) == len(row["segments"])
        # Label Studio's confidence, lowest first in its uncertainty sampling: 1 - the review score.
        assert prediction["score"] == pytest.approx(1 - row["review_score"], abs=1e-6)
        assert task["data"]["review_score"] == pytest.approx(row["review_score"], abs=1e-6)
        for result, seg in zip(results, row["segments"]):
            assert {
                k: result[k]
                for k in (
                    "from_name",
                    "to_name",
                    "type",
                    "original_width",
                    "original_height",
                    "image_rotation",
                )
            } == {
                "from_name": "mask",
                "to_name": "photo",
                "type": "brushlabels",
                "original_width": row["width"],
                "original_height": row["height"],
                "image_rotation": 0,
            }
            assert result["value"]["format"] == "rle" and result["value"]["brushlabels"] == [seg["label"]]
            assert result["score"] == pytest.approx(seg["score"], abs=1e-6)
            assert np.array_equal(
                ls_mask(result["value"]["rle"], row["width"], row["height"]), job_mask(row, seg)
            )
            total += 1
    assert total == counts["annotations"] > 0
    # Without a map, URIs are kept as they are (s3://… stays s3://…).
    # One label kept: the output's most frequent one (which one depends on the family's model).
    kept = Counter(s["label"] for r in rows.values() for s in r["segments"]).most_common(1)[0][0]
    export(instance_out, "label-studio", str(tmp_path / "plain.json"), labels=[kept])
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert {t["data"]["image"] for t in plain} == {r["image_uri"] for r in rows.values()}
    assert {r["value"]["brushlabels"][0] for t in plain for r in t["predictions"][0]["result"]} == {kept}
    assert all(
        r["from_name"] == "label" and r["to_name"] == "image"
        for t in plain
        for r in t["predictions"][0]["result"]
    )


# -- CVAT ------------------------------------------------------------------------------------


def test_cvat_archive_is_coco_1_0(panoptic_out, tmp_path):
    """CVAT's "COCO 1.0" import: a zip holding annotations/instances_<subset>.json, images
    matched by file_name; the JSON has COCO's required keys."""
    rows = ok_rows(panoptic_out)
    to = tmp_path / "cvat.zip"
    export(panoptic_out, "cvat", str(to))
    with zipfile.ZipFile(to) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == ["images/", "annotations/instances_default.json"]
        doc = json.loads(archive.read("annotations/instances_default.json"))
    assert {"licenses", "info", "categories", "images", "annotations"} <= set(doc)
    for category in doc["categories"]:
        assert {"id", "name", "supercategory"} <= set(category)
    for image in doc["images"]:
        assert {"id", "width", "height", "file_name"} <= set(image)
    assert doc["annotations"]
    for ann in doc["annotations"]:
        assert {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"} <= set(ann)
        assert set(ann["segmentation"]) == {"size", "counts"} and isinstance(
            ann["segmentation"]["counts"], str
        )
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    check_coco(load_coco(tmp_path / "doc.json"), rows, "panoptic", keep=lambda s: s["is_thing"], scores=False)


# Run by datumaro's own Python: load an unpacked CVAT archive as CVAT's COCO importer family
# does, and print what it found.
DATUMARO_LOAD = """
import json, sys
from datumaro.components.dataset import Dataset
dataset = Dataset.import_from(sys.argv[1], "coco_instances")
items = list(dataset)
print(json.dumps({
    "ids": sorted(item.id for item in items),
    "masks": sum(type(a).__name__ in ("RleMask", "Mask", "Polygon")
                 for item in items for a in item.annotations),
}))
"""


def test_cvat_archive_loads_in_datumaro(panoptic_out, tmp_path):
    """datumaro 1.13 (the package index's; CVAT's importers are its fork) loads the archive."""
    python = tool_python("datumaro")
    to = tmp_path / "cvat.zip"
    export(panoptic_out, "cvat", str(to))
    with zipfile.ZipFile(to) as archive:
        archive.extractall(tmp_path / "unpacked")
        doc = json.loads(archive.read("annotations/instances_default.json"))
    done = subprocess.run([python, "-c", DATUMARO_LOAD, str(tmp_path / "unpacked")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["ids"] == sorted(posixpath.splitext(image["file_name"])[0] for image in doc["images"])
    assert loaded["masks"] == len(doc["annotations"]) > 0


# -- reading from object storage, partial jobs, streaming ------------------------------------


def test_export_from_and_to_s3(instance_out, s3_bucket):
    fs = fsspec.filesystem("s3")
    fs.put(instance_out, f"{s3_bucket}/labels", recursive=True)
    counts = export(f"s3://{s3_bucket}/labels", "coco", f"s3://{s3_bucket}/exports/coco.json", shard_size=2)
    assert counts["files"] == [f"{s3_bucket}/exports/coco-00000.json", f"{s3_bucket}/exports/coco-00001.json"]
    fs.invalidate_cache()
    seen = []
    for path in counts["files"]:
        seen += [i["file_name"] for i in json.loads(fs.cat_file(path))["images"]]
    assert sorted(seen) == sorted(ok_rows(instance_out))


def test_partial_job_exports_the_committed_rows(instance_out, tmp_path, caplog):
    out = tmp_path / "partial"
    shutil.copytree(instance_out, out)
    (out / "_SUCCESS").unlink()
    first = sorted((out / "metadata").glob("*.parquet"))[0]
    first.unlink()
    rows = ok_rows(str(out))
    assert 0 < len(rows) < len(PHOTOS)
    with caplog.at_level(logging.WARNING, logger="seglabel"):
        export(str(out), "coco", str(tmp_path / "coco.json"))
    assert "unfinished" in caplog.text
    check_coco(load_coco(tmp_path / "coco.json"), rows, "instance")
    with pytest.raises(ExportError, match="not a seglabel output"):
        export(str(tmp_path / "nothing"), "coco", str(tmp_path / "x.json"))


def synthetic_output(root: Path, rows: int, template: str) -> str:
    """An output with many small rows (a real job.json, parts written with pyarrow)."""
    import pyarrow.parquet as pq

    from seglabel.outputs.contract import SCHEMA

    (root / "metadata").mkdir(parents=True)
    shutil.copy(Path(template) / "job.json", root / "job.json")
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[10:20, 5:30] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    seg = {
        "id": 1,
        "label_id": 2,
        "label": "label2",
        "score": 0.9,
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "rle": rle["counts"].decode(),
        "is_thing": None,
    }
    per_part = 1000
    for start in range(0, rows, per_part):
        batch = [
            {
                "key": f"img/{i:07d}.jpg",
                "image_uri": f"s3://b/img/{i:07d}.jpg",
                "status": "ok",
                "error": None,
                "width": 64,
                "height": 48,
                "mask_uri": f"s3://b/out/masks/img/{i:07d}.jpg.png",
                "task": "instance",
                "model": "m",
                "segments": [seg],
            }
            for i in range(start, min(rows, start + per_part))
        ]
        pq.write_table(
            pa.Table.from_pylist(batch, schema=SCHEMA), root / "metadata" / f"part-{start:08d}.parquet"
        )
    return str(root)


def test_export_memory_does_not_grow_with_the_corpus(instance_out, tmp_path, monkeypatch):
    # The COCO annotations spool to disk past this size (32 MB by default, too much to measure).
    monkeypatch.setattr(coco_module, "SPOOL_MEMORY", 64 << 10)
    peaks = {}
    for rows in (2000, 20000):
        output = synthetic_output(tmp_path / f"out-{rows}", rows, instance_out)
        tracemalloc.start()
        counts = export(output, "coco", str(tmp_path / f"coco-{rows}.json"))
        peaks[rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert counts["images"] == counts["annotations"] == rows
    # Ten times the rows, about the same peak (whole parts or all rows in memory would be 10x).
    assert peaks[20000] < 1.5 * peaks[2000], peaks
    assert len(load_coco(tmp_path / "coco-20000.json").dataset["images"]) == 20000


# -- preview ---------------------------------------------------------------------------------


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.hrefs.append(attrs["href"])
        if tag == "img":
            self.srcs.append(attrs["src"])


def photo(corpus: Path, key: str) -> np.ndarray:
    return np.array(Image.open(corpus / key).convert("RGB"))


def test_preview_overlays_and_index(semantic_out, corpus, tmp_path):
    rows = ok_rows(semantic_out)
    to = tmp_path / "preview"
    paths = preview(semantic_out, str(to), n=50)
    assert len(paths) == len(rows)
    far_pixels = 0
    for path in paths:
        key = str(Path(path).relative_to(to / "overlays"))[: -len(".png")]
        row = rows[key]
        original = photo(corpus, key)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (row["width"], row["height"])
            over = np.array(image.convert("RGB"))
        changed = (over != original).any(axis=-1)
        near = np.zeros(changed.shape, dtype=bool)
        for seg in row["segments"]:
            mask = job_mask(row, seg)
            assert changed[mask].mean() > 0.95  # the segment's colour shows over the photo
            near |= mask
            x, y = int(seg["bbox"][0]), int(seg["bbox"][1])
            near[max(0, y - 20): y + 20, max(0, x - 150): x + 150] = True  # its label
        assert not changed[~near].any()  # away from the masks and labels: the photo itself
        far_pixels += int((~near).sum())
    assert far_pixels > 100_000  # the check above was not vacuous

    html = (to / "index.html").read_text(encoding="utf-8")
    links = Links()
    links.feed(html)
    assert {str((to / unquote(h)).resolve()) for h in links.hrefs} == {str(Path(p).resolve()) for p in paths}
    # Each card: a thumbnail of its overlay, fitted into the grid's square, as a JPEG.
    assert len(links.srcs) == len(paths)
    for src in links.srcs:
        key = unquote(src)[len("thumbs/"):-len(".jpg")]
        with Image.open(to / unquote(src)) as thumb:
            assert thumb.format == "JPEG"
            width, height = rows[key]["width"], rows[key]["height"]
            scale = min(256 / width, 256 / height, 1.0)
            assert abs(thumb.width - width * scale) <= 1 and abs(thumb.height - height * scale) <= 1
            assert max(thumb.size) <= 256
    links_all = links.hrefs + links.srcs
    assert all(not h.startswith(("/", "file:")) and " " not in h for h in links_all)  # relative, escaped
    assert "tom &amp; jerry&#x27;s #1.png" in html and "tom & jerry" not in html


def test_preview_of_instances_and_first_n(instance_out, corpus, tmp_path):
    rows = ok_rows(instance_out)
    paths = preview(instance_out, str(tmp_path / "p"), n=2)
    assert len(paths) == 2
    for path in paths:
        key = str(Path(path).relative_to(tmp_path / "p" / "overlays"))[: -len(".png")]
        row = rows[key]
        over = np.array(Image.open(path).convert("RGB"))
        assert over.shape[:2] == (row["height"], row["width"])
        union = np.zeros(over.shape[:2], dtype=bool)
        for seg in row["segments"]:
            union |= job_mask(row, seg)
        assert union.any() and (over != photo(corpus, key)).any(axis=-1)[union].mean() > 0.95
    links = Links()
    links.feed((tmp_path / "p" / "index.html").read_text(encoding="utf-8"))
    assert len(set(links.hrefs)) == 2 and len(links.srcs) == 2


# -- the command line ------------------------------------------------------------------------


def test_cli(instance_out, semantic_out, tmp_path, capsys):
    rows = ok_rows(instance_out)
    code = main(["export", instance_out, "--format", "coco", "--to", str(tmp_path / "c.json"),
                "--labels", "label0,label1", "--min-score", "0.4", "--shard-size", "10"])
    assert code == 0
    n = check_coco(load_coco(tmp_path / "c-00000.json"), rows, "instance",
                   keep=lambda s: s["label"] in ("label0", "label1") and s["score"] >= 0.4)
    assert n > 0
    assert "exported 4 images" in capsys.readouterr().out

    code = main(["export", instance_out, "--format", "label-studio", "--to", str(tmp_path / "ls.json"),
                "--image-prefix-map", "file:///=https://cdn.example/?d=/", "--from-name", "m"])
    assert code == 0
    tasks = json.loads((tmp_path / "ls.json").read_text())
    assert all(t["data"]["image"].startswith("https://cdn.example/?d=/") for t in tasks)

    capsys.readouterr()
    assert main(["export", instance_out, "--format", "coco-panoptic", "--to", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seglabel: error: coco-panoptic needs a panoptic output") and err.count("\n") == 1

    assert main(["preview", semantic_out, "--to", str(tmp_path / "prev"), "--n", "1"]) == 0
    assert len(list((tmp_path / "prev" / "overlays").rglob("*.png"))) == 1


# -- review order, outputs made before review scores, the review page ------------------------


def review_first(rows: dict[str, dict]) -> list[str]:
    """Keys most doubtful first, as the contract documents the order (scores here all differ)."""
    scores = [r["review_score"] for r in rows.values()]
    assert len(set(scores)) == len(scores), "tied review scores: the order would rest on ties"
    return sorted(rows, key=lambda k: -rows[k]["review_score"])


def test_exports_and_preview_in_review_order(instance_out, panoptic_out, tmp_path):
    rows = ok_rows(instance_out)
    expected = review_first(rows)
    export(instance_out, "coco", str(tmp_path / "c.json"), order="review", shard_size=3)
    shards = [json.loads((tmp_path / f"c-0000{i}.json").read_text()) for i in range(2)]
    assert [im["file_name"] for doc in shards for im in doc["images"]] == expected
    export(instance_out, "label-studio", str(tmp_path / "ls.json"), order="review")
    tasks = json.loads((tmp_path / "ls.json").read_text())
    assert [t["data"]["key"] for t in tasks] == expected
    assert [t["data"]["review_score"] for t in tasks] == pytest.approx(
        [rows[k]["review_score"] for k in expected], abs=1e-6)
    export(instance_out, "cvat", str(tmp_path / "cvat.zip"), order="review")
    with zipfile.ZipFile(tmp_path / "cvat.zip") as archive:
        doc = json.loads(archive.read("annotations/instances_default.json"))
    assert [im["file_name"] for im in doc["images"]] == expected
    # The default stays the output's order (a different one here).
    export(instance_out, "label-studio", str(tmp_path / "plain.json"))
    plain = [t["data"]["key"] for t in json.loads((tmp_path / "plain.json").read_text())]
    assert plain == [r["key"] for r in read_rows(instance_out) if r["status"] == "ok"] != expected

    prows = ok_rows(panoptic_out)
    export(panoptic_out, "coco-panoptic", str(tmp_path / "pan"), order="review")
    doc = json.loads((tmp_path / "pan" / "panoptic.json").read_text())
    assert [im["file_name"] for im in doc["images"]] == review_first(prows)

    paths = preview(instance_out, str(tmp_path / "prev"), n=2, order="review")
    shown = [str(Path(p).relative_to(tmp_path / "prev" / "overlays"))[: -len(".png")] for p in paths]
    assert shown == expected[:2]
    with pytest.raises(ExportError, match="--order must be one of output, review"):
        export(instance_out, "coco", str(tmp_path / "x.json"), order="worst")


def strip_review_scores(output: Path) -> None:
    """Rewrite every part as seglabel wrote them before review scores: without the column."""
    for part in sorted((output / "metadata").glob("*.parquet")):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["review_score"]), part)


def test_outputs_without_review_scores_export_inspect_and_resume(instance_out, corpus, job_checkpoints,
                                                                 tmp_path, capsys):
    """An output written before the column existed: exports, preview and inspect read it (no
    score, no failure); a resumed run adds rows with scores; the review order puts those first."""
    from seglabel.job.pipeline import label

    old = tmp_path / "old"
    shutil.copytree(instance_out, old)
    strip_review_scores(old)
    # One image's row is lost, as if the old run had stopped before it: a resume labels it anew.
    parts = sorted((old / "metadata").glob("*.parquet"))
    last = pq.read_table(parts[-1])
    redo = last.column("key")[0].as_py()
    pq.write_table(last.slice(1), parts[-1])
    (old / "_SUCCESS").unlink()
    assert main(["inspect", str(old)]) == 0
    capsys.readouterr()
    export(str(old), "label-studio", str(tmp_path / "before.json"), order="review")
    before = json.loads((tmp_path / "before.json").read_text())
    assert before and all("score" not in t["predictions"][0] and "review_score" not in t["data"]
                          for t in before)

    summary = label(str(corpus), str(old), model=str(job_checkpoints["instance"]), score_threshold=0.3,
                    rows_per_part=2)
    assert (summary.ok, summary.error) == (1, 0)  # the lost row only
    rows = {r["key"]: r for r in pq.read_table(sorted((old / "metadata").glob("*.parquet"))[-1]).to_pylist()}
    assert list(rows) == [redo] and 0 <= rows[redo]["review_score"] <= 1
    export(str(old), "label-studio", str(tmp_path / "after.json"), order="review")
    after = json.loads((tmp_path / "after.json").read_text())
    assert after[0]["data"]["key"] == redo and after[0]["data"]["review_score"] == pytest.approx(
        rows[redo]["review_score"], abs=1e-6)
    # The rest, without scores, in the output's order.
    assert [t["data"]["key"] for t in after[1:]] == [t["data"]["key"] for t in before]
    assert all("score" not in t["predictions"][0] for t in after[1:])
    preview(str(old), str(tmp_path / "prev"), order="review")
    assert "review <span class=\"score\">none</span>" in (tmp_path / "prev" / "index.html").read_text()


class Cards(HTMLParser):
    """The review page's cards, in document order, as the browser left them."""

    def __init__(self):
        super().__init__()
        self.cards: list[dict] = []
        self.shown: str | None = None
        self._in_shown = False
        self.legend: dict[str, str] = {}
        self._swatch: str | None = None
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.refs += [attrs[a] for a in ("src", "href") if a in attrs]
        if tag == "figure":
            self.cards.append({**attrs, "hidden": "hidden" in attrs})
        if tag == "img" and self.cards:
            self.cards[-1]["key"] = attrs["alt"]
        if attrs.get("id") == "shown":
            self._in_shown = True
        if attrs.get("class") == "swatch":
            self._swatch = attrs["style"].split("#")[1]

    def handle_data(self, data):
        if self._in_shown:
            self.shown, self._in_shown = data, False
        elif self._swatch is not None:
            self.legend[data] = self._swatch
            self._swatch = None


def without_label(output: str, label: str, keys: set[str], to: Path) -> str:
    """A copy of ``output`` whose rows of ``keys`` lost their segments of ``label`` (the tiny
    model finds every label in every image; a reviewer's corpus does not)."""
    shutil.copytree(output, to)
    for part in sorted((to / "metadata").glob("*.parquet")):
        rows = pq.read_table(part).to_pylist()
        for row in rows:
            if row["key"] in keys:
                row["segments"] = [s for s in row["segments"] if s["label"] != label]
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(part)), part)
    return str(to)


def test_review_page_sorts_and_filters_in_chromium(instance_out, tmp_path):
    """The page in the distribution's headless Chromium, offline: sorted by review score at
    first, by key or segment count on asking, filtered by a label; a screenshot for a person."""
    label = "label1"
    lacking = set(sorted(ok_rows(instance_out))[:2])
    output = without_label(instance_out, label, lacking, tmp_path / "labels")
    rows = ok_rows(output)
    keys = {k for k, r in rows.items() if any(s["label"] == label for s in r["segments"])}
    assert keys == set(rows) - lacking and keys
    to = tmp_path / "review"
    preview(output, str(to))
    page = (to / "index.html").as_uri()

    def view(**state) -> Cards:
        cards = Cards()
        cards.feed(chromium(page + ("#" + urlencode(state) if state else ""), tmp_path))
        assert len(cards.cards) == len(rows)
        return cards

    first = view()
    assert [c["key"] for c in first.cards] == review_first(rows)
    assert not any(c["hidden"] for c in first.cards) and first.shown == str(len(rows))
    # Nothing the page loads lies outside its folder.
    assert all(not ref.startswith(("http:", "https:", "//", "/", "file:")) for ref in first.refs)
    assert [c["key"] for c in view(sort="key").cards] == sorted(rows)
    by_count = [c["key"] for c in view(sort="segments").cards]
    counts = [len(rows[k]["segments"]) for k in by_count]
    assert counts == sorted(counts, reverse=True) and sorted(by_count) == sorted(rows)

    filtered = view(sort="key", label=label)
    assert [c["key"] for c in filtered.cards if not c["hidden"]] == sorted(keys)
    assert {c["key"] for c in filtered.cards if c["hidden"]} == set(rows) - keys
    assert filtered.shown == str(len(keys))

    # The legend's colours are the Label Studio config's (the palette both use).
    counts = export(output, "label-studio", str(tmp_path / "ls.json"))
    config = Path(counts["labeling_config"]).read_text(encoding="utf-8")
    assert first.legend and all(f'value="{name}" background="#{colour}"' in config
                                for name, colour in first.legend.items())
    assert set(first.legend) == {s["label"] for r in rows.values() for s in r["segments"]}

    # For a person to look at: under SEGLABEL_ARTIFACTS where set.
    folder = Path(os.environ.get("SEGLABEL_ARTIFACTS") or tmp_path)
    shot = folder / f"review-{Path(instance_out).parent.name}.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    chromium(page, tmp_path, screenshot=shot)
    with Image.open(shot) as image:
        assert image.size == (1400, 1000)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    # The thumbnails loaded (photos hold thousands of colours; text, borders and empty image
    # boxes a few dozen).
    assert len(np.unique(pixels, axis=0)) > 2000


def test_review_page_with_hostile_names_in_chromium(instance_out, tmp_path):
    """Team labels that are markup, URL syntax and non-ASCII: shown as text, never run, and
    each one filters the page through the address's fragment."""
    lacking = set(sorted(ok_rows(instance_out))[:2])
    output = without_label(instance_out, "label1", lacking, tmp_path / "labels")
    rows = ok_rows(output)
    present = sorted({s["label"] for r in rows.values() for s in r["segments"]} - {"label1"})
    names = ['a&b "q" </script><img src=x onerror="document.title=1">', "ünï 日本"]
    hostile = {"label1": "p+q%20=#r&label=x", **dict(zip(present, names))}
    assert len(hostile) == 3, present
    (tmp_path / "team.json").write_text(json.dumps(hostile), encoding="utf-8")
    to = tmp_path / "review"
    preview(output, str(to), label_map=str(tmp_path / "team.json"))
    page = (to / "index.html").as_uri()
    for model_label, name in hostile.items():
        holders = {k for k, r in rows.items() if any(s["label"] == model_label for s in r["segments"])}
        cards = Cards()
        dom = chromium(page + "#" + urlencode({"sort": "key", "label": name}), tmp_path)
        cards.feed(dom)
        assert [c["key"] for c in cards.cards if not c["hidden"]] == sorted(holders), name
        assert cards.shown == str(len(holders))
        assert set(cards.legend) == set(hostile.values())
        # The markup stayed text: no element it names, no title its handler would set.
        assert "<img src=\"x\"" not in dom and "<title>1</title>" not in dom
    partly = {k for k, r in rows.items() if any(s["label"] == "label1" for s in r["segments"])}
    assert 0 < len(partly) < len(rows)


def rewrite_part(part: Path, column: str, values) -> None:
    table = pq.read_table(part)
    at = table.schema.get_field_index(column)
    pq.write_table(table.set_column(at, column, values), part)


def test_parts_of_other_types_and_damaged_review_scores(instance_out, tmp_path, capsys):
    """Parts an older or another writer made with other integer or float widths read as the
    contract's, in any order; review scores that are not numbers in [0, 1] are one line, exit 2."""
    out = tmp_path / "labels"
    shutil.copytree(instance_out, out)
    parts = sorted((out / "metadata").glob("*.parquet"))
    rows = ok_rows(instance_out)
    first = pq.read_table(parts[0])
    rewrite_part(parts[0], "width", first.column("width").cast(pa.int64()))
    rewrite_part(parts[0], "review_score", first.column("review_score").cast(pa.float64()))
    export(str(out), "label-studio", str(tmp_path / "ls.json"), order="review")
    assert [t["data"]["key"] for t in json.loads((tmp_path / "ls.json").read_text())] == review_first(rows)

    capsys.readouterr()  # what the library calls above logged (through an earlier main's handler)
    for bad in (pa.array([float("nan")] * first.num_rows), pa.array([1.5] * first.num_rows),
                pa.array(["0.9"] * first.num_rows)):
        rewrite_part(parts[0], "review_score", bad)
        for argv in (["export", str(out), "--format", "label-studio", "--to", str(tmp_path / "x.json")],
                     ["export", str(out), "--format", "coco", "--to", str(tmp_path / "y.json"),
                      "--order", "review"],
                     ["preview", str(out), "--to", str(tmp_path / "p")]):
            assert main(argv) == 2, (bad.type, argv)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "review_score" in err and parts[0].name in err, err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


def test_label_names_with_commas_can_be_chosen(tmp_path, capsys):
    """"gown, evening" cannot be named in a comma-separated list: a quoted form, as in CSV."""
    from seglabel.core.config import JobConfig

    config = JobConfig.from_mapping({"input": "i", "output": "o", "labels": '"gown, evening", person',
                                     "thing_labels": ["gown, evening"]})
    assert config.engine.labels == ("gown, evening", "person")
    assert config.engine.thing_labels == ("gown, evening",)
    row = ok_row("a.png", "file:///x/a.png", labels=("gown, evening", "hat"))
    out = hand_made_output(tmp_path / "out", [row], {"0": "gown, evening", "1": "hat"})
    assert main(["export", str(out), "--format", "coco", "--to", str(tmp_path / "c.json"),
                 "--labels", '"gown, evening"']) == 0
    coco = json.loads((tmp_path / "c.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["gown, evening"]
    assert [a["category_id"] for a in coco["annotations"]] == [1]


def test_destinations_among_the_outputs_own_files_are_refused(instance_out, tmp_path, capsys):
    """Issue 35: an export, a preview or an eval report written over job.json, _SUCCESS or into
    masks/, metadata/ or _seglabel/ exited 0 and destroyed the job's record (or made every later
    read fail). Each is one line, exit 2, with the output's files untouched; a folder beside
    them is fine."""
    out = tmp_path / "out"
    shutil.copytree(instance_out, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    truth = tmp_path / "truth.json"
    assert main(["export", str(out), "--format", "coco", "--to", str(truth)]) == 0
    own = ("job.json", "_SUCCESS", "masks/coco.json", "metadata/coco.parquet", "_seglabel/c.json")
    commands = [["export", str(out), "--format", "coco", "--to", str(out / name)] for name in own]
    scored = ["eval", str(out), "--truth", str(truth)]
    # The review: a chain of filesystems writes through to the file it wraps.
    commands.append(["export", str(out), "--format", "coco", "--to", f"simplecache::file://{out}/job.json"])
    commands += [["preview", str(out), "--to", str(out / "masks" / "preview")],
                 scored + ["--json", str(out / "job.json")],
                 scored + ["--per-image", str(out / "metadata" / "worst.parquet")]]
    for argv in commands:
        line = one_line_error(capsys, argv)
        assert "is inside the output's own files" in line, (argv, line)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["export", str(out), "--format", "coco", "--to", str(out / "exports" / "coco.json")]) == 0


def test_flags_that_do_nothing_are_refused_alike(tmp_path, capsys):
    """Issue 35: --unmapped without --label-map (export, preview, eval) and --polygon-tolerance
    without polygons were silently ignored. Each is one line, exit 2, the same in every command."""
    out = str(tmp_path / "any-output")
    for argv in (["export", out, "--format", "coco", "--to", str(tmp_path / "c.json"), "--unmapped", "keep"],
                 ["preview", out, "--to", str(tmp_path / "p"), "--unmapped", "keep"],
                 ["eval", out, "--truth", str(tmp_path / "t.json"), "--unmapped", "keep"]):
        assert one_line_error(capsys, argv) == "seglabel: error: --unmapped applies only with --label-map"
    coco = ["export", out, "--format", "coco", "--to", str(tmp_path / "c.json"), "--polygon-tolerance", "2"]
    line = one_line_error(capsys, coco)
    assert line == "seglabel: error: --polygon-tolerance applies only with --mask-format polygon"
    assert "applies only" not in one_line_error(capsys, coco + ["--mask-format", "polygon"])  # taken
    # The review: Label Studio's own flags for another format.
    coco = ["export", out, "--format", "coco", "--to", str(tmp_path / "c.json")]
    for flag, value in (("--from-name", "x"), ("--to-name", "y"), ("--image-prefix-map", "s3://b/=https://h/")):
        line = one_line_error(capsys, coco + [flag, value])
        assert line == f"seglabel: error: {flag} applies only with --format label-studio", line
    for call, error in ((lambda: preview(out, str(tmp_path / "p"), unmapped="keep"), ConfigError),
                        (lambda: evaluate(out, str(tmp_path / "t.json"), unmapped="keep"), EvalError)):
        with pytest.raises(error, match="--unmapped applies only with --label-map"):  # the library alike
            call()
