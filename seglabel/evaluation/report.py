"""What ``seglabel eval`` gives people and scripts: the per-image table (Parquet, written as
images are scored), the review order's Spearman correlation, the report's files (written both
or neither), the summary line and the table."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import spearmanr

from ..core.errors import EvalError, OutputError, one_line
from ..storage.location import Destination
from .scoring import Scored

# What the summary line and the table head show first, per task.
HEADLINE = {
    "instance": ("AP", "AP50", "AP75"),
    "panoptic": ("PQ", "SQ", "RQ"),
    "semantic": ("mIoU", "pixel_accuracy"),
}


PER_IMAGE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("quality", pa.float64()),
    ("truth_segments", pa.int64()),
    ("predicted_segments", pa.int64()),
    ("review_score", pa.float64()),
])


class PerImageTable:
    """The per-image table, written as rows come (a Parquet row group every 4096 rows) to a
    local temporary file, published with the report once the evaluation succeeds."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()
        self.writer = pq.ParquetWriter(self.file, PER_IMAGE_SCHEMA)
        self.rows: dict[str, list] = {name: [] for name in PER_IMAGE_SCHEMA.names}
        # (review score, quality) of each image that has both: 16 bytes an image.
        self.pairs: list[tuple[float, float]] = []

    def add(self, key: str, scored: Scored, review: float | None) -> None:
        values = (key, scored.quality, scored.truth_segments, scored.predicted_segments, review)
        for name, value in zip(PER_IMAGE_SCHEMA.names, values):
            self.rows[name].append(value)
        if review is not None and scored.quality is not None:
            self.pairs.append((review, scored.quality))
        if len(self.rows["key"]) >= 4096:
            self.flush()

    def review_order(self) -> dict[str, Any]:
        """How well the review score orders the scored images: Spearman's rank correlation of
        review score and quality (-1: the most doubtful are exactly the worst), over the images
        that have both; None where it is undefined (fewer than 2, or one side constant)."""
        rho = None
        if len(self.pairs) >= 2:
            review, quality = np.array(self.pairs).T
            if np.ptp(review) > 0 and np.ptp(quality) > 0:
                rho = float(spearmanr(review, quality).statistic)
        return {"spearman": rho, "images": len(self.pairs)}

    def flush(self) -> None:
        if self.rows["key"]:
            self.writer.write_table(pa.table(self.rows, schema=PER_IMAGE_SCHEMA))
            self.rows = {name: [] for name in PER_IMAGE_SCHEMA.names}

    def close(self) -> None:
        """Finish the Parquet file (and leave it to be copied)."""
        self.flush()
        self.writer.close()
        self.file.seek(0)

    def __enter__(self) -> "PerImageTable":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.writer.is_open:  # an evaluation that failed: the table is thrown away
            with contextlib.suppress(Exception):
                self.writer.close()
        self.file.close()


class ReportFiles:
    """Where the report and the per-image table go: checked before anything is scored, and
    written both or neither."""

    def __init__(self, json_url: str | None, per_image: str | None,
                 storage_options: Mapping[str, Any] | None = None):
        self.places = {}
        for flag, url in (("--json", json_url), ("--per-image", per_image)):
            if not url:
                continue
            dest = Destination(url, storage_options)
            if url.endswith("/") or dest.is_dir():
                raise EvalError(f"{flag} must name a file, and {url} is a folder")
            self.places[flag] = dest
        if len(self.places) == 2 and json_url == per_image:
            raise EvalError("--json and --per-image name the same file")

    def publish(self, report: Mapping[str, Any], table: PerImageTable) -> None:
        written = []
        table.close()
        try:
            for flag, dest in self.places.items():
                if flag == "--per-image":
                    with dest.open(dest.root) as out:
                        shutil.copyfileobj(table.file, out)
                else:
                    dest.write_file(dest.root, json.dumps(report, indent=2, allow_nan=False).encode("utf-8"))
                written.append(dest)
        except (OSError, OutputError) as exc:
            for done in written:  # the other file alone would claim an evaluation that failed
                with contextlib.suppress(OSError):
                    done.fs.rm_file(done.root)
            raise EvalError(f"cannot write {dest.url}: {type(exc).__name__}: {one_line(exc)}") from exc


def _figure(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_line(report: Mapping[str, Any]) -> str:
    """One line of ``name=value`` words: the task, the image counts and the headline figures
    (``nan`` where there is none)."""
    words = [f"task={report['task']}"]
    words += [f"{name}={value}" for name, value in report["images"].items()]
    for name in HEADLINE[report["task"]]:
        value = report["overall"][name]
        words.append(f"{name}={'nan' if value is None else f'{value:.6f}'}")
    rho = report["review_order"]["spearman"]
    words.append(f"review_spearman={'nan' if rho is None else f'{rho:.6f}'}")
    return "seglabel-eval " + " ".join(words)


def report_table(report: Mapping[str, Any]) -> str:
    """The report as a person reads it: overall figures, then categories, worst first."""
    images = report["images"]
    lines = [
        f"{report['task']} labels of {report['output']} ({report['model']}) against {report['truth']}",
        f"images scored {images['scored']} of {images['truth_images']} in the truth; truth only "
        f"{images['truth_only']}, ambiguous {images['ambiguous']}, error rows {images['error_rows']}, "
        f"without a panoptic annotation {images['unannotated']}, over --limit {images['over_limit']}; "
        f"output rows the truth lacks {images['output_only']} of {images['output_rows']}",
    ]
    if report["left_out_segments"]:
        lines.append(f"predicted segments of labels the truth lacks, left out: {report['left_out_segments']}")
    order = report["review_order"]
    lines.append(f"review order: Spearman correlation of review score and image quality "
                 f"{_figure(order['spearman'])} over {order['images']} images (-1: the most doubtful are "
                 "exactly the worst; 0: no better than chance)")
    lines.append("")
    overall = report["overall"]
    width = max(len(name) for name in overall)
    lines += [f"{name:<{width}}  {_figure(value)}" for name, value in overall.items()]
    categories = report["categories"]
    if categories:
        columns = [c for c in categories[0] if c not in ("id", "name")]
        name_width = max(8, *(len(c["name"]) for c in categories))
        lines += ["", f"{'category':<{name_width}}  " + "  ".join(f"{c:>8}" for c in columns)]
        for cat in categories:
            cells = [str(cat[c]) if isinstance(cat[c], (bool, int)) else _figure(cat[c]) for c in columns]
            lines.append(f"{cat['name']:<{name_width}}  " + "  ".join(f"{v:>8}" for v in cells))
    return "\n".join(lines)
