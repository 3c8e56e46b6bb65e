"""(a) The usual Hugging Face loop, the baseline every other rate is compared with: the
processor on the CPU, the model in fp32 at batch 1, ``post_process_<task>_segmentation`` per
image at the original size."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ..core.config import EngineConfig, Resolution
from .measure import CpuShare, GpuSampler, free, ms_per_image, rate, sync


def _hf_processor_kwargs(resolution: Resolution | None) -> dict[str, Any]:
    if resolution is None:
        return {}
    if resolution.mode == "fixed":
        return {"size": {"height": resolution.height, "width": resolution.width}}
    return {"size": {"shortest_edge": resolution.shortest, "longest_edge": resolution.longest}}


def run_hf_loop(
    engine: EngineConfig, images: Sequence[np.ndarray], *, device: Any, warmup: int = 1
) -> dict[str, Any]:
    """The usual loop on ``engine``'s checkpoint, task, resolution and thresholds: HF's CPU
    processor, the model in fp32 at batch 1, HF post-processing per image at the original size,
    the label map brought to the host (as one would save it). ``engine.task`` must be set."""
    import torch

    loop = _HfLoop(engine, device)
    scratch = {"processor": 0.0, "forward": 0.0, "postprocess": 0.0}
    stages = dict(scratch)
    segments = 0
    with torch.inference_mode():
        for image in images[: max(0, warmup)]:
            loop.one(image, scratch)
        with GpuSampler(device) as gpu, CpuShare() as cpu:
            started = time.perf_counter()
            for image in images:
                segments += loop.one(image, stages)
            seconds = time.perf_counter() - started
    loop.model = None  # released before the next phase loads its own
    free(device)
    n = len(images)
    processor = type(loop.processor).__name__
    return {
        "what": f"HF {processor} (CPU) + model fp32, batch 1 + HF post_process per image",
        "images": n,
        "seconds": seconds,
        "images_per_s": rate(n, seconds),
        "segments_per_image": segments / n if n else 0.0,
        "stages_s": stages,
        "ms_per_image": ms_per_image(stages, n),
        "processor_class": processor,
        "gpu_util": gpu.result(),
        "others_cpu_share": cpu.others(),
    }


class _HfLoop:
    """The usual loop's pieces for ``engine``'s checkpoint: HF's processor, the model in fp32 on
    ``device``, and HF's post-processing for the task."""

    def __init__(self, engine: EngineConfig, device: Any) -> None:
        import torch

        from ..engine.checkpoint import inspect_checkpoint
        from ..engine.load import model_class, processor_class

        kwargs = {"revision": engine.revision} if engine.revision else {}
        family = inspect_checkpoint(engine.model, engine.revision).family
        self.processor = processor_class(family).from_pretrained(
            engine.model, **kwargs, **_hf_processor_kwargs(engine.resolution)
        )
        self.model = model_class(family).from_pretrained(engine.model, dtype=torch.float32, **kwargs)
        self.model.eval().to(device)
        self.device = device
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.post = _HfPost(self.processor, engine, id2label, eomt=family != "mask2former")

    def one(self, image: np.ndarray, stages: dict[str, float]) -> int:
        """Label one image, adding each stage's time to ``stages``; returns its segments."""
        import torch

        device = self.device
        t0 = time.perf_counter()
        inputs = self.processor(images=[image], return_tensors="pt")
        # EoMT's crop offsets travel as a list, to the model and on to the post-processing.
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
                  if isinstance(v, torch.Tensor) or (k == "patch_offsets" and v)}
        sync(device)
        t1 = time.perf_counter()
        outputs = self.model(**inputs)
        sync(device)
        t2 = time.perf_counter()
        _, count = self.post(outputs, tuple(image.shape[:2]))
        t3 = time.perf_counter()
        stages["processor"] += t1 - t0
        stages["forward"] += t2 - t1
        stages["postprocess"] += t3 - t2
        return count


class _HfPost:
    """HF's ``post_process_<task>_segmentation`` for one image at its original size, with the
    engine's thresholds; stuff labels fused in panoptic as the Segmenter fuses them."""

    def __init__(self, processor: Any, engine: EngineConfig, id2label: dict[int, str], eomt: bool) -> None:
        from ..core.labels import thing_ids

        self.processor = processor
        self.task = engine.task
        things = thing_ids(id2label)
        fuse = set(id2label) - set(things) if self.task == "panoptic" and things is not None else set()
        thresholds = {
            "threshold": engine.score_threshold,
            "mask_threshold": engine.mask_threshold,
            "overlap_mask_area_threshold": engine.overlap_threshold,
        }
        if eomt:
            # HF's EoMT post-processing takes no overlap or fuse settings for instance, and its
            # panoptic fuses "stuff classes".
            instance = {"threshold": engine.score_threshold}
            panoptic = {**thresholds, "stuff_classes": sorted(fuse)}
        else:
            instance, panoptic = thresholds, {**thresholds, "label_ids_to_fuse": fuse}
        self.kwargs = {"instance": instance, "panoptic": panoptic}

    def __call__(self, outputs: Any, size: tuple[int, int]) -> tuple[np.ndarray, int]:
        """The label map on the host and its number of segments."""
        if self.task in self.kwargs:
            post = getattr(self.processor, f"post_process_{self.task}_segmentation")
            r = post(outputs, **self.kwargs[self.task], target_sizes=[size])[0]
            return r["segmentation"].cpu().numpy(), len(r["segments_info"])
        seg = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0].cpu().numpy()
        return seg, len(np.unique(seg))


__all__ = ["run_hf_loop"]
