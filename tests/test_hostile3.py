"""The third round of hostile tests (issue 24): never destroy what is not ours, never mix an
unknown output's rows, never list the output as input, and a damaged output is one line naming
the damaged file. Jobs run on a real local Ray with the stand-in model; outputs are read back
with pyarrow, independently of seglabel's readers."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import drawn, encode
from outputs import read_rows
from seglabel.cli import main
from seglabel.core.errors import ConfigError, OutputError
from seglabel.job.pipeline import label

pytestmark = pytest.mark.usefixtures("ray_session")


def photos(folder, n: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"p{i}.jpg").write_bytes(encode(drawn(30 + i, 20, i), "JPEG"))
    return folder


def run(checkpoints, input, output, **settings):
    model = str(checkpoints["instance"])
    return label(str(input), str(output), model=model, stand_in="segments=2", **settings)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, which must fail with exit 2 and one line on stderr; returns that line."""
    capsys.readouterr()  # what came before (a job's Ray lines)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_overwrite_clears_only_what_seglabel_made(checkpoints, tmp_path):
    """A folder seglabel never wrote keeps its masks/ and metadata/ (a dataset's ground truth):
    --overwrite refuses it. On seglabel's own output, --overwrite removes the job's masks and
    parts and leaves the files it did not make."""
    images = photos(tmp_path / "photos")
    ds = tmp_path / "ds"
    (ds / "masks").mkdir(parents=True)
    (ds / "masks" / "plain.png").write_bytes(b"ground truth")
    (ds / "metadata").mkdir()
    (ds / "metadata" / "splits.csv").write_text("train,val\n")
    with pytest.raises(OutputError, match="not an output of seglabel's"):
        run(checkpoints, images, ds, overwrite=True)
    assert (ds / "masks" / "plain.png").read_bytes() == b"ground truth"
    with pytest.raises(OutputError, match="cannot be resumed"):  # nor is it added to
        run(checkpoints, images, ds)
    assert sorted(os.listdir(ds / "masks")) == ["plain.png"]

    out = tmp_path / "labels"
    run(checkpoints, images, out)
    (out / "masks" / "plain.png").write_bytes(b"mine")
    (out / "metadata" / "splits.csv").write_text("mine\n")
    first_parts = sorted(p for p in os.listdir(out / "metadata") if p.endswith(".parquet"))
    (images / "p0.jpg").unlink()  # its mask is the old job's: it must go with it
    run(checkpoints, images, out, overwrite=True)
    assert (out / "masks" / "plain.png").read_bytes() == b"mine"
    assert (out / "metadata" / "splits.csv").read_text() == "mine\n"
    assert not set(first_parts) & set(os.listdir(out / "metadata"))
    assert sorted(r["key"] for r in read_rows(str(out))) == ["p1.jpg", "p2.jpg"]
    assert sorted(os.listdir(out / "masks")) == ["p1.jpg.png", "p2.jpg.png", "plain.png"]


def test_parts_without_a_record_are_refused(checkpoints, tmp_path):
    """job.json deleted (to "reset the settings") or lost in a partial copy: a re-run under other
    settings once committed a second row per image."""
    images = photos(tmp_path / "photos")
    out = tmp_path / "labels"
    run(checkpoints, images, out)
    (out / "job.json").unlink()
    with pytest.raises(OutputError, match="no job.json: the settings of its rows are unknown"):
        run(checkpoints, images, out, score_threshold=0.9)
    assert len(read_rows(str(out))) == 3


def test_an_input_inside_the_output_is_refused(checkpoints, tmp_path, capsys):
    ds = tmp_path / "ds"
    photos(ds / "images")
    line = one_line_error(capsys, ["run", "--input", str(ds / "images"), "--output", str(ds), "--stand-in",
                                   "default", "--model", str(checkpoints["instance"])])
    assert "is inside the output" in line
    assert not (ds / "job.json").exists() and not (ds / "_SUCCESS").exists()
    # The same through a symlink: the input names a folder of the output.
    (tmp_path / "link").symlink_to(ds / "images")
    with pytest.raises(ConfigError, match="through a symlink"):
        run(checkpoints, tmp_path / "link", ds)


@pytest.mark.parametrize("linked", ["output", "input"])
def test_an_output_reached_through_a_symlink_is_never_listed(checkpoints, tmp_path, linked):
    """The output inside the input folder is left out of the listing also when one of the two
    is named through a symlink: a re-run once listed its own masks as images (masks/x.png.png,
    a level more every run)."""
    real_in = photos(tmp_path / "in")
    real_out = real_in / "out"
    real_out.mkdir()
    (tmp_path / "link").symlink_to(real_out if linked == "output" else real_in)
    input, output = (real_in, tmp_path / "link") if linked == "output" else (tmp_path / "link", real_out)
    for _ in range(2):
        summary = run(checkpoints, input, output)
    assert sorted(r["key"] for r in read_rows(str(real_out))) == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert summary.found == 3 and summary.processed == 0


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


def hand_made_output(root, rows: list[dict], id2label: dict[str, str]):
    """An output written with pyarrow alone: job.json and one part of contract rows."""
    from seglabel.outputs.contract import SCHEMA

    (root / "metadata").mkdir(parents=True)
    (root / "job.json").write_text(json.dumps({"task": "instance", "id2label": id2label, "model": "m"}))
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "metadata" / "part-1.parquet")
    return root


def ok_row(key: str, uri: str, width: int = 4, height: int = 3, labels: tuple[str, ...] = ()) -> dict:
    from pycocotools import mask as mask_utils

    segments = []
    for i, name in enumerate(labels):
        mask = np.zeros((height, width), np.uint8, order="F")
        mask[0, i] = 1
        rle = mask_utils.encode(mask)["counts"].decode()
        segments.append({"id": i + 1, "label_id": i, "label": name, "score": 0.9, "area": 1,
                         "bbox": [float(i), 0.0, 1.0, 1.0], "rle": rle, "is_thing": True})
    return {"key": key, "image_uri": uri, "status": "ok", "error": None, "width": width, "height": height,
            "mask_uri": None, "task": "instance", "model": "m", "segments": segments}


def test_label_studio_local_files_urls_carry_the_whole_key(tmp_path):
    """The mapping seglabel's own warning suggests (file:///data/=/data/local-files/?d=) once
    left the rest unencoded: "sp ace#frag?q=1.png" reached Label Studio as "in1/sp ace"."""
    from urllib.parse import parse_qs, urlsplit

    from seglabel.formats.export import export

    keys = ["in1/sp ace#frag?q=1.png", "a&b+c=d.png", "plain.png"]
    out = hand_made_output(tmp_path / "out", [ok_row(k, f"file:///data/{k}") for k in keys], {"0": "x"})
    export(str(out), "label-studio", str(tmp_path / "ls.json"),
           image_prefix_map={"file:///data/": "/data/local-files/?d="})
    tasks = json.loads((tmp_path / "ls.json").read_text())
    for task in tasks:
        url = urlsplit(task["data"]["image"])
        assert url.path == "/data/local-files/" and not url.fragment
        assert parse_qs(url.query) == {"d": [task["data"]["key"]]}
    assert sorted(t["data"]["key"] for t in tasks) == sorted(keys)


def test_label_names_with_commas_can_be_chosen(tmp_path, capsys):
    """"gown, evening" cannot be named in a comma-separated list: a quoted form, as in CSV."""
    from seglabel.core.config import JobConfig

    config = JobConfig.from_mapping({"input": "i", "output": "o", "labels": '"gown, evening", person',
                                     "thing_labels": ["gown, evening"]})
    assert config.engine.labels == ("gown, evening", "person")
    assert config.engine.thing_labels == ("gown, evening",)
    row = ok_row("a.png", "file:///x/a.png", labels=("gown, evening", "hat"))
    out = hand_made_output(tmp_path / "out", [row], {"0": "gown, evening", "1": "hat"})
    assert main(["export", str(out), "--format", "coco", "--to", str(tmp_path / "c.json"),
                 "--labels", '"gown, evening"']) == 0
    coco = json.loads((tmp_path / "c.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["gown, evening"]
    assert [a["category_id"] for a in coco["annotations"]] == [1]


def test_preview_keeps_the_runs_guards(tmp_path, caplog):
    """A small PNG declaring 16000x16000 (768 MB decoded) and a FIFO in place of a photo are
    skipped with a warning; the readable photo is previewed."""
    from PIL import Image

    from seglabel.preview import preview

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("1", (16000, 16000)).save(photos / "bomb.png")
    os.mkfifo(photos / "fifo.png")
    drawn(4, 3, 1).save(photos / "good.png")
    rows = [ok_row("bomb.png", (photos / "bomb.png").as_uri(), 16000, 16000),
            ok_row("fifo.png", (photos / "fifo.png").as_uri()),
            ok_row("good.png", (photos / "good.png").as_uri())]
    out = hand_made_output(tmp_path / "out", rows, {"0": "x"})
    with caplog.at_level("WARNING"):
        paths = preview(str(out), str(tmp_path / "preview"))
    assert [os.path.basename(p) for p in paths] == ["good.png.png"]
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "skipping bomb.png" in skipped and "skipping fifo.png" in skipped


def test_a_second_run_on_a_live_output_refuses_and_touches_nothing(checkpoints, tmp_path):
    """Two runs on one output once swept each other's to-do lists or committed every image
    twice. While a run holds the output's lease, a second one refuses in one line naming the
    first, and leaves its files be; the first labels every image once."""
    import threading

    from seglabel.core.errors import OutputBusy
    from seglabel.job.lease import LEASE_FILE

    images = photos(tmp_path / "photos", 40)
    out = tmp_path / "labels"
    done: dict = {}
    first = threading.Thread(target=lambda: done.update(summary=run(checkpoints, images, out, batch_size=1)))
    first.start()
    lease = out / LEASE_FILE
    deadline = time.monotonic() + 120
    while not lease.exists() and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    holder = json.loads(lease.read_text())
    with pytest.raises(OutputBusy, match=f"being labeled by another run .*pid {holder['pid']}") as refused:
        run(checkpoints, images, out)
    assert "\n" not in str(refused.value) and refused.value.exit_status == 2
    first.join()
    assert done["summary"].processed == 40
    keys = [r["key"] for r in read_rows(str(out))]
    assert len(keys) == 40 and sorted(set(keys)) == sorted(keys)
    assert not lease.exists()  # released at the end
    assert run(checkpoints, images, out).processed == 0  # and free again


def test_a_killed_runs_lease_expires_and_a_live_one_is_renewed(checkpoints, tmp_path, monkeypatch):
    from datetime import datetime, timedelta, timezone

    from seglabel.job import lease as leases
    from seglabel.outputs.store import OutputStore

    images = photos(tmp_path / "photos")
    out = tmp_path / "labels"
    store = OutputStore(str(out))
    held = leases.Lease(store).take()
    killed = out / "_seglabel" / "todo-20260101T000000Z-aaaaaa"  # a live run's to-do list
    killed.mkdir(parents=True)
    with pytest.raises(leases.OutputBusy, match="being labeled by another run"):
        run(checkpoints, images, out)
    assert killed.exists() and not (out / "job.json").exists()
    # A lease last renewed past its TTL is a killed run's: the next run takes over and sweeps.
    record = json.loads((out / leases.LEASE_FILE).read_text())
    stale = datetime.now(timezone.utc) - timedelta(seconds=leases.TTL_S + 1)
    held._stop.set()
    (out / leases.LEASE_FILE).write_text(json.dumps({**record, "renewed": stale.isoformat()}))
    assert run(checkpoints, images, out).processed == 3
    assert not killed.exists() and not (out / leases.LEASE_FILE).exists()
    # A live run renews its lease from a thread of its own.
    monkeypatch.setattr(leases, "RENEW_EVERY_S", 0.05)
    with leases.Lease(store):
        first = json.loads((out / leases.LEASE_FILE).read_text())["renewed"]
        time.sleep(0.5)
        assert json.loads((out / leases.LEASE_FILE).read_text())["renewed"] > first
    assert not (out / leases.LEASE_FILE).exists()
    # A fresh lease of a process of this machine that is gone (a SIGKILLed driver): taken over
    # at once; one of a live process (this one) is not.
    import socket

    gone = int(open("/proc/sys/kernel/pid_max").read()) + 1  # no process has it (a reaped pid is reused)
    now = datetime.now(timezone.utc).isoformat()
    space = leases._process_space()  # private: what a lease records of its process
    fresh = {"id": "x", "host": socket.gethostname(), "started": "", "renewed": now, **space}
    (out / leases.LEASE_FILE).write_text(json.dumps({**fresh, "pid": gone}))
    assert run(checkpoints, images, out).found == 3
    (out / leases.LEASE_FILE).write_text(json.dumps({**fresh, "pid": os.getpid()}))
    with pytest.raises(leases.OutputBusy):
        run(checkpoints, images, out)


def test_input_headers_reach_the_inputs_host_only_across_redirects(tmp_path):
    """A custom header for an http(s) input (an API key) once followed a redirect to another
    host (aiohttp strips only Authorization and Cookie). Two loopback servers: the input's host
    redirects to itself, then to the other; only the input's host sees the key, on each hop."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from seglabel.storage.read import read_bytes

    seen: dict[str, list] = {"input": [], "other": []}
    png = encode(drawn(8, 6, 1), "PNG")

    def server(name: str, answer):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                keys = (self.headers.get("X-Api-Key"), self.headers.get("PRIVATE-TOKEN"))
                seen[name].append((self.path, *keys))
                status, headers, body = answer(self.path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd

    other = server("other", lambda path: (200, {"Content-Type": "image/png"}, png))
    other_url = f"http://127.0.0.1:{other.server_port}/stolen.png"
    input_host = server("input", lambda path: (
        (302, {"Location": "/hop.png"}, b"") if path == "/a.png" else (302, {"Location": other_url}, b"")))
    try:
        url = f"http://127.0.0.1:{input_host.server_port}/a.png"
        headers = {"X-Api-Key": "secret", "PRIVATE-TOKEN": "t0ken"}
        # Per request, and as the session's defaults (aiohttp's client_kwargs).
        for options in ({"headers": headers}, {"client_kwargs": {"headers": headers}}):
            assert read_bytes(url, options, 1 << 20) == png
    finally:
        input_host.shutdown()
        other.shutdown()
    assert seen["input"] == [("/a.png", "secret", "t0ken"), ("/hop.png", "secret", "t0ken")] * 2
    assert seen["other"] == [("/stolen.png", None, None)] * 2


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


def test_a_lease_lost_to_another_run_stops_the_commit(tmp_path, monkeypatch):
    """A run that stalled past its expiry (or wrote at the instant another did) finds another
    run's lease at its next renewal: it never writes the lease back, and commits nothing more."""
    from seglabel.job import lease as leases
    from seglabel.outputs.store import OutputStore

    monkeypatch.setattr(leases, "RENEW_EVERY_S", 0.05)
    store = OutputStore(str(tmp_path / "out"))
    mine = leases.Lease(store).take()
    other = {"id": "other", "host": "elsewhere", "pid": 1, "started": "",
             "renewed": leases._now().isoformat()}  # private: a lease as another machine writes it
    (tmp_path / "out" / leases.LEASE_FILE).write_text(json.dumps(other))
    deadline = time.monotonic() + 10
    while mine.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(leases.OutputBusy, match="lost its lease"):
        mine.check()
    mine.release()
    assert json.loads((tmp_path / "out" / leases.LEASE_FILE).read_text())["id"] == "other"


def test_a_lease_from_the_future_or_another_pid_space_is_judged_right(tmp_path, monkeypatch):
    """A lease "renewed" a year ahead (a clock far off) is stale, not a lock for a year; a gone
    pid is taken over at once only in this pid namespace of this boot (containers sharing a
    host name each have their own pids); an interrupted take leaves no lease behind."""
    import socket
    from datetime import timedelta

    from seglabel.job import lease as leases
    from seglabel.outputs.store import OutputStore

    store = OutputStore(str(tmp_path / "out"))
    path = tmp_path / "out" / leases.LEASE_FILE
    path.parent.mkdir(parents=True)
    now = leases._now()  # private: the lease's own clock
    gone = int(open("/proc/sys/kernel/pid_max").read()) + 1  # no process has it
    space = leases._process_space()  # private: what a lease records of its process
    base = {"id": "x", "host": socket.gethostname(), "started": "", **space}
    ahead = (now + timedelta(days=365)).isoformat()
    path.write_text(json.dumps({**base, "pid": os.getpid(), "renewed": ahead}))
    assert leases.live_holder(store) is None
    path.write_text(json.dumps({**base, "pid": gone, "pidns": "pid:[1]", "renewed": now.isoformat()}))
    assert leases.live_holder(store) is not None  # another namespace's pid: not known to be gone
    path.write_text(json.dumps({**base, "pid": gone, "renewed": now.isoformat()}))
    assert leases.live_holder(store) is None
    path.unlink()

    def interrupted(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(leases.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        leases.Lease(store).take()
    assert not path.exists()


def test_a_single_image_is_labeled_into_its_own_folder(checkpoints, tmp_path):
    images = photos(tmp_path / "photos", 2)
    summary = run(checkpoints, images / "p0.jpg", images)
    assert summary.processed == 1 and [r["key"] for r in read_rows(str(images))] == ["p0.jpg"]


def test_an_output_stays_seglabels_through_a_failed_overwrite(checkpoints, tmp_path):
    """--overwrite removes the old record; a masks/ PNG a killed run never committed stays. A run
    that then fails before labeling once left a folder with masks and no record, which every
    later run refused. The new record is written at once; a damaged part does not stop it."""
    images = photos(tmp_path / "photos")
    out = tmp_path / "labels"
    run(checkpoints, images, out)
    (out / "masks" / "uncommitted.jpg.png").write_bytes(b"a killed run's")
    part = sorted((out / "metadata").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])
    # The overwrite's own step, as a run that then fails (Ray unreachable, say) leaves it.
    from seglabel.core.config import JobConfig
    from seglabel.job.lifecycle import OutputLife
    from seglabel.job.plan import absolute_paths, resolve_model
    from seglabel.outputs.store import OutputStore

    settings = {"input": str(images), "output": str(out), "overwrite": True,
                "model": str(checkpoints["instance"]), "stand_in": "segments=2"}
    config = absolute_paths(JobConfig.from_mapping(settings))
    assert OutputLife(OutputStore(str(out)), config, resolve_model(config)).prepare() is None
    assert json.loads((out / "job.json").read_text())["task"] == "instance"
    assert (out / "masks" / "uncommitted.jpg.png").exists()
    assert not list((out / "metadata").glob("*.parquet"))
    assert run(checkpoints, images, out).processed == 3
    assert sorted(r["key"] for r in read_rows(str(out))) == ["p0.jpg", "p1.jpg", "p2.jpg"]


def test_a_local_file_that_grew_after_it_was_measured_is_read_whole_or_refused(tmp_path, monkeypatch):
    """A local read asks for the file's measured size plus one byte; a file that grew since
    (here: its size misreported) is read again, still bounded by --max-bytes."""
    from seglabel.storage import read as fetch

    path = tmp_path / "grown.bin"
    path.write_bytes(bytes(range(100)))
    measure = fetch.regular_target

    def stale(uri, options=None):
        fs, where, _ = measure(uri, options)
        return fs, where, 5  # measured before it grew

    monkeypatch.setattr(fetch, "regular_target", stale)
    uri = path.as_uri()
    assert fetch.read_bytes(uri, {}, max_bytes=200) == bytes(range(100))
    with pytest.raises(fetch.Unreadable, match="over --max-bytes 50"):
        fetch.read_bytes(uri, {}, max_bytes=50)
