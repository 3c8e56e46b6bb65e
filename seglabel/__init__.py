"""seglabel: pre-label large image corpora with Mask2Former segmentation masks."""

from .config import EngineConfig, Resolution
from .encode import Prediction, Segment
from .segment import Segmenter

__version__ = "0.1.0"

__all__ = ["EngineConfig", "Prediction", "Resolution", "Segment", "Segmenter", "__version__"]
