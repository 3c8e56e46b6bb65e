"""The ``seglabel`` command line.

Every mistake a user can make on the command line or in a job spec ends as one readable line on
stderr and a non-zero exit (2 for bad settings or inputs, 1 for a job that failed while
running), never as a traceback. ``--log-level debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

import yaml

from .checkpoint import CheckpointError
from .config import ConfigError, JobConfig, load_spec
from .sink import OutputError
from .sources import SourceError
from .pipeline import JobError

log = logging.getLogger("seglabel")

USER_ERRORS = (ConfigError, SourceError, CheckpointError, OutputError)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the usage is one ``--help`` away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    # YAML scalars, so that anon=true and a port number arrive typed.
    return key.strip(), yaml.safe_load(value) if value else ""


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    return common


def _run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        parents=[_common()],
        help="label every image under an input URL (or listed in a manifest) into an output URL",
        description="Label images with Mask2Former: PNG masks and Parquet metadata under --output.",
        argument_default=argparse.SUPPRESS,
    )
    add_job_flags(p)


def add_job_flags(p: argparse.ArgumentParser, with_address: bool = True) -> None:
    """The job's flags (shared by ``run`` and ``submit``)."""
    io = p.add_argument_group("input and output")
    io.add_argument("--config", metavar="SPEC.yaml", help="a YAML job spec; flags given here override it")
    io.add_argument("--input", metavar="URL", help="folder or prefix to list recursively (local path, s3://, gs://, …)")
    io.add_argument("--manifest", metavar="URL", help="txt/csv/parquet list of image URIs, instead of --input")
    io.add_argument("--output", metavar="URL", help="where masks/, metadata/, job.json and _SUCCESS go")
    io.add_argument("--extensions", metavar="LIST", help="image extensions to list (default: jpg,jpeg,png,webp,bmp,gif,tif,tiff)")
    io.add_argument("--input-option", dest="input_storage_options", metavar="KEY=VALUE", type=_key_value,
                    action="append", help="fsspec storage option for the input (e.g. endpoint_url=…, anon=true); repeatable")
    io.add_argument("--output-option", dest="output_storage_options", metavar="KEY=VALUE", type=_key_value,
                    action="append", help="fsspec storage option for the output; repeatable")
    io.add_argument("--limit", type=int, metavar="N", help="label only the first N images not yet done")
    io.add_argument("--dry-run", action="store_true", help="list and count (and what is already done) without running the model")
    io.add_argument("--rows-per-part", type=int, metavar="N", help="rows per Parquet part (default 10000)")
    io.add_argument("--max-pixels", type=int, metavar="N", help="refuse images with more pixels (decompression bombs)")
    io.add_argument("--overwrite", action="store_true", help="delete the output's previous results and start again")
    io.add_argument("--retry-errors", action="store_true", help="also re-process images whose rows are errors")
    io.add_argument("--max-errors", dest="max_errors", type=float, metavar="N|F",
                    help="stop when more than N images (or a fraction F < 1 of those seen) fail; default never")

    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="ID_OR_PATH", help="Hub id, local directory or checkpoint URL "
                       "(default facebook/mask2former-swin-small-coco-instance)")
    model.add_argument("--revision", help="pin a Hub revision (branch, tag or commit)")
    model.add_argument("--task", choices=("instance", "semantic", "panoptic"), help="default: from the checkpoint's name")
    model.add_argument("--batch-size", dest="batch_size", type=int, metavar="N")
    model.add_argument("--resolution", metavar="HxW|S|S:L", help="model input size, e.g. 384x384 or 800 (shortest edge)")
    model.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default bf16 on CUDA, fp32 on CPU")
    model.add_argument("--score-threshold", dest="score_threshold", type=float, metavar="S")
    model.add_argument("--mask-threshold", dest="mask_threshold", type=float, metavar="S")
    model.add_argument("--overlap-threshold", dest="overlap_threshold", type=float, metavar="S")
    model.add_argument("--hf-compat", dest="compat", action="store_true", help="reproduce HF's post-processing exactly")
    model.add_argument("--thing-labels", dest="thing_labels", metavar="LIST", help="panoptic: labels that are things")
    model.add_argument("--labels", metavar="LIST", help="keep only these labels (names or ids, comma-separated)")
    model.add_argument("--min-area", dest="min_area", type=int, metavar="PX", help="drop segments smaller than this")
    model.add_argument("--max-instances", dest="max_instances", type=int, metavar="N", help="keep at most N segments per image")

    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--num-gpus", dest="num_gpus", type=int, metavar="N", help="GPUs (= Segmenter actors) to use; default all")
    if with_address:
        cluster.add_argument("--address", help="Ray cluster address (as ray.init takes it); default RAY_ADDRESS or a local Ray")


def _inspect_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", parents=[_common()], help="progress and errors of an output, read from storage alone"
    )
    p.add_argument("output", metavar="OUTPUT", help="a job's output URL")
    p.add_argument("--output-option", dest="output_storage_options", metavar="KEY=VALUE", type=_key_value,
                   action="append", default=[], help="fsspec storage option; repeatable")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _inspect(args: argparse.Namespace) -> int:
    import json

    from .sink import OutputStore

    state = OutputStore(args.output, dict(args.output_storage_options)).inspect()
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
        return 0
    job = state["job"] or {}
    print(f"output:   {state['output']}")
    if job:
        print(f"job:      {job.get('task')} with {job.get('model')} on {job.get('input') or job.get('manifest')}")
    print(f"status:   {'complete' if state['complete'] else 'incomplete'}; {state['parts']} parts")
    print(f"rows:     {state['total']} ({state['ok']} ok, {state['error']} errors)")
    if state["queued_by_running_job"]:
        print(f"queued:   {state['queued_by_running_job']} images by a running or interrupted run")
    for reason, count in state["errors_by_reason"].items():
        print(f"  {count:>8}  {reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seglabel", description="Pre-label image corpora with Mask2Former.")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(log_level="info")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _run_parser(sub)
    _inspect_parser(sub)
    from . import bench, export, preview, submit

    bench.add_parser(sub)
    export.add_parser(sub)
    preview.add_parser(sub)
    submit.add_parsers(sub, add_job_flags, _common)
    return parser


def job_values(args: argparse.Namespace) -> dict[str, Any]:
    """The job's settings by name: the spec file's, overridden by the flags given."""
    values: dict[str, Any] = {}
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "log_level", "config", "handler")}
    if getattr(args, "config", None):
        values.update(load_spec(args.config))
    for name in ("input_storage_options", "output_storage_options"):
        if name in flags:
            values[name] = {**(values.get(name) or {}), **dict(flags.pop(name))}
    values.update(flags)
    return values


def job_config(args: argparse.Namespace) -> JobConfig:
    """The job's validated config from a spec file and flags."""
    return JobConfig.from_mapping(job_values(args))


def _setup_logging(level: str) -> None:
    # Other libraries speak at WARNING and above; seglabel at the level asked for. force: main()
    # may run several times in one process (tests, notebooks), each with that moment's stderr.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    log.setLevel(getattr(logging, level.upper()))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``seglabel`` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag already reported in one line
        return int(exc.code or 0)
    _setup_logging(args.log_level)
    try:
        if args.command == "run":
            from .pipeline import run

            summary = run(job_config(args))
            print(summary.report())
            return 0
        if args.command == "inspect":
            return _inspect(args)
        return args.handler(args)
    except USER_ERRORS as exc:
        log.debug("details", exc_info=True)
        print(f"seglabel: error: {exc}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"seglabel: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("seglabel: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a job that failed while running (Ray, storage, the model)
        log.debug("details", exc_info=True)
        print(f"seglabel: failed: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
