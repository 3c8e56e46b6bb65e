"""What the driver holds per image stays small: the enumeration's counts and de-duplication on
64-bit hashes, the commit's one bit per todo row, parts flushed by bytes as well as rows."""

from __future__ import annotations

import pytest
from readback import read_rows

from helpers import one_line_error, photos, run
from seglabel.core.config import JobConfig
from seglabel.core.errors import ConfigError
from seglabel.core.keys import SortedHashes, key_hashes
from seglabel.inputs.refs import ImageRef
from seglabel.job import plan


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


def test_absolute_paths_in_the_driver(tmp_path, monkeypatch):
    from seglabel.job.plan import absolute_paths

    (tmp_path / "ckpt-instance").mkdir()
    monkeypatch.chdir(tmp_path)
    config = JobConfig.from_mapping({"input": "./images", "output": "labels", "model": "ckpt-instance"})
    resolved = absolute_paths(config)
    assert resolved.input == str(tmp_path / "images") and resolved.output == str(tmp_path / "labels")
    assert resolved.engine.model == str(tmp_path / "ckpt-instance")
    hub = JobConfig.from_mapping({"manifest": "s3://b/m.txt", "output": "s3://b/out",
                                  "model": "facebook/mask2former-swin-small-coco-instance"})
    assert absolute_paths(hub) == hub  # URLs and Hub ids stay as given


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
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


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
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


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
def test_a_single_image_is_labeled_into_its_own_folder(checkpoints, tmp_path):
    images = photos(tmp_path / "photos", 2)
    summary = run(checkpoints, images / "p0.jpg", images)
    assert summary.processed == 1 and [r["key"] for r in read_rows(str(images))] == ["p0.jpg"]
