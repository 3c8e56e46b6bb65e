"""Post-processing against Hugging Face's own, on the same model outputs.

The outputs are made here (smooth random mask fields, peaked class scores) so that every image
carries many overlapping segments; the canvas is deliberately not 384×384 and not square, so
that HF's resize of the (padded) canvas is exercised.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Mask2FormerImageProcessorPil

from seglabel.core.masks import PackedMasks
from seglabel.engine.postprocess import Postprocessor, PostprocessSpec, bilinear_rows, pack_rows, row_extents

NUM_LABELS = 6
SIZES = [(120, 180), (37, 200), (1, 40), (300, 7)]


def fake_outputs(seed: int = 0, batch: int = len(SIZES), queries: int = 24, canvas=(48, 64), broad: int = 6):
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, NUM_LABELS + 1, generator=g) * 2
    # Most queries pick one label with confidence; a few stay unsure or choose "no object".
    picks = torch.randint(0, NUM_LABELS + 1, (batch, queries), generator=g)
    class_logits.scatter_add_(2, picks[..., None], torch.full((batch, queries, 1), 7.0))
    # Each coarse cell belongs to one query (a rough partition, as panoptic outputs are); the
    # last queries get broad random fields so that instances also overlap and hide each other.
    owner = torch.randint(0, queries, (batch, 1, 6, 8), generator=g)
    coarse = torch.where(owner == torch.arange(queries).view(1, -1, 1, 1), 6.0, -6.0)
    coarse += torch.randn(batch, queries, 6, 8, generator=g) * 2
    if broad:
        coarse[:, -broad:] = torch.randn(batch, broad, 6, 8, generator=g) * 6 + 2
    mask_logits = F.interpolate(coarse, size=canvas, mode="bilinear", align_corners=False)
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


@pytest.fixture(scope="module")
def hf():
    return Mask2FormerImageProcessorPil()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def test_bilinear_rows_equals_interpolate():
    x = torch.randn(5, 13, 17)
    full = F.interpolate(x[None], size=(101, 29), mode="bilinear", align_corners=False)[0]
    chunks = torch.cat([bilinear_rows(x, 101, 29, r0, min(101, r0 + 7)) for r0 in range(0, 101, 7)], dim=1)
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=1e-5)
    # Shrinking (1-pixel-wide outputs) follows the same formula.
    torch.testing.assert_close(
        bilinear_rows(x, 1, 3, 0, 1),
        F.interpolate(x[None], size=(1, 3), mode="bilinear")[0],
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_compat_semantic_matches_hf(hf, seed):
    out = fake_outputs(seed)
    ours = Postprocessor(PostprocessSpec("semantic", compat=True), NUM_LABELS)(
        out.class_queries_logits, out.masks_queries_logits, SIZES
    )
    theirs = hf.post_process_semantic_segmentation(out, target_sizes=SIZES)
    for o, t, size in zip(ours, theirs, SIZES):
        assert o.id_map.shape == size
        assert (o.id_map == t.numpy()).mean() == 1.0
        assert sorted(o.ids) == sorted(np.unique(o.id_map))


@pytest.mark.parametrize("threshold", [0.5, 0.2])
def test_compat_instance_matches_hf(hf, threshold):
    out = fake_outputs(2)
    ours = Postprocessor(PostprocessSpec("instance", score_threshold=threshold, compat=True), NUM_LABELS)(
        out.class_queries_logits, out.masks_queries_logits, SIZES
    )
    theirs = hf.post_process_instance_segmentation(
        out, threshold=threshold, target_sizes=SIZES, return_binary_maps=True
    )
    total = 0
    for o, t in zip(ours, theirs):
        info = t["segments_info"]
        assert len(o.ids) == len(info)
        total += len(info)
        unmatched = list(range(len(o.ids)))
        for j, seg in enumerate(info):
            hf_mask = t["segmentation"][j].numpy() > 0
            match = [
                i for i in unmatched
                if o.label_ids[i] == seg["label_id"] and abs(o.scores[i] - seg["score"]) < 1e-6
                and iou(o.masks.unpack()[i], hf_mask) == 1.0
            ]
            assert match, f"HF segment {seg} has no counterpart"
            unmatched.remove(match[0])
    assert total >= 8  # the comparison covered real segments


def test_compat_panoptic_matches_hf(hf):
    out = fake_outputs(3, broad=0)
    fuse = {0, 4}
    ours = Postprocessor(
        PostprocessSpec("panoptic", score_threshold=0.3, compat=True, fuse_label_ids=frozenset(fuse)),
        NUM_LABELS,
    )(out.class_queries_logits, out.masks_queries_logits, SIZES)
    theirs = hf.post_process_panoptic_segmentation(
        out, threshold=0.3, label_ids_to_fuse=fuse, target_sizes=SIZES
    )
    total = 0
    for o, t in zip(ours, theirs):
        hf_map = t["segmentation"].numpy()
        if not t["segments_info"]:
            assert len(o.ids) == 0
            continue
        assert (o.id_map == hf_map).mean() == 1.0
        # HF lists a fused segment once per query, and its numbering can give two segments the
        # same id (it counts on from a reused fused id); compat keeps that, one record per id.
        hf_segments: dict[int, list[dict]] = {}
        for seg in t["segments_info"]:
            hf_segments.setdefault(seg["id"], []).append(seg)
        hf_segments = {k: v for k, v in hf_segments.items() if (hf_map == k).any()}
        assert sorted(o.ids) == sorted(hf_segments)
        for i, seg_id in enumerate(o.ids):
            entries = hf_segments[seg_id]
            assert o.label_ids[i] in {e["label_id"] for e in entries}
            assert any(abs(o.scores[i] - e["score"]) < 1e-6 for e in entries)
            assert iou(o.id_map == seg_id, hf_map == seg_id) == 1.0
        total += len(o.ids)
    assert total >= 4


def test_default_instance_numbering_and_overlaps():
    out = fake_outputs(4)
    results = Postprocessor(PostprocessSpec("instance", score_threshold=0.2), NUM_LABELS)(
        out.class_queries_logits, out.masks_queries_logits, SIZES, (48, 64)
    )
    hidden_seen = False
    for r in results:
        n = len(r.ids)
        masks = r.masks.unpack()  # as the Segmenter ships them: packed
        assert masks.shape == (n, *r.id_map.shape)
        assert list(r.ids) == list(range(1, n + 1))
        assert all(np.diff(r.scores) <= 0), "ids must be numbered by descending score"
        assert r.id_map.dtype == np.uint16
        for i in range(n):
            # Every pixel of segment i+1 lies inside its exact mask, and no higher-scoring mask
            # covers it; every pixel of its mask not owned by it belongs to a better segment.
            owned = r.id_map == i + 1
            assert not (owned & ~masks[i]).any()
            assert not (owned & masks[:i].any(0)).any()
            lost = masks[i] & ~owned
            assert (r.id_map[lost] < i + 1).all() and (r.id_map[lost] > 0).all()
            hidden_seen |= masks[i].any() and not owned.any()
        assert ((r.id_map > 0) == masks.any(0)).all() if n else (r.id_map == 0).all()
    assert sum(len(r.ids) for r in results) >= 8
    assert hidden_seen, "no fully hidden instance in the sample: the listing rule is untested"


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_row_chunks_change_nothing(task):
    """Full-resolution work in chunks of a few rows (bounded device memory for big photos with
    many segments) gives exactly the maps and segments of one chunk."""
    out = fake_outputs(5, broad=0 if task == "panoptic" else 6)
    spec = PostprocessSpec(task, score_threshold=0.2, overlap_threshold=0.5)
    whole, chunked = (
        Postprocessor(dataclasses.replace(spec, chunk_elements=budget), NUM_LABELS)(
            out.class_queries_logits, out.masks_queries_logits, SIZES, (48, 64)
        )
        for budget in (1 << 30, 500)
    )
    assert sum(len(r.ids) for r in whole) >= 8
    for a, b in zip(whole, chunked):
        assert a.id_map.dtype == b.id_map.dtype and np.array_equal(a.id_map, b.id_map)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.label_ids, b.label_ids)
        if task == "instance":
            assert np.array_equal(a.masks.unpack(), b.masks.unpack())


@pytest.mark.parametrize("task, waits", [("semantic", 1), ("instance", 2), ("panoptic", 3)])
def test_the_host_waits_a_few_times_a_batch_not_per_image(task, waits):
    """The waits for the device are counted per batch: the same for one image as for four, and
    for one row chunk as for many."""
    out = fake_outputs(5, broad=0 if task == "panoptic" else 6)
    for budget in (1 << 30, 500):
        post = Postprocessor(PostprocessSpec(task, score_threshold=0.2, chunk_elements=budget), NUM_LABELS)
        results = post(out.class_queries_logits, out.masks_queries_logits, SIZES, (48, 64))
        assert post.syncs == waits and sum(len(r.ids) for r in results) >= 4
        post(out.class_queries_logits[:1], out.masks_queries_logits[:1], SIZES[:1], (48, 64))
        assert post.syncs == 2 * waits


def counting_syncs(post: Postprocessor, *args):
    """``post(*args)`` on CUDA, checking that every synchronising call torch reports is one of
    the waits the post-processor counts."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = post(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronising = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(synchronising) <= post.syncs, [str(w.message) for w in synchronising]
    return result


@pytest.mark.gpu
@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_cuda_post_processing_waits_only_where_counted(task):
    """On a GPU every synchronising call torch sees is one of the counted waits (no per-image
    ``nonzero``, ``.cpu()`` or ``bincount``), and the maps agree with the CPU's."""

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = fake_outputs(5, broad=0 if task == "panoptic" else 6)
    spec = PostprocessSpec(task, score_threshold=0.2, overlap_threshold=0.5, chunk_elements=2000)
    cpu = Postprocessor(spec, NUM_LABELS)(out.class_queries_logits, out.masks_queries_logits, SIZES, (48, 64))
    post = Postprocessor(spec, NUM_LABELS)
    class_logits, mask_logits = out.class_queries_logits.cuda(), out.masks_queries_logits.cuda()
    gpu = counting_syncs(post, class_logits, mask_logits, SIZES, (48, 64))
    for a, b in zip(cpu, gpu):
        assert a.id_map.shape == b.id_map.shape and a.id_map.dtype == b.id_map.dtype
        assert (a.id_map == b.id_map).mean() >= 0.98


@pytest.mark.parametrize("width", [1, 7, 8, 53, 64])
def test_masks_packed_on_the_device_are_numpys_packbits(width):
    """The device's row packing is numpy's ``packbits(axis=-1)`` bit for bit, its extents those
    the host finds, and the masks cut from it are the masks: empty, full, one-pixel, ragged."""
    rng = np.random.default_rng(width)
    masks = rng.random((6, 23, width)) > 0.6
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, 22, width - 1] = True
    masks[3] = False
    masks[3, 4:9, width // 2 :] = True
    rows = pack_rows(torch.from_numpy(masks)).numpy()
    assert rows.dtype == np.uint8 and np.array_equal(rows, np.packbits(masks, axis=-1))
    extents = row_extents(torch.from_numpy(rows)).numpy()
    last_byte = (width - 1) // 8
    assert extents[0].tolist() == [-1] * 4 and extents[2].tolist() == [22, 22, last_byte, last_byte]
    on_device = PackedMasks.from_rows(rows, width, extents)
    on_host = PackedMasks.pack(masks)
    assert np.array_equal(on_device.boxes, on_host.boxes) and np.array_equal(on_device.bits, on_host.bits)
    assert np.array_equal(on_device.unpack(), masks)


def test_panoptic_fuses_stuff_only():
    out = fake_outputs(5, broad=0)
    stuff = frozenset({0, 1, 2})
    results = Postprocessor(
        PostprocessSpec("panoptic", score_threshold=0.3, overlap_threshold=0.5, fuse_label_ids=stuff),
        NUM_LABELS,
    )(out.class_queries_logits, out.masks_queries_logits, SIZES, (48, 64))
    thing_repeats = 0
    for r in results:
        labels = list(r.label_ids)
        for label in stuff:
            assert labels.count(label) <= 1, "a stuff label must be one segment per image"
        thing_repeats += sum(labels.count(lbl) - 1 for lbl in set(labels) - stuff)
        assert list(r.ids) == list(range(1, len(r.ids) + 1))
        assert set(np.unique(r.id_map)) - {0} == set(r.ids)
    assert thing_repeats >= 1, "no repeated thing label in the sample: fusing is untested"


def test_filters_labels_min_area_max_instances():
    out = fake_outputs(6)
    base = Postprocessor(PostprocessSpec("instance", score_threshold=0.2), NUM_LABELS)(
        out.class_queries_logits, out.masks_queries_logits, SIZES[:1], (48, 64)
    )[0]
    keep = frozenset({int(base.label_ids[0])})
    only = Postprocessor(PostprocessSpec("instance", score_threshold=0.2, keep_label_ids=keep), NUM_LABELS)(
        out.class_queries_logits, out.masks_queries_logits, SIZES[:1], (48, 64)
    )[0]
    assert len(only.ids) >= 1 and set(only.label_ids) == set(keep)
    capped = Postprocessor(PostprocessSpec("instance", score_threshold=0.2, max_instances=2), NUM_LABELS)(
        out.class_queries_logits, out.masks_queries_logits, SIZES[:1], (48, 64)
    )[0]
    assert len(capped.ids) == 2 and np.allclose(capped.scores, base.scores[:2])
    areas = base.masks.unpack().reshape(len(base.ids), -1).sum(1)
    cut = int(np.median(areas)) + 1
    big = Postprocessor(PostprocessSpec("instance", score_threshold=0.2, min_area=cut), NUM_LABELS)(
        out.class_queries_logits, out.masks_queries_logits, SIZES[:1], (48, 64)
    )[0]
    assert (
        len(big.ids) == int((areas >= cut).sum())
        and (big.masks.unpack().reshape(len(big.ids), -1).sum(1) >= cut).all()
    )
    sem = Postprocessor(PostprocessSpec("semantic", keep_label_ids=frozenset({1})), NUM_LABELS)(
        out.class_queries_logits, out.masks_queries_logits, SIZES[:1], (48, 64)
    )[0]
    assert set(np.unique(sem.id_map)) <= {1, 255} and list(sem.ids) in ([1], [])


@pytest.mark.parametrize("task", ["instance", "panoptic", "semantic"])
@pytest.mark.parametrize("compat", [False, True])
def test_nothing_above_threshold_gives_an_empty_map(task, compat):
    out = fake_outputs(7)
    results = Postprocessor(PostprocessSpec(task, score_threshold=1.0, compat=compat), NUM_LABELS)(
        out.class_queries_logits, out.masks_queries_logits, SIZES, (48, 64)
    )
    for r, size in zip(results, SIZES):
        assert r.id_map.shape == size
        if task != "semantic":  # semantic has no threshold: every pixel gets a label
            assert len(r.ids) == 0 and not r.id_map.any()


@pytest.mark.gpu
@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_cuda_eomt_post_processing_and_segmenter(task, eomt_checkpoints):
    """EoMT's post-processing on a GPU: its waits are the counted ones and its maps the CPU's;
    the tiny EoMT Segmenter on CUDA in each dtype (fp32 agreeing with the CPU's maps)."""

    from transformers.image_transforms import get_size_with_aspect_ratio

    from seglabel import Segmenter
    from seglabel.engine.preprocess import Layout

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = fake_outputs(6, canvas=(16, 16), broad=0 if task == "panoptic" else 6)
    layouts = [Layout((b,), tuple(get_size_with_aspect_ratio(s, 64, 64))) for b, s in enumerate(SIZES)]
    spec = PostprocessSpec(task, score_threshold=0.2, overlap_threshold=0.5, chunk_elements=2000,
                           family="eomt")
    cpu = Postprocessor(spec, NUM_LABELS)(out.class_queries_logits, out.masks_queries_logits, SIZES, (64, 64),
                                          layouts)
    post = Postprocessor(spec, NUM_LABELS)
    class_logits, mask_logits = out.class_queries_logits.cuda(), out.masks_queries_logits.cuda()
    gpu = counting_syncs(post, class_logits, mask_logits, SIZES, (64, 64), layouts)
    for a, b in zip(cpu, gpu):
        assert (a.id_map == b.id_map).mean() >= 0.98
    rng = np.random.default_rng(0)
    sizes = ((300, 451, 3), (128, 128, 3), (90, 200, 3))
    images = [rng.integers(0, 255, size, dtype=np.uint8) for size in sizes]
    reference = Segmenter(str(eomt_checkpoints[task]), device="cpu", score_threshold=0.3)(images)
    for dtype in ("fp32", "bf16", "fp16"):
        seg = Segmenter(str(eomt_checkpoints[task]), device="cuda", dtype=dtype, score_threshold=0.3)
        for a, b in zip(seg(images), reference):
            assert a.id_map.shape == b.id_map.shape
            if dtype == "fp32":
                assert (a.id_map == b.id_map).mean() >= 0.97
