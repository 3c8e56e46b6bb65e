"""Resize and normalise images on the model's device, as the checkpoint's preprocessor says.

Mask2Former checkpoints resize each image to its own input size. EoMT checkpoints (whose
position embeddings fix one square input) fit the image into that square keeping its aspect
ratio and pad it bottom and right (``EomtImageProcessor``'s ``do_pad``), so every image of a job
has one input size; semantic EoMT checkpoints may instead resize to a shortest edge and cut the
image into overlapping square crops along its long side (``do_split_image``), whose results
the post-processing averages back together.

Hugging Face's processor resizes on the CPU one image at a time; here the uint8 pixels go to the
device once and every step runs there. The resize matches the processor's Pillow bilinear
filter, which antialiases when shrinking: on the CPU torch's uint8 antialiased kernel uses
Pillow's own arithmetic; elsewhere two float passes (horizontal, then vertical) are each rounded
to uint8 levels as Pillow's passes are. Random-weight test models have tiny margins between
labels, so a one-level difference in many pixels visibly changes their maps. Images are grouped
by their model-input size so that no image is ever padded against another: an image's result
never depends on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.config import Resolution
from .checkpoint import check_family_settings, eomt_input


@dataclass(frozen=True)
class Layout:
    """Where one image lies in the batch the model saw: ``rows``, the batch rows holding it (one,
    or its crops); ``resized``, its size at model scale when that is not the whole canvas (EoMT:
    the rest is padding, or the crops tile it); ``starts``, each crop's offset along its long side."""

    rows: tuple[int, ...]
    resized: tuple[int, int] | None = None
    starts: tuple[int, ...] = ()


@dataclass(frozen=True)
class PreprocessSpec:
    """The resize and normalisation a checkpoint expects."""

    resolution: Resolution | None
    size_divisor: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # EoMT: the (height, width) every image is padded to (bottom, right), or the side of the
    # square crops an image is cut into (semantic checkpoints that split images).
    pad_to: tuple[int, int] | None = None
    split: int = 0

    @classmethod
    def from_processor(
        cls,
        processor: Any,
        override: Resolution | None = None,
        family: str = "mask2former",
        image_size: Any = None,
    ) -> "PreprocessSpec":
        """Read an image processor's settings; ``override`` replaces its size (Mask2Former only:
        an EoMT model takes the one input size its position embeddings were trained at, its
        ``image_size``, which the processor's settings are checked against when given)."""
        resolution = override
        size = processor.size
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        eomt = family.startswith("eomt")
        check_family_settings(family, override)
        if eomt and image_size is not None:
            settings = {
                "size": {"shortest_edge": get("shortest_edge"), "longest_edge": get("longest_edge")},
                "do_pad": getattr(processor, "do_pad", False) is True,
                "do_split_image": getattr(processor, "do_split_image", False) is True,
                "do_resize": getattr(processor, "do_resize", True),
            }
            eomt_input(settings, image_size, "loaded here")
        if resolution is None and getattr(processor, "do_resize", True):
            if get("height") and get("width"):
                resolution = Resolution("fixed", height=int(get("height")), width=int(get("width")))
            elif get("shortest_edge"):
                shortest = int(get("shortest_edge"))
                # EoMT without a longest edge: none (0); Mask2Former: detectron2's 1333.
                longest = int(get("longest_edge") or (0 if eomt else max(shortest, 1333)))
                resolution = Resolution("shortest", shortest=shortest, longest=longest)
            else:
                raise ValueError(f"unsupported preprocessor size {size!r}")
        pad_to, split = None, 0
        if eomt and getattr(processor, "do_split_image", False):
            if not get("shortest_edge"):
                raise ValueError(f"cannot split images with preprocessor size {size!r}")
            split = int(get("shortest_edge"))
        elif eomt and getattr(processor, "do_pad", False) and get("shortest_edge"):
            # EomtImageProcessor.get_target_size: (shortest_edge, longest_edge or shortest_edge).
            pad_to = (int(get("shortest_edge")), int(get("longest_edge") or get("shortest_edge")))
        do_rescale = getattr(processor, "do_rescale", True)
        do_normalize = getattr(processor, "do_normalize", True)
        mean = tuple(float(v) for v in processor.image_mean) if do_normalize else (0.0, 0.0, 0.0)
        std = tuple(float(v) for v in processor.image_std) if do_normalize else (1.0, 1.0, 1.0)
        return cls(
            resolution=resolution,
            # HF's EoMT processor has no divisor; a stray one in its config is not applied.
            size_divisor=0 if eomt else int(getattr(processor, "size_divisor", 0) or 0),
            rescale_factor=float(processor.rescale_factor) if do_rescale else 1.0,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            pad_to=pad_to,
            split=split,
        )

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The model-input (height, width) of an image of the given size, as HF computes it:
        the padded square or the crop for EoMT (one size for every image), else the resized size."""
        if self.split:
            return self.split, self.split
        if self.pad_to is not None:
            return self.pad_to
        return self.resized_size(height, width)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of the given size is resized to, before any padding."""
        from transformers.image_transforms import get_size_with_aspect_ratio

        res = self.resolution
        if res is None:
            new_h, new_w = height, width
        elif res.mode == "fixed":
            new_h, new_w = res.height, res.width
        else:
            new_h, new_w = get_size_with_aspect_ratio((height, width), res.shortest, res.longest or None)
        # HF rounds the resized size up to the divisor (stretching slightly) instead of padding.
        if self.size_divisor > 0:
            new_h = int(math.ceil(new_h / self.size_divisor) * self.size_divisor)
            new_w = int(math.ceil(new_w / self.size_divisor) * self.size_divisor)
        return max(new_h, 1), max(new_w, 1)


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``, without waiting for the device: on CUDA one copy
    into pinned memory, then a non-blocking transfer; on a CPU the array itself; elsewhere
    (``--device`` names any torch device) torch's own copy.

    Arrays from Ray's object store (and the decoder) are read-only, and torch warns about
    tensors over them: on a CPU such an array is copied (rather than a warnings filter, which
    two threads, the actor's two calls, would each install and remove around the other's).
    """
    if device.type == "cuda":
        dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
        pinned = torch.empty(array.shape, dtype=dtype, pin_memory=True)
        pinned.numpy()[...] = array
        return pinned.to(device, non_blocking=True)
    tensor = torch.from_numpy(np.ascontiguousarray(array if array.flags.writeable else array.copy()))
    return tensor.to(device)  # the tensor itself on a CPU


def to_device(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """An (H, W, 3) uint8 array as a (3, H, W) uint8 tensor on ``device`` (``host_to_device``:
    on CUDA the copy overlaps with whatever the device is doing)."""
    return host_to_device(image, device).permute(2, 0, 1)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, 3, H, W) uint8 tensor as Pillow's bilinear filter does; uint8 levels out."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if image.device.type == "cpu":
        return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = image.float()
    for step in ((x.shape[-2], size[1]), size):
        if tuple(x.shape[-2:]) != tuple(step):
            x = (
                F.interpolate(x, size=step, mode="bilinear", align_corners=False, antialias=True)
                .round_()
                .clamp_(0, 255)
            )
    return x


# The most crops one image is cut into: a 1 x 100,000-pixel strip (within --max-pixels) would
# otherwise become a 100,000-crop batch at model scale.
MAX_CROPS = 32


def crop_starts(long_side: int, crop: int) -> list[int]:
    """Where the overlapping square crops of an image's long side start, as
    ``EomtImageProcessor._split_image`` cuts them: as few as cover it, overlapping evenly. The
    last one ends at the image's end: HF's float arithmetic can start it a pixel early (crop
    640 from 8 crops, 384 from 12), leaving the last pixel line uncovered (label 0 there)."""
    count = math.ceil(long_side / crop)
    if count > MAX_CROPS:
        raise ValueError(
            f"image too elongated to split into crops ({count} crops of {crop} px; at most {MAX_CROPS})"
        )
    overlap = (count * crop - long_side) / (count - 1) if count > 1 else 0
    starts = [int(i * (crop - overlap)) for i in range(count)]
    starts[-1] = max(0, long_side - crop)
    return starts


def preprocess(
    images: Sequence[torch.Tensor], spec: PreprocessSpec, size: tuple[int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, list[Layout]]:
    """Resize (3, H, W) uint8 device tensors for the model (to ``size``; EoMT: into it, then
    padded, or cut into crops of it) and normalise: a (B, 3, h, w) batch, and where each image
    lies in it."""
    rows: list[torch.Tensor] = []
    layouts: list[Layout] = []
    for image in images:
        height, width = image.shape[-2:]
        if not (spec.split or spec.pad_to):
            layouts.append(Layout((len(rows),)))
            rows.append(resize(image.unsqueeze(0), size))
            continue
        resized_hw = spec.resized_size(height, width)
        # Counted before resizing: an image too elongated is refused before its pixels grow.
        starts = crop_starts(max(resized_hw), spec.split) if spec.split else []
        resized = resize(image.unsqueeze(0), resized_hw)
        if spec.split:
            tall = resized_hw[0] > resized_hw[1]
            first = len(rows)
            for start in starts:
                end = start + spec.split
                rows.append(resized[:, :, start:end, :] if tall else resized[:, :, :, start:end])
            layouts.append(Layout(tuple(range(first, len(rows))), resized_hw, tuple(starts)))
        else:
            # Zeros at pixel level, before normalisation, as the processor pads.
            pad_h, pad_w = max(0, size[0] - resized_hw[0]), max(0, size[1] - resized_hw[1])
            layouts.append(Layout((len(rows),), resized_hw))
            rows.append(F.pad(resized, (0, pad_w, 0, pad_h)))
    return _normalise(torch.cat([r.float() for r in rows]), spec, dtype), layouts


def _normalise(batch: torch.Tensor, spec: PreprocessSpec, dtype: torch.dtype) -> torch.Tensor:
    device = batch.device
    scale = torch.tensor([spec.rescale_factor / s for s in spec.std], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(spec.mean, spec.std)], device=device).view(1, 3, 1, 1)
    return (batch * scale - shift).to(dtype)
