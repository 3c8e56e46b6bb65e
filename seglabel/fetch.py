"""Read one image's bytes from storage and decode it; any failure becomes a short reason.

This is the work of the CPU decode tasks. It never raises for a bad or missing image: the
caller writes the reason into the image's ``error`` row and the job goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from fsspec.core import split_protocol

from .decode import DecodeError, decode_image
from .errors import one_line
from .storage import open_url

log = logging.getLogger(__name__)


@dataclass
class Fetched:
    """A decoded image, or the reason it could not be read or decoded."""

    image: np.ndarray | None
    width: int | None
    height: int | None
    error: str | None


def options_for(uri: str, base_url: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options apply to URIs on the same protocol as the input they were given for."""
    same = (split_protocol(uri)[0] or "file") == (split_protocol(base_url)[0] or "file")
    return dict(storage_options) if same else {}


def read_bytes(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The object's bytes (fsspec caches one filesystem instance per process and options)."""
    fs, path = open_url(uri, storage_options)
    return fs.cat_file(path)


def fetch(
    uri: str, storage_options: Mapping[str, Any] | None = None, max_pixels: int | None = None
) -> Fetched:
    """Read and decode one image into an upright (H, W, 3) uint8 RGB array."""
    try:
        data = read_bytes(uri, storage_options)
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
