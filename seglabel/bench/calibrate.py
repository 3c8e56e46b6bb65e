"""Random-weight checkpoints that behave like trained ones, for benchmarks.

No weights can be downloaded where seglabel is built and measured, and random weights give no
segments at all (post-processing would look free), so the bench builds a checkpoint of the
chosen architecture (``seglabel.engine.synthetic``) and calibrates it on the bench's first photos to
carry a realistic number of realistic masks per image.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..core.config import EngineConfig
from ..core.errors import ConfigError


def bench_labels(task: str) -> dict[int, str]:
    """A realistic label set per task: COCO's 80 things (instance), COCO panoptic's 133
    (panoptic; stuff is fused), ADE20K's 150 (semantic)."""
    from ..core.labels import LABEL_SETS

    table = {"instance": LABEL_SETS["coco-panoptic"][:80], "panoptic": LABEL_SETS["coco-panoptic"],
             "semantic": LABEL_SETS["ade20k"]}[task]
    return {i: name for i, (name, _) in enumerate(table)}


def _postprocessor(task: str, id2label: Mapping[int, str], engine: EngineConfig, family: str = "mask2former"):
    from ..core.labels import thing_ids
    from ..engine.postprocess import Postprocessor, PostprocessSpec

    things = thing_ids(id2label)
    fuse = (
        frozenset(set(id2label) - set(things)) if task == "panoptic" and things is not None else frozenset()
    )
    spec = PostprocessSpec(
        task=task,
        score_threshold=engine.score_threshold,
        mask_threshold=engine.mask_threshold,
        overlap_threshold=engine.overlap_threshold,
        fuse_label_ids=fuse,
        family=family,
    )
    return Postprocessor(spec, len(id2label))


# Calibration of random models: share of the image each mask covers, and the spread of mask
# and label logits (large enough that masks are sharp and each query is sure of its label).
MASK_COVERAGE = 0.04
MASK_LOGIT_STD = 8.0
CLASS_LOGIT_STD = 10.0
CROSS_ATTENTION_SCALE = 0.03


def _mask_head(model: Any) -> Any:
    """The last Linear of the mask embedder (shared by every decoder layer; EoMT: its mask head)."""
    import torch

    if hasattr(model, "mask_head"):
        return model.mask_head.fc3
    embedder = model.model.transformer_module.decoder.mask_predictor.mask_embedder
    return [m for m in embedder.modules() if isinstance(m, torch.nn.Linear)][-1]


def _constant_mask_channel(model: Any, outputs: list, head: Any) -> Any:
    """Mask2Former: turn the pixel embeddings' mean direction into a constant channel of the
    mask projection, which the mask head then reads only as an offset; returns that direction."""
    import torch

    features = [o.pixel_decoder_last_hidden_state.float() for o, _, _ in outputs]
    mean = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
    unit = mean / mean.norm().clamp_min(1e-12)
    projection = model.model.pixel_level_module.decoder.mask_projection
    project = torch.eye(len(unit), device=unit.device) - torch.outer(unit, unit)
    weight = projection.weight.view(projection.weight.shape[0], -1)
    weight.copy_(project.to(weight.dtype) @ weight)
    bias = projection.bias
    bias.copy_(project.to(bias.dtype) @ bias + unit.to(bias.dtype))
    head.weight.copy_(project.to(head.weight.dtype) @ head.weight)
    head.bias.copy_(project.to(head.bias.dtype) @ head.bias)
    return unit


@dataclass(frozen=True)
class Calibration:
    """What a random model is calibrated to, and on what.

    ``images``: the photos it is measured on (none: it stays as built); ``target_segments``:
    about this many segments per image (0: as built); ``coverage``: each mask covering about
    this share of the image (0: as built); ``engine``: whose thresholds and resolution count
    the segments; ``device``: where the model runs meanwhile.
    """

    images: Sequence[np.ndarray] = ()
    target_segments: float = 20
    coverage: float = MASK_COVERAGE
    engine: EngineConfig = EngineConfig()
    device: str = "cpu"


def calibrate_random_model(
    model: Any, processor: Any, task: str, id2label: Mapping[int, str], calibration: Calibration
) -> dict[str, Any]:
    """Give a random-weight model realistic masks and about ``calibration.target_segments``
    segments per image, as ``calibration.engine``'s thresholds and resolution count them.

    A random mask head makes every query's mask cover most of the image (the pixel embeddings
    share one large mean direction), so instances all overlap and panoptic merging keeps almost
    none. Four edits of the weights, measured on ``calibration.images``:

    0. queries: the decoder's cross-attention outputs are damped so that queries stay distinct
       (else every query of an image shares its label, mask and score);
    1. masks: the pixel embeddings' mean direction becomes a constant channel, which the mask
       head reads only as an offset, set so that each mask covers about ``calibration.coverage``
       of the image (a few rounds, since the decoder's masked attention reads its own masks);
       the mask logits are then scaled to be sharp (their sign, hence the attention masks, kept);
    2. labels: each label's logit is centred over the queries, so that queries pick different
       labels (else one label wins every query), and scaled so that each query is sure of its
       label;
    3. segments: the no-object logit is shifted so that seglabel's post-processing at the given
       thresholds keeps about ``target_segments`` segments per image. Each candidate shift
       re-runs only the post-processing on stored outputs (nothing else reads that logit);
       candidates are quantiles of the per-query margin between the best label and no-object.

    Returns what was done and measured.
    """
    import torch

    from ..engine.preprocess import PreprocessSpec

    family = getattr(model.config, "model_type", "mask2former")
    eomt = family != "mask2former"
    spec = PreprocessSpec.from_processor(processor, calibration.engine.resolution, family,
                                         getattr(model.config, "image_size", None))
    post = _postprocessor(task, id2label, calibration.engine, family)
    dev = torch.device(calibration.device)
    model.to(dev)
    forward = _forward_pass(model, spec, calibration.images, dev)
    head = _mask_head(model)
    info: dict[str, Any] = {
        "calibration_images": len(calibration.images),
        "cross_attention_scale": None if eomt else CROSS_ATTENTION_SCALE,
    }
    if not eomt:  # EoMT has no decoder: its queries are tokens of the ViT's last blocks.
        _damp_cross_attention(model)
    outputs = forward()
    info["mask_coverage_as_built"] = _coverage(outputs)
    if calibration.coverage:
        outputs = _shape_masks(model, head, forward, outputs, calibration.coverage, eomt)
        info["mask_coverage"] = _coverage(outputs)
    stored = [(o.class_queries_logits.float().clone(), o.masks_queries_logits.float(), original, size)
              for o, original, size in outputs]
    info["distinct_labels_per_image"] = _centre_labels(model, stored)
    info.update(_shift_no_object(model, stored, post, calibration.target_segments))
    model.to("cpu")
    return info


def _forward_pass(model: Any, spec: Any, images: Sequence[np.ndarray], device: Any) -> Callable[[], list]:
    """A function that runs ``model`` on ``images`` (each preprocessed once, here) and returns
    (outputs, original size, input size) for each."""
    import torch

    from ..engine.preprocess import preprocess, to_device

    batches = []
    for image in images:
        size = spec.input_size(*image.shape[:2])
        batches.append(
            (preprocess([to_device(image, device)], spec, size, torch.float32)[0], image.shape[:2], size)
        )

    def forward() -> list:
        with torch.inference_mode():
            return [(model(pixel_values=pixels), original, size) for pixels, original, size in batches]

    return forward


def _coverage(outputs: list) -> float:
    """The mean share of an image a query's mask covers."""
    return float(np.mean([(o.masks_queries_logits > 0).float().mean().item() for o, _, _ in outputs]))


def _all_mask_logits(outputs: list) -> Any:
    """Every mask logit of ``outputs``, flat, in float32."""
    import torch

    return torch.cat([o.masks_queries_logits.float().flatten() for o, _, _ in outputs])


def _damp_cross_attention(model: Any) -> None:
    """0. queries: with random weights every query's cross-attention returns about the same
    image average, which swamps what tells one query from another (for swin-s, 99% of the
    variance of the heads' input is per image), so all queries of an image would share one
    label, one mask and one score. Damping the cross-attention outputs lets each query keep its
    identity while the image still shapes it (and the masks read the image directly)."""
    import torch

    with torch.no_grad():
        for layer in model.model.transformer_module.decoder.layers:
            layer.cross_attn.out_proj.weight.mul_(CROSS_ATTENTION_SCALE)
            layer.cross_attn.out_proj.bias.mul_(CROSS_ATTENTION_SCALE)


def _shape_masks(
    model: Any, head: Any, forward: Callable[[], list], outputs: list, coverage: float, eomt: bool
) -> list:
    """1. masks: each covering about ``coverage`` of the image, then sharp; returns the outputs
    of the model so edited.

    The pixel embeddings share one large mean direction, so every mask covers all or nothing of
    an image. Turn that direction into a constant channel (the pixel decoder's mask projection:
    its weights lose it, its bias carries a constant 1 along it), and let the mask head read
    only the rest, plus a bias along the constant channel: an offset that is the same for every
    pixel of every image.
    """
    import torch

    with torch.no_grad():
        if eomt:
            # Built with that constant channel already (synthetic._eomt: channel 0 of the
            # pixel features is 1, and the mask head reads it through its bias alone).
            unit = torch.zeros(head.bias.shape[0], device=head.bias.device)
            unit[0] = 1.0
        else:
            unit = _constant_mask_channel(model, outputs, head)
        for _ in range(4):
            logits = _all_mask_logits(forward())
            sample = logits[:: max(1, len(logits) // 2_000_000)]
            now = float((sample > 0).float().mean())
            if abs(now - coverage) <= 0.15 * coverage:
                break
            head.bias.sub_(float(torch.quantile(sample, 1.0 - coverage)) * unit.to(head.bias.dtype))
        logits = _all_mask_logits(forward())
        sharpen = MASK_LOGIT_STD / float(logits.std().clamp_min(1e-6))
        head.weight.mul_(sharpen)
        head.bias.mul_(sharpen)
    return forward()


def _centre_labels(model: Any, stored: list) -> float:
    """2. labels: queries share one large hidden-state direction too, so one label would win
    every query (a semantic map of one label). Centre each label's logit over the queries, then
    scale the label logits so that each query is sure of its label: in the model's class head
    and in ``stored`` alike. Returns the distinct labels per image that leaves."""
    import torch

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
    return float(np.mean([len(set(c[0, :, :-1].argmax(-1).tolist())) for c, _, _, _ in stored]))


def _segments_per_image(stored: list, post: Any, shift: float) -> float:
    """Segments per image that ``post`` keeps with the no-object logit shifted by ``shift``.
    Counted at the mask logits' own resolution (a quarter of the input's side): about the
    counts at full size, for a sixteenth of the work."""
    total = 0
    for class_logits, mask_logits, _, _ in stored:
        shifted = class_logits.clone()
        shifted[..., -1] += shift
        low = tuple(mask_logits.shape[-2:])
        total += sum(len(r.ids) for r in post(shifted, mask_logits, [low], low))
    return total / max(1, len(stored))


def _shift_no_object(model: Any, stored: list, post: Any, target: float) -> dict[str, Any]:
    """3. segments: shift the model's no-object logit so that ``post`` keeps about ``target``
    segments per image (0: left as built); returns what was tried and found."""
    import torch

    if not target:
        with torch.inference_mode():
            return {"segments_per_image": _segments_per_image(stored, post, 0.0)}
    with torch.inference_mode():
        margins = torch.cat([(c[..., :-1].amax(-1) - c[..., -1]).flatten() for c, _, _, _ in stored]).cpu()
        quantiles = torch.quantile(margins.double(), torch.linspace(0, 1, 26, dtype=torch.float64))
        # Just below a quantile keeps that share of the queries as objects; 0 is "as built".
        candidates = sorted({0.0, float(margins.min()) - 1.0, *(float(q) - 1e-3 for q in quantiles)})
        tried = [(shift, _segments_per_image(stored, post, shift)) for shift in candidates]
    shift, found = min(tried, key=lambda t: (abs(t[1] - target), abs(t[0])))
    with torch.no_grad():
        model.class_predictor.bias[-1] += shift
    return {
        "no_object_shift": round(shift, 4),
        "target_segments_per_image": target,
        "segments_per_image": found,
        "segments_per_image_unshifted": dict(tried).get(0.0),
        "max_segments_per_image": max(c for _, c in tried),
    }


def build_checkpoint(
    path: str | Path,
    arch: str,
    task: str,
    calibration: Calibration = Calibration(),
    *,
    input_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> tuple[Path, dict]:
    """A random-weight, confident checkpoint of ``arch`` for ``task`` (its preprocessor resizes
    to ``input_size``), calibrated as ``calibration`` says (:func:`calibrate_random_model`)
    when it names images and a target or a coverage."""
    from ..engine.load import processor_class
    from ..engine.synthetic import (
        ARCHITECTURES,
        build_random_model,
        eomt_preprocessor_config,
        family,
        preprocessor_config,
    )

    if arch not in ARCHITECTURES:
        raise ConfigError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    id2label = bench_labels(task)
    started = time.perf_counter()
    model = build_random_model(arch, id2label, confident=True, seed=seed)
    if family(arch) != "mask2former":
        # EoMT's input is its model's square (the Hub's configs: padded; semantic: crops).
        processor_config = eomt_preprocessor_config(int(model.config.image_size), split=task == "semantic")
    else:
        size = {"height": input_size[0], "width": input_size[1]} if input_size else None
        processor_config = preprocessor_config(size)
    (path / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2))
    info: dict[str, Any] = {
        "arch": arch,
        "task": task,
        "num_queries": int(model.config.num_queries),
        "num_labels": len(id2label),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    if (calibration.target_segments or calibration.coverage) and calibration.images:
        processor = processor_class(family(arch)).from_pretrained(path)
        info["calibration"] = calibrate_random_model(model, processor, task, id2label, calibration)
    model.save_pretrained(path)
    info["build_s"] = round(time.perf_counter() - started, 2)
    del model
    return path, info


__all__ = ["Calibration", "bench_labels", "build_checkpoint", "calibrate_random_model"]
