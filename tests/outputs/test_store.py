"""The output store and the shared storage mechanisms, without Ray: atomic writes, parts, resume
state, counts, error-row removal, housekeeping; read back with pyarrow and the filesystem."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from readback import read_rows

from helpers import one_line_error, photos, run
from seglabel.cli import main
from seglabel.core.errors import OutputError, SeglabelError
from seglabel.outputs.contract import SCHEMA
from seglabel.outputs.store import OutputStore


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


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = OutputStore(str(blocker / "out"))
    with pytest.raises(OutputError) as err:
        store.check_writable()
    assert isinstance(err.value, SeglabelError) and "\n" not in str(err.value)


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


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
def test_a_damaged_output_is_one_line_naming_the_file(checkpoints, tmp_path, capsys):
    images = photos(tmp_path / "photos")
    out = tmp_path / "labels"
    run(checkpoints, images, out)
    part = sorted((out / "metadata").glob("part-*.parquet"))[0]
    good = part.read_bytes()
    commands = (["inspect", str(out)],
                ["export", str(out), "--format", "coco", "--to", str(tmp_path / "c.json")])

    part.write_bytes(good[: len(good) // 2])  # cut short
    for argv in commands:
        line = one_line_error(capsys, argv)
        assert part.name in line and "not a readable Parquet file" in line
    with pytest.raises(OutputError, match=part.name):
        run(checkpoints, images, out)
    part.write_bytes(good)

    notes = out / "metadata" / "notes.parquet"
    pq.write_table(pa.table({"note": ["hello"]}), notes)
    for argv in commands:
        assert "notes.parquet has no column" in one_line_error(capsys, argv)
    notes.unlink()
    (out / "metadata" / "x.parquet").mkdir()
    for argv in commands:
        assert "x.parquet is a folder" in one_line_error(capsys, argv)
    (out / "metadata" / "x.parquet").rmdir()

    record = (out / "job.json").read_text()
    for text, message in (("{not json", "job.json is not valid JSON"), ("[1, 2]", "job.json holds a list"),
                          (b"\xff\xfe", "job.json is not valid JSON")):
        if isinstance(text, bytes):
            (out / "job.json").write_bytes(text)
        else:
            (out / "job.json").write_text(text)
        for argv in commands:
            assert message in one_line_error(capsys, argv)
        with pytest.raises(OutputError, match=message):
            run(checkpoints, images, out)
    (out / "job.json").write_text(record)
    assert main(["inspect", str(out)]) == 0


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
def test_inspect_skips_a_killed_runs_temporaries(checkpoints, tmp_path, capsys):
    """A killed run's hidden temporary to-do file (README calls them harmless) is not counted,
    and does not fail inspect."""
    images = photos(tmp_path / "photos")
    out = tmp_path / "labels"
    run(checkpoints, images, out)
    todo = out / "_seglabel" / "todo-20260101T000000Z-abcdef"
    todo.mkdir(parents=True)
    pq.write_table(pa.table({"index": [0, 1], "key": ["a", "b"]}), todo / "todo-00000.parquet")
    (todo / ".todo-00001.parquet.tmp-0123").write_bytes(b"half a file")
    assert main(["inspect", str(out), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["queued_by_running_job"] == 2 and state["total"] == 3


def test_a_storage_write_that_fails_names_its_file(checkpoints, tmp_path):
    """A full disk once ended a run with "OSError: [Errno 28]" and no path. A real failing write:
    the driver's files limited to 1000 bytes (RLIMIT_FSIZE, EFBIG), so that its first to-do list
    cannot be written; one line naming it, exit 2, and the lease released."""
    import resource
    import signal
    import subprocess
    import sys

    images = photos(tmp_path / "photos")
    out = tmp_path / "labels"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    done = subprocess.run(
        [sys.executable, "-m", "seglabel", "run", "--input", str(images), "--output", str(out), "--stand-in",
         "default", "--model", str(checkpoints["instance"])],
        preexec_fn=small_files, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("seglabel: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(errors) == 1 and "cannot write file://" in errors[0] and "todo-00000.parquet" in errors[0]
    assert "File too large" in errors[0] and not (out / "_seglabel" / "lease.json").exists()


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
def test_readers_skip_the_repeated_key_pass_on_parts_a_run_checked(checkpoints, tmp_path):
    """The end of a run checks its parts for repeated keys and remembers which; a reader then
    reads each part once, not a second time for the keys. A part committed since (here one
    repeating a key, as two runs at once once wrote) is checked again, and the key counts once."""
    from seglabel.outputs.contract import SCHEMA
    from seglabel.outputs.store import OutputStore

    images = photos(tmp_path / "photos", 4)
    out = tmp_path / "labels"
    run(checkpoints, images, out, rows_per_part=2)
    store = OutputStore(str(out))
    reads: list[str] = []
    cat_file = store.fs.cat_file
    store.fs.cat_file = lambda path, *a, **k: reads.append(path) or cat_file(path, *a, **k)
    try:
        rows = list(store.iter_rows(["key", "status"], batch_size=10))
        parts = store.parts()
        assert len(rows) == 4 and len(parts) == 2
        assert sorted(r for r in reads if r.endswith(".parquet")) == parts  # each part once
        again = read_rows(str(out))[0]
        late = out / "metadata" / "part-z-again.parquet"
        pq.write_table(pa.Table.from_pylist([again], schema=SCHEMA), late)
        assert sorted(r["key"] for r in store.iter_rows(["key"], batch_size=10)) == sorted(
            f"p{i}.jpg" for i in range(4))
    finally:
        store.fs.cat_file = cat_file


# -- outputs that hang a reader, or lie (issue 39) -------------------------------------------------


class Unblocker:
    """Opens FIFOs' write ends after a while and closes them, so that a reader blocked opening
    one gets end-of-file and the test fails instead of hanging; ``freed`` lists those that had
    a reader waiting (a non-blocking open finds one, or raises ENXIO)."""

    def __init__(self, fifos, after_s: float = 20.0):
        import threading

        self.fifos, self.freed, self.stop = list(fifos), [], threading.Event()
        self.thread = threading.Thread(target=self._watch, args=(after_s,), daemon=True)

    def _watch(self, after_s):
        while not self.stop.wait(after_s):
            for fifo in self.fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                    self.freed.append(fifo)
                except OSError:
                    pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
def test_a_fifo_in_an_output_is_one_line_not_a_hang(checkpoints, tmp_path, capsys):
    """Before: a metadata part or job.json that is a named pipe hung inspect, export and run
    (run while holding the lease) for ever."""
    images = photos(tmp_path / "photos")
    out = tmp_path / "labels"
    run(checkpoints, images, out)
    commands = (["inspect", str(out)],
                ["export", str(out), "--format", "coco", "--to", str(tmp_path / "c.json")],
                ["run", "--input", str(images), "--output", str(out), "--model", str(checkpoints["instance"]),
                 "--stand-in", "segments=2", "--log-level", "warning"])
    for name in ("job.json", "metadata/part-fifo.parquet", "_SUCCESS"):
        target = out / name
        kept = target.read_bytes() if target.exists() else None
        target.unlink(missing_ok=True)
        os.mkfifo(target)
        readers = commands if name != "_SUCCESS" else commands[:1]  # only inspect reads _SUCCESS
        with Unblocker([target]) as unblocker:
            for argv in readers:
                line = one_line_error(capsys, argv)
                assert name in line and "not a regular file" in line, line
        assert unblocker.freed == [], "a reader was blocked on the FIFO"
        assert not (out / "_seglabel" / "lease.json").exists()
        target.unlink()
        if kept is not None:
            target.write_bytes(kept)
    assert main(["inspect", str(out)]) == 0


def rewritten(part, change) -> None:
    """``part`` rewritten with ``change`` applied to its rows (a list of dicts)."""
    table = pq.read_table(part)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
def test_damaged_state_is_one_line_naming_the_file(checkpoints, tmp_path, capsys):
    """Before: a _SUCCESS that is not JSON failed as a JSONDecodeError (exit 1, no file named)
    and a JSON list passed; a null key collapsed rows, a negative width went into COCO, a status
    "OK" counted as an error of no reason, and a metadata that is a file read as no rows."""
    images = photos(tmp_path / "photos", 4)
    out = tmp_path / "labels"
    run(checkpoints, images, out)
    inspect = ["inspect", str(out)]
    export = ["export", str(out), "--format", "coco", "--to", str(tmp_path / "c.json")]

    success = out / "_SUCCESS"
    kept = success.read_bytes()
    for text, says in (("{not json", "_SUCCESS is not valid JSON"), ("[1, 2]", "_SUCCESS holds a list")):
        success.write_text(text)
        assert says in one_line_error(capsys, inspect)
    with open(success, "wb") as f:  # 8 GiB that read whole would fill the reader's memory (sparse)
        f.truncate(8 << 30)
    assert "_SUCCESS is over 16777216 bytes" in one_line_error(capsys, inspect)
    success.write_bytes(kept)

    part = sorted((out / "metadata").glob("part-*.parquet"))[0]
    good = part.read_bytes()

    def first(**values):
        return lambda rows: rows[0].update(values)

    for change, argv, says in ((first(key=None), export, "a row has no key (null)"),
                               (first(width=-5), export, "a row's width is negative (-5)"),
                               (first(status="OK"), inspect, "a row's status is 'OK', not one of ok, error")):
        rewritten(part, change)
        line = one_line_error(capsys, argv)
        assert part.name in line and says in line, line
        part.write_bytes(good)

    metadata = out / "metadata"
    metadata.rename(tmp_path / "kept-metadata")
    metadata.write_bytes(b"not a folder")
    for argv in (inspect, export):
        assert "metadata is a file, not the metadata folder" in one_line_error(capsys, argv)
    metadata.unlink()
    (tmp_path / "kept-metadata").rename(metadata)
    assert main(inspect) == 0


def test_a_reader_lists_the_parts_once_per_read(store):
    """Before: a read listed the parts twice (the repeated-key check, then the rows), so a part
    committed between the two was read without the check: a key came out twice."""
    store.write_part(rows(("a.jpg", "ok", None), ("b.jpg", "ok", None)), "part-1.parquet")
    listed, listings = store.parts, []

    def parts_then_a_commit():
        names = listed()
        listings.append(names)
        if len(listings) == 1:  # another run commits a row of a.jpg now
            store.write_part(rows(("a.jpg", "error", "read: gone")), "part-2.parquet")
        return names

    store.parts = parts_then_a_commit
    keys = [row["key"] for row in store.iter_rows(["key", "status"], batch_size=10)]
    assert sorted(keys) == ["a.jpg", "b.jpg"] and len(listings) == 1
    del store.parts
    assert store.counts()["total"] == 2  # the next read sees the commit, its repeat counted once
