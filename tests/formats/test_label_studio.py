"""Label Studio, the real server (issue 26, part 3): a project created with the labeling config
`seglabel export --format label-studio` writes, the tasks imported over the REST API, and every
prediction read back from Label Studio with its score and only labels its config holds: brush
masks and polygons, in the model's labels and in a team's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from skimage import data

from helpers import hand_made_output, label_studio, ok_row, photo_job
from seglabel.formats.export import export


@pytest.fixture(scope="module")
def output(ray_session, tmp_path_factory, checkpoints) -> str:
    photos = {"astronaut.jpg": data.astronaut(), "coffee, 'hot' #1.png": data.coffee(),
              "cat.png": data.chelsea()}
    return photo_job(tmp_path_factory.mktemp("ls"), checkpoints["instance"], photos,
                     stand_in="segments=6,coverage=0.03")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with label_studio(tmp_path_factory.mktemp("label-studio")) as server:
        yield server


@pytest.mark.parametrize("mask_format, label_map", [("rle", None), ("polygon", None), ("polygon", "team")])
def test_label_studio_imports_the_tasks_with_the_generated_config(output, studio, tmp_path, mask_format,
                                                                   label_map):
    options = {}
    if label_map:
        (tmp_path / "team.yaml").write_text('label0: "person, \\"adult\\""\nlabel1: thing\nlabel2: thing\n')
        options = {"label_map": str(tmp_path / "team.yaml")}
    to = tmp_path / "tasks.json"
    counts = export(output, "label-studio", str(to), mask_format=mask_format, from_name="mask",
                    to_name="photo", **options)
    config = Path(counts["labeling_config"])
    assert config == tmp_path / "tasks.labeling-config.xml"
    project = studio.call("POST", "/api/projects", {"title": f"seglabel {mask_format} {label_map}",
                                                    "label_config": config.read_text(encoding="utf-8")})
    # Label Studio's own reading of the config: one control of the kind the tasks use.
    parsed = project["parsed_label_config"]
    tag = "PolygonLabels" if mask_format == "polygon" else "BrushLabels"
    assert list(parsed) == ["mask"] and parsed["mask"]["type"] == tag
    assert parsed["mask"]["to_name"] == ["photo"]
    tasks = json.loads(to.read_text())
    exported = {t["data"]["key"]: t["predictions"][0] for t in tasks}
    labels = {r["value"][tag.lower()][0] for p in exported.values() for r in p["result"]}
    # Every label the export can hold, the ones that occur among them.
    expected = {'person, "adult"', "thing"} if label_map else {f"label{i}" for i in range(5)}
    assert set(parsed["mask"]["labels"]) == expected and labels <= expected and labels
    imported = studio.call("POST", f"/api/projects/{project['id']}/import?commit_to_project=true", tasks)
    assert (imported["task_count"], imported["prediction_count"]) == (len(tasks), len(tasks))
    listed = studio.call("GET", f"/api/tasks?project={project['id']}&page_size=100")
    listed = listed["tasks"] if isinstance(listed, dict) else listed
    assert len(listed) == len(tasks)
    for task in listed:
        predictions = studio.call("GET", f"/api/predictions?task={task['id']}")
        assert len(predictions) == 1
        mine = exported[task["data"]["key"]]
        assert predictions[0]["score"] == pytest.approx(mine["score"])
        results = predictions[0]["result"]
        assert len(results) == len(mine["result"]) > 0
        for result in results:
            assert result["type"] == tag.lower()
            assert (result["from_name"], result["to_name"]) == ("mask", "photo")
            assert result["value"][tag.lower()][0] in parsed["mask"]["labels"]


def test_label_studio_serves_the_most_doubtful_task_first(output, studio, tmp_path):
    """Label Studio's uncertainty sampling serves the task whose prediction scores lowest: with
    the exported scores (1 - review score), the image of the highest review score comes first."""
    to = tmp_path / "tasks.json"
    counts = export(output, "label-studio", str(to))
    tasks = json.loads(to.read_text())
    review = {t["data"]["key"]: t["data"]["review_score"] for t in tasks}
    assert len(set(review.values())) == len(tasks) == 3
    config = Path(counts["labeling_config"]).read_text(encoding="utf-8")
    project = studio.call("POST", "/api/projects", {"title": "seglabel review order", "label_config": config})
    studio.call("POST", f"/api/projects/{project['id']}/import?commit_to_project=true", tasks)
    model_version = tasks[0]["predictions"][0]["model_version"]
    studio.call("PATCH", f"/api/projects/{project['id']}",
                {"sampling": "Uncertainty sampling", "model_version": model_version})
    served = studio.call("GET", f"/api/projects/{project['id']}/next")
    assert served["data"]["key"] == max(review, key=review.get)


def test_label_studio_local_files_urls_carry_the_whole_key(tmp_path):
    """The mapping seglabel's own warning suggests (file:///data/=/data/local-files/?d=) once
    left the rest unencoded: "sp ace#frag?q=1.png" reached Label Studio as "in1/sp ace"."""
    from urllib.parse import parse_qs, urlsplit

    from seglabel.formats.export import export

    keys = ["in1/sp ace#frag?q=1.png", "a&b+c=d.png", "plain.png"]
    out = hand_made_output(tmp_path / "out", [ok_row(k, f"file:///data/{k}") for k in keys], {"0": "x"})
    export(str(out), "label-studio", str(tmp_path / "ls.json"),
           image_prefix_map={"file:///data/": "/data/local-files/?d="})
    tasks = json.loads((tmp_path / "ls.json").read_text())
    for task in tasks:
        url = urlsplit(task["data"]["image"])
        assert url.path == "/data/local-files/" and not url.fragment
        assert parse_qs(url.query) == {"d": [task["data"]["key"]]}
    assert sorted(t["data"]["key"] for t in tasks) == sorted(keys)


def test_the_labeling_config_lists_a_shared_name_once_and_is_well_formed():
    """Issue 35: two model labels with one name gave two identical <Label> entries."""
    import xml.etree.ElementTree as ET

    from seglabel.formats.label_studio import labeling_config

    config = labeling_config({0: "car", 1: "car", 2: 'd"o<g&', 3: "caf\u00e9", 4: "cafe\u0301"},
                             "rle", "label", "image")
    values = [label.get("value") for label in ET.fromstring(config).iter("Label")]
    assert values == ["car", 'd"o<g&', "caf\u00e9"]  # "café" written two ways is one name


def test_a_job_record_naming_a_label_no_format_can_hold_is_one_line(tmp_path, capsys):
    """Issue 35: a label name XML cannot hold (from a damaged or hand-written job.json) reached
    Label Studio's config, exit 0, not well-formed. Readers refuse it before writing anything."""
    from helpers import one_line_error

    out = hand_made_output(tmp_path / "out", [ok_row("a.png", "file:///a.png")], {"0": "car\ufffe"})
    (out / "_SUCCESS").write_text('{"total": 1}')
    dest = tmp_path / "tasks.json"
    line = one_line_error(capsys, ["export", str(out), "--format", "label-studio", "--to", str(dest)])
    assert "job.json names label 0" in line and "a non-character (U+FFFE)" in line, line
    assert not dest.exists() and not list(tmp_path.glob("tasks*"))
    # Keys that are not label ids ("00" and "0" would both be label 0): refused as well.
    out2 = hand_made_output(tmp_path / "out2", [ok_row("a.png", "file:///a.png")], {"0": "a", "00": "b"})
    (out2 / "_SUCCESS").write_text('{"total": 1}')
    line = one_line_error(capsys, ["export", str(out2), "--format", "label-studio", "--to", str(dest)])
    assert "its id2label keys are not label ids" in line, line
