"""``seglabel bench``: how fast is seglabel, next to the usual Hugging Face loop, on one machine?

One run measures, on the same images and the same checkpoint:

(a) **the usual loop**: ``Mask2FormerImageProcessorPil`` on the CPU, the model in fp32 with
    batch 1, and ``post_process_<task>_segmentation`` per image at the original size;
(b) **the Segmenter alone**: ``Segmenter.predict_raw`` on decoded arrays with its batch size and
    dtype (model load excluded), then segment records (RLE, ``build_segments``) as
    ``Segmenter.__call__`` makes them, and the PNG (``encode_png``) timed on its own;
(c) **the whole pipeline**: the images written as JPEG/PNG files, then
    ``seglabel.job.pipeline.label`` from those files to PNG masks and Parquet rows, timed from the
    call to its return (Ray already started; its start is reported on its own).

and prints images/s for each, their ratios, the per-stage times, the average number of segments
per image beside every figure (a random model that outputs nothing is visible at once), and GPU
utilisation on CUDA. ``--json PATH`` writes every figure and the environment.

Checkpoints are ``--model`` (a Hub id or directory) or a random-weight one built here
(``--arch tiny|swin-s|swin-l --task ...``) with a realistic label set (COCO for instance and
panoptic, ADE20K for semantic). Random weights score so low that post-processing would look
free; the built model is made confident (``seglabel.engine.synthetic``) and its no-object logit is then
shifted, measured on the first images, so that each image carries about ``--target-segments``
segments at the chosen thresholds.

``seglabel bench --memory`` measures the driver's memory instead: bytes per image of every
structure the driver holds per image, and of ``run --dry-run`` and ``inspect``, as the slope of
peak RSS between two sizes (``seglabel.bench.memory``).

Speed is measured, never asserted: the issue's goals are printed as met / not met.

Modules: ``config`` (the frozen :class:`BenchConfig`), ``images`` (photos and image files),
``calibrate`` (random checkpoints that behave like trained ones), ``hf_loop`` (a),
``segmenter`` (b), ``pipeline`` (c), ``memory`` (``--memory``), ``measure`` (GPU and CPU
sampling, the machine), ``report`` (goals, the table, JSON) and ``runner`` (one run).
"""

from __future__ import annotations

from .calibrate import Calibration, build_checkpoint, calibrate_random_model
from .config import BenchConfig, parse_size
from .images import bench_images
from .memory import memory_report
from .report import memory_text, report, write_json
from .runner import run_bench, run_plumbing_bench

__all__ = [
    "BenchConfig",
    "Calibration",
    "bench_images",
    "build_checkpoint",
    "calibrate_random_model",
    "memory_report",
    "memory_text",
    "parse_size",
    "report",
    "run_bench",
    "run_plumbing_bench",
    "write_json",
]
