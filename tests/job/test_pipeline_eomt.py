"""`seglabel run` with EoMT checkpoints end to end (a real local Ray, local folders), and the
checkpoint licence rules as a user meets them on the command line."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from readback import check_output, read_rows

from helpers import EXPECTED, STAND_IN, write_corpus
from seglabel.cli import main
from seglabel.core.errors import ConfigError
from seglabel.engine.synthetic import save_random_checkpoint
from seglabel.job.pipeline import label

TASKS = ("instance", "semantic", "panoptic")
pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "images")


def card(folder: Path, license: str | None) -> Path:
    """A checkpoint folder's model card declaring ``license`` (none: no card at all)."""
    readme = folder / "README.md"
    if license is None:
        readme.unlink(missing_ok=True)
    else:
        readme.write_text(f"---\nlicense: {license}\ntags:\n- image-segmentation\n---\n\n# card\n")
    return folder


@pytest.mark.parametrize("task", TASKS)
def test_eomt_job_resume_and_retry(eomt_checkpoints, corpus, tmp_path, task):
    out = tmp_path / "out"
    summary = label(str(corpus), str(out), model=str(eomt_checkpoints[task]), score_threshold=0.3)
    assert (summary.found, summary.ok, summary.error) == (6, 5, 1)
    rows = check_output(str(out), task, EXPECTED)
    assert sum(len(r["segments"] or []) for r in rows.values()) > 0
    record = json.loads((out / "job.json").read_text())
    assert record["family"] == "eomt" and record["task"] == task
    assert record["model_license"]["license"] == "mit" and "README.md" in record["model_license"]["source"]
    assert "licence: mit" in summary.report()
    # A re-run finds everything done; --retry-errors labels the error row again, never twice.
    again = label(str(corpus), str(out), model=str(eomt_checkpoints[task]), score_threshold=0.3)
    assert (again.processed, again.already_done) == (0, 6)
    retried = label(str(corpus), str(out), model=str(eomt_checkpoints[task]), score_threshold=0.3,
                    retry_errors=True)
    assert retried.processed == 1
    assert len(read_rows(str(out))) == 6
    check_output(str(out), task, EXPECTED)


def test_elongated_image_is_an_error_row_in_a_semantic_job(eomt_checkpoints, corpus, tmp_path):
    strip = io.BytesIO()
    Image.fromarray(np.full((2, 3000, 3), 128, np.uint8)).save(strip, format="PNG")
    (corpus / "strip.png").write_bytes(strip.getvalue())
    out = tmp_path / "out"
    label(str(corpus), str(out), model=str(eomt_checkpoints["semantic"]))
    rows = check_output(str(out), "semantic", {**EXPECTED, "strip.png": "segment: "})
    assert "too elongated" in rows["strip.png"]["error"]


def test_another_family_at_the_same_place_is_not_mixed_in(checkpoints, eomt_checkpoints, corpus, tmp_path):
    model = tmp_path / "models" / "tiny-instance"
    shutil.copytree(checkpoints["instance"], model)
    out = tmp_path / "out"
    label(str(corpus), str(out), model=str(model), score_threshold=0.3, limit=2)
    shutil.rmtree(model)
    shutil.copytree(eomt_checkpoints["instance"], model)  # replaced by an EoMT checkpoint
    with pytest.raises(ConfigError, match="family: 'mask2former' -> 'eomt'"):
        label(str(corpus), str(out), model=str(model), score_threshold=0.3)
    assert len(read_rows(str(out))) == 2


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["run", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    """stderr's lines that are not log records (the refusal, when there is one)."""
    return [line for line in err.strip().splitlines() if " INFO " not in line and " WARNING " not in line]


@pytest.mark.parametrize("declared", ["cc-by-nc-4.0", None, "other"])
def test_require_license_refuses_before_anything_is_written(eomt_checkpoints, corpus, tmp_path, capsys,
                                                             declared):
    copy = shutil.copytree(eomt_checkpoints["panoptic"], tmp_path / "m_coco_panoptic_eomt")
    model = card(Path(copy), declared)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", str(out), "--model", str(model),
                           "--require-license", "MIT,apache-2.0")
    assert code == 2
    refusal = error_lines(err)
    assert len(refusal) == 1 and "--require-license allows only mit,apache-2.0" in refusal[0]
    assert (declared or "unknown") in refusal[0]
    assert not out.exists()


def test_accepted_licence_runs_and_a_noncommercial_one_is_announced(eomt_checkpoints, corpus, tmp_path,
                                                                   capsys):
    code, out_text, err = run_cli(capsys, "--input", str(corpus), "--output", str(tmp_path / "a"), "--model",
                                  str(eomt_checkpoints["instance"]), "--require-license", "apache-2.0,mit",
                                  "--limit", "1", "--stand-in", STAND_IN)  # the driver reads the licence
    assert code == 0
    assert "licence mit" in err and "checkpoint licence: mit" in out_text + err
    nc = card(Path(shutil.copytree(eomt_checkpoints["instance"], tmp_path / "nc_coco_instance_eomt")),
              "cc-by-nc-4.0")
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", str(tmp_path / "b"), "--model",
                           str(nc), "--limit", "1", "--stand-in", STAND_IN)
    assert code == 0
    assert "may not be used commercially" in err
    record = json.loads((tmp_path / "b" / "job.json").read_text())
    assert record["model_license"]["license"] == "cc-by-nc-4.0"


def test_resolution_and_foreign_checkpoints_are_one_line_before_anything_runs(eomt_checkpoints, corpus,
                                                                             tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", str(out), "--model",
                           str(eomt_checkpoints["panoptic"]), "--resolution", "800")
    assert code == 2 and len(error_lines(err)) == 1
    assert "--resolution applies to Mask2Former" in error_lines(err)[0]
    # A checkpoint that cuts images into crops, run as panoptic: refused before job.json exists.
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", str(out), "--model",
                           str(eomt_checkpoints["semantic"]), "--task", "panoptic")
    assert code == 2 and len(error_lines(err)) == 1 and "only semantic" in error_lines(err)[0]
    assert not out.exists()
    segformer = tmp_path / "tiny_ade_semantic_segformer"
    segformer.mkdir()
    (segformer / "config.json").write_text(json.dumps({"model_type": "segformer", "id2label": {"0": "a"}}))
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", str(out), "--model", str(segformer))
    assert code == 2 and len(error_lines(err)) == 1
    assert "'segformer' model" in error_lines(err)[0] and "EoMT (eomt)" in error_lines(err)[0]
    assert not out.exists()


def test_submit_checks_the_licence_before_sending(eomt_checkpoints, tmp_path, capsys):
    model = card(Path(shutil.copytree(eomt_checkpoints["instance"], tmp_path / "nc_coco_instance_eomt")),
                 "cc-by-nc-4.0")
    # Nothing listens on this port: a refusal must come before any connection is tried.
    code = main(["submit", "--address", "http://127.0.0.1:9", "--input", "s3://b/in", "--output", "s3://b/out",
                 "--model", str(model), "--require-license", "mit", "--no-wait"])
    err = capsys.readouterr().err
    assert code == 2 and "licensed cc-by-nc-4.0" in err


def test_stand_in_keeps_the_checkpoints_family(tmp_path, corpus):
    model = save_random_checkpoint(tmp_path / "tiny_coco_instance_eomt", "eomt-tiny")
    out = tmp_path / "out"
    summary = label(str(corpus), str(out), model=str(model), stand_in="segments=3,coverage=0.1")
    assert summary.ok == 5
    assert json.loads((out / "job.json").read_text())["family"] == "eomt"
