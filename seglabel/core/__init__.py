"""core: what every layer shares; imports no fsspec, torch or Ray.

    errors     every error class (one hierarchy) and one-line error text
    redaction  URLs without their secrets; loggers that redact
    config     JobConfig / EngineConfig: frozen, validated settings (flags and YAML specs)
    keys       key safety; 64-bit key hashes and the sets of them the driver keeps
    labels     known label sets (which labels are things); labels by name or id
    license    a checkpoint's licence and --require-license
    results    Segment, Prediction, RawPrediction: what a Segmenter returns
    masks      PNG label maps, packed instance masks, COCO RLE
    review     the review score's formula
    version    __version__
    lazy       public names loaded when first used (every subpackage's __init__)
"""

from .lazy import public_names

_PUBLIC = {
    **dict.fromkeys(
        ["SeglabelError", "ConfigError", "SourceError", "DecodeError", "Unreadable", "CheckpointError",
         "OutputError", "WriteFailed", "OutputBusy", "ClusterError", "JobError", "LabelMapError",
         "ExportError", "EvalError", "one_line", "first_line", "reason"], "errors"),
    **dict.fromkeys(["get_logger", "redact", "redact_url", "url_identity", "is_http"], "redaction"),
    **dict.fromkeys(["JobConfig", "EngineConfig", "Resolution", "StandIn", "TASKS", "DTYPES",
                     "DEFAULT_EXTENSIONS", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "default_dtype",
                     "check_expansion", "label_names"], "config"),
    **dict.fromkeys(["is_safe_key", "printable", "hash64", "key_hashes", "HashSpool", "SortedHashes",
                     "Bits", "HashSet", "repeated", "UNSAFE_KEY_ERROR"], "keys"),
    **dict.fromkeys(["LABEL_SETS", "thing_ids", "resolve_labels", "match_label_set", "palette_color"],
                    "labels"),
    **dict.fromkeys(["License", "check_allowed", "spdx_id", "UNKNOWN"], "license"),
    **dict.fromkeys(["Segment", "Prediction", "RawPrediction", "build_segments"], "results"),
    **dict.fromkeys(["PackedMasks", "encode_png", "decode_png", "encode_rle", "panoptic_rgb"], "masks"),
    **dict.fromkeys(["review_score", "REVIEW_COLUMN"], "review"),
    "__version__": "version",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = public_names(__name__, _PUBLIC)
