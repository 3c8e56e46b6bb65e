"""Shared fixtures: loopback-only Ray and S3, offline Hugging Face, tiny random checkpoints, and
a check that the suite leaves the repository as it found it."""

from __future__ import annotations

import os
import subprocess
import sys

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
# One thread per torch (OpenMP) pool, in this process and every process it starts (Ray sets it
# for its workers already): on a 2-core machine whose cores are busy anyway, torch's spinning
# OpenMP threads cost CPU for nothing (tests/bench/test_bench.py: 113 s of CPU with two, 79 s with
# one; one bench run of the fixture on a loaded machine: 27.6 s with two, 7.9 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from helpers import ROOT, free_port, ray_head, write_token  # noqa: E402

TINY_LABELS = {i: f"label{i}" for i in range(5)}


# -- two test processes at once (pytest-xdist) ------------------------------------------------

# CPU seconds of the longest tests (measured with one test process on the 2-core machine, from
# /proc/stat around each test, 2026-12-07, and 2026-12-08 for those made cheaper since; a
# parametrized test's variants together; a module fixture's cost on the test that first used
# it), by test name, which stays when a test moves to another module. Only the order of the run
# depends on them (pytest_collection_modifyitems).
KNOWN_CPU_S = {
    "test_every_readme_block_runs_as_written": 172,
    "test_compiled_equals_eager_and_a_second_process_reuses_the_cache": 46,
    "test_eomt_job_resume_and_retry": 66,
    "test_transient_s3_failures_are_retried": 62,
    "test_driver_sigkilled_in_the_commit_window_then_rerun": 50,
    "test_segmenter_actor_killed_mid_run_is_replaced": 40,
    "test_s3_run": 16,
    "test_two_node_cluster_spreads_work": 42,
    "test_coco_from_instance_outputs": 35,
    "test_worker_node_lost_from_cluster": 34,
    "test_submit_wait_runs_the_job_on_the_cluster": 34,
    "test_driver_loads_no_model_library_for_a_local_checkpoint": 16,
    "test_coco_from_panoptic_outputs_keeps_the_things": 32,
    "test_coco_from_semantic_outputs_is_one_crowd_annotation_per_label": 31,
    "test_local_run": 31,
    "test_joining_a_token_cluster_without_ray_auth_mode_says_how": 29,
    "test_pipeline_on_a_handful_of_images": 24,
    "test_review_page_sorts_and_filters_in_chromium": 26,
    "test_panoptic_and_semantic_memory_does_not_hold_the_pixels": 26,
    "test_outputs_without_review_scores_export_inspect_and_resume": 26,
    "test_label_studio_imports_the_tasks_with_the_generated_config": 23,
    "test_panoptic_stuff_of_one_team_label_is_fused_and_the_png_agrees": 23,
    "test_success_only_when_every_image_has_a_row": 22,
    "test_instance_figures_equal_pycocotools": 20,
    "test_s3_flat_prefix_is_streamed_page_by_page": 20,
    "test_same_masks_alone_and_among_others": 19,
    "test_stand_in_bench_measures_the_pipeline_without_the_model": 11,
    "test_a_fifo_in_an_output_is_one_line_not_a_hang": 12,
    "test_damaged_state_is_one_line_naming_the_file": 10,
}
WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The whole suite (no paths given) runs on two pytest-xdist workers, a module whole to each
    (``--dist loadfile``), longest first (below): about half of one core sat idle while a
    single process waited on its Ray, servers and subprocesses. ``-n N`` chooses otherwise
    (``-n 0``: one process); paths given, or no pytest-xdist installed (the GPU image), run in
    one process as before. Set here rather than in ``addopts``, which pytest without xdist
    refuses."""
    if _xdist_worker(config):
        return  # a worker parses the command line again: it starts no workers of its own
    option = config.option
    if getattr(option, "numprocesses", "no xdist") is not None:
        return  # xdist is not installed, or -n was given
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    if option.collectonly or getattr(option, "usepdb", False):
        return
    option.numprocesses = WORKERS
    if option.dist == "no":
        option.dist = "loadfile"
        option.loadscopereorder = False  # keep the order below, not the number of tests'


def pytest_collection_modifyitems(session, config, items):
    """Test modules in the order pytest-xdist hands them out, each whole to one worker: the
    longest first, so that the two workers end together; the long ones that use no shared Ray
    first, then those that use ``ray_session``, one after the other (a worker keeps its Ray from
    one such module to the next), then the others. A module's length: its tests' KNOWN_CPU_S,
    3 s for any other test that uses ``ray_session``, 0.2 s for the rest. A module's own
    order is kept."""
    length: dict = {}
    uses_ray: dict = {}
    known: dict = {}
    for item in items:
        module = item.path
        ray = "ray_session" in item.fixturenames
        uses_ray[module] = uses_ray.get(module, False) or ray
        name = getattr(item, "originalname", item.name)
        if name in KNOWN_CPU_S:
            known.setdefault(module, set()).add(name)
        else:
            length[module] = length.get(module, 0) + (3 if ray else 0.2)
    for module, names in known.items():
        length[module] = length.get(module, 0) + sum(KNOWN_CPU_S[name] for name in names)

    def rank(module) -> tuple:
        tier = 1 if uses_ray[module] else 0 if length[module] >= 30 else 2
        return tier, -length[module]

    order = {module: i for i, module in enumerate(sorted(length, key=rank))}
    items.sort(key=lambda item: order[item.path])


# -- the repository stays clean ------------------------------------------------------------------


def _repo_status() -> set[str] | None:
    """``git status --porcelain`` of the checkout, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.splitlines())


def _xdist_worker(config) -> bool:
    """Whether this process is one of pytest-xdist's workers (the controller has no workerinput)."""
    return hasattr(config, "workerinput")


def pytest_sessionstart(session):
    # Under pytest-xdist, the controller looks before any worker starts and after all have ended;
    # a worker's view could take the other worker's files in the making for its own.
    if not _xdist_worker(session.config):
        session.config._repo_status_before = _repo_status()
        if getattr(session.config.option, "numprocesses", None):
            _ray_token()


def _ray_token() -> None:
    """The Ray token a local ``ray.init`` makes when there is none (``~/.ray/auth_token``, 256
    random bits in hex, as Ray writes it), made once here before pytest-xdist's workers start:
    two workers starting their first Ray at once could each write one, and a Ray that read the
    first would then refuse its own driver, which holds the second."""
    import secrets
    from pathlib import Path

    token = Path.home() / ".ray" / "auth_token"
    told = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    if token.exists() or any(name in os.environ for name in told):
        return
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text(secrets.token_hex(32))


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a test wrote into the repository (an output resolved against the wrong
    working directory lands there: workers do not share the driver's)."""
    before = getattr(session.config, "_repo_status_before", None)
    after = _repo_status()
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "the tests wrote into the repository:\n  " + "\n  ".join(new[:20])
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- S3 -----------------------------------------------------------------------------------------


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


# -- Ray ----------------------------------------------------------------------------------------


def _start_ray() -> None:
    """An embedded local Ray of this process (``address="local"``: never some other Ray running
    on the machine)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")


@pytest.fixture(scope="session")
def _shared_ray(s3_endpoint):
    """Stops, at the end of the session, the Ray that ``ray_session`` starts. Depends on the S3
    endpoint, so that the Ray is started after it (its workers inherit AWS_ENDPOINT_URL_S3) and
    stopped before it."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(_shared_ray):
    """One embedded local Ray for the tests that use it (a job uses it instead of starting its
    own), kept from module to module: a fresh one cost about 10 s of CPU on this 2-core machine
    (ray.init 5 s, Ray Data's own actors at its first job 3.5 s, shutdown 2 s), once per module
    before. Started here when this process holds none (the first module, or after a module that
    stopped it)."""
    import ray

    if not ray.is_initialized():
        _start_ray()
    yield


@pytest.fixture(autouse=True)
def _ray_back(request):
    """A test that uses ``ray_session`` gets it again where an earlier test of its module stopped
    it (to start a cluster of its own), as the module's first test got it."""
    if "ray_session" in request.fixturenames:
        import ray

        if not ray.is_initialized():
            _start_ray()
    yield


@pytest.fixture(scope="module", autouse=True)
def _no_shared_ray(request):
    """A module none of whose tests uses ``ray_session`` starts, as before the Ray was shared,
    with no Ray in this process: its tests start their own (an embedded one, a cluster) or join a
    head."""
    items = [item for item in request.session.items if item.module is request.module]
    ray = sys.modules.get("ray")
    if ray is not None and not any("ray_session" in item.fixturenames for item in items):
        if ray.is_initialized():
            ray.shutdown()
    yield


@pytest.fixture(scope="module")
def head(s3_endpoint, tmp_path_factory):
    """A Ray head with the Jobs API on loopback (helpers.Head), started as Ray 2.60 starts one by
    default on a machine that has a token: with token authentication on; its token is in
    ``head.home``/.ray/auth_token."""
    import ray

    ray.shutdown()  # nothing of this process may hold another Ray
    home = tmp_path_factory.mktemp("ray-home")
    write_token(home)
    with ray_head(home) as started:
        yield started


# -- checkpoints --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny random-weight checkpoints, one per task, named as the Hub names them."""
    from seglabel.engine.synthetic import save_random_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        task: save_random_checkpoint(root / f"tiny-mask2former-{task}", "tiny", TINY_LABELS)
        for task in ("instance", "semantic", "panoptic")
    }


@pytest.fixture(scope="session")
def eomt_checkpoints(tmp_path_factory):
    """Tiny random-weight EoMT checkpoints, one per task, named as the Hub names EoMT's
    (``coco_panoptic_eomt_large_640``): panoptic and instance pad images to the model's square;
    semantic cuts them into overlapping crops, as the Hub's semantic preprocessor configs do.
    Their model cards declare MIT, as the Hub's DINOv2-based EoMT cards do."""
    from seglabel.engine.synthetic import save_random_checkpoint

    root = tmp_path_factory.mktemp("eomt-checkpoints")
    return {
        task: save_random_checkpoint(
            root / f"tiny_{'ade20k' if task == 'semantic' else 'coco'}_{task}_eomt", "eomt-tiny", TINY_LABELS,
            split=task == "semantic", license="mit",
        )
        for task in ("instance", "semantic", "panoptic")
    }
