"""Decode stage: bad bytes become DecodeError with a short reason; odd valid files become upright RGB."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from helpers import encode, huge_png, oriented
from seglabel.core.errors import DecodeError
from seglabel.inputs.decode import DEFAULT_MAX_PIXELS, decode_image, image_size

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def rgb(color, shape) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.uint8), (*shape, 3))


def gray3(values) -> np.ndarray:
    return np.repeat(np.array(values, np.uint8)[..., None], 3, axis=2)


def marked(height: int, width: int) -> np.ndarray:
    """Grey image with a red top-left and a blue top-right block (8-aligned, JPEG-friendly)."""
    a = np.full((height, width, 3), 128, np.uint8)
    a[:8, :8] = RED
    a[:8, -8:] = BLUE
    return a


_PHOTO = skdata.astronaut()
_JPEG = encode(Image.fromarray(_PHOTO), "JPEG")
_PNG = encode(Image.fromarray(_PHOTO), "PNG")

BAD_INPUTS = {
    "zero-byte": (b"", "empty file"),
    "text-named-jpg": (b"not a photo.jpg\n" * 20, "cannot identify image"),
    "truncated-jpeg": (_JPEG[: len(_JPEG) // 2], "truncated image"),
    "truncated-png": (_PNG[: len(_PNG) // 2], "truncated image"),
    "huge-png-header": (
        huge_png(20000, 20000),
        f"image too large: 400000000 pixels > limit {DEFAULT_MAX_PIXELS}",
    ),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_a_decode_error_with_a_short_reason(name):
    data, reason = BAD_INPUTS[name]
    with pytest.raises(DecodeError) as info:
        decode_image(data)
    assert str(info.value) == reason


def test_huge_header_is_refused_and_measured_without_decoding(monkeypatch):
    """The event, not a time: no pixel data of a 20000 x 20000 header is ever decoded (a wall
    time limit said the same on an idle machine and failed on a loaded one)."""
    from PIL import ImageFile

    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    huge = huge_png(20000, 20000)
    with pytest.raises(DecodeError, match="image too large"):
        decode_image(huge)
    assert image_size(huge) == (20000, 20000)
    assert decoded == []
    decode_image(encode(Image.new("RGB", (3, 2)), "PNG"))
    assert decoded and set(decoded) == {(3, 2)}  # the probe sees a decode when there is one
    with pytest.raises(DecodeError, match="empty file"):
        image_size(b"")


def test_misuse_and_bugs_are_not_decode_errors(monkeypatch):
    with pytest.raises(TypeError):
        decode_image(_PNG.decode("latin-1"))
    with pytest.raises(ValueError):
        decode_image(_JPEG, draft=(0, 10))

    def bug(im):
        raise TypeError("a bug, not a bad file")

    monkeypatch.setattr("seglabel.inputs.decode._to_rgb", bug)
    with pytest.raises(TypeError, match="a bug"):
        decode_image(_PNG)


def test_per_call_limit_is_ours_not_pillows(monkeypatch):
    """Pillow's process-wide limit neither warns, raises nor changes; max_pixels alone decides."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 is 10x over: Pillow would refuse
    png = encode(Image.new("RGB", (100, 100), GREEN), "PNG")
    tiff = encode(Image.new("RGB", (100, 100), GREEN), "TIFF")  # TIFF re-checks while loading
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in (png, tiff, encode(Image.new("L", (40, 40)), "PNG")):  # 1600: Pillow's warning zone
            assert decode_image(data, max_pixels=None).shape[2] == 3
        np.testing.assert_array_equal(decode_image(tiff), rgb(GREEN, (100, 100)))
    with pytest.raises(DecodeError, match=r"^image too large: 10000 pixels > limit 9999$"):
        decode_image(png, max_pixels=9999)
    assert Image.MAX_IMAGE_PIXELS == 1000


def _sixteen_bit():
    values = np.array([[0, 257, 32767, 32768], [40000, 65280, 65534, 65535]], np.uint16)
    expected = np.array([[0, 1, 127, 128], [156, 254, 255, 255]], np.uint8)
    assert Image.open(io.BytesIO(encode(Image.fromarray(values), "PNG"))).mode == "I;16"
    return encode(Image.fromarray(values), "PNG"), gray3(expected)


def _palette_with_transparency():
    p = Image.new("P", (4, 2))
    p.putpalette([*RED, *GREEN, *BLUE] + [0] * 759)
    p.putdata([0, 1, 2, 0, 1, 2, 0, 1])
    data = encode(p, "PNG", transparency=bytes([0, 128, 255]))
    expected = np.array([RED, GREEN, BLUE, RED, GREEN, BLUE, RED, GREEN], np.uint8).reshape(2, 4, 3)
    return data, expected


def _rgba():
    a = np.zeros((3, 5, 4), np.uint8)
    a[..., :3] = (10, 200, 30)
    a[0, :, 3] = 255  # alpha 0 elsewhere: colours must survive, not turn black or white
    return encode(Image.fromarray(a), "PNG"), a[..., :3]


def _adobe_cmyk():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")
    assert b"Adobe" in data  # Pillow writes Adobe's inverted CMYK, the common real-world kind
    return data, rgb(RED, (16, 16))


def _frames(fmt, **kw):
    frames = [Image.new("RGB", (6, 4), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    return data, rgb(RED, (4, 6))


# name -> () -> (bytes, expected RGB array, max abs error allowed)
VALID = {
    "png-16bit": lambda: (*_sixteen_bit(), 0),
    "tiff-16bit-big-endian": lambda: (
        encode(Image.fromarray(np.array([[0, 257, 32768, 65535]], ">u2")), "TIFF"),
        gray3([[0, 1, 128, 255]]),
        0,
    ),
    "tiff-int32": lambda: (
        encode(Image.fromarray(np.array([[0, 32768, 65535, 70000, -3]], np.int32)), "TIFF"),
        gray3([[0, 128, 255, 255, 0]]),
        0,
    ),
    "tiff-float": lambda: (
        encode(Image.fromarray(np.array([[-5.0, 0.0, 127.6, 300.0, np.nan]], np.float32)), "TIFF"),
        gray3([[0, 0, 128, 255, 0]]),
        0,
    ),
    # Issue 39: floats in [0, 1] decoded to 0 and 1 (almost black); they are fractions of white.
    "tiff-float-unit": lambda: (
        encode(Image.fromarray(np.array([[0.0, 0.25, 0.6, 1.0], [0.2, 0.8, 0.002, 0.996]], np.float32)),
               "TIFF"),
        gray3([[0, 64, 153, 255], [51, 204, 1, 254]]),
        0,
    ),
    # One stray value (an inf, a resampling overshoot) does not black out the rest.
    "tiff-float-unit-stray": lambda: (
        encode(Image.fromarray(np.array([[0.5, np.inf, 1.01, -0.005, np.nan]], np.float32)), "TIFF"),
        gray3([[128, 255, 255, 0, 0]]),
        0,
    ),
    "cmyk-jpeg-adobe": lambda: (*_adobe_cmyk(), 2),
    "grayscale-png": lambda: (encode(Image.fromarray(skdata.camera()), "PNG"), gray3(skdata.camera()), 0),
    "bilevel-png": lambda: (encode(Image.fromarray(np.eye(4, dtype=bool)), "PNG"), gray3(np.eye(4) * 255), 0),
    "ycbcr-tiff": lambda: (
        encode(Image.new("YCbCr", (4, 4), (128, 128, 128)), "TIFF"),
        rgb((128, 128, 128), (4, 4)),
        1,
    ),
    "gray-alpha-png": lambda: (
        encode(Image.fromarray(np.array([[[7, 0], [9, 255]]], np.uint8)), "PNG"),
        gray3([[7, 9]]),
        0,
    ),
    "palette-transparency": lambda: (*_palette_with_transparency(), 0),
    "rgba-png": lambda: (*_rgba(), 0),
    "animated-gif": lambda: (*_frames("GIF"), 0),
    "animated-webp": lambda: (*_frames("WEBP", lossless=True), 0),
    "multipage-tiff": lambda: (*_frames("TIFF"), 0),
    "exif6-png": lambda: (oriented(marked(16, 24), 6, "PNG"), np.rot90(marked(16, 24), k=-1), 0),
}


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name", VALID)
def test_unusual_valid_files_decode_to_rgb(name):
    data, expected, atol = VALID[name]()
    out = decode_image(data)
    assert out.dtype == np.uint8 and out.flags.c_contiguous and not out.flags.writeable
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.astype(int), expected.astype(int), atol=atol)
    assert image_size(data) == (out.shape[1], out.shape[0])


# Orientation 6 is shown after a clockwise quarter turn, 8 after a counter-clockwise one.
@pytest.mark.parametrize(("orientation", "turns", "red_corner"), [(6, -1, (0, -1)), (8, 1, (-1, 0))])
def test_exif_orientation_turns_the_pixels(orientation, turns, red_corner):
    stored = marked(24, 40)
    data = oriented(stored, orientation)
    out = decode_image(data)
    assert out.shape == (40, 24, 3)
    assert image_size(data) == (24, 40)
    np.testing.assert_array_equal(out, np.rot90(decode_image(oriented(stored, 1)), k=turns))
    np.testing.assert_allclose(out[red_corner].astype(int), RED, atol=8)


def test_draft_decodes_a_big_jpeg_smaller_but_not_below_the_request():
    big = encode(Image.fromarray(np.tile(_PHOTO, (4, 3, 1))), "JPEG")  # 1536 x 2048
    assert decode_image(big).shape == (2048, 1536, 3)
    small = decode_image(big, draft=(300, 200))
    assert small.shape == (512, 384, 3)  # 1/4: the smallest DCT scale with both sides >= request
    assert image_size(big) == (1536, 2048)
    png = encode(Image.new("RGB", (640, 480)), "PNG")
    assert decode_image(png, draft=(64, 48)).shape == (480, 640, 3)


def test_draft_size_is_upright_for_exif_rotated_jpegs():
    data = oriented(np.tile(_PHOTO, (1, 4, 1)), 6)  # stored 2048 x 512, upright 512 x 2048
    out = decode_image(data, draft=(500, 250))
    assert out.shape[1] >= 500 and out.shape[0] >= 250


def _png(width: int, height: int, rows: bytes, interlace: int = 0, depth: int = 8, color: int = 2) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))


def test_a_png_whose_data_cannot_make_its_declared_image_is_truncated():
    """A 150-byte PNG declaring 13000 x 13000 (under the default pixel limit) decoded, before, to
    half a GB of zeros; so did any PNG whose zlib stream ends before its last row."""
    bomb = _png(13000, 13000, (b"\x00" * (1 + 13000 * 3)) * 2)
    assert len(bomb) < 200 and 13000 * 13000 < DEFAULT_MAX_PIXELS
    short = _png(100, 80, (b"\x00" * 301) * 40)  # a complete zlib stream of half the rows
    for data in (bomb, short):
        with pytest.raises(DecodeError, match="truncated image"):
            decode_image(data)
    assert decode_image(_png(100, 80, (b"\x00" * 301) * 80)).shape == (80, 100, 3)


@pytest.mark.parametrize("width, height", [(13, 7), (17, 11), (2, 9)])
def test_interlaced_pngs_are_counted_pass_by_pass(width, height):
    """Adam7: seven passes of rows, each with its filter byte; all of them, or truncated."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
              (0, 1, 1, 2))
    rows = []
    for x0, y0, dx, dy in passes:
        columns, count = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        rows.append((b"\x00" + b"\x07" * (columns * 3)) * count if columns else b"")
    assert decode_image(_png(width, height, b"".join(rows), interlace=1)).shape == (height, width, 3)
    with pytest.raises(DecodeError, match="truncated image"):
        decode_image(_png(width, height, b"".join(rows[:-1]), interlace=1))
