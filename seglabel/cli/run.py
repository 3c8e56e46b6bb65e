"""``seglabel run``: label every image under an input URL (or listed in a manifest)."""

from __future__ import annotations

import argparse

from .common import add_job_flags, common, job_config


def add_parsers(sub) -> None:
    """Add ``seglabel run``."""
    p = sub.add_parser(
        "run",
        parents=[common()],
        help="label every image under an input URL (or listed in a manifest) into an output URL",
        description="Label images with Mask2Former or EoMT: PNG masks and Parquet metadata under --output.",
        argument_default=argparse.SUPPRESS,
    )
    add_job_flags(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """Run the job the flags (and ``--config``) describe and print its summary."""
    from ..job.pipeline import run  # the job's modules (torch, Ray) only when a job runs

    summary = run(job_config(args))
    print(summary.report())
    return 0
