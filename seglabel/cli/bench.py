"""``seglabel bench``: the usual HF loop, the Segmenter alone and the whole pipeline, measured
on the same images and checkpoint (or the driver's memory, with ``--memory``)."""

from __future__ import annotations

import argparse

from ..core.config import DTYPES, TASKS
from .common import common

# Flags that are not bench settings.
_NOT_SETTINGS = ("command", "log_level", "config", "handler")


def add_parsers(sub) -> None:
    """Add ``seglabel bench``."""
    p = sub.add_parser(
        "bench",
        parents=[common()],
        help="measure the usual HF loop, the Segmenter alone and the whole pipeline on the same images",
        description="Images/s of (a) the usual Hugging Face loop, (b) the Segmenter alone and (c) the whole "
        "pipeline, on the same images and checkpoint, with per-stage times and segments per image.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--config", metavar="SPEC.yaml", help="a YAML file of these settings by name (flags override it)"
    )
    _add_checkpoint_flags(p.add_argument_group("checkpoint"))
    _add_image_flags(p.add_argument_group("images"))
    _add_engine_flags(p.add_argument_group("engine"))
    _add_run_flags(p.add_argument_group("run"))
    p.set_defaults(handler=main)


def _add_checkpoint_flags(m: argparse._ArgumentGroup) -> None:
    """Which checkpoint: a real one, or a random one built and calibrated here."""
    from ..bench.config import ARCHS

    m.add_argument(
        "--model", metavar="ID_OR_PATH", help="a Hub id or checkpoint directory (instead of --arch)"
    )
    m.add_argument("--revision")
    m.add_argument(
        "--arch", choices=ARCHS, help="build a random-weight checkpoint of this shape (default tiny)"
    )
    m.add_argument("--task", choices=TASKS, help="default: from --model's name, else instance")
    m.add_argument(
        "--target-segments",
        dest="target_segments",
        type=float,
        metavar="N",
        help="--arch: calibrate the random model to about N segments per image (default 20; 0: as built)",
    )
    m.add_argument("--mask-coverage", dest="mask_coverage", type=float, metavar="F",
                   help="--arch: shape each random mask to cover about this share of the image "
                        "(default 0.04; 0: as built)")


def _add_image_flags(i: argparse._ArgumentGroup) -> None:
    """The images every phase runs on."""
    i.add_argument("--images", type=int, metavar="N", help="how many images (default 64)")
    i.add_argument("--size", metavar="S|HxW|native", help="resize the photos to this (default 384)")
    i.add_argument("--photos", metavar="DIR", help="a folder of photos to cycle (default skimage.data's)")


def _add_engine_flags(e: argparse._ArgumentGroup) -> None:
    """The engine's settings, the same for every phase."""
    e.add_argument(
        "--batch-size", dest="batch_size", type=int, metavar="N", help="Segmenter batch (default 8)"
    )
    e.add_argument("--dtype", choices=DTYPES, help="Segmenter dtype (default bf16 on CUDA, fp32 on CPU)")
    e.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1 (default cuda if available)")
    e.add_argument(
        "--resolution", metavar="HxW|S|S:L", help="model input size for all three (default the checkpoint's)"
    )
    e.add_argument("--score-threshold", dest="score_threshold", type=float, metavar="S")
    e.add_argument("--mask-threshold", dest="mask_threshold", type=float, metavar="S")
    e.add_argument("--overlap-threshold", dest="overlap_threshold", type=float, metavar="S")
    e.add_argument("--threads", type=int, metavar="N", help="torch CPU threads for (a) and (b)")
    e.add_argument("--compile", action="store_true",
                   help="(b) and (c): torch.compile the model (cached on disk; compiling falls in (b)'s "
                   "timed warm-up)")


def _add_run_flags(r: argparse._ArgumentGroup) -> None:
    """Which phases run and how, where (c) runs, what is written, and the other measures
    (``--stand-in``, ``--memory``) that replace the three phases."""
    r.add_argument(
        "--hf-images", dest="hf_images", type=int, metavar="N", help="run (a) on the first N images only"
    )
    r.add_argument("--pipeline-repeat", dest="pipeline_repeat", type=int, metavar="K",
                   help="(c): write each image K times, so that the job's start-up weighs less (default 1)")
    r.add_argument("--pipeline-warm-up", dest="pipeline_warm_up", type=int, metavar="N",
                   help="(c) and --stand-in: an untimed job of N images first (cycled), in the same Ray, so "
                   "that the timed one finds Ray Data's actors and its own workers up: a best case for a "
                   "later job on a long-lived cluster (default 0)")
    r.add_argument(
        "--warmup", type=int, metavar="N", help="untimed warm-up calls before (a) and (b) (default 1)"
    )
    r.add_argument("--skip-hf", dest="skip_hf", action="store_true", help="leave out (a)")
    r.add_argument("--skip-pipeline", dest="skip_pipeline", action="store_true", help="leave out (c)")
    r.add_argument("--num-gpus", dest="num_gpus", type=int, metavar="N",
                   help="(c): Segmenter actors on GPUs (default 1)")
    r.add_argument("--address", help="(c): a Ray cluster (default RAY_ADDRESS or an embedded local Ray)")
    r.add_argument("--workdir", metavar="URL",
                   help="(c): where the image files and outputs go (on a cluster: shared storage)")
    r.add_argument("--keep", action="store_true", help="(c): keep the image files and outputs")
    r.add_argument("--json", metavar="PATH", help="write every figure and the environment as JSON")
    r.add_argument("--stand-in", dest="stand_in", nargs="?", const="default", metavar="SPEC",
                   help="measure the pipeline without the model instead: (r) its CPU work in one loop on "
                   "one core, (p) seglabel run with the model replaced by a stand-in "
                   "('segments=20,coverage=0.05'), and efficiency p / (r x cores)")
    r.add_argument("--memory", action="store_true",
                   help="measure the driver's memory per image (enumeration, resume, commit, totals) instead")
    r.add_argument("--memory-entries", dest="memory_entries", type=int, metavar="N",
                   help="--memory: the larger of its two sizes; the smaller is N/6 (default 1,200,000)")


def main(args: argparse.Namespace) -> int:
    """Run the bench the flags (and ``--config``) describe and print its report."""
    from ..bench import (
        BenchConfig,
        memory_report,
        memory_text,
        report,
        run_bench,
        run_plumbing_bench,
        write_json,
    )
    from ..bench.measure import environment, torch_device

    flags = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    config = BenchConfig.from_spec(getattr(args, "config", None), flags)
    if config.memory:
        mem = memory_report(config.memory_entries)
        print(memory_text(mem))
        if config.json:
            write_json({"memory": mem, "environment": environment(torch_device("cpu"))}, config.json)
        return 0
    if config.stand_in is not None:
        from ..bench.plumbing import report as plumbing_text

        print(plumbing_text(run_plumbing_bench(config)))
        if config.json:
            print(f"figures written to {config.json}")
        return 0
    result = run_bench(config)
    print(report(result))
    if config.json:
        print(f"figures written to {config.json}")
    return 0
