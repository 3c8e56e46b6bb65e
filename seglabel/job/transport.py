"""The predictions' way between the Segmenter actors and the encode tasks: one Arrow buffer a
block (:func:`pack_column`), each prediction read back where it lies (:func:`column_cells`).

Ray takes an Arrow array as it is; a column of Python bytes would be copied once more by Ray's
own conversion. The values are :meth:`RawPrediction.dumps`'s, aligned as it lays them out.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ..core.results import ALIGN

# Arrow's binary type has int32 offsets; past this a column of predictions is large_binary.
BINARY_MAX_BYTES = 2**31 - 1


def pack_column(values: list[list[Any]]) -> pa.Array:
    """A block's column of predictions: ``values``, each given in parts
    (``RawPrediction.parts``; ``[]`` for a row without one), written once into one Arrow buffer
    that Ray takes as it is (Ray's own conversion of a column of bytes copies each value again,
    after ``dumps`` had joined them). Each value starts at a multiple of ``ALIGN`` bytes of the
    buffer, its arrays aligned in the block (it ends in padding). Read back with
    :func:`column_cells`."""
    sizes = [sum(memoryview(part).nbytes for part in parts) for parts in values]
    bounds = np.zeros(len(values) + 1, np.int64)
    np.cumsum(np.array([size + -size % ALIGN for size in sizes], np.int64), out=bounds[1:])
    data = pa.allocate_buffer(int(bounds[-1]))  # Arrow's allocations are 64-byte aligned
    out = np.frombuffer(data, np.uint8)
    for parts, start, stop in zip(values, bounds[:-1].tolist(), bounds[1:].tolist()):
        for part in parts:
            view = np.frombuffer(part, np.uint8)
            out[start : start + len(view)] = view
            start += len(view)
        out[start:stop] = 0
    large = bounds[-1] > BINARY_MAX_BYTES
    kind, offsets = (pa.large_binary(), bounds) if large else (pa.binary(), bounds.astype(np.int32))
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(offsets), data])


def column_cells(column: pa.ChunkedArray) -> Iterator[Any]:
    """Each row's dumped prediction (for ``RawPrediction.loads``): a slice of the block's own
    data buffer where Arrow holds the column as binary (cut by its offsets: an Arrow scalar
    would copy the value), as :func:`pack_column` builds it; Python bytes should the column
    arrive as Ray's pickled Python objects, which Ray makes of a column of bytes objects Arrow
    cannot hold (no stage of the pipeline hands it one any more)."""
    for chunk in column.iterchunks():
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            yield from chunk.to_pylist()
            continue
        _, offsets, data = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        # A slice of a block (Ray cuts batches out of blocks) keeps the whole buffers: its
        # offsets start at chunk.offset.
        bounds = np.frombuffer(offsets, dtype=width)[chunk.offset:chunk.offset + len(chunk) + 1]
        for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            yield data.slice(start, stop - start) if data is not None else b""
