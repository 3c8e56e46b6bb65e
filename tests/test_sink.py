"""The output store and the shared storage mechanisms, without Ray: atomic writes, parts, resume
state, counts, error-row removal, housekeeping; read back with pyarrow and the filesystem."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seglabel.core.errors import OutputError, SeglabelError
from seglabel.core.keys import HashSet, HashSpool, SortedHashes, hash64, key_hashes, repeated
from seglabel.core.results import RawPrediction
from seglabel.engine.resolve import ResolvedCheckpoint
from seglabel.outputs.contract import SCHEMA
from seglabel.outputs.store import OutputStore
from seglabel.storage.atomic import is_temporary, open_atomic, write_atomic
from seglabel.storage.filesystem import absolute_local

# The checkpoint an encode stage is given, as the driver resolves it: one label, instance.
TINY_INSTANCE = ResolvedCheckpoint("m", "instance", "mask2former", {0: "label0"})


def rows(*specs: tuple[str, str, str | None]) -> pa.Table:
    """Contract rows from (key, status, error)."""
    return pa.Table.from_pylist([
        {"key": k, "image_uri": f"file:///in/{k}", "status": s, "error": e, "width": 4 if s == "ok" else None,
         "height": 3 if s == "ok" else None, "mask_uri": f"file:///out/masks/{k}.png" if s == "ok" else None,
         "task": "instance", "model": "m", "segments": [] if s == "ok" else None}
        for k, s, e in specs
    ], schema=SCHEMA)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> OutputStore:
    if request.param == "local":
        return OutputStore(str(tmp_path / "out"))
    import uuid

    return OutputStore(f"memory://sink-{uuid.uuid4().hex}")


def test_parts_counts_and_done_keys(store):
    store.write_part(
        rows(("a.jpg", "ok", None), ("b.jpg", "error", "decode: truncated image")), "part-1.parquet"
    )
    store.write_part(rows(("c.jpg", "error", "read: not found")), "part-2.parquet")
    assert [p.rsplit("/", 1)[1] for p in store.parts()] == ["part-1.parquet", "part-2.parquet"]
    # Parts are what the contract says, read with pyarrow alone.
    table = pq.read_table(pa.BufferReader(store.fs.cat_file(store.parts()[0])))
    assert table.schema.names == SCHEMA.names and table.num_rows == 2
    assert store.counts() == {"total": 3, "ok": 1, "error": 2,
                              "errors_by_reason": {"decode: truncated image": 1, "read: not found": 1}}
    done = store.done_keys()
    assert "a.jpg" in done and "b.jpg" in done and "c.jpg" in done and "d.jpg" not in done
    only_ok = store.done_keys(include_errors=False)
    assert "a.jpg" in only_ok and "b.jpg" not in only_ok


def test_drop_error_rows_replaces_parts_and_the_later_row_wins(store):
    store.write_part(rows(("a.jpg", "ok", None), ("b.jpg", "error", "decode: x")), "part-1.parquet")
    store.write_part(rows(("c.jpg", "error", "read: not found")), "part-2.parquet")
    assert store.drop_error_rows() == 2
    assert [p.rsplit("/", 1)[1] for p in store.parts()] == ["part-1.parquet"]  # part-2 had nothing left
    assert store.counts()["total"] == 1
    store.write_part(rows(("b.jpg", "ok", None), ("c.jpg", "ok", None)), "part-3.parquet")
    assert store.counts() == {"total": 3, "ok": 3, "error": 0, "errors_by_reason": {}}


def test_batches_are_bounded_and_cover_every_row(store):
    store.write_part(rows(*[(f"{i}.jpg", "ok", None) for i in range(7)]), "part-1.parquet")
    store.write_part(rows(*[(f"x{i}.jpg", "ok", None) for i in range(3)]), "part-2.parquet")
    batches = list(store.iter_batches(["key"], 3))
    assert max(b.num_rows for b in batches) <= 3
    assert sum(b.num_rows for b in batches) == 10


def test_job_files_and_inspect(store):
    from seglabel.outputs.reader import inspect_output

    assert store.read_json("job.json") is None
    store.write_json("job.json", {"task": "instance", "model": "m", "input": "/in"})
    store.write_part(rows(("a.jpg", "ok", None)), "part-1.parquet")
    state = inspect_output(store)
    assert state["complete"] is False and state["parts"] == 1 and state["total"] == 1
    assert state["job"]["task"] == "instance"
    store.write_json("_SUCCESS", store.counts())
    assert inspect_output(store)["complete"] is True
    store.clear()
    assert store.read_json("job.json") is None and store.parts() == [] and not store.exists("_SUCCESS")


def test_a_killed_runs_temporary_files_are_cleaned(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_part(rows(("a.jpg", "ok", None)), "part-1.parquet")
    (tmp_path / "out" / "metadata" / ".part-2.parquet.tmp-0123").write_bytes(b"half")
    (tmp_path / "out" / "_seglabel" / "todo-run1").mkdir(parents=True)
    assert len(store.parts()) == 1  # hidden temporary parts are never read
    assert store.clean_temporary() == 2
    assert sorted(os.listdir(tmp_path / "out" / "metadata")) == ["part-1.parquet"]


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


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = OutputStore(str(blocker / "out"))
    with pytest.raises(OutputError) as err:
        store.check_writable()
    assert isinstance(err.value, SeglabelError) and "\n" not in str(err.value)


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


def test_counts_let_the_later_row_of_a_repeated_key_win(store):
    store.write_part(
        rows(("a.jpg", "error", "decode: truncated image"), ("b.jpg", "ok", None)), "part-1.parquet"
    )
    store.write_part(rows(("a.jpg", "ok", None), ("c.jpg", "error", "read: not found")), "part-2.parquet")
    store.write_part(rows(("c.jpg", "error", "read: not found")), "part-3.parquet")
    assert store.counts() == {"total": 3, "ok": 2, "error": 1, "errors_by_reason": {"read: not found": 1}}
    # Every reader of rows (exports, preview) takes the same row of a key: its last one, once.
    seen = [(r["key"], r["status"]) for r in store.iter_rows(["key", "status"], batch_size=1)]
    assert seen == [("b.jpg", "ok"), ("a.jpg", "ok"), ("c.jpg", "error")]
    assert store.superseded() and sum(b.num_rows for b in store.iter_batches(["key"], 2)) == 3


def test_an_export_shows_a_repeated_key_once_with_its_later_row(tmp_path):
    """Two rows of one key (a part replaced while another run wrote): the COCO export and the
    preview's reader list the image once, with the later row's size."""
    from seglabel.formats.export import export

    store = OutputStore(str(tmp_path / "out"))
    store.write_json("job.json", {"task": "instance", "id2label": {"0": "thing"}, "model": "m"})
    early = rows(("a.jpg", "ok", None), ("b.jpg", "ok", None)).to_pylist()
    early[0]["width"] = 99
    store.write_part(pa.Table.from_pylist(early, schema=SCHEMA), "part-1.parquet")
    store.write_part(rows(("a.jpg", "ok", None)), "part-2.parquet")
    counts = export(str(tmp_path / "out"), "coco", str(tmp_path / "coco.json"))
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert sorted((i["file_name"], i["width"]) for i in coco["images"]) == [("a.jpg", 4), ("b.jpg", 4)]
    assert counts["images"] == 2 and counts["error_rows"] == 0


def test_absolute_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_local("./labels") == str(tmp_path / "labels")
    assert absolute_local("labels/x") == str(tmp_path / "labels" / "x")
    assert absolute_local("file:///data/x") == "/data/x"
    assert absolute_local("~/x") == os.path.expanduser("~/x")
    for url in ("s3://b/labels", "gs://b/x", "memory://x", "http://h/x.txt"):
        assert absolute_local(url) == url


def encoder_block(raw: RawPrediction, key: str = "k.jpg", index: int = 0, error: str = "") -> pa.Table:
    """One row of the block the encode stage gets from the Segmenter, as Ray Data hands it over."""
    return pa.table({
        "index": pa.array([index], pa.int64()),
        "key": [key],
        "uri": [f"file:///{key}"],
        # An image that failed before the model has no size (as DecodeStage gives it).
        "width": pa.array([-1 if error else raw.id_map.shape[1]], pa.int32()),
        "height": pa.array([-1 if error else raw.id_map.shape[0]], pa.int32()),
        "error": [error],
        "raw": pa.array([b"" if error else raw.dumps()], pa.binary()),
        "actor": ["a"],
    })


def encode_batch(tmp_path, raw: RawPrediction):
    from seglabel.job.stages import EncodeStage

    store = OutputStore(str(tmp_path / "out"))
    block = encoder_block(raw)
    return store, EncodeStage(store, TINY_INSTANCE, "m")(block).to_pylist()[0]


def test_encode_reads_a_block_of_several_chunks_row_by_row(tmp_path):
    """Ray Data joins blocks into one batch as a table of several chunks: each row is encoded
    from its own chunk's prediction, in order, and an error row keeps its place."""
    from pycocotools import mask as mask_utils
    from ray.data.block import BlockAccessor

    from outputs import id_map, read_png
    from seglabel.job.stages import EncodeStage
    from seglabel.job.transport import column_cells

    def instance(seed: int) -> RawPrediction:
        rng = np.random.default_rng(seed)
        masks = rng.random((2, 6, 9)) < 0.4
        id_map = np.zeros((6, 9), np.uint16)
        for n, mask in enumerate(masks, start=1):
            id_map[mask & (id_map == 0)] = n
        ids = np.array([1, 2], np.int32)
        return RawPrediction(id_map, ids, np.zeros(2, np.int32), np.array([0.9, 0.8], np.float32), masks)

    first, second = instance(1), instance(2)
    block = pa.concat_tables([
        encoder_block(first, "a.jpg", 7),
        encoder_block(first, "gone.jpg", 8, "decode: bad"),
        encoder_block(second, "b.jpg", 9),
    ])
    assert block.column("raw").num_chunks == 3
    store = OutputStore(str(tmp_path / "out"))
    table = EncodeStage(store, TINY_INSTANCE, "m")(block)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["a.jpg", "gone.jpg", "b.jpg"]
    assert [r["index"] for r in rows] == [7, 8, 9]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"] and rows[1]["error"] == "decode: bad"
    # Each prediction is read where it lies in the block (no copy of it, let alone of the
    # block), also from a slice of a block, as Ray cuts batches out of blocks.
    for column in (block.column("raw"), block.combine_chunks().slice(1).column("raw"),
                   block.column("raw").cast(pa.large_binary())):
        cells = list(column_cells(column))
        assert len(cells) == len(column)
        data = [chunk.buffers()[2] for chunk in column.iterchunks()]
        for cell, value in zip(cells, column.to_pylist()):
            assert bytes(cell) == value
            if value:
                assert any(d.address <= cell.address < d.address + d.size for d in data)
                # ... and so are its arrays: views of the block, not copies out of it.
                prediction = RawPrediction.loads(cell)
                assert not prediction.id_map.flags.writeable
                assert any(d.address <= prediction.id_map.ctypes.data < d.address + d.size for d in data)
    # The same rows where Ray could not make the column binary and pickled its objects instead
    # (here, because the error row's cell is not bytes): the same output.
    fallback = block.to_pydict()
    fallback["raw"][1] = 0
    fallback = BlockAccessor.batch_to_block({k: np.array(v, dtype=object) for k, v in fallback.items()})
    assert not pa.types.is_binary(fallback.column("raw").type)
    again = EncodeStage(OutputStore(str(tmp_path / "2")), TINY_INSTANCE, "m")(fallback)
    assert [(r["key"], r["status"], r["segments"]) for r in again.to_pylist()] == [
        (r["key"], r["status"], r["segments"]) for r in rows
    ]
    for row, raw in ((rows[0], first), (rows[2], second)):
        assert np.array_equal(id_map(read_png(row["mask_uri"]), "instance"), raw.id_map)
        assert len(row["segments"]) == len(raw.masks)
        for segment, mask in zip(row["segments"], raw.masks):
            rle = {"size": [row["height"], row["width"]], "counts": segment["rle"].encode()}
            assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)


@pytest.mark.parametrize("large", [False, True])
def test_the_segment_stage_writes_its_predictions_into_one_buffer(monkeypatch, large):
    """The predictions column is one Arrow buffer, each value written once at a multiple of 64
    bytes (its arrays aligned in the block); a failed row's value is empty; past int32 offsets
    it is large_binary; every value loads back to its prediction."""
    from seglabel.job import transport as encode

    if large:
        monkeypatch.setattr(encode, "BINARY_MAX_BYTES", 100)
    rng = np.random.default_rng(5)
    raws = []
    for i in range(4):
        shape = (7 + i, 5 + 2 * i)
        ids = np.arange(i, dtype=np.int32)
        raws.append(RawPrediction(rng.integers(0, 9, shape).astype(np.uint16), ids, np.zeros(i, np.int32),
                                  np.ones(i, np.float32), rng.random((i, *shape)) > 0.5))
    parts = [raws[0].parts(), [], raws[1].parts(), raws[2].parts(), [], raws[3].parts()]
    column = encode.pack_column(parts)
    assert column.type == (pa.large_binary() if large else pa.binary()) and len(column) == 6
    assert len(encode.pack_column([])) == 0  # a batch with no rows
    data = column.buffers()[2]
    cells = list(encode.column_cells(pa.chunked_array([column])))
    assert [len(c) for c in cells][1::3] == [0, 0]
    for cell, raw in zip([cells[0], cells[2], cells[3], cells[5]], raws):
        assert (cell.address - data.address) % 64 == 0
        back = RawPrediction.loads(cell)
        assert np.array_equal(back.id_map, raw.id_map) and np.array_equal(back.masks, raw.masks)
        assert np.array_equal(back.scores, raw.scores) and np.array_equal(back.ids, raw.ids)
        assert bytes(cell)[: len(raw.dumps())] == raw.dumps()  # the same value, padded to 64


def test_an_unreadable_prediction_is_an_encode_error_row(tmp_path):
    """A prediction cell that does not load (cut short, say) fails its row, not the block."""
    from seglabel.job.stages import EncodeStage

    ids = np.zeros(0, np.int32)
    good = RawPrediction(np.zeros((3, 4), np.uint16), ids, ids, np.zeros(0, np.float32), None)
    block = pa.concat_tables([encoder_block(good, "a.jpg", 0), encoder_block(good, "b.jpg", 1)])
    raw = block.column("raw").to_pylist()
    block = block.set_column(block.schema.get_field_index("raw"), "raw", pa.array([raw[0][:-3], raw[1]]))
    store = OutputStore(str(tmp_path / "out"))
    rows = EncodeStage(store, ResolvedCheckpoint("m", "semantic", "mask2former", {0: "a"}), "m")(block)
    rows = rows.to_pylist()
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert rows[0]["error"].startswith("encode: ") and rows[0]["mask_uri"] is None


def test_encode_failure_is_an_encode_error_row_without_a_mask(tmp_path):
    ids = np.zeros(0, np.int32)
    # A label map no PNG mode holds (two channels of 16 bits): Pillow refuses to encode it.
    broken = RawPrediction(np.zeros((3, 4, 2), np.uint16), ids, ids, np.zeros(0, np.float32),
                           np.zeros((0, 3, 4), bool))
    store, row = encode_batch(tmp_path, broken)
    assert row["status"] == "error" and row["error"].startswith("encode: "), row
    assert row["mask_uri"] is None and row["segments"] is None
    assert not (tmp_path / "out" / "masks").exists()
    good = RawPrediction(
        np.zeros((3, 4), np.uint16), ids, ids, np.zeros(0, np.float32), np.zeros((0, 3, 4), bool)
    )
    _, row = encode_batch(tmp_path, good)
    assert row["status"] == "ok" and row["segments"] == []
    assert json.loads(json.dumps(row["mask_uri"])).endswith("/masks/k.jpg.png")
