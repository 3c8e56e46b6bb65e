"""Image keys: the one rule for which keys are safe, the 64-bit hashes that stand for them, and
sets of those hashes small enough for 10^8 keys on one driver.

A key (DESIGN.md's output contract) is an image's path relative to the input root, or a
manifest URI without its scheme; it names the image's mask under the output
(``masks/<key>.png``) and every file an export writes for it. Every stage that turns a key into
a path checks it with :func:`is_safe_key`, so that a key from a listing, a manifest or a
tampered Parquet row can never name a file outside the folder it is written under.

The driver remembers keys as 64-bit hashes in numpy arrays, never as Python objects (a set of
10^8 strings needs tens of GB; of ints, 8 GB): :class:`HashSpool` collects them (spilling to a
temporary file past 1 MiB, so that sorting holds one copy), :class:`SortedHashes` is a fixed set
(8 bytes a key, one more bit to remember which members were met), :class:`HashSet` a growing one
(8 bytes a key, 16 while its two largest runs merge). Two different keys share a hash with
probability about n²/2^65: 3·10^-4 for 10^8 keys. The consequence is one image taken for
another: skipped as already done, or as a repeat.
"""

from __future__ import annotations

import hashlib
import tempfile
from typing import IO, Iterable

import numpy as np

UNSAFE_KEY_ERROR = "key: unsafe"

# Linux (ext4, xfs, ...) and most object-store-to-disk tools cap one name at 255 bytes; a longer
# segment could never be written as a mask file, so it is refused up front.
MAX_SEGMENT_BYTES = 255
# Every file written for a key is named "<key>.png" (masks, panoptic exports, previews).
MASK_SUFFIX = ".png"


def is_safe_key(key: str) -> bool:
    """Whether ``key`` can only name a file inside the output folder, on any storage.

    False for an empty key, a leading '/', a backslash or NUL anywhere, "?versionId=" anywhere
    (s3fs takes what follows for an object version: ``a.jpg.png?versionId=1.jpg`` would read
    or write ``a.jpg.png``), and any '/'-separated segment that is empty, '.', '..', over 255
    bytes of UTF-8 (251 for the last: its files are "<key>.png"), or not encodable as UTF-8
    (undecodable local file names arrive as lone surrogates, which Parquet cannot store either;
    see :func:`printable`). Other characters object stores allow ('?', '#', '%', '::',
    spaces) round-trip as they are.
    """
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        return False
    if "?versionId=" in key:
        return False  # s3fs reads it as a version: the object or mask would be another one
    segments = key.split("/")
    for i, segment in enumerate(segments):
        if segment in ("", ".", ".."):
            return False
        # The last segment becomes "<segment>.png": it must fit in one name with its suffix.
        limit = MAX_SEGMENT_BYTES - (len(MASK_SUFFIX) if i == len(segments) - 1 else 0)
        try:
            if len(segment.encode("utf-8")) > limit:
                return False
        except UnicodeEncodeError:
            return False
    return True


def printable(text: str) -> str:
    """``text`` storable as UTF-8, losslessly: a name that is not valid UTF-8 (a local file name
    decoded with surrogate escapes) gets each undecodable byte as ``\\xNN`` and each backslash
    doubled; any other text is returned as it is. Two different names never give one result."""
    if "\\" not in text and not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    out = []
    for c in text:
        if "\udc80" <= c <= "\udcff":
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        else:
            out.append("\\\\" if c == "\\" else c)
    return "".join(out)


def hash64(text: str) -> int:
    """A 64-bit hash of a string (blake2b), to remember 10^8 keys or URIs in little memory."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """64-bit hashes of keys, as a uint64 array (each equal to :func:`hash64` of its key)."""
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest() for k in keys])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64, copy=False)


# Hashes a HashSpool holds in memory before it writes them to a temporary file (1 MiB). Small
# on purpose: chunks freed from the heap stay resident (the allocator keeps them), so every
# byte held here before sorting would count twice at the sort.
SPILL_BYTES = 1 << 20
_EMPTY = np.zeros(0, dtype=np.uint64)


class HashSpool:
    """Hashes collected as they come: in memory up to ``spill_bytes``, then in a temporary
    file, so that :meth:`sorted` reads them back into the only full copy in memory (8 bytes a
    hash; a list of chunks joined in memory would need twice that at once)."""

    def __init__(self, spill_bytes: int = SPILL_BYTES):
        self._spill_bytes = spill_bytes
        self._chunks: list[np.ndarray] = []
        self._held = 0
        self._file: IO[bytes] | None = None
        self.count = 0

    def add(self, hashes: np.ndarray) -> None:
        """Add some hashes (a uint64 array)."""
        hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self._chunks.append(hashes)
        self._held += hashes.nbytes
        self.count += len(hashes)
        if self._held >= self._spill_bytes:
            self._spill()

    def _spill(self) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="seglabel-hashes-")
        for chunk in self._chunks:
            self._file.write(memoryview(chunk))
        self._chunks.clear()
        self._held = 0

    def sorted(self) -> np.ndarray:
        """Every hash added, sorted (repeats kept); the spool is empty afterwards."""
        if self._file is None:
            # Chunk by chunk into one array, each chunk let go once copied: the array's pages
            # become resident as they are written, so the two never add up.
            out = np.empty(self.count, dtype=np.uint64)
            position = 0
            while self._chunks:
                chunk = self._chunks.pop(0)
                out[position : position + len(chunk)] = chunk
                position += len(chunk)
                del chunk
        else:
            self._spill()
            self._file.seek(0)
            out = np.fromfile(self._file, dtype=np.uint64, count=self.count)
            self._file.close()
            self._file = None
        self._chunks, self._held, self.count = [], 0, 0
        out.sort()  # in place: no second copy
        return out


def repeated(sorted_hashes: np.ndarray) -> np.ndarray:
    """The values that occur more than once in a sorted array (each once, sorted)."""
    if len(sorted_hashes) < 2:
        return _EMPTY.copy()
    same = sorted_hashes[1:] == sorted_hashes[:-1]
    return np.unique(sorted_hashes[1:][same]) if same.any() else _EMPTY.copy()


def _drop_repeats(sorted_hashes: np.ndarray) -> np.ndarray:
    if len(sorted_hashes) < 2:
        return sorted_hashes
    same = sorted_hashes[1:] == sorted_hashes[:-1]
    if not same.any():
        return sorted_hashes  # the usual case: no second copy
    keep = np.ones(len(sorted_hashes), dtype=bool)
    keep[1:] = ~same
    return sorted_hashes[keep]


class SortedHashes:
    """A fixed set of key hashes as one sorted uint64 array: 8 bytes a key (10^8 keys: 800 MB).

    Membership is a binary search (:meth:`find`, vectorised); :meth:`first_visits` remembers
    which members were met already, in one bit per member, so that a stream can tell a
    member's first appearance from a repeat without a second set.
    """

    def __init__(self, hashes: np.ndarray | None = None, *, is_sorted: bool = False):
        hashes = _EMPTY.copy() if hashes is None else np.asarray(hashes, dtype=np.uint64)
        if not is_sorted:
            hashes = np.sort(hashes)
        self._hashes = _drop_repeats(hashes)
        self._visited: Bits | None = None

    @classmethod
    def from_spool(cls, spool: HashSpool) -> "SortedHashes":
        """The set of a spool's hashes (the spool is emptied)."""
        return cls(spool.sorted(), is_sorted=True)

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, key: str) -> bool:
        return bool(self.find(np.array([hash64(key)], dtype=np.uint64))[0] >= 0)

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """Each hash's position in the set, or -1 where it is not a member."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        index = np.searchsorted(self._hashes, hashes)
        found = index < len(self._hashes)
        found[found] = self._hashes[index[found]] == hashes[found]
        return np.where(found, index, -1)

    def first_visits(self, index: np.ndarray) -> np.ndarray:
        """For positions of members (from :meth:`find`): True where that member is met for the
        first time (earlier calls and earlier in ``index`` count), and remember it."""
        if self._visited is None:
            self._visited = Bits(len(self._hashes))
        return self._visited.first(index)


class Bits:
    """One bit for each of ``n`` positions, to remember which were met: 10^8 positions take
    12.5 MB."""

    def __init__(self, n: int):
        self._bits = np.zeros((n + 7) // 8, dtype=np.uint8)

    def first(self, positions: np.ndarray) -> np.ndarray:
        """True for the positions not met before (nor earlier in ``positions``); marks them."""
        positions = np.asarray(positions, dtype=np.int64)
        first = np.zeros(len(positions), dtype=bool)
        unique, where = np.unique(positions, return_index=True)
        byte, bit = unique >> 3, np.left_shift(1, unique & 7).astype(np.uint8)
        new = (self._bits[byte] & bit) == 0
        first[where[new]] = True
        np.bitwise_or.at(self._bits, byte[new], bit[new])
        return first


class HashSet:
    """A growing set of hashes, for de-duplicating a stream.

    Sorted runs whose sizes shrink from the oldest to the newest, the two newest merged while
    the newer is at least as large (a binary counter): about log2(n / batch) runs, so that
    membership is that many binary searches per batch. 8 bytes a hash; 16 for the moment the
    two largest runs merge.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """True where a hash is in the set."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        known = np.zeros(len(hashes), dtype=bool)
        for run in self._runs:
            index = np.searchsorted(run, hashes)
            inside = index < len(run)
            known[inside] |= run[index[inside]] == hashes[inside]
        return known

    def add_new(self, hashes: np.ndarray) -> np.ndarray:
        """Add ``hashes``; returns True where a hash was not in the set before (its first
        occurrence in ``hashes`` counts as new, any later one does not)."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        values, where = np.unique(hashes, return_index=True)
        known = self.contains(values)
        new = np.zeros(len(hashes), dtype=bool)
        new[where[~known]] = True
        self._push(values[~known])
        return new

    def _push(self, run: np.ndarray) -> None:
        if not len(run):
            return
        self._runs.append(run)
        while len(self._runs) > 1 and len(self._runs[-1]) >= len(self._runs[-2]):
            newer, older = self._runs.pop(), self._runs.pop()
            merged = np.concatenate((older, newer))
            del newer, older
            merged.sort()
            self._runs.append(merged)
