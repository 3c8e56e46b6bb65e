"""Loading a checkpoint's weights: from the Hub, a folder, or a folder URL copied to a local
cache once per contents; the weights checked against the model; the engine a pipeline actor
holds (:func:`load_segmenter`: the Segmenter, or its stand-in). Loading never runs remote code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..core.config import EngineConfig
from ..core.errors import CheckpointError, first_line
from ..core.redaction import get_logger
from .checkpoint import family_of, fingerprint_of, is_remote_url, listed_files, looks_like_hub_id
from .resolve import ResolvedCheckpoint

log = get_logger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model, its preprocessor, and where it came from."""

    model: Any
    processor: Any
    model_id: str
    revision: str | None
    id2label: dict[int, str]
    family: str = "mask2former"


def default_cache_dir() -> Path:
    """Where checkpoints copied from object storage are kept (``SEGLABEL_CACHE`` overrides)."""
    base = os.environ.get("SEGLABEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "seglabel")
    return Path(base) / "checkpoints"


def fetch_checkpoint(
    url: str, cache_dir: str | os.PathLike | None = None, fingerprint: str | None = None
) -> Path:
    """Copy a checkpoint directory from an fsspec URL to the local cache, once per contents.

    Only the directory's own files named in ``CHECKPOINT_FILES`` are copied, each to its plain
    name in the copy. The copy is cached under the URL and the contents' fingerprint, so that
    weights replaced at the same URL are copied again, never taken from a stale copy; with
    ``fingerprint`` (the one the job recorded), a checkpoint that changed since is refused. The
    copy lands in a temporary directory and is renamed into place, so that several actors on one
    node starting together never load a half-copied checkpoint.
    """
    fs, files = listed_files(url)
    now = fingerprint_of(files)
    if fingerprint is not None and fingerprint != now:
        raise CheckpointError(
            f"the checkpoint at {url} changed since the job recorded it ({fingerprint}, now {now}); "
            "use --overwrite to label with the new weights"
        )
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / hashlib.sha256(f"{url.rstrip('/')}\0{now}".encode()).hexdigest()[:20]
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    try:
        for name, entry in sorted(files.items()):
            fs.get_file(entry["name"], str(tmp / name))
        if fingerprint_of(listed_files(url)[1]) != now:
            # Replaced while being copied: this copy may mix two versions; never cache it.
            raise CheckpointError(f"the checkpoint at {url} changed while it was being copied; try again")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # Another process on this node finished the same copy first.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("copied checkpoint %s to %s (%s)", url, target, ", ".join(sorted(files)))
    return target


def processor_class(family: str = "mask2former"):
    """The family's image processor class that needs no torchvision."""
    # transformers 5 falls back to the PIL processor (with a warning) when torchvision is missing
    # or broken; asking for it directly keeps the CPU path free of torchvision. seglabel only
    # reads the processor's configuration; the pixels are prepared on the model's device.
    import transformers

    base = "Eomt" if family.startswith("eomt") else "Mask2Former"
    # Older transformers 5.x releases have only the one class.
    pil = getattr(transformers, f"{base}ImageProcessorPil", None)
    return pil or getattr(transformers, f"{base}ImageProcessor")


def model_class(family: str):
    """The transformers class that runs a family's checkpoints for universal segmentation."""
    import transformers

    names = {
        "mask2former": "Mask2FormerForUniversalSegmentation",
        "eomt": "EomtForUniversalSegmentation",
        "eomt_dinov3": "EomtDinov3ForUniversalSegmentation",
    }
    cls = getattr(transformers, names[family], None)
    if cls is None:
        raise CheckpointError(
            f"this transformers ({transformers.__version__}) has no {names[family]}; upgrade transformers"
        )
    return cls


def load_checkpoint(
    model: str,
    revision: str | None = None,
    *,
    device: str = "cpu",
    dtype: Any = None,
    cache_dir: str | None = None,
) -> Checkpoint:
    """Load a Mask2Former or EoMT checkpoint for inference.

    ``model`` is a Hub id, a local directory, or an fsspec URL of a saved checkpoint. Safetensors
    files are preferred when present; ``trust_remote_code`` is never enabled. The family comes
    from the checkpoint's own config, read again here: a worker's copy is what it loads.
    """
    from safetensors import SafetensorError
    from transformers import PreTrainedConfig

    source: str = model
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    weights: dict[str, Any] = {}
    if model.startswith("file://"):
        source = model[len("file://"):]
    elif is_remote_url(model):
        # The revision of a URL checkpoint is its contents' fingerprint (inspect_checkpoint).
        source = str(fetch_checkpoint(model, cache_dir, revision))
        weights["use_safetensors"] = True  # all the copy holds; never unpickle what a bucket serves
    is_local = os.path.isdir(source)
    if not is_local and not looks_like_hub_id(source):
        raise CheckpointError(f"no checkpoint directory at {model}")
    if revision and not is_local:
        kwargs["revision"] = revision
    try:
        # The config as a plain mapping first: a model type of another library is refused by
        # name before transformers builds (and validates) a config class for it.
        config, _ = PreTrainedConfig.get_config_dict(source, **kwargs)
        family = family_of(config.get("model_type") if isinstance(config, dict) else None, model)
        # Mismatched shapes reported rather than raised, so that every way the weights differ
        # from the model is refused in one line by check_weights.
        with _quiet("transformers"):  # its load report's table: check_weights says it in one line
            net, info = model_class(family).from_pretrained(
                source, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True,
                **kwargs, **weights,
            )
        check_weights(info, model, {name for name, _ in net.named_buffers()})
        processor = processor_class(family).from_pretrained(source, **kwargs)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"cannot load checkpoint {model!r}: {first_line(exc)}") from exc
    net.eval().to(device)
    resolved = getattr(net.config, "_commit_hash", None) if not is_local else None
    id2label = {int(k): str(v) for k, v in net.config.id2label.items()}
    return Checkpoint(net, processor, model, resolved or revision, id2label, family)


def check_weights(info: Mapping[str, Any], model: str, buffers: set[str] = frozenset()) -> None:
    """Refuse a checkpoint whose weights are not the model's: tensors missing (transformers
    would initialise them at random and the job would label with them), unexpected or of
    another shape (labels that do not match the class head). ``info`` is transformers'
    loading info. Only buffers of the training loss (``criterion.*``) may be missing."""
    missing = [k for k in info.get("missing_keys") or () if not (k in buffers and k.startswith("criterion."))]
    unexpected = list(info.get("unexpected_keys") or ())
    mismatched = [m[0] if isinstance(m, (list, tuple)) else m for m in info.get("mismatched_keys") or ()]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)):
        if keys:
            names = ", ".join(sorted(keys)[:3]) + (", …" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} tensor{'s' if len(keys) > 1 else ''} {what} ({names})")
    if problems:
        raise CheckpointError(
            f"checkpoint {model} does not hold the weights its model needs: {'; '.join(problems)}; "
            "it would label with random weights (a partial upload or copy, or another model's weights?)"
        )


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """A library's warnings held back while a block runs (its errors still show)."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_segmenter(engine: EngineConfig, cpu_threads: int = 1,
                   checkpoint: ResolvedCheckpoint | None = None) -> Any:
    """The engine's Segmenter, loaded (for ``checkpoint``, the job's resolved checkpoint, where
    given); its stand-in where it names one.

    The stand-in runs no model, so it loads neither torch nor transformers: a stand-in actor's
    start is the pipeline's own (their imports took 1.5 s of it on the 2-core machine, which
    the plumbing bench reports apart).
    """
    if engine.stand_in is not None:
        from .standin import StandInSegmenter

        return StandInSegmenter(engine, checkpoint)
    import torch
    from transformers.utils import logging as hf_logging

    from .segmenter import Segmenter

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, cpu_threads))
    hf_logging.disable_progress_bar()  # one bar per actor start is noise in the job's log
    return Segmenter(config=engine, checkpoint=checkpoint)
