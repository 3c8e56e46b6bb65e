"""Files that appear whole or not at all.

:func:`write_atomic` and :func:`open_atomic`: on a local disk a file is written under a hidden
temporary name in the same folder, then renamed with ``os.replace`` (which refuses to replace a
folder with a file, so a write lands exactly at its path or fails); on an object store as one
upload, which the store publishes only once it is complete. Every file seglabel writes (masks,
Parquet parts, ``job.json``, exports, previews) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from typing import IO, Any, Iterator

from .filesystem import is_local

# Hidden temporary files are named ".tmp-<hex>" beside their target (not after it: a name of 255
# bytes leaves no room): no listing of images or parts takes them, and a later run recognises
# (and removes) what a killed one left.
TEMPORARY_MARK = ".tmp-"


def is_temporary(path: str) -> bool:
    """Whether ``path`` names a temporary file of :func:`open_atomic` (or of seglabel 0.1.0's,
    ".<name>.tmp-<hex>")."""
    name = posixpath.basename(path.rstrip("/"))
    return name.startswith(".") and TEMPORARY_MARK in name


@contextlib.contextmanager
def open_atomic(fs: Any, path: str) -> Iterator[IO[bytes]]:
    """A binary file to write that appears at ``path`` (a path of ``fs``) whole, or not at all.

    Local: written under a hidden temporary name beside ``path`` and renamed with
    ``os.replace``; renaming onto an existing folder fails (IsADirectoryError) instead of moving
    the file into it. Elsewhere: written to a local temporary file and uploaded in one go, so a
    failed write never leaves half a file.
    """
    if is_local(fs):
        parent, name = os.path.split(path)
        os.makedirs(parent or ".", exist_ok=True)
        tmp = os.path.join(parent, f"{TEMPORARY_MARK}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)
    else:
        suffix = posixpath.splitext(path)[1]
        with tempfile.NamedTemporaryFile(prefix="seglabel-", suffix=suffix) as f:
            yield f
            f.flush()
            fs.put_file(f.name, path)


def write_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file only ever becomes visible whole."""
    if is_local(fs):
        with open_atomic(fs, path) as f:
            f.write(data)
    else:
        # A single PUT: object stores publish an object only once it is complete.
        fs.pipe_file(path, data)
