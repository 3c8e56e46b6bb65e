"""Keys: which are safe to make a file of, their 64-bit hashes, and the sets of them the driver
keeps (8 bytes a key, one bit a to-do row)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import LONG, LONG_OK
from seglabel.core.keys import (
    Bits,
    HashSet,
    HashSpool,
    SortedHashes,
    hash64,
    is_safe_key,
    key_hashes,
    repeated,
)


def test_key_hashes_and_sorted_hashes():
    keys = [f"a/{i % 700}.jpg" for i in range(1000)]  # 300 repeats
    done = SortedHashes(key_hashes(keys))
    assert len(done) == 700
    assert all(k in done for k in keys[:700])
    assert "a/700.jpg" not in done and "b/1.jpg" not in done
    assert len(SortedHashes()) == 0 and "x" not in SortedHashes()
    assert key_hashes(["x", "y"]).tolist() == [hash64("x"), hash64("y")]
    assert hash64("\udcff.jpg") != hash64("\udcfe.jpg")  # undecodable names hash, distinctly
    # A member's first visit is told from its repeats, across calls and within one.
    index = done.find(key_hashes(["a/1.jpg", "zzz", "a/1.jpg", "a/2.jpg"]))
    assert index[1] == -1 and index[0] == index[2] >= 0
    assert done.first_visits(index[[0, 2, 3]]).tolist() == [True, False, True]
    assert done.first_visits(index[[3, 0]]).tolist() == [False, False]


def test_hash_set_tells_new_from_seen_like_a_python_set():
    rng = np.random.default_rng(0)
    hashes, reference = HashSet(), set()
    for _ in range(300):
        batch = rng.integers(0, 20_000, 97).astype(np.uint64)
        expected = []
        for value in batch.tolist():
            expected.append(value not in reference)
            reference.add(value)
        assert hashes.add_new(batch).tolist() == expected
    assert len(hashes) == len(reference)


def test_hash_spool_spills_and_reads_back_sorted():
    values = np.random.default_rng(1).integers(0, 2**63, 10_000).astype(np.uint64)
    spool = HashSpool(spill_bytes=4096)  # spills to its temporary file many times
    for chunk in np.array_split(values, 37):
        spool.add(chunk)
    assert spool.sorted().tolist() == sorted(values.tolist())
    assert repeated(np.array([1, 2, 2, 3, 5, 5, 5], np.uint64)).tolist() == [2, 5]
    assert repeated(np.array([1, 2, 3], np.uint64)).tolist() == []


@pytest.mark.parametrize(
    "key",
    ["a.jpg", "a/b/c.png", "sp ace/ü ñ.jpeg", "..a/b..c/...", LONG_OK, "é" * 125 + "x", "x" * 255 + "/a.jpg"],
)
def test_safe_keys(key):
    assert is_safe_key(key)


@pytest.mark.parametrize(
    "key",
    ["", "/a.jpg", "a//b.jpg", "a/", "./a.jpg", "a/./b.jpg", "../a.jpg", "a/../b.jpg", "a/..",
     "a\\b.jpg", "a\x00b.jpg", LONG, "é" * 126, "x" * 256 + "/a.jpg", "bad\udcff.jpg", "a.png?versionId=1"],
)
def test_unsafe_keys(key):
    assert not is_safe_key(key)


def test_committed_rows_are_one_bit_each():
    committed = Bits(10)
    assert committed._bits.nbytes == 2
    assert committed.first(np.array([3, 9, 3, 0])).tolist() == [True, True, False, True]
    assert committed.first(np.array([9, 1])).tolist() == [False, True]
