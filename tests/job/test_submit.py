"""`seglabel submit|status|logs|stop` against a real Ray head with the Jobs API, on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from readback import check_output

from helpers import EXPECTED, ROOT, STAND_IN, drawn, write_corpus
from seglabel.cli import main
from seglabel.core.config import JobConfig


@pytest.fixture(autouse=True)
def token_env(head, monkeypatch):
    """The head's token where Ray's tools look for it (RAY_AUTH_TOKEN_PATH), nothing else."""
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.home / ".ray" / "auth_token"))


@pytest.fixture
def address(head) -> str:
    return head.dashboard


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "images")


def wait_status(address: str, submission_id: str, capsys, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert main(["status", submission_id, "--address", address]) == 0
        status = capsys.readouterr().out.strip().split(":")[0]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"{submission_id} did not finish")


def test_submit_wait_runs_the_job_on_the_cluster(address, checkpoints, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["submit", "--address", address, "--wait", "--input", str(corpus), "--output", str(out),
                   "--model", str(checkpoints["instance"]), "--score-threshold", "0.3",
                   "--stand-in", STAND_IN])
    captured = capsys.readouterr()
    printed = captured.out
    assert status == 0, captured.err[-3000:]
    assert "SUCCEEDED" in printed and "labeled 6 images" in printed  # the job's own summary, followed
    check_output(str(out), "instance", EXPECTED)


def test_submit_no_wait_with_working_dir_then_status_and_logs(address, checkpoints, corpus, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    out = tmp_path / "out"
    spec.write_text(
        yaml.safe_dump({"input": str(corpus), "output": str(out), "model": str(checkpoints["semantic"]),
                        "stand_in": STAND_IN})
    )
    assert (
        main(["submit", "--address", address, "--no-wait", "--config", str(spec), "--working-dir", str(ROOT)])
        == 0
    )
    submission_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert wait_status(address, submission_id, capsys) == "SUCCEEDED"
    from seglabel.job.submit import client

    info = client(address).get_job_info(submission_id)
    assert info.entrypoint.startswith("python jobs/run_job.py")  # the shipped checkout's script ran
    assert main(["logs", submission_id, "--address", address]) == 0
    assert "labeled 6 images" in capsys.readouterr().out
    check_output(str(out), "semantic", EXPECTED)


def test_failed_job_is_reported_with_its_reason(address, corpus, tmp_path, capsys):
    status = main(["submit", "--address", address, "--input", str(corpus), "--output", str(tmp_path / "out"),
                   "--model", str(tmp_path / "no-such-model-instance")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert "FAILED" in err[-1] and "no checkpoint" in err[-1], err[-1]


def test_stop(address, checkpoints, tmp_path, capsys):
    many = tmp_path / "many"
    many.mkdir()
    for i in range(400):
        drawn(64, 48, i).save(many / f"{i:03d}.png")
    assert (
        main(
            [
                "submit",
                "--address",
                address,
                "--no-wait",
                "--input",
                str(many),
                "--output",
                str(tmp_path / "out"),
                "--model",
                str(checkpoints["instance"]),
                "--batch-size",
                "1",
            ]
        )
        == 0
    )
    submission_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["stop", submission_id, "--address", address]) == 0
    assert "stop requested" in capsys.readouterr().out
    assert wait_status(address, submission_id, capsys) == "STOPPED"


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
        "tue-mps/coco_panoptic_eomt_large_640",
    }


# -- token authentication (the head runs with Ray 2.60's default: tokens on) --------------------


def test_a_head_with_tokens_refuses_a_client_without_one(address):
    """What `ray job submit` meets without RAY_AUTH_MODE=token: a 401, so the test is real."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert err.value.code == 401


def test_without_a_token_is_one_line_saying_how_to_give_one(address, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token there
    assert main(["status", "raysubmit_anything", "--address", address]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "requires an authentication token" in err[0], err
    assert "RAY_AUTH_TOKEN" in err[0] and "~/.ray/auth_token" in err[0]


def test_a_wrong_token_is_refused_in_one_line(address, tmp_path, monkeypatch, capsys):
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(wrong))
    assert main(["status", "raysubmit_anything", "--address", address]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused the token" in err[0] and str(wrong) in err[0], err
    assert "0" * 64 not in err[0]  # never the token itself


@pytest.mark.parametrize("where", ["home", "env"])
def test_token_from_home_or_environment(head, tmp_path, monkeypatch, where):
    from seglabel.job.submit import client, find_token

    address, home = head.dashboard, head.home
    token = (home / ".ray" / "auth_token").read_text().strip()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    if where == "home":
        monkeypatch.setenv("HOME", str(home))
    else:
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    assert find_token()[0] == token
    assert isinstance(client(address).list_jobs(), list)


def test_joining_a_token_cluster_without_ray_auth_mode_says_how(head, checkpoints, corpus, tmp_path):
    """`seglabel run --address` is a Ray driver: as Ray does for an explicit address, it sends no
    token unless RAY_AUTH_MODE=token, and the failure says so in one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(head.home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    done = subprocess.run(
        [sys.executable, "-m", "seglabel", "run", "--input", str(corpus), "--output", str(tmp_path / "out"),
         "--model", str(checkpoints["instance"]), "--address", head.gcs],
        env=env, capture_output=True, text=True, timeout=300,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr[-2000:]
    assert last.startswith(f"seglabel: error: cannot join the Ray cluster at {head.gcs}")
    assert "RAY_AUTH_MODE=token" in last


@pytest.mark.parametrize(
    "flags, field",
    [
        (
            ["--input-option", "client_kwargs={aws_secret_access_key: SECRETVALUE}"],
            "input_storage_options.client_kwargs.aws_secret_access_key",
        ),
        (
            [
                "--output-option",
                "connection_string=DefaultEndpointsProtocol=https;AccountName=a;AccountKey=SECRETVALUE",
            ],
            "output_storage_options.connection_string",
        ),
        (
            ["--input-option", "headers={Authorization: Bearer SECRETVALUE}"],
            "input_storage_options.headers.Authorization",
        ),
        (
            ["--input-option", "endpoint_url=http://user:SECRETVALUE@127.0.0.1:9000"],
            "input_storage_options.endpoint_url (a URL with user information)",
        ),
        (
            ["--input-option", "client_kwargs={endpoint_url: 'https://h/x?X-Amz-Signature=SECRETVALUE'}"],
            "input_storage_options.client_kwargs.endpoint_url (a key or signature)",
        ),
        # Issue 39: names that passed.
        (["--input-option", "pwd=SECRETVALUE"], "input_storage_options.pwd"),
        (["--output-option", "client_kwargs={creds: SECRETVALUE}"],
         "output_storage_options.client_kwargs.creds"),
        (["--input-option", "client_kwargs={headers: {X-Api: SECRETVALUE}}"],
         "input_storage_options.client_kwargs.headers.X-Api"),
        # The review of issue 39's fixes: names and forms that still passed.
        (["--input-option", "passphrase=SECRETVALUE"], "input_storage_options.passphrase"),
        (["--input-option", "client_kwargs={headers: [[Authorization, SECRETVALUE]]}"],
         "input_storage_options.client_kwargs.headers"),
    ],
)
def test_submit_finds_nested_secrets_and_names_them_without_their_values(flags, field, capsys):
    argv = ["submit", "--address", "http://127.0.0.1:9", "--input", "s3://b/in", "--output", "s3://b/out"]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and "credentials" in err[0], err
    assert "SECRETVALUE" not in err[0]


def test_key_ids_are_not_secrets_but_bearer_values_are(capsys):
    argv = ["submit", "--address", "http://127.0.0.1:9", "--input", "s3://b/in", "--output", "s3://b/out"]
    from seglabel.job.submit import check_no_secrets

    check_no_secrets({"output_storage_options": {"s3_additional_kwargs": {"SSEKMSKeyId": "alias/labels"}}})
    # Settings named like secrets: how to sign, and gcsfs's identities of the platform.
    check_no_secrets({"input_storage_options": {"config_kwargs": {"signature_version": "s3v4"}},
                      "output_storage_options": {"token": "cloud"}})
    assert main(argv + ["--input-option", "headers={X-Auth: Bearer SECRETVALUE}"]) == 2
    err = capsys.readouterr().err
    assert "input_storage_options.headers.X-Auth" in err and "SECRETVALUE" not in err


@pytest.mark.parametrize("flags, field", [
    (["--pip", "git+https://oauth2:SECRETVALUE@gitlab.example/org/pkg.git"],
     "pip[0] (a URL with user information)"),
    (["--pip", "--extra-index-url https://user:SECRETVALUE@pypi.example/simple"], "pip[0]"),
    (["--working-dir", "https://user:SECRETVALUE@files.example/wd.zip"],
     "working_dir (a URL with user information)"),
    # Issue 39: signed URLs went out (only the spec's strings were checked for signatures).
    (["--pip", "pkg @ https://acct.blob.core.windows.net/wheels/pkg-1.0-py3-none-any.whl?sv=2022-11-02&sig=SECRETVALUE"],
     "pip[0] (a signed URL)"),
    (["--working-dir", "https://storage.googleapis.com/b/wd.zip?X-Goog-Algorithm=GOOG4-RSA-SHA256"
                       "&X-Goog-Signature=SECRETVALUE"], "working_dir (a signed URL)"),
    (["--pip", "https://h/simple?%73ig=SECRETVALUE"], "pip[0] (a signed URL)"),
    (["--pip", "s3://b/p-1.0-py3-none-any.whl?X-Amz-Signature=SECRETVALUE"], "pip[0] (a signed URL)"),
    (["--working-dir", "gs://b/wd.zip?X-Goog-Signature=SECRETVALUE"], "working_dir (a signed URL)"),
])
def test_every_field_sent_is_checked_for_secrets(flags, field, capsys):
    """A pip requirement or a working_dir URL with a password went into the runtime_env as it
    was, readable by anyone who can list the cluster's jobs."""
    argv = ["submit", "--address", "http://127.0.0.1:9", "--input", "s3://b/in", "--output", "s3://b/out"]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and "credentials" in err[0], err
    assert "SECRETVALUE" not in err[0]


def test_harmless_pip_requirements_and_shared_options_are_sent(tmp_path):
    """Only a requirement's URLs are checked ("tiktoken==0.7.0" holds "token="; git+ssh's "git@"
    is a user, not a secret), and one options dict given for input and output travels without
    YAML aliases, which the cluster's spec reader would have to expand."""
    from seglabel.job.submit import (  # private: the two halves of what submit sends
        _NoAliases,
        _url_credentials,
    )
    from seglabel.storage.spec import load_spec

    for requirement in ("tiktoken==0.7.0", "git+ssh://git@github.com/org/pkg.git", "https://h/pkg.whl"):
        assert list(_url_credentials(requirement, "pip[0]")) == []
    assert list(_url_credentials("git+https://TOKEN@github.com/org/pkg.git", "pip[0]"))
    shared = {"endpoint_url": "http://127.0.0.1:9000"}
    spec = yaml.dump({"input": "s3://b/in", "output": "s3://b/out", "input_storage_options": shared,
                      "output_storage_options": shared}, Dumper=_NoAliases)
    assert "&" not in spec and "*" not in spec
    (tmp_path / "spec.yaml").write_text(spec)
    assert load_spec(str(tmp_path / "spec.yaml"))["output_storage_options"] == shared


def test_credential_files_are_never_packed_into_a_working_dir(tmp_path):
    """Ray's own packer, given seglabel's excludes, leaves out .env, cloud credentials and key
    files, and packs the rest of a checkout."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from seglabel.job.submit import WORKING_DIR_EXCLUDES

    wd = tmp_path / "checkout"
    secret = [".env", ".env.production", ".aws/credentials", "service-account.json", "deploy/key.pem",
              "certs/server-key.pem", "gcp/credentials.json",
              ".config/gcloud/application_default_credentials.json", ".ssh/id_rsa", ".netrc",
              ".git-credentials",
              # Issue 39: missed, or (.config/gcloud below the root) excluded only at the root.
              ".s3cfg", ".boto", "tools/rclone.conf", ".pgpass", "certs/server.pem", "deploy/.s3cfg",
              "home/.config/gcloud/credentials.db", "home/.config/rclone/rclone.conf"]
    kept = ["jobs/run_job.py", "jobs/coco.yaml", "README.md", "src/keys.py", "model/config.json",
            "pkg/credentials.py", "model/tokenizer.json", "env.py", "home/.config/app/settings.toml"]
    for name in secret + kept:
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text("x")
    package = tmp_path / "wd.zip"
    create_package(str(wd), package, include_gitignore=False, excludes=WORKING_DIR_EXCLUDES)
    names = {n for n in zipfile.ZipFile(package).namelist() if not n.endswith("/")}
    assert names == set(kept)


def test_links_ray_would_follow_are_refused(tmp_path, capsys):
    """Issue 39 and its review: Ray's packer follows links. One to a folder above packed the tree
    inside itself again and again; two folders linking to each other double the paths at each
    level; ``k -> .kube`` shipped the excluded folder under another name; one to a file elsewhere
    shipped it. Links to files inside, what the excludes leave out (a virtualenv's python) and
    what a .gitignore leaves out (a data link), are fine."""
    argv = ["submit", "--address", "http://127.0.0.1:9", "--input", "s3://b/in", "--output", "s3://b/out"]
    outside = tmp_path / "home" / ".aws"
    outside.mkdir(parents=True)
    (outside / "credentials").write_text("SECRETVALUE")
    wd = tmp_path / "checkout"
    (wd / "jobs").mkdir(parents=True)
    (wd / "jobs" / "coco.yaml").write_text("input: x\n")
    (wd / "jobs" / "same.yaml").symlink_to("coco.yaml")
    (wd / ".venv" / "bin").mkdir(parents=True)
    (wd / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (wd / ".kube").mkdir()
    (wd / ".kube" / "config").write_text("SECRETVALUE")
    (wd / "data").symlink_to(tmp_path / "home")
    (wd / ".gitignore").write_text("data\n")
    assert main(argv + ["--working-dir", str(wd)]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Ray Jobs API" in err and "link" not in err, err  # got as far as sending
    (wd / "a").mkdir()
    (wd / "b").mkdir()
    for name, target, says in (("aws", outside / "credentials", "'conf/aws' that leaves it"),
                               ("up", tmp_path, "'conf/up' to a folder"),
                               ("loop", wd, "'conf/loop' to a folder"),
                               ("k", wd / ".kube", "'conf/k' to a folder"),
                               ("kubeconfig", wd / ".kube" / "config", "to a file the excludes"),
                               ("sibling", wd / "a", "'conf/sibling' to a folder")):
        (wd / "conf").mkdir(exist_ok=True)
        (wd / "conf" / name).symlink_to(target)
        assert main(argv + ["--working-dir", str(wd)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        (wd / "conf" / name).unlink()


def test_credential_files_are_left_out_in_any_letter_case(tmp_path):
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from seglabel.job.submit import WORKING_DIR_EXCLUDES

    wd = tmp_path / "checkout"
    for name in (".ENV", ".AWS/config", "deploy/Server.PEM", "jobs/run_job.py"):
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text("x")
    package = tmp_path / "wd.zip"
    create_package(str(wd), package, include_gitignore=False, excludes=WORKING_DIR_EXCLUDES)
    assert {n for n in zipfile.ZipFile(package).namelist() if not n.endswith("/")} == {"jobs/run_job.py"}
