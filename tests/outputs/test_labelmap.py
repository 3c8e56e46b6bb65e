"""Label maps (issue 26, part 1): a job's labels read in a team's own terms by export, preview and
eval, on real job outputs (a local Ray, the stand-in model's segments: several labels an image,
stuff next to things), read back with pycocotools, Pillow, panopticapi and datumaro; the job's
own files never change."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from readback import id_map, read_png, read_rows
from skimage import data

from helpers import tool_python
from seglabel.cli import main
from seglabel.core.errors import LabelMapError
from seglabel.evaluation.evaluate import evaluate
from seglabel.formats.export import export
from seglabel.outputs.labelmap import LabelSpace, read_label_map
from seglabel.preview import preview

LABELS = {i: f"label{i}" for i in range(5)}
# Names a team writes: a comma, quotes, non-ASCII.
VEHICLE = 'vehicle, "wheeled" é'
GROUND = "ground"
MAP_YAML = f"""
label0: '{VEHICLE}'
label1: '{VEHICLE}'
label2: {GROUND}
label3: {GROUND}
label4: null
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("map-images")
    for name, make in {"astronaut.jpg": data.astronaut, "sub/coffee.png": data.coffee}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make()).save(root / name)
    return root


@pytest.fixture(scope="module")
def label_map(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("map") / "team.yaml"
    path.write_text(MAP_YAML, encoding="utf-8")
    return str(path)


def job(tmp_path_factory, corpus, checkpoint, name, **settings) -> str:
    from seglabel.job.pipeline import label

    out = tmp_path_factory.mktemp(f"map-{name}") / "labels"
    summary = label(str(corpus), str(out), model=str(checkpoint), **settings)
    assert summary.ok == 2
    return str(out)


@pytest.fixture(scope="module")
def outputs(ray_session, tmp_path_factory, corpus, checkpoints) -> dict[str, str]:
    return {
        "instance": job(tmp_path_factory, corpus, checkpoints["instance"], "instance",
                        stand_in="segments=10,coverage=0.02"),
        # Boxes of all five labels that overlap: stuff regions of two labels touch.
        "panoptic": job(tmp_path_factory, corpus, checkpoints["panoptic"], "panoptic",
                        stand_in="segments=15,coverage=0.05", thing_labels="label0,label1"),
        "semantic": job(tmp_path_factory, corpus, checkpoints["semantic"], "semantic",
                        stand_in="segments=10,coverage=0.05"),
    }


def fingerprint(output: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(output).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(output)).encode() + path.read_bytes())
    return digest.hexdigest()


def team_of(label: str) -> str | None:
    return {"label0": VEHICLE, "label1": VEHICLE, "label2": GROUND, "label3": GROUND}.get(label)


def test_a_label_space_from_a_map():
    mapping = {"label3": "b", "label0": "a", "label1": "a", "label4": None}
    space = LabelSpace.mapped("panoptic", LABELS, frozenset({0, 1}), mapping)
    assert space.names == {0: "b", 1: "a"}  # the map's order of first appearance
    assert space.from_model == {0: 1, 1: 1, 3: 0}  # label2 is unmapped: dropped; label4: null
    assert space.things == frozenset({1})
    kept = LabelSpace.mapped("instance", LABELS, None, {"label0": "a"}, unmapped="keep")
    assert kept.names == {0: "a", 1: "label1", 2: "label2", 3: "label3", 4: "label4"}
    with pytest.raises(LabelMapError, match="'frisbee', which is not one of the model's labels"):
        LabelSpace.mapped("instance", LABELS, None, {"frisbee": "toy"})
    with pytest.raises(LabelMapError, match="--unmapped"):
        LabelSpace.mapped("instance", LABELS, None, {"label0": "a"}, unmapped="maybe")


@pytest.mark.parametrize("text, words", [
    ("[a, b]", "must map model labels"),
    ("label0: [a]", "not a model label mapped"),
    ("label0: ''", "not a model label mapped"),
    ("a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{n}: &{n} [{','.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef")),
     "expands to more than"),
    ("{label0: [", "neither YAML nor JSON"),
    ('label0: "a\\x00b"', r"a control character \(U\+0000\)"),
    ('label0: "a\\nb"', r"a control character \(U\+000A\)"),
    ("label0: ' padded'", "spaces at an end"),
    ("label0: " + "x" * 1001, "1001 characters, not 1 to 1000"),
    # Issue 35: a lone surrogate failed as UnicodeEncodeError (exit 1) after a file was written;
    # XML 1.0 holds no non-character (Label Studio's config was not well-formed).
    ('{"label0": "\\udc80"}', r"a lone surrogate \(U\+DC80\)"),
    ('{"label0": "a\\uffff"}', r"a non-character \(U\+FFFF\)"),
    ('{"label0": "\\ufdd0"}', r"a non-character \(U\+FDD0\)"),
    ('{"label0": "\\u200b"}', "nothing visible"),
    ('{"label0": "a\\u2028b"}', r"a control character \(U\+2028\)"),
    ("label0: [" + ", ".join(["x"] * 9000) + "]", "is not a model label"),
    ("label0: a\nlabel0: b\n", "mapped twice"),
    ('{"label0": "a", "label0": "b"}', "mapped twice"),
])
def test_a_bad_label_map_is_one_line(tmp_path, text, words):
    path = tmp_path / "map.yaml"
    path.write_text(text)
    with pytest.raises(LabelMapError, match=words) as caught:
        read_label_map(str(path))
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_a_map_that_keeps_nothing_or_names_lookalikes(caplog):
    with pytest.raises(LabelMapError, match="keeps none of the model's labels"):
        LabelSpace.mapped("instance", LABELS, None, {"label0": None})
    LabelSpace.mapped("instance", LABELS, None, {"label0": "Car", "label1": "car", "label2": "cafe\u0301",
                                                 "label3": "caf\u00e9"})
    assert "'Car' and 'car'" in caplog.text and "look alike" in caplog.text
    assert caplog.text.count("look alike") == 2


def test_an_unreadable_map_is_one_line(s3_endpoint):
    with pytest.raises(LabelMapError, match="map s3://no-such-bucket/team.yaml (does not exist|cannot)"):
        read_label_map("s3://no-such-bucket/team.yaml")


def test_json_maps_read_too(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"label0": VEHICLE, "label4": None}, ensure_ascii=False), encoding="utf-8")
    assert read_label_map(str(path)) == {"label0": VEHICLE, "label4": None}


def test_panoptic_stuff_of_one_team_label_is_fused_and_the_png_agrees(outputs, label_map, tmp_path):
    output = outputs["panoptic"]
    before = fingerprint(output)
    to = tmp_path / "panoptic"
    counts = export(output, "coco-panoptic", str(to), label_map=label_map)
    assert fingerprint(output) == before  # non-destructive
    exported = json.loads((to / "panoptic.json").read_text())
    assert [c["name"] for c in exported["categories"]] == [VEHICLE, GROUND]
    assert {c["name"]: c["isthing"] for c in exported["categories"]} == {VEHICLE: 1, GROUND: 0}
    assert exported["info"]["label_map"]["label_map"] == read_label_map(label_map)
    assert json.loads((to / "label-map.json").read_text(encoding="utf-8"))["labels"] == [VEHICLE, GROUND]
    assert counts["label_map"] == str(to / "label-map.json")
    rows = {r["key"]: r for r in read_rows(output)}
    ground = next(c["id"] for c in exported["categories"] if c["name"] == GROUND)
    for image, ann in zip(exported["images"], exported["annotations"]):
        row = rows[image["file_name"]]
        ids = id_map(read_png(row["mask_uri"]), "panoptic")
        labels = {s["id"]: s["label"] for s in row["segments"]}
        assert {"label2", "label3"} <= set(labels.values())  # both stuff labels are there to fuse
        new = np.asarray(Image.open(to / "panoptic" / ann["file_name"]), dtype=np.uint32)
        new = new[..., 0] + (new[..., 1] << 8) + (new[..., 2] << 16)
        infos = ann["segments_info"]
        assert sorted(s["id"] for s in infos) == sorted(int(v) for v in np.unique(new) if v)  # PNG = JSON
        assert len({s["id"] for s in infos}) == len(infos)
        assert sum(1 for s in infos if s["category_id"] == ground) == 1  # one ground segment
        for seg in infos:
            assert seg["area"] == int((new == seg["id"]).sum())
        # Every pixel keeps its place: a pixel of a model segment is its team segment's now.
        for old_id, label in labels.items():
            team = team_of(label)
            pixels = ids == old_id
            if team is None:
                assert not new[pixels].any()  # label4 dropped: void
            else:
                owner = {s["id"]: s["category_id"] for s in infos}
                cats = {owner[int(v)] for v in np.unique(new[pixels])}
                assert cats == {next(c["id"] for c in exported["categories"] if c["name"] == team)}
    # panopticapi reads it: the export scored against itself is perfect.
    script = ("import sys, json\nfrom panopticapi.evaluation import pq_compute\n"
              "r = pq_compute(sys.argv[1], sys.argv[1], sys.argv[2], sys.argv[2])\n"
              "print('RESULT' + json.dumps(r['All'], default=float))\n")
    done = subprocess.run([tool_python("panopticapi"), "-c", script, str(to / "panoptic.json"),
                           str(to / "panoptic")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))[6:])
    assert (result["pq"], result["n"]) == (1.0, 2)


def test_coco_label_studio_and_cvat_in_the_team_labels(outputs, label_map, tmp_path):
    output = outputs["instance"]
    rows = {r["key"]: r for r in read_rows(output)}
    export(output, "coco", str(tmp_path / "coco.json"), label_map=label_map)
    coco = COCO(str(tmp_path / "coco.json"))
    assert [c["name"] for c in coco.dataset["categories"]] == [VEHICLE, GROUND]
    for image in coco.dataset["images"]:
        row = rows[image["file_name"]]
        expected = sorted((team_of(s["label"]), s["rle"]) for s in row["segments"] if team_of(s["label"]))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        got = sorted((coco.cats[a["category_id"]]["name"], a["segmentation"]["counts"]) for a in anns)
        assert got == expected
    assert json.loads((tmp_path / "coco.label-map.json").read_text(encoding="utf-8"))["unmapped"] == "drop"

    export(output, "label-studio", str(tmp_path / "tasks.json"), label_map=label_map)
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    labels = {r["value"]["brushlabels"][0] for t in tasks for r in t["predictions"][0]["result"]}
    assert labels == {VEHICLE, GROUND}
    assert (tmp_path / "tasks.label-map.json").exists()

    export(output, "cvat", str(tmp_path / "cvat.zip"), label_map=label_map, unmapped="keep")
    with zipfile.ZipFile(tmp_path / "cvat.zip") as archive:
        cats = json.loads(archive.read("annotations/instances_default.json"))["categories"]
    assert [c["name"] for c in cats] == [VEHICLE, GROUND]  # label4 is mapped to null: dropped
    script = ("import sys\nfrom datumaro.components.dataset import Dataset\n"
              "ds = Dataset.import_from(sys.argv[1], 'coco_instances')\n"
              "from datumaro.components.annotation import AnnotationType\n"
              "print('LABELS', '|'.join(c.name for c in ds.categories()[AnnotationType.label]))\n")
    folder = tmp_path / "cvat"
    with zipfile.ZipFile(tmp_path / "cvat.zip") as archive:
        archive.extractall(folder)
    done = subprocess.run([tool_python("datumaro"), "-c", script, str(folder)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("LABELS "))
    assert line[len("LABELS "):].split("|") == [VEHICLE, GROUND]


def test_semantic_coco_is_one_region_per_team_label(outputs, label_map, tmp_path):
    output = outputs["semantic"]
    export(output, "coco", str(tmp_path / "coco.json"), label_map=label_map)
    coco = COCO(str(tmp_path / "coco.json"))
    for image in coco.dataset["images"]:
        row = next(r for r in read_rows(output) if r["key"] == image["file_name"])
        labels = np.asarray(read_png(row["mask_uri"]))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        names = [coco.cats[a["category_id"]]["name"] for a in anns]
        assert sorted(names) == sorted(set(names))  # one annotation per team label
        for ann in anns:
            team = coco.cats[ann["category_id"]]["name"]
            models = [i for i, name in LABELS.items() if team_of(name) == team]
            assert np.array_equal(coco.annToMask(ann).astype(bool), np.isin(labels, models))
            assert ann["iscrowd"] == 1


def test_eval_and_preview_in_the_team_labels(outputs, label_map, tmp_path, capsys):
    # Truths written in the team's labels (from the mapped exports): every figure is 1.
    instance = tmp_path / "instance.json"
    export(outputs["instance"], "coco", str(instance), label_map=label_map)
    report = evaluate(outputs["instance"], str(instance), label_map=label_map)
    assert report["overall"]["AP"] == 1.0 and report["left_out_segments"] == 0
    panoptic = tmp_path / "panoptic"
    export(outputs["panoptic"], "coco-panoptic", str(panoptic), label_map=label_map)
    report = evaluate(outputs["panoptic"], str(panoptic / "panoptic.json"), label_map=label_map)
    assert (report["overall"]["PQ"], report["counted_categories"]["all"]) == (1.0, 2)
    semantic = tmp_path / "semantic"
    team_id = {name: i for i, name in enumerate([VEHICLE, GROUND])}
    for row in read_rows(outputs["semantic"]):
        labels = np.asarray(read_png(row["mask_uri"]))
        truth = np.full(labels.shape, 255, np.uint8)
        for model_id, name in LABELS.items():
            if team_of(name) is not None:
                truth[labels == model_id] = team_id[team_of(name)]
        path = semantic / f"{row['key'].rsplit('.', 1)[0]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(truth).save(path)
    capsys.readouterr()
    assert main(["eval", outputs["semantic"], "--truth", str(semantic), "--label-map", label_map]) == 0
    summary = dict(w.split("=", 1) for w in capsys.readouterr().out.splitlines()[-1].split()[1:])
    assert float(summary["mIoU"]) == 1.0

    paths = preview(outputs["panoptic"], str(tmp_path / "preview"), label_map=label_map)
    page = (tmp_path / "preview" / "index.html").read_text(encoding="utf-8")
    assert len(paths) == 2
    assert "label2" not in page and "ground" in page and "vehicle, &quot;wheeled&quot; é" in page
