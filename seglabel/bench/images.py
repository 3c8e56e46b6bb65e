"""The bench's images: real photos (a folder's, or those scikit-image ships), resized and
cycled, and the same images written as files for the pipeline phase."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import ConfigError
from ..core.redaction import get_logger

log = get_logger(__name__)

# Photos shipped inside scikit-image (skimage.data, no download), cycled over the images. Only
# everyday scenes: microscopy, retina or deep-sky images are not what a labeling job sees.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "camera")
# Every few images of the pipeline's input are PNG, the rest JPEG (as a photo corpus is).
PNG_EVERY = 4
JPEG_QUALITY = 95


def photos(photo_dir: str | None) -> tuple[list[np.ndarray], list[str], str]:
    """The source photos: a folder's images, else skimage.data's, else generated scenes."""
    from PIL import Image

    if photo_dir:
        files = sorted(p for p in Path(photo_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise ConfigError(f"--photos {photo_dir}: no .png/.jpg images there")
        arrays = []
        for f in files:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        return arrays, [f.name for f in files], f"folder {photo_dir}"
    try:
        from skimage import data
    except ImportError:
        log.warning("scikit-image is not installed and no --photos folder given: using generated scenes")
        return _generated_scenes(len(PHOTOS)), [f"scene{i}" for i in range(len(PHOTOS))], "generated"
    arrays, names = [], []
    for name in PHOTOS:
        try:
            image = getattr(data, name)()
        except Exception as exc:  # a photo that needs a download in this scikit-image
            log.debug("skipping skimage.data.%s: %s", name, exc)
            continue
        image = image[0] if isinstance(image, tuple) else image
        if image.ndim == 2 and image.dtype == np.uint8:  # a black-and-white photo
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            arrays.append(image)
            names.append(name)
    if not arrays:
        return _generated_scenes(len(PHOTOS)), [f"scene{i}" for i in range(len(PHOTOS))], "generated"
    return arrays, names, "skimage.data"


def _generated_scenes(n: int, size: tuple[int, int] = (480, 640)) -> list[np.ndarray]:
    """Smooth backgrounds with overlapping shapes: a stand-in where no photos are available."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        h, w = size
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * rng.uniform(0.1, 0.5) + y * rng.uniform(0.1, 0.5) + rng.integers(0, 255)) % 256
                         for _ in range(3)], -1).astype(np.uint8)
        im = Image.fromarray(base)
        draw = ImageDraw.Draw(im)
        for _ in range(25):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(20, w // 3)), y0 + int(rng.integers(20, h // 3)))
            fill = tuple(int(v) for v in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        out.append(np.asarray(im.filter(ImageFilter.GaussianBlur(1.0))))
    return out


def bench_images(
    n: int, size: tuple[int, int] | None, photo_dir: str | None = None
) -> tuple[list[np.ndarray], dict]:
    """``n`` RGB images: the photos cycled (mirrored and shifted on later rounds), resized to
    ``size`` (height, width) unless None."""
    from PIL import Image

    sources, names, source = photos(photo_dir)
    out = []
    for i in range(n):
        k, j = divmod(i, len(sources))
        image = sources[j]
        if k % 2:
            image = image[:, ::-1]
        if k >= 2:
            image = np.roll(image, 13 * (k // 2), axis=(0, 1))
        if size is not None and image.shape[:2] != size:
            image = np.asarray(
                Image.fromarray(np.ascontiguousarray(image)).resize((size[1], size[0]), Image.BICUBIC)
            )
        out.append(np.ascontiguousarray(image))
    info = {
        "count": n,
        "size": f"{size[0]}x{size[1]}" if size else "native",
        "source": source,
        "photos": names,
        "mean_pixels": float(np.mean([a.shape[0] * a.shape[1] for a in out])) if out else 0.0,
    }
    return out, info


def write_images(
    fs: Any, root: str, images: Sequence[np.ndarray], repeat: int = 1, png_every: int | None = PNG_EVERY
) -> list[str]:
    """The images as files (JPEG, every ``png_every``-th PNG; None: all JPEG), each encoded once
    and written ``repeat`` times under different names."""
    from PIL import Image

    paths = []
    fs.makedirs(root, exist_ok=True)
    for i, image in enumerate(images):
        fmt = "png" if png_every and i % png_every == png_every - 1 else "jpg"
        buf = io.BytesIO()
        if fmt == "png":
            Image.fromarray(image).save(buf, format="PNG", compress_level=1)
        else:
            Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
        for r in range(repeat):
            path = f"{root.rstrip('/')}/img{i:06d}{f'-{r}' if repeat > 1 else ''}.{fmt}"
            fs.pipe_file(path, buf.getvalue())
            paths.append(path)
    return paths


__all__ = ["PHOTOS", "bench_images", "photos", "write_images"]
