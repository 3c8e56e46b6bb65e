"""Resize and normalise images on the model's device, as the checkpoint's preprocessor says.

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

from .config import Resolution


@dataclass(frozen=True)
class PreprocessSpec:
    """The resize and normalisation a checkpoint expects."""

    resolution: Resolution | None
    size_divisor: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, processor: Any, override: Resolution | None = None) -> "PreprocessSpec":
        """Read a Mask2Former image processor's settings; ``override`` replaces its size."""
        resolution = override
        if resolution is None and getattr(processor, "do_resize", True):
            size = processor.size
            get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
            if get("height") and get("width"):
                resolution = Resolution("fixed", height=int(get("height")), width=int(get("width")))
            elif get("shortest_edge"):
                shortest = int(get("shortest_edge"))
                longest = int(get("longest_edge") or max(shortest, 1333))
                resolution = Resolution("shortest", shortest=shortest, longest=longest)
            else:
                raise ValueError(f"unsupported preprocessor size {size!r}")
        do_rescale = getattr(processor, "do_rescale", True)
        do_normalize = getattr(processor, "do_normalize", True)
        mean = tuple(float(v) for v in processor.image_mean) if do_normalize else (0.0, 0.0, 0.0)
        std = tuple(float(v) for v in processor.image_std) if do_normalize else (1.0, 1.0, 1.0)
        return cls(
            resolution=resolution,
            size_divisor=int(getattr(processor, "size_divisor", 0) or 0),
            rescale_factor=float(processor.rescale_factor) if do_rescale else 1.0,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
        )

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The model-input (height, width) of an image of the given size, as HF computes it."""
        from transformers.image_transforms import get_size_with_aspect_ratio

        res = self.resolution
        if res is None:
            new_h, new_w = height, width
        elif res.mode == "fixed":
            new_h, new_w = res.height, res.width
        else:
            new_h, new_w = get_size_with_aspect_ratio((height, width), res.shortest, res.longest)
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


def preprocess(
    images: Sequence[torch.Tensor], spec: PreprocessSpec, size: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Resize (3, H, W) uint8 device tensors to ``size`` and normalise: a (B, 3, h, w) batch."""
    batch = torch.cat([resize(image.unsqueeze(0), size) for image in images]).float()
    device = batch.device
    scale = torch.tensor([spec.rescale_factor / s for s in spec.std], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(spec.mean, spec.std)], device=device).view(1, 3, 1, 1)
    return (batch * scale - shift).to(dtype)
