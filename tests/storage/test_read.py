"""The bounded reader: a read stops past its limit, whatever a server sends or a file becomes."""

from __future__ import annotations

import pytest

from helpers import drawn, encode


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
