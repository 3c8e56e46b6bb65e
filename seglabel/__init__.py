"""seglabel: pre-label large image corpora with Mask2Former or EoMT segmentation masks.

    from seglabel import Segmenter, label

``Segmenter`` (the engine) and ``label`` (the whole job) load torch and Ray when first used,
so that ``import seglabel`` and ``seglabel --help`` stay quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core.config import EngineConfig, JobConfig, Resolution
from .core.errors import SeglabelError
from .core.version import __version__

# Public names that live in modules importing torch or Ray, loaded on first use.
_LAZY = {
    "Segmenter": "engine.segmenter",
    "Prediction": "core.results",
    "Segment": "core.results",
    "label": "job.pipeline",
    "run": "job.pipeline",
    "Summary": "job.pipeline",
}

if TYPE_CHECKING:
    from .core.results import Prediction, Segment
    from .engine.segmenter import Segmenter
    from .job.pipeline import Summary, label, run


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
