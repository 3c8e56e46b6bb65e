"""The segmentation engine: one loaded Mask2Former or EoMT checkpoint that turns batches of RGB
images into label maps at their original resolution plus segment records.

    seg = Segmenter("facebook/mask2former-swin-small-coco-instance")
    predictions = seg([image1, image2])   # (H, W, 3) uint8 arrays of any sizes

Images are grouped by their model-input size (never padded against each other), resized and
normalised on the device, run through the model in bf16/fp16/fp32 under inference mode, and
post-processed on the device in batches.

A Segmenter may be called from several threads at once (the pipeline's actor runs two calls):
the model runs one batch at a time, while on a GPU the other thread copies its batch in and
post-processes and copies out its last one, each thread on a CUDA stream of its own, so that the
device does not wait for the host between batches. Device memory is then one forward pass's
plus one batch's post-processing (and each stream keeps its own cached blocks).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..core.config import EngineConfig, default_dtype
from ..core.errors import CheckpointError
from ..core.redaction import get_logger
from ..core.results import Prediction, RawPrediction, build_segments
from .checkpoint import detect_task
from .load import load_checkpoint
from .postprocess import Postprocessor, PostprocessSpec
from .preprocess import PreprocessSpec, crop_starts, preprocess, to_device
from .resolve import ResolvedCheckpoint, settle

log = get_logger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def as_rgb(image: Any) -> np.ndarray:
    """Check and normalise one input image to an (H, W, 3) uint8 array."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB image, got shape {array.shape} dtype {array.dtype}"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"empty image of shape {array.shape}")
    return array


class Segmenter:
    """A loaded Mask2Former or EoMT checkpoint for one task; call it with a list of RGB images.

    ``checkpoint``: the checkpoint as the job's driver resolved it (:mod:`seglabel.engine.resolve`),
    whose labels the loaded weights must have; without it, settled from what is loaded."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 checkpoint: ResolvedCheckpoint | None = None, **settings: Any):
        config = config or EngineConfig()
        if model is not None:
            settings["model"] = model
        if settings:
            config = config.replace(**settings)
        self.config = config
        # Decide the task before loading anything, so that a missing --task fails fast.
        self.task = checkpoint.task if checkpoint is not None else detect_task(config.model, config.task)
        cuda = torch.cuda.is_available()
        self.device = torch.device(config.device or ("cuda" if cuda else "cpu"))
        self.dtype_name = config.dtype or default_dtype(self.device.type)
        self.dtype = _DTYPES[self.dtype_name]
        loaded = load_checkpoint(
            config.model,
            config.revision,
            device=str(self.device),
            dtype=self.dtype,
            cache_dir=config.cache_dir,
        )
        self.model = loaded.model
        # One batch in the model at a time (on a GPU, until the device has run it); copies and
        # post-processing of another overlap it.
        self._model_lock = threading.Lock()
        self._threads = threading.local()
        self._timings_lock = threading.Lock()
        # On a GPU only the forward pass holds the lock; on a CPU the threads would only share
        # its cores, so the whole batch does. (Tests set it on a CPU to run the GPU's way.)
        self._overlap = self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the weights are in place before other streams read them
        if config.compile:
            self.model = _compiled(self.model, config.cache_dir)
        self.model_id = loaded.model_id
        self.revision = loaded.revision
        image_size = getattr(self.model.config, "image_size", None)
        self.preprocess_spec = PreprocessSpec.from_processor(
            loaded.processor, config.resolution, loaded.family, image_size
        )
        if checkpoint is None:
            checkpoint = settle(config, loaded.id2label, loaded.family, loaded.revision,
                                bool(self.preprocess_spec.split))
        elif (loaded.family, loaded.id2label) != (checkpoint.family, checkpoint.id2label):
            # Replaced between the driver's look and this load (a folder rewritten in place).
            raise CheckpointError(f"checkpoint {config.model} is not the one the job read: its "
                                  f"{'family' if loaded.family != checkpoint.family else 'labels'} changed")
        self.checkpoint = checkpoint
        self.family, self.id2label = checkpoint.family, checkpoint.id2label
        self.num_labels = len(self.id2label)
        self.thing_ids = checkpoint.things
        self.postprocess = Postprocessor(
            PostprocessSpec(
                task=self.task,
                score_threshold=config.score_threshold,
                mask_threshold=config.mask_threshold,
                overlap_threshold=config.overlap_threshold,
                compat=config.compat,
                # Stuff labels are fused into one segment per image; unknown thing/stuff fuses nothing.
                fuse_label_ids=checkpoint.fused,
                keep_label_ids=checkpoint.keep,
                min_area=config.min_area,
                max_instances=config.max_instances,
                family=self.family,
            ),
            self.num_labels,
        )
        # Seconds spent per stage (host-side wall time; on CUDA the device runs ahead).
        self.timings: dict[str, float] = defaultdict(float)
        log.info(
            "loaded %s %s (revision %s) for %s on %s in %s",
            self.family, self.model_id, self.revision or "-", self.task, self.device, self.dtype_name,
        )

    def predict_raw(self, images: Sequence[Any]) -> list[RawPrediction]:
        """Label maps and per-segment arrays for each image, in input order (no RLE yet)."""
        arrays = [as_rgb(image) for image in images]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, array in enumerate(arrays):
            groups[self.preprocess_spec.input_size(*array.shape[:2])].append(i)
        results: list[RawPrediction | None] = [None] * len(arrays)
        with torch.inference_mode():
            for size, members in groups.items():
                for chunk in self._batches(members, arrays):
                    for i, raw in zip(chunk, self._run_batch([arrays[i] for i in chunk], size)):
                        results[i] = raw
        return results  # type: ignore[return-value]

    def _batches(self, members: list[int], arrays: list[np.ndarray]) -> Iterator[list[int]]:
        """``members`` in batches of at most ``batch_size`` model inputs: images, or the crops
        of images cut into crops (an image with more crops than that goes alone)."""
        spec, batch_size = self.preprocess_spec, self.config.batch_size
        chunk: list[int] = []
        rows = 0
        for i in members:
            need = 1
            if spec.split:
                need = len(crop_starts(max(spec.resized_size(*arrays[i].shape[:2])), spec.split))
            if chunk and rows + need > batch_size:
                yield chunk
                chunk, rows = [], 0
            chunk.append(i)
            rows += need
        if chunk:
            yield chunk

    def _run_batch(self, arrays: list[np.ndarray], size: tuple[int, int]) -> list[RawPrediction]:
        t0 = time.perf_counter()
        n = len(arrays)
        if self.config.compile and n < self.config.batch_size and not self.preprocess_spec.split:
            # A compiled graph per input shape: a short batch padded to the usual one reuses it.
            arrays = arrays + [arrays[-1]] * (self.config.batch_size - n)
        overlap = self._overlap
        with self._stream(), nullcontext() if overlap else self._model_lock:
            pixels, layouts = preprocess(
                [to_device(a, self.device) for a in arrays], self.preprocess_spec, size, self.dtype
            )
            t1 = time.perf_counter()
            with self._model_lock if overlap else nullcontext():
                t_in = time.perf_counter()
                outputs = self.model(pixel_values=pixels)
                if overlap and self.device.type == "cuda":
                    # Held until the device has run it, not only until the host queued it (the
                    # forward pass never waits): one forward pass on the device at a time, so
                    # its memory is one batch's, beside at most one batch's post-processing.
                    torch.cuda.current_stream(self.device).synchronize()
                t2 = time.perf_counter()
            # Layouts name the rows of the first n images: padded rows are never read.
            raws = self.postprocess(
                outputs.class_queries_logits, outputs.masks_queries_logits,
                [a.shape[:2] for a in arrays[:n]], size, layouts[:n],
            )
        t3 = time.perf_counter()
        with self._timings_lock:
            self.timings["preprocess"] += t1 - t0
            self.timings["wait"] += t_in - t1  # for the other thread's forward pass
            self.timings["forward"] += t2 - t_in
            self.timings["postprocess"] += t3 - t2
        return raws

    def _stream(self) -> Any:
        """This thread's own CUDA stream (nothing on a CPU): its copies and post-processing do
        not queue behind another thread's batch."""
        if self.device.type != "cuda":
            return nullcontext()
        stream = getattr(self._threads, "stream", None)
        if stream is None:
            stream = self._threads.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)

    def to_prediction(self, raw: RawPrediction) -> Prediction:
        """Attach segment records (labels, RLE, area, bbox) to a raw prediction."""
        return Prediction(
            self.task, raw.id_map, build_segments(raw, self.task, self.id2label, self.thing_ids),
            raw.review_score,
        )

    def __call__(self, images: Sequence[Any]) -> list[Prediction]:
        """Segment a batch of (H, W, 3) uint8 RGB images of any sizes."""
        return [self.to_prediction(raw) for raw in self.predict_raw(images)]


def _compiled(model: Any, cache_dir: str | None) -> Any:
    """``torch.compile`` of the model, its compiled code cached on disk (Inductor's FX graph and
    autotuning caches, under the seglabel cache dir unless TORCHINDUCTOR_CACHE_DIR says where):
    a second actor or a second run loads it instead of compiling again."""
    import os

    from .load import default_cache_dir

    root = Path(cache_dir) if cache_dir else default_cache_dir().parent
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:  # torch writes its default into the environment once anything asked for the cache dir
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

        given = None if given and os.path.abspath(given) == os.path.abspath(torch_default()) else given
    except ImportError:
        pass
    if not given:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return torch.compile(model, dynamic=False)

