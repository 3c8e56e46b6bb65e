"""Ground truth for ``seglabel eval``: a labeled sample, read, checked, and matched to a job.

One form per task, as the public datasets ship them:

========= =================================================================================
task      ``--truth``
========= =================================================================================
instance  a COCO instances JSON (``segmentation`` as polygons, compressed or uncompressed
          RLE; ``iscrowd`` regions are neither misses nor make false positives)
panoptic  a COCO panoptic JSON; its PNGs in ``--truth-masks`` (default: the JSON's URL without
          ``.json``, as panopticapi and COCO's own layout have it: ``panoptic_val2017.json``
          and ``panoptic_val2017/``)
semantic  a folder of single-channel label PNGs (pixel = label id; ``--ignore-index``);
          ids are the model's unless ``--truth-labels`` names them
========= =================================================================================

A truth is read whole and checked before anything is scored: whatever is wrong with it (not
COCO, a category the model does not know, a segmentation that is not a mask of its image, a
file name that would leave its folder) is one :class:`EvalError` line. Its images are matched
to the output's keys by :class:`KeyMatcher`.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator, Mapping

import numpy as np
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from ..core.errors import EvalError, SourceError, Unreadable, one_line
from ..core.keys import is_safe_key
from ..core.redaction import get_logger
from ..inputs.listing import iter_listing
from ..storage.filesystem import full_uri, open_url
from ..storage.read import read_bytes

log = get_logger(__name__)

# A truth JSON is read whole (pycocotools holds it whole too); COCO's largest, train2017
# instances, is 448 MB.
MAX_TRUTH_JSON_BYTES = 2 << 30
MAX_TRUTH_LABELS_BYTES = 1 << 20


def _read(url: str, storage_options: Mapping[str, Any] | None, limit: int, what: str) -> bytes:
    """A truth file's bytes: a regular file, at most ``limit`` of them."""
    try:
        return read_bytes(_uri(url, storage_options), storage_options, limit)
    except FileNotFoundError:
        raise EvalError(f"{what} {url} does not exist") from None
    except (Unreadable, OSError, ValueError) as exc:
        raise EvalError(f"cannot read {what} {url}: {one_line(exc)}") from exc


def _uri(url: str, storage_options: Mapping[str, Any] | None) -> str:
    """``url`` with its protocol, local paths made absolute (read_bytes never parses fsspec
    chains, so a name holding '::' stays one name)."""
    fs, path = open_url(url, storage_options)
    return full_uri(fs, path)


def _json(data: bytes, url: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise EvalError(f"{url} is not JSON: {one_line(exc)}") from None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- labels ----------------------------------------------------------------------------------


def check_known(name: str, model_names: Collection[str], what: str) -> None:
    """One line naming a truth category or class whose name is none of the model's labels."""
    if name not in model_names:
        known = ", ".join(sorted(model_names)[:12]) + (", ..." if len(model_names) > 12 else "")
        raise EvalError(f"{what} {name!r} is not one of the model's labels ({known})")


def read_truth_labels(url: str, storage_options: Mapping[str, Any] | None) -> dict[int, str]:
    """Names of a semantic truth's ids: a YAML or JSON mapping ``{id: name}``, a list of names
    (index = id), or a COCO-style ``{"categories": [{"id", "name"}]}``."""
    value: Any = _read(url, storage_options, MAX_TRUTH_LABELS_BYTES, "--truth-labels")
    try:
        value = yaml.safe_load(value)
    except (yaml.YAMLError, RecursionError) as exc:
        raise EvalError(f"--truth-labels {url} is neither YAML nor JSON: {one_line(exc)}") from None
    if isinstance(value, dict) and isinstance(value.get("categories"), list):
        value = {c.get("id"): c.get("name") for c in value["categories"] if isinstance(c, dict)}
    if isinstance(value, list):
        value = dict(enumerate(value))
    if not isinstance(value, dict) or not value:
        raise EvalError(f"--truth-labels {url} must map ids to names ({{0: road, 1: car}}) or list names")
    out: dict[int, str] = {}
    for key, name in value.items():
        # Whole numbers only: YAML reads 1.9, true and .inf as keys too.
        if not (_whole(key) or (isinstance(key, str) and key.isdigit() and key.isascii())):
            raise EvalError(f"--truth-labels {url}: {key!r} is not a label id")
        label_id = int(key)
        if not 0 <= label_id < 65536 or not isinstance(name, str) or not name:
            raise EvalError(f"--truth-labels {url}: id {key!r} must be 0..65535 and named")
        if label_id in out or name in out.values():
            raise EvalError(f"--truth-labels {url}: id {label_id} or the name {name!r} is listed twice")
        out[label_id] = name
    return out


# -- COCO JSON ---------------------------------------------------------------------------------


@dataclass
class TruthImage:
    """One image of a truth: its name (``file_name``), id, size, and for panoptic its
    annotation (``file_name`` of its PNG and ``segments_info``)."""

    name: str
    id: int
    width: int | None = None
    height: int | None = None
    annotation: dict | None = None
    # A panoptic truth's image without an annotation has nothing to score against.
    scorable: bool = True


@dataclass
class CocoTruth:
    """A checked COCO instances or panoptic truth: ``kind`` says which."""

    url: str
    kind: str
    dataset: dict
    images: list[TruthImage]
    # Truth category id -> its name; panoptic: which are things.
    names: dict[int, str]
    things: frozenset[int] = field(default_factory=frozenset)


def read_coco(url: str, storage_options: Mapping[str, Any] | None,
              model_names: Collection[str]) -> CocoTruth:
    """Read and check a COCO instances or panoptic JSON; categories matched to the model's
    labels by name."""
    data = _json(_read(url, storage_options, MAX_TRUTH_JSON_BYTES, "the truth"), url)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise EvalError(f"{url} is not COCO: it needs 'images' and 'categories' lists")
    annotations = data.get("annotations")
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise EvalError(f"{url} is not COCO: it needs an 'annotations' list of objects")
    kind = "panoptic" if annotations and all("segments_info" in a for a in annotations) else "instance"
    if kind == "instance" and not all("segmentation" in a for a in annotations):
        raise EvalError(f"{url} is neither COCO instances (each annotation a 'segmentation') nor "
                        "COCO panoptic (each a 'segments_info')")
    names: dict[int, str] = {}
    things = set()
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not _whole(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise EvalError(f"{url}: a category without a whole 'id' and a 'name': {str(cat)[:80]}")
        if cat["id"] in names:
            raise EvalError(f"{url}: category id {cat['id']} is listed twice")
        if cat["name"] in names.values():
            raise EvalError(f"{url}: two categories are named {cat['name']!r}")
        names[cat["id"]] = cat["name"]
        check_known(cat["name"], model_names, f"{url}: the truth's category")
        if cat.get("isthing", 0) not in (0, 1) or isinstance(cat.get("isthing"), bool):
            raise EvalError(f"{url}: category {cat['name']!r} has isthing {cat['isthing']!r}, not 0 or 1")
        if cat.get("isthing") == 1:
            things.add(cat["id"])
    images = _coco_images(url, data["images"])
    checker = _AnnotationChecker(url, {i.id: i for i in images}, names)
    if kind == "panoptic":
        for ann in annotations:
            checker.panoptic(ann)
        for image in images:
            image.scorable = image.annotation is not None
    else:
        for ann in annotations:
            checker.instance(ann)
    return CocoTruth(url, kind, data, images, names, frozenset(things))


# pycocotools counts a mask's pixels in 32-bit integers: a truth image declared larger fails as an
# OverflowError, or a polygon on it gets a wrong area.
MAX_TRUTH_PIXELS = 2**31 - 1


def _coco_images(url: str, entries: list) -> list[TruthImage]:
    images = []
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for entry in entries:
        if (not isinstance(entry, dict) or not _whole(entry.get("id"))
                or not isinstance(entry.get("file_name"), str)):
            raise EvalError(f"{url}: an image without a whole 'id' and a 'file_name': {str(entry)[:80]}")
        width, height = entry.get("width"), entry.get("height")
        if not (_whole(width) and _whole(height) and width > 0 and height > 0):
            raise EvalError(f"{url}: image {entry['file_name']!r} has no positive whole width and height")
        if width * height > MAX_TRUTH_PIXELS:
            raise EvalError(f"{url}: image {entry['file_name']!r} is declared {width}x{height}, over "
                            f"{MAX_TRUTH_PIXELS} pixels: past what pycocotools' 32-bit sizes measure")
        if entry["id"] in seen_ids or entry["file_name"] in seen_names:
            raise EvalError(f"{url}: image {entry['file_name']!r} (id {entry['id']}) is listed twice")
        seen_ids.add(entry["id"])
        seen_names.add(entry["file_name"])
        images.append(TruthImage(entry["file_name"], entry["id"], width, height))
    return images


class _AnnotationChecker:
    """Checks each annotation names a known image and category and holds a mask of its image's
    size, before pycocotools (whose C code trusts what it is given) or the panoptic reader
    sees it."""

    def __init__(self, url: str, images: dict[int, TruthImage], categories: Mapping[int, str]):
        self.url, self.images, self.categories = url, images, categories
        self.ids: set[int] = set()

    def _where(self, ann: dict) -> str:
        return f"{self.url}: annotation {repr(ann.get('id', ann.get('file_name', '?')))[:40]}"

    def _image(self, ann: dict) -> TruthImage:
        image = self.images.get(ann.get("image_id")) if _whole(ann.get("image_id")) else None
        if image is None:
            raise EvalError(f"{self._where(ann)} names no image of the truth "
                            f"(image_id {ann.get('image_id')!r})")
        return image

    def _category(self, ann: dict) -> None:
        if not _whole(ann.get("category_id")) or ann["category_id"] not in self.categories:
            raise EvalError(f"{self._where(ann)} has category_id {ann.get('category_id')!r}, "
                            "which the truth's categories do not list")

    def instance(self, ann: dict) -> None:
        image = self._image(ann)
        self._category(ann)
        # COCOeval keys annotations by id, and reads id 0 as "no match".
        if not _whole(ann.get("id")) or ann["id"] < 1:
            raise EvalError(f"{self._where(ann)} has no whole 'id' of at least 1")
        if ann["id"] in self.ids:
            raise EvalError(f"{self._where(ann)}: the id is used twice")
        self.ids.add(ann["id"])
        self._crowd(ann)
        problem = segmentation_problem(ann["segmentation"], image.height, image.width)
        if problem:
            raise EvalError(f"{self._where(ann)} ({image.name!r}): {problem}")
        if "area" not in ann:  # COCOeval sorts truth into small / medium / large by it
            ann["area"] = float(mask_utils.area(_as_rle(ann["segmentation"], image.height, image.width)))
        self._area(ann, image)

    def _crowd(self, seg: dict) -> None:
        seg.setdefault("iscrowd", 0)
        if not _whole(seg["iscrowd"]) or seg["iscrowd"] not in (0, 1):
            raise EvalError(f"{self._where(seg)}: iscrowd is {seg['iscrowd']!r}, not 0 or 1")

    def _area(self, seg: dict, image: TruthImage) -> None:
        """An area the image can hold: COCOeval ignores truth outside its area ranges, so a
        wrong one changes the figures without a word."""
        area = seg.get("area")
        limit = 2 * (image.width or 0) * (image.height or 0)
        if (not isinstance(area, (int, float)) or isinstance(area, bool) or not math.isfinite(area)
                or not 0 <= area <= limit):
            raise EvalError(f"{self._where(seg)} ({image.name!r}): its area {area!r} is not a pixel count "
                            f"of a {image.width}x{image.height} image")

    def panoptic(self, ann: dict) -> None:
        image = self._image(ann)
        if image.annotation is not None:
            raise EvalError(f"{self._where(ann)}: image {image.name!r} has two panoptic annotations")
        png = ann.get("file_name")
        if not isinstance(png, str) or not is_safe_key(png):
            raise EvalError(f"{self._where(ann)}: its file_name {png!r} is not a file in the PNG folder")
        segments = ann["segments_info"]
        if not isinstance(segments, list):
            raise EvalError(f"{self._where(ann)}: segments_info must be a list")
        ids = set()
        for seg in segments:
            if not isinstance(seg, dict) or not _whole(seg.get("id")) or not 0 < seg["id"] < 1 << 24:
                raise EvalError(f"{self._where(ann)}: a segment without an id in 1..16777215")
            if seg["id"] in ids:
                raise EvalError(f"{self._where(ann)}: segment id {seg['id']} is listed twice")
            ids.add(seg["id"])
            self._category(seg)
            self._crowd(seg)
            # Checked against the PNG when the image is scored (panopticapi trusts it).
            if not _whole(seg.get("area")):
                raise EvalError(f"{self._where(ann)}: segment {seg['id']} has no whole 'area'")
            self._area(seg, image)
        image.annotation = ann


def segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """Why ``segm`` is not a COCO mask of a ``height`` × ``width`` image (None if it is one)."""
    if isinstance(segm, list):
        if not segm:
            return "an empty polygon list"
        for poly in segm:
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in poly)):
                return "a polygon must be a list of at least 3 finite x, y pairs"
            # pycocotools rasterises a polygon edge in steps of a pixel: a point 1e8 pixels out
            # takes gigabytes (and a crash) before clipping.
            xs, ys = poly[0::2], poly[1::2]
            if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
                return "a polygon point lies far outside the image"
        return None
    size = segm.get("size") if isinstance(segm, dict) else None
    if not isinstance(size, list) or not all(_whole(v) for v in size) or size != [height, width]:
        return f"its RLE is not of size [{height}, {width}] (the image's height and width)"
    counts = segm.get("counts")
    if isinstance(counts, list):
        ok = all(_whole(c) and c >= 0 for c in counts) and sum(counts) == height * width
    elif isinstance(counts, str):
        ok = rle_length(counts) == height * width
    else:
        ok = False
    return None if ok else "its RLE counts do not cover the image exactly"


def _as_rle(segm: Any, height: int, width: int) -> dict:
    """A checked segmentation as one compressed RLE (pycocotools' own conversions)."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return {"size": segm["size"], "counts": segm["counts"].encode("ascii")}


def rle_length(counts: str) -> int | None:
    """The pixels a COCO compressed RLE string covers (None if it is not one).

    pycocotools decodes a string whose runs fall short of its size without complaint, into
    memory it never wrote; so a truth's strings are measured first. The format (``rleToString``
    in COCO's maskApi.c): each run in 6-bit groups of 5 data bits, offset by 48, bit 0x20
    meaning "more", bit 0x10 of the last group the sign; runs after the second are stored as
    differences from the run two before.
    """
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        c = ord(char) - 48
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1F) << (5 * shift)
        shift += 1
        if c & 0x20:
            continue
        if c & 0x10:
            value -= 1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        value = shift = 0
    return None if shift else sum(runs)


# -- PNG folders -------------------------------------------------------------------------------


class PngFolder:
    """A folder of truth PNGs, read with the run's guards: regular files only, at most
    ``max_bytes`` each, and of the size the output says their image has (checked from the
    header, before any pixel is decoded)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None, max_bytes: int, what: str):
        self.url, self.storage_options, self.max_bytes, self.what = url, storage_options, max_bytes, what
        self.base = _uri(url, storage_options).rstrip("/")

    def uri(self, name: str) -> str:
        return f"{self.base}/{name}"

    def read(self, uri: str, width: int, height: int, mode: str) -> np.ndarray:
        """The PNG at ``uri`` as an array; ``mode`` ``"id"``: one channel as it is (8 or 16
        bits, a palette's indices), ``"rgb"``: COCO panoptic ids (R + 256·G + 256²·B)."""
        try:
            data = read_bytes(uri, self.storage_options, self.max_bytes)
        except FileNotFoundError:
            raise EvalError(f"{self.what} {uri} is missing") from None
        except (Unreadable, OSError) as exc:
            raise EvalError(f"cannot read {self.what} {uri}: {one_line(exc)}") from exc
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format != "PNG":
                    raise EvalError(f"{self.what} {uri} is not a PNG")
                if image.size != (width, height):
                    raise EvalError(f"{self.what} {uri} is {image.size[0]}x{image.size[1]}, "
                                    f"its image {width}x{height}")
                return _pixels(image, mode, uri, self.what)
        except EvalError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise EvalError(f"{self.what} {uri} cannot be decoded: {one_line(exc)}") from exc

    def listing(self) -> Iterator[tuple[str, str]]:
        """(name without ``.png``, URI) of every PNG under the folder, recursively, as a job's
        listing walks (regular files and links to them; FIFOs and devices skipped with a
        warning). A name no key can have is skipped with a warning too."""
        # The listing's progress lines are a job's; here they would only precede the report.
        sources_log = logging.getLogger(iter_listing.__module__)
        level = sources_log.level
        sources_log.setLevel(max(level, logging.WARNING))
        try:
            for ref in iter_listing(self.url, storage_options=self.storage_options, extensions=("png",)):
                if ref.error:
                    log.warning("skipping %s: no image key can have its name", ref.uri)
                    continue
                yield ref.key[: -len(".png")], ref.uri
        except SourceError as exc:
            raise EvalError(f"{self.what}: {exc}") from exc
        finally:
            sources_log.setLevel(level)


def _pixels(image: Image.Image, mode: str, uri: str, what: str) -> np.ndarray:
    if mode == "rgb":
        if image.mode not in ("RGB", "RGBA"):
            raise EvalError(f"{what} {uri} is {image.mode}, not RGB (COCO panoptic ids)")
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint32)
        return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)
    if image.mode not in ("1", "L", "P", "I;16", "I;16B", "I"):  # "1": 1-bit, labels 0 and 1
        bands = len(image.getbands())
        raise EvalError(f"{what} {uri} is a {image.mode} image of {bands} channels: a label PNG has one "
                        "(pixel = label id)")
    array = np.asarray(image)
    if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
        raise EvalError(f"{what} {uri} has label ids outside 0..65535")
    return array.astype(np.int64)


def panoptic_folder(truth: CocoTruth, masks: str | None) -> str:
    """Where a panoptic truth's PNGs are: ``masks``, or the JSON's URL without ``.json``."""
    if masks:
        return masks
    if not truth.url.endswith(".json"):
        raise EvalError(f"give the folder of {truth.url}'s PNGs with --truth-masks")
    return truth.url[: -len(".json")]


# -- matching ------------------------------------------------------------------------------------
