"""(c) The whole pipeline: the images written as files, then ``seglabel.pipeline.label`` from
those files to PNG masks and Parquet rows, timed from the call to its return (Ray already
started, its start reported on its own), with a steady-state rate from the times the Parquet
parts were committed."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from ..config import EngineConfig
from ..errors import get_logger
from .images import PNG_EVERY, write_images
from .measure import GpuSampler, rate, torch_device

log = get_logger(__name__)

# The pipeline's steady-state rate comes from the times its Parquet parts appear: parts less
# than STEADY_MIN_GAP_S apart are one moment; it needs 3 moments over STEADY_MIN_SPAN_S.
STEADY_MIN_GAP_S = 0.02
STEADY_MIN_SPAN_S = 0.5


def _read_parts(fs: Any, output_root: str) -> dict[str, Any]:
    """Rows and segments from the committed metadata parts, and a steady-state rate from the
    times the parts appeared (the first part's rows are left out: they carry the start-up)."""
    import pyarrow.compute as pc

    from ..sink import OutputStore

    store = OutputStore(fs.unstrip_protocol(output_root))
    parts = store.parts()
    timeline, ok, errors, segments = [], 0, 0, 0
    for path in parts:
        table = store.read_parquet(path, ["status", "segments"])
        status = table.column("status")
        is_ok = pc.equal(status, "ok")
        n_ok = int(pc.sum(is_ok).as_py() or 0)
        ok += n_ok
        errors += table.num_rows - n_ok
        lengths = pc.list_value_length(table.column("segments")).fill_null(0)
        segments += int(pc.sum(pc.if_else(is_ok, lengths, 0)).as_py() or 0)
        modified = fs.modified(path)
        timeline.append((modified.timestamp(), table.num_rows))
    timeline.sort()
    steady = None
    # Parts committed together (one big batch, the final flush) count as one moment; a rate
    # needs a few moments over a measurable time, else it is left out.
    moments: list[list[float]] = []
    for t, n in timeline:
        if moments and t - moments[-1][0] < STEADY_MIN_GAP_S:
            moments[-1][1] += n
        else:
            moments.append([t, n])
    if len(moments) >= 3 and moments[-1][0] - moments[0][0] >= STEADY_MIN_SPAN_S:
        steady = sum(n for _, n in moments[1:]) / (moments[-1][0] - moments[0][0])
    return {
        "parts": len(parts),
        "ok": ok,
        "errors": errors,
        "segments": segments,
        "steady_images_per_s": steady,
    }


def _decode_cost(paths: Sequence[str], fs: Any, limit: int = 32) -> float | None:
    """Milliseconds per image to read and decode the written files, here on one core."""
    from ..fetch import fetch

    chosen = list(paths[:limit])
    if not chosen:
        return None
    started = time.perf_counter()
    for path in chosen:
        fetch(fs.unstrip_protocol(path))
    return 1000.0 * (time.perf_counter() - started) / len(chosen)


def run_pipeline(
    engine: EngineConfig,
    images: Sequence[np.ndarray],
    *,
    num_gpus: int | None = 1,
    address: str | None = None,
    workdir: str | None = None,
    keep: bool = False,
    repeat: int = 1,
    png_every: int | None = PNG_EVERY,
    warm_up: int = 0,
) -> dict[str, Any]:
    """``seglabel.pipeline.label`` with ``engine``'s settings, from image files to PNG masks
    and Parquet rows, on ``num_gpus`` Segmenter actors (none on a machine without GPUs, or
    when ``engine.device`` is the CPU: one CPU actor).

    The images are written under ``workdir`` (default: a local temporary folder; on a cluster a
    URL every node reads, e.g. ``s3://bucket/bench``) as JPEG, every PNG_EVERY-th as PNG. A
    checkpoint built here travels there too, so that every node can load it. ``repeat`` writes
    each image that many times, so that the job's fixed start-up weighs less in its rate.

    ``warm_up`` images (the first ones, cycled when there are fewer) are labeled first, untimed,
    into an output of their own, by this same process: the timed job then finds Ray Data's own
    actors up (detached, one per cluster, as a job on a long-lived cluster finds them) and, beyond
    what such a job would find, this Ray job's idle task workers with the pipeline already
    imported (Ray hands idle workers only to the job that started them). So its start-up is a
    best case, a bound for a later job on a long-lived cluster. With 0, the timed job is a fresh
    Ray's first, as ``seglabel run`` with an embedded Ray is.
    """
    import fsspec

    from ..cluster import connect
    from ..config import JobConfig
    from ..pipeline import run

    local_tmp = None
    if workdir is None:
        local_tmp = tempfile.mkdtemp(prefix="seglabel-bench-")
        root = local_tmp
    else:
        root = f"{workdir.rstrip('/')}/run-{int(time.time())}-{os.getpid()}"
    fs, root_path = fsspec.core.url_to_fs(root)
    input_root, output_root = f"{root_path}/input", f"{root_path}/output"
    try:
        paths = write_images(fs, input_root, images, repeat, png_every)
        if workdir is not None and os.path.isdir(engine.model):
            fs.put(engine.model.rstrip("/") + "/", f"{root_path}/checkpoint/", recursive=True)
            engine = engine.replace(model=fs.unstrip_protocol(f"{root_path}/checkpoint"))
        decode_ms = _decode_cost(paths, fs)
        if warm_up:
            warm = [images[i % len(images)] for i in range(warm_up)]
            write_images(fs, f"{root_path}/warm-input", warm, 1, png_every)
        cpu_only = engine.device is not None and not str(engine.device).startswith("cuda")
        with connect(address) as ray_info:
            gpus = int(ray_info.resources.get("GPU", 0))
            actors_gpus = 0 if cpu_only or gpus == 0 else (min(num_gpus, gpus) if num_gpus else gpus)
            config = JobConfig(
                input=fs.unstrip_protocol(input_root), output=fs.unstrip_protocol(output_root), engine=engine,
                num_gpus=actors_gpus, rows_per_part=max(8, engine.batch_size),
            )
            warmed = None
            if warm_up:
                started = time.perf_counter()
                warm_summary = run(config.replace(input=fs.unstrip_protocol(f"{root_path}/warm-input"),
                                                  output=fs.unstrip_protocol(f"{root_path}/warm-output")))
                warmed = {"images": warm_up, "ok": warm_summary.ok, "seconds": time.perf_counter() - started}
                if warm_summary.ok != warm_up:
                    log.warning("the warm-up job labeled %d of its %d images", warm_summary.ok, warm_up)
            with GpuSampler(torch_device("cuda" if actors_gpus else "cpu")) as gpu:
                started = time.perf_counter()
                summary = run(config)
                wall = time.perf_counter() - started
        parts = _read_parts(fs, output_root)
    finally:
        if not keep:
            try:
                fs.rm(root_path, recursive=True)
            except FileNotFoundError:
                pass
        if local_tmp and not keep:
            shutil.rmtree(local_tmp, ignore_errors=True)
    n = len(paths)
    return {
        "what": "seglabel.pipeline.label: image files -> PNG + Parquet (Ray already up; its start apart)",
        "repeat": repeat,
        # The untimed job before this one, in the same Ray (None: none ran).
        "warm_up": warmed,
        "images": n,
        "ok": summary.ok,
        "errors": summary.error,
        "seconds": wall,
        "images_per_s": rate(n, wall),
        "execute_s": summary.seconds,
        "steady_images_per_s": parts["steady_images_per_s"],
        "segments_per_image": parts["segments"] / parts["ok"] if parts["ok"] else 0.0,
        "parts": parts["parts"],
        "segmenter_actors": actors_gpus or 1,
        "actor_device": "cuda" if actors_gpus else "cpu",
        "ray": {"init_s": ray_info.init_s, "embedded": ray_info.embedded, "resources": ray_info.resources},
        "decode_ms_per_image": decode_ms,
        # Every stage's CPU (Ray Data's per-operator CPU time; the driver's own for the commit).
        "stage_cpu_ms_per_image": {k: 1000.0 * v / n for k, v in summary.stage_cpu_s.items()} if n else {},
        "formats": {
            "jpg": sum(p.endswith(".jpg") for p in paths),
            "png": sum(p.endswith(".png") for p in paths),
        },
        "workdir": root if keep else None,
        "gpu_util": gpu.result(),
    }


__all__ = ["run_pipeline"]
