"""Enumeration at scale against a real S3 endpoint on loopback (moto's server), issue 12 part 3.

    python bench/scale_s3.py [--objects 100000] [--manifest 1000000] [--json out.json]

Measures, each in a fresh process (peak RSS from the kernel's high-water mark, and time):

* listing a flat prefix of ``--objects`` objects (and of a sixth of that, for the slope) with
  ``seglabel.inputs.listing.iter_listing``: page by page, never the whole listing in memory;
* a fresh run's enumeration of a ``--manifest``-entry Parquet manifest read from S3
  (``iter_manifest`` and the job's de-duplication of the keys to do).

The objects are created in moto's backend directly (its HTTP server accepts about a hundred
PUTs a second); every listing and read goes through the S3 API over HTTP, as in a job. Needs
the test extra (moto). Runs on a CPU; about two minutes for the defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time

BUCKET = "scale"
CHILD = """
import json, sys, time
from seglabel.bench.memory import reset_peak, status_mb
kind, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
import gc; gc.collect()
before = status_mb("VmRSS"); reset_peak(); started = time.perf_counter()
count = 0
if kind == "listing":
    from seglabel.inputs.listing import iter_listing
    for _ in iter_listing(url):
        count += 1
else:
    from seglabel.core.keys import SortedHashes
    from seglabel.job.plan import Tally, new_refs
    from seglabel.inputs.manifest import iter_manifest
    tally = Tally()
    for _ in new_refs(iter_manifest(url), SortedHashes(), tally, dedupe=True):
        count += 1
seconds = time.perf_counter() - started
print(json.dumps({"count": count, "seconds": seconds, "baseline_mb": before, "peak_mb": status_mb("VmHWM")}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(kind: str, url: str, n: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, kind, url, str(n)], capture_output=True, text=True,
                          timeout=3600)
    if done.returncode:
        raise SystemExit(f"{kind} {url} failed: {done.stderr.strip()[-800:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["count"] != n:
        raise SystemExit(f"{kind} {url}: {result['count']} entries, expected {n}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--manifest", type=int, default=1_000_000)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ["AWS_ENDPOINT_URL_S3"] = os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    report: dict = {"objects": {}, "manifest": {}}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
        backend.create_bucket(BUCKET, "us-east-1")
        sizes = (max(1, args.objects // 6), args.objects)
        started = time.perf_counter()
        for n in sizes:
            for i in range(n):
                backend.put_object(BUCKET, f"flat{n}/IMG_{i:09d}.jpg", b"x")
        report["objects"]["created_s"] = round(time.perf_counter() - started, 1)
        for n in sizes:
            report["objects"][str(n)] = _measure("listing", f"s3://{BUCKET}/flat{n}", n)
        small, large = (report["objects"][str(n)] for n in sizes)
        report["objects"]["bytes_per_object"] = round(
            (large["peak_mb"] - small["peak_mb"]) * 2**20 / (sizes[1] - sizes[0]), 1)
        report["objects"]["seconds_per_million"] = round(large["seconds"] * 1e6 / sizes[1], 1)
        report["objects"]["list_requests"] = -(-sizes[1] // 1000)

        uris = pa.array([f"s3://{BUCKET}/photos/{i // 1000:06d}/IMG_{i:09d}.jpg"
                         for i in range(args.manifest)])
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"uri": uris}), sink, row_group_size=100_000)
        data = sink.getvalue().to_pybytes()
        backend.put_object(BUCKET, "manifest.parquet", data)
        report["manifest"] = {"entries": args.manifest, "bytes": len(data),
                              **_measure("manifest", f"s3://{BUCKET}/manifest.parquet", args.manifest)}
        seconds = report["manifest"]["seconds"]
        report["manifest"]["seconds_per_million"] = round(seconds * 1e6 / args.manifest, 1)
    finally:
        server.stop()

    o, m = report["objects"], report["manifest"]
    print(f"flat prefix on S3 (loopback moto): {sizes[1]:,} objects listed in "
          f"{o[str(sizes[1])]['seconds']:.1f} s "
          f"({o['seconds_per_million']} s per 10^6, {o['list_requests']} list requests), peak RSS "
          f"{o[str(sizes[1])]['peak_mb']:.0f} MB; slope {o['bytes_per_object']} B per object "
          f"(vs {sizes[0]:,} objects)")
    print(f"parquet manifest on S3: {m['entries']:,} entries ({m['bytes'] / 2**20:.1f} MiB) enumerated "
          f"in {m['seconds']:.1f} s, peak RSS {m['peak_mb']:.0f} MB (baseline {m['baseline_mb']:.0f} MB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
