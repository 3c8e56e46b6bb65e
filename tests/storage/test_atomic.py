"""Atomic writes: a file lands exactly at its path, whole, or not at all."""

from __future__ import annotations

import os

import pytest

from seglabel.outputs.store import OutputStore
from seglabel.storage.atomic import is_temporary, open_atomic, write_atomic


def test_a_write_lands_exactly_at_its_path_or_fails(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    uri = store.write_mask("x.jpg", b"png")
    assert uri == (tmp_path / "out" / "masks" / "x.jpg.png").as_uri()
    # A folder where the file should go: the write fails, and nothing moves into the folder.
    (tmp_path / "out" / "masks" / "y.jpg.png").mkdir()
    with pytest.raises(OSError):
        store.write_mask("y.jpg", b"png")
    assert os.listdir(tmp_path / "out" / "masks" / "y.jpg.png") == []
    assert not [n for n in os.listdir(tmp_path / "out" / "masks") if is_temporary(n)]


def test_open_atomic_shows_nothing_until_complete(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    target = tmp_path / "a" / "file.json"
    with pytest.raises(RuntimeError):
        with open_atomic(fs, str(target)) as f:
            f.write(b"half")
            assert not target.exists()
            raise RuntimeError("failed while writing")
    assert not target.exists() and os.listdir(tmp_path / "a") == []
    write_atomic(fs, str(target), b"whole")
    assert target.read_bytes() == b"whole"
