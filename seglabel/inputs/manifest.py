"""Manifests: the images a ``.txt`` / ``.csv`` / ``.parquet`` file lists (optionally
compressed), streamed as :class:`~seglabel.inputs.refs.ImageRef` a batch at a time; the answer
for flat prefixes too large to list directory by directory. A manifest entry's key is its URI
without the scheme (:func:`manifest_key`).

Plain Python, no Ray: the pipeline wires these iterators into Ray Data.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

import fsspec
from fsspec.core import split_protocol
from fsspec.utils import infer_compression

from ..core.errors import SourceError, one_line
from ..core.keys import printable
from ..core.redaction import get_logger, is_http, redact_url
from ..storage.filesystem import full_uri
from .refs import ImageRef, image_ref, open_input

logger = get_logger(__name__)

# Rows per Arrow batch when streaming csv / parquet manifests: bounded memory, few Python calls.
_BATCH_ROWS = 65_536


def _manifest_format(path: str) -> tuple[str, str | None]:
    """(format, compression) from the manifest's name: 'list.txt', 'x.csv.gz', 'p.parquet'
    (an http(s) URL's path, without its query: a presigned 'list.txt?X-Amz-Signature=…')."""
    if is_http(path):
        path = urlsplit(path).path
    compression = infer_compression(path)
    stem = path.lower()
    if compression:
        stem = stem.rsplit(".", 1)[0]
    for fmt, suffixes in (("txt", (".txt",)), ("csv", (".csv",)), ("parquet", (".parquet", ".pq"))):
        if stem.endswith(suffixes):
            if fmt == "parquet" and compression:
                break  # parquet compresses inside the file; an outer layer is not readable
            return fmt, compression
    raise SourceError(
        f"manifest {path!r}: unknown format (expected .txt, .csv or .parquet, "
        f".txt/.csv optionally compressed)"
    )


def _txt_entries(fs: Any, path: str, compression: str | None) -> Iterator[tuple[int, str]]:
    # utf-8-sig: a BOM written by a Windows editor must not become part of the first URI.
    with fs.open(path, "rt", encoding="utf-8-sig", compression=compression) as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                yield number, text


def _csv_entries(fs: Any, path: str, compression: str | None) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # Only the 'uri' column is converted, as strings: other columns cannot fail the read, and a
    # URI that looks like a number stays text.
    options = pacsv.ConvertOptions(include_columns=["uri"], column_types={"uri": pa.string()})
    with fs.open(path, "rb", compression=compression) as f:
        try:
            reader = pacsv.open_csv(f, convert_options=options)
        except pa.ArrowKeyError:
            reader = None
        if reader is None:
            with fs.open(path, "rb", compression=compression) as again:
                names = pacsv.open_csv(again).schema.names
            raise SourceError(
                f"manifest {path!r}: no 'uri' column (columns: {', '.join(names) or 'none'})"
            )
        row = 0
        for batch in reader:
            for value in batch.column(0).to_pylist():
                row += 1
                if value:
                    yield row, value.strip()


def _parquet_entries(fs: Any, path: str, compression: str | None) -> Iterator[tuple[int, str]]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        # pre_buffer off: on, pyarrow reads (and holds) every row group's uri column up front,
        # on its I/O threads: 40 bytes an entry, where a batch at a time needs nothing per entry.
        parquet = pq.ParquetFile(f, pre_buffer=False)
        names = parquet.schema_arrow.names
        if "uri" not in names:
            raise SourceError(
                f"manifest {path!r}: no 'uri' column (columns: {', '.join(names) or 'none'})"
            )
        row = 0
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=["uri"], use_threads=False):
            for value in batch.column(0).to_pylist():
                row += 1
                if value:
                    yield row, str(value).strip()


class _ManifestEntries:
    """Turns a manifest's entries into refs: absolute ones on their protocol's filesystem,
    relative ones against the manifest's folder (or URL)."""

    def __init__(self, manifest_url: str, manifest_fs: Any, manifest_path: str) -> None:
        self.manifest_url = manifest_url
        self.manifest_fs = manifest_fs
        self.manifest_path = manifest_path
        self.folder = manifest_fs._parent(manifest_path)
        self.filesystems: dict[str, Any] = {}  # protocol as written -> filesystem for its entries

    def ref(self, entry: str) -> ImageRef:
        """The ref of one entry; one that is not even a URI ("http://[/x.jpg") is an error row,
        not a stopped job."""
        try:
            return self._resolved(entry)
        except ValueError:
            shown = printable(redact_url(entry))
            return ImageRef(shown, shown, "key: not a valid URI")

    def _resolved(self, entry: str) -> ImageRef:
        protocol = split_protocol(entry)[0]
        if protocol is None and is_http(self.manifest_path):
            fs, path = self.manifest_fs, urljoin(self.manifest_path, entry)  # as a browser resolves it
        elif protocol is None and not entry.startswith("/"):
            fs = self.manifest_fs
            path = fs._strip_protocol(posixpath.normpath(posixpath.join(self.folder, entry)))
        else:
            fs = self._filesystem(protocol or "file")
            path = fs._strip_protocol(entry)
        uri = full_uri(fs, path)
        return image_ref(manifest_key(uri), uri)

    def _filesystem(self, protocol: str) -> Any:
        """The filesystem of a protocol's entries, opened once: the manifest's own where it is
        of that class (so that ``storage_options`` apply), else one with the defaults."""
        fs = self.filesystems.get(protocol)
        if fs is None:
            try:
                cls = fsspec.get_filesystem_class(protocol)
                fs = self.manifest_fs if cls is type(self.manifest_fs) else fsspec.filesystem(protocol)
            except (ValueError, ImportError) as exc:
                raise SourceError(
                    f"manifest {self.manifest_url!r}: cannot read {protocol}:// URIs: {one_line(exc)}"
                ) from exc
            self.filesystems[protocol] = fs
            self._warn_if_mixed()
        return fs

    def _warn_if_mixed(self) -> None:
        """Warn when the entries so far span two kinds of filesystem: keys drop the scheme, so
        such a manifest can name one key twice."""
        if len({type(f) for f in self.filesystems.values()}) > 1:
            logger.warning(
                "manifest %s mixes protocols (%s): keys are URIs without scheme, so a path "
                "listed under two protocols is labeled once and its other URI is an error row",
                self.manifest_url, ", ".join(sorted(self.filesystems)),
            )


def manifest_key(uri: str) -> str:
    """A manifest URI's key: the URI without its scheme and root '/'. An http(s) URL's key is
    its host and path: never its query (a presigned URL's signature, which changes with every
    signing) nor user information."""
    if is_http(uri):
        parts = urlsplit(uri)
        host = parts.netloc.rpartition("@")[2]
        return host + parts.path
    key = uri.split("://", 1)[1] if "://" in uri else uri
    return key[1:] if key.startswith("/") else key  # the root '/' of file:///x, memory:///x


_READERS = {"txt": _txt_entries, "csv": _csv_entries, "parquet": _parquet_entries}


def iter_manifest(
    manifest_url: str, *, storage_options: Mapping[str, Any] | None = None
) -> Iterator[ImageRef]:
    """Yield one ImageRef per entry of a manifest, streamed in file order.

    Formats, chosen by the manifest's name: ``.txt`` (one URI per line; blank lines and lines
    starting with '#' skipped; surrounding whitespace stripped), ``.csv`` with a ``uri`` column
    (``.txt``/``.csv`` may be compressed: ``.gz``, ``.bz2``, ...), ``.parquet`` with a ``uri``
    column. Files are read batch by batch, never whole.

    Entries:

    * ``s3://b/x.jpg``, ``file:///x.jpg``, ``/abs/x.jpg`` (local): taken as they are.
    * Relative (``x.jpg``, ``../imgs/x.jpg``): resolved against the manifest's folder, on the
      manifest's filesystem (so an S3 manifest's relative entries are S3 objects), with '.' and
      '..' resolved as in a URL reference.
    * ``storage_options`` apply to the manifest's filesystem and entries of the same protocol;
      other protocols use their defaults (environment credentials).

    ``key`` = the URI without its scheme and root '/': ``s3://b/x/y.jpg`` -> ``b/x/y.jpg``,
    ``file:///data/x.jpg`` -> ``data/x.jpg``. URIs that differ only in scheme (``s3://b/x`` vs
    ``gs://b/x``) give one key: the job turns the later one into an error row (a warning is
    logged when a manifest mixes protocols). An unsafe key (e.g. ``s3://b/a/../x.jpg``) yields a ref with
    ``error="key: unsafe"``.

    Repeated entries are yielded as they come: the job counts each key once (it de-duplicates
    the keys it has not labeled yet as 64-bit hashes, ``seglabel.job.pipeline``), so that nothing
    here grows with the manifest.

    Raises SourceError (one line) when the manifest is missing, unreadable, of an unknown
    format, lacks a ``uri`` column, or names a protocol no installed filesystem handles.
    """
    manifest_fs, manifest_path = open_input(manifest_url, storage_options)
    fmt, compression = _manifest_format(manifest_path)
    resolver = _ManifestEntries(manifest_url, manifest_fs, manifest_path)
    counts = {"entries": 0, "unsafe": 0}
    logger.info("reading %s manifest %s", fmt, manifest_url)
    try:
        for _row, entry in _READERS[fmt](manifest_fs, manifest_path, compression):
            counts["entries"] += 1
            ref = resolver.ref(entry)
            counts["unsafe"] += ref.error is not None
            yield ref
    except SourceError:
        raise
    except Exception as exc:
        raise _manifest_error(manifest_url, exc) from exc
    logger.info(
        "manifest %s: %d entries (%d with unsafe keys)", manifest_url, counts["entries"], counts["unsafe"],
    )


def _manifest_error(manifest_url: str, exc: Exception) -> SourceError:
    """The one line a failed manifest read ends in: missing, not UTF-8 text, or anything else
    (pyarrow parse errors, permissions, network)."""
    if isinstance(exc, FileNotFoundError):
        return SourceError(f"manifest {manifest_url!r} not found: {one_line(exc)}")
    if isinstance(exc, UnicodeDecodeError):
        return SourceError(f"manifest {manifest_url!r} is not UTF-8 text: {one_line(exc)}")
    return SourceError(f"cannot read manifest {manifest_url!r}: {one_line(exc)}")
