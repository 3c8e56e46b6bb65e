"""``seglabel preview``: overlays of an output's first images and a page to look at them."""

from __future__ import annotations

import argparse

from ..core.config import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..preview import INDEX_FILE, preview
from .common import common, key_value, positive_int, reader_flags, unmapped


def add_parsers(sub) -> None:
    """Add ``seglabel preview``."""
    p = sub.add_parser(
        "preview",
        parents=[common()],
        help="overlay PNGs of the first images of an output and an index.html review page",
        description="Blend the masks of the first N ok images over their photos and write thumbnails and "
        "an index.html to review them: sort by review score, key or segment count, filter by label.",
    )
    p.add_argument("output", metavar="OUTPUT", help="a job's output URL")
    p.add_argument("--to", required=True, metavar="DIR", help="folder for overlays/ and index.html")
    p.add_argument("--n", type=int, default=50, metavar="N", help="how many images (default 50)")
    p.add_argument("--max-pixels", dest="max_pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   metavar="N", help="skip photos over this many pixels, as the run does (give the run's "
                   "value if it was larger)")
    p.add_argument("--max-bytes", dest="max_bytes", type=positive_int, default=DEFAULT_MAX_BYTES,
                   metavar="N", help="skip photo files over this many bytes, as the run does")
    reader_flags(p, order="take the first N images")
    p.add_argument(
        "--input-option",
        dest="input_storage_options",
        metavar="KEY=VALUE",
        type=key_value,
        action="append",
        default=None,
        help="fsspec storage option for reading the images; repeatable",
    )
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """Write the overlays and the index, and say where to look."""
    paths = preview(
        args.output,
        args.to,
        n=args.n,
        max_pixels=args.max_pixels,
        max_bytes=args.max_bytes,
        storage_options=dict(args.output_storage_options),
        image_storage_options=dict(args.input_storage_options) if args.input_storage_options else None,
        label_map=args.label_map,
        unmapped=unmapped(args),
        order=args.order,
    )
    print(f"wrote {len(paths)} overlays; open {args.to.rstrip('/')}/{INDEX_FILE}")
    return 0
