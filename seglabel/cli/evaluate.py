"""``seglabel eval``: score a job's labels against a labeled sample."""

from __future__ import annotations

import argparse

from ..core.config import DEFAULT_MAX_BYTES
from ..evaluation.evaluate import evaluate
from ..evaluation.report import report_table, summary_line
from .common import common, positive_int, reader_flags, storage_option_flag, unmapped


def add_parsers(sub) -> None:
    """Add ``seglabel eval``."""
    p = sub.add_parser(
        "eval",
        parents=[common()],
        help="score a job's labels against ground truth (mask AP, PQ or mIoU)",
        description=(
            "Score a job's output against a labeled sample, by the job's task. instance: --truth is a COCO "
            "instances JSON; mask AP by pycocotools' COCOeval. panoptic: a COCO panoptic JSON (its PNGs "
            "in --truth-masks, default the JSON path without .json); PQ/SQ/RQ as panopticapi has them. "
            "semantic: a folder of label PNGs named like the images (x.png for x.jpg); mIoU, IoU per class, "
            "pixel accuracy. Images are matched by key, categories by name. Prints a table and, last, one "
            "line of name=value words."
        ),
    )
    p.add_argument("output", metavar="OUTPUT", help="a job's output URL (finished or partial)")
    p.add_argument("--truth", required=True, metavar="URL",
                   help="COCO instances or panoptic JSON, or a folder of semantic label PNGs")
    p.add_argument("--truth-masks", dest="truth_masks", metavar="URL",
                   help="panoptic: the folder of the truth's PNGs (default: --truth without .json)")
    p.add_argument("--truth-labels", dest="truth_labels", metavar="FILE",
                   help="semantic: the names of the truth's ids (YAML/JSON {id: name} or a list); "
                   "default: the model's ids")
    p.add_argument("--ignore-index", dest="ignore_index", type=int, default=255, metavar="ID",
                   help="semantic: truth pixels not scored (default 255)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="score the first N matched images")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--per-image", dest="per_image", metavar="PATH",
                   help="write a Parquet table: key, quality, truth_segments, predicted_segments")
    p.add_argument("--max-bytes", dest="max_bytes", type=positive_int, default=DEFAULT_MAX_BYTES, metavar="N",
                   help="refuse truth PNGs larger than this")
    reader_flags(p)
    storage_option_flag(p, "--truth-option", "truth_storage_options", "the truth")
    storage_option_flag(p, "--to-option", "to_storage_options", "--json and --per-image")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """Score, print the table, then the summary line."""
    report = evaluate(
        args.output,
        args.truth,
        truth_masks=args.truth_masks,
        truth_labels=args.truth_labels,
        label_map=args.label_map,
        unmapped=unmapped(args),
        ignore_index=args.ignore_index,
        limit=args.limit,
        per_image=args.per_image,
        json=args.json,
        max_bytes=args.max_bytes,
        storage_options=dict(args.output_storage_options),
        truth_storage_options=dict(args.truth_storage_options),
        to_storage_options=dict(args.to_storage_options),
    )
    print(report_table(report))
    print(summary_line(report))
    return 0
