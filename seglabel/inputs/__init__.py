"""inputs: which images a job labels, and each one's pixels.

    refs      ImageRef: an image's key (where its mask goes) and URI
    listing   the images under a folder or prefix, one directory at a time
    manifest  the images a txt/csv/parquet manifest lists, streamed
    fetch     one image read and decoded; a failure is a reason for its error row
    decode    bytes to upright RGB (EXIF, 16-bit, CMYK, palettes, bombs)
"""

from ..core.lazy import public_names

_PUBLIC = {
    "ImageRef": "refs",
    **dict.fromkeys(["iter_listing", "is_under"], "listing"),
    **dict.fromkeys(["iter_manifest", "manifest_key"], "manifest"),
    "Fetched": "fetch",  # fetch() is seglabel.inputs.fetch.fetch (a public name is never a module's)
    **dict.fromkeys(["decode_image", "image_size"], "decode"),
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = public_names(__name__, _PUBLIC)
