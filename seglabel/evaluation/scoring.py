"""What the scorers share: one image's :class:`Scored` result, the :class:`Scorer` protocol,
the match threshold, and how a model's labels meet the truth's categories (by name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from ..core.errors import EvalError
from ..outputs.reader import OutputReader
from .truth import (
    TruthImage,
)

MATCH_IOU = 0.5


@dataclass
class Scored:
    """One image's quality (None where nothing is scored) and its segment counts."""

    quality: float | None
    truth_segments: int
    predicted_segments: int


def mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def truth_categories(id2label: Mapping[int, str], names: Mapping[int, str]) -> dict[int, int]:
    """Model label id -> the truth's category id of the same name (every model id of a name
    the model's label set repeats); labels the truth lacks are absent."""
    by_name = {name: cat for cat, name in names.items()}
    return {label_id: by_name[name] for label_id, name in id2label.items() if name in by_name}


def check_size(image: TruthImage, row: Mapping[str, Any], truth: str) -> None:
    if (image.width, image.height) != (row["width"], row["height"]):
        raise EvalError(f"{truth}: image {image.name!r} is {image.width}x{image.height} there and "
                        f"{row['width']}x{row['height']} in the output (key {row['key']!r})")


class Scorer(Protocol):
    """What each task's scorer does: score one matched image, then give the figures."""

    left_out: int  # predicted segments of labels the truth does not list

    def score(self, image: TruthImage, row: Mapping[str, Any], reader: OutputReader) -> Scored: ...

    def result(self) -> dict[str, Any]: ...
