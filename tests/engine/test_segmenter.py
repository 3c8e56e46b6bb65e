"""The Segmenter end to end on CPU, with tiny random-weight checkpoints and real photos."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import tomllib
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data

from seglabel import Segmenter
from seglabel.core.config import Resolution
from seglabel.core.errors import CheckpointError, ConfigError
from seglabel.core.labels import LABEL_SETS
from seglabel.engine.checkpoint import detect_task
from seglabel.engine.synthetic import save_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("instance", "semantic", "panoptic")


def mixed_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        data.astronaut(),
        data.coffee(),
        np.ascontiguousarray(data.rocket()[:, ::-1]),
        rng.integers(0, 255, (1, 37, 3), dtype=np.uint8),  # 1 pixel high
        rng.integers(0, 255, (29, 1, 3), dtype=np.uint8),  # 1 pixel wide
        rng.integers(0, 255, (20, 400, 3), dtype=np.uint8),  # 1:20
    ]


@pytest.fixture(scope="module")
def segmenters(checkpoints):
    return {task: Segmenter(str(checkpoints[task]), score_threshold=0.3) for task in TASKS}


@pytest.fixture(scope="module")
def predictions(segmenters):
    images = mixed_images()
    return {task: seg(images) for task, seg in segmenters.items()}


@pytest.mark.parametrize("task", TASKS)
def test_shapes_dtypes_and_png_at_original_size(predictions, task):
    expected_dtype = {"instance": np.uint16, "semantic": np.uint8, "panoptic": np.int32}[task]
    for image, pred in zip(mixed_images(), predictions[task]):
        assert pred.id_map.shape == image.shape[:2]
        assert pred.id_map.dtype == expected_dtype
        with Image.open(io.BytesIO(pred.png())) as png:
            assert png.size == (image.shape[1], image.shape[0])
            assert png.mode == {"instance": "I;16", "semantic": "L", "panoptic": "RGB"}[task]
            decoded = np.array(png).astype(np.int64)
        if task == "panoptic":
            decoded = decoded[..., 0] + 256 * decoded[..., 1] + 65536 * decoded[..., 2]
        assert (decoded == pred.id_map).all()
    assert sum(len(p.segments) for p in predictions[task]) > 0


@pytest.mark.parametrize("task", TASKS)
def test_rles_decode_to_the_label_map(predictions, task):
    checked = 0
    for pred in predictions[task]:
        for seg in pred.segments:
            mask = mask_utils.decode({"size": [pred.height, pred.width], "counts": seg.rle.encode()}).astype(
                bool
            )
            owned = pred.id_map == seg.id
            if task == "instance":
                assert not (owned & ~mask).any(), "id-map pixels must lie inside the exact mask"
            else:
                assert (mask == owned).all()
            assert seg.area == mask.sum()
            ys, xs = np.nonzero(mask)
            if len(xs):
                box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert np.allclose(seg.bbox, box)
            checked += 1
    assert checked > 0
    if task == "semantic":
        for pred in predictions[task]:
            assert {s.id for s in pred.segments} == set(np.unique(pred.id_map).tolist())
            assert all(s.id == s.label_id and s.score is None for s in pred.segments)


def test_instance_ids_follow_scores(predictions):
    for pred in predictions["instance"]:
        scores = [s.score for s in pred.segments]
        assert [s.id for s in pred.segments] == list(range(1, len(scores) + 1))
        assert scores == sorted(scores, reverse=True)
        assert all(s.label == f"label{s.label_id}" and s.is_thing is None for s in pred.segments)


def test_default_matches_hf_end_to_end(segmenters):
    """HF's processor + model + post-processing vs the Segmenter, from the same photos."""
    from transformers import Mask2FormerImageProcessorPil

    seg = segmenters["semantic"]
    processor = Mask2FormerImageProcessorPil.from_pretrained(seg.config.model)
    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    with torch.inference_mode():
        outputs = seg.model(**processor(images=images, return_tensors="pt"))
    hf_maps = [
        m.numpy()
        for m in processor.post_process_semantic_segmentation(
            outputs, target_sizes=[i.shape[:2] for i in images]
        )
    ]
    ours = seg(images)
    for hf_map, pred in zip(hf_maps, ours):
        assert (hf_map == pred.id_map).mean() >= 0.97
    # The comparison means something only if a map is not uniform; a mirrored input (a wrong
    # orientation) must then disagree.
    coffee = hf_maps[1]
    shares = np.bincount(coffee.ravel()) / coffee.size
    assert (shares >= 0.1).sum() >= 2
    mirrored = seg([np.ascontiguousarray(images[1][:, ::-1])])[0].id_map[:, ::-1]
    assert (mirrored == coffee).mean() < 0.9


ROCKET = np.ascontiguousarray(data.rocket()[:, ::-1])
COMPAT_PHOTOS = [data.astronaut(), data.coffee(), data.chelsea(), ROCKET,
                 np.repeat(data.camera()[:200, :90, None], 3, axis=2)]


@pytest.mark.parametrize("task", TASKS)
def test_compat_matches_hf_end_to_end(checkpoints, task):
    """--hf-compat against HF's processor + model + post-processing from the same photos. On
    identical model outputs the post-processing is exact (test_postprocess.py); what differs end
    to end is the pre-processing (seglabel resizes on the device, HF with Pillow), measured here
    and stated in the README: semantic 99.8% of pixels or more, the same instance segments with
    scores within 2e-4 and foreground within 99.98%, panoptic 99.99%. The bounds below leave a
    little room for another CPU's rounding."""
    from transformers import Mask2FormerImageProcessorPil

    seg = Segmenter(str(checkpoints[task]), score_threshold=0.3, compat=True)
    processor = Mask2FormerImageProcessorPil.from_pretrained(seg.config.model)
    inputs = processor(images=COMPAT_PHOTOS, return_tensors="pt")
    with torch.inference_mode():
        outputs = seg.model(pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"))
    sizes = [i.shape[:2] for i in COMPAT_PHOTOS]
    ours = seg(COMPAT_PHOTOS)
    if task == "semantic":
        theirs = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        agreement = [float((t.numpy() == o.id_map).mean()) for o, t in zip(ours, theirs)]
        assert min(agreement) >= 0.995, agreement
        assert sum(a == 1.0 for a in agreement) >= 3  # most photos exactly
        return
    if task == "instance":
        theirs = processor.post_process_instance_segmentation(
            outputs, threshold=0.3, target_sizes=sizes, return_binary_maps=True)
        for o, t in zip(ours, theirs):
            hf = sorted((s["label_id"], s["score"]) for s in t["segments_info"])
            mine = sorted((s.label_id, float(s.score)) for s in o.segments)
            assert [x[0] for x in hf] == [x[0] for x in mine] and len(hf) >= 5
            assert max(abs(x[1] - y[1]) for x, y in zip(hf, mine)) <= 1e-3
            foreground = (t["segmentation"].numpy() > 0).any(0)
            assert (foreground == (o.id_map > 0)).mean() >= 0.999
        return
    # The tiny random model gives one panoptic segment a photo: this end-to-end figure is weak;
    # the merge of many segments is held exact on identical outputs in test_postprocess.py.
    theirs = processor.post_process_panoptic_segmentation(outputs, threshold=0.3, target_sizes=sizes)
    for o, t in zip(ours, theirs):
        assert len(o.segments) == len(t["segments_info"]) >= 1
        assert (t["segmentation"].numpy() == o.id_map).mean() >= 0.999


@pytest.mark.parametrize("task", TASKS)
def test_result_does_not_depend_on_the_batch(segmenters, task):
    """Alone or among images of other sizes, an image gets the same segments.

    Images are never padded against each other; what remains is float rounding (CPU kernels
    pick different blockings for different batch sizes), so masks agree to within a few
    boundary pixels and scores to 1e-5, not bit for bit.
    """
    seg = segmenters[task]
    images = mixed_images()
    for index in (1, 4):
        alone = seg([images[index]])[0]
        together = seg(images)[index]
        assert (alone.id_map == together.id_map).mean() >= 0.9999
        assert [(s.id, s.label_id) for s in alone.segments] == [(s.id, s.label_id) for s in together.segments]
        for a, b in zip(alone.segments, together.segments):
            assert a.score is None and b.score is None or abs(a.score - b.score) < 1e-5
            ma, mb = (
                mask_utils.decode({"size": [alone.height, alone.width], "counts": s.rle.encode()})
                for s in (a, b)
            )
            assert np.logical_and(ma, mb).sum() >= 0.999 * np.logical_or(ma, mb).sum()


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu-lock", "gpu-lock"])
def test_two_threads_at_once_get_their_own_results(checkpoints, overlap):
    """The pipeline's actor calls its Segmenter from two threads at once: each call gets the
    results of its own images, in its order, as if the calls had run one after the other
    (also with a GPU's lock scope, the model alone locked, post-processing side by side)."""
    from concurrent.futures import ThreadPoolExecutor

    seg = Segmenter(str(checkpoints["instance"]), score_threshold=0.3)
    images = mixed_images()
    batches = [[images[0], images[3]], [images[1]], [images[5], images[2], images[4]], [images[2]]]
    alone = [seg.predict_raw(batch) for batch in batches]
    seg._overlap = overlap
    order = [0, 1, 2, 3, 2, 0, 3, 1]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda i: seg.predict_raw(batches[i]), order))
    for i, result in zip(order, together):
        assert [r.id_map.shape for r in result] == [b.shape[:2] for b in batches[i]]
        for a, b in zip(alone[i], result):
            assert np.array_equal(a.id_map, b.id_map) and np.array_equal(a.label_ids, b.label_ids)
            assert np.array_equal(a.scores, b.scores) and np.array_equal(a.masks.unpack(), b.masks.unpack())
    assert sum(len(r.ids) for batch in alone for r in batch) >= 3


def test_resolution_override_matches_hf_sizes(checkpoints):
    from transformers import Mask2FormerImageProcessorPil

    seg = Segmenter(str(checkpoints["semantic"]), resolution="96")
    processor = Mask2FormerImageProcessorPil(size={"shortest_edge": 96, "longest_edge": 160})
    assert seg.preprocess_spec.resolution == Resolution("shortest", shortest=96, longest=160)
    for image in mixed_images():
        hf = processor(images=[image], return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        assert seg.preprocess_spec.input_size(*image.shape[:2]) == tuple(hf.shape[-2:])
    preds = seg(mixed_images())
    assert [p.id_map.shape for p in preds] == [i.shape[:2] for i in mixed_images()]


def test_preprocessing_matches_hf_pixels(segmenters):
    from transformers import Mask2FormerImageProcessorPil

    from seglabel.engine.preprocess import preprocess, to_device

    seg = segmenters["semantic"]
    processor = Mask2FormerImageProcessorPil.from_pretrained(seg.config.model)
    one_level = 1 / 255 / min(processor.image_std) + 1e-4
    for image in mixed_images():
        hf = processor(images=[image], return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        size = seg.preprocess_spec.input_size(*image.shape[:2])
        image_tensor = to_device(image, torch.device("cpu"))
        ours, _ = preprocess([image_tensor], seg.preprocess_spec, size, torch.float32)
        diff = (hf - ours).abs()
        assert diff.max() <= one_level
        assert (diff > 1e-4).float().mean() < 0.01


def test_bf16_runs_on_cpu(checkpoints):
    seg = Segmenter(str(checkpoints["instance"]), dtype="bf16", score_threshold=0.3)
    assert next(seg.model.parameters()).dtype == torch.bfloat16
    preds = seg(mixed_images()[:3])
    assert [p.id_map.shape for p in preds] == [i.shape[:2] for i in mixed_images()[:3]]
    assert sum(len(p.segments) for p in preds) > 0


def test_load_from_fsspec_url_copies_once(checkpoints, tmp_path):
    local = checkpoints["instance"]
    fs = fsspec.filesystem("memory")
    remote = "memory://models/tiny-mask2former-instance"
    for f in local.iterdir():
        fs.pipe(f"{remote}/{f.name}", f.read_bytes())
    images = mixed_images()[:2]
    from_url = Segmenter(remote, cache_dir=str(tmp_path), score_threshold=0.3)
    from_dir = Segmenter(str(local), score_threshold=0.3)
    assert from_url.task == "instance" and from_url.model_id == remote
    for a, b in zip(from_url(images), from_dir(images)):
        assert (a.id_map == b.id_map).all()
    # Once cached, the weights are not copied again: one listing checks that they are the same.
    (copy,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    inode = (copy / "model.safetensors").stat().st_ino
    again = Segmenter(remote, cache_dir=str(tmp_path))
    assert again.id2label == from_dir.id2label
    assert [p for p in tmp_path.iterdir() if not p.name.startswith(".")] == [copy]
    assert (copy / "model.safetensors").stat().st_ino == inode
    assert not list(tmp_path.glob(".partial-*"))


def test_task_detection_and_errors(checkpoints, tmp_path):
    assert detect_task("facebook/mask2former-swin-small-coco-instance") == "instance"
    assert detect_task("facebook/mask2former-swin-large-cityscapes-semantic") == "semantic"
    assert detect_task("s3://bucket/models/mask2former-swin-large-coco-panoptic/") == "panoptic"
    assert detect_task("anything", "semantic") == "semantic"
    with pytest.raises(ConfigError, match="--task"):
        detect_task("/models/my-finetune")
    plain = tmp_path / "my-finetune"
    shutil.copytree(checkpoints["instance"], plain)
    with pytest.raises(ConfigError, match="--task"):
        Segmenter(str(plain))
    assert Segmenter(str(plain), task="semantic").task == "semantic"
    from seglabel.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint"):
        Segmenter(str(tmp_path / "missing-instance"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Segmenter("memory://nowhere/tiny-instance", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="nonexistent"):
        Segmenter(str(checkpoints["instance"]), labels=("nonexistent",))


def test_thing_flags_from_known_label_set(tmp_path):
    coco = {i: name for i, (name, _) in enumerate(LABEL_SETS["coco-panoptic"])}
    path = save_random_checkpoint(tmp_path / "tiny-coco-panoptic", "tiny", coco)
    seg = Segmenter(str(path), score_threshold=0.2)
    assert seg.thing_ids == frozenset(range(80))
    preds = seg(mixed_images()[:3])
    segments = [s for p in preds for s in p.segments]
    assert segments and all(s.is_thing == (s.label_id < 80) for s in segments)
    for p in preds:
        stuff = [s.label_id for s in p.segments if not s.is_thing]
        assert len(stuff) == len(set(stuff))


def test_dependency_ranges_admit_the_gpu_image():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "3.12" in SpecifierSet(project["requires-python"])
    reqs = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    assert "2.11.0" in reqs["torch"].specifier
    assert "5.17.0" in reqs["transformers"].specifier
    for name in ("scipy", "pillow", "numpy", "pyarrow", "fsspec", "s3fs", "ray", "pycocotools"):
        assert name in reqs, name
    assert {"data", "default"} <= reqs["ray"].extras
    # and this machine's versions
    from importlib.metadata import version

    assert version("torch").split("+")[0] in reqs["torch"].specifier
    assert version("transformers") in reqs["transformers"].specifier
    assert sys.version_info >= (3, 10)


@pytest.mark.gpu
def test_cuda_paths(checkpoints):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images = mixed_images()
    cpu = Segmenter(str(checkpoints["semantic"]), device="cpu")(images)
    for dtype in ("fp32", "bf16", "fp16"):
        seg = Segmenter(str(checkpoints["semantic"]), device="cuda", dtype=dtype)
        assert seg.device.type == "cuda"
        for a, b in zip(seg(images), cpu):
            assert a.id_map.shape == b.id_map.shape
            if dtype == "fp32":
                assert (a.id_map == b.id_map).mean() >= 0.97
    inst = Segmenter(str(checkpoints["instance"]), device="cuda", score_threshold=0.3)
    assert inst.dtype_name == "bf16"
    assert [p.id_map.shape for p in inst(images)] == [i.shape[:2] for i in images]


def test_checkpoint_url_copies_plain_safetensors_files_only(checkpoints, s3_bucket, tmp_path):
    """A bucket cannot write outside the cache (names with '..', folders below) nor have pickled
    weights loaded: only config, preprocessor config and safetensors files are copied."""
    import boto3

    client = boto3.client("s3")
    for f in checkpoints["instance"].iterdir():
        client.put_object(Bucket=s3_bucket, Key=f"m/ckpt-instance/{f.name}", Body=f.read_bytes())
    evil = b"import os; os.environ['PWNED'] = '1'\n"
    for key in ("m/ckpt-instance/../../sitecustomize.py", "m/ckpt-instance/sub/../../../x/sitecustomize.py",
                "m/ckpt-instance/pytorch_model.bin", "m/ckpt-instance/modeling_evil.py"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=evil)
    cache = tmp_path / "cache" / "checkpoints"
    seg = Segmenter(f"s3://{s3_bucket}/m/ckpt-instance", cache_dir=str(cache), score_threshold=0.3)
    (copy,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in copy.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "sitecustomize" in p.name) == []
    assert len(seg(mixed_images()[:1])) == 1

    # Pickled weights alone are refused with one line, not loaded.
    client.put_object(Bucket=s3_bucket, Key="p/ckpt-instance/config.json",
                      Body=(checkpoints["instance"] / "config.json").read_bytes())
    client.put_object(Bucket=s3_bucket, Key="p/ckpt-instance/pytorch_model.bin", Body=evil)
    with pytest.raises(CheckpointError, match="safetensors"):
        Segmenter(f"s3://{s3_bucket}/p/ckpt-instance", cache_dir=str(cache))


COMPILE_RUN = """
import json, sys, time, numpy as np, torch
from seglabel.engine.segmenter import Segmenter
images = [np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8) for i in range(3)]
eager = Segmenter(sys.argv[1], score_threshold=0.3, batch_size=2)
compiled = Segmenter(sys.argv[1], score_threshold=0.3, batch_size=2, compile=True, cache_dir=sys.argv[2])
started = time.perf_counter()
out = compiled.predict_raw(images)  # a batch of 2 and a short one of 1, padded to 2
seconds = time.perf_counter() - started
ref = eager.predict_raw(images)
from torch._dynamo.utils import counters
print(json.dumps({
    "seconds": seconds,
    "same_pixels": [float((a.id_map == b.id_map).mean()) for a, b in zip(out, ref)],
    "same_segments": [len(a.ids) == len(b.ids) for a, b in zip(out, ref)],
    "max_score_diff": max(
        [float(np.abs(a.scores - b.scores).max()) for a, b in zip(out, ref) if len(a.ids)] or [0.0]),
    "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
}))
"""


def test_compiled_equals_eager_and_a_second_process_reuses_the_cache(eomt_checkpoints, tmp_path):
    """--compile: outputs equal eager within float tolerance on the tiny model (a short batch
    padded included); a second process loads the compiled code from the on-disk cache. The two
    compile times are printed (-s), not asserted: speed belongs to the bench.

    On EoMT, the licence-clean family the README steers users to, and a plain ViT: compiling the
    tiny Mask2Former (Swin, deformable attention, masked attention) cost 63 CPU s of the two
    processes alone on the 2-core CI machine and about 100 s within the suite, EoMT 28 s; the
    compile path in the Segmenter is the same for both (``segmenter._compiled``), and the GPU
    check compiles both families (bench/gpu_check.sh: s384c, e640c)."""
    import json
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    # Inductor's C++ kernels compiled one after the other in the child itself: the pool it starts
    # otherwise (a process per core, each importing torch) cost 25 s more CPU on 2 busy cores,
    # for the same kernels.
    # Scalar C++ kernels (no SIMD ISA probe and vector codegen): a quarter less CPU to compile
    # (100 s -> 74 s for the first child on the 2-core machine); what is checked, compiled equal
    # to eager and the cache reused, is the same, and a GPU compiles Triton kernels anyway.
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1", TORCHINDUCTOR_VEC_ISA_OK="0")
    runs, model = [], str(eomt_checkpoints["instance"])
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", COMPILE_RUN, model, str(cache)],
                              capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for run in runs:
        assert min(run["same_pixels"]) >= 0.99 and all(run["same_segments"])
        assert run["max_score_diff"] < 1e-3
    assert runs[0]["cache_hits"] == 0 and runs[1]["cache_hits"] > 0
    assert any((cache / "inductor").iterdir())
    print(f"compile + first call: {runs[0]['seconds']:.1f} s; with the cache: {runs[1]['seconds']:.1f} s")
