"""Listing: the images under a folder or prefix, as a lazy iterator of
:class:`~seglabel.inputs.refs.ImageRef` so that a driver never holds a corpus of 10^8 paths.

:func:`iter_listing` walks a folder / prefix on any fsspec filesystem, one directory's listing
at a time, with no metadata request per object (the type of each entry comes from the directory
listing itself: on S3, ``list_objects_v2`` with a ``/`` delimiter). A flat prefix too large to
list directory by directory is a manifest's job (:mod:`seglabel.inputs.manifest`).

Plain Python, no Ray: the pipeline wires these iterators into Ray Data.
"""

from __future__ import annotations

import itertools
import os
import posixpath
import stat
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import Any

import fsspec
from fsspec.core import split_protocol

from ..core.config import DEFAULT_EXTENSIONS as _DEFAULT_EXTENSIONS
from ..core.errors import SourceError, one_line
from ..core.keys import is_safe_key
from ..core.redaction import get_logger
from ..storage.filesystem import full_uri, is_local, protocols
from .refs import ImageRef, image_ref, open_input

logger = get_logger(__name__)

DEFAULT_EXTENSIONS: frozenset[str] = frozenset(_DEFAULT_EXTENSIONS)


def _child_prefix(directory: str) -> str:
    return directory if directory.endswith("/") else directory + "/"


def is_under(path: str, prefixes: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``prefixes`` or inside one (whole segments: not 'output')."""
    return any(path == p or path.startswith(_child_prefix(p)) for p in prefixes)


def _normalise_excludes(fs: Any, exclude: Iterable[str]) -> list[str]:
    """Exclude URLs/paths as paths of ``fs``; those on another filesystem cannot overlap."""
    out = []
    for item in exclude:
        protocol = split_protocol(item)[0] or "file"
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError):
            continue  # a filesystem we cannot even load holds none of our input
        if not isinstance(fs, cls):
            continue
        path = cls._strip_protocol(item)
        out.append(path.rstrip("/") or path)
    return out


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[1].lower() if "." in name else ""


def iter_listing(
    input_url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    exclude: Iterable[str] = (),
) -> Iterator[ImageRef]:
    """Yield every image under ``input_url``, recursively, in a deterministic order.

    ``input_url``: any fsspec URL (``s3://bucket/prefix``, ``memory://x``, ``file:///abs``) or a
    local path without scheme (``/data/imgs``, ``./imgs``).

    How it walks, and why:

    * One ``fs.ls(dir, detail=True)`` per directory, nothing else: the listing already says
      which entries are files and which are directories, so there is no metadata request per
      object, and only one directory's entries (plus a stack of pending subdirectory paths) are
      held at a time. ``find``/``walk`` would materialise whole subtrees.
    * Order: a directory's files first, sorted by name, then its subdirectories in name order,
      depth first. (Interleaving files and subdirectories by name would need the parent's
      listing kept while descending.)
    * Kept: files whose extension, case-insensitively, is in ``extensions`` (no dot:
      ``"jpg"``). Skipped: hidden entries — any file or directory whose name starts with '.'
      (``.git``, ``._x.jpg`` resource forks, and S3 "directories" named '.' or '..'); S3 folder
      marker objects (keys ending in '/'); and S3 prefixes with an empty segment
      (``a//b.jpg``), which fsspec cannot list — those are logged as a warning.
    * ``exclude``: URLs or paths (normalised like the input) whose whole subtree is never
      listed, e.g. the job's output folder when it lies inside the input folder.
    * ``key`` is the path relative to ``input_url``; ``uri`` is the full URI. A key that is not
      :func:`is_safe_key` (a backslash in a name, a segment over 255 bytes) yields a ref with
      ``error="key: unsafe"``.
    * If ``input_url`` is a single file with an image extension, that one image is yielded,
      with its file name as key (handy for a quick local run); any other file is a SourceError.

    For S3, listings are not cached (``use_listings_cache=False`` unless ``storage_options``
    says otherwise): s3fs would otherwise keep the whole tree in memory, and a re-run in the
    same process would not see new images.

    Raises SourceError (one line) when the input is missing (path, prefix or bucket),
    unreachable, or a non-image file. A subdirectory that vanishes mid-walk is logged and
    skipped.
    """
    fs, root = open_input(input_url, storage_options)
    root = root.rstrip("/") or root
    wanted = frozenset(e.lower().lstrip(".") for e in extensions)
    walk = _Walk(fs, input_url, wanted, _normalise_excludes(fs, exclude), _streams(fs))
    entries, single = walk.root_listing(root)
    if single is not None:
        yield walk.single_image(single)
        return
    logger.info("listing images under %s", full_uri(fs, root))
    if is_under(root, walk.excluded):
        logger.warning("input %s is inside an excluded path: nothing to list", input_url)
        return
    yield from walk.tree(root, entries)
    walk.log_totals()


class _Walk:
    """One :func:`iter_listing` walk: what it keeps, what it skips, and the counts its closing
    log lines report. Each check an entry goes through is a method of its own, applied in the
    order :meth:`_entry` gives."""

    def __init__(
        self, fs: Any, input_url: str, wanted: frozenset[str], excluded: list[str], ordered: bool
    ) -> None:
        self.fs = fs
        self.input_url = input_url
        self.wanted = wanted
        self.excluded = excluded
        self.ordered = ordered
        self.counts = dict.fromkeys(
            ("images", "unsafe", "directories", "hidden", "other", "special", "unsafe_folders"), 0
        )

    def root_listing(self, root: str) -> tuple[Iterator[dict], str | None]:
        """:func:`_first_listing`, any failure of it one SourceError naming the input."""
        try:
            return _first_listing(self.fs, root, self.ordered)
        except FileNotFoundError as exc:
            raise SourceError(f"input {self.input_url!r} not found: {one_line(exc)}") from exc
        except Exception as exc:  # permissions, network, endpoint: anything that stops the listing
            raise SourceError(f"cannot list input {self.input_url!r}: {one_line(exc)}") from exc

    def single_image(self, path: str) -> ImageRef:
        """The ref of an input that is one file. Only an image is taken: any other file is
        more likely a manifest given as the input, and is refused with a hint."""
        base = posixpath.basename(path)
        if _extension(base) not in self.wanted:
            raise SourceError(
                f"input {self.input_url!r} is a file, not a folder of images "
                f"(use a .txt/.csv/.parquet manifest to list images)"
            )
        logger.info("input %s is a single image", self.input_url)
        return image_ref(base, full_uri(self.fs, path))

    def tree(self, root: str, entries: Iterator[dict]) -> Iterator[ImageRef]:
        """Every image under ``root`` (whose listing is ``entries``), depth first. Only one
        directory's listing is ever held: each is used up (and a used-up iterator holds none of
        its entries) before its files are yielded and the next directory is listed."""
        # Pending directories as (path, key); popped from the end, so pushed in reverse order.
        stack: list[tuple[str, str]] = []
        directory, dir_key = root, ""
        while True:
            subdirs = yield from self._directory(directory, dir_key, entries)
            prefix = _child_prefix(directory)
            subdirs.sort(reverse=True)
            stack.extend((prefix + base, key) for base, key in subdirs)
            if not stack:
                return
            directory, dir_key = stack.pop()
            entries = _entries(self.fs, directory, self.ordered)

    def _directory(
        self, directory: str, dir_key: str, entries: Iterator[dict]
    ) -> Generator[ImageRef, None, list[tuple[str, str]]]:
        """Yield one directory's images (files first, by name) and return its subdirectories
        as (name, key)."""
        self.counts["directories"] += 1
        prefix = _child_prefix(directory)
        files: list[tuple[str, str]] = []  # unordered listings only: sorted before yielding
        subdirs: list[tuple[str, str]] = []
        try:
            for entry in entries:
                kept = self._entry(entry, prefix, directory, dir_key)
                if kept is None:
                    continue
                kind, base, key = kept
                if kind == "directory":
                    subdirs.append((base, key))
                elif self.ordered:
                    yield self._image(prefix, base, key)  # as the pages come: never a whole listing held
                else:
                    files.append((base, key))
        except FileNotFoundError:
            # Deleted between its parent's listing and now: nothing left to label there.
            logger.warning("directory vanished during listing, skipped: %s", directory)
        except Exception as exc:
            raise SourceError(f"cannot list {full_uri(self.fs, directory)!r}: {one_line(exc)}") from exc
        files.sort()
        for base, key in files:
            yield self._image(prefix, base, key)
        return subdirs

    def _entry(self, entry: dict, prefix: str, directory: str, dir_key: str) -> tuple[str, str, str] | None:
        """What one listed entry is to the walk: ("directory" or "image", its name, its key), or
        None when it is skipped (each check counts or logs what it skips)."""
        name: str = entry["name"]
        base = self._base(name, prefix, directory, entry["type"] == "directory")
        if base is None or self._hidden_or_excluded(name, base):
            return None
        key = f"{dir_key}/{base}" if dir_key else base
        kind = self._kind(entry)
        if kind == "directory":
            return (kind, base, key) if self._listable_folder(name, key) else None
        if kind is None or not self._wanted(base):
            return None
        return "image", base, key

    def _base(self, name: str, prefix: str, directory: str, is_dir: bool) -> str | None:
        """The entry's own name within ``directory``, or None for what has no name of its own
        there: an entry outside it, an S3 folder marker ("a/") or a prefix with an empty
        segment ("a//"), which fsspec cannot list."""
        if not name.startswith(prefix):
            logger.warning("skipping %r: listed under %r but not inside it", name, directory)
            return None
        base = name[len(prefix) :].rstrip("/")
        if not base or "/" in base:
            if is_dir:  # S3 prefix "a//": fsspec strips the trailing '/', cannot list it
                logger.warning(
                    "skipping %s/: a prefix with an empty path segment cannot be listed",
                    full_uri(self.fs, name.rstrip("/")),
                )
            return None  # an S3 folder marker object ("a/"): not an image
        return base

    def _hidden_or_excluded(self, name: str, base: str) -> bool:
        """Whether the entry is hidden ('.git', '._x.jpg' resource forks) or under ``exclude``."""
        if base.startswith("."):
            self.counts["hidden"] += 1
            return True
        if is_under(name.rstrip("/"), self.excluded):
            logger.debug("excluded: %s", name)
            return True
        return False

    def _kind(self, entry: dict) -> str | None:
        """The entry's kind, "file" or "directory", or None for anything else, which is never
        opened: a FIFO would block its reader, a device never ends (symlinks: :func:`_local_kind`)."""
        kind = entry["type"] if entry["type"] in ("file", "directory") else _local_kind(self.fs, entry)
        if kind == "file" or kind == "directory":
            return kind
        self.counts["special"] += 1
        logger.debug("skipped (not a regular file or folder): %s", entry["name"])
        return None

    def _listable_folder(self, name: str, key: str) -> bool:
        """Whether a folder's name can be a key. s3fs would list another prefix
        ("a?versionId=x/" as "a/"): what is under it cannot be read under its own name either."""
        if is_safe_key(key):
            return True
        self.counts["unsafe_folders"] += 1
        logger.warning("skipping folder %s: its name cannot be a key", full_uri(self.fs, name))
        return False

    def _wanted(self, base: str) -> bool:
        """Whether a file's extension is one of the images asked for (others are counted)."""
        if _extension(base) in self.wanted:
            return True
        self.counts["other"] += 1
        return False

    def _image(self, prefix: str, base: str, key: str) -> ImageRef:
        ref = image_ref(key, full_uri(self.fs, prefix + base))
        self.counts["images"] += 1
        self.counts["unsafe"] += ref.error is not None
        return ref

    def log_totals(self) -> None:
        """The walk's closing lines: what it found and skipped."""
        counts = self.counts
        logger.info(
            "listed %s: %d images (%d with unsafe keys) in %d directories; "
            "skipped %d hidden and %d non-image entries",
            self.input_url, counts["images"], counts["unsafe"], counts["directories"],
            counts["hidden"], counts["other"],
        )
        if counts["special"]:
            logger.warning(
                "skipped %d entries under %s that are neither regular files nor folders (FIFOs, devices, "
                "symlinks to those or to folders)", counts["special"], self.input_url,
            )


def _local_kind(fs: Any, entry: dict) -> str:
    """What a listing entry of type "other" is: on a local disk, a symlink is followed to a
    regular file ("file"); a symlink to a folder is not followed (a loop would never end), and
    FIFOs, sockets, devices and dangling links are "special"."""
    if not is_local(fs) or not entry.get("islink"):
        return "special"
    try:
        target = os.stat(entry["name"])
    except OSError:
        return "special"
    return "file" if stat.S_ISREG(target.st_mode) else "special"


def _streams(fs: Any) -> bool:
    """Whether ``fs`` lists a directory page by page in key order (S3, not versioned)."""
    versioned = getattr(fs, "version_aware", False)
    return callable(getattr(fs, "_iterdir", None)) and not versioned and "s3" in protocols(fs)


def _entries(fs: Any, directory: str, ordered: bool) -> Iterator[dict]:
    """One directory's entries: page by page where the store streams them, else one ``ls``."""
    if ordered:
        return _s3_entries(fs, directory)
    try:
        return iter(fs.ls(directory, detail=True))
    except FileNotFoundError:
        return iter(())  # vanished since its parent was listed


def _first_listing(fs: Any, root: str, ordered: bool) -> tuple[Iterator[dict], str | None]:
    """The root's entries, or (when the root is a file) its path as the single image."""
    if not ordered:
        # ls() of a file returns that file alone (local and memory alike): no extra request.
        entries = fs.ls(root, detail=True)
        if len(entries) == 1 and entries[0]["type"] != "directory" and entries[0]["name"] == root:
            return iter(()), root
        return iter(entries), None
    entries = _s3_entries(fs, root)
    first = next(entries, None)  # the first page: a missing bucket or a denied listing fails here
    if first is not None:
        return itertools.chain([first], entries), None
    # Nothing under root/: a file, an empty bucket, or nothing at all (FileNotFoundError).
    info = fs.info(root)
    return iter(()), (root if info["type"] != "directory" else None)


# Entries fetched from the event loop at a time: one S3 page holds at most 1,000.
_PAGE = 1000


async def _take(entries: Any, n: int) -> list[dict]:
    taken: list[dict] = []
    try:
        for _ in range(n):
            taken.append(await entries.__anext__())
    except StopAsyncIteration:
        pass
    return taken


def _s3_entries(fs: Any, directory: str) -> Iterator[dict]:
    """A prefix's objects and sub-prefixes as S3 lists them (one request a page, UTF-8 key
    order), a page at a time: a flat prefix of 10^7 objects is never held whole. s3fs's own
    ``ls`` collects and caches the whole listing first."""
    from fsspec.asyn import sync
    from s3fs.errors import translate_boto_error

    bucket, key, _ = fs.split_path(directory)
    pages = fs._iterdir(bucket, prefix=f"{key.rstrip('/')}/" if key else "", delimiter="/")
    try:
        while True:
            try:
                page = sync(fs.loop, _take, pages, _PAGE)
            except Exception as exc:  # botocore's errors, as s3fs's own listing reports them
                translated = translate_boto_error(exc) if hasattr(exc, "response") else exc
                raise translated from exc
            if not page:
                return
            yield from page
    finally:
        sync(fs.loop, pages.aclose)


# ---------------------------------------------------------------------------------- manifests
