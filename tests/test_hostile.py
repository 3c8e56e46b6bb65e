"""Hostile names and files (issue 11): no wrong label, no hang, no lie. Each defect was first
reproduced in a review; here one job per storage runs over all of them (a real local Ray, a
loopback S3 endpoint), and the output is read back independently."""

from __future__ import annotations

import json
import os

import boto3
import numpy as np
import pytest
from PIL import Image

from helpers import drawn, encode
from outputs import check_output, read_rows
from seglabel.cli import main
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
    label(str(root), str(out), model=str(checkpoints["instance"]), batch_size=1, max_bytes=MAX_BYTES)
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
    label(manifest=str(manifest), output=str(out), model=str(checkpoints["instance"]))
    stale = out / "masks" / base / "gone.jpg.png"
    stale.write_bytes(encode(drawn(20, 10, 2), "PNG"))
    manifest.write_text("\n".join(str(root / n) for n in ("real.jpg", "fifo.jpg", "zero.jpg", "gone.jpg")))
    label(manifest=str(manifest), output=str(out), model=str(checkpoints["instance"]))
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
    summary = label(manifest=str(manifest), output=str(out), model=str(checkpoints["instance"]))
    assert (summary.found, summary.ok, summary.error) == (2, 1, 1)
    check_output(str(out), "instance", expected)
    again = label(manifest=str(manifest), output=str(out), model=str(checkpoints["instance"]))
    assert (again.found, again.already_done, again.processed) == (2, 2, 0)
    label(manifest=str(manifest), output=str(out), model=str(checkpoints["instance"]), retry_errors=True)
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
    label(f"s3://{s3_bucket}/in", out, model=str(checkpoints["instance"]), max_bytes=MAX_BYTES)
    rows = check_output(out, "instance", {
        "a::b.jpg": (50, 40), "big.png": "read: ", "empty.png": "decode: empty", "q?x=1.jpg": (37, 20),
        "h#1 %20.jpg": (38, 20), "v.jpg": (39, 20), "v.jpg.png?versionId=1.jpg": "key: unsafe",
    })
    for key in ("a::b.jpg", "q?x=1.jpg", "h#1 %20.jpg"):
        assert rows[key]["mask_uri"] == f"s3://{s3_bucket}/out/masks/{key}.png"


def test_success_only_when_every_image_has_a_row(checkpoints, tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.png").write_bytes(encode(drawn(20 + i, 10, i), "PNG"))
    out = tmp_path / "out"
    args = ["run", "--input", str(root), "--output", str(out), "--model", str(checkpoints["semantic"])]
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
    args = ["--output", str(out), "--model", str(checkpoints["semantic"])]
    assert main(["run", "--input", str(first), *args]) == 0
    capsys.readouterr()
    assert main(["run", "--input", str(second), *args]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the listing's log lines
    assert last.startswith("seglabel: error:") and "was labeled from" in last and str(first) in last
    assert main(["run", "--input", str(second), *args, "--dry-run", "--overwrite"]) == 0
    assert "1 images found, 0 already labeled, 1 to do" in capsys.readouterr().out  # as --overwrite will
    assert main(["run", "--input", str(second), *args, "--overwrite"]) == 0


def test_storage_options_go_to_the_inputs_host_only():
    from seglabel.storage.filesystem import options_for

    secret = {"headers": {"Authorization": "Bearer t"}}
    base = "https://images.example.com/list.txt"
    assert options_for("https://images.example.com/a.jpg", base, secret) == secret
    assert options_for("https://elsewhere.example.net/a.jpg", base, secret) == {}
    assert options_for("http://images.example.com/a.jpg", base, secret) == {}
    assert options_for("s3://b/a.jpg", "s3://other/list.txt", {"anon": True}) == {"anon": True}


def test_max_bytes_stops_reading_an_http_body_that_never_ends():
    """fsspec's ranged read of an http URL reads the whole body; a server may ignore the range."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from seglabel.inputs.fetch import fetch

    small = encode(drawn(20, 10, 1), "PNG")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            if self.path == "/small.png":
                self.send_header("Content-Length", str(len(small)))
                self.end_headers()
                self.wfile.write(small)
                return
            self.end_headers()
            try:
                while True:  # no Content-Length, no end, whatever Range asked for
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert fetch(f"{base}/endless.png", max_bytes=100_000).error == "read: over --max-bytes 100000"
        fetched = fetch(f"{base}/small.png", max_bytes=100_000)
        assert (fetched.error, fetched.width, fetched.height) == (None, 20, 10)
    finally:
        server.shutdown()


def test_redact_url_hides_passwords_and_signatures_only():
    from seglabel.core.redaction import redact, redact_url

    assert redact_url("https://u:pw@h.example/a.jpg?X-Amz-Signature=s1&w=2&X-Amz-Credential=c#f") == (
        "https://REDACTED@h.example/a.jpg?X-Amz-Signature=REDACTED&w=2&X-Amz-Credential=REDACTED#f"
    )
    assert redact_url("https://h/x.jpg?sv=1&sig=abc") == "https://h/x.jpg?sv=1&sig=REDACTED"
    # On S3 or a disk '?' is part of a name: kept as it is.
    for name in ("s3://b/q?sig=1.jpg", "file:///d/a?token=2.jpg", "s3://b/a@b.jpg"):
        assert redact_url(name) == name
    message = "cannot read 'https://h/l.txt?Signature=zz': 403"
    assert redact(message) == "cannot read 'https://h/l.txt?Signature=REDACTED': 403"
    # Fail closed on names that look like credentials, a query without a path, a fragment.
    assert redact_url("https://h/x?key=AIza&api_key=q&client_secret=c&w=2") == (
        "https://h/x?key=REDACTED&api_key=REDACTED&client_secret=REDACTED&w=2")
    assert redact_url("https://h?sig=S") == "https://h?sig=REDACTED"
    assert redact_url("https://h/x#access_token=S") == "https://h/x#access_token=REDACTED"


def test_log_records_and_their_tracebacks_are_redacted(caplog):
    from seglabel.core.redaction import get_logger

    log = get_logger("seglabel.test_redaction")
    caplog.set_level("DEBUG", logger="seglabel.test_redaction")
    try:
        raise OSError("403 for url https://h/m.txt?X-Amz-Signature=TRACESECRET")
    except OSError:
        log.debug("cannot read %s", "https://u:PWSECRET@h/x", exc_info=True)
    text = caplog.text
    assert "https://REDACTED@h/x" in text and "X-Amz-Signature=REDACTED" in text
    assert "TRACESECRET" not in text and "PWSECRET" not in text


@pytest.fixture
def http_root(tmp_path):
    """A loopback http server of a folder (queries ignored, as a signed URL's are by a store
    that checked them)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = tmp_path / "www"
    root.mkdir()

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_signed_urls_leave_no_secret_in_keys_rows_records_or_logs(checkpoints, tmp_path, http_root, caplog):
    """A presigned http manifest (relative and signed entries, a URL with a password): keys are
    host + path, relative entries resolve as URLs, and no signature or password lands in the
    output (names, Parquet, job.json, _SUCCESS) or the driver's log."""
    root, base = http_root
    (root / "imgs").mkdir()
    for i, name in enumerate(("a.jpg", "b.jpg", "c.jpg", "d.jpg")):
        (root / "imgs" / name).write_bytes(encode(drawn(20 + i, 10, i), "JPEG"))
    host = base.split("://")[1]
    signed = "X-Amz-Credential=CREDSECRET&X-Amz-Signature=SIGSECRET"
    (root / "lists").mkdir()
    (root / "lists" / "list.txt").write_text("\n".join([
        "../imgs/a.jpg",  # relative to the manifest's URL, not "http:/host/..."
        f"{base}/imgs/b.jpg?{signed}",
        f"{base}/imgs/b.jpg?{signed}",  # listed twice: a repeat
        f"http://user:PWSECRET@{host}/imgs/c.jpg",
        f"{base}/imgs/d.jpg?w=2&sig=SASSECRET",
        f"{base}/imgs/d.jpg?w=3&sig=SASSECRET",  # another query, one key: a collision
    ]))
    out = tmp_path / "out"
    caplog.set_level("INFO", logger="seglabel")
    model = str(checkpoints["instance"])
    summary = label(manifest=f"{base}/lists/list.txt?{signed}", output=str(out), model=model)
    assert (summary.found, summary.ok) == (5, 4)
    expected: dict = {f"{host}/imgs/{n}.jpg": (20 + i, 10) for i, n in enumerate("abcd")}
    expected[f"{base}/imgs/d.jpg?w=3&sig=REDACTED"] = "key: collides with an earlier entry"
    rows = check_output(str(out), "instance", expected)
    hidden = "X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED"
    assert rows[f"{host}/imgs/b.jpg"]["image_uri"] == f"{base}/imgs/b.jpg?{hidden}"
    assert rows[f"{host}/imgs/d.jpg"]["image_uri"] == f"{base}/imgs/d.jpg?w=2&sig=REDACTED"
    assert rows[f"{host}/imgs/c.jpg"]["image_uri"] == f"http://REDACTED@{host}/imgs/c.jpg"
    recorded = [os.fsencode(p) for p in out.rglob("*")]
    recorded += [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    recorded.append(caplog.text.encode())
    for secret in (b"SECRET", b"PWSECRET"):
        assert not any(secret in blob for blob in recorded)
    assert json.loads((out / "job.json").read_text())["manifest"] == f"{base}/lists/list.txt?{hidden}"
    # Signed anew, the same manifest resumes; an error names the URL without its signature.
    again = label(manifest=f"{base}/lists/list.txt?X-Amz-Date=2&X-Amz-Signature=NEWSECRET", output=str(out),
                  model=model)
    assert (again.already_done, again.processed) == (5, 0)
    with pytest.raises(Exception) as missing:
        label(manifest=f"{base}/lists/gone.txt?X-Amz-Signature=GONESECRET", output=str(tmp_path / "o2"),
              model=model)
    message = str(missing.value)
    assert "gone.txt?X-Amz-Signature=REDACTED" in message and "GONESECRET" not in message

