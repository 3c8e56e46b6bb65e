"""Never lose or duplicate a label: bad inputs, resume, atomic commits and injected faults.

Every test ends by reading the output back independently (tests/readback.py) and checking that
every input appears exactly once, with its PNG, or as an error row with the expected reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress

import boto3
import numpy as np
import psutil
import pytest
from PIL import Image
from readback import check_output, read_rows
from skimage import data

from faultproxy import FaultProxy
from helpers import STAND_IN, drawn, encode, huge_png, many_images, oriented, segmenter_processes
from seglabel.cli import main
from seglabel.job.pipeline import label

pytestmark = pytest.mark.usefixtures("ray_session")


# -- bad and unusual inputs ----------------------------------------------------------------


def test_bad_input_corpus_gets_the_expected_status_for_every_file(checkpoints, tmp_path):
    photo = data.astronaut()
    jpeg, png = encode(Image.fromarray(photo), "JPEG"), encode(Image.fromarray(photo), "PNG")
    tall = np.zeros((40, 24, 3), np.uint8)
    frames = [Image.new("RGB", (30, 20), c) for c in ("red", "blue")]
    files = {
        "bad/zero.jpg": (b"", "decode: empty file"),
        "bad/text.jpg": (b"just some text\n" * 10, "decode: cannot identify image"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "decode: truncated image"),
        "bad/truncated.png": (png[: len(png) // 3], "decode: truncated image"),
        "bad/bomb.png": (huge_png(20000, 20000), "decode: image too large: 400000000 pixels"),
        "ok/16bit.png": (encode(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"), (40, 30)),
        "ok/cmyk.jpg": (encode(Image.new("CMYK", (33, 21), (0, 255, 255, 0)), "JPEG"), (33, 21)),
        "ok/gray.png": (encode(Image.new("L", (25, 35), 99), "PNG"), (25, 35)),
        "ok/palette.png": (encode(Image.new("RGB", (31, 17), "green").convert("P"), "PNG"), (31, 17)),
        "ok/rgba.png": (encode(Image.new("RGBA", (26, 19), (1, 2, 3, 0)), "PNG"), (26, 19)),
        "ok/rotated.jpg": (oriented(tall, 6), (40, 24)),  # stored 24 wide, upright 40 wide
        "ok/animated.gif": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), (30, 20)),
        "ok/animated.webp": (encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]), (30, 20)),
    }
    root = tmp_path / "in"
    for key, (blob, _) in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(blob)
    # A manifest adds what a listing cannot show: an object deleted between listing and reading,
    # and an entry that cannot be read (a folder named like an image).
    (root / "gone.jpg").write_bytes(jpeg)
    (root / "folder.jpg").mkdir()
    manifest = tmp_path / "list.txt"
    manifest.write_text(
        "\n".join([str(root / k) for k in files] + [str(root / "gone.jpg"), str(root / "folder.jpg")])
    )
    (root / "gone.jpg").unlink()
    out = tmp_path / "out"
    summary = label(manifest=str(manifest), output=str(out), model=str(checkpoints["instance"]),
                    stand_in=STAND_IN)
    base = str(root).lstrip("/")
    expected = {f"{base}/{k}": want for k, (_, want) in files.items()}
    expected[f"{base}/gone.jpg"] = "read: not found"
    expected[f"{base}/folder.jpg"] = "read:"
    check_output(str(out), "instance", expected)
    assert summary.error == 7 and summary.ok == 8
    rows = {r["key"]: r for r in read_rows(str(out))}
    upright = Image.open(out / "masks" / f"{base}/ok/rotated.jpg.png")
    assert upright.size == (40, 24) and rows[f"{base}/ok/rotated.jpg"]["width"] == 40


# -- resume, retry, settings -------------------------------------------------------------------


def test_retry_errors_replaces_error_rows_and_max_errors_stops(checkpoints, tmp_path, capsys):
    root = tmp_path / "in"
    expected = many_images(root, 6)
    for name in ("late1.png", "late2.png", "late3.png"):
        (root / name).write_bytes(b"")  # not there yet: an upload still in progress
    out = tmp_path / "out"
    args = ["run", "--input", str(root), "--output", str(out), "--model", str(checkpoints["semantic"]),
            "--stand-in", STAND_IN]
    assert main(args + ["--max-errors", "1", "--batch-size", "1", "--rows-per-part", "1"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("seglabel: error: stopped:") and "over --max-errors 1" in last
    committed = read_rows(str(out))
    assert 2 <= sum(r["status"] == "error" for r in committed) <= 3  # stopped on the second
    assert not (out / "_SUCCESS").exists()
    assert main(args) == 0  # resumes; the empty files stay errors
    check_output(
        str(out),
        "semantic",
        {**expected, **{n: "decode: empty file" for n in ("late1.png", "late2.png", "late3.png")}},
    )
    for name in ("late1.png", "late2.png", "late3.png"):
        drawn(50, 40, 99).save(root / name)
    assert main(args) == 0  # without --retry-errors an error row is final
    assert sum(r["status"] == "error" for r in read_rows(str(out))) == 3
    assert main(args + ["--retry-errors"]) == 0
    check_output(
        str(out), "semantic", {**expected, **{n: (50, 40) for n in ("late1.png", "late2.png", "late3.png")}}
    )


def test_changed_mask_settings_refuse_and_overwrite_starts_again(checkpoints, tmp_path, capsys):
    root = tmp_path / "in"
    expected = many_images(root, 3)
    out = tmp_path / "out"
    args = ["run", "--input", str(root), "--output", str(out), "--model", str(checkpoints["instance"]),
            "--stand-in", STAND_IN]
    assert main(args) == 0
    parts = sorted(p.name for p in (out / "metadata").iterdir())
    capsys.readouterr()
    assert main(args + ["--score-threshold", "0.7"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last.startswith("seglabel: error:")
        and "score_threshold: 0.5 -> 0.7" in last
        and "--overwrite" in last
    )
    assert sorted(p.name for p in (out / "metadata").iterdir()) == parts
    assert main(args + ["--batch-size", "2"]) == 0  # batch size may change
    assert main(args + ["--score-threshold", "0.7", "--overwrite"]) == 0
    assert json.loads((out / "job.json").read_text())["score_threshold"] == 0.7
    assert not set(parts) & {p.name for p in (out / "metadata").iterdir()}
    check_output(str(out), "instance", expected)


def test_resume_compares_the_dtype_the_device_resolved(checkpoints, tmp_path, capsys):
    """No --dtype: fp32 on a CPU, bf16 on a GPU. job.json records the one used, and a run that
    would resolve another (here: an output a GPU run started, resumed on this CPU) refuses."""
    root = tmp_path / "in"
    expected = many_images(root, 2)
    out = tmp_path / "out"
    args = ["run", "--input", str(root), "--output", str(out), "--model", str(checkpoints["semantic"]),
            "--stand-in", STAND_IN]  # the driver resolves the dtype, before any Segmenter starts
    assert main(args) == 0
    record = json.loads((out / "job.json").read_text())
    assert record["dtype"] == "fp32"
    (out / "job.json").write_text(json.dumps({**record, "dtype": "bf16"}))  # as a GPU run writes it
    expected.update(many_images(tmp_path / "more", 3))
    (tmp_path / "more" / "img002.png").rename(root / "img002.png")
    capsys.readouterr()
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "dtype bf16" in last and "would use fp32" in last and "--dtype bf16" in last, last
    assert (out / "_SUCCESS").exists() and len(read_rows(str(out))) == 2  # nothing changed
    assert main(args + ["--dtype", "fp32"]) == 2  # given, it is compared at once
    assert main(args + ["--dtype", "bf16"]) == 0
    check_output(str(out), "semantic", expected)


def test_a_dtype_unknown_at_the_first_run_is_recorded_by_the_next(checkpoints, tmp_path):
    """A first run with nothing to do (--limit 0) records no dtype; the run that labels records
    the one it used, so that a later run on another device is checked against it."""
    root = tmp_path / "in"
    many_images(root, 2)
    out = tmp_path / "out"
    args = ["run", "--input", str(root), "--output", str(out), "--model", str(checkpoints["semantic"]),
            "--stand-in", STAND_IN]
    assert main(args + ["--limit", "0"]) == 0
    assert json.loads((out / "job.json").read_text())["dtype"] is None
    assert main(args) == 0
    assert json.loads((out / "job.json").read_text())["dtype"] == "fp32"


def test_a_url_checkpoint_replaced_at_its_url_is_not_mixed_in(checkpoints, s3_bucket, tmp_path, capsys):
    """A checkpoint URL is cached per node by URL: weights replaced there must neither resume the
    job (its fingerprint is the revision job.json records) nor load from a stale copy."""
    import boto3
    from safetensors.torch import load_file, save_file

    from seglabel.core.errors import CheckpointError
    from seglabel.engine.load import fetch_checkpoint

    client = boto3.client("s3")
    url = f"s3://{s3_bucket}/ckpt-semantic"
    for f in checkpoints["semantic"].iterdir():
        client.put_object(Bucket=s3_bucket, Key=f"ckpt-semantic/{f.name}", Body=f.read_bytes())
    root = tmp_path / "in"
    many_images(root, 2)
    out = tmp_path / "out"
    args = ["run", "--input", str(root), "--output", str(out), "--model", url]
    assert main(args) == 0
    first = json.loads((out / "job.json").read_text())["revision"]
    assert first.startswith("files-")
    cache = tmp_path / "cache"
    copy = fetch_checkpoint(url, cache, first)
    assert fetch_checkpoint(url, cache) == copy  # unchanged: one copy

    weights = load_file(checkpoints["semantic"] / "model.safetensors")
    changed = tmp_path / "model.safetensors"
    save_file({k: v * 1.5 for k, v in weights.items()}, changed, metadata={"format": "pt"})
    client.put_object(Bucket=s3_bucket, Key="ckpt-semantic/model.safetensors", Body=changed.read_bytes())
    many_images(tmp_path / "more", 3)
    (tmp_path / "more" / "img002.png").rename(root / "img002.png")
    capsys.readouterr()
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "revision" in last and first in last and "--overwrite" in last, last
    with pytest.raises(CheckpointError, match="changed since the job recorded it"):
        fetch_checkpoint(url, cache, first)
    assert fetch_checkpoint(url, cache) != copy
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2  # a copy per contents


def test_inspect_reports_progress_and_errors(checkpoints, tmp_path, capsys):
    root = tmp_path / "in"
    many_images(root, 3)
    (root / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    label(str(root), str(out), model=str(checkpoints["instance"]), limit=2, stand_in=STAND_IN)
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    # Two of four images have rows: not complete (no _SUCCESS while --limit holds images back).
    assert (state["total"], state["complete"]) == (2, False)
    label(str(root), str(out), model=str(checkpoints["instance"]), stand_in=STAND_IN)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 (3 ok, 1 errors)" in text and "decode: cannot identify image" in text
    assert "status:   complete" in text


# -- faults ---------------------------------------------------------------------------------


def kill_when(condition, pick, timeout: float = 120) -> dict:
    """In a thread: wait for ``condition()``, then SIGKILL ``pick()``'s processes once."""
    record: dict = {}

    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                victims = pick()
                if victims:
                    for proc in victims:
                        proc.kill()
                    record["killed"] = [p.pid for p in victims]
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    record["thread"] = thread
    return record


def test_an_image_that_kills_its_worker_is_given_up_after_three_tries(checkpoints, tmp_path):
    """A stand-in Segmenter that SIGKILLs its own process on one image (as an OOM kill does):
    Ray would retry that batch forever. The image gets an error row after MAX_ATTEMPTS deaths,
    and the other images of its batch are labeled."""
    from seglabel.job.ledger import MAX_ATTEMPTS

    root = tmp_path / "in"
    expected = many_images(root, 7)
    drawn(13, 7, 99).save(root / "img003-poison.png")  # sorted among the others: mid-batch
    expected["img003-poison.png"] = "segment: worker died"
    out = tmp_path / "out"
    done: dict = {}
    model = str(checkpoints["instance"])
    job = threading.Thread(target=lambda: done.update(summary=label(
        str(root), str(out), model=model, batch_size=4, stand_in="segments=3,kill=13x7")), daemon=True)
    job.start()
    job.join(900)  # a timeout, not a speed: a job that retries the image for ever never ends
    assert "summary" in done, "the job did not end: the image was retried without a bound"
    summary = done["summary"]
    assert (summary.ok, summary.error) == (7, 1)
    rows = check_output(str(out), "instance", expected)
    assert all(len(r["segments"]) == 3 for k, r in rows.items() if r["status"] == "ok")
    assert MAX_ATTEMPTS == 3


def test_the_ledger_actor_process_loads_no_pipeline(ray_session):
    """The ledger is an actor with a process of its own, started with every job: that process
    imports the ledger's module, not the pipeline with Pillow and pycocotools (seen in the
    shared libraries it maps; numpy and pyarrow come with Ray's own serialization)."""
    import ray

    from seglabel.job import pipeline
    from seglabel.job.ledger import AttemptLedger

    assert pipeline.AttemptLedger is AttemptLedger and AttemptLedger.__module__ == "seglabel.job.ledger"
    ledger = ray.remote(AttemptLedger).options(num_cpus=0).remote()
    try:
        assert ray.get(ledger.begin.remote("decode", [1, 2])) == [0, 0]
        assert ray.get(ledger.in_flight.remote()) == 2
        # The actor's own process, as Ray says it is: by name or start time, a process Ray had
        # started before (and handed to this actor) was missed on a loaded machine.
        pid = ray.get(ledger.__ray_call__.remote(lambda self: os.getpid()))
        paths = [m.path for m in psutil.Process(pid).memory_maps()]
        assert any("/ray/" in p for p in paths)  # the maps are read: Ray's own library is there
        assert not [p for p in paths if "/PIL/" in p or "/pycocotools/" in p], "it loaded the pipeline"
    finally:
        ray.kill(ledger)


def test_bounded_runs_gives_up_on_the_one_image_that_dies(ray_session):
    """The ledger's count, with a death simulated as an exception that skips the stage's end."""
    import ray

    from seglabel.job.ledger import MAX_ATTEMPTS, AttemptLedger
    from seglabel.job.stages import bounded

    ledger = ray.remote(AttemptLedger).options(num_cpus=0).remote()
    indices = np.array([10, 11, 12, 13])
    executions = {i: 0 for i in indices.tolist()}

    class Died(Exception):
        pass

    def run(positions):
        for p in positions:
            executions[int(indices[p])] += 1
            if indices[p] == 12:
                raise Died
        return [f"ok{indices[p]}" for p in positions]

    for _ in range(MAX_ATTEMPTS):
        with pytest.raises(Died):
            list(bounded(ledger, "segment", indices, run))
    assert list(bounded(ledger, "segment", indices, run)) == ["ok10", "ok11", "segment: worker died", "ok13"]
    assert executions[12] == MAX_ATTEMPTS
    # Done: the ledger forgot them, and another stage's count is its own.
    assert list(bounded(ledger, "segment", indices[:2], run)) == ["ok10", "ok11"]
    assert ray.get(ledger.in_flight.remote()) == 0
    assert ray.get(ledger.begin.remote("decode", [12])) == [0]


def test_retried_images_run_one_at_a_time_across_an_actors_two_calls(ray_session):
    """After a death, the Segmenter's two calls retry their batches image by image, and never
    two images at once: a second death is charged to the one image that was running, not to an
    innocent one in the other call."""
    import ray

    from seglabel.job.ledger import AttemptLedger
    from seglabel.job.stages import bounded

    ledger = ray.remote(AttemptLedger).options(num_cpus=0).remote()
    batches = [np.array([20, 21, 22]), np.array([30, 31, 32])]
    for batch in batches:  # both were in flight when the worker died
        ray.get(ledger.begin.remote("segment", batch.tolist()))
    running, most = [], [0]
    guard = threading.Lock()

    def runner(batch):
        def run(positions):
            with guard:
                running.append(1)
                most[0] = max(most[0], len(running))
            time.sleep(0.05)
            with guard:
                running.pop()
            return [f"ok{batch[p]}" for p in positions]

        return run

    results = {}
    threads = [threading.Thread(target=lambda b=b: results.update({int(b[0]): list(bounded(
        ledger, "segment", b, runner(b)))})) for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {20: ["ok20", "ok21", "ok22"], 30: ["ok30", "ok31", "ok32"]}
    assert most[0] == 1, "two retried images ran at once"
    assert ray.get(ledger.in_flight.remote()) == 0


def test_the_segment_stage_leaves_nothing_in_the_ledger(ray_session, checkpoints):
    """The ledger holds work in flight only: after a batch, the Segmenter stage ended it."""
    import ray

    from seglabel.core.config import EngineConfig
    from seglabel.job.ledger import AttemptLedger
    from seglabel.job.stages import SegmentStage

    ledger = ray.remote(AttemptLedger).options(num_cpus=0).remote()
    engine = EngineConfig(model=str(checkpoints["instance"]), stand_in="segments=2")
    stage = SegmentStage(engine, ledger=ledger)
    n = 3
    images = np.empty(n, dtype=object)
    images[:] = [np.zeros((20, 30, 3), np.uint8)] * n
    out = stage({"index": np.arange(n), "key": np.array(["a", "b", "c"], dtype=object),
                 "uri": np.array(["u"] * n, dtype=object), "image": images, "width": np.full(n, 30),
                 "height": np.full(n, 20), "error": np.array(["", "", ""], dtype=object)})
    assert all(len(r) > 0 for r in out["raw"].to_pylist())
    assert ray.get(ledger.in_flight.remote()) == 0


def test_the_segment_stage_runs_two_batches_at_once_and_loses_nothing(ray_session, checkpoints):
    """Two calls at once on one actor (its overlap of host and model work): each returns its own
    rows in order; an image the model refuses is an error row, and its batch-mates are labeled."""
    from concurrent.futures import ThreadPoolExecutor

    from seglabel.core.config import EngineConfig
    from seglabel.core.results import RawPrediction
    from seglabel.job.stages import SegmentStage

    stage = SegmentStage(EngineConfig(model=str(checkpoints["instance"]), score_threshold=0.3))
    rng = np.random.default_rng(3)

    def batch(first: int, n: int, bad: int | None = None) -> dict:
        # Every image its own size: a result handed to the wrong row would show.
        shapes = [(20 + i, 30 + 2 * i, 4 if i == bad else 3) for i in range(first, first + n)]
        images = np.empty(n, dtype=object)
        images[:] = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in shapes]
        keys = np.array([f"k{i}" for i in range(first, first + n)], dtype=object)
        return {"index": np.arange(first, first + n), "key": keys, "uri": keys, "image": images,
                "width": np.array([s[1] for s in shapes]), "height": np.array([s[0] for s in shapes]),
                "error": np.array([""] * n, dtype=object)}

    batches = [batch(0, 4), batch(4, 3, bad=5), batch(7, 5), batch(12, 2)]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(stage, batches * 2))
    for given, out in zip(batches * 2, outs):
        assert list(out["key"]) == list(given["key"]) and list(out["index"]) == list(given["index"])
        for key, height, width, error, raw in zip(out["key"], given["height"], given["width"],
                                                  out["error"], out["raw"].to_pylist()):
            if key == "k5":
                assert error.startswith("segment: ") and "(H, W, 3)" in error and raw == b""
                continue
            assert error == "" and RawPrediction.loads(raw).id_map.shape == (height, width)


def test_segmenter_actor_killed_mid_run_is_replaced(checkpoints, tmp_path, monkeypatch):
    import seglabel.job.pipeline

    # Blocks of a few rows, so that 60 images make enough of them for a kill to land mid-run.
    monkeypatch.setattr(seglabel.job.pipeline, "BLOCK_ROWS", 4)
    root = tmp_path / "in"
    expected = many_images(root, 60)
    out = tmp_path / "out"
    parts = lambda: list((out / "metadata").glob("*.parquet")) if (out / "metadata").exists() else []  # noqa: E731
    record = kill_when(lambda: len(parts()) >= 2, segmenter_processes)
    # The real checkpoint, not the stand-in: the stand-in labels 60 images before a second part
    # is committed, and the kill then lands on a Segmenter with nothing left to do.
    summary = label(str(root), str(out), model=str(checkpoints["panoptic"]), batch_size=2, rows_per_part=4)
    record["thread"].join(5)
    assert record.get("killed"), "the Segmenter was never killed: the test proved nothing"
    check_output(str(out), "panoptic", expected)
    assert len(summary.actors) >= 2, summary.actors  # a second Segmenter process did the rest


def _run_processes(driver: int) -> set[psutil.Process]:
    """A ``seglabel run`` driver's processes: its descendants (its embedded Ray) and any process
    of its Ray session (Ray names the session's folder after the driver's pid), nothing of any
    other Ray on the machine (pytest-xdist's other worker runs one beside this test's)."""
    session = re.compile(rf"session_[0-9_-]+_{driver}\b")
    found = set()
    with suppress(psutil.NoSuchProcess):
        found |= set(psutil.Process(driver).children(recursive=True))
    for proc in psutil.process_iter(["cmdline"]):
        if session.search(" ".join(proc.info["cmdline"] or [])):
            found.add(proc)
            with suppress(psutil.NoSuchProcess):
                found |= set(proc.children(recursive=True))
    return found


# A driver that SIGKILLs itself at a named point of the commit window, after writing where
# (argv: point, count, marker file, group, then the run's own arguments): "todo" after its
# count-th to-do list is written (enumeration), "before-part"/"after-part" around its count-th
# Parquet part (after: the part is visible, the run has not gone on), "before-success" when it
# is about to write _SUCCESS. "group" kills its process group too (an embedded Ray with it).
KILLED_DRIVER = """
import os, signal, sys
point, count, marker, group = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "group"
from seglabel.job.lifecycle import OutputLife
from seglabel.outputs.store import OutputStore

def die(where):
    with open(marker, "w") as f:
        f.write(where)
    os.killpg(0, signal.SIGKILL) if group else os.kill(os.getpid(), signal.SIGKILL)

seen = {"todo": 0, "part": 0}
write_bytes, write_part, finish = OutputStore.write_bytes, OutputStore.write_part, OutputLife.finish

def writing_bytes(self, rel, data):
    write_bytes(self, rel, data)
    if "/todo-" in rel and rel.endswith(".parquet"):
        seen["todo"] += 1
        if point == "todo" and seen["todo"] == count:
            die(f"after to-do list {count}")

def writing_part(self, table, name):
    seen["part"] += 1
    if point == "before-part" and seen["part"] == count:
        die(f"before part {count}")
    path = write_part(self, table, name)
    if point == "after-part" and seen["part"] == count:
        die(f"after part {count}")
    return path

def finishing(self, *args, **kwargs):
    if point == "before-success":
        die("before _SUCCESS")
    return finish(self, *args, **kwargs)

OutputStore.write_bytes, OutputStore.write_part, OutputLife.finish = writing_bytes, writing_part, finishing
from seglabel.cli import main
sys.exit(main(sys.argv[5:]))
"""


# (point, count, where): the kill points cover the commit window by construction, each landing
# where its marker says; "embedded" runs the driver with a Ray of its own, killed with it (as
# `seglabel run` on one machine), "cluster" joins the session's Ray and dies alone (a driver
# lost on a cluster: its actors go with it, the cluster stays).
KILL_POINTS = [("todo", 1, "embedded"), ("before-part", 2, "cluster"), ("after-part", 2, "cluster"),
               ("before-success", 0, "cluster")]


@pytest.mark.parametrize("point, count, where", KILL_POINTS)
def test_driver_sigkilled_in_the_commit_window_then_rerun(checkpoints, tmp_path, point, count, where):
    """The driver SIGKILLed at each point of the commit window: the kill lands where it was
    meant to (the marker, and the parts then in the output), and the same command run again
    ends with every image labeled exactly once."""
    import ray

    root = tmp_path / "in"
    expected = many_images(root, 24)
    out = tmp_path / "out"
    marker = tmp_path / "killed-at"
    run_args = ["run", "--input", str(root), "--output", str(out), "--model", str(checkpoints["instance"]),
                "--stand-in", STAND_IN, "--batch-size", "2", "--rows-per-part", "3", "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if where == "cluster":
        run_args += ["--address", ray.get_runtime_context().gcs_address]
        env["RAY_AUTH_MODE"] = "token"
    command = [sys.executable, "-c", KILLED_DRIVER, point, str(count), str(marker),
               "group" if where == "embedded" else "alone", *run_args]
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stderr = proc.communicate(timeout=600)[1].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    landed = marker.read_text()
    parts = sorted((out / "metadata").glob("part-*.parquet")) if (out / "metadata").exists() else []
    if point == "todo":
        assert landed == "after to-do list 1" and parts == []
    elif point == "before-part":
        assert landed == "before part 2" and len(parts) == 1
    elif point == "after-part":
        assert landed == "after part 2" and len(parts) == 2
    else:
        assert landed == "before _SUCCESS" and len(read_rows(str(out))) == len(expected)
    assert not (out / "_SUCCESS").exists()
    if where == "embedded":
        for victim in _run_processes(proc.pid):  # what of the killed run's Ray outlived it
            with suppress(psutil.NoSuchProcess):
                victim.kill()
    # The same command again, in this process on the session's Ray.
    assert main([a for a in run_args if a not in ("--address", ray.get_runtime_context().gcs_address)]) == 0
    check_output(str(out), "instance", expected)
    assert (out / "_SUCCESS").exists()
    assert not [p for p in (out / "metadata").iterdir() if ".tmp-" in p.name]


def test_transient_s3_failures_are_retried(checkpoints, s3_endpoint, s3_bucket, tmp_path):
    client = boto3.client("s3")
    expected = {}
    for i in range(24):
        image = drawn(40 + i, 30, i)
        client.put_object(Bucket=s3_bucket, Key=f"in/d{i:02d}.png", Body=encode(image, "PNG"))
        expected[f"d{i:02d}.png"] = image.size
    out = f"s3://{s3_bucket}/out"
    with FaultProxy(s3_endpoint, every=4) as proxy:
        options = {"endpoint_url": proxy.url}

        def outage_mid_run():  # once the first part is committed: the job is in full flow
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if client.list_objects_v2(Bucket=s3_bucket, Prefix="out/metadata/").get("KeyCount", 0):
                    proxy.outage(3.0)
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=outage_mid_run, daemon=True)
        thread.start()
        label(
            f"s3://{s3_bucket}/in", out, model=str(checkpoints["semantic"]), batch_size=1, rows_per_part=2,
            stand_in=STAND_IN,
            input_storage_options=options, output_storage_options=options,
        )
        thread.join(5)
    assert proxy.slowdowns >= 5, "no 503 was injected"
    assert proxy.dropped >= 1, "the outage dropped no request"
    check_output(out, "semantic", expected)


# -- security hygiene ---------------------------------------------------------------------------


def test_no_credentials_in_outputs_or_logs_and_keys_stay_inside(
    checkpoints, s3_endpoint, s3_bucket, tmp_path, capsys, caplog
):
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="in/a.png", Body=encode(drawn(30, 20, 1), "PNG"))
    client.put_object(Bucket=s3_bucket, Key="x.png", Body=encode(drawn(30, 20, 2), "PNG"))
    secret = "wJalrXUtnFEMI-not-a-real-secret"
    options = {"key": "AKIAFAKEKEYFORTESTS", "secret": secret}
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"s3://{s3_bucket}/in/a.png\ns3://{s3_bucket}/in/../x.png\n")
    out = f"s3://{s3_bucket}/out"
    # seglabel's own logs at DEBUG, everything else at INFO (botocore and fsspec print request
    # signatures and options at DEBUG; the CLI keeps other libraries at WARNING).
    caplog.set_level("INFO")
    caplog.set_level("DEBUG", logger="seglabel")
    label(manifest=str(manifest), output=out, model=str(checkpoints["instance"]), stand_in=STAND_IN,
          input_storage_options=options, output_storage_options=options)
    check_output(
        out, "instance", {f"{s3_bucket}/in/a.png": (30, 20), f"{s3_bucket}/in/../x.png": "key: unsafe"}
    )
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert all(k.startswith(("in/", "out/")) or k == "x.png" for k in keys), keys
    blobs = [
        client.get_object(Bucket=s3_bucket, Key=k)["Body"].read()
        for k in keys
        if k.startswith("out/") and not k.endswith(".png")
    ]
    captured = capsys.readouterr()
    for text in [*(b.decode("latin-1") for b in blobs), captured.out, captured.err, caplog.text]:
        assert secret not in text and "AKIAFAKEKEYFORTESTS" not in text


def test_loading_a_checkpoint_never_runs_its_code(checkpoints, tmp_path):
    from seglabel import Segmenter

    evil = tmp_path / "evil-instance"
    evil.mkdir()
    for f in checkpoints["instance"].iterdir():
        (evil / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.Evil", "AutoConfig": "modeling_evil.Evil"}
    (evil / "config.json").write_text(json.dumps(config))
    Segmenter(str(evil))([np.zeros((8, 8, 3), np.uint8)])
    assert not marker.exists()
