"""seglabel: pre-label large image corpora with Mask2Former or EoMT segmentation masks.

    from seglabel import Segmenter, label

``Segmenter`` (the engine) and ``label`` (the whole job) load torch and Ray when first used,
so that ``import seglabel`` and ``seglabel --help`` stay quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import EngineConfig, JobConfig, Resolution
from .errors import SeglabelError

__version__ = "0.1.0"

# Public names that live in modules importing torch or Ray, loaded on first use.
_LAZY = {
    "Segmenter": "segment",
    "Prediction": "encode",
    "Segment": "encode",
    "label": "pipeline",
    "run": "pipeline",
    "Summary": "pipeline",
}

if TYPE_CHECKING:
    from .encode import Prediction, Segment
    from .pipeline import Summary, label, run
    from .segment import Segmenter


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EngineConfig",
    "JobConfig",
    "Prediction",
    "Resolution",
    "Segment",
    "SeglabelError",
    "Segmenter",
    "Summary",
    "__version__",
    "label",
    "run",
]
