"""Helpers the test modules share: image files, a small mixed corpus, free ports, a Ray head.

Test modules import from here (and from ``readback`` for reading outputs back), never from each
other.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from skimage import data

from seglabel.cli import main
from seglabel.job.pipeline import label

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports on 127.0.0.1 that nothing listens on right now: held open
    together while chosen, since the OS may hand a port just released out again (one head got
    the same port for its GCS and its dashboard, and did not start)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    """An image's file bytes in ``fmt``."""
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims width x height: costs nothing unless someone decodes it."""
    png = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def oriented(array: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    """A JPEG (or ``fmt``) of ``array`` with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(array), fmt, exif=exif, quality=95)


def drawn(width: int, height: int, seed: int) -> Image.Image:
    """A drawn image: a flat background with a few ellipses, different for every seed."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
        box = [x0, y0, x0 + int(rng.integers(1, width)), y0 + int(rng.integers(1, height))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image


def corpus_files() -> dict[str, bytes]:
    """Key → file bytes: real photos and drawn images in nested folders, odd names, junk."""
    return {
        "astronaut.jpg": encode(Image.fromarray(data.astronaut()), "JPEG"),
        "photos/coffee.png": encode(Image.fromarray(data.coffee()), "PNG"),
        "photos/cats/chelsea cat é.WEBP": encode(Image.fromarray(data.chelsea()), "WEBP"),
        "drawn/a/shapes 1.png": encode(drawn(64, 48, 1), "PNG"),
        "drawn/a/b/tall.bmp": encode(drawn(20, 150, 2), "BMP"),
        "drawn/broken.jpg": b"\xff\xd8\xff not really a jpeg",
        "drawn/notes.txt": b"not an image and not listed",
    }


# What a job makes of corpus_files(): (width, height) of each labeled image, or the start of the
# error of an image that cannot be labeled.
EXPECTED = {
    "astronaut.jpg": (512, 512),
    "photos/coffee.png": (600, 400),
    "photos/cats/chelsea cat é.WEBP": (451, 300),
    "drawn/a/shapes 1.png": (64, 48),
    "drawn/a/b/tall.bmp": (20, 150),
    "drawn/broken.jpg": "decode:",
}


def write_corpus(root: Path) -> Path:
    """corpus_files() written under ``root``; returns ``root``."""
    for key, blob in corpus_files().items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    return root


@dataclass(frozen=True)
class Head:
    """A Ray head started by a test."""

    dashboard: str  # the Jobs API, http://127.0.0.1:PORT
    gcs: str  # what a driver joins, 127.0.0.1:PORT
    home: Path  # its HOME: ~/.ray/auth_token there holds its token, if it has one


@contextmanager
def ray_head(home: Path, env: dict[str, str] | None = None) -> Iterator[Head]:
    """``ray start --head`` with the Jobs API on 127.0.0.1.

    The head runs with ``HOME=home``: Ray 2.60 turns token authentication on when a token is
    found at ``~/.ray/auth_token``, so a token written there first gives a head with Ray's
    default authentication, without touching the user's own home. Stopped (this head only, with
    every process it started) at the end.
    """
    head_env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HOME=str(home), **(env or {}))
    # The test process may have turned token auth on for itself (a local ray.init does): the
    # head decides for itself from its own HOME, as a freshly started one would.
    head_env.pop("RAY_AUTH_MODE", None)
    # Job entrypoints run `python`, as on a cluster image: this environment's.
    head_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{head_env.get('PATH', '')}"
    # Ports found free may be taken before the head binds them (a fresh-clone run lost its
    # dashboard port to another process starting at the same moment): a failed start is tried
    # again on other ports, twice at most.
    for attempt in range(3):
        temp = Path(f"/tmp/sgl-{uuid.uuid4().hex[:8]}")  # Ray's socket paths must stay short
        port, dashboard, agent, agent_grpc, runtime_env, client = free_ports(6)
        started = subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                "--num-cpus=2",
                f"--temp-dir={temp}",
                "--include-dashboard=true",
                "--disable-usage-stats",
                # Ports of our own, so that nothing else on the machine can be in the way.
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env}",
                f"--ray-client-server-port={client}",
            ],
            env=head_env,
            capture_output=True,
            timeout=120,
        )
        if started.returncode == 0:
            break
        _stop_head(temp, port)
        if attempt == 2:
            started.check_returncode()
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(address, home)
        yield Head(address, f"127.0.0.1:{port}", home)
    finally:
        _stop_head(temp, port)


def _wait_for_jobs_api(address: str, home: Path, timeout: float = 90) -> None:
    """Until the head takes jobs (its job agent starts a few seconds after the dashboard)."""
    import urllib.error
    import urllib.request

    token_file = home / ".ray" / "auth_token"
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file.exists() else {}
    deadline = time.monotonic() + timeout
    while True:
        try:
            request = urllib.request.Request(f"{address}/api/jobs/", headers=headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head at {address} did not answer")
        time.sleep(0.5)


def _stop_head(temp: Path, port: int) -> None:
    # This head only (not `ray stop`, which would stop every Ray on the machine): its processes
    # and all their descendants (the agents rename themselves "ray::…").
    import psutil

    victims = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
            if str(temp) in line or f"127.0.0.1:{port}" in line:
                victims += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(temp, ignore_errors=True)


def write_token(home: Path) -> str:
    """A fresh Ray authentication token at ``home/.ray/auth_token`` (where Ray keeps its own)."""
    token = uuid.uuid4().hex + uuid.uuid4().hex
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    (home / ".ray" / "auth_token").write_text(token)
    return token


def tool_python(name: str) -> str:
    """The Python of an annotation tool's own virtual environment (their pins conflict with
    seglabel's): ``.venv-tools/<name>`` in the checkout, or under ``SEGLABEL_TOOLS_DIR``.

    ``.ci/run`` installs them; elsewhere a missing tool skips the test, except with
    ``SEGLABEL_REQUIRE_TOOLS=1`` (set by ``.ci/run``), where it fails.
    """
    root = _tools_dir()
    await_tool(name)
    python = root / name / "bin" / "python"
    if python.exists():
        return str(python)
    _missing_tool(f"{name} is not installed in {root / name} (.ci/run installs it there)")


def _tools_dir() -> Path:
    return Path(os.environ.get("SEGLABEL_TOOLS_DIR") or ROOT / ".venv-tools")


def await_tool(name: str, timeout: float = 1800) -> None:
    """With ``SEGLABEL_TOOLS_PENDING=1`` (``.ci/run``, which installs the tools while the tests
    run), wait until the install of ``name`` is done: ``.ci/run`` writes its exit status to
    ``<tools>/<name>.rc``. A failed install fails the test, as a missing tool does."""
    if os.environ.get("SEGLABEL_TOOLS_PENDING") != "1":
        return
    marker = _tools_dir() / f"{name}.rc"
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if time.monotonic() > deadline:
            _missing_tool(f"{name}: its install did not end in {timeout:.0f} s ({marker} not written)")
        time.sleep(1)
    status = marker.read_text().strip()
    if status != "0":
        _missing_tool(f"{name}: its install failed (exit {status}; .ci/run printed its log)")


# -- Chromium ---------------------------------------------------------------------------------


def _missing_tool(message: str) -> None:
    import pytest

    if os.environ.get("SEGLABEL_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def chromium(url: str, workdir: Path, *, screenshot: Path | None = None, size: str = "1400,1000") -> str:
    """Open ``url`` (a file:// page) in the distribution's headless Chromium and return the DOM
    after its scripts ran (``--dump-dom``), or write a ``screenshot`` PNG. The browser may not
    reach the network: every request goes to a proxy on a closed loopback port and names do not
    resolve. ``.ci/run`` installs Chromium (apt); elsewhere a missing one skips the test, except
    with ``SEGLABEL_REQUIRE_TOOLS=1``."""
    await_tool("chromium")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        _missing_tool("chromium is not installed (.ci/run installs it with apt-get install chromium)")
    profile = workdir / f"chromium-profile-{uuid.uuid4().hex[:8]}"
    args = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-extensions", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--metrics-recording-only",
        "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={profile}", f"--window-size={size}", "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# -- Label Studio -----------------------------------------------------------------------------


@dataclass
class LabelStudio:
    """A running Label Studio server on loopback, and its REST API with the admin's token."""

    url: str
    token: str

    def call(self, method: str, path: str, body=None):
        """One REST call; its JSON answer (an HTTP error fails with the server's own words)."""
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            self.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Label Studio {method} {path}: {exc.code} {exc.read()[:2000]!r}") from None


@contextmanager
def label_studio(data_dir: Path, timeout: float = 240) -> Iterator[LabelStudio]:
    """Label Studio (its own virtual environment, see tool_python) on 127.0.0.1 with sqlite in
    ``data_dir``, an admin with a legacy API token (new organisations have those off), stopped
    at the end. About 40 s to start on this machine, 5 s on a database migrated ahead."""
    python = Path(tool_python("label-studio"))
    # A database migrated ahead (.ci/run makes it while the project installs): a fresh one costs
    # Label Studio about 33 s of CPU in migrations before it serves; with a copy it starts as on
    # a restart. Only the database is copied (the server writes its own secret key); without a
    # template, the server migrates as usual.
    template = python.parents[2] / "label-studio-data" / "label_studio.sqlite3"
    if template.is_file():
        shutil.copyfile(template, data_dir / template.name)
    port = free_port()
    token = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    env = dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(data_dir), LABEL_STUDIO_USERNAME="test@example.com",
               LABEL_STUDIO_PASSWORD=uuid.uuid4().hex, LABEL_STUDIO_USER_TOKEN=token,
               LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true", LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
               # Loopback only: by default the server asks PyPI for its latest version at start-up
               # (up to 10 s offline) and reports to Sentry and its analytics.
               LABEL_STUDIO_LATEST_VERSION_CHECK="false", LABEL_STUDIO_SENTRY_DSN="",
               LABEL_STUDIO_FRONTEND_SENTRY_DSN="", LABEL_STUDIO_COLLECT_ANALYTICS="false")
    log = open(data_dir / "server.log", "wb")
    server = subprocess.Popen([str(python.with_name("label-studio")), "start", "--no-browser",
                               "--internal-host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    studio = LabelStudio(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                studio.call("GET", "/api/projects")
                break
            except (OSError, AssertionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    said = (data_dir / "server.log").read_text(errors="replace")[-2000:]
                    raise AssertionError(f"Label Studio did not start: {said}") from None
                time.sleep(2)
        yield studio
    finally:
        # A server that died at start-up is gone already: its log says why, not this.
        with suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
        log.close()


def photo_job(root: Path, checkpoint: Path, photos: dict[str, np.ndarray], **settings) -> str:
    """A job over ``photos`` (name -> RGB array, written as files under ``root/images``) into
    ``root/labels`` with ``checkpoint``; the output's path. Needs a Ray (``ray_session``)."""
    from seglabel.job.pipeline import label

    for name, pixels in photos.items():
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    label(str(root / "images"), str(root / "labels"), model=str(checkpoint), **settings)
    return str(root / "labels")


def photos(folder, n: int = 3):
    """``n`` small drawn JPEGs in ``folder`` (made)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"p{i}.jpg").write_bytes(encode(drawn(30 + i, 20, i), "JPEG"))
    return folder


# The stand-in model (two segments an image) for tests whose subject is the job around the model
# (names, resume, limits, retries, storage faults), not its masks: a real tiny checkpoint costs
# each job's Segmenter process about 6 s of CPU importing torch and transformers. The pipeline,
# engine, export and fault tests that are about the model's output run the real checkpoints.
STAND_IN = "segments=2"


def run(checkpoints, input, output, **settings):
    """A job of ``input`` into ``output`` with the stand-in model (two segments an image) and the
    tiny instance checkpoint's labels; its Summary. Needs a Ray (``ray_session``)."""
    model = str(checkpoints["instance"])
    return label(str(input), str(output), model=model, stand_in=STAND_IN, **settings)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, which must fail with exit 2 and one line on stderr; returns that line."""
    capsys.readouterr()  # what came before (a job's Ray lines)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def hand_made_output(root, rows: list[dict], id2label: dict[str, str]):
    """An output written with pyarrow alone: job.json and one part of contract rows."""
    from seglabel.outputs.contract import SCHEMA

    (root / "metadata").mkdir(parents=True)
    (root / "job.json").write_text(json.dumps({"task": "instance", "id2label": id2label, "model": "m"}))
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "metadata" / "part-1.parquet")
    return root


def ok_row(key: str, uri: str, width: int = 4, height: int = 3, labels: tuple[str, ...] = ()) -> dict:
    """An ok contract row whose segments are one pixel each, labeled ``labels``."""
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


# A key's last segment becomes "<segment>.png": 251 bytes at most, so that it fits in 255.
LONG = "x" * 248 + ".jpg"  # 252 bytes: one over the limit
LONG_OK = "x" * 247 + ".jpg"  # 251 bytes


def put(bucket, objects):
    """Objects (key -> bytes) written into an S3 bucket of the loopback endpoint."""
    import boto3

    client = boto3.client("s3")
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def many_images(folder: Path, n: int) -> dict[str, tuple[int, int]]:
    """``n`` drawn PNGs of a few sizes in ``folder``; their sizes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(n):
        image = drawn(32 + (i % 7) * 5, 24 + (i % 5) * 6, i)
        image.save(folder / f"img{i:03d}.png")
        expected[f"img{i:03d}.png"] = image.size
    return expected


def segmenter_processes() -> list:
    """The Segmenter actors of this test's own Ray: among this process's descendants (its embedded
    Ray, or the cluster it started, runs under it), never those of another test session running
    beside this one (pytest-xdist's other worker, or someone else's run on the machine)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "SegmentStage" in " ".join(proc.cmdline()) + proc.name():
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found
