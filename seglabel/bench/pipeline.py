"""(c) The whole pipeline: the images written as files, then ``seglabel.job.pipeline.label`` from
those files to PNG masks and Parquet rows, timed from the call to its return (Ray already
started, its start reported on its own), with a steady-state rate from the times the Parquet
parts were committed."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..core.config import EngineConfig
from ..core.redaction import get_logger
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

    from ..outputs.store import OutputStore

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
    from ..inputs.fetch import fetch

    chosen = list(paths[:limit])
    if not chosen:
        return None
    started = time.perf_counter()
    for path in chosen:
        fetch(fs.unstrip_protocol(path))
    return 1000.0 * (time.perf_counter() - started) / len(chosen)


@dataclass(frozen=True)
class PipelineOptions:
    """How (c) runs, beside the engine's settings (see :func:`run_pipeline`).

    ``num_gpus``: Segmenter actors on GPUs (None or 0: every GPU Ray has); ``address``: the Ray
    cluster (None: RAY_ADDRESS or an embedded local Ray); ``workdir``: where the files go
    (None: a local temporary folder); ``keep``: keep the files and outputs; ``repeat``: each
    image written that many times; ``png_every``: every n-th image written as PNG (None:
    JPEG only); ``warm_up``: images of an untimed job first.
    """

    num_gpus: int | None = 1
    address: str | None = None
    workdir: str | None = None
    keep: bool = False
    repeat: int = 1
    png_every: int | None = PNG_EVERY
    warm_up: int = 0


@dataclass
class _Jobs:
    """What the timed job (and the warm-up before it) gave."""

    summary: Any
    seconds: float
    warmed: dict[str, Any] | None
    actors_gpus: int
    ray_info: Any
    gpu: GpuSampler


def run_pipeline(
    engine: EngineConfig, images: Sequence[np.ndarray], options: PipelineOptions = PipelineOptions()
) -> dict[str, Any]:
    """``seglabel.job.pipeline.label`` with ``engine``'s settings, from image files to PNG masks
    and Parquet rows, on ``options.num_gpus`` Segmenter actors (none on a machine without GPUs,
    or when ``engine.device`` is the CPU: one CPU actor).

    The images are written under ``options.workdir`` (default: a local temporary folder; on a
    cluster a URL every node reads, e.g. ``s3://bucket/bench``) as JPEG, every PNG_EVERY-th as
    PNG. A checkpoint built here travels there too, so that every node can load it.
    ``options.repeat`` writes each image that many times, so that the job's fixed start-up
    weighs less in its rate.

    ``options.warm_up`` images (the first ones, cycled when there are fewer) are labeled first,
    untimed, into an output of their own, by this same process: the timed job then finds Ray
    Data's own actors up (detached, one per cluster, as a job on a long-lived cluster finds
    them) and, beyond what such a job would find, this Ray job's idle task workers with the
    pipeline already imported (Ray hands idle workers only to the job that started them). So its
    start-up is a best case, a bound for a later job on a long-lived cluster. With 0, the timed
    job is a fresh Ray's first, as ``seglabel run`` with an embedded Ray is.
    """
    import fsspec

    local_tmp = None
    if options.workdir is None:
        local_tmp = tempfile.mkdtemp(prefix="seglabel-bench-")
        root = local_tmp
    else:
        root = f"{options.workdir.rstrip('/')}/run-{int(time.time())}-{os.getpid()}"
    fs, root_path = fsspec.core.url_to_fs(root)
    try:
        paths = write_images(fs, f"{root_path}/input", images, options.repeat, options.png_every)
        if options.workdir is not None and os.path.isdir(engine.model):
            fs.put(engine.model.rstrip("/") + "/", f"{root_path}/checkpoint/", recursive=True)
            engine = engine.replace(model=fs.unstrip_protocol(f"{root_path}/checkpoint"))
        decode_ms = _decode_cost(paths, fs)
        jobs = _run_jobs(fs, root_path, engine, images, options)
        parts = _read_parts(fs, f"{root_path}/output")
    finally:
        if not options.keep:
            _remove(fs, root_path, local_tmp)
    n = len(paths)
    summary, ray_info, actors_gpus = jobs.summary, jobs.ray_info, jobs.actors_gpus
    return {
        "what": "seglabel.job.pipeline.label: image files -> PNG + Parquet (Ray already up; its start apart)",
        "repeat": options.repeat,
        # The untimed job before this one, in the same Ray (None: none ran).
        "warm_up": jobs.warmed,
        "images": n,
        "ok": summary.ok,
        "errors": summary.error,
        "seconds": jobs.seconds,
        "images_per_s": rate(n, jobs.seconds),
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
        "workdir": root if options.keep else None,
        "gpu_util": jobs.gpu.result(),
    }


def _run_jobs(
    fs: Any, root_path: str, engine: EngineConfig, images: Sequence[np.ndarray], options: PipelineOptions
) -> _Jobs:
    """The warm-up job (when ``options.warm_up``), then the timed one, in one Ray: from
    ``root_path``'s input/ to its output/."""
    from ..core.config import JobConfig
    from ..job.cluster import connect
    from ..job.pipeline import run

    if options.warm_up:
        warm = [images[i % len(images)] for i in range(options.warm_up)]
        write_images(fs, f"{root_path}/warm-input", warm, 1, options.png_every)
    cpu_only = engine.device is not None and not str(engine.device).startswith("cuda")
    with connect(options.address) as ray_info:
        gpus = int(ray_info.resources.get("GPU", 0))
        num_gpus = options.num_gpus
        actors_gpus = 0 if cpu_only or gpus == 0 else (min(num_gpus, gpus) if num_gpus else gpus)
        config = JobConfig(
            input=fs.unstrip_protocol(f"{root_path}/input"),
            output=fs.unstrip_protocol(f"{root_path}/output"),
            engine=engine, num_gpus=actors_gpus, rows_per_part=max(8, engine.batch_size),
        )
        warmed = None
        if options.warm_up:
            started = time.perf_counter()
            warm_summary = run(config.replace(input=fs.unstrip_protocol(f"{root_path}/warm-input"),
                                              output=fs.unstrip_protocol(f"{root_path}/warm-output")))
            seconds = time.perf_counter() - started
            warmed = {"images": options.warm_up, "ok": warm_summary.ok, "seconds": seconds}
            if warm_summary.ok != options.warm_up:
                log.warning("the warm-up job labeled %d of its %d images", warm_summary.ok, options.warm_up)
        with GpuSampler(torch_device("cuda" if actors_gpus else "cpu")) as gpu:
            started = time.perf_counter()
            summary = run(config)
            wall = time.perf_counter() - started
    return _Jobs(summary, wall, warmed, actors_gpus, ray_info, gpu)


def _remove(fs: Any, root_path: str, local_tmp: str | None) -> None:
    """Delete the run's files and outputs (and the local temporary folder they were in)."""
    try:
        fs.rm(root_path, recursive=True)
    except FileNotFoundError:
        pass
    if local_tmp:
        shutil.rmtree(local_tmp, ignore_errors=True)


__all__ = ["PipelineOptions", "run_pipeline"]
