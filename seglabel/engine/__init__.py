"""engine: the model; the only home of torch and transformers.

    checkpoint   what a checkpoint is, from its files (family, labels, task, revision)
    card         its licence, from its card and its authors' statements
    resolve      ResolvedCheckpoint: settled once, shared by the driver and every Segmenter
    load         the weights loaded and checked; the engine a pipeline actor holds
    preprocess   resize and normalise on the device (EoMT: pad, or cut into crops)
    postprocess  masks to label maps and packed masks on the device, the review's counts
    segmenter    Segmenter: load once, batch by input size, forward, post-process
    standin      a stand-in Segmenter with no model cost (--stand-in)
    synthetic    random-weight checkpoints (tests, the bench)
"""

from ..core.lazy import public_names

_PUBLIC = {
    **dict.fromkeys(["FAMILIES", "detect_task", "inspect_checkpoint"], "checkpoint"),
    "checkpoint_license": "card",
    **dict.fromkeys(["ResolvedCheckpoint", "resolve_checkpoint"], "resolve"),
    **dict.fromkeys(["load_checkpoint", "load_segmenter", "fetch_checkpoint", "model_class",
                     "processor_class"], "load"),
    # preprocess() is seglabel.engine.preprocess.preprocess (a public name is never a module's).
    **dict.fromkeys(["PreprocessSpec", "to_device"], "preprocess"),
    **dict.fromkeys(["Postprocessor", "PostprocessSpec"], "postprocess"),
    "Segmenter": "segmenter",
    "StandInSegmenter": "standin",
    **dict.fromkeys(["ARCHITECTURES", "build_random_model", "save_random_checkpoint"], "synthetic"),
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = public_names(__name__, _PUBLIC)
