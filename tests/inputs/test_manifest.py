"""Manifests (txt, csv, parquet, compressed, on S3): streamed, each entry's key, bad lines as
error rows, errors in one line."""

from __future__ import annotations

import gzip

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from helpers import LONG, put
from seglabel.core.errors import SourceError
from seglabel.inputs import manifest as manifests
from seglabel.inputs.manifest import iter_manifest
from seglabel.inputs.refs import ImageRef


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


def test_a_malformed_manifest_line_is_an_error_row_not_a_stopped_job(tmp_path):
    from seglabel.inputs.manifest import iter_manifest

    manifest = tmp_path / "list.txt"
    manifest.write_text(f"http://[/x.jpg\n{tmp_path}/a.jpg\n")
    refs = list(iter_manifest(str(manifest)))
    assert [(r.key, r.error) for r in refs] == [
        ("http://[/x.jpg", "key: not a valid URI"), (f"{str(tmp_path).lstrip('/')}/a.jpg", None)]
