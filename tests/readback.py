"""Read a job's outputs back with independent readers (fsspec, pyarrow, Pillow, pycocotools)
and check them against the output contract. Nothing here uses seglabel's own reading code."""

from __future__ import annotations

import io
import json
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

CONTRACT_COLUMNS = [
    "key",
    "image_uri",
    "status",
    "error",
    "width",
    "height",
    "mask_uri",
    "task",
    "model",
    "segments",
    "review_score",
]


def read_rows(output: str) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    parts = sorted(p for p in fs.ls(f"{root.rstrip('/')}/metadata", detail=False) if p.endswith(".parquet"))
    rows = []
    for path in parts:
        # From bytes: pyarrow's async reads of Python file objects can abort at exit.
        table = pq.read_table(pa.BufferReader(fs.cat_file(path)))
        assert table.column_names == CONTRACT_COLUMNS
        rows.extend(table.to_pylist())
    for row in rows:
        # The contract: every ok row's review score is in [0, 1]; an error row has none.
        if row["status"] == "ok":
            assert 0.0 <= row["review_score"] <= 1.0, row
        else:
            assert row["review_score"] is None, row
    return rows


def read_uri(uri: str) -> bytes:
    """An object's bytes by its full URI, without fsspec's URL parsing (which reads
    "a::b.png" as a chain): the local file, or the S3 object through boto3."""
    if uri.startswith("file://"):
        with open(uri[len("file://"):], "rb") as f:
            return f.read()
    if uri.startswith("s3://"):
        import boto3

        bucket, key = uri[len("s3://"):].split("/", 1)
        return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    raise AssertionError(f"no independent reader for {uri}")


def uri_exists(uri: str) -> bool:
    """Whether an object exists, by its full URI, without fsspec's URL or S3 version parsing."""
    if uri.startswith("file://"):
        return os.path.lexists(uri[len("file://"):])
    if uri.startswith("s3://"):
        import boto3
        from botocore.exceptions import ClientError

        bucket, key = uri[len("s3://"):].split("/", 1)
        try:
            boto3.client("s3").head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True
    raise AssertionError(f"no independent reader for {uri}")


def read_png(uri: str) -> np.ndarray:
    image = Image.open(io.BytesIO(read_uri(uri)))
    image.load()
    return image


def id_map(image: Image.Image, task: str) -> np.ndarray:
    array = np.array(image).astype(np.int64)
    if task == "panoptic":
        return array[..., 0] + 256 * array[..., 1] + 65536 * array[..., 2]
    return array


def check_output(output: str, task: str, expected: dict[str, object],
                 skip_mask_check: set[str] = frozenset()) -> dict[str, dict]:
    """Check a finished output; ``expected`` maps each input key to (width, height) for an
    image that must be labeled, or to an error prefix (str). Returns the rows by key.
    ``skip_mask_check``: error rows whose mask path may exist as another key's folder."""
    rows = read_rows(output)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "an image appears more than once"
    assert set(keys) == set(expected), (
        f"missing {set(expected) - set(keys)}, extra {set(keys) - set(expected)}"
    )
    by_key = {r["key"]: r for r in rows}
    fs, root = fsspec.core.url_to_fs(output)
    for key, want in expected.items():
        row = by_key[key]
        assert row["task"] == task
        if isinstance(want, str):
            assert row["status"] == "error" and row["error"].startswith(want), row
            assert row["segments"] is None and row["mask_uri"] is None
            if key not in skip_mask_check:
                assert not uri_exists(fs.unstrip_protocol(f"{root.rstrip('/')}/masks/{key}.png"))
            continue
        assert row["status"] == "ok" and row["error"] is None, row
        assert (row["width"], row["height"]) == want
        assert row["mask_uri"].endswith(f"/masks/{key}.png") and "://" in row["mask_uri"]
        assert "://" in row["image_uri"]
        png = read_png(row["mask_uri"])
        assert png.size == want
        assert png.mode == {"semantic": "L", "instance": "I;16", "panoptic": "RGB"}[task]
        ids = id_map(png, task)
        values = set(np.unique(ids).tolist()) - ({0} if task != "semantic" else set())
        seg_ids = [s["id"] for s in row["segments"]]
        assert len(seg_ids) == len(set(seg_ids))
        if task == "instance":
            assert values <= set(seg_ids)
            assert seg_ids == list(range(1, len(seg_ids) + 1))
        else:
            assert values == set(seg_ids)
        for seg in row["segments"]:
            mask = mask_utils.decode({"size": [want[1], want[0]], "counts": seg["rle"].encode()}).astype(bool)
            owned = ids == seg["id"]
            if task == "instance":
                assert not (owned & ~mask).any()
            else:
                assert (owned == mask).all()
            assert seg["area"] == int(mask.sum())
            if task == "semantic":
                assert seg["id"] == seg["label_id"] and seg["score"] is None
            assert seg["label"]
    success = json.loads(fs.cat_file(f"{root.rstrip('/')}/_SUCCESS"))
    n_ok = sum(1 for w in expected.values() if not isinstance(w, str))
    assert (success["total"], success["ok"], success["error"]) == (len(expected), n_ok, len(expected) - n_ok)
    job = json.loads(fs.cat_file(f"{root.rstrip('/')}/job.json"))
    assert job["task"] == task and job["id2label"] and job["versions"]["seglabel"]
    return by_key
