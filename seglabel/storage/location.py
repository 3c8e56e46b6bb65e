"""A place seglabel writes to: a file or folder on any fsspec filesystem, each file written
atomically (:mod:`seglabel.storage.atomic`).

:class:`Location` is what a job's output store (:class:`seglabel.outputs.OutputStore`) is
built on; :class:`Destination` is where an export or a preview writes.
"""

from __future__ import annotations

import contextlib
import posixpath
from typing import IO, Any, Mapping

import pyarrow.compute  # noqa: F401  (pa.compute)

from ..core.errors import OutputError, one_line
from .atomic import open_atomic, write_atomic
from .filesystem import is_local, open_url


class Location:
    """A file or folder on any fsspec filesystem that seglabel writes, each file atomically
    (``seglabel.storage``): a job's output (:class:`OutputStore`), an export's or a preview's
    destination (:class:`Destination`)."""

    # What the location is to the user, in the line that says it cannot be opened.
    role = "output"

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, root = open_url(url, self.storage_options)
        except Exception as exc:
            raise OutputError(f"cannot open {self.role} {url!r}: {one_line(exc)}") from exc
        self.root = root.rstrip("/") or root
        self.local = is_local(self.fs)

    def path(self, *rel: str) -> str:
        """A path under the location (the location itself with no ``rel``)."""
        return posixpath.join(self.root, *rel)

    def open(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A file that appears at ``path`` whole, or not at all."""
        return open_atomic(self.fs, path)

    def write_file(self, path: str, data: bytes) -> None:
        """A small file at ``path``, whole."""
        write_atomic(self.fs, path, data)


class Destination(Location):
    """Where an export or a preview writes: a file (numbered when sharded) or a folder."""

    role = "destination"

    def shard(self, index: int | None, default_name: str | None = None) -> str:
        """The path of one output file: ``DEST`` itself (or ``DEST/default_name``), or its stem
        numbered."""
        path = self.path(default_name) if default_name else self.root
        if index is None:
            return path
        stem, ext = posixpath.splitext(path)
        return f"{stem}-{index:05d}{ext}"

    def is_dir(self) -> bool:
        try:
            return bool(self.fs.isdir(self.root))
        except Exception:
            return False
