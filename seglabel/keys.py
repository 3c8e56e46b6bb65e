"""Image keys: the one rule for which keys are safe, and the 64-bit hashes that stand for them.

A key (DESIGN.md's output contract) is an image's path relative to the input root, or a
manifest URI without its scheme; it names the image's mask under the output
(``masks/<key>.png``) and every file an export writes for it. Every stage that turns a key into
a path checks it with :func:`is_safe_key`, so that a key from a listing, a manifest or a
tampered Parquet row can never name a file outside the folder it is written under.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

UNSAFE_KEY_ERROR = "key: unsafe"

# Linux (ext4, xfs, ...) and most object-store-to-disk tools cap one name at 255 bytes; a longer
# segment could never be written as a mask file, so it is refused up front.
MAX_SEGMENT_BYTES = 255


def is_safe_key(key: str) -> bool:
    """Whether ``key`` can only name a file inside the output folder, on any storage.

    False for an empty key, a leading '/', a backslash or NUL anywhere, and any '/'-separated
    segment that is empty, '.', '..' or over 255 bytes of UTF-8 (or not encodable as UTF-8:
    undecodable local file names arrive as lone surrogates, which Parquet cannot store either).
    """
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        return False
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            return False
        try:
            if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
                return False
        except UnicodeEncodeError:
            return False
    return True


def hash64(text: str) -> int:
    """A 64-bit hash of a string (blake2b), to remember 10^8 keys or URIs in little memory."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """64-bit hashes of keys, as a uint64 array."""
    return np.fromiter((hash64(k) for k in keys), dtype=np.uint64)


__all__ = ["MAX_SEGMENT_BYTES", "UNSAFE_KEY_ERROR", "hash64", "is_safe_key", "key_hashes"]
