"""``seglabel bench --memory``: the driver's memory per image, for the structures it holds
per image (manifest enumeration, resume state), each measured in a fresh process."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _peak_rss_mb() -> float:
    """This process's peak RSS: since the last _reset_peak() where Linux allows it (VmHWM),
    else over its whole life (ru_maxrss)."""
    import resource

    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20  # Linux: KiB; macOS: bytes


def _rss_mb() -> float | None:
    return _proc_status_mb("VmRSS")


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _manifest_uri(i: int) -> str:
    return f"/mnt/corpus/photos/{i // 1_000_000:03d}/{(i // 1000) % 1000:03d}/IMG_{i:09d}.jpg"


def _memory_child(kind: str, arg: str, entries: int, queue: Any) -> None:
    """Runs in a fresh process: peak RSS before and after one driver-side structure."""
    try:
        import gc

        from ..keys import key_hashes
        from ..sink import DoneKeys
        from ..sources import iter_manifest

        gc.collect()
        before = _rss_mb()
        exact = _reset_peak()
        if before is None or not exact:
            before = _peak_rss_mb()  # no /proc: the delta is over the peak of the imports
        started = time.perf_counter()
        if kind == "manifest":
            count = sum(1 for _ in iter_manifest(arg))
            extra: dict[str, Any] = {"refs": count}
        else:
            # As OutputStore.done_keys builds it: hashes per part of 10,000 keys, then one array.
            chunks = []
            for start in range(0, entries, 10_000):
                keys = [_manifest_uri(i)[1:] for i in range(start, min(entries, start + 10_000))]
                chunks.append(key_hashes(keys))
            done = DoneKeys(np.concatenate(chunks) if chunks else None)
            probe = time.perf_counter()
            hits = sum(_manifest_uri(i)[1:] in done for i in range(0, entries, max(1, entries // 1000)))
            extra = {
                "keys": len(done),
                "lookup_us": round(1e6 * (time.perf_counter() - probe) / max(1, hits), 2),
            }
        seconds = time.perf_counter() - started
        queue.put({"ok": True, "baseline_mb": before, "peak_mb": _peak_rss_mb(), "seconds": seconds,
                   "peak_since_start": exact, **extra})
    except BaseException as exc:  # reported by the parent
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def memory_report(entries: int = 1_000_000, workdir: str | None = None) -> dict[str, Any]:
    """The driver's peak RSS for enumerating an ``entries``-row manifest (``iter_manifest``)
    and for building ``DoneKeys`` over as many keys, each measured in a fresh process.

    ``baseline_mb`` is the process's RSS just before (interpreter and imports, torch included as
    in a real driver), ``peak_mb`` its peak RSS while enumerating / building (Linux: the kernel's
    peak mark reset at the start; elsewhere the whole life's peak), ``delta_mb`` the difference.
    """
    import multiprocessing as mp

    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = tempfile.mkdtemp(prefix="seglabel-bench-mem-", dir=workdir)
    try:
        manifest = os.path.join(tmp, "manifest.parquet")
        started = time.perf_counter()
        writer = None
        for start in range(0, entries, 100_000):
            table = pa.table({"uri": [_manifest_uri(i) for i in range(start, min(entries, start + 100_000))]})
            writer = writer or pq.ParquetWriter(manifest, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
        write_s = time.perf_counter() - started
        ctx = mp.get_context("spawn")
        out: dict[str, Any] = {"entries": entries, "manifest_write_s": round(write_s, 2),
                               "manifest_bytes": os.path.getsize(manifest) if entries else 0}
        for kind in ("manifest", "done_keys"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_memory_child, args=(kind, manifest, entries, queue))
            proc.start()
            try:
                value = queue.get(timeout=600)
            finally:
                proc.join(timeout=30)
            if not value.pop("ok"):
                raise RuntimeError(f"memory measurement {kind} failed: {value['error']}")
            value["delta_mb"] = round(value["peak_mb"] - value["baseline_mb"], 1)
            value["peak_mb"] = round(value["peak_mb"], 1)
            value["baseline_mb"] = round(value["baseline_mb"], 1)
            value["seconds"] = round(value["seconds"], 2)
            value["bytes_per_entry"] = round(value["delta_mb"] * 2**20 / entries, 1) if entries else None
            out[kind] = value
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["memory_report"]
