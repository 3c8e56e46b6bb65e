"""``seglabel inspect``: an output's progress and errors, read from storage alone."""

from __future__ import annotations

import argparse
import json

from ..outputs.reader import inspect_output
from ..outputs.store import OutputStore
from .common import common, key_value


def add_parsers(sub) -> None:
    """Add ``seglabel inspect``."""
    p = sub.add_parser(
        "inspect", parents=[common()], help="progress and errors of an output, read from storage alone"
    )
    p.add_argument("output", metavar="OUTPUT", help="a job's output URL")
    p.add_argument("--output-option", dest="output_storage_options", metavar="KEY=VALUE", type=key_value,
                   action="append", default=[], help="fsspec storage option; repeatable")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """Print the state of an output, as text or JSON."""
    state = inspect_output(OutputStore(args.output, dict(args.output_storage_options)))
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
        return 0
    job = state["job"] or {}
    print(f"output:   {state['output']}")
    if job:
        source = job.get("input") or job.get("manifest")
        print(f"job:      {job.get('task')} with {job.get('model')} on {source}")
    print(f"status:   {'complete' if state['complete'] else 'incomplete'}; {state['parts']} parts")
    print(f"rows:     {state['total']} ({state['ok']} ok, {state['error']} errors)")
    if state["queued_by_running_job"]:
        print(f"queued:   {state['queued_by_running_job']} images by a running or interrupted run")
    for reason, count in state["errors_by_reason"].items():
        print(f"  {count:>8}  {reason}")
    return 0
