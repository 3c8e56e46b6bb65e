"""`seglabel run` end to end: a real local Ray cluster, local folders and S3 on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
from readback import check_output, read_png, read_rows

from helpers import EXPECTED, STAND_IN, corpus_files, write_corpus
from seglabel.cli import main
from seglabel.cli.common import job_config
from seglabel.job.pipeline import label

TASKS = ("instance", "semantic", "panoptic")
pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "images")


@pytest.mark.parametrize("task", TASKS)
def test_local_run(checkpoints, corpus, tmp_path, task):
    out = tmp_path / "out"
    summary = label(str(corpus), str(out), model=str(checkpoints[task]), score_threshold=0.3, rows_per_part=4)
    assert (summary.found, summary.processed, summary.ok, summary.error) == (6, 6, 5, 1)
    rows = check_output(str(out), task, EXPECTED)
    assert sum(len(r["segments"] or []) for r in rows.values()) > 0
    assert rows["astronaut.jpg"]["image_uri"] == (corpus / "astronaut.jpg").as_uri().replace("%20", " ")
    assert len(list((out / "metadata").glob("*.parquet"))) == 2  # 6 rows in parts of 4
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no temporary file left


def test_driver_loads_no_model_library_for_a_local_checkpoint(checkpoints, corpus, tmp_path):
    """The driver reads a local checkpoint's labels and the libraries' versions without importing
    torch or transformers (2 s of a small machine's start, before any actor could begin); the
    versions it records are those the libraries report."""
    import ray
    import torch
    import transformers

    out = tmp_path / "out"
    code = ("import sys; from seglabel.cli import main; code = main(sys.argv[1:])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules)); sys.exit(code)")
    # The driver joins this session's Ray, as on a cluster: an embedded one of its own would cost
    # about 13 s of CPU to start and stop, and the driver's imports are the same either way.
    command = [sys.executable, "-c", code, "run", "--input", str(corpus), "--output", str(out),
               "--model", str(checkpoints["instance"]), "--address", ray.get_runtime_context().gcs_address]
    env = dict(os.environ, RAY_AUTH_MODE="token")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    check_output(str(out), "instance", EXPECTED)
    versions = json.loads((out / "job.json").read_text())["versions"]
    assert versions == {"seglabel": versions["seglabel"], "torch": torch.__version__,
                        "transformers": transformers.__version__, "ray": ray.__version__}


@pytest.mark.parametrize("task", TASKS)
def test_s3_run(checkpoints, s3_bucket, task):
    client = boto3.client("s3")
    for key, blob in corpus_files().items():
        client.put_object(Bucket=s3_bucket, Key=f"in/{key}", Body=blob)
    out = f"s3://{s3_bucket}/labels"
    # The stand-in: what is tested is storage on S3; test_local_run runs each real checkpoint.
    summary = label(f"s3://{s3_bucket}/in", out, model=str(checkpoints[task]), stand_in=STAND_IN)
    assert summary.ok == 5
    rows = check_output(out, task, EXPECTED)
    assert rows["astronaut.jpg"]["image_uri"] == f"s3://{s3_bucket}/in/astronaut.jpg"
    assert rows["astronaut.jpg"]["mask_uri"] == f"s3://{s3_bucket}/labels/masks/astronaut.jpg.png"
    job = client.get_object(Bucket=s3_bucket, Key="labels/job.json")["Body"].read().decode()
    assert "testing" not in job  # the (fake) credentials never land in outputs


def test_manifest_run(checkpoints, corpus, tmp_path):
    manifest = corpus / "list.txt"
    manifest.write_text(
        "# images to label\n"
        f"{corpus / 'astronaut.jpg'}\n"
        "photos/coffee.png\n"  # relative to the manifest's folder
        f"file://{corpus / 'photos/coffee.png'}\n"  # the same image again: counted once
        f"{corpus / 'missing.jpg'}\n"
    )
    out = tmp_path / "out"
    label(manifest=str(manifest), output=str(out), model=str(checkpoints["semantic"]), stand_in=STAND_IN)
    base = str(corpus).lstrip("/")
    check_output(str(out), "semantic", {
        f"{base}/astronaut.jpg": (512, 512),
        f"{base}/photos/coffee.png": (600, 400),
        f"{base}/missing.jpg": "read: not found",
    })


def test_limit_then_resume_and_output_inside_input(checkpoints, corpus):
    out = corpus / "labels"  # inside the input folder: never listed as input
    first = label(str(corpus), str(out), model=str(checkpoints["instance"]), limit=2, stand_in=STAND_IN)
    assert (first.found, first.processed) == (6, 2)
    assert len(read_rows(str(out))) == 2
    assert not (out / "_SUCCESS").exists() or json.loads((out / "_SUCCESS").read_text())["total"] == 2
    second = label(str(corpus), str(out), model=str(checkpoints["instance"]), stand_in=STAND_IN)
    assert (second.found, second.already_done, second.processed) == (6, 2, 4)
    check_output(str(out), "instance", EXPECTED)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    third = label(str(corpus), str(out), model=str(checkpoints["instance"]), stand_in=STAND_IN)
    assert (third.found, third.processed) == (6, 0)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_same_masks_alone_and_among_others(checkpoints, corpus, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "astronaut.jpg").write_bytes((corpus / "astronaut.jpg").read_bytes())
    label(str(single), str(tmp_path / "a"), model=str(checkpoints["panoptic"]), score_threshold=0.3)
    label(
        str(corpus),
        str(tmp_path / "b"),
        model=str(checkpoints["panoptic"]),
        score_threshold=0.3,
        batch_size=4,
    )
    alone = {r["key"]: r for r in read_rows(str(tmp_path / "a"))}["astronaut.jpg"]
    among = {r["key"]: r for r in read_rows(str(tmp_path / "b"))}["astronaut.jpg"]
    pa_, pb = np.array(read_png(alone["mask_uri"])), np.array(read_png(among["mask_uri"]))
    assert (pa_ == pb).all(axis=-1).mean() >= 0.9999
    assert [(s["id"], s["label_id"]) for s in alone["segments"]] == [
        (s["id"], s["label_id"]) for s in among["segments"]
    ]


def test_empty_input_writes_zero_success(checkpoints, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    out = tmp_path / "out"
    assert (
        main(["run", "--input", str(empty), "--output", str(out), "--model", str(checkpoints["instance"])])
        == 0
    )
    assert "no images found" in capsys.readouterr().out
    success = json.loads((out / "_SUCCESS").read_text())
    assert (success["total"], success["ok"], success["error"]) == (0, 0, 0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input", "{tmp}/does-not-exist"], "not found"),
        (["--input", "s3://no-such-bucket-here/x"], "no-such-bucket-here"),
        (["--input", "{tmp}", "--batch-size", "0"], "batch_size"),
        (["--input", "{tmp}", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["--input", "{tmp}", "--task", "detection"], "invalid choice"),
        (["--input", "{tmp}", "--score-threshold", "1.5"], "score_threshold"),
        (["--input", "{tmp}", "--model", "{tmp}/no-model-instance"], "no checkpoint"),
    ],
)
def test_bad_input_or_flag_is_one_line_and_writes_nothing(
    checkpoints, tmp_path, capsys, s3_endpoint, argv, message
):
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(checkpoints["instance"])]
    status = main(["run", *argv, "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("seglabel") and message in err[0], err
    assert not out.exists()


def test_yaml_spec_builds_the_same_config_and_flags_override(tmp_path, checkpoints, capsys):
    from seglabel.cli import build_parser

    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"input: {tmp_path}/in\noutput: {tmp_path}/out\nmodel: {checkpoints['instance']}\n"
        "batch_size: 4\nscore_threshold: 0.4\nlabels: [label1, label2]\nmax_instances: 5\n"
        "input_storage_options: {anon: true}\n"
    )
    from_flags = job_config(
        build_parser().parse_args(
            [
                "run",
                "--input",
                f"{tmp_path}/in",
                "--output",
                f"{tmp_path}/out",
                "--model",
                str(checkpoints["instance"]),
                "--batch-size",
                "4",
                "--score-threshold",
                "0.4",
                "--labels",
                "label1,label2",
                "--max-instances",
                "5",
                "--input-option",
                "anon=true",
            ]
        )
    )
    from_spec = job_config(build_parser().parse_args(["run", "--config", str(spec)]))
    assert from_spec == from_flags
    overridden = job_config(build_parser().parse_args(["run", "--config", str(spec), "--batch-size", "2"]))
    assert overridden.engine.batch_size == 2 and overridden.engine.score_threshold == 0.4
    spec.write_text(spec.read_text() + "batchsize: 3\n")
    assert main(["run", "--config", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown setting(s) batchsize" in err[0]
