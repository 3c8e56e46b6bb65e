"""What every export format shares: the options (:class:`ExportOptions`), the segment filter,
the export under way (:class:`ExportRun`) and the :class:`Writer` base, which writes a format's
rows shard by shard, each file whole or not at all."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import IO, Any, ClassVar, Iterable, Iterator, Mapping, Sequence

from ..outputs.reader import OutputReader
from ..storage.location import Destination
from .polygons import DEFAULT_TOLERANCE


@dataclass(frozen=True)
class SegmentFilter:
    """Which segments to export: at least ``min_score``, and one of ``label_ids``."""

    min_score: float | None = None
    label_ids: frozenset[int] | None = None
    # For COCO instances from panoptic outputs: stuff segments (is_thing false) are left out.
    things_only: bool = False

    def keep(self, seg: Mapping[str, Any]) -> bool:
        if self.label_ids is not None and seg["label_id"] not in self.label_ids:
            return False
        if self.min_score is not None and (seg["score"] is None or seg["score"] < self.min_score):
            return False
        if self.things_only and seg.get("is_thing") is False:
            return False
        return True

    def apply(self, segments: Iterable[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
        return [s for s in segments or () if self.keep(s)]


def _shards(rows: Iterator[dict], size: int | None) -> Iterator[tuple[int | None, Iterator[dict]]]:
    """Consecutive groups of at most ``size`` rows (all rows when ``size`` is None), lazily.

    Always yields at least one (possibly empty) group, so an export always writes a file. Each
    group must be consumed before the next is asked for.
    """
    if size is None:
        yield None, rows
        return
    first = next(rows, None)
    index = 0
    if first is None:
        yield 0, iter(())
        return
    while first is not None:
        yield index, itertools.chain([first], itertools.islice(rows, size - 1))
        index += 1
        first = next(rows, None)


@dataclass(frozen=True)
class ExportOptions:
    """How to export, beyond the format and where: ``min_score`` and ``labels`` (names or ids)
    filter segments; ``shard_size`` splits the export into numbered files of at most that many
    images; ``from_name`` / ``to_name`` are the Label Studio control and object tag names;
    ``image_prefix_map`` rewrites image URIs for Label Studio
    (``{"s3://bucket/": "https://cdn.example/"}``); ``label_map`` (a file's URL) and
    ``unmapped`` put the export in a team's labels (:mod:`seglabel.outputs.labelmap`); ``mask_format``
    ``"polygon"`` writes polygons (:mod:`seglabel.formats.polygons`) simplified within
    ``polygon_tolerance`` pixels, for COCO, CVAT and Label Studio; ``order`` ``"review"``
    writes the images most doubtful first (:func:`seglabel.outputs.order.rows_in_order`)."""

    min_score: float | None = None
    labels: Sequence[str] | None = None
    shard_size: int | None = None
    from_name: str = "label"
    to_name: str = "image"
    image_prefix_map: Mapping[str, str] | None = None
    label_map: str | None = None
    unmapped: str = "drop"
    mask_format: str = "rle"
    polygon_tolerance: float = DEFAULT_TOLERANCE
    order: str = "output"


@dataclass
class ExportRun:
    """One export under way: what every writer reads, and the counts it adds to."""

    reader: OutputReader
    dest: Destination
    keep: SegmentFilter
    options: ExportOptions
    counts: dict[str, Any]


class Writer:
    """One format: writes an export's ok rows to its destination, shard by shard. ``folder``:
    the destination is a folder (else a file); ``tasks``: the outputs it takes; ``things_only``:
    a panoptic output's stuff segments are left out (instances are things)."""

    folder: ClassVar[bool] = False
    tasks: ClassVar[tuple[str, ...]] = ("instance", "semantic", "panoptic")
    things_only: ClassVar[bool] = False

    def __init__(self, run: ExportRun):
        self.run = run

    def write(self, rows: Iterator[dict]) -> None:
        """Write every shard of ``rows``, each file whole or not at all."""
        for index, shard in _shards(rows, self.run.options.shard_size):
            path = self.shard_path(index)
            with self.run.dest.open(path) as f:
                self.write_shard(f, shard)
            self.run.counts["files"].append(path)

    def shard_path(self, index: int | None) -> str:
        return self.run.dest.shard(index)

    def write_shard(self, out: IO[bytes], rows: Iterable[dict]) -> None:
        raise NotImplementedError


def dump_json(value: Any) -> bytes:
    """``value`` as compact ASCII JSON (non-ASCII as \\u escapes): every reader decodes it,
    whatever its locale."""
    return json.dumps(value, separators=(",", ":")).encode("ascii")


class JsonArray:
    """Items of one JSON array, written to a stream as they come."""

    def __init__(self, out: IO[bytes]):
        self.out = out
        self.count = 0

    def add(self, item: Any) -> None:
        self.out.write(b",\n" if self.count else b"\n")
        self.out.write(dump_json(item))
        self.count += 1
