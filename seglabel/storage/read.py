"""The bounded reader everyone uses: a file's bytes, only from a regular file, never more than
asked for.

Images, masks, truth files, label maps, model cards and checkpoint headers are all read through
:func:`read_bytes`: a FIFO or a device is refused before it is opened (it would block a read
for ever, or never end), and a read stops one byte past its limit whatever size a listing
gave (a file that grew, or lies about its size). Refusals are
:class:`~seglabel.core.errors.Unreadable`, for each caller to name what it was reading.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Mapping

import fsspec
from fsspec.core import split_protocol

from ..core.errors import Unreadable
from ..core.redaction import get_logger
from .filesystem import is_local, with_defaults

log = get_logger(__name__)


def read_bytes(
    uri: str, storage_options: Mapping[str, Any] | None = None, max_bytes: int | None = None
) -> bytes:
    """The bytes of the object a listing or manifest named, at most ``max_bytes`` of them
    (fsspec caches one filesystem instance per process and options).

    The URI is split into its protocol and its path only: never parsed as an fsspec URL, whose
    "::" chains filesystems (``in/a::b.jpg`` would read ``in/a``). On a local disk only regular
    files are read (a symlink to one is followed): a FIFO would block the read forever and a
    device such as ``/dev/zero`` never ends. The read itself stops after ``max_bytes`` + 1
    bytes (one ranged request on an object store), whatever size was listed: a file that grew,
    or lies about its size, raises :class:`Unreadable` instead of filling the worker's memory.
    """
    fs, path, size = regular_target(uri, storage_options)
    if size is not None and max_bytes is not None and size > max_bytes:
        raise Unreadable(f"{size} bytes, over --max-bytes {max_bytes}")
    if max_bytes is None:
        return fs.cat_file(path)
    if split_protocol(uri)[0] in ("http", "https"):
        data = _read_stream(fs, path, max_bytes + 1)
    elif size is not None and size < max_bytes:
        # A local read of n bytes allocates n up front: ask for what the file holds (and one
        # more byte, to see it grew), not --max-bytes (256 MiB a read, in tracemalloc's count).
        data = _ranged_read(fs, path, size + 1)
        if len(data) > size:  # it grew since it was measured: read it again, bounded
            data = _ranged_read(fs, path, max_bytes + 1)
    else:
        data = _ranged_read(fs, path, max_bytes + 1)
    if len(data) > max_bytes:
        raise Unreadable(f"over --max-bytes {max_bytes}")
    return data


def _ranged_read(fs: Any, path: str, limit: int) -> bytes:
    """At most ``limit`` bytes in one ranged request (a local read of that many bytes)."""
    try:
        return fs.cat_file(path, start=0, end=limit)
    except OSError as exc:
        if "range" in str(exc).lower() and "satisf" in str(exc).lower():
            return b""  # S3 answers a range on an empty object with 416
        raise


def _read_stream(fs: Any, path: str, limit: int) -> bytes:
    """At most ``limit`` bytes of an http(s) response, read as a stream: fsspec's ranged read
    of an http URL reads the whole body, and a server may ignore the range (or never end)."""
    chunks, total = [], 0
    # block_size 0 and a known size: a plain GET streamed, with no HEAD request first.
    with fs.open(path, "rb", block_size=0, size=limit) as stream:
        while total < limit:
            chunk = stream.read(min(1 << 20, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    return b"".join(chunks)


def regular_target(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str, int | None]:
    """The filesystem and path of ``uri``, and on a local disk its size, once it is known to be
    a regular file (a symlink to one is followed; FileNotFoundError for a dangling one): a FIFO
    would block a read forever and a device such as ``/dev/zero`` never ends."""
    fs, path = filesystem_for(uri, storage_options), object_path(uri)
    if not is_local(fs):
        return fs, path, None
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise Unreadable("not a regular file")
    return fs, path, status.st_size


def filesystem_for(uri: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The filesystem of a listed URI's protocol, with seglabel's storage defaults."""
    protocol = split_protocol(uri)[0] or "file"
    return fsspec.filesystem(protocol, **with_defaults(uri, storage_options))


def object_path(uri: str) -> str:
    """A listed URI's path on its filesystem: the URI without its protocol, nothing else."""
    return fsspec.get_filesystem_class(split_protocol(uri)[0] or "file")._strip_protocol(uri)
