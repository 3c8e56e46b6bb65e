"""Hostile names and files (issue 11): no wrong label, no hang, no lie. Each defect was first
reproduced in a review; here one job per storage runs over all of them (a real local Ray, a
loopback S3 endpoint), and the output is read back independently."""

from __future__ import annotations

import os

import boto3
import numpy as np
import pytest
from PIL import Image
from readback import check_output, read_rows

from helpers import STAND_IN, drawn, encode
from seglabel.job.pipeline import label

pytestmark = pytest.mark.usefixtures("ray_session")
MAX_BYTES = 4000


def noise_png() -> bytes:
    """A PNG that does not compress: over MAX_BYTES."""
    png = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)), "PNG"
    )
    assert len(png) > MAX_BYTES
    return png


@pytest.fixture(scope="module")
def local_job(checkpoints, tmp_path_factory):
    """One job over a folder of hostile names and files, with --max-bytes."""
    root = tmp_path_factory.mktemp("hostile") / "in"
    (root / "x.jpg.png").mkdir(parents=True)
    (root / "a").write_bytes(encode(drawn(30, 20, 1), "PNG"))  # not listed (no extension)
    (root / "a::b.jpg").write_bytes(encode(drawn(50, 40, 2), "JPEG"))
    (root / "c::d::e.png").write_bytes(encode(drawn(44, 33, 3), "PNG"))
    (root / "x.jpg").write_bytes(encode(drawn(40, 30, 4), "JPEG"))
    (root / "x.jpg.png" / "y.jpg").write_bytes(encode(drawn(20, 10, 5), "JPEG"))
    (root / "real.jpg").write_bytes(encode(drawn(36, 24, 6), "JPEG"))
    (root / "big.png").write_bytes(noise_png())
    os.mkfifo(root / "fifo.jpg")  # blocks its reader forever
    os.symlink("/dev/zero", root / "zero.jpg")  # never ends
    os.symlink(root / "real.jpg", root / "link.jpg")  # a link to a regular file is followed
    os.symlink(root, root / "loop.jpg")  # a link to a folder is not (a loop)
    for name, seed in (("q?x=1.jpg", 7), ("h#1 %20.jpg", 8), ("v.jpg", 9), ("v.jpg.png?versionId=1.jpg", 10)):
        (root / name).write_bytes(encode(drawn(30 + seed, 20, seed), "JPEG"))
    with open(os.fsencode(root) + b"/bad\xff name.jpg", "wb") as f:  # not UTF-8: Parquet cannot hold it
        f.write(encode(drawn(30, 20, 11), "JPEG"))
    out = root.parent / "out"
    label(str(root), str(out), model=str(checkpoints["instance"]), batch_size=1, max_bytes=MAX_BYTES,
          stand_in=STAND_IN)
    return root, out, {r["key"]: r for r in read_rows(str(out))}


def test_double_colon_names_read_their_own_object(local_job):
    """fsspec reads "a::b.jpg" as a chained URL, i.e. the file "a": the row must be a::b.jpg's."""
    _, _, rows = local_job
    assert (rows["a::b.jpg"]["width"], rows["a::b.jpg"]["height"]) == (50, 40)
    assert (rows["c::d::e.png"]["width"], rows["c::d::e.png"]["height"]) == (44, 33)


def test_a_file_and_a_folder_of_one_mask_name(local_job):
    """Keys x.jpg and x.jpg.png/y.jpg: masks/x.jpg.png cannot be both a file and a folder. The
    one written second fails with a write error row; nothing lands inside the other."""
    _, out, rows = local_job
    pair = {k: rows[k] for k in ("x.jpg", "x.jpg.png/y.jpg")}
    ok = [k for k, r in pair.items() if r["status"] == "ok"]
    failed = [k for k, r in pair.items() if r["status"] == "error"]
    assert len(ok) == 1 and len(failed) == 1 and pair[failed[0]]["error"].startswith("write: "), pair
    mask = out / "masks" / f"{ok[0]}.png"
    assert mask.is_file() and pair[ok[0]]["mask_uri"] == mask.as_uri()
    if ok[0] == "x.jpg.png/y.jpg":  # the folder won: nothing else went into it
        assert os.listdir(out / "masks" / "x.jpg.png") == ["y.jpg.png"]


def test_question_marks_and_hashes_round_trip_and_version_ids_are_refused(local_job):
    """'?', '#' and '%' are kept in keys and mask names; "?versionId=" is refused: s3fs would
    take it for a version and write v.jpg.png?versionId=1.jpg's mask over v.jpg's."""
    _, out, rows = local_job
    for key, width in (("q?x=1.jpg", 37), ("h#1 %20.jpg", 38), ("v.jpg", 39)):
        assert (rows[key]["status"], rows[key]["width"]) == ("ok", width)
        assert (out / "masks" / f"{key}.png").is_file()
    assert rows["v.jpg.png?versionId=1.jpg"]["error"] == "key: unsafe"


def test_a_name_that_is_not_utf8_is_an_error_row_with_an_escaped_key(local_job):
    _, out, rows = local_job
    row = rows["bad\\xff name.jpg"]  # each undecodable byte as \xNN
    assert (row["status"], row["error"]) == ("error", "key: unsafe")
    assert row["image_uri"].endswith("/bad\\xff name.jpg")


def test_special_files_are_not_listed_and_max_bytes_caps_reads(local_job):
    _, out, rows = local_job
    assert (
        "fifo.jpg" not in rows and "zero.jpg" not in rows and not any(k.startswith("loop.jpg") for k in rows)
    )
    assert (rows["link.jpg"]["status"], rows["link.jpg"]["width"]) == ("ok", 36)
    assert rows["big.png"]["status"] == "error" and f"--max-bytes {MAX_BYTES}" in rows["big.png"]["error"]
    expected = {k: (r["width"], r["height"]) for k, r in rows.items() if r["status"] == "ok"}
    expected.update({k: r["error"] for k, r in rows.items() if r["status"] != "ok"})
    assert set(expected) == {"a::b.jpg", "c::d::e.png", "x.jpg", "x.jpg.png/y.jpg", "real.jpg", "big.png",
                             "link.jpg", "q?x=1.jpg", "h#1 %20.jpg", "v.jpg", "v.jpg.png?versionId=1.jpg",
                             "bad\\xff name.jpg"}
    # Every row read back against the contract (the x.jpg pair's folder is tested above).
    check_output(str(out), "instance", expected, skip_mask_check={"x.jpg"})


def test_named_by_a_manifest_special_files_are_error_rows_and_stale_masks_go(
    local_job, checkpoints, tmp_path
):
    """A FIFO or a device named by a manifest is never opened. And an image whose mask a killed
    run wrote, deleted before the re-run, gets an error row and loses that stale mask."""
    root, _, _ = local_job
    base = str(root).lstrip("/")
    manifest = tmp_path / "list.txt"
    out = tmp_path / "out"
    # The killed run: its record and a first row committed (an output without its record is
    # refused since issue 24), and the mask of an image it never committed a row for.
    manifest.write_text(str(root / "real.jpg"))
    label(manifest=str(manifest), output=str(out), model=str(checkpoints["instance"]), stand_in=STAND_IN)
    stale = out / "masks" / base / "gone.jpg.png"
    stale.write_bytes(encode(drawn(20, 10, 2), "PNG"))
    manifest.write_text("\n".join(str(root / n) for n in ("real.jpg", "fifo.jpg", "zero.jpg", "gone.jpg")))
    label(manifest=str(manifest), output=str(out), model=str(checkpoints["instance"]), stand_in=STAND_IN)
    check_output(str(out), "instance", {
        f"{base}/real.jpg": (36, 24),
        f"{base}/fifo.jpg": "read: not a regular file",
        f"{base}/zero.jpg": "read: not a regular file",
        f"{base}/gone.jpg": "read: not found",
    })
    assert not stale.exists()


def test_two_uris_of_one_key_the_second_is_an_error_row(local_job, checkpoints, tmp_path):
    """file:///r/real.jpg and memory:///r/real.jpg share the key r/real.jpg: the first is labeled,
    the second is an error row keyed by its URI, and repeats of either stay repeats. A re-run
    (and --retry-errors) keeps exactly one row per URI."""
    root, _, _ = local_job
    base = str(root).lstrip("/")
    first, second = f"file://{root}/real.jpg", f"memory://{root}/real.jpg"
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join([first, second, first, second]))
    out = tmp_path / "out"
    expected = {f"{base}/real.jpg": (36, 24), second: f"key: collides with {first}"}
    summary = label(manifest=str(manifest), output=str(out), model=str(checkpoints["instance"]),
                    stand_in=STAND_IN)
    assert (summary.found, summary.ok, summary.error) == (2, 1, 1)
    check_output(str(out), "instance", expected)
    again = label(manifest=str(manifest), output=str(out), model=str(checkpoints["instance"]),
                  stand_in=STAND_IN)
    assert (again.found, again.already_done, again.processed) == (2, 2, 0)
    label(manifest=str(manifest), output=str(out), model=str(checkpoints["instance"]), retry_errors=True,
          stand_in=STAND_IN)
    rows = check_output(str(out), "instance", expected)
    assert rows[second]["image_uri"] == second and rows[second]["mask_uri"] is None


def test_on_s3_double_colons_and_max_bytes(checkpoints, s3_bucket):
    client = boto3.client("s3")
    objects = {"a": encode(drawn(30, 20, 1), "PNG"), "a::b.jpg": encode(drawn(50, 40, 2), "JPEG"),
               "big.png": noise_png(), "empty.png": b"", "q?x=1.jpg": encode(drawn(37, 20, 7), "JPEG"),
               "h#1 %20.jpg": encode(drawn(38, 20, 8), "JPEG"), "v.jpg": encode(drawn(39, 20, 9), "JPEG"),
               "v.jpg.png?versionId=1.jpg": encode(drawn(40, 20, 10), "JPEG")}
    for name, blob in objects.items():
        client.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=blob)
    out = f"s3://{s3_bucket}/out"
    label(f"s3://{s3_bucket}/in", out, model=str(checkpoints["instance"]), max_bytes=MAX_BYTES,
          stand_in=STAND_IN)
    rows = check_output(out, "instance", {
        "a::b.jpg": (50, 40), "big.png": "read: ", "empty.png": "decode: empty", "q?x=1.jpg": (37, 20),
        "h#1 %20.jpg": (38, 20), "v.jpg": (39, 20), "v.jpg.png?versionId=1.jpg": "key: unsafe",
    })
    for key in ("a::b.jpg", "q?x=1.jpg", "h#1 %20.jpg"):
        assert rows[key]["mask_uri"] == f"s3://{s3_bucket}/out/masks/{key}.png"
