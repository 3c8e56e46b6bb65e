"""The third round of hostile tests (issue 24): never destroy what is not ours, never mix an
unknown output's rows, never list the output as input, and a damaged output is one line naming
the damaged file. Jobs run on a real local Ray with the stand-in model; outputs are read back
with pyarrow, independently of seglabel's readers."""

from __future__ import annotations

import json
import os

import pytest
from readback import read_rows

from helpers import STAND_IN, drawn, encode, photos, run
from seglabel.cli import main
from seglabel.core.errors import OutputError

pytestmark = pytest.mark.usefixtures("ray_session")


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


def test_success_only_when_every_image_has_a_row(checkpoints, tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.png").write_bytes(encode(drawn(20 + i, 10, i), "PNG"))
    out = tmp_path / "out"
    args = ["run", "--input", str(root), "--output", str(out), "--model", str(checkpoints["semantic"]),
            "--stand-in", STAND_IN]
    assert main(args + ["--limit", "0"]) == 0  # a fresh output, nothing labeled
    assert "left 4 images for a later run" in capsys.readouterr().out
    assert not (out / "_SUCCESS").exists()
    assert main(args + ["--limit", "2"]) == 0
    assert len(read_rows(str(out))) == 2 and not (out / "_SUCCESS").exists()
    assert main(args + ["--limit", "2"]) == 0  # takes the last two: now complete
    assert json.loads((out / "_SUCCESS").read_text())["total"] == 4
    # Two images fail, are fixed, and --retry-errors --limit 1 redoes one: still incomplete.
    for name in ("0.png", "1.png"):
        (root / name).write_bytes(b"")
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "_SUCCESS").read_text())["error"] == 2
    for i, name in enumerate(("0.png", "1.png")):
        (root / name).write_bytes(encode(drawn(20, 10, i), "PNG"))
    assert main(args + ["--retry-errors", "--limit", "1"]) == 0
    assert not (out / "_SUCCESS").exists()


def test_resuming_from_another_input_is_refused(checkpoints, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    for root in (first, second):
        root.mkdir()
        (root / "a.png").write_bytes(encode(drawn(20, 10, 1), "PNG"))
    out = tmp_path / "out"
    args = ["--output", str(out), "--model", str(checkpoints["semantic"]), "--stand-in", STAND_IN]
    assert main(["run", "--input", str(first), *args]) == 0
    capsys.readouterr()
    assert main(["run", "--input", str(second), *args]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the listing's log lines
    assert last.startswith("seglabel: error:") and "was labeled from" in last and str(first) in last
    assert main(["run", "--input", str(second), *args, "--dry-run", "--overwrite"]) == 0
    assert "1 images found, 0 already labeled, 1 to do" in capsys.readouterr().out  # as --overwrite will
    assert main(["run", "--input", str(second), *args, "--overwrite"]) == 0
