"""What the commands share: the parser class, argument types, the job's flags, logging."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import yaml

from ..core.config import JobConfig, check_expansion
from ..core.errors import ConfigError
from ..outputs.labelmap import UNMAPPED, UNMAPPED_WITHOUT_MAP
from ..outputs.order import ORDERS
from ..storage.spec import load_spec

LOG_LEVELS = ("debug", "info", "warning", "error")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the usage is one ``--help`` away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as a storage option; the value is read as a YAML scalar, so that
    ``anon=true`` and a port number arrive typed."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value else ""
        check_expansion(parsed, f"the value of {text[:40]!r}")
    except (yaml.YAMLError, ConfigError) as exc:
        reason = " ".join(str(exc).split())
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r}: {reason}") from None
    return key.strip(), parsed


def storage_option_flag(p: argparse.ArgumentParser, flag: str, dest: str, what: str) -> None:
    """A repeatable ``--X-option KEY=VALUE`` flag: fsspec storage options for ``what``."""
    p.add_argument(flag, dest=dest, metavar="KEY=VALUE", type=key_value, action="append", default=[],
                   help=f"fsspec storage option for {what}; repeatable")


def label_map_flags(p: argparse.ArgumentParser) -> None:
    """``--label-map`` and ``--unmapped``: read an output in a team's own labels."""
    p.add_argument("--label-map", dest="label_map", metavar="FILE",
                   help="YAML or JSON {model_label: team_label} (many to one; null drops a label): "
                   "work in the team's labels; the job's own files are not changed")
    p.add_argument("--unmapped", choices=UNMAPPED, default=None,
                   help="with --label-map: model labels the map does not name: drop them (default) or "
                   "keep their names")


def applies(given: Any, flag: str, needs: bool, what: str) -> None:
    """Refuse a flag given where it does nothing (``needs`` false): one line, the same in every
    command, rather than a setting silently ignored."""
    if given is not None and not needs:
        raise ConfigError(f"{flag} applies only {what}")


def unmapped(args: argparse.Namespace) -> str:
    """``--unmapped`` as given, which only a label map uses; ``drop`` by default."""
    if args.unmapped is not None and args.label_map is None:
        raise ConfigError(UNMAPPED_WITHOUT_MAP)
    return args.unmapped or UNMAPPED[0]


def order_flag(p: argparse.ArgumentParser, what: str) -> None:
    """``--order``: the output's order, or the review score's (most doubtful first)."""
    p.add_argument("--order", choices=ORDERS, default="output",
                   help=f"{what} in the output's order (default) or by review score, most doubtful "
                   "first (rows spooled to a local temporary file)")


def reader_flags(p: argparse.ArgumentParser, order: str | None = None) -> None:
    """The flags every reader of an output takes (export, preview, eval): ``--label-map`` and
    ``--unmapped``, ``--order`` where it takes one (``order`` says what it orders), and
    ``--output-option``."""
    label_map_flags(p)
    if order is not None:
        order_flag(p, order)
    storage_option_flag(p, "--output-option", "output_storage_options", "OUTPUT")


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def common() -> argparse.ArgumentParser:
    """The flags every command takes (as a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    parent.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    return parent


def add_job_flags(p: argparse.ArgumentParser, with_address: bool = True) -> None:
    """The job's flags (shared by ``run`` and ``submit``); only the flags given are set."""
    _add_io_flags(p.add_argument_group("input and output"))
    _add_model_flags(p.add_argument_group("model"))
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--num-gpus", dest="num_gpus", type=int, metavar="N",
                         help="GPUs (= Segmenter actors) to use; default all")
    if with_address:
        cluster.add_argument(
            "--address", help="Ray cluster address (as ray.init takes it); default RAY_ADDRESS or a local Ray"
        )


def _add_io_flags(io: argparse._ArgumentGroup) -> None:
    """Where the images come from and the results go, which images, and what stops a job."""
    io.add_argument("--config", metavar="SPEC.yaml", help="a YAML job spec; flags given here override it")
    io.add_argument(
        "--input", metavar="URL", help="folder or prefix to list recursively (local path, s3://, gs://, …)"
    )
    io.add_argument(
        "--manifest", metavar="URL", help="txt/csv/parquet list of image URIs, instead of --input"
    )
    io.add_argument("--output", metavar="URL", help="where masks/, metadata/, job.json and _SUCCESS go")
    io.add_argument("--extensions", metavar="LIST",
                    help="image extensions to list (default: jpg,jpeg,png,webp,bmp,gif,tif,tiff)")
    io.add_argument(
        "--input-option",
        dest="input_storage_options",
        metavar="KEY=VALUE",
        type=key_value,
        action="append",
        help="fsspec storage option for the input (e.g. endpoint_url=…, anon=true); repeatable",
    )
    io.add_argument("--output-option", dest="output_storage_options", metavar="KEY=VALUE", type=key_value,
                    action="append", help="fsspec storage option for the output; repeatable")
    io.add_argument("--limit", type=int, metavar="N", help="label only the first N images not yet done")
    io.add_argument("--dry-run", action="store_true",
                    help="list and count (and what is already done) without running the model")
    io.add_argument("--rows-per-part", type=int, metavar="N", help="rows per Parquet part (default 10000)")
    io.add_argument(
        "--max-pixels", type=int, metavar="N", help="refuse images with more pixels (decompression bombs)"
    )
    io.add_argument("--max-bytes", type=int, metavar="N",
                    help="refuse image files larger than this (default 268435456: 256 MiB)")
    io.add_argument(
        "--overwrite", action="store_true", help="delete the output's previous results and start again"
    )
    io.add_argument(
        "--retry-errors", action="store_true", help="also re-process images whose rows are errors"
    )
    io.add_argument(
        "--max-errors",
        dest="max_errors",
        type=float,
        metavar="N|F",
        help="stop when more than N images (or a fraction F < 1 of those seen) fail; default never",
    )


def _add_model_flags(model: argparse._ArgumentGroup) -> None:
    """The checkpoint and how its outputs become segments."""
    model.add_argument("--model", metavar="ID_OR_PATH", help="Hub id, local directory or checkpoint URL "
                       "(default facebook/mask2former-swin-small-coco-instance)")
    model.add_argument("--revision", help="pin a Hub revision (branch, tag or commit)")
    model.add_argument("--require-license", dest="require_license", metavar="IDS",
                       help="refuse a checkpoint whose declared licence is not one of these "
                       "(comma-separated SPDX ids, e.g. mit,apache-2.0; 'unknown' is always refused)")
    model.add_argument(
        "--task", choices=("instance", "semantic", "panoptic"), help="default: from the checkpoint's name"
    )
    model.add_argument("--batch-size", dest="batch_size", type=int, metavar="N")
    model.add_argument(
        "--resolution", metavar="HxW|S|S:L", help="model input size, e.g. 384x384 or 800 (shortest edge)"
    )
    model.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default bf16 on CUDA, fp32 on CPU")
    model.add_argument("--score-threshold", dest="score_threshold", type=float, metavar="S")
    model.add_argument("--mask-threshold", dest="mask_threshold", type=float, metavar="S")
    model.add_argument("--overlap-threshold", dest="overlap_threshold", type=float, metavar="S")
    model.add_argument(
        "--hf-compat", dest="compat", action="store_true", help="reproduce HF's post-processing exactly"
    )
    model.add_argument(
        "--thing-labels", dest="thing_labels", metavar="LIST",
        help="panoptic: labels that are things (comma-separated, as --labels)"
    )
    model.add_argument(
        "--labels", metavar="LIST", help='keep only these labels (names or ids, comma-separated; a name '
        'with a comma in double quotes: \'"gown, evening",person\')'
    )
    model.add_argument(
        "--min-area", dest="min_area", type=int, metavar="PX", help="drop segments smaller than this"
    )
    model.add_argument("--max-instances", dest="max_instances", type=int, metavar="N",
                       help="keep at most N segments per image")
    model.add_argument("--compile", action="store_true",
                       help="torch.compile the model (cached on disk; pays on a GPU for long jobs)")
    model.add_argument("--stand-in", dest="stand_in", metavar="SPEC",
                       help="replace the model by a stand-in with no model cost, to measure the pipeline: "
                       "'segments=20,coverage=0.05' or 'default' (the checkpoint gives task and labels)")


# The flags of add_job_flags that are not job settings.
_NOT_JOB_SETTINGS = ("command", "log_level", "config", "handler")


def job_values(args: argparse.Namespace) -> dict[str, Any]:
    """The job's settings by name: the spec file's, overridden by the flags given."""
    values: dict[str, Any] = {}
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_JOB_SETTINGS}
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


def setup_logging(level: str) -> None:
    """seglabel's loggers at ``level``, other libraries' at WARNING and above, on stderr."""
    # force: main() may run several times in one process (tests, notebooks), each with that
    # moment's stderr.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("seglabel").setLevel(getattr(logging, level.upper()))
    for name in ("huggingface_hub", "transformers"):
        # These print through a handler of their own (installed when they are first used):
        # passed on to the root's as well, each of their lines (huggingface_hub's five retry
        # warnings, offline) showed twice.
        logging.getLogger(name).propagate = False


__all__ = [
    "LOG_LEVELS",
    "Parser",
    "add_job_flags",
    "common",
    "job_config",
    "job_values",
    "key_value",
    "positive_int",
    "setup_logging",
]
