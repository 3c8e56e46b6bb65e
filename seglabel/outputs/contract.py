"""The output contract (README, "Output contract"), in one place: the files under an output, the
metadata rows' schema, and the checks every reader makes of what it reads.

    OUT/job.json                the run's record (seglabel.outputs.record)
    OUT/masks/<key>.png         one PNG per ok image
    OUT/metadata/*.parquet      one row per input image (SCHEMA), across parts
    OUT/_SUCCESS                written last, once every input image has a row
    OUT/_seglabel/              seglabel's scratch space (to-do lists, the lease)

Rows are read with the contract's types whatever width a part was written with
(:func:`with_columns`); a column added since v1 (``review_score``) reads as nulls from parts
written before it; a key is checked before a reader makes a file name of it (:func:`checked_key`).
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from ..core.errors import OutputError
from ..core.keys import is_safe_key

SEGMENT_TYPE = pa.struct(
    [
        ("id", pa.int32()),
        ("label_id", pa.int32()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.float32())),
        ("rle", pa.string()),
        ("is_thing", pa.bool_()),
    ]
)


SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image_uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mask_uri", pa.string()),
        ("task", pa.string()),
        ("model", pa.string()),
        ("segments", pa.list_(SEGMENT_TYPE)),
        # Added after v1's first outputs: parts written before it lack it (read as nulls).
        ("review_score", pa.float32()),
    ]
)


# Columns a part written by an earlier seglabel may lack: a reader that asks for one gets nulls.
OPTIONAL_COLUMNS = frozenset({"review_score"})


# The columns a reader of labels takes (exports, preview).
LABEL_COLUMNS = ("key", "image_uri", "status", "width", "height", "segments", "review_score")


JOB_FILE = "job.json"


SUCCESS_FILE = "_SUCCESS"


MASKS_DIR = "masks"


METADATA_DIR = "metadata"


SCRATCH_DIR = "_seglabel"


# Which parts the last run checked for repeated keys (see OutputStore.superseded).
KEYS_CHECKED = f"{SCRATCH_DIR}/keys-checked.json"


def checked_key(key: str) -> str:
    """A row's key, which a reader is about to make a file name of: refused where it could
    leave the destination folder."""
    if not is_safe_key(key):
        raise OutputError(f"unsafe key {key!r} in the output's rows")
    return key


def with_columns(data: pa.RecordBatch | pa.Table, columns: Sequence[str],
                  where: str) -> pa.RecordBatch | pa.Table:
    """``data`` with ``columns`` in that order and the contract's types (a part written with
    another integer width reads as every other part does, so that parts can be written out
    together), an optional column it lacks (a part written before the column was) added as
    nulls. An optional column it holds is checked, since readers sort and publish it: numbers
    in [0, 1] or nulls. A column that is not the contract's is an OutputError naming the part
    (``where``)."""
    arrays = []
    for name in columns:
        if name not in data.schema.names:
            arrays.append(pa.nulls(data.num_rows, SCHEMA.field(name).type))
            continue
        column = data.column(name)
        if name in OPTIONAL_COLUMNS:
            column = _unit_interval(column, name, where)
        elif name in SCHEMA.names and column.type != SCHEMA.field(name).type:
            try:
                column = column.cast(SCHEMA.field(name).type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise OutputError(f"{where}: column {name!r} holds {column.type}, not "
                                  f"{SCHEMA.field(name).type}: not a part of seglabel's metadata") from exc
        _check_values(column, name, where)
        arrays.append(column)
    return type(data).from_arrays(arrays, names=list(columns))


# A row's status: the only two values a run writes.
STATUSES = ("ok", "error")


def _check_values(column: pa.Array | pa.ChunkedArray, name: str, where: str) -> None:
    """Refuse values no run writes, which readers would otherwise take on trust: a row with no
    key (rows keyed by it would collapse into one), a status other than ``ok`` or ``error``
    (counted as an error of no reason), a negative width or height (published in COCO)."""
    def refuse(why: str) -> OutputError:
        return OutputError(f"{where}: {why}: not a part of seglabel's metadata, or a damaged one")

    if name == "key" and column.null_count:
        raise refuse("a row has no key (null)")
    if name == "status" and len(column):
        known = pa.compute.is_in(column, value_set=pa.array(STATUSES))
        unknown = pa.compute.invert(pa.compute.fill_null(known, False))
        if pa.compute.any(unknown).as_py():
            wrong = column.filter(unknown)[0].as_py()
            raise refuse(f"a row's status is {wrong!r}, not one of {', '.join(STATUSES)}")
    if name in ("width", "height") and len(column) and (pa.compute.min(column).as_py() or 0) < 0:
        raise refuse(f"a row's {name} is negative ({pa.compute.min(column).as_py()})")


def _unit_interval(column: pa.Array | pa.ChunkedArray, name: str, where: str) -> pa.Array | pa.ChunkedArray:
    """A column of numbers in [0, 1] or nulls, as the contract's type."""
    kind = column.type
    if not (pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind)):
        raise OutputError(f"{where}: column {name!r} holds {kind}, not numbers: "
                          "not a part of seglabel's metadata")
    valid = pa.compute.drop_null(column)
    # Checked before the cast (a double past float32's range would not survive it); NaN
    # compares false, so it is refused with the values out of range.
    inside = pa.compute.and_(pa.compute.greater_equal(valid, 0), pa.compute.less_equal(valid, 1))
    if len(valid) and not pa.compute.all(inside).as_py():
        raise OutputError(f"{where}: column {name!r} holds values outside [0, 1]: "
                          "not a part of seglabel's metadata")
    return column.cast(SCHEMA.field(name).type, safe=False)
