"""One bench run: the images, the checkpoint, then phases (a), (b) and (c) on both, and the
figures that compare them."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..core.config import EngineConfig
from ..core.errors import ConfigError
from ..core.redaction import get_logger
from .calibrate import Calibration, build_checkpoint
from .config import BenchConfig
from .hf_loop import run_hf_loop
from .images import bench_images
from .measure import cpu_busy, environment, load_average, ratio, torch_device
from .pipeline import PipelineOptions, run_pipeline
from .report import busy_warning, goals, write_json
from .segmenter import run_segmenter

log = get_logger(__name__)

# Images the random model is calibrated on (the first ones of the bench).
CALIBRATION_IMAGES = 4


def _settings(config: BenchConfig, task: str, device: Any, threads: int) -> dict[str, Any]:
    """The run's settings as plain values, recorded beside its figures."""
    engine = config.engine
    return {
        "model": config.model, "arch": config.arch, "task": task, "revision": engine.revision,
        "images": config.images, "size": config.size, "batch_size": engine.batch_size,
        "dtype": engine.dtype or ("bf16" if device.type == "cuda" else "fp32"), "device": str(device),
        "resolution": str(engine.resolution) if engine.resolution else None,
        "score_threshold": engine.score_threshold, "mask_threshold": engine.mask_threshold,
        "overlap_threshold": engine.overlap_threshold,
        "target_segments": config.target_segments if config.arch else None,
        "mask_coverage": config.mask_coverage if config.arch else None,
        "hf_images": config.hf_images, "pipeline_repeat": config.pipeline_repeat,
        "pipeline_warm_up": config.pipeline_warm_up, "warmup": config.warmup,
        "threads": threads, "num_gpus": config.num_gpus, "address": config.address,
    }


def _checkpoint(
    config: BenchConfig, task: str, engine: EngineConfig, arrays: list, device: Any, tmp: str
) -> tuple[EngineConfig, dict[str, Any]]:
    """The checkpoint every phase runs, as ``engine.model``, and what the result records of it:
    ``--model``, or a random-weight one of ``--arch`` built under ``tmp`` and calibrated on the
    first of the bench's images."""
    if not config.arch:
        engine = engine.replace(model=str(config.model))
        return engine, {"model": config.model, "revision": engine.revision}
    log.info("building a random-weight %s %s checkpoint", config.arch, task)
    calibration = Calibration(
        images=arrays[:CALIBRATION_IMAGES],
        target_segments=config.target_segments,
        coverage=config.mask_coverage,
        engine=engine,
        device=str(device),
    )
    path = Path(tmp) / f"bench-{config.arch}-{task}"
    path, info = build_checkpoint(path, config.arch, task, calibration, input_size=config.image_size)
    return engine.replace(model=str(path)), {"model": f"random {config.arch}", **info}


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Measure (a) the usual HF loop, (b) the Segmenter alone and (c) the whole pipeline on the
    same images and checkpoint; returns every figure (and writes it to ``config.json``)."""
    import torch

    task = config.task
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch_device(config.engine.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {config.engine.device}: CUDA is not available here")
    # The engine of every phase: the task settled, the checkpoint filled in below.
    engine = config.engine.replace(task=task, revision=config.engine.revision if config.model else None)

    result: dict[str, Any] = {
        "settings": _settings(config, task, device, torch.get_num_threads()),
        "environment": environment(device),
    }
    result["environment"]["load_average_start"] = load_average()
    result["environment"]["cpu_busy_before"] = cpu_busy()

    log.info("preparing %d images (%s)", config.images, config.size)
    arrays, result["images"] = bench_images(config.images, config.image_size, config.photos)
    tmp = tempfile.mkdtemp(prefix="seglabel-bench-ckpt-")
    try:
        engine, result["checkpoint"] = _checkpoint(config, task, engine, arrays, device, tmp)
        if not config.skip_hf:
            subset = arrays[: config.hf_images] if config.hf_images else arrays
            log.info("(a) the usual HF loop on %d images", len(subset))
            result["hf_loop"] = run_hf_loop(engine, subset, device=device, warmup=config.warmup)
        log.info("(b) the Segmenter alone on %d images, batch %d", len(arrays), engine.batch_size)
        result["segmenter"] = run_segmenter(engine.replace(device=str(device)), arrays, warmup=config.warmup)
        if not config.skip_pipeline:
            log.info("(c) the pipeline on %d image files", len(arrays) * config.pipeline_repeat)
            result["pipeline"] = run_pipeline(engine, arrays, PipelineOptions(
                num_gpus=config.num_gpus, address=config.address, workdir=config.workdir,
                keep=config.keep, repeat=config.pipeline_repeat, warm_up=config.pipeline_warm_up,
            ))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ra = (result.get("hf_loop") or {}).get("images_per_s")
    rb = result["segmenter"]["images_per_s"]
    rc = (result.get("pipeline") or {}).get("images_per_s")
    rs = (result.get("pipeline") or {}).get("steady_images_per_s")
    result["ratios"] = {
        "b/a": ratio(rb, ra),
        "c/a": ratio(rc, ra),
        "c/b": ratio(rc, rb),
        "c_steady/b": ratio(rs, rb),
        "c/b_model": ratio(rc, result["segmenter"]["model_images_per_s"]),
    }
    cpu_ms = sum(result["segmenter"]["ms_per_image"].get(k, 0.0) for k in ("rle", "png"))
    if result.get("pipeline") and result["pipeline"].get("decode_ms_per_image"):
        cpu_ms += result["pipeline"]["decode_ms_per_image"]
        result["cpu_cores_to_feed_b"] = round(cpu_ms * rb / 1000.0, 2) if rb else None
    result["cpu_ms_per_image_outside_model"] = round(cpu_ms, 3)
    result["goals"] = goals(result)
    result["environment"]["load_average_end"] = load_average()
    result["environment"]["busy_warning"] = busy_warning(result)
    if config.json:
        write_json(result, config.json)
    return result


def run_plumbing_bench(config: BenchConfig) -> dict[str, Any]:
    """``--stand-in``: the pipeline without the model (``bench.plumbing``) on the bench's
    images, with a tiny random checkpoint (or ``--model``) naming the task and labels."""
    from ..engine.synthetic import save_random_checkpoint
    from .plumbing import run_plumbing

    task = config.task
    engine = config.engine.replace(task=task, stand_in=config.stand_in)
    log.info("preparing %d images (%s)", config.images, config.size)
    arrays, images = bench_images(config.images, config.image_size, config.photos)
    tmp = tempfile.mkdtemp(prefix="seglabel-bench-ckpt-")
    try:
        model = config.model or str(save_random_checkpoint(Path(tmp) / f"stand-in-{task}", "tiny"))
        result = run_plumbing(engine.replace(model=model), arrays, address=config.address, keep=config.keep,
                              warm_up=config.pipeline_warm_up)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["images"] = images
    result["environment"] = environment(torch_device("cpu"))
    if config.json:
        write_json(result, config.json)
    return result


__all__ = ["run_bench", "run_plumbing_bench"]
