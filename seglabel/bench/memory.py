"""``seglabel bench --memory``: what the driver holds per image, measured.

Every structure the driver keeps per image is measured at two sizes, each in a fresh process,
as its peak RSS; the figure is the slope between the two (bytes per image), so that the
interpreter, the imports and fixed buffers cancel out, and the time per 10^6 images. Two whole
commands are measured the same way: ``seglabel run --dry-run`` over a manifest whose images all
have rows already (the resume check of a re-run) and ``seglabel inspect`` of that output.

The data is made here: a Parquet manifest of N local-looking URIs, and an output holding one
committed row per image in parts of 10,000 rows (``--rows-per-part``'s default) with its
job.json, the checkpoint a config.json only (nothing here loads a model).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The structures measured in a process of their own: (name, what it is).
STRUCTURES = (
    ("enumerate", "a fresh run's enumeration of a parquet manifest (keys to do, de-duplicated)"),
    ("resume_scan", "a re-run's resume state: the keys of every committed row"),
    ("commit_guard", "the commit's record of the rows it committed"),
    ("counts", "the totals over every committed part (_SUCCESS, the summary, inspect)"),
)
# Whole commands, run as a user would: (name, what it is).
COMMANDS = (
    ("dry_run", "seglabel run --manifest M --dry-run over an output holding every image"),
    ("inspect", "seglabel inspect of that output"),
)
ROWS_PER_PART = 10_000
CHECKPOINT = "m2f-instance"


def manifest_uri(i: int) -> str:
    """The i-th image of the made-up corpus, as a manifest lists it."""
    return f"/mnt/corpus/photos/{i // 1_000_000:03d}/{(i // 1000) % 1000:03d}/IMG_{i:09d}.jpg"


def make_corpus(root: Path, entries: int) -> dict[str, str]:
    """A manifest of ``entries`` images and an output that has a committed row for each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..core.config import EngineConfig, JobConfig
    from ..core.license import License
    from ..outputs.contract import SCHEMA
    from ..outputs.record import JobRecord
    from ..outputs.store import OutputStore

    manifest, output, checkpoint = root / "manifest.parquet", root / "out", root / CHECKPOINT
    checkpoint.mkdir(parents=True)
    config = {"model_type": "mask2former", "id2label": {"0": "thing"}}
    (checkpoint / "config.json").write_text(json.dumps(config))
    store = OutputStore(str(output))
    writer = None
    for start in range(0, entries, ROWS_PER_PART):
        uris = [manifest_uri(i) for i in range(start, min(entries, start + ROWS_PER_PART))]
        chunk = pa.table({"uri": uris})
        writer = writer or pq.ParquetWriter(manifest, chunk.schema)
        writer.write_table(chunk)
        n = len(uris)
        rows = pa.table({
            "key": [u[1:] for u in uris],
            "image_uri": [f"file://{u}" for u in uris],
            "status": ["ok"] * n,
            "error": pa.nulls(n, pa.string()),
            "width": pa.array([640] * n, pa.int32()),
            "height": pa.array([480] * n, pa.int32()),
            "mask_uri": [f"file://{output}/masks{u}.png" for u in uris],
            "task": ["instance"] * n,
            "model": [str(checkpoint)] * n,
            "segments": pa.nulls(n, SCHEMA.field("segments").type),
            "review_score": pa.array([0.5] * n, pa.float32()),
        }, schema=SCHEMA)
        store.write_part(rows, f"part-bench-{start // ROWS_PER_PART:05d}.parquet")
    if writer is not None:
        writer.close()
    config = JobConfig(output=str(output), manifest=str(manifest), engine=EngineConfig(model=str(checkpoint)))
    # The checkpoint the bench made: a random Mask2Former without a model card.
    no_card = License("unknown", "no model card")
    JobRecord.new(config, "instance", None, {0: "thing"}, "mask2former", no_card).write(store)
    store.write_json("_SUCCESS", {"total": entries, "ok": entries, "error": 0, "errors_by_reason": {}})
    return {"manifest": str(manifest), "output": str(output), "model": str(checkpoint)}


# -- in a fresh process ----------------------------------------------------------------------


def status_mb(field: str) -> float | None:
    """A field of this process's /proc status (VmRSS, VmHWM) in MB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(kind: str, paths: dict[str, str], entries: int) -> dict[str, Any]:
    """Build one structure in this (fresh) process; its RSS before, its peak, its time."""
    import gc

    import numpy as np

    from ..core.keys import Bits, SortedHashes
    from ..inputs.manifest import iter_manifest
    from ..job.plan import Tally, new_refs
    from ..outputs.store import OutputStore

    store = OutputStore(paths["output"])
    gc.collect()
    before = status_mb("VmRSS")
    exact = reset_peak()
    started = time.perf_counter()
    if kind == "enumerate":
        tally = Tally()
        for _ in new_refs(iter_manifest(paths["manifest"]), SortedHashes(), tally, dedupe=True):
            pass
        extra: dict[str, Any] = {"found": tally.found}
    elif kind == "resume_scan":
        done = store.done_keys()
        extra = {"keys": len(done)}
    elif kind == "commit_guard":
        committed = Bits(entries)
        batches = (np.arange(s, min(entries, s + 4096)) for s in range(0, entries, 4096))
        fresh = sum(int(committed.first(rows).sum()) for rows in batches)
        extra = {"rows": fresh}
    elif kind == "counts":
        extra = {"total": store.counts()["total"]}
    else:
        raise ValueError(f"unknown structure {kind!r}")
    seconds = time.perf_counter() - started
    peak = status_mb("VmHWM") if exact else None
    if peak is None or before is None:  # no /proc: the peak over the whole life, imports included
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        before = before or 0.0
    return {"baseline_mb": before, "peak_mb": peak, "seconds": seconds, "exact": exact, **extra}


def _run_child(kind: str, paths: dict[str, str], entries: int) -> dict[str, Any]:
    code = (
        "import json, sys; from seglabel.bench.memory import child; "
        "print(json.dumps(child(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))))"
    )
    done = subprocess.run([sys.executable, "-c", code, kind, json.dumps(paths), str(entries)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"memory measurement {kind} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Runs a command and reports its peak RSS. A small process of its own, because a child's
# ru_maxrss counts what it shared with its parent before exec: measured from the bench itself
# (torch and Ray imported) every command would look as large as the bench.
_LAUNCHER = """
import json, resource, subprocess, sys
with open(sys.argv[1], "w") as err:
    rc = subprocess.call(sys.argv[3:], stdout=subprocess.DEVNULL, stderr=err)
with open(sys.argv[2], "w") as out:
    json.dump({"rc": rc, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, out)
"""


def _run_command(argv: list[str]) -> dict[str, Any]:
    """A seglabel command in a child process: its peak RSS and its time."""
    with tempfile.TemporaryDirectory(prefix="seglabel-bench-cmd-") as tmp:
        err, out = os.path.join(tmp, "stderr"), os.path.join(tmp, "result.json")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", _LAUNCHER, err, out, sys.executable, "-m", "seglabel", *argv],
                       check=True, timeout=1800)
        seconds = time.perf_counter() - started
        result = json.loads(Path(out).read_text())
        if result["rc"]:
            raise RuntimeError(f"seglabel {argv[0]} failed: {Path(err).read_text().strip()[-500:]}")
    return {"peak_mb": result["maxrss_kb"] / 1024.0, "seconds": seconds}


# -- the report ------------------------------------------------------------------------------


def _slope(small: dict[str, Any], large: dict[str, Any], n_small: int, n_large: int) -> dict[str, Any]:
    per_entry = (large["peak_mb"] - small["peak_mb"]) * 2**20 / (n_large - n_small)
    return {
        "bytes_per_image": round(per_entry, 1),
        "at_1e8_gb": round(per_entry * 1e8 / 1e9, 2),
        "seconds_per_million": round(large["seconds"] * 1e6 / n_large, 2),
    }


def memory_report(entries: int = 1_200_000, workdir: str | None = None) -> dict[str, Any]:
    """Bytes per image and seconds per 10^6 images of every structure and command above, from
    runs at ``entries // 6`` and ``entries`` images (the issue's 2·10^5 and 1.2·10^6)."""
    sizes = (max(1, entries // 6), entries)
    tmp = Path(tempfile.mkdtemp(prefix="seglabel-bench-mem-", dir=workdir))
    runs: dict[str, dict[int, dict[str, Any]]] = {name: {} for name, _ in STRUCTURES + COMMANDS}
    made: dict[int, float] = {}
    # Our own process must not look up HF or start Ray; the children inherit this environment.
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE",)}
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        for n in sizes:
            started = time.perf_counter()
            paths = make_corpus(tmp / str(n), n)
            made[n] = round(time.perf_counter() - started, 2)
            for name, _ in STRUCTURES:
                runs[name][n] = _run_child(name, paths, n)
            runs["dry_run"][n] = _run_command([
                "run", "--manifest", paths["manifest"], "--output", paths["output"],
                "--model", paths["model"], "--dry-run",
            ])
            runs["inspect"][n] = _run_command(["inspect", paths["output"]])
            shutil.rmtree(tmp / str(n), ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    report: dict[str, Any] = {"sizes": list(sizes), "made_s": made, "measures": {}}
    for name, what in STRUCTURES + COMMANDS:
        small, large = runs[name][sizes[0]], runs[name][sizes[1]]
        report["measures"][name] = {"what": what, "runs": {str(n): runs[name][n] for n in sizes},
                                    **_slope(small, large, *sizes)}
    from ..job.commit import PART_MAX_BYTES

    report["part_buffer"] = {"rows": ROWS_PER_PART, "max_bytes": PART_MAX_BYTES}
    return report


__all__ = ["COMMANDS", "STRUCTURES", "child", "make_corpus", "manifest_uri", "memory_report"]
