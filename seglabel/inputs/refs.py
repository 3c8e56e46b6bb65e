"""What a job labels, one image at a time: :class:`ImageRef` (its key and URI).

Each ref carries the ``key`` of the output contract (README, "Output contract"): where its mask
goes under the output URL. A key that could name a file outside the output (``..``, ``.``,
empty or over-long segments, ...) still yields a ref, with ``error="key: unsafe"``, so that it
becomes an error row instead of disappearing or escaping (:func:`image_ref`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fsspec.core import split_protocol

from ..core.errors import SourceError, one_line
from ..core.keys import UNSAFE_KEY_ERROR, is_safe_key, printable
from ..storage.filesystem import open_url

# Protocols whose filesystems keep every listing in ``fs.dircache`` unless told not to. For a
# single pass over 10^8 objects that cache would hold the whole tree in driver memory, and in a
# long-lived process a cached listing would hide images added since (a re-run must see them).
_LISTINGS_CACHE_OFF = frozenset({"s3", "s3a"})


@dataclass(frozen=True)
class ImageRef:
    """One input image.

    ``key``: path relative to the input root (listing) or the URI without its scheme
    (manifest), '/'-separated, spaces and non-ASCII kept — the image's identity in the output.
    ``uri``: full URI with protocol, as fsspec writes it (``s3://b/x.jpg``, ``file:///abs/x.jpg``,
    ``memory:///x.jpg``); fsspec URIs are not percent-encoded.
    ``error``: ``"key: unsafe"`` when the key cannot be a file under the output; such a ref must
    become an error row and never be read or written.
    """

    key: str
    uri: str
    error: str | None = None


def image_ref(key: str, uri: str) -> ImageRef:
    """The ref of an image named ``uri`` whose key is ``key``: an error ref where the key is
    not safe."""
    if is_safe_key(key):
        return ImageRef(key, uri)
    # Never read or written; its row records the name as UTF-8 (keys.printable).
    return ImageRef(printable(key), printable(uri), UNSAFE_KEY_ERROR)


def open_input(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """The filesystem and path of an input (a folder or a manifest): ``url_to_fs`` with our
    defaults, S3's listings cache off; a bad URL or missing driver becomes a SourceError."""
    options = dict(storage_options or {})
    protocol = split_protocol(url)[0]
    if protocol in _LISTINGS_CACHE_OFF:
        options.setdefault("use_listings_cache", False)
    try:
        return open_url(url, options)
    except Exception as exc:  # unknown protocol, filesystem package not installed, bad options
        raise SourceError(f"cannot open {url!r}: {one_line(exc)}") from exc
