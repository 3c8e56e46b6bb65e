"""Opening storage: absolute local paths, full URIs, and an input's storage options and headers
kept to its own host across redirects."""

from __future__ import annotations

import os

import fsspec

from helpers import drawn, encode
from seglabel.storage.filesystem import absolute_local, full_uri, is_local, open_url, protocols


def test_absolute_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_local("./labels") == str(tmp_path / "labels")
    assert absolute_local("labels/x") == str(tmp_path / "labels" / "x")
    assert absolute_local("file:///data/x") == "/data/x"
    assert absolute_local("~/x") == os.path.expanduser("~/x")
    for url in ("s3://b/labels", "gs://b/x", "memory://x", "http://h/x.txt"):
        assert absolute_local(url) == url


def test_full_uri_has_protocol(tmp_path):
    local = fsspec.filesystem("file")
    assert full_uri(local, str(tmp_path / "a b.jpg")) == f"file://{tmp_path}/a b.jpg"
    assert full_uri(fsspec.filesystem("s3"), "bkt/x/y.jpg") == "s3://bkt/x/y.jpg"
    assert full_uri(fsspec.filesystem("memory"), "/r/x.jpg") == "memory:///r/x.jpg"


def test_storage_options_go_to_the_inputs_host_only():
    from seglabel.storage.filesystem import options_for

    secret = {"headers": {"Authorization": "Bearer t"}}
    base = "https://images.example.com/list.txt"
    assert options_for("https://images.example.com/a.jpg", base, secret) == secret
    assert options_for("https://elsewhere.example.net/a.jpg", base, secret) == {}
    assert options_for("http://images.example.com/a.jpg", base, secret) == {}
    assert options_for("s3://b/a.jpg", "s3://other/list.txt", {"anon": True}) == {"anon": True}


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


def test_a_local_path_with_a_double_colon_is_a_path(tmp_path, monkeypatch):
    """Issue 35: ``export --to 'x::y.json'`` was read as a chain of filesystems and wrote ``x:``;
    label maps and truth files named so were read from elsewhere. A name without a protocol is a
    local path; a chain that starts with a protocol is still one."""
    from seglabel.outputs.labelmap import read_label_map
    from seglabel.storage.location import Destination

    monkeypatch.chdir(tmp_path)
    Destination("x::y.json").write_file(Destination("x::y.json").root, b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x::y.json"]
    (tmp_path / "team::map.yaml").write_text("label0: people\n")
    assert read_label_map("team::map.yaml") == {"label0": "people"}
    fs, _ = open_url("simplecache::memory://chained/x")
    assert not is_local(fs) and "simplecache" in protocols(fs)
