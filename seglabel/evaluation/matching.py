"""Which output key a truth image's name is: the equal key, else the key sharing the most whole
``/`` segments with it (either direction), never one of two equal fits (:class:`KeyMatcher`)."""

from __future__ import annotations

import posixpath
from typing import Iterable, Iterator
from urllib.parse import urlsplit

from ..core.errors import EvalError


def _normal(name: str) -> str:
    """A truth name as a key would have it: no scheme (nor an http(s) URL's query, which keys
    never hold), no leading './' or '/'."""
    if name.startswith(("http://", "https://")):
        parts = urlsplit(name)
        name = parts.netloc.rsplit("@", 1)[-1] + parts.path
    elif "://" in name:
        name = name.split("://", 1)[1]
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:].lstrip("/")
    return name


def _tails(path: str) -> Iterator[str]:
    """``a/b/c`` -> ``b/c``, ``c``: the whole-segment tails of a path, longest first."""
    parts = path.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[i:])


def _segments(path: str) -> int:
    return path.count("/") + 1


_AMBIGUOUS = -1


_EXACT = 1 << 30


class KeyMatcher:
    """Which truth image each of the output's keys is.

    A truth name matches the key equal to it (a truth ``file_name`` is the key when the job's
    input was the folder the truth's names are relative to), else, by whole '/' segments, a
    key that ends with it (the job's input was a parent folder: ``val2017/x.jpg`` for
    ``x.jpg``) or that it ends with (the truth names a parent folder, or is a full path or URL
    of the image: ``s3://b/photos/x.jpg`` or ``photos/x.jpg`` for the key ``x.jpg``). The match
    sharing the most segments wins, an exact one over any; where two share the most, neither is
    taken: a truth image two keys fit equally is ambiguous (reported, never scored), and a key
    two truth images fit equally matches none. ``strip_extension``: a key also matches without
    its extension (semantic truth PNGs are named ``x.png`` for ``x.jpg``; ``x.jpg.png``, as the
    job's masks, works too).
    """

    def __init__(self, names: Iterable[str], strip_extension: bool = False):
        self.strip_extension = strip_extension
        self.exact: dict[str, int] = {}
        self.tails: dict[str, int] = {}
        for index, name in enumerate(names):
            normal = _normal(name)
            if normal in self.exact:
                raise EvalError(f"the truth names one image twice: {name!r}")
            self.exact[normal] = index
            for tail in _tails(normal):
                self.tails[tail] = _AMBIGUOUS if tail in self.tails else index
        # truth index -> (segments shared, key); key None: two keys share the most.
        self.found: dict[int, tuple[int, str | None]] = {}

    def _find(self, key: str) -> tuple[int, int] | None:
        """(truth index, segments shared) of the truth image a key fits best, or None."""
        names = [key, posixpath.splitext(key)[0]] if self.strip_extension else [key]
        candidates: dict[int, int] = {}
        for name in names:
            fits = [(self.exact.get(name), _EXACT), (self.tails.get(name), _segments(name))]
            fits += [(self.exact[t], _segments(t)) for t in _tails(name) if t in self.exact]
            for index, shared in fits:
                if index is not None:
                    candidates[index] = max(shared, candidates.get(index, 0))
        if not candidates:
            return None
        best = max(candidates.values())
        winners = [index for index, shared in candidates.items() if shared == best]
        if len(winners) > 1 or winners[0] == _AMBIGUOUS:
            return None
        return winners[0], best

    def add(self, key: str) -> bool:
        """Record an output key; whether it fits a truth image (it may still lose it to a key
        that fits it better)."""
        found = self._find(key)
        if found is None:
            return False
        index, shared = found
        before = self.found.get(index)
        if before is None or shared > before[0]:
            self.found[index] = (shared, key)
        elif shared == before[0] and before[1] != key:
            self.found[index] = (shared, None)
        return True

    def matched(self) -> dict[int, str]:
        """Truth index -> its key, for the truth images matched without ambiguity."""
        return {index: key for index, (_, key) in self.found.items() if key is not None}

    def is_ambiguous(self, index: int) -> bool:
        """Whether two keys fit truth image ``index`` equally well."""
        return index in self.found and self.found[index][1] is None
