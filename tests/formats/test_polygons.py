"""Polygons where the tools prefer them (issue 26, part 4): masks traced and simplified, rasterised
back by pycocotools, and exported for COCO, CVAT (loaded by datumaro) and Label Studio."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from readback import read_rows
from scipy import ndimage
from skimage import data, filters

from helpers import photo_job, tool_python
from seglabel.core.errors import ExportError
from seglabel.formats.export import export
from seglabel.formats.polygons import MIN_IOU, coco_polygons, outline


def drawn_back(polygons, height: int, width: int) -> np.ndarray:
    """Polygons rasterised by pycocotools, as COCO's tools and importers do."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def photo_regions(min_pixels: int = 1000) -> list[tuple[str, np.ndarray]]:
    """Regions of real photos (scikit-image's): the horse's silhouette, and the largest
    connected regions of the coins, the camera man and the astronaut thresholded by Otsu."""
    regions = [("horse", ~data.horse().astype(bool))]
    photos = (("coins", data.coins()), ("camera", data.camera()), ("astronaut", data.astronaut()[..., 0]))
    for name, image in photos:
        labels, n = ndimage.label(image > filters.threshold_otsu(image))
        sizes = ndimage.sum(np.ones_like(labels), labels, range(1, n + 1))
        for i in np.argsort(-sizes)[:6]:
            if sizes[i] >= min_pixels:
                regions.append((f"{name}-{i + 1}", labels == i + 1))
    return regions


def test_polygons_of_real_photos_cover_their_masks():
    regions = photo_regions()
    assert len(regions) >= 12
    for name, mask in regions:
        shape = outline(mask)  # the default tolerance, 1 pixel
        back = drawn_back(coco_polygons(shape.polygons), *mask.shape)
        # Holes are not the polygons' (COCO keeps such a mask as RLE, Label Studio fills them).
        assert iou(back, ndimage.binary_fill_holes(mask)) >= MIN_IOU, name
        if not shape.holes:
            assert iou(back, mask) >= MIN_IOU, name
        # Simplified: fewer points than the traced outline.
        assert sum(map(len, shape.polygons)) < sum(map(len, outline(mask, tolerance=0).polygons)), name
    horse = outline(regions[0][1])
    unsimplified = outline(regions[0][1], tolerance=0)
    assert sum(map(len, horse.polygons)) < sum(map(len, unsimplified.polygons)) / 3


def test_a_pocket_open_at_a_corner_is_outside_for_the_check_too():
    """The contours see the background 8-connected; the check's hole filling must as well, or a
    pocket open only at a corner counts against the polygons and undoes their simplification."""
    mask = np.zeros((40, 40), bool)
    mask[2:38, 2:38] = True
    mask[20, 20] = False  # a real hole
    mask[3:15, 3:15] = False  # a 12x12 pocket ...
    mask[2, 2] = False  # ... open to the outside through the corner (1, 1) -> (2, 2) -> (3, 3)
    with_hole = outline(mask)
    mask[20, 20] = True
    without = outline(mask)
    assert with_hole.holes and sum(map(len, with_hole.polygons)) <= sum(map(len, without.polygons)) + 4


def test_split_masks_holes_and_the_image_edge():
    mask = np.zeros((40, 60), bool)
    mask[0:10, 0:15] = True  # touches two edges
    mask[20:40, 30:60] = True
    mask[25:30, 40:45] = False  # a hole
    shape = outline(mask)
    assert len(shape.polygons) == 2 and shape.holes
    for polygon in shape.polygons:
        assert polygon[:, 0].min() >= 0 and polygon[:, 0].max() <= 60
        assert polygon[:, 1].min() >= 0 and polygon[:, 1].max() <= 40
    back = drawn_back(coco_polygons(shape.polygons), 40, 60)
    # The outline passes through the pixel edges' midpoints: a convex corner's pixel is cut.
    assert iou(back, ndimage.binary_fill_holes(mask)) >= 0.98
    assert outline(np.zeros((5, 5), bool)).polygons == []


@pytest.fixture(scope="module")
def boxes(ray_session, tmp_path_factory, checkpoints) -> str:
    photos = {"astronaut.jpg": data.astronaut(), "coffee #1.png": data.coffee()}
    return photo_job(tmp_path_factory.mktemp("poly"), checkpoints["instance"], photos,
                     stand_in="segments=6,coverage=0.03")


def job_masks(output: str) -> dict[str, list[tuple[str, np.ndarray]]]:
    out = {}
    for row in read_rows(output):
        size = [row["height"], row["width"]]
        out[row["key"]] = [(s["label"], mask_utils.decode({"size": size, "counts": s["rle"].encode()}) > 0)
                           for s in row["segments"]]
    return out


def test_coco_cvat_and_label_studio_polygons(boxes, tmp_path):
    masks = job_masks(boxes)
    export(boxes, "coco", str(tmp_path / "coco.json"), mask_format="polygon")
    coco = COCO(str(tmp_path / "coco.json"))
    for image in coco.dataset["images"]:
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])), key=lambda a: a["id"])
        assert len(anns) == len(masks[image["file_name"]])
        for ann, (label, mask) in zip(anns, masks[image["file_name"]]):
            assert isinstance(ann["segmentation"], list)  # boxes have no holes: polygons
            assert coco.cats[ann["category_id"]]["name"] == label
            assert iou(coco.annToMask(ann).astype(bool), mask) >= MIN_IOU

    export(boxes, "cvat", str(tmp_path / "cvat.zip"), mask_format="polygon")
    folder = tmp_path / "cvat"
    with zipfile.ZipFile(tmp_path / "cvat.zip") as archive:
        archive.extractall(folder)
    script = ("import sys\nfrom datumaro.components.dataset import Dataset\n"
              "from datumaro.components.annotation import AnnotationType\n"
              "ds = Dataset.import_from(sys.argv[1], 'coco_instances')\n"
              "kinds = [a.type.name for item in ds for a in item.annotations]\n"
              "print('KINDS', kinds.count('polygon'), kinds.count('mask'))\n")
    done = subprocess.run([tool_python("datumaro"), "-c", script, str(folder)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("KINDS "))
    assert line == f"KINDS {sum(map(len, masks.values()))} 0"  # every segment a polygon, none a mask

    export(boxes, "label-studio", str(tmp_path / "tasks.json"), mask_format="polygon")
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    for task in tasks:
        results = task["predictions"][0]["result"]
        assert {r["type"] for r in results} == {"polygonlabels"}
        for result, (label, mask) in zip(results, masks[task["data"]["key"]]):
            height, width = mask.shape
            assert result["value"]["polygonlabels"] == [label] and result["value"]["closed"] is True
            points = [[x * width / 100, y * height / 100] for x, y in result["value"]["points"]]
            assert all(0 <= x <= width and 0 <= y <= height for x, y in points)
            back = drawn_back([[v for point in points for v in point]], height, width)
            assert iou(back, mask) >= MIN_IOU


def test_masks_with_holes_stay_rle_in_coco_and_are_filled_in_label_studio(checkpoints, ray_session, tmp_path):
    # The tiny random model's masks are ragged and hold holes.
    out = photo_job(tmp_path, checkpoints["instance"], {"astronaut.jpg": data.astronaut()},
                    score_threshold=0.3)
    export(str(out), "coco", str(tmp_path / "coco.json"), mask_format="polygon")
    anns = json.loads((tmp_path / "coco.json").read_text())["annotations"]
    masks = job_masks(str(out))["astronaut.jpg"]
    with_holes = [outline(mask).holes for _, mask in masks]
    assert any(with_holes)
    for ann, holes, (_, mask) in zip(anns, with_holes, masks):
        assert isinstance(ann["segmentation"], dict) == holes
    export(str(out), "label-studio", str(tmp_path / "tasks.json"), mask_format="polygon")
    results = json.loads((tmp_path / "tasks.json").read_text())[0]["predictions"][0]["result"]
    assert results and {r["type"] for r in results} == {"polygonlabels"}


def test_polygon_options_that_cannot_apply(boxes, tmp_path):
    with pytest.raises(ExportError, match="COCO panoptic holds its masks as PNGs"):
        export(boxes, "coco-panoptic", str(tmp_path / "p"), mask_format="polygon")
    with pytest.raises(ExportError, match="--mask-format must be one of rle, polygon"):
        export(boxes, "coco", str(tmp_path / "c.json"), mask_format="svg")
    for tolerance in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ExportError, match="--polygon-tolerance"):
            export(boxes, "coco", str(tmp_path / "c.json"), mask_format="polygon",
                   polygon_tolerance=tolerance)
    with pytest.raises(ExportError, match="--unmapped applies only with --label-map"):
        export(boxes, "coco", str(tmp_path / "c.json"), unmapped="keep")
    assert not list(Path(tmp_path).iterdir())
