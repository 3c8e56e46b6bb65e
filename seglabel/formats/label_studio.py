"""Label Studio: a JSON list of tasks a shard, each with one prediction of ``brushlabels``
(Label Studio's own brush RLE, :func:`label_studio_rle`) or ``polygonlabels`` results, and the
labeling config that shows them (:func:`labeling_config`, beside the tasks).

A task's prediction ``score`` is one minus the row's review score (Label Studio takes it for
confidence and serves the lowest first) and its data holds ``review_score`` itself; image URIs
can be rewritten by prefix for a server that cannot read ``s3://`` (``--image-prefix-map``).
"""

from __future__ import annotations

import posixpath
import unicodedata
from typing import IO, Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np
from pycocotools import mask as mask_utils

from ..core.errors import ExportError
from ..core.labels import palette_color
from ..core.redaction import get_logger
from .polygons import outline
from .writer import ExportRun, JsonArray, Writer

log = get_logger(__name__)


# Label Studio's brush RLE (label_studio_converter.brush.encode_rle, after thi.ng/rle-pack): a
# bit stream of a 32-bit value count, a 5-bit word size - 1, four 4-bit run-length field sizes
# - 1, then chunks "1 | size index (2 bits) | count - 1 | word" (a repeated word) or
# "0 | size index | count - 1 | words" (literal words), padded to whole bytes.
_LS_WORD = 8
_LS_RLE_SIZES = (3, 4, 8, 16)
_LS_HEADER_TAIL = f"{_LS_WORD - 1:05b}" + "".join(f"{s - 1:04b}" for s in _LS_RLE_SIZES)
_LS_MAX_RUN = 1 << _LS_RLE_SIZES[-1]


def _ls_run(count: int, word: str) -> str:
    """The chunk of one repeated word, ``count`` ≤ 2**16 times."""
    c = count - 1
    if c < 1 << _LS_RLE_SIZES[0]:
        return f"100{c:03b}{word}"
    if c < 1 << _LS_RLE_SIZES[1]:
        return f"101{c:04b}{word}"
    if c < 1 << _LS_RLE_SIZES[2]:
        return f"110{c:08b}{word}"
    return f"111{c:016b}{word}"


def label_studio_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush ``rle`` of a binary (H, W) mask.

    Label Studio stores a brush mask as the RGBA 8-bit image flattened row by row, every
    channel 255 inside the mask and 0 outside (what ``label_studio_converter.brush.mask2rle``
    encodes). Runs are found on the H×W mask, each pixel being 4 equal bytes, so the 4·H·W
    array is never built.
    """
    flat = np.ascontiguousarray(mask).reshape(-1) != 0
    n = 4 * flat.size
    if n >= 1 << 32:
        raise ExportError(f"a {mask.shape[1]}x{mask.shape[0]} mask is too large for Label Studio's brush RLE")
    bits = [f"{n:032b}", _LS_HEADER_TAIL]
    if flat.size:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate(([0], change))
        lengths = np.diff(np.concatenate((starts, [flat.size]))) * 4
        for length, inside in zip(lengths.tolist(), flat[starts].tolist()):
            word = "11111111" if inside else "00000000"
            while length > 0:
                chunk = min(length, _LS_MAX_RUN)
                bits.append(_ls_run(chunk, word))
                length -= chunk
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return np.packbits(np.frombuffer(text.encode("ascii"), dtype=np.uint8) - ord("0")).tolist()


class _UriMap:
    """Rewrites image URIs by prefix (longest prefix wins), for tools that cannot read s3://."""

    def __init__(self, mapping: Mapping[str, str] | None):
        self.pairs = sorted((mapping or {}).items(), key=lambda kv: len(kv[0]), reverse=True)
        self._warned = False

    def __call__(self, uri: str) -> str:
        for old, new in self.pairs:
            if uri.startswith(old):
                rest = uri[len(old):]
                if new.startswith(("http://", "https://", "/")) and not old.startswith(("http://", "https://")):
                    # A key with spaces, '#', '?', '&' or '+' is a valid object name but not a
                    # valid URL path or query value (Label Studio's local files take the path in
                    # "?d="): encoded, it reads back as the key.
                    rest = quote(rest, safe="/")
                return new + rest
        if uri.startswith("file://") and not self._warned:
            self._warned = True
            log.warning(
                "image URIs are local files (%s): Label Studio cannot open file:// URLs; map them "
                "with --image-prefix-map, e.g. file:///data/=/data/local-files/?d=", uri
            )
        return uri


class LabelStudioWriter(Writer):
    """Label Studio: a JSON list of tasks a shard, each with one prediction of ``brushlabels``
    results in Label Studio's own brush RLE."""

    def __init__(self, run: ExportRun):
        super().__init__(run)
        self.uri: Callable[[str], str] = _UriMap(run.options.image_prefix_map)

    def write(self, rows: Iterator[dict]) -> None:
        """The tasks, then the labeling config that shows them (``<DEST stem>.labeling-config.xml``):
        every label the export can hold (``--labels``' or all), so that annotators can also draw
        what the model missed."""
        super().write(rows)
        path = posixpath.splitext(self.run.dest.root)[0] + ".labeling-config.xml"
        kept = self.run.keep.label_ids
        labels = {i: name for i, name in self.run.reader.space.names.items() if kept is None or i in kept}
        config = labeling_config(labels, self.run.options.mask_format, self.run.options.from_name,
                                 self.run.options.to_name)
        self.run.dest.write_file(path, config.encode("utf-8"))
        self.run.counts["labeling_config"] = path

    def write_shard(self, out: IO[bytes], rows: Iterable[dict]) -> None:
        out.write(b"[")
        tasks = JsonArray(out)
        for row in rows:
            task = self.task(row)
            tasks.add(task)
            self.run.counts["images"] += 1
            self.run.counts["annotations"] += len(task["predictions"][0]["result"])
        out.write(b"\n]\n")

    def task(self, row: dict) -> dict:
        """One image's Label Studio task, its segments as one prediction."""
        width, height = row["width"], row["height"]
        results = []
        for seg in self.run.keep.apply(row["segments"]):
            mask = mask_utils.decode({"size": [height, width], "counts": seg["rle"].encode("ascii")})
            base: dict[str, Any] = {
                "from_name": self.run.options.from_name,
                "to_name": self.run.options.to_name,
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
            }
            if seg["score"] is not None:
                base["score"] = round(float(seg["score"]), 6)
            results += [{"id": f"seg{seg['id']}{suffix}", **base, **value}
                        for suffix, value in self.regions(mask, seg["label"])]
        model_version = self.run.reader.record.model_version
        prediction: dict[str, Any] = {"model_version": model_version, "result": results}
        data = {"image": self.uri(row["image_uri"]), "key": row["key"]}
        if row.get("review_score") is not None:
            # Label Studio reads a prediction's score as the model's confidence: its uncertainty
            # sampling serves the lowest first (projects/functions/next_task.py orders by
            # predictions__score). 1 - review score puts the most doubtful first there; the
            # review score itself is a data column the Data Manager shows and sorts by. A row
            # written before seglabel had it carries neither.
            prediction["score"] = round(1.0 - float(row["review_score"]), 6)
            data["review_score"] = round(float(row["review_score"]), 6)
        return {"data": data, "predictions": [prediction]}

    def regions(self, mask: np.ndarray, label: str) -> list[tuple[str, dict]]:
        """A segment's Label Studio regions (id suffix, type and value): one brush mask, or one
        polygon per outer contour, in percent of the image, holes filled (a Label Studio
        polygon has none)."""
        if self.run.options.mask_format == "rle":
            return [("", {"type": "brushlabels",
                          "value": {"format": "rle", "rle": label_studio_rle(mask), "brushlabels": [label]}})]
        height, width = mask.shape
        shape = outline(mask, self.run.options.polygon_tolerance)
        return [(f"-{k}", {"type": "polygonlabels", "value": {
                    "points": [[round(float(x) * 100 / width, 4), round(float(y) * 100 / height, 4)]
                               for x, y in polygon],
                    "closed": True, "polygonlabels": [label]}})
                for k, polygon in enumerate(shape.polygons)]


def labeling_config(labels: Mapping[int, str], mask_format: str, from_name: str, to_name: str) -> str:
    """The Label Studio labeling config for tasks of these labels (id -> name): an Image tag named
    ``to_name`` over ``$image``, and BrushLabels (RLE) or PolygonLabels named ``from_name`` with a
    Label per label value, coloured as the label's palette colour (as COCO panoptic's
    categories). Label Studio shows no prediction whose labels its config lacks."""
    tag = "PolygonLabels" if mask_format == "polygon" else "BrushLabels"
    first = {}  # a name two labels share (as Unicode text: NFC) is one Label, its first id's colour
    for label_id, name in sorted(labels.items()):
        first.setdefault(unicodedata.normalize("NFC", name), label_id)
    items = "".join(
        f"    <Label value={quoteattr(name)} background=\"#{bytes(palette_color(label_id)).hex()}\"/>\n"
        for name, label_id in first.items())
    control = f"<{tag} name={quoteattr(from_name)} toName={quoteattr(to_name)}>"
    return (f"<View>\n  <Image name={quoteattr(to_name)} value=\"$image\" zoom=\"true\"/>\n"
            f"  {control}\n{items}  </{tag}>\n</View>\n")
