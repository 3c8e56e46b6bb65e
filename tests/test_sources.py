"""Sources stage: listing (local, memory, S3) and manifests (txt, csv, parquet)."""

from __future__ import annotations

import gzip
import uuid

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from seglabel.core.errors import SourceError
from seglabel.core.keys import is_safe_key
from seglabel.inputs import manifest as manifests
from seglabel.inputs.listing import DEFAULT_EXTENSIONS, iter_listing
from seglabel.inputs.manifest import iter_manifest
from seglabel.inputs.refs import ImageRef
from seglabel.storage.filesystem import full_uri

# A key's last segment becomes "<segment>.png": 251 bytes at most, so that it fits in 255.
LONG = "x" * 248 + ".jpg"  # 252 bytes: one over the limit
LONG_OK = "x" * 247 + ".jpg"  # 251 bytes


def keys(refs):
    return [r.key for r in refs]


# ------------------------------------------------------------------------------ is_safe_key


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


def test_full_uri_has_protocol(tmp_path):
    local = fsspec.filesystem("file")
    assert full_uri(local, str(tmp_path / "a b.jpg")) == f"file://{tmp_path}/a b.jpg"
    assert full_uri(fsspec.filesystem("s3"), "bkt/x/y.jpg") == "s3://bkt/x/y.jpg"
    assert full_uri(fsspec.filesystem("memory"), "/r/x.jpg") == "memory:///r/x.jpg"


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


def put(bucket, objects):
    import boto3

    client = boto3.client("s3")
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


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


def each_key_once(refs):
    """The refs in order, a key's first ref only: what a job makes of a manifest."""
    seen = set()
    return [r for r in refs if not (r.key in seen or seen.add(r.key))]


def manifest_expectations(tmp_path):
    """Entries of a manifest in tmp_path/m/ and the refs they must give, in order, each image
    once (entries 3, 4, 6 and 7 repeat earlier images: the manifest yields them all, the job
    keeps the first)."""
    d = str(tmp_path)
    entries = [
        "a.jpg", "./img/b.jpg", "../up.jpg", f"{d}/m/a.jpg", f"file://{d}/m/img/b.jpg",
        "s3://bkt/x/y.jpg", "s3://bkt/x/y.jpg", "s3a://bkt/x/y.jpg", "s3://bkt/x/../e.jpg",
        f"s3://bkt/{LONG}", "memory:///mm/sp ace é.png",
    ]
    expected = [
        ImageRef(f"{d[1:]}/m/a.jpg", f"file://{d}/m/a.jpg"),
        ImageRef(f"{d[1:]}/m/img/b.jpg", f"file://{d}/m/img/b.jpg"),
        ImageRef(f"{d[1:]}/up.jpg", f"file://{d}/up.jpg"),
        ImageRef("bkt/x/y.jpg", "s3://bkt/x/y.jpg"),
        ImageRef("bkt/x/../e.jpg", "s3://bkt/x/../e.jpg", "key: unsafe"),
        ImageRef(f"bkt/{LONG}", f"s3://bkt/{LONG}", "key: unsafe"),
        ImageRef("mm/sp ace é.png", "memory:///mm/sp ace é.png"),
    ]
    return entries, expected


def test_txt_manifest(tmp_path):
    entries, expected = manifest_expectations(tmp_path)
    (tmp_path / "m").mkdir()
    text = "# images\n\n" + "\n".join(entries[:3]) + "\n   \n#" + entries[3] + "\n" + "\n".join(
        entries) + "\r\n"
    (tmp_path / "m" / "list.txt").write_text(text, encoding="utf-8")
    refs = list(iter_manifest(str(tmp_path / "m" / "list.txt")))
    assert len(refs) == 3 + len(entries) and each_key_once(refs) == expected
    with gzip.open(tmp_path / "m" / "list.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    assert each_key_once(iter_manifest(f"file://{tmp_path}/m/list.txt.gz")) == expected


def test_csv_and_parquet_manifests(tmp_path):
    entries, expected = manifest_expectations(tmp_path)
    (tmp_path / "m").mkdir()
    table = pa.table({"id": list(range(len(entries))), "uri": entries})
    pacsv.write_csv(table, tmp_path / "m" / "list.csv")
    pq.write_table(table, tmp_path / "m" / "list.parquet", row_group_size=3)
    for name in ("list.csv", "list.parquet"):
        refs = list(iter_manifest(str(tmp_path / "m" / name)))
        assert len(refs) == len(entries) and each_key_once(refs) == expected


def test_manifests_are_streamed(tmp_path, monkeypatch):
    n = 5000
    uris = [f"s3://bkt/{i:05d}.jpg" for i in range(n)] + ["s3://bkt/00000.jpg"]
    pq.write_table(pa.table({"uri": uris}), tmp_path / "l.parquet", row_group_size=1000)
    pacsv.write_csv(pa.table({"uri": uris}), tmp_path / "l.csv")

    def whole_file(*a, **kw):
        raise AssertionError("read the whole manifest at once")

    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    monkeypatch.setattr(pacsv, "read_csv", whole_file)
    batches = []
    real_iter = pq.ParquetFile.iter_batches

    def spy_iter(self, *a, **kw):
        for b in real_iter(self, *a, **kw):
            batches.append(b.num_rows)
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy_iter)
    monkeypatch.setattr(manifests, "_BATCH_ROWS", 1000)
    it = iter_manifest(str(tmp_path / "l.parquet"))
    assert next(it).key == "bkt/00000.jpg" and batches == [1000]  # first batch only
    assert len(list(it)) == n  # the repeated URI too: the job counts it once
    assert len(list(iter_manifest(str(tmp_path / "l.csv")))) == n + 1


def test_manifest_missing_uri_column(tmp_path):
    table = pa.table({"path": ["a.jpg"], "label": ["x"]})
    pacsv.write_csv(table, tmp_path / "l.csv")
    pq.write_table(table, tmp_path / "l.parquet")
    for name in ("l.csv", "l.parquet"):
        with pytest.raises(SourceError, match=r"no 'uri' column \(columns: path, label\)"):
            list(iter_manifest(str(tmp_path / name)))


def test_manifest_errors_are_one_line(tmp_path):
    (tmp_path / "l.json").write_text("[]")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "u.txt").write_text("gs-nope://b/x.jpg\n")
    cases = [
        (tmp_path / "missing.txt", "not found"),
        (tmp_path / "l.json", "unknown format"),
        (tmp_path / "bad.parquet", "cannot read manifest"),
        (tmp_path / "u.txt", "cannot read gs-nope:// URIs"),
    ]
    for path, message in cases:
        with pytest.raises(SourceError, match=message) as info:
            list(iter_manifest(str(path)))
        assert "\n" not in str(info.value)


def test_s3_manifest_relative_entries(s3_bucket):
    body = "img/a.jpg\n../top.jpg\n./img/a.jpg\ns3://other/x.jpg\n/abs/local.jpg\n"
    put(s3_bucket, {"m/list.txt": body.encode()})
    assert each_key_once(iter_manifest(f"s3://{s3_bucket}/m/list.txt")) == [
        ImageRef(f"{s3_bucket}/m/img/a.jpg", f"s3://{s3_bucket}/m/img/a.jpg"),
        ImageRef(f"{s3_bucket}/top.jpg", f"s3://{s3_bucket}/top.jpg"),
        ImageRef("other/x.jpg", "s3://other/x.jpg"),
        ImageRef("abs/local.jpg", "file:///abs/local.jpg"),
    ]
    with pytest.raises(SourceError, match="not found"):
        list(iter_manifest(f"s3://{s3_bucket}/m/missing.txt"))


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


def test_a_malformed_manifest_line_is_an_error_row_not_a_stopped_job(tmp_path):
    from seglabel.inputs.manifest import iter_manifest

    manifest = tmp_path / "list.txt"
    manifest.write_text(f"http://[/x.jpg\n{tmp_path}/a.jpg\n")
    refs = list(iter_manifest(str(manifest)))
    assert [(r.key, r.error) for r in refs] == [
        ("http://[/x.jpg", "key: not a valid URI"), (f"{str(tmp_path).lstrip('/')}/a.jpg", None)]
