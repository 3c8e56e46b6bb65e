"""Masks as polygons, for the tools that draw polygons faster than masks.

Label Studio's maintainers note that brush masks are its heaviest format and polygons render far
faster; CVAT and COCO take polygons too. A mask's outline is traced by scikit-image
(``measure.find_contours``: marching squares at the 0.5 level of the mask, padded so that a
mask touching the image's edge closes there) and simplified by its Douglas-Peucker
(``measure.approximate_polygon``) within a tolerance in pixels. scikit-image is BSD-3-licensed
and already brings what it needs (scipy); OpenCV's wheels would bring an LGPL FFmpeg.

Contours are told apart by their winding: with ``positive_orientation="high"``, an outline
around the mask winds one way and a hole's the other. A mask split in several parts gives
several outer polygons; holes are reported (:attr:`Outline.holes`), for the caller's rule: COCO
and CVAT keep a mask with holes as RLE (exact), Label Studio's polygons cannot hold holes and
fill them.

Coordinates are COCO's: a pixel (row r, column c) covers [c, c + 1) × [r, r + 1), so the
outline passes through the pixel edges' midpoints at half-pixel offsets from their centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage import measure

DEFAULT_TOLERANCE = 1.0
# The polygons of a mask cover it at least this well, rasterised back (see outline()).
MIN_IOU = 0.95
MIN_TOLERANCE = 0.125
MAX_CHECKED_POINTS = 100_000


@dataclass(frozen=True)
class Outline:
    """A mask's outer polygons (each an (N, 2) array of x, y, N ≥ 3, not repeating its first
    point) and whether it has holes."""

    polygons: list[np.ndarray]
    holes: bool


def outline(mask: np.ndarray, tolerance: float = DEFAULT_TOLERANCE, holes_stop: bool = False) -> Outline:
    """The outer polygons of a binary (H, W) mask, simplified within ``tolerance`` pixels.

    Douglas-Peucker at a pixel cuts across the staircase of a small or ragged region's edge:
    where the polygons rasterised back (by pycocotools, as the tools and COCO's own code do)
    would cover the mask, holes filled, with an IoU under :data:`MIN_IOU`, the tolerance is
    halved, down to none, until they do. An outline of over :data:`MAX_CHECKED_POINTS` points
    (a mask of noise) is simplified once, unchecked: each check costs a pass over every point.
    ``holes_stop``: a mask with holes returns no polygons at once (its caller keeps the RLE).
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1).astype(np.float32)
    outer, holes = [], False
    for contour in measure.find_contours(padded, 0.5, positive_orientation="high"):
        # (row, col) in the padded array -> COCO x, y: pixel centres sit at +0.5.
        xy = contour[:, ::-1] - 1 + 0.5
        if _signed_area(xy) > 0:  # winds the other way round: a hole
            holes = True
        else:
            outer.append(xy)
    if not outer or (holes and holes_stop):
        return Outline([], holes)
    # The contours see the background 8-connected (a pocket open at a corner is outside): so
    # must the filling, or the check would count such a pocket against the polygons.
    filled = ndimage.binary_fill_holes(mask, structure=np.ones((3, 3))) if holes else mask
    target = mask_utils.encode(np.asfortranarray(filled.astype(np.uint8)))
    checked = sum(len(xy) for xy in outer) <= MAX_CHECKED_POINTS
    while True:
        polygons = [_simplified(xy, tolerance) for xy in outer]
        polygons = [p for p in polygons if len(p) >= 3]
        if not checked or tolerance <= MIN_TOLERANCE or _iou(polygons, target) >= MIN_IOU:
            return Outline(polygons, holes)
        tolerance = tolerance / 2 if tolerance / 2 > MIN_TOLERANCE else 0.0


def _simplified(xy: np.ndarray, tolerance: float) -> np.ndarray:
    if tolerance > 0:
        xy = measure.approximate_polygon(xy, tolerance)
    if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]
    return xy


def _iou(polygons: list[np.ndarray], target: dict) -> float:
    if not polygons:
        return 0.0
    height, width = target["size"]
    drawn = mask_utils.merge(mask_utils.frPyObjects(coco_polygons(polygons), height, width))
    return float(mask_utils.iou([drawn], [target], [0])[0][0])


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def coco_polygons(polygons: list[np.ndarray]) -> list[list[float]]:
    """COCO's polygon segmentation: each polygon flattened to x0, y0, x1, y1, ..."""
    return [[round(float(v), 2) for v in p.reshape(-1)] for p in polygons]
