"""The stages' Ray halves, without a running job: decode blocks (one array a size, bounded by
bytes, every pixel kept) and the encode stage (predictions read where they lie, failures as
error rows)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from seglabel.core.results import RawPrediction
from seglabel.engine.resolve import ResolvedCheckpoint
from seglabel.job import stages
from seglabel.outputs.store import OutputStore


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


# The checkpoint an encode stage is given, as the driver resolves it: one label, instance.
TINY_INSTANCE = ResolvedCheckpoint("m", "instance", "mask2former", {0: "label0"})


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
    from readback import id_map, read_png

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
