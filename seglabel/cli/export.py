"""``seglabel export``: a job's labels in an annotation tool's format."""

from __future__ import annotations

import argparse

from ..core.config import label_names
from ..formats.export import FORMATS, MASK_FORMATS, export
from ..formats.polygons import DEFAULT_TOLERANCE
from .common import applies, common, positive_int, reader_flags, storage_option_flag, unmapped


def _prefix_pair(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old:
        raise argparse.ArgumentTypeError(f"expected OLD_PREFIX=NEW_PREFIX, got {text!r}")
    return old, new


def add_parsers(sub) -> None:
    """Add ``seglabel export``."""
    p = sub.add_parser(
        "export",
        parents=[common()],
        help="write a job's labels in an annotation tool's format (COCO, COCO panoptic, Label Studio, CVAT)",
        description=(
            "Export a job's masks for annotation tools, streaming its Parquet parts. coco: a COCO instances "
            "JSON (RLE masks; panoptic outputs give their thing segments; semantic outputs one iscrowd=1 "
            "annotation per label present). coco-panoptic: a folder with panoptic.json and "
            "panoptic/<key>.png. "
            "label-studio: a JSON list of tasks with brushlabels predictions. cvat: a zip CVAT imports as "
            "'COCO 1.0' (annotations/instances_default.json). Only ok rows are exported."
        ),
    )
    p.add_argument("output", metavar="OUTPUT", help="a job's output URL (finished or partial)")
    p.add_argument("--format", dest="fmt", required=True, choices=FORMATS)
    p.add_argument(
        "--to",
        required=True,
        metavar="DEST",
        help="a JSON file (coco, label-studio), a folder (coco-panoptic) or a zip (cvat); any fsspec URL",
    )
    p.add_argument(
        "--min-score", dest="min_score", type=float, metavar="S", help="keep segments scoring at least S"
    )
    p.add_argument("--labels", metavar="LIST", help='keep only these labels (names or ids, comma-separated; '
                   'a name with a comma in double quotes: \'"gown, evening",person\')')
    p.add_argument("--shard-size", dest="shard_size", type=positive_int, metavar="N",
                   help="at most N images per file, numbered DEST-00000.json, DEST-00001.json, ...")
    p.add_argument(
        "--from-name", dest="from_name", help="Label Studio: the BrushLabels tag name (default label)"
    )
    p.add_argument("--to-name", dest="to_name", help="Label Studio: the Image tag name (default image)")
    p.add_argument(
        "--image-prefix-map",
        dest="image_prefix_map",
        type=_prefix_pair,
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="Label Studio: rewrite image URIs starting with OLD (e.g. s3://bucket/=https://cdn/); "
        "repeatable",
    )
    p.add_argument("--mask-format", dest="mask_format", choices=MASK_FORMATS, default="rle",
                   help="coco, cvat, label-studio: masks as RLE (default; Label Studio brushes) or "
                   "polygons (each outer contour; COCO and CVAT keep a mask with holes as RLE, Label Studio "
                   "fills them)")
    p.add_argument("--polygon-tolerance", dest="polygon_tolerance", type=float, default=None,
                   metavar="PX", help="with --mask-format polygons: simplify polygons within PX pixels "
                   "(default 1)")
    reader_flags(p, order="images")
    storage_option_flag(p, "--to-option", "to_storage_options", "DEST")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """Export, and say what was written."""
    applies(args.polygon_tolerance, "--polygon-tolerance", args.mask_format == "polygon",
            "with --mask-format polygon")
    for flag, given in (("--from-name", args.from_name), ("--to-name", args.to_name),
                        ("--image-prefix-map", args.image_prefix_map or None)):
        applies(given, flag, args.fmt == "label-studio", "with --format label-studio")
    counts = export(
        args.output,
        args.fmt,
        args.to,
        min_score=args.min_score,
        labels=label_names(args.labels) if args.labels is not None else None,
        shard_size=args.shard_size,
        storage_options=dict(args.output_storage_options),
        from_name="label" if args.from_name is None else args.from_name,
        to_name="image" if args.to_name is None else args.to_name,
        image_prefix_map=dict(args.image_prefix_map),
        label_map=args.label_map,
        mask_format=args.mask_format,
        polygon_tolerance=DEFAULT_TOLERANCE if args.polygon_tolerance is None else args.polygon_tolerance,
        unmapped=unmapped(args),
        order=args.order,
        to_storage_options=dict(args.to_storage_options),
    )
    files = counts["files"]
    where = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]} ... {files[-1]})"
    print(
        f"exported {counts['images']} images and {counts['annotations']} annotations as {args.fmt} to {where}"
    )
    return 0
