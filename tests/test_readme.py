"""Every code block of README.md runs as written, in order, in one working folder.

What the blocks meet instead of the outside world, and the only substitutions made:

* **Hugging Face Hub ids** are not rewritten: tiny random checkpoints of the id's family with
  the real label sets (COCO's 80 things, COCO panoptic's 133 labels, Cityscapes' 19) sit in a
  Hugging Face cache (``HF_HOME``) under those ids, with a model card declaring the licence the
  real card declares (EoMT's: MIT), and ``HF_HUB_OFFLINE=1`` makes every load come from there.
* **``s3://bucket/…`` and ``s3://my-bucket/…``** are not rewritten: buckets of those names live on
  the loopback S3 endpoint (moto), with the photos and the manifest the blocks name.
* **``gs://bucket/``** becomes a local folder (there is no GCS endpoint here): ``{work}/gs/bucket/``.
* **``HEAD:6379`` and ``http://HEAD:8265``** become a real Ray head on loopback, started as Ray
  2.60 starts one by default where a token exists (token authentication on). The blocks run
  with ``HOME`` holding that token in ``~/.ray/auth_token``, as on the head itself.
* **``jobs/*.yaml``** are the repository's specs, copied into the working folder unchanged.
* **``pip`` and ``python -m pytest``** are recorded, not run (shell functions in front of the
  blocks): installing and running the tests from scratch is ``.ci/run``'s work, and this test
  checks that ``.ci/run`` runs exactly the README's commands.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from readback import read_rows
from skimage import data

from helpers import ROOT, drawn, encode, ray_head, write_token
from seglabel.core.labels import LABEL_SETS
from seglabel.engine.synthetic import save_random_checkpoint

README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# The Hub checkpoints the README names, each with its real label set.
HUB_CHECKPOINTS = {
    "facebook/mask2former-swin-small-coco-instance": [name for name, _ in LABEL_SETS["coco-panoptic"][:80]],
    "facebook/mask2former-swin-large-coco-panoptic": [name for name, _ in LABEL_SETS["coco-panoptic"]],
    "facebook/mask2former-swin-large-cityscapes-semantic": [name for name, _ in LABEL_SETS["cityscapes"]],
    "tue-mps/coco_panoptic_eomt_large_640": [name for name, _ in LABEL_SETS["coco-panoptic"]],
}
# In front of every shell block: installs and the test suite are recorded, not run.
SHELL_PREAMBLE = """
pip() { printf 'pip %s\\n' "$*" >> "$README_CALLS"; }
python() {
    if [ "${1:-}" = "-m" ] && [ "${2:-}" = "pytest" ]; then printf 'python %s\\n' "$*" >> "$README_CALLS";
    else command python "$@"; fi
}
"""


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced code block of the README, in order."""
    return [(lang, text) for lang, text in BLOCK.findall(README.read_text(encoding="utf-8"))]


def hub_cache(hf_home: Path, repo_id: str, checkpoint: Path) -> None:
    """Lay a checkpoint folder out in a Hugging Face cache as ``repo_id`` at one commit (refs/main
    names it), the way huggingface_hub finds a downloaded repository offline."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def jpeg(image: Image.Image) -> bytes:
    return encode(image, "JPEG")


@pytest.fixture(scope="module")
def world(s3_endpoint, tmp_path_factory):
    """The working folder, its environment, and what the README's blocks expect to find."""
    import ray

    ray.shutdown()  # this process holds no Ray; the blocks start their own or use the head
    work = tmp_path_factory.mktemp("readme")
    home = work / "home"
    hf_home = work / "hf"
    checkpoints = tmp_path_factory.mktemp("readme-checkpoints")
    for repo_id, names in HUB_CHECKPOINTS.items():
        eomt = "eomt" in repo_id
        folder = save_random_checkpoint(checkpoints / repo_id.split("/")[1], "eomt-tiny" if eomt else "tiny",
                                        dict(enumerate(names)), license="mit" if eomt else None)
        hub_cache(hf_home, repo_id, folder)
    write_token(home)

    photos = {
        "photo.jpg": jpeg(Image.fromarray(data.astronaut())),
        "coffee.jpg": jpeg(Image.fromarray(data.coffee())),
        "shapes.jpg": jpeg(drawn(96, 64, 3)),
    }
    (work / "images").mkdir()
    for name, blob in photos.items():
        (work / "images" / name).write_bytes(blob)
    street = work / "gs" / "bucket" / "street"
    street.mkdir(parents=True)
    for i in range(2):
        (street / f"frame{i}.jpg").write_bytes(jpeg(drawn(128, 64, 10 + i)))
    s3 = boto3.client("s3")
    for bucket in ("bucket", "my-bucket"):
        s3.create_bucket(Bucket=bucket)
        for name, blob in photos.items():
            s3.put_object(Bucket=bucket, Key=f"photos/{name}", Body=blob)
    manifest = pa.BufferOutputStream()
    pq.write_table(pa.table({"uri": [f"s3://bucket/photos/{name}" for name in photos]}), manifest)
    s3.put_object(Bucket="bucket", Key="inventory/keys.parquet", Body=manifest.getvalue().to_pybytes())
    shutil.copytree(ROOT / "jobs", work / "jobs", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    write_truths(work, {name: Image.open(io.BytesIO(blob)).size for name, blob in photos.items()}, s3)

    env = dict(os.environ, HOME=str(home), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
               README_CALLS=str(work / "calls.txt"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    with ray_head(home, env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}) as head:
        yield {"work": work, "env": env, "head": head, "photos": sorted(photos), "street": 2}
    for bucket in ("bucket", "my-bucket"):
        fsspec.filesystem("s3").rm(bucket, recursive=True)


def write_truths(work: Path, sizes: dict[str, tuple[int, int]], s3) -> None:
    """The labeled samples "Evaluating on a labeled sample" scores against: COCO instances
    (polygons) for ./labels, COCO panoptic on S3 for s3://bucket/labels, label PNGs for the
    street frames (Cityscapes ids: road below, sky above, an ignored band)."""
    images = [{"id": i + 1, "file_name": name, "width": w, "height": h}
              for i, (name, (w, h)) in enumerate(sorted(sizes.items()))]
    anns = [{"id": i["id"], "image_id": i["id"], "category_id": 1, "iscrowd": 0,
             "segmentation": [[0, 0, i["width"] / 2, 0, i["width"] / 2, i["height"] / 2, 0, i["height"] / 2]],
             "area": i["width"] * i["height"] / 4, "bbox": [0, 0, i["width"] / 2, i["height"] / 2]}
            for i in images]
    (work / "truth").mkdir()
    (work / "truth" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}))
    panoptic = []
    for image in images:
        ids = np.full((image["height"], image["width"]), 2, dtype=np.uint8)
        ids[: image["height"] // 2, : image["width"] // 2] = 1
        rgb = np.stack([ids, np.zeros_like(ids), np.zeros_like(ids)], axis=-1)
        png = f"{image['file_name']}.png"
        s3.put_object(Bucket="bucket", Key=f"truth/panoptic/{png}", Body=encode(Image.fromarray(rgb), "PNG"))
        panoptic.append({"image_id": image["id"], "file_name": png, "segments_info": [
            {"id": k, "category_id": k, "iscrowd": 0, "area": int((ids == k).sum())} for k in (1, 2)]})
    categories = [{"id": 1, "name": "person", "isthing": 1},
                  {"id": 2, "name": "sky-other-merged", "isthing": 0}]
    s3.put_object(Bucket="bucket", Key="truth/panoptic.json", Body=json.dumps(
        {"images": images, "annotations": panoptic, "categories": categories}).encode())
    street = work / "gs" / "bucket" / "street-truth"
    street.mkdir(parents=True)
    for i in range(2):
        labels = np.zeros((64, 128), dtype=np.uint8)  # road
        labels[:32] = 10  # sky
        labels[30:34] = 255
        Image.fromarray(labels).save(street / f"frame{i}.png")


def substituted(text: str, world: dict) -> str:
    """The block's text with the substitutions of this module's docstring, and nothing else."""
    head = world["head"]
    text = text.replace("gs://bucket/", f"{world['work']}/gs/bucket/")
    text = text.replace("http://HEAD:8265", head.dashboard).replace("HEAD:6379", head.gcs)
    return text


def run_block(lang: str, text: str, world: dict) -> subprocess.CompletedProcess:
    if lang in ("bash", "sh"):
        argv = ["bash", "-c", "set -euo pipefail\n" + SHELL_PREAMBLE + text]
    elif lang == "python":
        argv = [sys.executable, "-c", text]
    else:
        raise AssertionError(f"README block in an unknown language {lang!r}: this test cannot run it")
    return subprocess.run(
        argv, cwd=world["work"], env=world["env"], capture_output=True, text=True, timeout=900
    )


def test_every_readme_block_runs_as_written(world):
    blocks = readme_blocks()
    assert len(blocks) >= 7 and {lang for lang, _ in blocks} == {"bash", "python"}
    for lang, text in blocks:
        done = run_block(lang, substituted(text, world), world)
        assert done.returncode == 0, (
            f"README block failed (exit {done.returncode}):\n{text}\n--- stdout\n{done.stdout[-3000:]}"
            f"\n--- stderr\n{done.stderr[-5000:]}"
        )

    work, photos = world["work"], world["photos"]
    # The quickstart labeled ./images into ./labels, and the exports and preview read it.
    quick = read_rows(str(work / "labels"))
    assert sorted(r["key"] for r in quick) == photos and all(r["status"] == "ok" for r in quick)
    assert json.loads((work / "labels" / "_SUCCESS").read_text())["total"] == len(photos)
    assert (work / "coco-00000.json").exists() and (work / "cvat.zip").exists()
    assert (work / "panoptic" / "panoptic.json").exists() and (work / "tasks.json").exists()
    assert len(list((work / "preview" / "overlays").glob("*.png"))) == len(photos)
    # The EoMT checkpoint, accepted by its card's licence, labeled the same photos.
    eomt = json.loads((work / "labels-eomt" / "job.json").read_text())
    assert eomt["family"] == "eomt" and eomt["model_license"]["license"] == "mit"
    assert len(read_rows(str(work / "labels-eomt"))) == len(photos)
    tasks = json.loads((work / "tasks.json").read_text())
    assert {t["data"]["image"] for t in tasks} == {f"https://cdn.example.com/photos/{p}" for p in photos}
    # The export in the team's labels has those labels only, in the map's order.
    team = json.loads((work / "team.json").read_text())
    assert [c["name"] for c in team["categories"]] == ["people", "vehicle"]
    team_tasks = json.loads((work / "team-tasks.json").read_text())
    results = [r for t in team_tasks for r in t["predictions"][0]["result"]]
    assert {r["type"] for r in results} <= {"polygonlabels"}
    assert {r["value"]["polygonlabels"][0] for r in results} <= {"people", "vehicle"}
    # The evaluations scored every photo of the labeled samples, and wrote what they were asked.
    report = json.loads((work / "eval.json").read_text())
    assert report["task"] == "instance" and report["images"]["scored"] == len(photos)
    assert sorted(pq.read_table(work / "worst.parquet").column("key").to_pylist()) == photos
    # The other runs, on S3, the local stand-in for GCS, and the Ray head.
    for output, task, n in (("s3://bucket/labels", "panoptic", len(photos)),
                            (str(work / "gs" / "bucket" / "street-labels"), "semantic", world["street"]),
                            ("s3://my-bucket/labels/coco-instance", "instance", len(photos)),
                            ("s3://bucket/api-labels", "instance", len(photos))):
        rows = read_rows(output)
        assert len(rows) == n and {r["task"] for r in rows} == {task}, output
    # Installs and the test command are .ci/run's: exactly the README's, there.
    calls = (work / "calls.txt").read_text().splitlines()
    assert calls == [
        "pip install -e .",
        "pip install torch==2.13.0",
        "pip install -c .ci/constraints.txt -e .[test]",
        "python -m pytest -q",
        "python -m pytest -q",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    for line in (
        "pip install torch==2.13.0",
        'pip install -c .ci/constraints.txt -e ".[test]"',
        "python -m pytest -q",
    ):
        assert re.search(rf"^\s*{re.escape(line)}\s*$", ci, re.M), f".ci/run does not run: {line}"
    assert 'pip install -c .ci/constraints.txt -e ".[test]" && python -m pytest -q' in README.read_text()


def test_a_test_waits_for_a_tool_ci_installs_beside_it(tmp_path, monkeypatch):
    """.ci/run installs the annotation tools while the tests run: a test that needs one waits
    for the exit status .ci/run writes (<tools>/<name>.rc), and a failed install fails it."""
    import threading
    import time

    import helpers

    monkeypatch.setenv("SEGLABEL_TOOLS_DIR", str(tmp_path))
    monkeypatch.setenv("SEGLABEL_TOOLS_PENDING", "1")
    monkeypatch.setenv("SEGLABEL_REQUIRE_TOOLS", "1")
    (tmp_path / "late" / "bin").mkdir(parents=True)
    (tmp_path / "late" / "bin" / "python").write_text("")
    timer = threading.Timer(1.5, lambda: (tmp_path / "late.rc").write_text("0\n"))
    timer.start()
    started = time.monotonic()
    assert helpers.tool_python("late") == str(tmp_path / "late" / "bin" / "python")
    assert time.monotonic() - started >= 1.4  # it waited for the word, not just for the file
    (tmp_path / "broken.rc").write_text("1\n")
    with pytest.raises(pytest.fail.Exception, match="broken: its install failed"):
        helpers.tool_python("broken")
    with pytest.raises(pytest.fail.Exception, match="did not end"):
        helpers.await_tool("never", timeout=1)
