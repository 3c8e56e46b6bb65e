"""``seglabel bench``: how fast is seglabel, next to the usual Hugging Face loop, on one machine?

One run measures, on the same images and the same checkpoint:

(a) **the usual loop**: ``Mask2FormerImageProcessorPil`` on the CPU, the model in fp32 with
    batch 1, and ``post_process_<task>_segmentation`` per image at the original size;
(b) **the Segmenter alone**: ``Segmenter.predict_raw`` on decoded arrays with its batch size and
    dtype (model load excluded), then segment records (RLE, ``build_segments``) as
    ``Segmenter.__call__`` makes them, and the PNG (``encode_png``) timed on its own;
(c) **the whole pipeline**: the images written as JPEG/PNG files, then
    ``seglabel.pipeline.label`` from those files to PNG masks and Parquet rows, timed from the
    call to its return (Ray already started; its start is reported on its own).

and prints images/s for each, their ratios, the per-stage times, the average number of segments
per image beside every figure (a random model that outputs nothing is visible at once), and GPU
utilisation on CUDA. ``--json PATH`` writes every figure and the environment.

Checkpoints are ``--model`` (a Hub id or directory) or a random-weight one built here
(``--arch tiny|swin-s|swin-l --task ...``) with a realistic label set (COCO for instance and
panoptic, ADE20K for semantic). Random weights score so low that post-processing would look
free; the built model is made confident (``seglabel.synthetic``) and its no-object logit is then
shifted, measured on the first images, so that each image carries about ``--target-segments``
segments at the chosen thresholds.

``seglabel bench --memory`` measures the driver's memory instead: peak RSS for enumerating a
1,000,000-entry manifest and for building the resume state (``DoneKeys``) over 1,000,000 keys.

Speed is measured, never asserted: the issue's goals are printed as met / not met.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from . import __version__
from .config import DTYPES, TASKS, ConfigError, EngineConfig, Resolution

log = logging.getLogger("seglabel.bench")

ARCHS = ("tiny", "swin-s", "swin-l")
# Photos shipped inside scikit-image (skimage.data, no download), cycled over the images. Only
# everyday scenes: microscopy, retina or deep-sky images are not what a labeling job sees.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "camera")
# Images the random model is calibrated on (the first ones of the bench).
CALIBRATION_IMAGES = 4
DEFAULTS: dict[str, Any] = {
    "model": None,
    "revision": None,
    "arch": None,
    "task": None,
    "images": 64,
    "size": "384",
    "photos": None,
    "batch_size": 8,
    "dtype": None,
    "device": None,
    "resolution": None,
    "score_threshold": 0.5,
    "mask_threshold": 0.5,
    "overlap_threshold": 0.8,
    "target_segments": 20,
    "mask_coverage": 0.04,
    "hf_images": None,
    "pipeline_repeat": 1,
    "warmup": 1,
    "threads": None,
    "skip_hf": False,
    "skip_pipeline": False,
    "compile": False,
    "num_gpus": 1,
    "address": None,
    "workdir": None,
    "keep": False,
    "json": None,
    "memory": False,
    "memory_entries": 1_000_000,
}
# Every few images of the pipeline's input are PNG, the rest JPEG (as a photo corpus is).
PNG_EVERY = 4
JPEG_QUALITY = 95
# The pipeline's steady-state rate comes from the times its Parquet parts appear: parts less
# than STEADY_MIN_GAP_S apart are one moment; it needs 3 moments over STEADY_MIN_SPAN_S.
STEADY_MIN_GAP_S = 0.02
STEADY_MIN_SPAN_S = 0.5
# How often GPU utilisation is sampled.
GPU_SAMPLE_S = 0.1


# -- images ----------------------------------------------------------------------------------


def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """``384`` -> (384, 384); ``800x1088`` -> (800, 1088) (height x width); ``native`` -> None."""
    spec = str(text if text is not None else "native").strip().lower()
    if spec in ("native", "orig", "original"):
        return None
    parts = spec.split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"--size {text!r}: expected S (square), HxW (e.g. 800x1088) or native")
    return values[0], values[1]


def _photos(photo_dir: str | None) -> tuple[list[np.ndarray], list[str], str]:
    """The source photos: a folder's images, else skimage.data's, else generated scenes."""
    from PIL import Image

    if photo_dir:
        files = sorted(p for p in Path(photo_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise ConfigError(f"--photos {photo_dir}: no .png/.jpg images there")
        arrays = []
        for f in files:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        return arrays, [f.name for f in files], f"folder {photo_dir}"
    try:
        from skimage import data
    except ImportError:
        log.warning("scikit-image is not installed and no --photos folder given: using generated scenes")
        return _generated_scenes(len(PHOTOS)), [f"scene{i}" for i in range(len(PHOTOS))], "generated"
    arrays, names = [], []
    for name in PHOTOS:
        try:
            image = getattr(data, name)()
        except Exception as exc:  # a photo that needs a download in this scikit-image
            log.debug("skipping skimage.data.%s: %s", name, exc)
            continue
        image = image[0] if isinstance(image, tuple) else image
        if image.ndim == 2 and image.dtype == np.uint8:  # a black-and-white photo
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            arrays.append(image)
            names.append(name)
    if not arrays:
        return _generated_scenes(len(PHOTOS)), [f"scene{i}" for i in range(len(PHOTOS))], "generated"
    return arrays, names, "skimage.data"


def _generated_scenes(n: int, size: tuple[int, int] = (480, 640)) -> list[np.ndarray]:
    """Smooth backgrounds with overlapping shapes: a stand-in where no photos are available."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        h, w = size
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * rng.uniform(0.1, 0.5) + y * rng.uniform(0.1, 0.5) + rng.integers(0, 255)) % 256
                         for _ in range(3)], -1).astype(np.uint8)
        im = Image.fromarray(base)
        draw = ImageDraw.Draw(im)
        for _ in range(25):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(20, w // 3)), y0 + int(rng.integers(20, h // 3)))
            fill = tuple(int(v) for v in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        out.append(np.asarray(im.filter(ImageFilter.GaussianBlur(1.0))))
    return out


def bench_images(n: int, size: tuple[int, int] | None, photo_dir: str | None = None) -> tuple[list[np.ndarray], dict]:
    """``n`` RGB images: the photos cycled (mirrored and shifted on later rounds), resized to
    ``size`` (height, width) unless None."""
    from PIL import Image

    photos, names, source = _photos(photo_dir)
    out = []
    for i in range(n):
        k, j = divmod(i, len(photos))
        image = photos[j]
        if k % 2:
            image = image[:, ::-1]
        if k >= 2:
            image = np.roll(image, 13 * (k // 2), axis=(0, 1))
        if size is not None and image.shape[:2] != size:
            image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size[1], size[0]), Image.BICUBIC))
        out.append(np.ascontiguousarray(image))
    info = {
        "count": n,
        "size": f"{size[0]}x{size[1]}" if size else "native",
        "source": source,
        "photos": names,
        "mean_pixels": float(np.mean([a.shape[0] * a.shape[1] for a in out])) if out else 0.0,
    }
    return out, info


# -- checkpoints -----------------------------------------------------------------------------


def bench_labels(task: str) -> dict[int, str]:
    """A realistic label set per task: COCO's 80 things (instance), COCO panoptic's 133
    (panoptic; stuff is fused), ADE20K's 150 (semantic)."""
    from .labels import LABEL_SETS

    table = {"instance": LABEL_SETS["coco-panoptic"][:80], "panoptic": LABEL_SETS["coco-panoptic"],
             "semantic": LABEL_SETS["ade20k"]}[task]
    return {i: name for i, (name, _) in enumerate(table)}


def _postprocessor(task: str, id2label: Mapping[int, str], score_threshold: float, mask_threshold: float,
                   overlap_threshold: float):
    from .labels import thing_ids
    from .postprocess import Postprocessor, PostprocessSpec

    things = thing_ids(id2label)
    fuse = frozenset(set(id2label) - set(things)) if task == "panoptic" and things is not None else frozenset()
    spec = PostprocessSpec(task=task, score_threshold=score_threshold, mask_threshold=mask_threshold,
                           overlap_threshold=overlap_threshold, fuse_label_ids=fuse)
    return Postprocessor(spec, len(id2label))


# Calibration of random models: share of the image each mask covers, and the spread of mask
# and label logits (large enough that masks are sharp and each query is sure of its label).
MASK_COVERAGE = 0.04
MASK_LOGIT_STD = 8.0
CLASS_LOGIT_STD = 10.0
CROSS_ATTENTION_SCALE = 0.03


def _mask_head(model: Any) -> Any:
    """The last Linear of the mask embedder (shared by every decoder layer)."""
    import torch

    embedder = model.model.transformer_module.decoder.mask_predictor.mask_embedder
    return [m for m in embedder.modules() if isinstance(m, torch.nn.Linear)][-1]


def calibrate_random_model(
    model: Any,
    processor: Any,
    images: Sequence[np.ndarray],
    task: str,
    id2label: Mapping[int, str],
    *,
    target: float,
    coverage: float = MASK_COVERAGE,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
    resolution: Resolution | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Give a random-weight model realistic masks and about ``target`` segments per image.

    A random mask head makes every query's mask cover most of the image (the pixel embeddings
    share one large mean direction), so instances all overlap and panoptic merging keeps almost
    none. Four edits of the weights, measured on ``images``:

    0. queries: the decoder's cross-attention outputs are damped so that queries stay distinct
       (else every query of an image shares its label, mask and score);
    1. masks: the pixel embeddings' mean direction becomes a constant channel, which the mask
       head reads only as an offset, set so that each mask covers about ``coverage`` of the
       image (a few rounds, since the decoder's masked attention reads its own masks); the
       mask logits are then scaled to be sharp (their sign, hence the attention masks, kept);
    2. labels: each label's logit is centred over the queries, so that queries pick different
       labels (else one label wins every query), and scaled so that each query is sure of its
       label;
    3. segments: the no-object logit is shifted so that seglabel's post-processing at the given
       thresholds keeps about ``target`` segments per image. Each candidate shift re-runs only
       the post-processing on stored outputs (nothing else reads that logit); candidates are
       quantiles of the per-query margin between the best label and no-object.

    Returns what was done and measured.
    """
    import torch

    from .preprocess import PreprocessSpec, preprocess, to_device

    spec = PreprocessSpec.from_processor(processor, resolution)
    post = _postprocessor(task, id2label, score_threshold, mask_threshold, overlap_threshold)
    dev = torch.device(device)
    model.to(dev)
    batches = []
    for image in images:
        size = spec.input_size(*image.shape[:2])
        batches.append((preprocess([to_device(image, dev)], spec, size, torch.float32), image.shape[:2], size))

    def forward() -> list:
        with torch.inference_mode():
            return [(model(pixel_values=pixels), original, size) for pixels, original, size in batches]

    head = _mask_head(model)
    info: dict[str, Any] = {"calibration_images": len(batches), "cross_attention_scale": CROSS_ATTENTION_SCALE}
    # 0. queries: with random weights every query's cross-attention returns about the same
    # image average, which swamps what tells one query from another (for swin-s, 99% of the
    # variance of the heads' input is per image), so all queries of an image would share one
    # label, one mask and one score. Damping the cross-attention outputs lets each query keep
    # its identity while the image still shapes it (and the masks read the image directly).
    with torch.no_grad():
        for layer in model.model.transformer_module.decoder.layers:
            layer.cross_attn.out_proj.weight.mul_(CROSS_ATTENTION_SCALE)
            layer.cross_attn.out_proj.bias.mul_(CROSS_ATTENTION_SCALE)
    outputs = forward()
    info["mask_coverage_as_built"] = float(np.mean([(o.masks_queries_logits > 0).float().mean().item() for o, _, _ in outputs]))
    if coverage:
        # The pixel embeddings share one large mean direction, so every mask covers all or
        # nothing of an image. Turn that direction into a constant channel (the pixel decoder's
        # mask projection: its weights lose it, its bias carries a constant 1 along it), and
        # let the mask head read only the rest, plus a bias along the constant channel: an
        # offset that is the same for every pixel of every image.
        features = [o.pixel_decoder_last_hidden_state.float() for o, _, _ in outputs]
        mean = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
        unit = mean / mean.norm().clamp_min(1e-12)
        projection = model.model.pixel_level_module.decoder.mask_projection
        with torch.no_grad():
            project = torch.eye(len(unit), device=unit.device) - torch.outer(unit, unit)
            weight = projection.weight.view(projection.weight.shape[0], -1)
            weight.copy_(project.to(weight.dtype) @ weight)
            projection.bias.copy_(project.to(projection.bias.dtype) @ projection.bias + unit.to(projection.bias.dtype))
            head.weight.copy_(project.to(head.weight.dtype) @ head.weight)
            head.bias.copy_(project.to(head.bias.dtype) @ head.bias)
            for _ in range(4):
                outputs = forward()
                logits = torch.cat([o.masks_queries_logits.float().flatten() for o, _, _ in outputs])
                sample = logits[:: max(1, len(logits) // 2_000_000)]
                now = float((sample > 0).float().mean())
                if abs(now - coverage) <= 0.15 * coverage:
                    break
                head.bias.sub_(float(torch.quantile(sample, 1.0 - coverage)) * unit.to(head.bias.dtype))
            outputs = forward()
            logits = torch.cat([o.masks_queries_logits.float().flatten() for o, _, _ in outputs])
            sharpen = MASK_LOGIT_STD / float(logits.std().clamp_min(1e-6))
            head.weight.mul_(sharpen)
            head.bias.mul_(sharpen)
        outputs = forward()
        info["mask_coverage"] = float(np.mean([(o.masks_queries_logits > 0).float().mean().item() for o, _, _ in outputs]))
    stored = [(o.class_queries_logits.float().clone(), o.masks_queries_logits.float(), original, size)
              for o, original, size in outputs]
    # 2. labels: queries share one large hidden-state direction too, so one label would win
    # every query (a semantic map of one label). Centre each label's logit over the queries.
    # Then scale the label logits so that each query is sure of its label.
    with torch.inference_mode():
        label_logits = torch.cat([c[..., :-1].flatten(0, 1) for c, _, _, _ in stored])
        label_mean = label_logits.mean(0)
        sharpen = CLASS_LOGIT_STD / float((label_logits - label_mean).std().clamp_min(1e-6))
        for c, _, _, _ in stored:
            c[..., :-1] = (c[..., :-1] - label_mean) * sharpen
    with torch.no_grad():
        head = model.class_predictor
        head.bias[:-1] = (head.bias[:-1] - label_mean.clone().to(head.bias.dtype)) * sharpen
        head.weight[:-1] *= sharpen
    info["distinct_labels_per_image"] = float(np.mean([len(set(c[0, :, :-1].argmax(-1).tolist())) for c, _, _, _ in stored]))

    def segments_per_image(shift: float) -> float:
        # Counted at the mask logits' own resolution (a quarter of the input's side): about
        # the counts at full size, for a sixteenth of the work.
        total = 0
        for class_logits, mask_logits, _, _ in stored:
            shifted = class_logits.clone()
            shifted[..., -1] += shift
            low = tuple(mask_logits.shape[-2:])
            total += sum(len(r.ids) for r in post(shifted, mask_logits, [low], low))
        return total / max(1, len(stored))

    if target:
        with torch.inference_mode():
            margins = torch.cat([(c[..., :-1].amax(-1) - c[..., -1]).flatten() for c, _, _, _ in stored]).cpu()
            quantiles = torch.quantile(margins.double(), torch.linspace(0, 1, 26, dtype=torch.float64))
            # Just below a quantile keeps that share of the queries as objects; 0 is "as built".
            candidates = sorted({0.0, float(margins.min()) - 1.0, *(float(q) - 1e-3 for q in quantiles)})
            tried = [(shift, segments_per_image(shift)) for shift in candidates]
        shift, found = min(tried, key=lambda t: (abs(t[1] - target), abs(t[0])))
        with torch.no_grad():
            model.class_predictor.bias[-1] += shift
        info.update(
            no_object_shift=round(shift, 4),
            target_segments_per_image=target,
            segments_per_image=found,
            segments_per_image_unshifted=dict(tried).get(0.0),
            max_segments_per_image=max(c for _, c in tried),
        )
    else:
        with torch.inference_mode():
            info["segments_per_image"] = segments_per_image(0.0)
    model.to("cpu")
    return info


def build_checkpoint(
    path: str | Path,
    arch: str,
    task: str,
    *,
    calibration_images: Sequence[np.ndarray] = (),
    target_segments: float = 20,
    coverage: float = MASK_COVERAGE,
    input_size: tuple[int, int] | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
    resolution: Resolution | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[Path, dict]:
    """A random-weight, confident checkpoint of ``arch`` for ``task`` (its preprocessor resizes
    to ``input_size``), calibrated on ``calibration_images`` to carry about ``target_segments``
    per image with masks covering about ``coverage`` of the image each (0: as built)."""
    from .checkpoint import _processor_class
    from .synthetic import build_random_model, preprocessor_config

    if arch not in ARCHS:
        raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    id2label = bench_labels(task)
    started = time.perf_counter()
    model = build_random_model(arch, id2label, confident=True, seed=seed)
    size = {"height": input_size[0], "width": input_size[1]} if input_size else None
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(size), indent=2))
    info: dict[str, Any] = {
        "arch": arch,
        "task": task,
        "num_queries": int(model.config.num_queries),
        "num_labels": len(id2label),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    if (target_segments or coverage) and calibration_images:
        processor = _processor_class().from_pretrained(path)
        info["calibration"] = calibrate_random_model(
            model, processor, calibration_images, task, id2label, target=target_segments, coverage=coverage,
            score_threshold=score_threshold, mask_threshold=mask_threshold, overlap_threshold=overlap_threshold,
            resolution=resolution, device=device,
        )
    model.save_pretrained(path)
    info["build_s"] = round(time.perf_counter() - started, 2)
    del model
    return path, info


# -- measurement helpers ----------------------------------------------------------------------


class GpuSampler:
    """Samples the GPU's utilisation in a background thread while a phase runs.

    ``torch.cuda.utilization()`` where it works (it needs pynvml), else ``nvidia-smi``'s
    ``utilization.gpu`` streamed every 100 ms; elsewhere the result says why there is none.
    """

    def __init__(self, device: Any):
        self.device = device
        self.samples: list[float] = []
        self.source: str | None = None
        self.reason = "not a CUDA device"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "GpuSampler":
        import torch

        if getattr(self.device, "type", str(self.device)) != "cuda":
            return self
        try:
            torch.cuda.utilization(self.device)
            self.source = "torch.cuda.utilization"
            self._thread = threading.Thread(target=self._poll_torch, daemon=True)
        except Exception as exc:  # no pynvml, or NVML refuses
            smi = shutil.which("nvidia-smi")
            if smi is None:
                self.reason = f"torch.cuda.utilization failed ({type(exc).__name__}) and no nvidia-smi"
                return self
            index = self._physical_index()
            self._proc = subprocess.Popen(
                [smi, f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={int(GPU_SAMPLE_S * 1000)}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            self.source = "nvidia-smi"
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        self._thread.start()
        return self

    def _physical_index(self) -> str:
        import torch

        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        return visible[index] if index < len(visible) else str(index)

    def _poll_torch(self) -> None:
        import torch

        while not self._stop.wait(GPU_SAMPLE_S):
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:
                return

    def _read_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                return
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                continue

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def result(self) -> dict[str, Any]:
        if self.source is None:
            return {"available": False, "reason": self.reason}
        if not self.samples:
            return {"available": False, "source": self.source, "reason": "no samples (phase too short)"}
        return {
            "available": True,
            "source": self.source,
            "mean_pct": round(float(np.mean(self.samples)), 1),
            "max_pct": round(float(np.max(self.samples)), 1),
            "samples": len(self.samples),
        }


class CpuShare:
    """How much of the machine's CPU time other processes took while a phase ran (Linux):
    all CPUs' busy time from /proc/stat, less this process's own, over wall time x CPUs."""

    def __enter__(self) -> "CpuShare":
        self.start = self._sample()
        return self

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / tick
        own = sum(os.times()[:2])
        return time.monotonic(), busy, own

    def __exit__(self, *exc: Any) -> None:
        self.end = self._sample()

    def others(self) -> float | None:
        if not self.start or not self.end:
            return None
        wall = self.end[0] - self.start[0]
        if wall <= 0:
            return None
        others = (self.end[1] - self.start[1]) - (self.end[2] - self.start[2])
        return round(max(0.0, others) / (wall * (os.cpu_count() or 1)), 3)


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def _rate(n: int, seconds: float) -> float | None:
    return n / seconds if seconds > 0 and n > 0 else None


def _ms_per_image(stages: Mapping[str, float], n: int) -> dict[str, float]:
    return {k: round(1000.0 * v / n, 3) for k, v in stages.items()} if n else {}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# -- (a) the usual Hugging Face loop -------------------------------------------------------------


def _hf_processor_kwargs(resolution: Resolution | None) -> dict[str, Any]:
    if resolution is None:
        return {}
    if resolution.mode == "fixed":
        return {"size": {"height": resolution.height, "width": resolution.width}}
    return {"size": {"shortest_edge": resolution.shortest, "longest_edge": resolution.longest}}


def run_hf_loop(
    checkpoint: str,
    task: str,
    images: Sequence[np.ndarray],
    *,
    device: Any,
    revision: str | None = None,
    resolution: Resolution | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
    warmup: int = 1,
) -> dict[str, Any]:
    """The usual loop: HF's CPU processor, the model in fp32 at batch 1, HF post-processing per
    image at the original size, the label map brought to the host (as one would save it)."""
    import torch
    from transformers import Mask2FormerForUniversalSegmentation

    from .checkpoint import _processor_class
    from .labels import thing_ids

    kwargs = {"revision": revision} if revision else {}
    processor = _processor_class().from_pretrained(checkpoint, **kwargs, **_hf_processor_kwargs(resolution))
    model = Mask2FormerForUniversalSegmentation.from_pretrained(checkpoint, dtype=torch.float32, **kwargs)
    model.eval().to(device)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    things = thing_ids(id2label)
    fuse = set(id2label) - set(things) if task == "panoptic" and things is not None else set()

    def post(outputs, size):
        if task == "instance":
            r = processor.post_process_instance_segmentation(
                outputs, threshold=score_threshold, mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_threshold, target_sizes=[size])[0]
            return r["segmentation"].cpu().numpy(), len(r["segments_info"])
        if task == "panoptic":
            r = processor.post_process_panoptic_segmentation(
                outputs, threshold=score_threshold, mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_threshold, label_ids_to_fuse=fuse, target_sizes=[size])[0]
            return r["segmentation"].cpu().numpy(), len(r["segments_info"])
        seg = processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0].cpu().numpy()
        return seg, len(np.unique(seg))

    def one(image: np.ndarray, stages: dict[str, float]) -> int:
        t0 = time.perf_counter()
        inputs = processor(images=[image], return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        _sync(device)
        t1 = time.perf_counter()
        outputs = model(**inputs)
        _sync(device)
        t2 = time.perf_counter()
        _, count = post(outputs, tuple(image.shape[:2]))
        t3 = time.perf_counter()
        stages["processor"] += t1 - t0
        stages["forward"] += t2 - t1
        stages["postprocess"] += t3 - t2
        return count

    scratch = {"processor": 0.0, "forward": 0.0, "postprocess": 0.0}
    stages = dict(scratch)
    segments = 0
    with torch.inference_mode():
        for image in images[: max(0, warmup)]:
            one(image, scratch)
        with GpuSampler(device) as gpu, CpuShare() as cpu:
            started = time.perf_counter()
            for image in images:
                segments += one(image, stages)
            seconds = time.perf_counter() - started
    del model
    _free(device)
    n = len(images)
    return {
        "what": "HF Mask2FormerImageProcessorPil (CPU) + model fp32, batch 1 + HF post_process per image",
        "images": n,
        "seconds": seconds,
        "images_per_s": _rate(n, seconds),
        "segments_per_image": segments / n if n else 0.0,
        "stages_s": stages,
        "ms_per_image": _ms_per_image(stages, n),
        "processor_class": type(processor).__name__,
        "gpu_util": gpu.result(),
        "others_cpu_share": cpu.others(),
    }


def _free(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()


# -- (b) the Segmenter alone ---------------------------------------------------------------------


def compile_support() -> dict[str, Any]:
    """Whether the Segmenter can run its model under torch.compile (an EngineConfig setting)."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    if "compile" in fields:
        return {"supported": True}
    return {"supported": False, "reason": "not implemented: the Segmenter has no torch.compile option"}


def run_segmenter(
    checkpoint: str,
    task: str,
    images: Sequence[np.ndarray],
    *,
    batch_size: int,
    dtype: str | None,
    device: str | None,
    revision: str | None = None,
    resolution: Resolution | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
    compile: bool = False,
    warmup: int = 1,
) -> dict[str, Any]:
    """The Segmenter on decoded arrays, ``batch_size`` images a call, model load excluded.

    Per-stage times: preprocess / forward / postprocess from ``Segmenter.timings`` (host wall
    time: on CUDA the device runs ahead, so its work shows where the host waits for it, in
    postprocess), ``rle`` (``Segmenter.to_prediction``: COCO RLE, areas, boxes) and ``png``
    (``encode_png``). images_per_s is that of ``Segmenter.__call__`` (predict + RLE), the
    ``model_images_per_s`` that of ``predict_raw`` alone (what a pipeline's GPU actor does),
    ``with_png_images_per_s`` includes the PNG.
    """
    import torch

    from .encode import encode_png
    from .segment import Segmenter

    settings: dict[str, Any] = dict(
        task=task, batch_size=batch_size, dtype=dtype, device=device, revision=revision, resolution=resolution,
        score_threshold=score_threshold, mask_threshold=mask_threshold, overlap_threshold=overlap_threshold,
    )
    if compile and compile_support()["supported"]:
        settings["compile"] = True
    load_started = time.perf_counter()
    seg = Segmenter(checkpoint, **settings)
    load_s = time.perf_counter() - load_started

    def chunks() -> Iterator[Sequence[np.ndarray]]:
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]

    warm_started = time.perf_counter()
    for _ in range(max(0, warmup)):
        seg.predict_raw(images[:batch_size])
    if settings.get("compile") and len(images) % batch_size:
        seg.predict_raw(images[: len(images) % batch_size])  # the last, smaller batch compiles too
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
        "compiled": bool(settings.get("compile")),
        "seconds": predict_s + rle_s,
        "images_per_s": _rate(n, predict_s + rle_s),
        "model_images_per_s": _rate(n, predict_s),
        "with_png_images_per_s": _rate(n, predict_s + rle_s + png_s),
        "segments_per_image": segments / n if n else 0.0,
        "stages_s": stages,
        "ms_per_image": _ms_per_image(stages, n),
        "unaccounted_s": max(0.0, predict_s - sum(stages[k] for k in ("preprocess", "forward", "postprocess"))),
        "gpu_util": gpu.result(),
        "others_cpu_share": cpu.others(),
    }
    if seg.device.type == "cuda":
        result["note"] = "stage times are host-side: CUDA runs ahead, so device work shows where the host waits"
    del seg
    _free(torch.device(device) if device else None)
    return result


# -- (c) the whole pipeline -------------------------------------------------------------------


def _write_images(fs: Any, root: str, images: Sequence[np.ndarray], repeat: int = 1) -> list[str]:
    """The images as files (JPEG, every PNG_EVERY-th PNG), each encoded once and written
    ``repeat`` times under different names."""
    from PIL import Image

    paths = []
    fs.makedirs(root, exist_ok=True)
    for i, image in enumerate(images):
        fmt = "png" if i % PNG_EVERY == PNG_EVERY - 1 else "jpg"
        buf = io.BytesIO()
        if fmt == "png":
            Image.fromarray(image).save(buf, format="PNG", compress_level=1)
        else:
            Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
        for r in range(repeat):
            path = f"{root.rstrip('/')}/img{i:06d}{f'-{r}' if repeat > 1 else ''}.{fmt}"
            fs.pipe_file(path, buf.getvalue())
            paths.append(path)
    return paths


@contextmanager
def _ray(address: str | None) -> Iterator[dict[str, Any]]:
    """Ray started (or joined) before the pipeline, so that its start is timed on its own."""
    import ray

    info: dict[str, Any] = {"version": ray.__version__}
    started = False
    t0 = time.perf_counter()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        started = True
    info["init_s"] = time.perf_counter() - t0
    info["embedded"] = started and not address
    info["resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
    try:
        yield info
    finally:
        if started:
            ray.shutdown()


def _read_parts(fs: Any, output_root: str) -> dict[str, Any]:
    """Rows and segments from the committed metadata parts, and a steady-state rate from the
    times the parts appeared (the first part's rows are left out: they carry the start-up)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = fs.glob(f"{output_root.rstrip('/')}/metadata/*.parquet")
    timeline, ok, errors, segments = [], 0, 0, 0
    for path in parts:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["status", "segments"])
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
    return {"parts": len(parts), "ok": ok, "errors": errors, "segments": segments, "steady_images_per_s": steady}


def _decode_cost(paths: Sequence[str], fs: Any, limit: int = 32) -> float | None:
    """Milliseconds per image to read and decode the written files, here on one core."""
    from .fetch import fetch

    chosen = list(paths[:limit])
    if not chosen:
        return None
    started = time.perf_counter()
    for path in chosen:
        fetch(fs.unstrip_protocol(path))
    return 1000.0 * (time.perf_counter() - started) / len(chosen)


def run_pipeline(
    checkpoint: str,
    task: str,
    images: Sequence[np.ndarray],
    *,
    batch_size: int,
    dtype: str | None,
    device: str | None,
    revision: str | None = None,
    resolution: Resolution | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
    num_gpus: int | None = 1,
    address: str | None = None,
    workdir: str | None = None,
    keep: bool = False,
    repeat: int = 1,
) -> dict[str, Any]:
    """``seglabel.pipeline.label`` from image files to PNG masks and Parquet rows.

    The images are written under ``workdir`` (default: a local temporary folder; on a cluster a
    URL every node reads, e.g. ``s3://bucket/bench``) as JPEG, every PNG_EVERY-th as PNG. A
    checkpoint built here travels there too, so that every node can load it. ``repeat`` writes
    each image that many times, so that the job's fixed start-up weighs less in its rate.
    """
    import fsspec

    from .pipeline import label

    local_tmp = None
    if workdir is None:
        local_tmp = tempfile.mkdtemp(prefix="seglabel-bench-")
        root = local_tmp
    else:
        root = f"{workdir.rstrip('/')}/run-{int(time.time())}-{os.getpid()}"
    fs, root_path = fsspec.core.url_to_fs(root)
    input_root, output_root = f"{root_path}/input", f"{root_path}/output"
    try:
        paths = _write_images(fs, input_root, images, repeat)
        model = checkpoint
        if workdir is not None and os.path.isdir(checkpoint):
            fs.put(checkpoint.rstrip("/") + "/", f"{root_path}/checkpoint/", recursive=True)
            model = fs.unstrip_protocol(f"{root_path}/checkpoint")
        decode_ms = _decode_cost(paths, fs)
        cpu_only = device is not None and not str(device).startswith("cuda")
        with _ray(address) as ray_info:
            gpus = int(ray_info["resources"].get("GPU", 0))
            actors_gpus = 0 if cpu_only or gpus == 0 else (min(num_gpus, gpus) if num_gpus else gpus)
            settings: dict[str, Any] = dict(
                model=model, task=task, batch_size=batch_size, dtype=dtype, resolution=resolution,
                score_threshold=score_threshold, mask_threshold=mask_threshold, overlap_threshold=overlap_threshold,
                num_gpus=actors_gpus, rows_per_part=max(8, batch_size),
            )
            if revision:
                settings["revision"] = revision
            if cpu_only:
                settings["device"] = "cpu"
            with GpuSampler(_torch_device("cuda" if actors_gpus else "cpu")) as gpu:
                started = time.perf_counter()
                summary = label(fs.unstrip_protocol(input_root), fs.unstrip_protocol(output_root), **settings)
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
        "images": n,
        "ok": summary.ok,
        "errors": summary.error,
        "seconds": wall,
        "images_per_s": _rate(n, wall),
        "execute_s": summary.seconds,
        "steady_images_per_s": parts["steady_images_per_s"],
        "segments_per_image": parts["segments"] / parts["ok"] if parts["ok"] else 0.0,
        "parts": parts["parts"],
        "segmenter_actors": actors_gpus or 1,
        "actor_device": "cuda" if actors_gpus else "cpu",
        "ray": ray_info,
        "decode_ms_per_image": decode_ms,
        "formats": {"jpg": sum(p.endswith(".jpg") for p in paths), "png": sum(p.endswith(".png") for p in paths)},
        "workdir": root if keep else None,
        "gpu_util": gpu.result(),
    }


def _torch_device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -- the whole bench --------------------------------------------------------------------------


def environment(device: Any) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "seglabel": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        env["device_name"] = torch.cuda.get_device_name(index)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1)
    else:
        env["device_name"] = _cpu_name()
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        env["ray"] = None
    return env


def _load_average() -> float | None:
    """The 1-minute load average: other work on the machine makes CPU figures meaningless."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_busy(seconds: float = 1.0) -> float | None:
    """The share of all CPUs busy over ``seconds`` (Linux /proc/stat), measured while this
    process sleeps: what other work takes from the bench."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (idle1 - idle0) / max(1, total1 - total0), 3)


def _busy(result: Mapping[str, Any]) -> str | None:
    """A warning when other processes used the CPUs as the bench started or during (a), (b)."""
    env = result["environment"]
    if not env.get("device", "cpu").startswith("cpu"):
        return None
    shares = {"before": env.get("cpu_busy_before")}
    for key, name in (("hf_loop", "(a)"), ("segmenter", "(b)")):
        shares[name] = (result.get(key) or {}).get("others_cpu_share")
    worst = {k: v for k, v in shares.items() if v is not None and v > 0.1}
    if worst:
        text = ", ".join(f"{k} {v:.0%}" for k, v in worst.items())
        return (f"other processes took CPU time ({text} of all CPUs): CPU figures are not reliable "
                "(torch threads wait on each other); rerun on an idle machine")
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals that apply to this run, each with its value and whether it is met."""
    s = result["settings"]
    a, b, c = (result.get(k) or {} for k in ("hf_loop", "segmenter", "pipeline"))
    ra, rb, rc = a.get("images_per_s"), b.get("images_per_s"), c.get("images_per_s")
    cuda = result["environment"]["device"].startswith("cuda")
    name = f"{s.get('arch') or ''} {s.get('model') or ''}".lower()
    swin_s = "swin-s" in name or "swin-small" in name
    size = result["images"]["size"]
    goals = []

    steady = c.get("steady_images_per_s")

    def goal(text: str, value: float | None, target: float) -> None:
        if value is not None:
            goals.append({"goal": text, "value": round(value, 3), "target": target, "met": value >= target})

    # Each end-to-end goal twice: over the whole job (start-up included), and in its steady state.
    if cuda and swin_s and s["task"] == "instance" and size == "384x384":
        goal("end to end >= 400 img/s (Swin-S instance, 384², one GPU)", rc, 400)
        goal("end to end, steady state, >= 400 img/s", steady, 400)
        goal("end to end >= 18x the usual loop", _ratio(rc, ra), 18)
        goal("end to end, steady state, >= 18x the usual loop", _ratio(steady, ra), 18)
    if cuda and swin_s and size == "800x1088":
        goal("end to end >= 60 img/s at 800x1088", rc, 60)
        goal("end to end, steady state, >= 60 img/s at 800x1088", steady, 60)
    goal("end to end >= 90% of the Segmenter alone", _ratio(rc, rb), 0.9)
    goal("end to end, steady state, >= 90% of the Segmenter alone", _ratio(steady, rb), 0.9)
    if not cuda and s.get("arch") == "tiny":
        goal("CPU, tiny: Segmenter alone >= 3x the usual loop", _ratio(rb, ra), 3)
    return goals


def run_bench(
    *,
    model: str | None = None,
    arch: str | None = None,
    task: str | None = None,
    revision: str | None = None,
    images: int = 64,
    size: str | int | None = "384",
    photos: str | None = None,
    batch_size: int = 8,
    dtype: str | None = None,
    device: str | None = None,
    resolution: str | Resolution | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
    target_segments: float = 20,
    mask_coverage: float = MASK_COVERAGE,
    hf_images: int | None = None,
    pipeline_repeat: int = 1,
    warmup: int = 1,
    threads: int | None = None,
    skip_hf: bool = False,
    skip_pipeline: bool = False,
    compile: bool = False,
    num_gpus: int | None = 1,
    address: str | None = None,
    workdir: str | None = None,
    keep: bool = False,
    json_path: str | None = None,
) -> dict[str, Any]:
    """Measure (a) the usual HF loop, (b) the Segmenter alone and (c) the whole pipeline on the
    same images and checkpoint; returns every figure (and writes it to ``json_path``)."""
    import torch

    from .checkpoint import detect_task

    if model and arch:
        raise ConfigError("give --model or --arch, not both")
    if images < 1:
        raise ConfigError(f"--images must be at least 1, got {images}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if task is not None and task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if hf_images is not None and hf_images < 1:
        raise ConfigError(f"--hf-images must be at least 1, got {hf_images}")
    if pipeline_repeat < 1:
        raise ConfigError(f"--pipeline-repeat must be at least 1, got {pipeline_repeat}")
    arch = arch or (None if model else "tiny")
    if arch is not None and arch not in ARCHS:
        raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    task = detect_task(model, task) if model else (task or "instance")
    res = Resolution.parse(resolution) if isinstance(resolution, (str, int)) else resolution
    image_size = parse_size(size)
    if threads:
        torch.set_num_threads(threads)
    dev = _torch_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here")

    settings = {
        "model": model, "arch": arch, "task": task, "revision": revision, "images": images,
        "size": size, "batch_size": batch_size, "dtype": dtype or ("bf16" if dev.type == "cuda" else "fp32"),
        "device": str(dev), "resolution": str(res) if res else None, "score_threshold": score_threshold,
        "mask_threshold": mask_threshold, "overlap_threshold": overlap_threshold,
        "target_segments": target_segments if arch else None, "mask_coverage": mask_coverage if arch else None,
        "hf_images": hf_images, "pipeline_repeat": pipeline_repeat, "warmup": warmup,
        "threads": torch.get_num_threads(), "num_gpus": num_gpus, "address": address,
    }
    result: dict[str, Any] = {"settings": settings, "environment": environment(dev)}
    result["environment"]["load_average_start"] = _load_average()
    result["environment"]["cpu_busy_before"] = _cpu_busy()
    comp = compile_support()
    result["compile"] = {"requested": bool(compile), **comp, "applied": bool(compile and comp["supported"])}
    if compile and not comp["supported"]:
        log.warning("--compile: %s; measuring the eager model", comp["reason"])

    log.info("preparing %d images (%s)", images, size)
    arrays, result["images"] = bench_images(images, image_size, photos)
    tmp = tempfile.mkdtemp(prefix="seglabel-bench-ckpt-")
    try:
        if arch:
            log.info("building a random-weight %s %s checkpoint", arch, task)
            path, info = build_checkpoint(
                Path(tmp) / f"bench-{arch}-{task}", arch, task,
                calibration_images=arrays[:CALIBRATION_IMAGES], target_segments=target_segments,
                coverage=mask_coverage, input_size=image_size, score_threshold=score_threshold, mask_threshold=mask_threshold,
                overlap_threshold=overlap_threshold, resolution=res, device=str(dev),
            )
            checkpoint = str(path)
            result["checkpoint"] = {"model": f"random {arch}", **info}
        else:
            checkpoint = str(model)
            result["checkpoint"] = {"model": checkpoint, "revision": revision}
        common = dict(revision=revision if model else None, resolution=res, score_threshold=score_threshold,
                      mask_threshold=mask_threshold, overlap_threshold=overlap_threshold)
        if not skip_hf:
            subset = arrays[:hf_images] if hf_images else arrays
            log.info("(a) the usual HF loop on %d images", len(subset))
            result["hf_loop"] = run_hf_loop(checkpoint, task, subset, device=dev, warmup=warmup, **common)
        log.info("(b) the Segmenter alone on %d images, batch %d", len(arrays), batch_size)
        result["segmenter"] = run_segmenter(
            checkpoint, task, arrays, batch_size=batch_size, dtype=dtype, device=str(dev),
            compile=compile, warmup=warmup, **common,
        )
        if not skip_pipeline:
            log.info("(c) the pipeline on %d image files", len(arrays) * pipeline_repeat)
            result["pipeline"] = run_pipeline(
                checkpoint, task, arrays, batch_size=batch_size, dtype=dtype,
                device=str(dev) if device else None, num_gpus=num_gpus, address=address,
                workdir=workdir, keep=keep, repeat=pipeline_repeat, **common,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ra = (result.get("hf_loop") or {}).get("images_per_s")
    rb = result["segmenter"]["images_per_s"]
    rc = (result.get("pipeline") or {}).get("images_per_s")
    rs = (result.get("pipeline") or {}).get("steady_images_per_s")
    result["ratios"] = {
        "b/a": _ratio(rb, ra),
        "c/a": _ratio(rc, ra),
        "c/b": _ratio(rc, rb),
        "c_steady/b": _ratio(rs, rb),
        "c/b_model": _ratio(rc, result["segmenter"]["model_images_per_s"]),
    }
    cpu_ms = sum(result["segmenter"]["ms_per_image"].get(k, 0.0) for k in ("rle", "png"))
    if result.get("pipeline") and result["pipeline"].get("decode_ms_per_image"):
        cpu_ms += result["pipeline"]["decode_ms_per_image"]
        result["cpu_cores_to_feed_b"] = round(cpu_ms * rb / 1000.0, 2) if rb else None
    result["cpu_ms_per_image_outside_model"] = round(cpu_ms, 3)
    result["goals"] = _goals(result)
    result["environment"]["load_average_end"] = _load_average()
    result["environment"]["busy_warning"] = _busy(result)
    if json_path:
        write_json(result, json_path)
    return result


def write_json(result: Mapping[str, Any], path: str) -> None:
    import fsspec

    with fsspec.open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


# -- memory ----------------------------------------------------------------------------------


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
        from .sink import DoneKeys, key_hashes
        from .sources import iter_manifest

        import gc

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
            extra = {"keys": len(done), "lookup_us": round(1e6 * (time.perf_counter() - probe) / max(1, hits), 2)}
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


# -- printing ---------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _util(phase: Mapping[str, Any]) -> str:
    util = phase.get("gpu_util") or {}
    return f"{util['mean_pct']:.0f}%" if util.get("available") else "n/a"


def report(result: Mapping[str, Any]) -> str:
    """The figures as a short table for people."""
    s, env, ck = result["settings"], result["environment"], result["checkpoint"]
    lines = []
    what = ck["model"]
    if "num_queries" in ck:
        what += f" ({ck['num_queries']} queries, {ck['num_labels']} labels)"
    lines.append(
        f"seglabel bench: {s['task']} with {what}; {result['images']['count']} images "
        f"{result['images']['size']} ({result['images']['source']})"
    )
    lines.append(
        f"device {env['device']} ({env['device_name']}), torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['torch_threads']} torch threads; Segmenter {s['dtype']}, batch {s['batch_size']}"
    )
    lines.append(f"{'':34} {'images/s':>9} {'seg/img':>8} {'GPU':>5}  per image (ms)")
    rows = [
        ("(a) usual HF loop (fp32, batch 1)", result.get("hf_loop")),
        ("(b) Segmenter alone", result.get("segmenter")),
        ("(c) pipeline (seglabel run)", result.get("pipeline")),
    ]
    for name, phase in rows:
        if not phase:
            lines.append(f"{name:34} {'skipped':>9}")
            continue
        stages = ", ".join(f"{k} {v:.2f}" for k, v in phase.get("ms_per_image", {}).items())
        if name.startswith("(c)"):
            stages = (f"steady {_fmt(phase.get('steady_images_per_s'))} img/s; Ray start {phase['ray']['init_s']:.1f} s "
                      f"apart; decode {_fmt(phase.get('decode_ms_per_image'), 2)} ms/img/core; "
                      f"{phase['ok']} ok, {phase['errors']} errors")
        lines.append(
            f"{name:34} {_fmt(phase.get('images_per_s')):>9} {_fmt(phase.get('segments_per_image')):>8} "
            f"{_util(phase):>5}  {stages}"
        )
    b = result["segmenter"]
    lines.append(f"{'    Segmenter, model only':34} {_fmt(b.get('model_images_per_s')):>9}")
    lines.append(f"{'    Segmenter, with PNG':34} {_fmt(b.get('with_png_images_per_s')):>9}")
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in result["ratios"].items() if v is not None)
    lines.append(f"ratios: {ratios or '-'}")
    if result["compile"]["requested"] and not result["compile"]["applied"]:
        lines.append(f"--compile: {result['compile']['reason']} (eager figures above)")
    for g in result.get("goals", []):
        lines.append(f"goal {'MET' if g['met'] else 'not met'}: {g['goal']}: {g['value']:.2f} (target {g['target']})")
    busy = _busy(result)
    if busy:
        lines.append(f"WARNING: {busy}")
    return "\n".join(lines)


def memory_text(report_: Mapping[str, Any]) -> str:
    lines = [f"driver memory for {report_['entries']:,} entries (peak RSS of a fresh process; delta over its imports):"]
    for kind, what in (("manifest", "enumerate a parquet manifest (iter_manifest)"),
                       ("done_keys", "build DoneKeys (resume state)")):
        v = report_[kind]
        lines.append(
            f"  {what:46} peak {v['peak_mb']:8.1f} MB, delta {v['delta_mb']:7.1f} MB "
            f"({v['bytes_per_entry']} B/entry), {v['seconds']:.1f} s"
        )
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    """Add ``seglabel bench`` to the CLI's subcommands (handler: ``args.handler(args)``)."""
    from .cli import _common

    p = subparsers.add_parser(
        "bench",
        parents=[_common()],
        help="measure the usual HF loop, the Segmenter alone and the whole pipeline on the same images",
        description="Images/s of (a) the usual Hugging Face loop, (b) the Segmenter alone and (c) the whole "
                    "pipeline, on the same images and checkpoint, with per-stage times and segments per image.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="SPEC.yaml", help="a YAML file of these settings by name (flags override it)")
    m = p.add_argument_group("checkpoint")
    m.add_argument("--model", metavar="ID_OR_PATH", help="a Hub id or checkpoint directory (instead of --arch)")
    m.add_argument("--revision")
    m.add_argument("--arch", choices=ARCHS, help="build a random-weight checkpoint of this shape (default tiny)")
    m.add_argument("--task", choices=TASKS, help="default: from --model's name, else instance")
    m.add_argument("--target-segments", dest="target_segments", type=float, metavar="N",
                   help="--arch: calibrate the random model to about N segments per image (default 20; 0: as built)")
    m.add_argument("--mask-coverage", dest="mask_coverage", type=float, metavar="F",
                   help="--arch: shape each random mask to cover about this share of the image (default 0.04; 0: as built)")
    i = p.add_argument_group("images")
    i.add_argument("--images", type=int, metavar="N", help="how many images (default 64)")
    i.add_argument("--size", metavar="S|HxW|native", help="resize the photos to this (default 384)")
    i.add_argument("--photos", metavar="DIR", help="a folder of photos to cycle (default skimage.data's)")
    e = p.add_argument_group("engine")
    e.add_argument("--batch-size", dest="batch_size", type=int, metavar="N", help="Segmenter batch (default 8)")
    e.add_argument("--dtype", choices=DTYPES, help="Segmenter dtype (default bf16 on CUDA, fp32 on CPU)")
    e.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1 (default cuda if available)")
    e.add_argument("--resolution", metavar="HxW|S|S:L", help="model input size for all three (default the checkpoint's)")
    e.add_argument("--score-threshold", dest="score_threshold", type=float, metavar="S")
    e.add_argument("--mask-threshold", dest="mask_threshold", type=float, metavar="S")
    e.add_argument("--overlap-threshold", dest="overlap_threshold", type=float, metavar="S")
    e.add_argument("--compile", action="store_true", help="torch.compile the Segmenter's model (if it supports it)")
    e.add_argument("--threads", type=int, metavar="N", help="torch CPU threads for (a) and (b)")
    r = p.add_argument_group("run")
    r.add_argument("--hf-images", dest="hf_images", type=int, metavar="N", help="run (a) on the first N images only")
    r.add_argument("--pipeline-repeat", dest="pipeline_repeat", type=int, metavar="K",
                   help="(c): write each image K times, so that the job's start-up weighs less (default 1)")
    r.add_argument("--warmup", type=int, metavar="N", help="untimed warm-up calls before (a) and (b) (default 1)")
    r.add_argument("--skip-hf", dest="skip_hf", action="store_true", help="leave out (a)")
    r.add_argument("--skip-pipeline", dest="skip_pipeline", action="store_true", help="leave out (c)")
    r.add_argument("--num-gpus", dest="num_gpus", type=int, metavar="N", help="(c): Segmenter actors on GPUs (default 1)")
    r.add_argument("--address", help="(c): a Ray cluster (default RAY_ADDRESS or an embedded local Ray)")
    r.add_argument("--workdir", metavar="URL", help="(c): where the image files and outputs go (on a cluster: shared storage)")
    r.add_argument("--keep", action="store_true", help="(c): keep the image files and outputs")
    r.add_argument("--json", metavar="PATH", help="write every figure and the environment as JSON")
    r.add_argument("--memory", action="store_true", help="measure the driver's memory (manifest, DoneKeys) instead")
    r.add_argument("--memory-entries", dest="memory_entries", type=int, metavar="N", help="entries for --memory (default 1,000,000)")
    p.set_defaults(handler=_main)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The bench's settings: defaults, then the --config spec, then the flags given."""
    values = dict(DEFAULTS)
    config = getattr(args, "config", None)
    if config:
        from .config import load_spec

        spec = {str(k).replace("-", "_"): v for k, v in load_spec(config).items()}
        unknown = sorted(set(spec) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"{config}: unknown bench setting(s) {', '.join(unknown)}; known: {', '.join(sorted(DEFAULTS))}")
        values.update(spec)
    values.update({k: v for k, v in vars(args).items() if k in DEFAULTS})
    return values


def _main(args: argparse.Namespace) -> int:
    values = settings_from(args)
    json_path = values.pop("json")
    if values.pop("memory"):
        mem = memory_report(values["memory_entries"])
        print(memory_text(mem))
        if json_path:
            write_json({"memory": mem, "environment": environment(_torch_device("cpu"))}, json_path)
        return 0
    values.pop("memory_entries")
    result = run_bench(json_path=json_path, **values)
    print(report(result))
    if json_path:
        print(f"figures written to {json_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m seglabel.bench [flags]``: the same as ``seglabel bench [flags]``."""
    from .cli import _Parser, _setup_logging

    parser = _Parser(prog="seglabel")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parser(sub)
    try:
        args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as exc:
        return int(exc.code or 0)
    _setup_logging(getattr(args, "log_level", "info"))
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"seglabel: error: {exc}", file=sys.stderr)
        return 2


__all__ = ["add_parser", "bench_images", "build_checkpoint", "calibrate_random_model", "memory_report", "report", "run_bench"]


if __name__ == "__main__":
    sys.exit(main())
