"""``seglabel submit|status|logs|stop``: a labeling job on a Ray cluster, through the Jobs API."""

from __future__ import annotations

import argparse
import sys

from ..job import submit as jobs
from .common import add_job_flags, common, job_values

# Flags of `submit` that are not job settings.
_SUBMIT_FLAGS = ("address", "wait", "working_dir", "pip", "submission_id")


def add_parsers(sub) -> None:
    """Add ``submit``, ``status``, ``logs`` and ``stop``."""
    p = sub.add_parser(
        "submit",
        parents=[common()],
        help="submit a labeling job to a Ray cluster through the Ray Jobs API",
        description="Submit `seglabel run` with these settings to a Ray cluster "
        "(the job flags of `seglabel run` apply).",
        argument_default=argparse.SUPPRESS,
    )
    add_job_flags(p, with_address=False)
    p.add_argument("--address", required=True, help="the Jobs API URL of the head's dashboard, e.g. http://HEAD:8265")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--wait", dest="wait", action="store_true",
                      help="follow the logs and exit with the job's status (default)")
    mode.add_argument(
        "--no-wait", dest="wait", action="store_false", help="print the submission id and return"
    )
    p.add_argument("--working-dir", help="a local folder to ship with the job (e.g. a checkout with jobs/)")
    p.add_argument("--pip", action="append", metavar="REQUIREMENT",
                   help="an extra pip requirement on the cluster; repeatable")
    p.add_argument("--submission-id", help="choose the submission id (default: Ray picks one)")
    p.set_defaults(handler=submit_main)
    for name, helptext, handler in (
        ("status", "a submitted job's status", status_main),
        ("logs", "a submitted job's logs", logs_main),
        ("stop", "stop a submitted job", stop_main),
    ):
        q = sub.add_parser(name, parents=[common()], help=helptext)
        q.add_argument("submission_id", metavar="SUBMISSION_ID")
        q.add_argument("--address", required=True, help="the Jobs API URL, e.g. http://HEAD:8265")
        q.set_defaults(handler=handler)


def submit_main(args: argparse.Namespace) -> int:
    """Submit; with ``--wait`` (the default) follow the logs and exit with the job's status."""
    extra = {k: getattr(args, k) for k in _SUBMIT_FLAGS if hasattr(args, k)}
    for k in extra:
        delattr(args, k)
    address = extra["address"]
    submission_id = jobs.submit(
        address, job_values(args), working_dir=extra.get("working_dir"), pip=extra.get("pip"),
        submission_id=extra.get("submission_id"),
    )
    print(submission_id, flush=True)
    if not extra.get("wait", True):
        return 0
    status, message = jobs.wait(address, submission_id)
    if status == "SUCCEEDED":
        print(f"job {submission_id} SUCCEEDED")
        return 0
    reason = jobs.last_error_line(jobs.logs(address, submission_id)) or " ".join(message.split())[:300]
    print(f"seglabel: job {submission_id} {status}: {reason}", file=sys.stderr)
    return 1


def status_main(args: argparse.Namespace) -> int:
    """Print a job's status (and its message, when there is one)."""
    status, message = jobs.status(args.address, args.submission_id)
    print(status if not message else f"{status}: {' '.join(message.split())[:300]}")
    return 0


def logs_main(args: argparse.Namespace) -> int:
    """Print a job's logs so far."""
    sys.stdout.write(jobs.logs(args.address, args.submission_id))
    return 0


def stop_main(args: argparse.Namespace) -> int:
    """Ask a job to stop."""
    stopped = jobs.stop(args.address, args.submission_id)
    print(f"stop requested for {args.submission_id}" if stopped else f"{args.submission_id} was not running")
    return 0
