"""The ``seglabel`` command line: one module per command, each only parsing its flags and calling
the library.

Every mistake a user can make on the command line or in a job spec ends as one readable line on
stderr and a non-zero exit (2 for bad settings or inputs, 1 for a job that failed while
running), never as a traceback: the library raises :class:`~seglabel.core.errors.SeglabelError`
subclasses, handled here in one place. ``--log-level debug`` shows tracebacks.

Nothing below this package imports it: it depends on the library, never the other way round.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..core.errors import SeglabelError, one_line
from ..core.redaction import get_logger
from . import bench, evaluate, export, inspect, preview, run, submit
from .common import LOG_LEVELS, Parser, setup_logging

log = get_logger("seglabel")

COMMANDS = (run, inspect, export, evaluate, preview, submit, bench)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets ``handler`` to the function that runs it."""
    parser = Parser(prog="seglabel", description="Pre-label image corpora with Mask2Former or EoMT.")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    parser.set_defaults(log_level="info")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``seglabel`` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag already reported in one line
        return int(exc.code or 0)
    setup_logging(args.log_level)
    try:
        return args.handler(args)
    except SeglabelError as exc:
        log.debug("details", exc_info=True)
        print(f"seglabel: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("seglabel: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a job that failed while running (Ray, storage, the model)
        log.debug("details", exc_info=True)
        print(f"seglabel: failed: {type(exc).__name__}: {one_line(exc, 500)}", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main"]
