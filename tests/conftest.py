"""Shared fixtures: loopback-only Ray and S3, offline Hugging Face, tiny random checkpoints."""

from __future__ import annotations

import os
import socket

# Set before anything imports ray, boto3 or huggingface_hub: keep Ray on 127.0.0.1 (see
# ../shared/ENVIRONMENT.md), never reach a real AWS endpoint, never download from the Hub.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

TINY_LABELS = {i: f"label{i}" for i in range(5)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server) on loopback; s3fs and boto3 everywhere use it."""
    import logging

    from moto.server import ThreadedMotoServer

    # The in-process server logs every request at INFO; keep the tests' stderr for seglabel.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL_S3"] = url
    os.environ["AWS_ENDPOINT_URL"] = url
    yield url
    server.stop()
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket for one test; returns its name."""
    import boto3

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name)
    yield name
    # Leave nothing behind for the next test with the same name (parametrised reruns).
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny random-weight checkpoints, one per task, named as the Hub names them."""
    from seglabel.synthetic import save_random_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        task: save_random_checkpoint(root / f"tiny-mask2former-{task}", "tiny", TINY_LABELS)
        for task in ("instance", "semantic", "panoptic")
    }
