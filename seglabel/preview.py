"""Look at a job's labels: overlay PNGs and an ``index.html`` contact sheet.

``seglabel preview OUTPUT --to DIR [--n 50]`` takes the first N ``ok`` rows of an output (in
part order), reads each photo from its ``image_uri``, blends the segments' colours over it
(with each segment's outline in full colour), writes its label and score at the segment's box
with Pillow's default font, and saves ``DIR/overlays/<key>.png`` at the photo's own size. A
contact sheet, ``DIR/index.html``, links every overlay with relative, escaped links, so the
folder can be opened from disk, copied, or served as it is.
"""

from __future__ import annotations

import html
import io
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from .config import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ConfigError
from .errors import get_logger
from .fetch import fetch, options_for
from .labelmap import LabelSpace
from .labels import palette_color
from .record import JobRecord, open_output
from .sink import LABEL_COLUMNS, Destination, checked_key

log = get_logger(__name__)

OVERLAY_DIR = "overlays"
INDEX_FILE = "index.html"
# How much of a segment's colour shows over the photo: enough to see the region, little
# enough to see what it covers.
ALPHA = 0.5


# Keyword options, one per flag of `seglabel preview` (three places' storage options).
def preview(
    output: str,
    to: str,
    *,
    n: int = 50,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    storage_options: Mapping[str, Any] | None = None,
    image_storage_options: Mapping[str, Any] | None = None,
    to_storage_options: Mapping[str, Any] | None = None,
    label_map: str | None = None,
    unmapped: str = "drop",
) -> list[str]:
    """Write overlays of the first ``n`` ok images of ``output`` and an index under ``to``.

    ``storage_options`` are fsspec options for the output; images are read with
    ``image_storage_options``, or, when those are not given, with the output's options for
    images on the output's protocol (as a job often keeps both in one bucket), with the run's
    guards (``max_pixels``, ``max_bytes``: the run's defaults; give the run's own if they were
    larger). An image that cannot be read or decoded any more is skipped with a warning.
    ``label_map`` and ``unmapped`` show the segments in a team's labels (:mod:`seglabel.labelmap`).
    Returns the overlay paths written, in order. Raises :class:`~seglabel.sink.OutputError`
    (``ConfigError`` for ``n``) with one readable line.
    """
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    store, job = open_output(output, storage_options)
    space = LabelSpace.of_output(job, label_map, unmapped, (output, storage_options))
    dest = Destination(to, to_storage_options)
    font = ImageFont.load_default()
    written: list[str] = []
    entries: list[tuple[str, str, list[str]]] = []  # (key, relative link, labels), at most n
    for row in store.iter_rows(LABEL_COLUMNS, batch_size=64):
        if len(written) >= n:
            break
        if row["status"] != "ok":
            continue
        key = checked_key(row["key"])
        uri = row["image_uri"]
        options = (
            image_storage_options
            if image_storage_options is not None
            else options_for(uri, output, storage_options or {})
        )
        # The run's guards: a regular file, a bounded size, a bounded number of pixels (a small
        # PNG may declare 16000x16000: 768 MB decoded).
        fetched = fetch(uri, options, max_pixels=max_pixels, max_bytes=max_bytes)
        if fetched.image is None:
            log.warning("skipping %s: cannot read its image %s: %s", key, uri, fetched.error)
            continue
        photo = fetched.image
        if photo.shape[:2] != (row["height"], row["width"]):
            log.warning(
                "skipping %s: its image is now %dx%d, the labels are for %dx%d",
                key, photo.shape[1], photo.shape[0], row["width"], row["height"],
            )
            continue
        segments, _ = space.apply(row)
        image = overlay(photo, segments, job, font)
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        rel = f"{OVERLAY_DIR}/{key}.png"
        path = dest.path(rel)
        dest.write_file(path, buf.getvalue())
        written.append(path)
        entries.append((key, rel, sorted({s["label"] for s in segments})))
    dest.write_file(dest.path(INDEX_FILE), index_html(output, job, entries).encode("utf-8"))
    log.info("wrote %d overlays and %s", len(written), dest.path(INDEX_FILE))
    return written


def overlay(photo: np.ndarray, segments: Sequence[Mapping[str, Any]], job: JobRecord,
            font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None) -> Image.Image:
    """The photo with its segments blended over it, outlined, and labelled at their boxes."""
    height, width = photo.shape[:2]
    # owner: 1 + the index of the segment shown at each pixel, 0 = none. Instance masks
    # overlap: painted from the lowest score up, the best one shows, as in the instance PNG.
    owner = np.zeros((height, width), dtype=np.int32)
    order = range(len(segments) - 1, -1, -1) if job.task == "instance" else range(len(segments))
    for i in order:
        mask = mask_utils.decode({"size": [height, width], "counts": segments[i]["rle"].encode("ascii")})
        owner[mask.astype(bool)] = i + 1
    # Colour by segment id: adjacent instances of one label stay apart (semantic ids are labels).
    colors = np.array([(0, 0, 0)] + [palette_color(int(s["id"])) for s in segments], dtype=np.float32)
    shown = owner > 0
    out = photo.astype(np.float32)
    out[shown] = (1 - ALPHA) * out[shown] + ALPHA * colors[owner[shown]]
    edge = shown & _boundary(owner)
    out[edge] = colors[owner[edge]]
    image = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image)
    font = font or ImageFont.load_default()
    taken: list[tuple[int, int, int, int]] = []
    for seg in segments:
        text = seg["label"] if seg["score"] is None else f"{seg['label']} {seg['score']:.2f}"
        x, y = int(seg["bbox"][0]), int(seg["bbox"][1])
        box = _place(draw, font, text, x, y, width, height, taken)
        taken.append(box)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((box[0] + 2, box[1] + 1), text, fill=(255, 255, 255), font=font)
    return image


def _boundary(owner: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another owner (or the image's edge)."""
    edge = np.zeros(owner.shape, dtype=bool)
    edge[1:, :] |= owner[1:, :] != owner[:-1, :]
    edge[:-1, :] |= owner[:-1, :] != owner[1:, :]
    edge[:, 1:] |= owner[:, 1:] != owner[:, :-1]
    edge[:, :-1] |= owner[:, :-1] != owner[:, 1:]
    return edge


def _place(draw: ImageDraw.ImageDraw, font, text: str, x: int, y: int, width: int, height: int,
           taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """A label's box just above the segment's box at (x, y) (inside it when there is no room
    above, so a small segment is not hidden under its own label), kept inside the image and
    moved down past labels already placed there (many instances share a corner)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - min(top, 0) + 3
    x = max(0, min(x, width - w))
    y = y - h if y >= h else y
    for _ in range(50):
        y0 = max(0, min(y, height - h))
        box = (x, y0, x + w - 1, y0 + h - 1)
        if not any(_overlaps(box, other) for other in taken):
            return box
        y = y0 + h
    return box


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def index_html(output: str, job: JobRecord, entries: Sequence[tuple[str, str, list[str]]]) -> str:
    """The contact sheet: every overlay as a thumbnail linking to it (relative, escaped)."""
    figures = []
    for key, rel, labels in entries:
        link = html.escape(quote(rel, safe="/"), quote=True)
        figures.append(
            f'<figure><a href="{link}"><img src="{link}" loading="lazy" alt="{html.escape(key)}"></a>'
            f"<figcaption>{html.escape(key)}<br>"
            f"<small>{html.escape(', '.join(labels) or 'no segments')}</small>"
            "</figcaption></figure>"
        )
    title = f"seglabel preview: {output}"
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>\n<style>"
        "body{font-family:sans-serif;margin:1em}"
        ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:12px}"
        "figure{margin:0}img{width:100%;height:auto;display:block}"
        "figcaption{font-size:12px;word-break:break-all}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f"<p>{html.escape(job.task)} labels by {html.escape(job.model_version)}; {len(entries)} images</p>\n"
        "<div class=\"grid\">\n" + "\n".join(figures) + "\n</div>\n</body></html>\n"
    )


__all__ = ["index_html", "overlay", "preview"]
