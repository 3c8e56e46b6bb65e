"""Sources stage: listing (local, memory, S3) and manifests (txt, csv, parquet)."""

from __future__ import annotations

import uuid

import fsspec
import pytest

from helpers import LONG, put
from seglabel.core.errors import SourceError
from seglabel.inputs.listing import DEFAULT_EXTENSIONS, iter_listing
from seglabel.inputs.refs import ImageRef


def keys(refs):
    return [r.key for r in refs]


# ------------------------------------------------------------------------------ is_safe_key


# ------------------------------------------------------------------------------ local listing

LOCAL_FILES = [
    "a.jpg", "B.JPG", "c.Png", "notes.txt", "noext", "jpg", ".hidden.jpg", ".git/x.jpg",
    "back\\slash.jpg", "sp ace/ü ñ.jpeg", "sub/y.TIFF", "sub/readme.md", "sub/deep/z.webp",
    "sub/deep/w.gif", "zz/q.bmp", "out/m.png", "output2/n.png",
]
# A directory's files (sorted), then its subdirectories depth first, in name order. The key of
# an unsafe name is recorded with its backslashes doubled (keys.printable: lossless).
LOCAL_ORDER = [
    "B.JPG", "a.jpg", "back\\\\slash.jpg", "c.Png", "out/m.png", "output2/n.png", "sp ace/ü ñ.jpeg",
    "sub/y.TIFF", "sub/deep/w.gif", "sub/deep/z.webp", "zz/q.bmp",
]


@pytest.fixture
def local_tree(tmp_path):
    root = tmp_path / "in put"
    for rel in LOCAL_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "empty").mkdir()
    return root


def test_local_listing_keys_uris_order(local_tree):
    refs = list(iter_listing(str(local_tree)))
    assert keys(refs) == LOCAL_ORDER
    assert all(r.uri == f"file://{local_tree}/{r.key}" for r in refs)
    assert [r.key for r in refs if r.error] == ["back\\\\slash.jpg"]
    assert {r.error for r in refs if r.error} == {"key: unsafe"}
    assert list(iter_listing(str(local_tree))) == refs  # deterministic


def test_local_listing_accepts_file_url_and_relative_path(local_tree, monkeypatch):
    expected = list(iter_listing(str(local_tree)))
    assert list(iter_listing(f"file://{local_tree}/")) == expected
    monkeypatch.chdir(local_tree.parent)
    assert list(iter_listing("./in put")) == expected


def test_local_listing_extensions(local_tree):
    refs = list(iter_listing(str(local_tree), extensions=["PNG", ".jpeg"]))
    assert keys(refs) == ["c.Png", "out/m.png", "output2/n.png", "sp ace/ü ñ.jpeg"]


def test_exclude_output_inside_input(local_tree, monkeypatch):
    got = keys(iter_listing(str(local_tree), exclude=[str(local_tree / "out")]))
    assert got == [k for k in LOCAL_ORDER if not k.startswith("out/")]
    assert "output2/n.png" in got  # a prefix is whole segments, not a string prefix
    # URL and relative forms are normalised like the input.
    assert keys(iter_listing(str(local_tree), exclude=[f"file://{local_tree}/out/"])) == got
    monkeypatch.chdir(local_tree)
    assert keys(iter_listing(str(local_tree), exclude=["./out", "s3://elsewhere/out"])) == got
    assert keys(iter_listing(str(local_tree), exclude=[str(local_tree)])) == []


def test_single_image_file_as_input(local_tree):
    assert list(iter_listing(str(local_tree / "sub" / "y.TIFF"))) == [
        ImageRef("y.TIFF", f"file://{local_tree}/sub/y.TIFF")
    ]
    with pytest.raises(SourceError, match="is a file"):
        list(iter_listing(str(local_tree / "notes.txt")))


def test_missing_local_input_is_one_line_error(tmp_path):
    with pytest.raises(SourceError) as info:
        list(iter_listing(str(tmp_path / "nope")))
    assert "not found" in str(info.value) and "\n" not in str(info.value)
    assert "nope" in str(info.value)


def test_local_ls_one_directory_per_call(local_tree, monkeypatch):
    fs = fsspec.filesystem("file")
    sizes = {}
    real_ls = fs.ls

    def spy_ls(path, detail=True, **kw):
        out = real_ls(path, detail=detail, **kw)
        assert detail is True
        sizes[path] = len(out)
        return out

    monkeypatch.setattr(fs, "ls", spy_ls)
    list(iter_listing(str(local_tree)))
    # Every visible directory listed once, each call returning only that directory's children.
    rel = {p[len(str(local_tree)):].lstrip("/") for p in sizes}
    assert rel == {"", "empty", "out", "output2", "sp ace", "sub", "sub/deep", "zz"}
    assert max(sizes.values()) == 15  # the root's own entries (incl. hidden / non-images)


# ------------------------------------------------------------------------------ memory listing

MEM_FILES = ["r1.jpg", "r0.png", "d1/a.jpg", "d1/b.jpg", "d1/c.txt", "d1/e/f.jpg", "d2/g.jpg",
             "d2/.h/i.jpg"]


@pytest.fixture
def spy_memory(monkeypatch):
    """A memory tree, and a memory filesystem where anything but ls() is a test failure."""
    fs = fsspec.filesystem("memory")
    root = f"/seglabel-{uuid.uuid4().hex}"
    for rel in MEM_FILES:
        fs.pipe(f"{root}/{rel}", b"x")
    events = []

    def forbidden(name):
        def fail(*a, **kw):
            raise AssertionError(f"per-object or whole-tree call: fs.{name}{a}")
        return fail

    for name in ("info", "find", "walk", "glob", "exists", "isdir", "isfile", "size", "du",
                 "cat", "open", "ukey", "modified"):
        monkeypatch.setattr(fs, name, forbidden(name))
    real_ls = fs.ls

    def spy_ls(path, detail=True, **kw):
        assert detail is True
        out = real_ls(path, detail=detail, **kw)
        events.append(("ls", path, len(out)))
        return out

    monkeypatch.setattr(fs, "ls", spy_ls)
    yield fs, root, events
    monkeypatch.undo()
    fs.rm(root, recursive=True)


def test_memory_listing_streams_one_directory_at_a_time(spy_memory):
    fs, root, events = spy_memory
    # For each image, how many listings had been made when it came out: after ls(D) come
    # exactly D's images, before the next ls — never the whole tree first.
    seen = [(ref, len(events)) for ref in iter_listing(f"memory://{root}")]
    assert [(r.key, n) for r, n in seen] == [
        ("r0.png", 1), ("r1.jpg", 1), ("d1/a.jpg", 2), ("d1/b.jpg", 2), ("d1/e/f.jpg", 3),
        ("d2/g.jpg", 4),
    ]
    assert all(r.uri == f"memory://{root}/{r.key}" and r.error is None for r, _ in seen)
    # One ls per visible directory, each returning only that directory's own children.
    listed = [(path[len(root):].lstrip("/"), n) for _, path, n in events]
    assert listed == [("", 4), ("d1", 4), ("d1/e", 1), ("d2", 2)]


def test_memory_missing_input(spy_memory):
    with pytest.raises(SourceError, match="not found"):
        list(iter_listing("memory:///seglabel-does-not-exist"))


# ------------------------------------------------------------------------------ S3 listing


def test_s3_listing(s3_bucket, monkeypatch, caplog):
    from s3fs import S3FileSystem

    put(s3_bucket, {k: b"x" for k in [
        "pre/a.jpg", "pre/notes.txt", "pre/ü name.PNG", f"pre/{LONG}", "pre/", "pre//x.jpg",
        "pre/./y.jpg", "pre/../z.jpg", "pre/sub/b.JPG", "pre/sub/.hidden.png", "pre/sub/",
        "pre/sub/deeper/c.webp", "prefix2/d.jpg", "top.jpg",
    ]})
    calls = []
    real_call = S3FileSystem._call_s3

    async def spy_call(self, method, *args, **kwargs):
        calls.append((method, kwargs.get("Prefix")))
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(S3FileSystem, "_call_s3", spy_call)
    with caplog.at_level("WARNING", logger="seglabel.inputs.listing"):
        refs = list(iter_listing(f"s3://{s3_bucket}/pre"))
    # "pre//x.jpg" cannot be listed through fsspec: said, not looped on, not silently lost.
    assert any("empty path segment" in r.getMessage() for r in caplog.records)
    assert keys(refs) == ["a.jpg", f"{LONG}", "ü name.PNG", "sub/b.JPG", "sub/deeper/c.webp"]
    assert [r.uri for r in refs] == [f"s3://{s3_bucket}/pre/{r.key}" for r in refs]
    assert [r.key for r in refs if r.error == "key: unsafe"] == [LONG]
    # One list request per directory, no HEAD (or any other) request per object.
    assert calls == [("list_objects_v2", "pre/"), ("list_objects_v2", "pre/sub/"),
                     ("list_objects_v2", "pre/sub/deeper/")]
    # Not cached: an object added since is seen by the next listing in this process.
    put(s3_bucket, {"pre/sub/new.jpg": b"x"})
    assert "sub/new.jpg" in keys(iter_listing(f"s3://{s3_bucket}/pre"))
    # Exclude with the S3 URL form.
    assert keys(iter_listing(f"s3://{s3_bucket}/pre/", exclude=[f"s3://{s3_bucket}/pre/sub"])) == [
        "a.jpg", f"{LONG}", "ü name.PNG"]


def test_s3_missing_prefix_and_bucket(s3_bucket):
    with pytest.raises(SourceError, match="not found") as info:
        list(iter_listing(f"s3://{s3_bucket}/nothing-here"))
    assert "\n" not in str(info.value)
    with pytest.raises(SourceError, match="not found") as info:
        list(iter_listing("s3://seglabel-no-such-bucket/x"))
    assert "\n" not in str(info.value) and "seglabel-no-such-bucket" in str(info.value)


# ------------------------------------------------------------------------------ manifests


def test_default_extensions():
    assert DEFAULT_EXTENSIONS == {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}


def test_s3_flat_prefix_is_streamed_page_by_page(s3_bucket, monkeypatch):
    """A flat prefix is read a page (1,000 keys) at a time, in key order: the first images are
    yielded after the first request, before the listing is complete."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from s3fs import S3FileSystem

    client = boto3.client("s3")
    names = [f"flat/{i:05d}.jpg" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_bucket, Key=k, Body=b"x"), names))
    calls = []
    real_call = S3FileSystem._call_s3

    async def spy_call(self, method, *args, **kwargs):
        calls.append(method)
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(S3FileSystem, "_call_s3", spy_call)
    refs = iter_listing(f"s3://{s3_bucket}/flat")
    first = next(refs)
    assert first.key == "00000.jpg" and calls == ["list_objects_v2"]
    rest = list(refs)
    assert [first.key] + keys(rest) == [n.split("/", 1)[1] for n in names]
    assert calls == ["list_objects_v2"] * 2
