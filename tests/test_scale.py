"""What the driver holds per image stays small: the enumeration's counts and de-duplication on
64-bit hashes, the commit's one bit per todo row, parts flushed by bytes as well as rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from outputs import read_rows
from seglabel.core.keys import Bits, SortedHashes, key_hashes
from seglabel.inputs.refs import ImageRef
from seglabel.job import commit, plan, stages
from seglabel.outputs.contract import SCHEMA
from seglabel.outputs.store import OutputStore


def refs(keys):
    return iter([ImageRef(k, f"s3://b/{k}") for k in keys])


@pytest.mark.parametrize("batch", [2, 8192])
def test_new_refs_count_done_todo_and_repeats(monkeypatch, batch):
    monkeypatch.setattr(plan, "ENUMERATION_BATCH", batch)
    done = SortedHashes(key_hashes(["d1", "d2", "d3"]))
    keys = ["a", "d1", "b", "a", "d1", "d2", "c", "b", "d4", "a"]
    tally = plan.Tally()
    todo = [r.key for r in plan.new_refs(refs(keys), done, tally, dedupe=True)]
    assert todo == ["a", "b", "c", "d4"]  # in order, each once, none already done
    assert (tally.found, tally.already_done, tally.todo, tally.repeats) == (6, 2, 4, 4)
    # A listing never repeats a key: no set is kept for its new keys.
    tally = plan.Tally()
    listed = [r.key for r in plan.new_refs(refs(["x", "d3", "y"]), SortedHashes(), tally, dedupe=False)]
    assert listed == ["x", "d3", "y"] and (tally.found, tally.already_done) == (3, 0)


@pytest.mark.parametrize("batch", [1, 8192])
def test_new_refs_tell_a_repeat_from_another_uri_with_the_same_key(monkeypatch, batch):
    """Keys drop the scheme: gs://b/x and s3://b/x collide. The later of the two is an error
    ref keyed by its URI; a repeat of either URI is a repeat, also of a key done earlier."""
    monkeypatch.setattr(plan, "ENUMERATION_BATCH", batch)
    uris = ["s3://b/a", "gs://b/a", "s3://b/a", "gs://b/a", "gs://b/c", "s3://b/c", "file:///b/c",
            "gs://b/c", "s3://b/d", "file:///b/d", "gs://b/d"]
    listed = [ImageRef(u.split("://", 1)[1].lstrip("/"), u) for u in uris]
    done = SortedHashes(key_hashes(["b/d", "file:///b/d"]))
    tally = plan.Tally()
    out = [(r.key, r.error) for r in plan.new_refs(iter(listed), done, tally, dedupe=True)]
    assert out == [
        ("b/a", None),
        ("gs://b/a", "key: collides with s3://b/a"),
        ("b/c", None),  # gs://b/c, first met with another scheme than the run's first
        ("s3://b/c", "key: collides with an earlier entry"),
        ("file:///b/c", "key: collides with an earlier entry"),
        ("gs://b/d", "key: collides with s3://b/d"),
    ]
    # s3://b/d and its collision file:///b/d have rows from an earlier run.
    assert (tally.found, tally.already_done, tally.todo, tally.repeats) == (8, 2, 6, 3)


def test_http_entries_repeat_across_signings_and_collide_across_queries():
    """A presigned URL signed again (another date, signature) is a repeat; another query on the
    same path is another image with the same key (keys never hold a query): a collision row.
    A password in the first URL never reaches the collision's message."""
    def ref(uri):
        from seglabel.inputs.manifest import manifest_key

        return ImageRef(manifest_key(uri), uri)

    entries = [
        "https://u:PW@h/a.jpg?X-Amz-Date=1&X-Amz-Signature=s1",
        "https://u:PW@h/a.jpg?X-Amz-Date=2&X-Amz-Signature=s2",
        "https://h/b.jpg", "https://h/b.jpg?id=2", "https://h/a.jpg",
    ]
    tally = plan.Tally()
    refs = plan.new_refs(iter(map(ref, entries)), SortedHashes(), tally, dedupe=True)
    out = [(r.key, r.error) for r in refs]
    assert out == [
        ("h/a.jpg", None),
        ("h/b.jpg", None),
        ("https://h/b.jpg?id=2", "key: collides with https://h/b.jpg"),
        ("https://h/a.jpg", "key: collides with an earlier entry"),
    ]
    assert tally.repeats == 1 and "PW" not in repr(out)


def test_committed_rows_are_one_bit_each():
    committed = Bits(10)
    assert committed._bits.nbytes == 2
    assert committed.first(np.array([3, 9, 3, 0])).tolist() == [True, True, False, True]
    assert committed.first(np.array([9, 1])).tolist() == [False, True]


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


def test_a_decode_worker_hands_on_large_photos_before_it_holds_a_batch(tmp_path):
    """A batch of large photos leaves the decode task in blocks of at most the budget plus one
    image, in order, every row once (errors included)."""
    from helpers import drawn

    sizes = [(300, 200), (40, 30), (320, 240), (310, 220), (50, 20)]
    uris = []
    for i, (w, h) in enumerate(sizes):
        drawn(w, h, i).save(tmp_path / f"{i}.png")
        uris.append((tmp_path / f"{i}.png").as_uri())
    uris.insert(2, (tmp_path / "missing.png").as_uri())
    n = len(uris)
    batch = {"index": np.arange(n), "key": np.array([f"k{i}" for i in range(n)], dtype=object),
             "uri": np.array(uris, dtype=object), "error": np.array([""] * n, dtype=object)}
    budget = 300 * 200 * 3
    blocks = list(stages.DecodeStage(str(tmp_path), {}, None, None, max_held_bytes=budget)(batch))
    assert len(blocks) >= 3
    for block in blocks:
        held = [image.nbytes for image in block["image"]]
        assert sum(held) - held[-1] < budget  # over the budget only by its last image
        assert len(block["index"]) == len(block["image"]) == len(block["width"]) == len(block["error"])
    assert np.concatenate([b["index"] for b in blocks]).tolist() == list(range(n))
    widths = np.concatenate([b["width"] for b in blocks]).tolist()
    assert widths == [300, 40, -1, 320, 310, 50]
    assert np.concatenate([b["error"] for b in blocks]).tolist()[2] == "read: not found"


def _decoded_blocks(tmp_path, names, budget):
    from ray.data.block import BlockAccessor

    batch = {"index": np.arange(len(names)), "key": np.array(names, dtype=object),
             "uri": np.array([(tmp_path / n).as_uri() for n in names], dtype=object),
             "error": np.array([""] * len(names), dtype=object)}
    blocks = list(stages.DecodeStage(str(tmp_path), {}, None, None, max_held_bytes=budget)(batch))
    # Ray Data takes each block as a table and hands the next stage numpy batches of it.
    return blocks, [BlockAccessor.for_block(BlockAccessor.batch_to_block(b)).to_batch_format("numpy")
                    for b in blocks]


def test_decoded_images_of_one_size_leave_as_one_array_with_every_pixel(tmp_path):
    """Images of one size are written into one (rows, H, W, 3) array per block (Ray stores it
    as it is, where it copies a list of arrays into one); a failed row holds zeros there. What
    the Segmenter reads back through Ray's tables is each image as Pillow decodes it."""
    from helpers import drawn

    names = []
    for i in range(7):
        drawn(64, 48, i).save(tmp_path / f"{i}.png")
        names.append(f"{i}.png")
    names.insert(4, "missing.png")  # in the middle of the second block
    budget = 64 * 48 * 3 * 3  # three images a block
    blocks, read_back = _decoded_blocks(tmp_path, names, budget)
    assert [len(b["index"]) for b in blocks] == [3, 3, 2]
    assert all(isinstance(b["image"], np.ndarray) and b["image"].shape[1:] == (48, 64, 3) for b in blocks)
    images = np.concatenate([b["image"] for b in read_back])
    errors = np.concatenate([b["error"] for b in read_back]).tolist()
    assert errors[4] == "read: not found" and not (images[4].any())
    for row, name in enumerate(names):
        if name != "missing.png":
            assert (images[row] == np.asarray(Image.open(tmp_path / name).convert("RGB"))).all(), name
    assert np.concatenate([b["width"] for b in read_back]).tolist() == [64, 64, 64, 64, -1, 64, 64, 64]


def test_decoded_images_of_several_sizes_or_after_a_failure_leave_one_array_a_row(tmp_path):
    """A second size in a block, or a failed first row (no size yet), gives one array a row;
    every image still comes back whole and in order, and the block stays within its budget."""
    from helpers import drawn

    sizes = {"a.png": (64, 48), "b.png": (64, 48), "c.png": (30, 20), "d.png": (64, 48)}
    for i, (name, (w, h)) in enumerate(sizes.items()):
        drawn(w, h, i).save(tmp_path / name)
    for names in (["a.png", "b.png", "c.png", "d.png"], ["missing.png", "a.png", "b.png", "d.png"]):
        blocks, read_back = _decoded_blocks(tmp_path, names, budget=1 << 20)
        (block,) = blocks
        assert block["image"].dtype == object
        for image, name in zip(read_back[0]["image"], names):
            if name == "missing.png":
                assert image.shape == (1, 1, 3)
            else:
                assert (image == np.asarray(Image.open(tmp_path / name).convert("RGB"))).all(), name


def test_a_block_of_images_changes_form_without_changing_a_pixel():
    """Another dtype at the same size is another kind of image (no silent cast); the rows the
    shared array held are copied out when the form changes, so that it is let go."""
    first = np.full((4, 5, 3), 7, np.uint8)
    wide = np.full((4, 5, 3), 1000, np.uint16)
    images = stages.ImageBlock(rows=5, max_bytes=1 << 20)
    for image in (first, None, wide, first):
        images.add(image)
    column = images.column()
    assert column.dtype == object and len(column) == 4 and not images.full()
    assert column[0].dtype == np.uint8 and (column[0] == 7).all() and not column[1].any()
    assert column[2].dtype == np.uint16 and (column[2] == 1000).all()
    assert column[0].base is None and column[1].base is None  # copies, not views of the shared array
