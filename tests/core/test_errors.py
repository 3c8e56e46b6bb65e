"""One error hierarchy and one-line errors; URLs redacted in messages, logs, rows and records."""

from __future__ import annotations

import json
import os

import pytest
from readback import check_output

from helpers import STAND_IN, drawn, encode
from seglabel.core.errors import ConfigError, SeglabelError, one_line
from seglabel.job.pipeline import label


def test_errors_are_one_line_and_share_one_base():
    from seglabel.core.errors import (
        CheckpointError,
        DecodeError,
        ExportError,
        JobError,
        OutputError,
        SourceError,
    )

    for cls in (ConfigError, SourceError, CheckpointError, OutputError, ExportError, JobError, DecodeError):
        assert issubclass(cls, SeglabelError)
    assert JobError.exit_status == 1 and OutputError.exit_status == 2
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert one_line(ValueError("")) == "ValueError"
    assert one_line(ValueError("x" * 500), 20) == "x" * 17 + "..."


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


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
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
    summary = label(manifest=f"{base}/lists/list.txt?{signed}", output=str(out), model=model,
                    stand_in=STAND_IN)
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
                  model=model, stand_in=STAND_IN)
    assert (again.already_done, again.processed) == (5, 0)
    with pytest.raises(Exception) as missing:
        label(manifest=f"{base}/lists/gone.txt?X-Amz-Signature=GONESECRET", output=str(tmp_path / "o2"),
              model=model, stand_in=STAND_IN)
    message = str(missing.value)
    assert "gone.txt?X-Amz-Signature=REDACTED" in message and "GONESECRET" not in message
