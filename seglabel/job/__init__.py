"""job: the labeling job, wired with Ray; the only home of Ray.

    pipeline   run(): model → output → plan → connect → stages → commit → finish
    plan       the model resolved; enumeration against the output; the to-do lists
    lifecycle  the output's life: new, recorded, resumed, overwritten, finished, abandoned
    lease      one run at a time on an output
    stages     the stages' Ray halves: to-do reader, decode, Segmenter actor, encode
    transport  the predictions' Arrow buffer between the Segmenters and the encode tasks
    ledger     the attempts each image's stages made (an image that kills workers)
    commit     rows committed as Parquet parts; the --max-errors budget
    cluster    starting or joining Ray, on loopback when local
    summary    the run's Summary, per-stage CPU
    submit     the Ray Jobs API client (seglabel submit, status, logs, stop)
"""

from ..core.lazy import public_names

_PUBLIC = {
    **dict.fromkeys(["run", "label"], "pipeline"),
    "Summary": "summary",
    **dict.fromkeys(["resolve_model", "plan_work", "Work", "Tally", "new_refs", "absolute_paths"], "plan"),
    "OutputLife": "lifecycle",
    **dict.fromkeys(["Lease", "hold"], "lease"),
    "connect": "cluster",
    **dict.fromkeys(["commit_rows", "Committed"], "commit"),
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = public_names(__name__, _PUBLIC)
