"""evaluation: seglabel eval, a job's output scored against a team's labeled sample.

    evaluate  evaluate(): the sample, the output's keys matched to it, one scorer run
    truth     ground truth read and checked whole (COCO instances or panoptic, label PNGs)
    matching  truth names to output keys
    scoring   what the scorers share
    instance  COCOeval mask AP
    panoptic  panopticapi's PQ
    semantic  a confusion matrix: IoU per class, mIoU
    report    the per-image table, the report's files and text
"""

from ..core.lazy import public_names

_PUBLIC = {
    # evaluate() is seglabel.evaluation.evaluate.evaluate (a public name is never a module's).
    "EvalOptions": "evaluate",
    **dict.fromkeys(["summary_line", "report_table"], "report"),
    "KeyMatcher": "matching",
    **dict.fromkeys(["read_coco", "PngFolder"], "truth"),
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = public_names(__name__, _PUBLIC)
