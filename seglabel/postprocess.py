"""Turn Mask2Former outputs into label maps at each image's original resolution, on the device.

The semantics are those of Hugging Face's ``post_process_{semantic,instance,panoptic}_segmentation``
(and of Mask2Former's own inference code), without their limits: HF resizes every mask to a
hard-coded 384×384 first, loops over queries with a host synchronisation each, and builds the
canvas on the CPU. Here the work stays on the device, the per-query decisions are made on small
vectors, and the full-resolution maps are produced in row chunks so that memory stays bounded for
large photos. The host still waits on the device several times per image: at each selection of
kept queries (``nonzero``, boolean indexing), twice per row chunk (``bilinear_rows`` reads its
source rows' bounds) and once per array brought back (semantic about 3 waits, instance and
panoptic about 6–8, plus 2 per chunk).

Masks are first brought to the model-input resolution (the "canvas"), as Mask2Former's own
inference does, then to the original size. ``compat=True`` reproduces HF's results as they are:
its canvas is a fixed 384×384 whatever the input was (padding included), its instance masks are
thresholded there and enlarged with nearest-neighbour, and its panoptic numbering is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

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


@dataclass
class RawPrediction:
    """One image's result before encoding.

    ``id_map`` holds segment ids (semantic: label ids) at the original resolution; ``ids``,
    ``label_ids`` and ``scores`` describe the segments; ``masks`` holds the exact, possibly
    overlapping, instance masks (instance task only).
    """

    id_map: np.ndarray
    ids: np.ndarray
    label_ids: np.ndarray
    scores: np.ndarray | None
    masks: np.ndarray | None = None


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
    lo, hi = int(y0[0]), int(y1[-1])
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


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


class Postprocessor:
    """Batched post-processing for one task; call it with a batch's outputs and original sizes."""

    def __init__(self, spec: PostprocessSpec, num_labels: int):
        self.spec = spec
        self.num_labels = num_labels
        if spec.task not in ("semantic", "instance", "panoptic"):
            raise ValueError(f"unknown task {spec.task!r}")

    def __call__(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        sizes: list[tuple[int, int]],
        input_size: tuple[int, int] | None = None,
    ) -> list[RawPrediction]:
        """Post-process one batch.

        ``class_logits`` (B, Q, C+1) and ``mask_logits`` (B, Q, h, w) are the model's outputs,
        ``sizes`` the original (H, W) of each image, ``input_size`` the model-input size (the
        canvas; by default the mask logits' own size).
        """
        # A local, not an attribute: two threads may post-process batches of two sizes at once.
        canvas = tuple(HF_CANVAS if self.spec.compat else input_size or mask_logits.shape[-2:])
        run = getattr(self, f"_{self.spec.task}")
        return run(class_logits.float(), mask_logits.float(), sizes, canvas)

    @staticmethod
    def _canvas(mask_logits: torch.Tensor, canvas: tuple[int, ...]) -> torch.Tensor:
        """(K, h, w) mask logits at the canvas resolution."""
        if tuple(mask_logits.shape[-2:]) == canvas:
            return mask_logits
        return F.interpolate(mask_logits.unsqueeze(0), size=canvas, mode="bilinear", align_corners=False)[0]

    # -- semantic ---------------------------------------------------------------------------

    def _semantic(self, class_logits, mask_logits, sizes, canvas):
        spec = self.spec
        probs = class_logits.softmax(-1)[..., :-1]
        num = self.num_labels
        void = semantic_void(num)
        filtering = spec.keep_label_ids is not None or spec.min_area > 0
        dtype = np.uint8 if num < 256 or (num == 256 and not filtering) else np.uint16
        results = []
        for b, (height, width) in enumerate(sizes):
            scores = torch.einsum("qc,qhw->chw", probs[b], self._canvas(mask_logits[b], canvas).sigmoid())
            label_map = torch.empty((height, width), dtype=torch.int32, device=scores.device)
            for r0, r1 in row_chunks(num, height, width, spec.chunk_elements):
                label_map[r0:r1] = bilinear_rows(scores, height, width, r0, r1).argmax(0)
            areas = torch.bincount(label_map.flatten(), minlength=num)
            present = areas > 0
            kept = present.clone()
            if spec.keep_label_ids is not None:
                allowed = torch.zeros(num, dtype=torch.bool, device=kept.device)
                allowed[list(spec.keep_label_ids)] = True
                kept &= allowed
            if spec.min_area > 0:
                kept &= areas >= spec.min_area
            if filtering:
                lut = torch.where(kept, torch.arange(num, device=kept.device), torch.full_like(areas, void))
                label_map = lut[label_map]
            ids = torch.nonzero(kept).flatten().cpu().numpy().astype(np.int32)
            results.append(RawPrediction(label_map.cpu().numpy().astype(dtype), ids, ids.copy(), None))
        return results

    # -- instance ---------------------------------------------------------------------------

    def _instance(self, class_logits, mask_logits, sizes, canvas):
        spec = self.spec
        _, num_queries, _ = class_logits.shape
        num = self.num_labels
        scores = class_logits.softmax(-1)[..., :-1]
        if spec.keep_label_ids is not None:
            allowed = torch.zeros(num, dtype=torch.bool, device=scores.device)
            allowed[list(spec.keep_label_ids)] = True
            scores = scores * allowed
        # Top-k over (query, label) pairs with k = number of queries, as Mask2Former does.
        top_scores, top_index = scores.flatten(1).topk(num_queries, dim=1)
        top_labels = top_index % num
        top_queries = top_index // num
        threshold = _logit(spec.mask_threshold)
        results = []
        for b, (height, width) in enumerate(sizes):
            logits = self._canvas(mask_logits[b, top_queries[b]], canvas)
            binary = logits > threshold
            mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            final = top_scores[b] * mask_scores
            sel = torch.nonzero(final >= spec.score_threshold).flatten()
            sel = sel[torch.argsort(final[sel], descending=True, stable=True)]
            if len(sel) == 0:
                masks = torch.zeros((0, height, width), dtype=torch.bool, device=logits.device)
            elif spec.compat:
                # uint8, not float: a byte a pixel a mask, as the boolean result itself.
                small = binary[sel].to(torch.uint8).unsqueeze(0)
                masks = F.interpolate(small, size=(height, width), mode="nearest")[0] > 0
            else:
                masks = torch.empty((len(sel), height, width), dtype=torch.bool, device=logits.device)
                for r0, r1 in row_chunks(len(sel), height, width, spec.chunk_elements):
                    masks[:, r0:r1] = bilinear_rows(logits[sel], height, width, r0, r1) > threshold
            areas = masks.flatten(1).sum(1)
            ok = areas > max(0, spec.min_area - 1)
            masks, sel = masks[ok], sel[ok]
            if spec.max_instances is not None:
                masks, sel = masks[: spec.max_instances], sel[: spec.max_instances]
            n = len(sel)
            # The highest-scoring instance covering a pixel wins: rank N..1, keep the maximum.
            # In row chunks: (N, H, W) int32 at once is 4 bytes a pixel a mask (100 masks on a
            # 12 MP photo: 4.8 GB of device memory).
            rank = torch.arange(n, 0, -1, device=masks.device, dtype=torch.int32).view(-1, 1, 1)
            id_map = torch.zeros((height, width), dtype=torch.int32, device=masks.device)
            for r0, r1 in row_chunks(n, height, width, spec.chunk_elements) if n else ():
                best = (masks[:, r0:r1] * rank).amax(0)
                id_map[r0:r1] = torch.where(best > 0, n + 1 - best, 0)
            results.append(
                RawPrediction(
                    id_map=id_map.cpu().numpy().astype(np.uint16),
                    ids=np.arange(1, n + 1, dtype=np.int32),
                    label_ids=top_labels[b, sel].cpu().numpy().astype(np.int32),
                    scores=final[sel].cpu().numpy().astype(np.float32),
                    masks=masks.cpu().numpy(),
                )
            )
        return results

    # -- panoptic ---------------------------------------------------------------------------

    def _panoptic(self, class_logits, mask_logits, sizes, canvas):
        spec = self.spec
        num = self.num_labels
        pred_scores, pred_labels = class_logits.softmax(-1).max(-1)
        keep = (pred_labels != num) & (pred_scores > spec.score_threshold)
        if spec.keep_label_ids is not None:
            allowed = torch.zeros(num + 1, dtype=torch.bool, device=keep.device)
            allowed[list(spec.keep_label_ids)] = True
            keep &= allowed[pred_labels]
        results = []
        for b, (height, width) in enumerate(sizes):
            sel = torch.nonzero(keep[b]).flatten()
            k = len(sel)
            if k == 0:
                empty = np.zeros((height, width), dtype=np.int32)
                results.append(
                    RawPrediction(
                        empty, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
                    )
                )
                continue
            probs, scores = self._canvas(mask_logits[b, sel], canvas).sigmoid(), pred_scores[b, sel]
            owner = torch.empty((height, width), dtype=torch.int64, device=probs.device)
            areas = torch.zeros(k, dtype=torch.int64, device=probs.device)
            original = torch.zeros(k, dtype=torch.int64, device=probs.device)
            for r0, r1 in row_chunks(k, height, width, spec.chunk_elements):
                weighted = bilinear_rows(probs, height, width, r0, r1) * scores.view(-1, 1, 1)
                owner[r0:r1] = weighted.argmax(0)
                areas += torch.bincount(owner[r0:r1].flatten(), minlength=k)
                # HF compares the score-weighted probabilities with the mask threshold.
                original += (weighted >= spec.mask_threshold).flatten(1).sum(1)
            lut, ids, labels, seg_scores = self._merge(
                areas.cpu().numpy(),
                original.cpu().numpy(),
                pred_labels[b, sel].cpu().numpy(),
                scores.cpu().numpy(),
            )
            id_map = torch.from_numpy(lut).to(owner.device)[owner]
            results.append(RawPrediction(id_map.cpu().numpy().astype(np.int32), ids, labels, seg_scores))
        return results

    def _merge(self, areas, original, labels, scores):
        """Mask2Former's panoptic merge on per-query vectors: which query becomes which segment."""
        spec = self.spec
        lut = np.zeros(len(areas), dtype=np.int32)
        fused: dict[int, int] = {}
        current = 0
        for q in range(len(areas)):
            if not (areas[q] > 0 and original[q] > 0 and areas[q] / original[q] > spec.overlap_threshold):
                continue
            label = int(labels[q])
            if spec.compat:
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
        seg_area = {s: int(areas[lut == s].sum()) for s in seg_ids}
        drop = [s for s in seg_ids if seg_area[s] < spec.min_area]
        if spec.max_instances is not None:
            best = {s: float(scores[lut == s].max()) for s in seg_ids if s not in drop}
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
        seg_scores = np.array([float(scores[lut == s].max()) for s in seg_ids], dtype=np.float32)
        return lut, ids, seg_labels, seg_scores
