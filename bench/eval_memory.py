"""What `seglabel eval` holds in memory as the sample grows (issue 25).

    python bench/eval_memory.py [--task semantic|panoptic|instance] [--images 200,2000]
                                [--size 256] [--segments 10] [--json out.json]

For each sample size, writes a synthetic job output (a minimal job.json, Parquet parts, mask
PNGs) and a truth that differs from it (every tenth segment shifted), then scores it in a fresh
process and reports the peak of Python's allocations (tracemalloc, numpy's arrays included),
the kernel's peak RSS (VmHWM) above the process's baseline, and the time. The slope between two
sizes is what each further image costs. No model and no Ray: the output is written directly
with pyarrow and Pillow, in the contract's layout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

LABELS = {i: f"label{i}" for i in range(5)}
CHILD = """
import json, sys, time, tracemalloc
from seglabel.bench.memory import reset_peak, status_mb
from seglabel.evaluation.evaluate import evaluate
before = status_mb("VmRSS"); reset_peak(); tracemalloc.start(); started = time.perf_counter()
report = evaluate(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - started
print(json.dumps({"scored": report["images"]["scored"], "seconds": seconds,
                  "traced_peak_mb": tracemalloc.get_traced_memory()[1] / 2**20,
                  "rss_above_baseline_mb": status_mb("VmHWM") - before}))
"""


def _boxes(index: int, size: int, segments: int, shift: int = 0) -> list[tuple[int, int, int, int]]:
    """Each image's segments: boxes at places that differ from image to image."""
    side = max(4, size // 5)
    rng = np.random.default_rng(index)
    tops = rng.integers(0, size - side, segments)
    lefts = rng.integers(0, size - side, segments)
    return [(int(t) + (shift if i % 10 == 0 else 0), int(le), side, side)
            for i, (t, le) in enumerate(zip(tops, lefts))]


def _id_map(index: int, size: int, segments: int, shift: int = 0) -> np.ndarray:
    ids = np.zeros((size, size), dtype=np.int32)
    for i, (top, left, h, w) in enumerate(_boxes(index, size, segments, shift)):
        ids[top:top + h, left:left + w] = i + 1
    return ids


def _rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def write_sample(root: Path, task: str, images: int, size: int, segments: int) -> tuple[str, str]:
    """A job output of ``images`` rows and its truth; returns (output, truth) paths."""
    from seglabel.outputs.contract import SCHEMA

    out, truth_dir = root / "out", root / "truth"
    (out / "metadata").mkdir(parents=True)
    (out / "masks").mkdir()
    truth_dir.mkdir()
    (out / "job.json").write_text(json.dumps({"task": task, "model": "bench", "id2label": LABELS}))
    rows, coco_images, coco_anns = [], [], []
    shift = max(1, size // 10)
    for i in range(images):
        key = f"img/{i:07d}.jpg"
        ids = _id_map(i, size, segments)
        truth_ids = _id_map(i, size, segments, shift)
        present = [int(v) for v in np.unique(ids) if v]
        seg_rows = []
        for sid in present:
            mask = np.asfortranarray((ids == sid).astype(np.uint8))
            rle = mask_utils.encode(mask)
            seg_rows.append({"id": sid, "label_id": sid % 5, "label": LABELS[sid % 5],
                             "score": None if task == "semantic" else 1 - sid / 100,
                             "area": int(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                             "rle": rle["counts"].decode(), "is_thing": True if task == "panoptic" else None})
        if task == "semantic":
            labels = np.where(ids > 0, ids % 5, 0).astype(np.uint8)
            (out / "masks" / "img").mkdir(exist_ok=True)
            Image.fromarray(labels).save(out / "masks" / f"{key}.png")
            (truth_dir / "img").mkdir(exist_ok=True)
            Image.fromarray(np.where(truth_ids > 0, truth_ids % 5, 0).astype(np.uint8)).save(
                truth_dir / f"img/{i:07d}.png")
        elif task == "panoptic":
            (out / "masks" / "img").mkdir(exist_ok=True)
            Image.fromarray(_rgb(ids)).save(out / "masks" / f"{key}.png")
            Image.fromarray(_rgb(truth_ids)).save(truth_dir / f"{i:07d}.png")
            coco_anns.append({"image_id": i + 1, "file_name": f"{i:07d}.png", "segments_info": [
                {"id": int(s), "category_id": int(s) % 5 + 1, "iscrowd": 0,
                 "area": int((truth_ids == s).sum())} for s in np.unique(truth_ids) if s]})
        else:
            for s in np.unique(truth_ids):
                if s:
                    rle = mask_utils.encode(np.asfortranarray((truth_ids == s).astype(np.uint8)))
                    coco_anns.append({
                        "id": len(coco_anns) + 1, "image_id": i + 1, "category_id": int(s) % 5 + 1,
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                        "area": float(mask_utils.area(rle)), "iscrowd": 0})
        coco_images.append({"id": i + 1, "file_name": key, "width": size, "height": size})
        rows.append({"key": key, "image_uri": f"file:///images/{key}", "status": "ok", "error": None,
                     "width": size, "height": size, "mask_uri": f"file://{out}/masks/{key}.png",
                     "task": task, "model": "bench", "segments": seg_rows})
        if len(rows) == 1000 or i == images - 1:
            part = out / "metadata" / f"part-{i:08d}.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), part)
            rows = []
    if task == "semantic":
        return str(out), str(truth_dir)
    categories = [{"id": k + 1, "name": v, "isthing": 1} for k, v in LABELS.items()]
    truth = root / ("truth.json" if task == "panoptic" else "instances.json")
    truth.write_text(json.dumps({"images": coco_images, "annotations": coco_anns, "categories": categories}))
    return str(out), str(truth)


def measure(task: str, sizes: list[int], size: int, segments: int) -> dict:
    """Score a sample of each size in a fresh process; the figures, and the slope per image."""
    results = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            output, truth = write_sample(Path(tmp), task, n, size, segments)
            done = subprocess.run([sys.executable, "-c", CHILD, output, truth], capture_output=True,
                                  text=True, timeout=3600)
            if done.returncode:
                raise SystemExit(f"eval of {n} images failed: {done.stderr[-2000:]}")
            results[n] = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = sizes[0], sizes[-1]
    slope = {name: (results[large][name] - results[small][name]) * 2**20 / (large - small)
             for name in ("traced_peak_mb", "rss_above_baseline_mb")}
    return {"task": task, "image_size": size, "segments_per_image": segments, "by_images": results,
            "bytes_per_further_image": slope}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="semantic", choices=("semantic", "panoptic", "instance"))
    parser.add_argument("--images", default="200,2000", help="sample sizes, comma-separated")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    figures = measure(args.task, [int(n) for n in args.images.split(",")], args.size, args.segments)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
