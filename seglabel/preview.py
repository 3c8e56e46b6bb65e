"""Look at a job's labels: overlay PNGs, thumbnails and an ``index.html`` review page.

``seglabel preview OUTPUT --to DIR [--n 50] [--order review]`` takes the first N ``ok`` rows of
an output (in part order, or most doubtful first), reads each photo from its ``image_uri``,
blends its segments' label colours over it (each segment outlined in full colour, so that
touching instances of one label stay apart), writes each label and score at its segment's box
in a font scaled to the photo, and saves ``DIR/overlays/<key>.png`` at the photo's own size and
``DIR/thumbs/<key>.jpg`` within a ``THUMB``-pixel square (its labels written at that scale).

``DIR/index.html`` is the page a reviewer works from: a grid of thumbnails of one size, each
with its key, segment count, review score and a link to the full-size overlay; a legend of the
labels and their colours (the palette the Label Studio config and COCO panoptic categories
use); sorting (review score, key, segment count) and a filter by label, done in the browser by
an inline script, its state in the address's fragment (``#sort=key&label=car``), so that a view
can be linked. No network access: no external script, style or font; every link relative and
escaped, so the folder opens from disk or object storage as it is.
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from .core.config import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from .core.errors import ConfigError
from .core.labels import palette_color
from .core.redaction import get_logger
from .inputs.fetch import fetch
from .outputs.contract import checked_key
from .outputs.order import check_order
from .outputs.reader import OutputReader
from .outputs.record import JobRecord
from .storage.filesystem import options_for
from .storage.location import Destination

log = get_logger(__name__)

OVERLAY_DIR = "overlays"
THUMB_DIR = "thumbs"
INDEX_FILE = "index.html"
# Thumbnails fit in a square of this many pixels: every cell of the grid is one size.
THUMB = 256
# How much of a segment's colour shows over the photo: enough to see the region, little
# enough to see what it covers.
ALPHA = 0.5


@dataclass(frozen=True)
class Card:
    """One image on the review page: its key, its overlay's and thumbnail's relative paths,
    its labels (id -> name, in the label space shown), segment count and review score."""

    key: str
    overlay: str
    thumb: str
    labels: Mapping[int, str]
    segments: int
    review: float | None


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
    order: str = "output",
) -> list[str]:
    """Write overlays and thumbnails of the first ``n`` ok images of ``output`` and the review
    page under ``to``.

    ``storage_options`` are fsspec options for the output; images are read with
    ``image_storage_options``, or, when those are not given, with the output's options for
    images on the output's protocol (as a job often keeps both in one bucket), with the run's
    guards (``max_pixels``, ``max_bytes``: the run's defaults; give the run's own if they were
    larger). An image that cannot be read or decoded any more is skipped with a warning.
    ``label_map`` and ``unmapped`` show the segments in a team's labels (:mod:`seglabel.outputs.labelmap`);
    ``order`` ``"review"`` takes the most doubtful images first (:mod:`seglabel.core.review`).
    Returns the overlay paths written, in order. Raises :class:`~seglabel.core.errors.OutputError`
    (``ConfigError`` for ``n`` or ``order``) with one readable line.
    """
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    check_order(order)
    reader = OutputReader(output, storage_options, label_map, unmapped)
    job, space = reader.record, reader.space
    dest = Destination(to, to_storage_options)
    reader.store.refuse_inside(dest, "--to")
    written: list[str] = []
    cards: list[Card] = []
    for row in reader.ok_rows(order):
        if len(written) >= n:
            break
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
        blended = blend(photo, segments, job)
        thumb = thumbnail(photo, segments, job, blended)
        image = write_labels(blended, segments, label_font(photo.shape[1], photo.shape[0]))
        card = Card(key, f"{OVERLAY_DIR}/{key}.png", f"{THUMB_DIR}/{key}.jpg",
                    {int(s["label_id"]): s["label"] for s in segments}, len(segments), row["review_score"])
        path = dest.path(card.overlay)
        dest.write_file(path, _encoded(image, "PNG", compress_level=1))
        dest.write_file(dest.path(card.thumb), _encoded(thumb, "JPEG", quality=85))
        written.append(path)
        cards.append(card)
    page = index_html(output, job, cards)
    dest.write_file(dest.path(INDEX_FILE), page.encode("utf-8"))
    log.info("wrote %d overlays and %s", len(written), dest.path(INDEX_FILE))
    return written


def _encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def overlay(photo: np.ndarray, segments: Sequence[Mapping[str, Any]], job: JobRecord,
            font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None) -> Image.Image:
    """The photo with its segments blended over it in their labels' colours, each outlined,
    and labelled at their boxes (in a font scaled to the photo unless ``font`` is given)."""
    image = blend(photo, segments, job)
    return write_labels(image, segments, font or label_font(*image.size))


def thumbnail(photo: np.ndarray, segments: Sequence[Mapping[str, Any]], job: JobRecord,
              blended: Image.Image | None = None) -> Image.Image:
    """The overlay fitted into a ``THUMB`` square, its labels written at the thumbnail's own
    scale (a photo's labels shrunk with it would not read)."""
    image = (blended or blend(photo, segments, job)).copy()
    image.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    scale = image.width / photo.shape[1]
    shrunk = [{**seg, "bbox": [v * scale for v in seg["bbox"]]} for seg in segments]
    return write_labels(image, shrunk, label_font(0, 0))


def blend(photo: np.ndarray, segments: Sequence[Mapping[str, Any]], job: JobRecord) -> Image.Image:
    """The photo with its segments' label colours blended over it, each segment outlined."""
    height, width = photo.shape[:2]
    # owner: 1 + the index of the segment shown at each pixel, 0 = none. Instance masks
    # overlap: painted from the lowest score up, the best one shows, as in the instance PNG.
    owner = np.zeros((height, width), dtype=np.int32)
    order = range(len(segments) - 1, -1, -1) if job.task == "instance" else range(len(segments))
    for i in order:
        mask = mask_utils.decode({"size": [height, width], "counts": segments[i]["rle"].encode("ascii")})
        owner[mask.astype(bool)] = i + 1
    # Colour by label, as the legend and the Label Studio config show them; the outlines
    # (between different segments) keep touching instances of one label apart.
    colors = np.array([(0, 0, 0)] + [palette_color(int(s["label_id"])) for s in segments], dtype=np.float32)
    shown = owner > 0
    out = photo.astype(np.float32)
    out[shown] = (1 - ALPHA) * out[shown] + ALPHA * colors[owner[shown]]
    edge = shown & _boundary(owner)
    out[edge] = colors[owner[edge]]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def write_labels(image: Image.Image, segments: Sequence[Mapping[str, Any]],
                 font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """Each segment's label and score written at its box (``bbox`` in ``image``'s pixels), in
    place; returns ``image``."""
    draw = ImageDraw.Draw(image)
    taken: list[tuple[int, int, int, int]] = []
    for seg in segments:
        text = seg["label"] if seg["score"] is None else f"{seg['label']} {seg['score']:.2f}"
        x, y = int(seg["bbox"][0]), int(seg["bbox"][1])
        box = _place(draw, font, text, x, y, image.width, image.height, taken)
        taken.append(box)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((box[0] + 2, box[1] + 1), text, fill=(255, 255, 255), font=font)
    return image


def label_font(width: int, height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at a size that reads at the photo's own scale: a 50th of its
    shorter side, at least 11 pixels (Pillow 10.0, which takes no size: its bitmap font)."""
    size = max(11, round(min(width, height) / 50))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


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


SORTS = {"review": "review score, most doubtful first", "key": "key", "segments": "segment count, most first"}

# The page's script: sorts and filters the cards the HTML already holds (in the order the
# preview took them, so the page reads without scripts too). The state lives in the fragment.
_SCRIPT = """
(function () {
  var grid = document.getElementById("grid");
  var cards = Array.prototype.slice.call(grid.children);
  var sort = document.getElementById("sort"), label = document.getElementById("label");
  var shown = document.getElementById("shown");
  // Label names from JSON, not from the HTML (whose parser rewrites some characters in them);
  // the select's values and the cards' data-labels are indices into this list.
  var names = JSON.parse(document.getElementById("label-names").textContent);
  function num(card, name) { return parseFloat(card.getAttribute(name)); }
  function first(name) {
    return function (a, b) { return num(b, name) - num(a, name) || num(a, "data-at") - num(b, "data-at"); };
  }
  var by = {
    review: first("data-review"),
    key: function (a, b) { return num(a, "data-key-rank") - num(b, "data-key-rank"); },
    segments: first("data-segments")
  };
  function state() {
    var p = new URLSearchParams(location.hash.slice(1));
    var asked = p.get("sort");
    var known = asked !== null && Object.prototype.hasOwnProperty.call(by, asked);
    var index = p.get("label") === null ? -1 : names.indexOf(p.get("label"));
    return {sort: known ? asked : sort.value, label: index < 0 ? "" : String(index)};
  }
  function apply() {
    var s = state();
    sort.value = s.sort;
    label.value = s.label;
    var count = 0;
    cards.slice().sort(by[sort.value]).forEach(function (card) {
      var labels = JSON.parse(card.getAttribute("data-labels"));
      var hide = label.value !== "" && labels.indexOf(Number(label.value)) < 0;
      card.hidden = hide;
      if (!hide) { count += 1; }
      grid.appendChild(card);
    });
    shown.textContent = String(count);
  }
  function update() {
    var p = new URLSearchParams();
    p.set("sort", sort.value);
    if (label.value) { p.set("label", names[Number(label.value)]); }
    history.replaceState(null, "", "#" + p.toString());
    apply();
  }
  sort.addEventListener("change", update);
  label.addEventListener("change", update);
  window.addEventListener("hashchange", apply);
  apply();
})();
"""

_STYLE = (
    "body{font-family:sans-serif;margin:1em;background:#fafafa}"
    "header p{margin:.3em 0}.controls{margin:.6em 0}.controls label{margin-right:1.5em}"
    ".legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.4em 1.2em;font-size:13px}"
    ".swatch{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em;"
    "border:1px solid #0003}"
    f".grid{{display:grid;grid-template-columns:repeat(auto-fill,{THUMB + 12}px);gap:12px}}"
    "figure{margin:0;padding:6px;background:#fff;border:1px solid #ddd}"
    f"figure img{{width:{THUMB}px;height:{THUMB}px;object-fit:contain;background:#222;display:block}}"
    "figcaption{font-size:12px;word-break:break-all;margin-top:4px}figure[hidden]{display:none}"
    ".score{font-weight:bold}"
)


def index_html(output: str, job: JobRecord, cards: Sequence[Card]) -> str:
    """The review page: a grid of ``cards`` (thumbnails of one size linking to the overlays),
    a legend of their labels' colours, and sorting (by review score at first) and filtering by
    an inline script."""
    legend: dict[int, str] = {}
    for card in cards:
        legend.update(card.labels)
    key_rank = {key: rank for rank, key in enumerate(sorted(card.key for card in cards))}
    index_of = {name: i for i, name in enumerate(sorted(set(legend.values())))}
    figures = [_figure(at, card, key_rank[card.key], index_of) for at, card in enumerate(cards)]
    legend_items = "".join(
        f'<li><span class="swatch" style="background:#{bytes(palette_color(label_id)).hex()}"></span>'
        f"{html.escape(name)}</li>"
        for label_id, name in sorted(legend.items(), key=lambda item: item[1])
    )
    sort_options = "".join(f'<option value="{name}">{html.escape(text)}</option>'
                           for name, text in SORTS.items())
    names = sorted(set(legend.values()))
    label_options = '<option value="">all labels</option>' + "".join(
        f'<option value="{i}">{html.escape(name)}</option>' for i, name in enumerate(names))
    # JSON inside a script element: "<" escaped, so that no name can close the element.
    names_json = json.dumps(names).replace("<", "\\u003c")
    title = f"seglabel preview: {output}"
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        # Nothing but the thumbnails beside it (served, or opened from disk: file:) and its own
        # inline style and script: no other request leaves the page, whatever a name holds.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' file:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style></head><body>\n"
        f"<header><h1>{html.escape(title)}</h1>\n"
        f"<p>{html.escape(job.task)} labels by {html.escape(job.model_version)}; "
        f"<span id=\"shown\">{len(cards)}</span> of {len(cards)} images shown</p>\n"
        f'<div class="controls"><label>sort by <select id="sort">{sort_options}</select></label>'
        f'<label>label <select id="label">{label_options}</select></label></div>\n'
        f'<ul class="legend">{legend_items}</ul></header>\n'
        '<main class="grid" id="grid">\n' + "\n".join(figures) + "\n</main>\n"
        f'<script type="application/json" id="label-names">{names_json}</script>\n'
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def _figure(at: int, card: Card, key_rank: int, index_of: Mapping[str, int]) -> str:
    """One card: its thumbnail linking to the full-size overlay, key, segment count and review
    score; its data attributes hold what the script sorts and filters by (its labels as indices
    into the page's list of names, ``index_of``)."""
    overlay_link = html.escape(quote(card.overlay, safe="/"), quote=True)
    thumb_link = html.escape(quote(card.thumb, safe="/"), quote=True)
    names = sorted(set(card.labels.values()))
    review = "-1" if card.review is None else repr(float(card.review))
    shown = "none" if card.review is None else f"{card.review:.3f}"
    attrs = {
        "data-at": str(at), "data-key-rank": str(key_rank), "data-segments": str(card.segments),
        "data-review": review, "data-labels": json.dumps(sorted(index_of[name] for name in names)),
    }
    attributes = " ".join(f'{name}="{html.escape(value, quote=True)}"' for name, value in attrs.items())
    return (
        f"<figure {attributes}><a href=\"{overlay_link}\">"
        f'<img src="{thumb_link}" width="{THUMB}" height="{THUMB}" loading="lazy" '
        f'alt="{html.escape(card.key)}"></a>'
        f"<figcaption>{html.escape(card.key)}<br>{card.segments} segments · review "
        f'<span class="score">{shown}</span> · <a href="{overlay_link}">full size</a><br>'
        f"<small>{html.escape(', '.join(names) or 'no segments')}</small></figcaption></figure>"
    )


__all__ = ["Card", "blend", "index_html", "label_font", "overlay", "preview", "thumbnail", "write_labels"]
