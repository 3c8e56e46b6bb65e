"""(b) The Segmenter alone: ``Segmenter.predict_raw`` on decoded arrays with its batch size and
dtype (model load excluded), then the segment records and the PNG, each timed."""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import numpy as np

from ..core.config import EngineConfig
from .measure import CpuShare, GpuSampler, free, ms_per_image, rate


def run_segmenter(engine: EngineConfig, images: Sequence[np.ndarray], *, warmup: int = 1) -> dict[str, Any]:
    """The Segmenter ``engine`` describes on decoded arrays, ``engine.batch_size`` images a
    call, model load excluded.

    Per-stage times: preprocess / forward / postprocess from ``Segmenter.timings`` (host wall
    time: on CUDA the device runs ahead, so its work shows where the host waits for it, in
    postprocess), ``rle`` (``Segmenter.to_prediction``: COCO RLE, areas, boxes) and ``png``
    (``encode_png``). images_per_s is that of ``Segmenter.__call__`` (predict + RLE), the
    ``model_images_per_s`` that of ``predict_raw`` alone (what a pipeline's GPU actor does),
    ``with_png_images_per_s`` includes the PNG.
    """

    from ..core.masks import encode_png
    from ..engine.segmenter import Segmenter

    batch_size = engine.batch_size
    load_started = time.perf_counter()
    seg = Segmenter(config=engine)
    load_s = time.perf_counter() - load_started

    def chunks() -> Iterator[Sequence[np.ndarray]]:
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]

    warm_started = time.perf_counter()
    for _ in range(max(0, warmup)):
        seg.predict_raw(images[:batch_size])
    warmup_s = time.perf_counter() - warm_started
    seg.timings.clear()
    predict_s = rle_s = png_s = 0.0
    segments = 0
    with GpuSampler(seg.device) as gpu, CpuShare() as cpu:
        for chunk in chunks():
            t0 = time.perf_counter()
            raws = seg.predict_raw(chunk)
            t1 = time.perf_counter()
            predictions = [seg.to_prediction(raw) for raw in raws]
            t2 = time.perf_counter()
            for p in predictions:
                encode_png(p.id_map, p.task)
            t3 = time.perf_counter()
            predict_s += t1 - t0
            rle_s += t2 - t1
            png_s += t3 - t2
            segments += sum(len(p.segments) for p in predictions)
    n = len(images)
    stages = {k: float(seg.timings.get(k, 0.0)) for k in ("preprocess", "forward", "postprocess")}
    stages.update(rle=rle_s, png=png_s)
    result = {
        "what": "Segmenter.predict_raw + to_prediction (= __call__), PNG timed apart; model load excluded",
        "images": n,
        "batch_size": batch_size,
        "dtype": seg.dtype_name,
        "device": str(seg.device),
        "load_s": load_s,
        "warmup_s": warmup_s,
        "seconds": predict_s + rle_s,
        "images_per_s": rate(n, predict_s + rle_s),
        "model_images_per_s": rate(n, predict_s),
        "with_png_images_per_s": rate(n, predict_s + rle_s + png_s),
        "segments_per_image": segments / n if n else 0.0,
        "stages_s": stages,
        "ms_per_image": ms_per_image(stages, n),
        "unaccounted_s": max(
            0.0, predict_s - sum(stages[k] for k in ("preprocess", "forward", "postprocess"))
        ),
        "gpu_util": gpu.result(),
        "others_cpu_share": cpu.others(),
    }
    if seg.device.type == "cuda":
        result["note"] = (
            "stage times are host-side: CUDA runs ahead, so device work shows where the host waits"
        )
    device = seg.device
    del seg
    free(device)
    return result


__all__ = ["run_segmenter"]
