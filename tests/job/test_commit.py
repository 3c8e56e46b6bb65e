"""The driver's commit: parts cut by rows or bytes, repeated rows dropped, what was committed said."""

from __future__ import annotations

import pyarrow as pa
from readback import read_rows

from seglabel.job import commit
from seglabel.outputs.contract import SCHEMA
from seglabel.outputs.store import OutputStore


def big_rows(start: int, n: int, rle_bytes: int) -> pa.Table:
    """Contract rows whose one segment carries an RLE of ``rle_bytes`` (as large photos do)."""
    segment = {"id": 1, "label_id": 0, "label": "x", "score": 0.9, "area": 1, "bbox": [0.0, 0.0, 1.0, 1.0],
               "rle": "a" * rle_bytes, "is_thing": None}
    table = pa.Table.from_pylist([
        {"key": f"{i}.jpg", "image_uri": f"file:///in/{i}.jpg", "status": "ok", "error": None, "width": 1,
         "height": 1, "mask_uri": f"file:///out/masks/{i}.jpg.png", "task": "instance", "model": "m",
         "segments": [segment], "review_score": 0.5}
        for i in range(start, start + n)
    ], schema=SCHEMA)
    table = table.append_column("actor", pa.array(["a"] * n, pa.string()))
    return table.append_column("index", pa.array(range(start, start + n), pa.int64()))


def test_parts_are_committed_by_bytes_and_repeated_rows_dropped(ray_session, tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(commit, "PART_MAX_BYTES", 1 << 20)
    # 40 rows of about 100 kB each, one batch of them sent twice (a retried task).
    batches = [big_rows(start, 8, 100_000) for start in range(0, 40, 8)]
    ds = ray.data.from_arrow(batches + [batches[1]])
    store = OutputStore(str(tmp_path / "out"))
    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    summary = commit.commit_rows(batches, store, "run", 40, rows_per_part=10_000, max_errors=None)
    rows_per_part = [store.read_parquet(p).num_rows for p in store.parts()]
    # About 1 MB a part (10 rows, and a batch more at most), where rows alone would make one part.
    assert len(rows_per_part) >= 3 and max(rows_per_part) <= 18, rows_per_part
    assert sorted(r["key"] for r in read_rows(str(tmp_path / "out"))) == sorted(f"{i}.jpg" for i in range(40))
    assert summary.processed == 40 and summary.ok == 40
