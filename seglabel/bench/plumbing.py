"""``seglabel bench --stand-in``: the pipeline measured without the model.

The model is replaced by the stand-in (``seglabel.engine.standin``: the Segmenter's result types at no
model cost), so that what is left is the job's own work, measured two ways on the same files:

* (r) the CPU work per image in one plain loop on one core, as the pipeline does it: read the
  file and decode it (``fetch``), the stand-in's prediction, RLE / area / bbox
  (``build_segments``), the PNG (``encode_png``) and its write (``OutputStore.write_mask``);
* (p) ``seglabel.job.pipeline.run`` with ``stand_in`` on all the cores Ray has, with its start-up
  and in steady state (from the times its Parquet parts were committed).

**efficiency = p / (r × cores)**: 1 when the pipeline costs nothing beyond the work itself. With
it come each stage's CPU seconds per image, in the loop and in the pipeline (Ray Data's
per-operator CPU time, and the driver's own for the commit), so that a low efficiency says where
the time went.

The stand-in's actor loads no torch or transformers: their imports are a model's cost. The bench
times them apart, in a fresh process (``model_imports_s``), since a real Segmenter actor's start
adds them (and its weights) to the start-up that (p) includes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from ..core.config import EngineConfig
from ..core.redaction import get_logger
from .measure import cpu_name, rate

log = get_logger(__name__)


def raw_loop(paths: Sequence[str], engine: EngineConfig, workdir: str) -> dict[str, Any]:
    """(r): the pipeline's per-image CPU work on ``paths`` (local files), one image at a time
    on this one thread; CPU seconds per image by stage, and images per second."""
    from ..core.labels import thing_ids
    from ..core.masks import encode_png
    from ..core.results import build_segments
    from ..engine.standin import StandInSegmenter
    from ..inputs.fetch import fetch
    from ..outputs.store import OutputStore

    segmenter = StandInSegmenter(engine)
    things = thing_ids(segmenter.id2label, engine.thing_labels)
    store = OutputStore(workdir)
    cpu: dict[str, float] = defaultdict(float)
    segments = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for n, path in enumerate(paths):
        t0 = time.process_time()
        fetched = fetch(path)
        t1 = time.process_time()
        (raw,) = segmenter.predict_raw([fetched.image])
        t2 = time.process_time()
        records = build_segments(raw, segmenter.task, segmenter.id2label, things)
        png = encode_png(raw.id_map, segmenter.task)
        t3 = time.process_time()
        store.write_mask(f"img{n:06d}.jpg", png)
        t4 = time.process_time()
        cpu["read+decode"] += t1 - t0
        cpu["stand-in"] += t2 - t1
        cpu["rle+png"] += t3 - t2
        cpu["write"] += t4 - t3
        segments += len(records)
    wall = time.perf_counter() - started
    n = len(paths)
    return {
        "what": "one thread: fetch (read + decode), stand-in, build_segments + encode_png, write_mask",
        "images": n,
        "seconds": wall,
        "cpu_seconds": time.process_time() - cpu_started,
        "images_per_s": rate(n, wall),
        "cpu_ms_per_image": {k: 1000.0 * v / n for k, v in cpu.items()} if n else {},
        "segments_per_image": segments / n if n else 0.0,
    }


_TIME_IMPORTS = (
    "import time; t = time.perf_counter(); import torch; from transformers.utils import logging; "
    "print(time.perf_counter() - t)"
)


def model_imports_s() -> float | None:
    """Seconds a fresh Python process takes to import torch and transformers (a real Segmenter
    actor's start pays them; the stand-in's does not); None should that process fail."""
    try:
        done = subprocess.run([sys.executable, "-c", _TIME_IMPORTS], capture_output=True, text=True,
                              timeout=300, check=True)
        return float(done.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("cannot time the model libraries' imports: %s", exc)
        return None


def run_plumbing(
    engine: EngineConfig,
    images: Sequence[np.ndarray],
    *,
    address: str | None = None,
    keep: bool = False,
    warm_up: int = 0,
) -> dict[str, Any]:
    """(r) and (p) on ``images`` written as JPEG files, and the efficiency p / (r × cores);
    ``warm_up``: see ``run_pipeline``."""
    import fsspec

    from .images import write_images
    from .pipeline import PipelineOptions, run_pipeline

    assert engine.stand_in is not None, "the plumbing bench runs the stand-in"
    workdir = tempfile.mkdtemp(prefix="seglabel-plumbing-")
    try:
        fs = fsspec.filesystem("file")
        paths = write_images(fs, f"{workdir}/raw-input", images, png_every=None)
        log.info("(r) the CPU work of %d images in one loop on one core", len(paths))
        raw = raw_loop(paths, engine, f"{workdir}/raw-output")
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    log.info("(p) seglabel run --stand-in on the same images, on every core Ray has")
    options = PipelineOptions(num_gpus=0, address=address, keep=keep, png_every=None, warm_up=warm_up)
    pipeline = run_pipeline(engine, images, options)
    cores = float(pipeline["ray"]["resources"].get("CPU", os.cpu_count() or 1))
    r, p, steady = raw["images_per_s"], pipeline["images_per_s"], pipeline["steady_images_per_s"]

    def efficiency(rate_p: float | None) -> float | None:
        return rate_p / (r * cores) if rate_p and r else None

    # How much of the cores' time the pipeline's own processes spent on their CPUs (Ray's
    # daemons left out): below 1 with a low efficiency, the pipeline waits rather than works.
    cpu_s = sum(pipeline["stage_cpu_ms_per_image"].values()) * pipeline["images"] / 1000.0
    busy = cpu_s / (pipeline["seconds"] * cores) if pipeline["seconds"] and cpu_s else None
    return {
        "cpu": cpu_name(),
        "cores": cores,
        "stand_in": str(engine.stand_in),
        "batch_size": engine.batch_size,
        "raw": raw,
        "pipeline": pipeline,
        "efficiency": efficiency(p),
        "steady_efficiency": efficiency(steady),
        "cores_busy": busy,
        "model_imports_s": model_imports_s(),
        # Where both wrote their files: a file write's kernel time differs by filesystem and by
        # the minute (measured 0.06 to 0.8 CPU ms on this machine), and is in both (r) and (p).
        "tempdir": tempfile.gettempdir(),
    }


def report(result: dict[str, Any]) -> str:
    """The plumbing bench for people: rates, efficiency, CPU per image by stage."""
    raw, pipeline = result["raw"], result["pipeline"]

    def fmt(value: float | None, spec: str = ".2f") -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"plumbing bench on {result['cpu']}, {result['cores']:g} cores, stand-in {result['stand_in']}, "
        f"{raw['images']} images, {raw['segments_per_image']:.1f} segments per image",
        f"(r) one loop, one core:  {fmt(raw['images_per_s'], '.1f')} images/s",
        f"(p) seglabel run:        {fmt(pipeline['images_per_s'], '.1f')} images/s with start-up, "
        f"{fmt(pipeline['steady_images_per_s'], '.1f')} steady",
        f"efficiency p / (r x {result['cores']:g} cores): {fmt(result['efficiency'])} with start-up, "
        f"{fmt(result['steady_efficiency'])} steady (1.0: no cost beyond the work itself)",
        "CPU ms per image, loop:     "
        + ", ".join(f"{k} {v:.2f}" for k, v in raw["cpu_ms_per_image"].items()),
    ]
    stages = pipeline.get("stage_cpu_ms_per_image") or {}
    if stages:
        lines.append(
            "CPU ms per image, pipeline: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
            + f" (total {sum(stages.values()):.2f}; the loop's {sum(raw['cpu_ms_per_image'].values()):.2f})"
        )
    if result.get("cores_busy") is not None:
        lines.append(f"cores busy with the pipeline's CPU work: {result['cores_busy']:.0%} of the run")
    if warm := pipeline.get("warm_up"):
        lines.append(f"(p) ran after an untimed job of {warm['images']} images ({warm['ok']} ok, "
                     f"{warm['seconds']:.1f} s) in the same Ray: its start-up is a best case, Ray Data's "
                     "actors and this job's workers up")
    if result.get("model_imports_s") is not None:
        lines.append(f"not in (p): a real Segmenter actor's start adds torch + transformers imports, "
                     f"{result['model_imports_s']:.1f} s here, and its weights")
    return "\n".join(lines)


__all__ = ["raw_loop", "report", "run_plumbing"]
