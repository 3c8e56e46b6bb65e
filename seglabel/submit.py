"""Run a labeling job on a Ray cluster through the Ray Jobs API.

    seglabel submit --address http://HEAD:8265 --config jobs/coco-instance.yaml --wait
    seglabel status|logs|stop --address http://HEAD:8265 SUBMISSION_ID

The job's settings travel in the runtime_env (an environment variable holding the YAML spec),
so the cluster needs nothing but the installed package; ``--working-dir`` ships a folder too
(e.g. a checkout with ``jobs/``) and ``--pip`` extra requirements. The entrypoint is
``seglabel.jobs_entry``, the same code path as ``seglabel run``. The driver asks for no GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any

import yaml

from .config import ConfigError, JobConfig

log = logging.getLogger(__name__)

SPEC_ENV = "SEGLABEL_JOB_SPEC"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SUBMIT_RETRY_S = 120
# Storage-option names that carry secrets: a spec travels to the cluster in the clear, so
# credentials must come from the platform (IRSA, workload identity, instance profiles).
SECRET_OPTIONS = ("key", "secret", "token", "password", "session_token", "access_key", "secret_key", "credentials")
WORKING_DIR_EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", ".carry"]


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection refused, not a dashboard, bad URL
        raise ConfigError(f"cannot reach the Ray Jobs API at {address}: {' '.join(str(exc).split())[:300]}") from exc


def _check_no_secrets(values: dict[str, Any]) -> None:
    for name in ("input_storage_options", "output_storage_options"):
        options = values.get(name) or {}
        found = sorted(k for k in options if any(s in k.lower() for s in SECRET_OPTIONS))
        if found:
            raise ConfigError(
                f"{name} holds credentials ({', '.join(found)}); a submitted spec is visible to anyone "
                "who can read the cluster's jobs: give the cluster an identity (IRSA, workload identity, "
                "an instance profile) instead"
            )


def submit(
    address: str,
    values: dict[str, Any],
    *,
    working_dir: str | None = None,
    pip: list[str] | None = None,
    submission_id: str | None = None,
) -> str:
    """Submit a job with these settings (as in a YAML spec); returns the submission id."""
    JobConfig.from_mapping(values)  # the same validation as `seglabel run`, before anything is sent
    _check_no_secrets(values)
    spec = yaml.safe_dump(values, sort_keys=True)
    runtime_env: dict[str, Any] = {"env_vars": {SPEC_ENV: spec}}
    if working_dir:
        runtime_env["working_dir"] = working_dir
        runtime_env["excludes"] = WORKING_DIR_EXCLUDES
    if pip:
        runtime_env["pip"] = list(pip)
    # A shipped checkout runs its own jobs/ script (which calls the installed package); without
    # one the cluster's installed package alone runs the job.
    script = "jobs/run_job.py" if working_dir and os.path.isfile(os.path.join(working_dir, "jobs", "run_job.py")) else None
    entrypoint = f"python {script if script else '-m seglabel.jobs_entry'} --config env:{SPEC_ENV}"
    client = _client(address)
    deadline = time.monotonic() + SUBMIT_RETRY_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                # The driver only enumerates and commits: no GPU, and no CPU reserved either, so
                # that it also runs on a head started with num-cpus 0.
                entrypoint_num_cpus=0,
                entrypoint_num_gpus=0,
                metadata={"submitted_by": "seglabel"},
            )
        except RuntimeError as exc:
            # A head that has just started answers "No available agent ... try again later".
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise
            log.info("the cluster is not ready to take jobs yet; retrying")
            time.sleep(2)


async def _follow(client, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def wait(address: str, submission_id: str, follow: bool = True, poll_s: float = 1.0) -> tuple[str, str]:
    """Wait until the job ends (printing its logs when ``follow``); returns (status, message)."""
    client = _client(address)
    if follow:
        asyncio.run(_follow(client, submission_id))
    while True:
        info = client.get_job_info(submission_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            return status, info.message or ""
        time.sleep(poll_s)


def _last_error_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("seglabel: ")]
    return lines[-1] if lines else ""


# -- CLI ----------------------------------------------------------------------------------------


def add_parsers(sub, run_parser_for, common) -> None:
    """Add ``submit``, ``status``, ``logs`` and ``stop`` to the CLI."""
    p = sub.add_parser(
        "submit", parents=[common()],
        help="submit a labeling job to a Ray cluster through the Ray Jobs API",
        description="Submit `seglabel run` with these settings to a Ray cluster (the job flags of `seglabel run` apply).",
        argument_default=argparse.SUPPRESS,
    )
    run_parser_for(p, with_address=False)
    p.add_argument("--address", required=True, help="the Jobs API URL of the head's dashboard, e.g. http://HEAD:8265")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--wait", dest="wait", action="store_true", help="follow the logs and exit with the job's status (default)")
    mode.add_argument("--no-wait", dest="wait", action="store_false", help="print the submission id and return")
    p.add_argument("--working-dir", help="a local folder to ship with the job (e.g. a checkout with jobs/)")
    p.add_argument("--pip", action="append", metavar="REQUIREMENT", help="an extra pip requirement on the cluster; repeatable")
    p.add_argument("--submission-id", help="choose the submission id (default: Ray picks one)")
    p.set_defaults(handler=_submit_main)
    for name, helptext in (("status", "a submitted job's status"), ("logs", "a submitted job's logs"), ("stop", "stop a submitted job")):
        q = sub.add_parser(name, parents=[common()], help=helptext)
        q.add_argument("submission_id", metavar="SUBMISSION_ID")
        q.add_argument("--address", required=True, help="the Jobs API URL, e.g. http://HEAD:8265")
        q.set_defaults(handler=globals()[f"_{name}_main"])


def _submit_main(args: argparse.Namespace) -> int:
    from .cli import job_values

    extra = {k: getattr(args, k) for k in ("address", "wait", "working_dir", "pip", "submission_id") if hasattr(args, k)}
    for k in extra:
        delattr(args, k)
    values = job_values(args)
    submission_id = submit(
        extra["address"], values, working_dir=extra.get("working_dir"), pip=extra.get("pip"),
        submission_id=extra.get("submission_id"),
    )
    print(submission_id, flush=True)
    if not extra.get("wait", True):
        return 0
    status, message = wait(extra["address"], submission_id)
    if status == "SUCCEEDED":
        print(f"job {submission_id} SUCCEEDED")
        return 0
    reason = _last_error_line(_client(extra["address"]).get_job_logs(submission_id)) or " ".join(message.split())[:300]
    print(f"seglabel: job {submission_id} {status}: {reason}", file=sys.stderr)
    return 1


def _status_main(args: argparse.Namespace) -> int:
    info = _client(args.address).get_job_info(args.submission_id)
    status = str(getattr(info.status, "value", info.status))
    print(status if not info.message else f"{status}: {' '.join(info.message.split())[:300]}")
    return 0


def _logs_main(args: argparse.Namespace) -> int:
    sys.stdout.write(_client(args.address).get_job_logs(args.submission_id))
    return 0


def _stop_main(args: argparse.Namespace) -> int:
    stopped = _client(args.address).stop_job(args.submission_id)
    print(f"stop requested for {args.submission_id}" if stopped else f"{args.submission_id} was not running")
    return 0
