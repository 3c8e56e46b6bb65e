"""`seglabel submit|status|logs|stop` against a real Ray head with the Jobs API, on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import free_port
from outputs import check_output
from seglabel.cli import main
from seglabel.config import JobConfig
from test_job import EXPECTED, corpus_files

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` with the dashboard (Jobs API) on 127.0.0.1, stopped by the test."""
    import ray

    ray.shutdown()  # nothing of this process may hold another Ray
    temp = Path(f"/tmp/sgl-{os.getpid()}")  # Ray's socket paths must stay short
    port, dashboard = free_port(), free_port()
    # Ray 2.60 heads require a token by default. seglabel's client is Ray's own (it takes the
    # token from RAY_AUTH_TOKEN or ~/.ray/auth_token, as `ray job submit` does), but Ray reads
    # the auth mode once per process, and this test process has run Ray already: this loopback
    # head runs without tokens instead.
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    # Job entrypoints run `python`, as on a cluster image: this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=true", "--disable-usage-stats",
         # Ports of our own, so that nothing else on the machine can be in the way.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 60
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        # Stop this head only (not `ray stop`, which would stop every Ray on the machine):
        # its processes and all their descendants (the agents rename themselves "ray::…").
        victims = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                line = " ".join(proc.info["cmdline"] or [])
                if str(temp) in line or f"127.0.0.1:{port}" in line:
                    victims += [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in victims:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "images"
    for key, blob in corpus_files().items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(blob)
    return root


def wait_status(address: str, submission_id: str, capsys, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert main(["status", submission_id, "--address", address]) == 0
        status = capsys.readouterr().out.strip().split(":")[0]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"{submission_id} did not finish")


def test_submit_wait_runs_the_job_on_the_cluster(head, checkpoints, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["submit", "--address", head, "--wait", "--input", str(corpus), "--output", str(out),
                   "--model", str(checkpoints["instance"]), "--score-threshold", "0.3"])
    captured = capsys.readouterr()
    printed = captured.out
    assert status == 0, captured.err[-3000:]
    assert "SUCCEEDED" in printed and "labeled 6 images" in printed  # the job's own summary, followed
    check_output(str(out), "instance", EXPECTED)


def test_submit_no_wait_with_working_dir_then_status_and_logs(head, checkpoints, corpus, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    out = tmp_path / "out"
    spec.write_text(yaml.safe_dump({"input": str(corpus), "output": str(out), "model": str(checkpoints["semantic"])}))
    assert main(["submit", "--address", head, "--no-wait", "--config", str(spec), "--working-dir", str(ROOT)]) == 0
    submission_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert wait_status(head, submission_id, capsys) == "SUCCEEDED"
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(head).get_job_info(submission_id)
    assert info.entrypoint.startswith("python jobs/run_job.py")  # the shipped checkout's script ran
    assert main(["logs", submission_id, "--address", head]) == 0
    assert "labeled 6 images" in capsys.readouterr().out
    check_output(str(out), "semantic", EXPECTED)


def test_failed_job_is_reported_with_its_reason(head, corpus, tmp_path, capsys):
    status = main(["submit", "--address", head, "--input", str(corpus), "--output", str(tmp_path / "out"),
                   "--model", str(tmp_path / "no-such-model-instance")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert "FAILED" in err[-1] and "no checkpoint" in err[-1], err[-1]


def test_stop(head, checkpoints, tmp_path, capsys):
    many = tmp_path / "many"
    many.mkdir()
    from test_job import drawn

    for i in range(400):
        drawn(64, 48, i).save(many / f"{i:03d}.png")
    assert main(["submit", "--address", head, "--no-wait", "--input", str(many), "--output", str(tmp_path / "out"),
                 "--model", str(checkpoints["instance"]), "--batch-size", "1"]) == 0
    submission_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["stop", submission_id, "--address", head]) == 0
    assert "stop requested" in capsys.readouterr().out
    assert wait_status(head, submission_id, capsys) == "STOPPED"


def test_submit_refuses_credentials_and_bad_settings_before_sending(capsys):
    argv = ["submit", "--address", "http://127.0.0.1:9", "--input", "s3://b/in", "--output", "s3://b/out"]
    assert main(argv + ["--input-option", "secret=abc"]) == 2
    assert "credentials" in capsys.readouterr().err
    assert main(argv + ["--batch-size", "0"]) == 2  # validated here, nothing sent
    assert "batch_size" in capsys.readouterr().err


def test_example_job_specs_are_valid():
    specs = sorted((ROOT / "jobs").glob("*.yaml"))
    models = set()
    for spec in specs:
        values = yaml.safe_load(spec.read_text())
        if "images" in values or spec.name.startswith("bench"):
            continue  # the benchmark's spec has its own keys
        config = JobConfig.from_mapping(values)
        models.add(config.engine.model)
    assert models >= {
        "facebook/mask2former-swin-small-coco-instance",
        "facebook/mask2former-swin-large-cityscapes-semantic",
        "facebook/mask2former-swin-large-coco-panoptic",
    }
