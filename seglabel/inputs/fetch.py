"""Read one image's bytes from storage and decode it; any failure becomes a short reason.

This is the work of the CPU decode tasks. It never raises for a bad or missing image: the
caller writes the reason into the image's ``error`` row and the job goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..core.errors import DecodeError, Unreadable, one_line
from ..core.redaction import get_logger
from ..storage.read import read_bytes
from .decode import decode_image

log = get_logger(__name__)


@dataclass
class Fetched:
    """A decoded image, or the reason it could not be read or decoded."""

    image: np.ndarray | None
    width: int | None
    height: int | None
    error: str | None


def fetch(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> Fetched:
    """Read and decode one image into an upright (H, W, 3) uint8 RGB array."""
    try:
        data = read_bytes(uri, storage_options, max_bytes)
    except Unreadable as exc:
        return Fetched(None, None, None, f"read: {exc}")
    except FileNotFoundError:
        return Fetched(None, None, None, "read: not found")
    except PermissionError as exc:
        return Fetched(None, None, None, f"read: permission denied: {one_line(exc, 200)}")
    except Exception as exc:  # network, credentials, throttling after the client's own retries
        log.warning("cannot read %s: %s", uri, exc)
        return Fetched(None, None, None, f"read: {type(exc).__name__}: {one_line(exc, 200)}")
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except DecodeError as exc:
        return Fetched(None, None, None, f"decode: {exc}")
    return Fetched(image, int(image.shape[1]), int(image.shape[0]), None)
