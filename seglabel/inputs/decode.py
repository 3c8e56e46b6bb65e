"""Decode stage: image bytes -> upright RGB uint8 array, on CPU workers.

Plain Python, no Ray: a worker calls :func:`decode_image` on each object's bytes and turns a
:class:`DecodeError` into a status row ``error = "decode: <reason>"``. Only bad input bytes
become ``DecodeError``; misuse (a ``str`` instead of ``bytes``, a bad argument) raises as usual.

Decisions worth knowing:

* The pixel limit is checked on the header's size before any pixel is decoded, so a
  decompression bomb costs a header parse. Pillow's own process-wide bomb check
  (``PIL.Image.MAX_IMAGE_PIXELS``) is lifted only inside a module lock, for the header parse of
  every image and for the load of the rare image above Pillow's limit, then restored: the
  caller's per-call ``max_pixels`` is the only limit, and Pillow's DecompressionBombWarning
  never fires for an image that limit accepts. Other threads calling Pillow directly during
  that short window see no Pillow limit.
* EXIF orientation (or XMP ``tiff:Orientation``, as Pillow reads it) is honoured, with the
  transposes of ``ImageOps.exif_transpose``. The orientation is read from the metadata that
  precedes the pixel data, so :func:`image_size` never decodes pixels and always agrees with
  :func:`decode_image`; an eXIf chunk placed after a PNG's image data (the PNG spec puts it
  before) is ignored. Unreadable EXIF means "not rotated": the pixels are still good.
* Alpha is dropped, not composited: transparent pixels keep whatever colour they store.
  Segmentation models see the stored colours, and no background colour is right for all.
* 16-bit greyscale is scaled to 8 bits (65535 -> 255), not clamped as Pillow's ``convert``
  does; float images whose finite values all lie in [0, 1] (the usual convention for floats;
  within ``UNIT_SLACK``) are scaled to 0..255, others clipped to 0..255. No colour management:
  ICC profiles are ignored.
* Multi-frame files (GIF, WebP, TIFF, APNG, MPO) give their first frame.
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import zlib
from typing import Iterator

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from ..core.config import DEFAULT_MAX_PIXELS
from ..core.errors import DecodeError
from ..core.redaction import get_logger

logger = get_logger(__name__)


# What Pillow raises for bad data (the set its own fuzz tests accept). TypeError, KeyError and
# friends are left alone: from here they mean a bug, not a bad file.
_BAD_DATA: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    NotImplementedError,
    OverflowError,
    MemoryError,
    Image.DecompressionBombError,
)

# EXIF orientation -> transpose giving the upright image, as in ImageOps.exif_transpose.
_UPRIGHT: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

# How far outside [0, 1] a float image's values may stray and still be taken as fractions.
UNIT_SLACK = 0.02
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})

_PILLOW_LIMIT_LOCK = threading.Lock()


def decode_image(
    data: bytes,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 C-contiguous RGB of the upright image.

    ``data`` is the whole encoded file. ``max_pixels`` bounds width * height as the header
    states it (``None``: no limit); a larger image fails before its pixels are decoded.
    ``draft`` is an optional (width, height), in upright orientation, that a JPEG may be
    decoded down to with libjpeg's DCT scaling (1/2, 1/4, 1/8): each side stays >= the
    requested one where the image allows, the pixels differ from a full decode, and the
    decoded size is not the image's size, so take the original size from :func:`image_size`.
    Other formats ignore ``draft``.

    The array is read-only; copy it before writing in place. Raises :class:`DecodeError` for
    empty, unidentifiable, truncated, corrupt or too-large images.
    """
    _check_data(data)
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels!r}")
    if draft is not None and (len(draft) != 2 or min(draft) < 1):
        raise ValueError(f"draft must be a (width, height) of positive ints, got {draft!r}")

    with _bad_data_as_decode_error(), _open(data) as im:
        pixels = im.width * im.height
        if max_pixels is not None and pixels > max_pixels:
            raise DecodeError(f"image too large: {pixels} pixels > limit {max_pixels}")
        if im.format == "PNG":
            _check_png_data(data)
        orientation = _orientation(im)
        if draft is not None and im.format in ("JPEG", "MPO"):
            # draft() works on the stored image, which is sideways for orientations 5 to 8.
            im.draft("RGB", draft[::-1] if orientation in _SWAPS_AXES else draft)
        # Force the full decode here: a lazy load would let truncation surface later, outside
        # this error handling (and LOAD_TRUNCATED_IMAGES stays False, so it does surface).
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if pillow_limit is not None and pixels > pillow_limit:
            # Some loaders (TIFF, ICO, ...) re-check Pillow's limit while loading.
            with _pillow_limit_lifted():
                im.load()
        else:
            im.load()
        upright = im.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else im
        out = _to_rgb(upright)
    out.flags.writeable = False
    return out


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the upright image from the header alone (EXIF orientation applied),
    without decoding pixels."""
    _check_data(data)
    with _bad_data_as_decode_error(), _open(data) as im:
        width, height = im.size
        return (height, width) if _orientation(im) in _SWAPS_AXES else (width, height)


# Deflate expands data at most about 1032 times (a 258-byte match per two bits, at best).
_INFLATE_MAX_RATIO = 1032
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 20


def _png_raw_size(width: int, height: int, depth: int, color: int, interlaced: bool) -> int:
    """Bytes the IDAT stream must inflate to: every row of every pass, with its filter byte."""
    bits = _PNG_CHANNELS.get(color, 4) * depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if columns and rows:
            total += rows * (1 + -(-columns * bits // 8))
    return total


def _check_png_data(data: bytes) -> None:
    """Refuse a PNG whose image data cannot make the image its header declares, before Pillow
    allocates it: a 150-byte file may declare 13000 × 13000 pixels, which Pillow decodes
    "successfully" to half a gigabyte of zeros, as it does any image whose zlib stream ends
    early. The stream is inflated here a MiB at a time, only to count its bytes."""
    view = memoryview(data)  # slices without copies: the data of a large PNG is megabytes
    pos, header, compressed = 8, None, []
    while pos + 8 <= len(view):
        length, kind = struct.unpack_from(">I4s", view, pos)
        if kind == b"IHDR" and length >= 13 and pos + 21 <= len(view):
            header = struct.unpack_from(">IIBBBBB", view, pos + 8)
        elif kind == b"IDAT":
            compressed.append(view[pos + 8 : pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        return  # Pillow says what is wrong with it
    width, height, depth, color, _, _, interlace = header
    expected = _png_raw_size(width, height, depth, color, bool(interlace))
    if expected > _INFLATE_MAX_RATIO * sum(len(c) for c in compressed) + 1024:
        raise DecodeError("truncated image")  # too little data to hold what the header says
    inflate, produced = zlib.decompressobj(), 0
    try:
        for chunk in compressed:
            produced += len(inflate.decompress(chunk, _INFLATE_STEP))
            while inflate.unconsumed_tail and produced < expected:
                produced += len(inflate.decompress(inflate.unconsumed_tail, _INFLATE_STEP))
            if produced >= expected:
                return
    except zlib.error:
        return  # corrupt: Pillow says how
    raise DecodeError("truncated image")


def _check_data(data: bytes) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    if len(data) == 0:
        raise DecodeError("empty file")


@contextlib.contextmanager
def _pillow_limit_lifted() -> Iterator[None]:
    # The lock keeps concurrent decodes from restoring each other's value; see module docstring.
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(data: bytes) -> Image.Image:
    # Header only: Image.open reads no pixel data, so the lock is held briefly.
    with _pillow_limit_lifted():
        return Image.open(io.BytesIO(data))


@contextlib.contextmanager
def _bad_data_as_decode_error() -> Iterator[None]:
    try:
        yield
    except _BAD_DATA as e:
        reason = _reason(e)
        logger.debug("decode failed: %s (%s: %s)", reason, type(e).__name__, e)
        raise DecodeError(reason) from e


def _reason(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):
        # Pillow's message embeds the BytesIO's repr, an address that differs on every call.
        return "cannot identify image"
    if isinstance(e, MemoryError):
        return "out of memory"
    text = " ".join(str(e).split())
    if isinstance(e, Image.DecompressionBombError):
        return f"image too large: {text}"
    if isinstance(e, EOFError) or "truncated" in text.lower():
        return "truncated image"
    return text[:200] or type(e).__name__


def _orientation(im: Image.Image) -> int:
    try:
        # The base method, not im.getexif(): PngImageFile's override decodes the whole image to
        # look for an eXIf chunk after the pixel data, which image_size must not do.
        value = Image.Image.getexif(im).get(ExifTags.Base.Orientation, 1)
    except _BAD_DATA as e:
        logger.debug("ignoring unreadable EXIF: %s: %s", type(e).__name__, e)
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert() clamps 16-bit values to 255, whitening most of the image; scale
        # instead, rounding to nearest. Mode "I" is taken to hold 16-bit data, as it does when
        # it comes from 16-bit PNG/TIFF/PGM; anything outside 0..65535 is clipped.
        wide = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    elif im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= -UNIT_SLACK and finite.max() <= 1.0 + UNIT_SLACK:
            # Floats in [0, 1] are intensities as fractions: clipped to 0..255 they were black.
            # Judged on the finite values, with a little slack: one stray inf, or a resampling
            # overshoot to 1.01, must not black out the rest of the image.
            values = values * 255.0
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        # Transparency is dropped anyway; leaving it makes convert() warn for a palette whose
        # tRNS holds partial alphas.
        im.info.pop("transparency", None)
        # Covers L, LA, P, PA, RGBA, CMYK (Pillow has already undone Adobe's inversion), YCbCr,
        # 1 and the rest of what convert() knows.
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    return np.ascontiguousarray(np.broadcast_to(gray[..., None], (*gray.shape, 3)))
