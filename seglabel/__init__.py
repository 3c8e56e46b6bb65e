"""seglabel: pre-label large image corpora with Mask2Former or EoMT segmentation masks.

    from seglabel import Segmenter, label

How it works: the data flows one way, inputs → engine → outputs, wired by the job; the
formats, the evaluation and the preview read outputs.

    core/        what every layer shares: errors, config, keys, labels, result types, mask codecs
    storage/     any fsspec URL: opening, atomic writes, the bounded reader, job specs
    inputs/      which images (listing, manifests) and each one's pixels (fetch, decode)
    engine/      the model: checkpoints, licences, pre/post-processing, the Segmenter (torch)
    outputs/     the output contract, its store, job.json, and the reader every reader shares
    job/         the labeling job wired with Ray: plan, output lifecycle, stages, commit, submit
    formats/     exports for annotation tools (COCO, CVAT, COCO panoptic, Label Studio)
    evaluation/  seglabel eval: an output scored against a labeled sample
    preview.py   overlays, thumbnails and the review page
    cli/         one module per command; bench/: seglabel bench
    jobs_entry.py  what a Ray cluster runs (infra/ and jobs/ name it)

Each layer imports only those before it (core ← storage ← {inputs, engine, outputs} ← job;
outputs ← {formats, evaluation, preview}); tests/test_layout.py enforces it. Public names load
their modules when first used, so that ``import seglabel`` and ``seglabel --help`` load
neither torch nor Ray.
"""

from __future__ import annotations

from .core.lazy import public_names

_PUBLIC = {
    **dict.fromkeys(["EngineConfig", "JobConfig", "Resolution"], "core.config"),
    "SeglabelError": "core.errors",
    **dict.fromkeys(["Prediction", "Segment"], "core.results"),
    "Segmenter": "engine.segmenter",
    **dict.fromkeys(["label", "run"], "job.pipeline"),
    "Summary": "job.summary",
    "__version__": "core.version",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = public_names(__name__, _PUBLIC)
