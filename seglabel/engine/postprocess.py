"""Turn Mask2Former outputs into label maps at each image's original resolution, on the device.

The semantics are those of Hugging Face's ``post_process_{semantic,instance,panoptic}_segmentation``
(and of Mask2Former's own inference code), without their limits: HF resizes every mask to a
hard-coded 384×384 first, loops over queries with a host synchronisation each, and builds the
canvas on the CPU. Here the work stays on the device, the per-query decisions are made on small
vectors, and the full-resolution maps are produced in row chunks so that memory stays bounded for
large photos. The host waits for the device a few times a batch, not per image or per chunk:
results come back through pinned memory without blocking and are waited for together, and what
must be decided on the host (which queries an image keeps; the panoptic merge) is decided for the
whole batch at once. Semantic: one wait a batch; instance: two; panoptic: three
(``Postprocessor.syncs`` counts them).

Masks are first brought to the model-input resolution (the "canvas"), as Mask2Former's own
inference does, then to the original size. ``compat=True`` reproduces HF's results as they are:
its canvas is a fixed 384×384 whatever the input was (padding included), its instance masks are
thresholded there and enlarged with nearest-neighbour, and its panoptic numbering is kept.

EoMT (``family`` ``eomt``/``eomt_dinov3``) follows HF's EoMT post-processing: the canvas is the
padded square input, whose padding is cropped off before masks go to the original size; mask
logits (not probabilities) are resized, then the sigmoid taken; instance scores are each query's
arg-max class probability times its mean mask probability; a panoptic pixel whose winning
query's probability is under the mask threshold is void. Semantic images cut into crops get
their crops' class scores averaged back together. ``compat`` adds what HF's EoMT code does that
the default does not: instance mask scores taken at the original resolution, and a semantic
canvas resized whole, its padding included, to the image.

Every prediction carries its review score (:mod:`seglabel.core.review`): the pixel counts it needs
are taken from tensors the post-processing holds anyway (model-scale mask logits, the
full-resolution chunks) and come back with the transfers each task already waits for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..core.masks import PackedMasks
from ..core.results import RawPrediction
from ..core.review import BAND, GRID, logit, mask_band, review_score, score_doubt, share
from .preprocess import Layout, host_to_device

# HF's post-processing resizes mask logits to this canvas whatever the model input was.
HF_CANVAS = (384, 384)
# Elements per chunk of full-resolution work (float32: 128 MiB).
CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class PostprocessSpec:
    """How to turn model outputs into segments. Label ids are the checkpoint's."""

    task: str
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    overlap_threshold: float = 0.8
    compat: bool = False
    fuse_label_ids: frozenset[int] = frozenset()
    keep_label_ids: frozenset[int] | None = None
    min_area: int = 0
    max_instances: int | None = None
    chunk_elements: int = CHUNK_ELEMENTS
    family: str = "mask2former"

    @property
    def eomt(self) -> bool:
        """Whether the model is EoMT's (HF's EoMT post-processing semantics)."""
        return self.family.startswith("eomt")


def semantic_void(num_labels: int) -> int:
    """The pixel value of filtered-out pixels in a semantic map (255, or 65535 for 16-bit maps)."""
    return 255 if num_labels < 256 else 65535


def bilinear_rows(x: torch.Tensor, out_h: int, out_w: int, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of ``interpolate(x[None], (out_h, out_w), mode="bilinear")[0]``.

    Bilinear interpolation is separable, so each chunk only needs the source rows under it:
    memory is that of the chunk, not of the whole (channels, out_h, out_w) result.
    """
    _, h, _ = x.shape
    scale = h / out_h
    src = ((torch.arange(r0, r1, device=x.device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    y0 = src.floor().long().clamp_(max=h - 1)
    y1 = (y0 + 1).clamp_(max=h - 1)
    wy = (src - y0).view(1, -1, 1)
    # The source rows under the chunk, worked out on the host (reading y0 and y1 back would make
    # the host wait for the device), a row wider on each side than float32 rounding could move
    # them; rows to spare change nothing below, only offsets into ``sub``.
    lo = min(h - 1, max(0, math.floor((r0 + 0.5) * scale - 0.5) - 1))
    hi = min(h - 1, max(0, math.floor((r1 - 0.5) * scale - 0.5) + 2))
    sub = x[:, lo : hi + 1]
    if sub.shape[-1] != out_w:
        sub = F.interpolate(
            sub.unsqueeze(0), size=(sub.shape[1], out_w), mode="bilinear", align_corners=False
        )[0]
    return (1 - wy) * sub[:, y0 - lo] + wy * sub[:, y1 - lo]


def row_chunks(channels: int, out_h: int, out_w: int, budget: int) -> Iterator[tuple[int, int]]:
    """(r0, r1) row ranges whose chunks hold about ``budget`` elements."""
    rows = max(1, budget // max(1, channels * out_w))
    for r0 in range(0, out_h, rows):
        yield r0, min(out_h, r0 + rows)


class _ToHost:
    """Device-to-host copies queued without waiting (into pinned memory, on the current
    stream); :meth:`wait` waits once for all of them. On a CPU the tensors are the copies."""

    def __init__(self, device: torch.device, counter: "Postprocessor"):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.current_stream(device) if self.cuda else None
        self.counter = counter

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def wait(self) -> None:
        """The host's one wait for the device: every copy queued so far is complete after it."""
        self.counter.syncs += 1
        if self.cuda:
            self.stream.synchronize()

    def fetch(self, *tensors: torch.Tensor) -> list[np.ndarray]:
        """``tensors`` as host arrays, after one :meth:`wait` (which completes any copy queued
        before too)."""
        copies = [self(t) for t in tensors]
        self.wait()
        return [c.numpy() for c in copies]


def _counts(values: torch.Tensor, size: int) -> torch.Tensor:
    """``bincount(values, minlength=size)`` for values below ``size``, without reading their
    maximum back to the host (CUDA's bincount does, to size its output). One path for every
    device, so that the CPU tests run the GPU's."""
    ones = torch.ones(1, dtype=torch.int64, device=values.device).expand(values.numel())
    return torch.zeros(size, dtype=torch.int64, device=values.device).scatter_add_(0, values.long(), ones)


def pack_rows(masks: torch.Tensor) -> torch.Tensor:
    """(N, R, W) booleans as (N, R, ceil(W / 8)) uint8, 8 pixels a byte, first pixel in the
    high bit: ``numpy.packbits(axis=-1)``, on the device."""
    n, r, w = masks.shape
    m = masks.to(torch.uint8)
    if w % 8:
        m = F.pad(m, (0, 8 - w % 8))
    # 128, 64, ..., 1, made on the device (no copy from the host).
    weights = (1 << torch.arange(7, -1, -1, device=masks.device)).to(torch.uint8)
    return (m.view(n, r, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def row_extents(rows: torch.Tensor) -> torch.Tensor:
    """(top, bottom, first byte, last byte) of each row-packed mask, -1s for an empty one
    (what ``PackedMasks.from_rows`` would find on the host), on the device."""
    filled_rows = rows.amax(2) > 0
    filled_bytes = rows.amax(1) > 0
    height, nbytes = filled_rows.shape[1], filled_bytes.shape[1]
    # argmax gives the first maximum: the first filled row (byte), and from the end the last.
    extents = torch.stack(
        [
            filled_rows.to(torch.uint8).argmax(1),
            height - 1 - filled_rows.flip(1).to(torch.uint8).argmax(1),
            filled_bytes.to(torch.uint8).argmax(1),
            nbytes - 1 - filled_bytes.flip(1).to(torch.uint8).argmax(1),
        ],
        dim=1,
    )
    return torch.where(filled_rows.any(1, keepdim=True), extents, -1)


def _panoptic_prediction(size: tuple[int, int], entry: tuple | None) -> RawPrediction:
    """An image's panoptic result from its fetched (id map, ids, labels, scores, review
    score); None: no query was kept, an empty map."""
    if entry is None:
        empty = np.zeros(size, dtype=np.int32)
        return RawPrediction(empty, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32),
                             review_score=review_score(0, 0, 0, 0))
    id_map, ids, labels, seg_scores, review = entry
    return RawPrediction(id_map.numpy().astype(np.int32), ids, labels, seg_scores, review_score=review)


def band_counts(logits: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """(K, 2) per mask of (K, h, w) logits, on the review's grid: its pixels in the undecided
    band (lo, hi), and those over lo (in the band or above it): :func:`seglabel.core.review.mask_band`'s
    logits."""
    grid = logits[:, ::GRID, ::GRID].flatten(1)
    above = grid > lo
    near = above & (grid < hi)
    return torch.stack([near.sum(1), above.sum(1)], dim=1)


def class_doubt(scores: torch.Tensor) -> torch.Tensor:
    """(2,) for (C, h, w) semantic class scores, on the review's grid: the mean over pixels of
    the winning class's share of the scores, and the share of pixels whose two best classes'
    shares differ by less than twice the review band."""
    grid = scores[:, ::GRID, ::GRID]
    shares = grid / grid.sum(0, keepdim=True).clamp(min=1e-12)
    if shares.shape[0] < 2:
        return torch.stack([shares.amax(0).mean(), torch.zeros((), device=scores.device)])
    top = shares.topk(2, dim=0).values
    return torch.stack([top[0].mean(), ((top[0] - top[1]) < 2 * BAND).float().mean()])


class Postprocessor:
    """Batched post-processing for one task; call it with a batch's outputs and original sizes."""

    def __init__(self, spec: PostprocessSpec, num_labels: int):
        self.spec = spec
        self.num_labels = num_labels
        # The times the host waited for the device (a few a batch, whatever its size).
        self.syncs = 0
        if spec.task not in ("semantic", "instance", "panoptic"):
            raise ValueError(f"unknown task {spec.task!r}")

    def __call__(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        sizes: list[tuple[int, int]],
        input_size: tuple[int, int] | None = None,
        layouts: list[Layout] | None = None,
    ) -> list[RawPrediction]:
        """Post-process one batch.

        ``class_logits`` (B, Q, C+1) and ``mask_logits`` (B, Q, h, w) are the model's outputs,
        ``sizes`` the original (H, W) of each image, ``input_size`` the model-input size (the
        canvas; by default the mask logits' own size), ``layouts`` where each image lies in the
        batch (by default image b is row b and fills its canvas).
        """
        # A local, not an attribute: two threads may post-process batches of two sizes at once.
        hf_canvas = self.spec.compat and not self.spec.eomt  # HF's EoMT code uses the input size
        canvas = tuple(HF_CANVAS if hf_canvas else input_size or mask_logits.shape[-2:])
        layouts = layouts or [Layout((b,)) for b in range(len(sizes))]
        if self.spec.task != "semantic" and any(layout.starts for layout in layouts):
            raise ValueError("images cut into crops are merged back for semantic segmentation only")
        run = getattr(self, f"_{self.spec.task}")
        return run(class_logits.float(), mask_logits.float(), sizes, canvas, layouts)

    @staticmethod
    def _region(tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
        """A (K, h, w) canvas tensor cut to the part the image fills (its padding cropped off)."""
        if layout.resized is None:
            return tensor
        return tensor[:, : layout.resized[0], : layout.resized[1]]

    def _image_logits(self, mask_logits: torch.Tensor, layout: Layout, queries, canvas) -> torch.Tensor:
        """(K, h, w) mask logits of an image's ``queries`` on its region of the canvas."""
        return self._region(self._canvas(mask_logits[layout.rows[0], queries], canvas), layout)

    def _allowed(self, size: int, device: torch.device) -> torch.Tensor:
        """(size,) booleans: True at the label ids --labels keeps."""
        allowed = np.zeros(size, dtype=bool)
        allowed[sorted(self.spec.keep_label_ids or ())] = True
        return host_to_device(allowed, device)

    @staticmethod
    def _canvas(mask_logits: torch.Tensor, canvas: tuple[int, ...]) -> torch.Tensor:
        """(K, h, w) mask logits at the canvas resolution."""
        if tuple(mask_logits.shape[-2:]) == canvas:
            return mask_logits
        return F.interpolate(mask_logits.unsqueeze(0), size=canvas, mode="bilinear", align_corners=False)[0]

    # -- semantic ---------------------------------------------------------------------------

    def _semantic_scores(self, probs, mask_logits, layout: Layout, canvas) -> torch.Tensor:
        """(C, h, w) class scores of one image at model scale: its canvas (EoMT: its padding
        cropped off, except in compat, as HF's EoMT code resizes the padded canvas whole), or
        its crops' scores averaged where they overlap (``merge_image_patches``)."""

        def scores(row: int) -> torch.Tensor:
            return torch.einsum("qc,qhw->chw", probs[row], self._canvas(mask_logits[row], canvas).sigmoid())

        if not layout.starts:
            whole = scores(layout.rows[0])
            return whole if self.spec.compat else self._region(whole, layout)
        height, width = layout.resized
        tall = height > width
        total = torch.zeros((probs.shape[-1], height, width), device=mask_logits.device)
        count = torch.zeros((1, height, width), device=mask_logits.device)
        for row, start in zip(layout.rows, layout.starts):
            crop = scores(row)
            end = start + (crop.shape[1] if tall else crop.shape[2])
            if tall:
                total[:, start:end] += crop
                count[:, start:end] += 1
            else:
                total[:, :, start:end] += crop
                count[:, :, start:end] += 1
        return total / count.clamp(min=1)

    def _semantic(self, class_logits, mask_logits, sizes, canvas, layouts):
        spec = self.spec
        probs = class_logits.softmax(-1)[..., :-1]
        num = self.num_labels
        void = semantic_void(num)
        filtering = spec.keep_label_ids is not None or spec.min_area > 0
        dtype = np.uint8 if num < 256 or (num == 256 and not filtering) else np.uint16
        to_host = _ToHost(mask_logits.device, self)
        fetched = []
        for (height, width), layout in zip(sizes, layouts):
            scores = self._semantic_scores(probs, mask_logits, layout, canvas)
            label_map = torch.empty((height, width), dtype=torch.int32, device=scores.device)
            areas = torch.zeros(num, dtype=torch.int64, device=scores.device)
            for r0, r1 in row_chunks(num, height, width, spec.chunk_elements):
                chunk = bilinear_rows(scores, height, width, r0, r1).argmax(0)
                label_map[r0:r1] = chunk
                areas += _counts(chunk.flatten(), num)
            kept = areas > 0
            if spec.keep_label_ids is not None:
                kept &= self._allowed(num, kept.device)
            if spec.min_area > 0:
                kept &= areas >= spec.min_area
            if filtering:
                lut = torch.where(kept, torch.arange(num, device=kept.device), torch.full_like(areas, void))
                label_map = lut[label_map]
            # Brought back in the smallest type that holds it (pinned host memory is kept).
            small = label_map.to(torch.uint8) if dtype == np.uint8 else label_map
            fetched.append((to_host(small), to_host(kept), to_host(class_doubt(scores))))
        to_host.wait()
        results = []
        for label_map, kept, doubt in fetched:
            ids = np.flatnonzero(kept.numpy()).astype(np.int32)
            confidence, undecided = doubt.numpy().tolist()
            review = review_score(len(ids), 1 - confidence, undecided, 0)
            results.append(
                RawPrediction(label_map.numpy().astype(dtype), ids, ids.copy(), None, review_score=review))
        return results

    # -- instance ---------------------------------------------------------------------------

    def _instance(self, class_logits, mask_logits, sizes, canvas, layouts):
        spec = self.spec
        threshold = self._mask_logit_threshold()
        top_scores, top_labels, top_queries = self._top_queries(class_logits, mask_logits.device)
        # First every image's query scores, then one wait for all of them: which queries are
        # kept is the host's decision, made once a batch.
        finals, bands = [], []
        lo, hi = self._band()
        for b, (size, layout) in enumerate(zip(sizes, layouts)):
            logits = self._image_logits(mask_logits, layout, top_queries[b], canvas)
            finals.append(top_scores[b] * self._query_mask_scores(logits, size, threshold))
            bands.append(band_counts(logits, lo, hi))
        to_host = _ToHost(mask_logits.device, self)
        final_host, labels_host, queries_host, bands_host = to_host.fetch(
            torch.stack(finals), top_labels, top_queries, torch.stack(bands))
        fetched = []
        for b, (size, layout) in enumerate(zip(sizes, layouts)):
            sel = np.flatnonzero(final_host[b] >= spec.score_threshold)
            sel = sel[np.argsort(-final_host[b, sel], kind="stable")]
            masks = self._instance_masks(mask_logits, layout, queries_host[b, sel], canvas, size, threshold)
            fetched.append((b, sel, *self._instance_maps(masks, to_host)))
        to_host.wait()
        results = []
        for b, sel, id_map, packed, extents, ok, cover in fetched:
            ok = ok.numpy()
            sel = sel[ok]
            width = sizes[b][1]
            near, around = bands_host[b, sel].sum(0) if len(sel) else (0, 0)
            covered, doubled = cover.numpy().tolist()
            doubts = score_doubt(final_host[b, sel], spec.score_threshold), share(near, around)
            results.append(
                RawPrediction(
                    id_map=id_map.numpy().astype(np.uint16),
                    ids=np.arange(1, len(sel) + 1, dtype=np.int32),
                    label_ids=labels_host[b, sel].astype(np.int32),
                    scores=final_host[b, sel].astype(np.float32),
                    masks=PackedMasks.from_rows(packed.numpy()[ok], width, extents.numpy()[ok]),
                    review_score=review_score(len(sel), *doubts, share(doubled, covered)),
                )
            )
        return results

    def _band(self) -> tuple[float, float]:
        """The review's undecided band around the mask threshold, as logits (HF's EoMT code's
        threshold in compat: logit 0)."""
        return mask_band(0.5 if self.spec.eomt and self.spec.compat else self.spec.mask_threshold)

    def _top_queries(self, class_logits, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(B, Q) scores, labels and query indices of each image's candidate instances."""
        num = self.num_labels
        scores = class_logits.softmax(-1)[..., :-1]
        if self.spec.keep_label_ids is not None:
            scores = scores * self._allowed(num, scores.device)
        if self.spec.eomt:
            # HF's EoMT: each query with its arg-max class.
            top_scores, top_labels = scores.max(-1)
            return top_scores, top_labels, torch.arange(scores.shape[1], device=device).expand_as(top_labels)
        # Top-k over (query, label) pairs with k = number of queries, as Mask2Former does.
        top_scores, top_index = scores.flatten(1).topk(scores.shape[1], dim=1)
        return top_scores, top_index % num, top_index // num

    def _query_mask_scores(self, logits, size: tuple[int, int], threshold: float) -> torch.Tensor:
        """(K,) mean mask probability of each query over its mask: at model scale, or (EoMT in
        compat, as HF's EoMT code) at the original size."""
        if self.spec.eomt and self.spec.compat:
            return self._full_size_mask_scores(logits, *size, threshold)
        binary = logits > threshold
        mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1)
        return mask_scores / (binary.flatten(1).sum(1) + 1e-6)

    def _instance_masks(
        self,
        mask_logits: torch.Tensor,
        layout: Layout,
        queries: np.ndarray,
        canvas: tuple[int, ...],
        size: tuple[int, int],
        threshold: float,
    ) -> torch.Tensor:
        """(K, H, W) booleans: the masks of an image's kept ``queries`` at its original size."""
        spec = self.spec
        height, width = size
        device = mask_logits.device
        if len(queries) == 0:
            return torch.zeros((0, height, width), dtype=torch.bool, device=device)
        # Only the kept queries' canvases: interpolation is per query.
        logits = self._image_logits(mask_logits, layout, host_to_device(queries, device), canvas)
        if spec.compat and not spec.eomt:
            # uint8, not float: a byte a pixel a mask, as the boolean result itself.
            small = (logits > threshold).to(torch.uint8).unsqueeze(0)
            return F.interpolate(small, size=(height, width), mode="nearest")[0] > 0
        masks = torch.empty((len(queries), height, width), dtype=torch.bool, device=device)
        for r0, r1 in row_chunks(len(queries), height, width, spec.chunk_elements):
            masks[:, r0:r1] = bilinear_rows(logits, height, width, r0, r1) > threshold
        return masks

    def _instance_maps(self, masks: torch.Tensor, to_host: _ToHost) -> tuple[torch.Tensor, ...]:
        """An image's id map, packed masks, their extents, which masks stay, and how many pixels
        the staying masks cover once and twice or more (the review's overlap), their copies to
        the host queued (not waited for)."""
        spec = self.spec
        k, height, width = masks.shape
        device = masks.device
        # Which masks stay (area, --max-instances) decided on the device, read back with the
        # rest: no wait here.
        ok = masks.flatten(1).sum(1) > max(0, spec.min_area - 1)
        if spec.max_instances is not None:
            ok &= ok.cumsum(0) <= spec.max_instances
        # The highest-scoring instance covering a pixel wins: rank N..1 among the kept
        # masks (0 for the others), keep the maximum, in row chunks: (N, H, W) int32 at
        # once is 4 bytes a pixel a mask (100 masks on a 12 MP photo: 4.8 GB).
        rank = ((ok.sum() - ok.cumsum(0) + 1) * ok).to(torch.int32).view(-1, 1, 1)
        count = ok.sum().to(torch.int32)
        id_map = torch.zeros((height, width), dtype=torch.int32, device=device)
        # The masks leave the device packed, an eighth of their size, with their extents,
        # so that the host only cuts out their boxes.
        packed = torch.empty((k, height, (width + 7) // 8), dtype=torch.uint8, device=device)
        cover = torch.zeros(2, dtype=torch.int64, device=device)
        for r0, r1 in row_chunks(k, height, width, spec.chunk_elements) if k else ():
            best = (masks[:, r0:r1] * rank).amax(0)
            id_map[r0:r1] = torch.where(best > 0, count + 1 - best, 0)
            packed[:, r0:r1] = pack_rows(masks[:, r0:r1])
            hits = (masks[:, r0:r1] & ok.view(-1, 1, 1)).sum(0, dtype=torch.int32)
            cover += torch.stack([(hits > 0).sum(), (hits > 1).sum()])
        extents = row_extents(packed)
        # int16 holds the ids (at most one a query) in half the pinned memory of int32.
        id_map = id_map.to(torch.int16)
        return to_host(id_map), to_host(packed), to_host(extents), to_host(ok), to_host(cover)

    def _mask_logit_threshold(self) -> float:
        """The mask threshold as a logit (HF's EoMT code thresholds logits at 0, whatever the
        mask threshold: compat does too)."""
        return 0.0 if self.spec.eomt and self.spec.compat else logit(self.spec.mask_threshold)

    def _full_size_mask_scores(self, logits, height, width, threshold) -> torch.Tensor:
        """(K,) mean mask probabilities over each mask at the original size, in row chunks (HF's
        EoMT instance scores; the default takes them at model scale)."""
        total = torch.zeros(logits.shape[0], device=logits.device)
        count = torch.zeros(logits.shape[0], device=logits.device)
        for r0, r1 in row_chunks(logits.shape[0], height, width, self.spec.chunk_elements):
            chunk = bilinear_rows(logits, height, width, r0, r1)
            binary = chunk > threshold
            total += (chunk.sigmoid() * binary).flatten(1).sum(1)
            count += binary.flatten(1).sum(1)
        return total / (count + 1e-6)

    # -- panoptic ---------------------------------------------------------------------------

    def _panoptic(self, class_logits, mask_logits, sizes, canvas, layouts):
        spec = self.spec
        num = self.num_labels
        pred_scores, pred_labels = class_logits.softmax(-1).max(-1)
        keep = (pred_labels != num) & (pred_scores > spec.score_threshold)
        if spec.keep_label_ids is not None:
            keep &= self._allowed(num + 1, keep.device)[pred_labels]
        # Three waits a batch: the kept queries; each image's areas (Mask2Former's merge is
        # decided on the host, on per-query vectors); the maps.
        to_host = _ToHost(mask_logits.device, self)
        keep_host, scores_host, labels_host = to_host.fetch(keep, pred_scores, pred_labels)
        owners = []
        for b, (size, layout) in enumerate(zip(sizes, layouts)):
            sel = np.flatnonzero(keep_host[b])
            if len(sel) == 0:
                owners.append(None)
                continue
            sel_device = host_to_device(sel, mask_logits.device)
            logits = self._image_logits(mask_logits, layout, sel_device, canvas)
            band = to_host(band_counts(logits, *self._band()))
            ownership = self._panoptic_owner(logits, pred_scores[b, sel_device], size, to_host)
            owners.append((sel, band, *ownership))
        to_host.wait()
        fetched = []
        for b, entry in enumerate(owners):
            if entry is None:
                fetched.append(None)
                continue
            sel, band, owner, inside, areas, original, final = entry
            lut, ids, labels, seg_scores = self._merge(
                areas.numpy(), original.numpy(), labels_host[b, sel], scores_host[b, sel],
                final.numpy() if final is not None else None,
            )
            review = self._panoptic_review(lut > 0, band.numpy(), areas.numpy(), original.numpy(), seg_scores)
            # int16: ids, one a query at most, in half the pinned memory of int32.
            id_map = host_to_device(lut.astype(np.int16), owner.device)[owner.long()]
            if inside is not None:
                id_map = torch.where(inside, id_map, 0)
            fetched.append((to_host(id_map), ids, labels, seg_scores, review))
        to_host.wait()
        return [_panoptic_prediction(size, entry) for size, entry in zip(sizes, fetched)]

    def _panoptic_review(self, used: np.ndarray, band: np.ndarray, areas: np.ndarray,
                         original: np.ndarray, seg_scores: np.ndarray) -> float:
        """An image's panoptic review score from its kept queries' (K,) vectors; ``used``: the
        queries that became segments. Overlap: the share of the used queries' own pixels that
        other segments took, relative to the share the overlap threshold lets one lose."""
        near, around = band[used].sum(0) if used.any() else (0, 0)
        own = original[used].astype(np.float64)
        lost = (own - np.minimum(areas[used], own)).sum()
        d_overlap = share(lost, own.sum()) / max(1.0 - self.spec.overlap_threshold, 1e-6)
        return review_score(len(seg_scores), score_doubt(seg_scores, self.spec.score_threshold),
                            share(near, around), d_overlap)

    def _panoptic_owner(self, logits, scores, size: tuple[int, int], to_host: _ToHost) -> tuple:
        """Which of an image's K kept queries owns each pixel, and the per-query areas the merge
        decides on: (owner, EoMT's pass mask or None, areas, original areas, EoMT's final areas
        or None), the areas' copies to the host queued, not waited for. ``logits``: the kept
        queries' (K, h, w) mask logits; ``scores``: their (K,) class scores."""
        spec = self.spec
        height, width = size
        device = logits.device
        k = logits.shape[0]
        # Mask2Former resizes probabilities; HF's EoMT code resizes logits, then the sigmoid.
        maps = logits if spec.eomt else logits.sigmoid()
        # int16: query positions (k < 32768), a quarter of argmax's int64, held for the batch.
        owner = torch.empty((height, width), dtype=torch.int16, device=device)
        # EoMT: whether the winning query's own probability reaches the mask threshold.
        # Every row is written below, chunk by chunk.
        inside = torch.empty((height, width), dtype=torch.bool, device=device) if spec.eomt else None
        areas = torch.zeros(k, dtype=torch.int64, device=device)
        original = torch.zeros(k, dtype=torch.int64, device=device)
        final = torch.zeros(k, dtype=torch.int64, device=device)
        for r0, r1 in row_chunks(k, height, width, spec.chunk_elements):
            probs = bilinear_rows(maps, height, width, r0, r1)
            if spec.eomt:
                probs = probs.sigmoid_()
            weighted = probs * scores.view(-1, 1, 1)
            chunk = weighted.argmax(0)
            owner[r0:r1] = chunk
            areas += _counts(chunk.flatten(), k)
            if spec.eomt:
                # HF's EoMT code compares each query's own probability with the threshold,
                # and keeps only the pixels of a query's area that pass it.
                original += (probs >= spec.mask_threshold).flatten(1).sum(1)
                passed = probs.gather(0, chunk.unsqueeze(0))[0] >= spec.mask_threshold
                inside[r0:r1] = passed
                final += _counts(torch.where(passed, chunk, k).flatten(), k + 1)[:k]
            else:
                # HF compares the score-weighted probabilities with the mask threshold.
                original += (weighted >= spec.mask_threshold).flatten(1).sum(1)
        return owner, inside, to_host(areas), to_host(original), to_host(final) if spec.eomt else None

    def _merge(self, areas, original, labels, scores, final=None):
        """Mask2Former's panoptic merge on per-query vectors: which query becomes which segment.
        ``final`` (EoMT): each query's area where its probability passes the threshold, which
        must not be empty; a segment's score is then its first query's, as HF's EoMT code has it."""
        spec = self.spec
        lut = np.zeros(len(areas), dtype=np.int32)
        fused: dict[int, int] = {}
        current = 0
        for q in range(len(areas)):
            if not (areas[q] > 0 and original[q] > 0 and areas[q] / original[q] > spec.overlap_threshold):
                continue
            if final is not None and final[q] <= 0:
                continue
            label = int(labels[q])
            if spec.compat and not spec.eomt:
                # HF's numbering as it is: after reusing a fused id it counts on from that id.
                current = fused[label] if label in fused else current + 1
                seg_id = current
            else:
                if label in fused:
                    seg_id = fused[label]
                else:
                    current += 1
                    seg_id = current
            lut[q] = seg_id
            if label in spec.fuse_label_ids:
                fused[label] = seg_id
        seg_ids = sorted(set(lut[lut > 0].tolist()))
        # A segment's area: its pixels in the map (EoMT: only those that pass the threshold).
        shown = final if final is not None else areas
        seg_area = {s: int(shown[lut == s].sum()) for s in seg_ids}
        drop = [s for s in seg_ids if seg_area[s] < spec.min_area]
        # A segment's score: its best query's (Mask2Former), its first query's (HF's EoMT code).
        pick = (lambda v: v[0]) if final is not None else np.max
        if spec.max_instances is not None:
            best = {s: float(pick(scores[lut == s])) for s in seg_ids if s not in drop}
            ranked = sorted(best, key=lambda s: -best[s])
            drop += ranked[spec.max_instances:]
        if drop:
            # Dropped segments become void and the rest are renumbered 1..N.
            lut[np.isin(lut, drop)] = 0
            renumber = np.zeros(int(lut.max()) + 1, dtype=np.int32)
            kept = np.unique(lut[lut > 0])
            renumber[kept] = np.arange(1, len(kept) + 1)
            lut = renumber[lut]
        seg_ids = sorted(set(lut[lut > 0].tolist()))
        ids = np.array(seg_ids, dtype=np.int32)
        seg_labels = np.array([int(labels[np.flatnonzero(lut == s)[0]]) for s in seg_ids], dtype=np.int32)
        seg_scores = np.array([float(pick(scores[lut == s])) for s in seg_ids], dtype=np.float32)
        return lut, ids, seg_labels, seg_scores
