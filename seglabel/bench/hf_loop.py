"""(a) The usual Hugging Face loop, the baseline every other rate is compared with: the
processor on the CPU, the model in fp32 at batch 1, ``post_process_<task>_segmentation`` per
image at the original size."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ..config import EngineConfig, Resolution
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

    from ..checkpoint import inspect_checkpoint, model_class, processor_class
    from ..labels import thing_ids

    task = engine.task
    score_threshold, mask_threshold, overlap_threshold = (
        engine.score_threshold, engine.mask_threshold, engine.overlap_threshold)
    kwargs = {"revision": engine.revision} if engine.revision else {}
    family = inspect_checkpoint(engine.model, engine.revision).family
    eomt = family != "mask2former"
    processor = processor_class(family).from_pretrained(
        engine.model, **kwargs, **_hf_processor_kwargs(engine.resolution)
    )
    model = model_class(family).from_pretrained(engine.model, dtype=torch.float32, **kwargs)
    model.eval().to(device)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    things = thing_ids(id2label)
    fuse = set(id2label) - set(things) if task == "panoptic" and things is not None else set()

    def post(outputs, size):
        if eomt:
            return eomt_post(outputs, size)
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

    def eomt_post(outputs, size):
        # HF's EoMT post-processing takes no overlap or fuse settings for instance; stuff
        # classes fuse in panoptic as the Segmenter fuses them.
        if task == "instance":
            r = processor.post_process_instance_segmentation(outputs, threshold=score_threshold,
                                                             target_sizes=[size])[0]
            return r["segmentation"].cpu().numpy(), len(r["segments_info"])
        if task == "panoptic":
            r = processor.post_process_panoptic_segmentation(
                outputs, threshold=score_threshold, mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_threshold, stuff_classes=sorted(fuse),
                target_sizes=[size])[0]
            return r["segmentation"].cpu().numpy(), len(r["segments_info"])
        seg = processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0].cpu().numpy()
        return seg, len(np.unique(seg))

    def one(image: np.ndarray, stages: dict[str, float]) -> int:
        t0 = time.perf_counter()
        inputs = processor(images=[image], return_tensors="pt")
        # EoMT's crop offsets travel as a list, to the model and on to the post-processing.
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
                  if isinstance(v, torch.Tensor) or (k == "patch_offsets" and v)}
        sync(device)
        t1 = time.perf_counter()
        outputs = model(**inputs)
        sync(device)
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
    model = None  # released before the next phase loads its own
    free(device)
    n = len(images)
    return {
        "what": f"HF {type(processor).__name__} (CPU) + model fp32, batch 1 + HF post_process per image",
        "images": n,
        "seconds": seconds,
        "images_per_s": rate(n, seconds),
        "segments_per_image": segments / n if n else 0.0,
        "stages_s": stages,
        "ms_per_image": ms_per_image(stages, n),
        "processor_class": type(processor).__name__,
        "gpu_util": gpu.result(),
        "others_cpu_share": cpu.others(),
    }


__all__ = ["run_hf_loop"]
