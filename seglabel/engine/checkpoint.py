"""What a checkpoint is, read from its files before any weights load: its family, labels,
task, revision and the settings it can take, settled once into a :class:`ResolvedCheckpoint`
that the driver and every Segmenter share.

Two model families share one mask-classification output (``class_queries_logits``,
``masks_queries_logits``): Mask2Former (``model_type`` ``mask2former``) and EoMT (``eomt``,
and ``eomt_dinov3`` on a DINOv3 backbone). The family is read from the checkpoint's
``config.json``; any other model type is refused in one line. Weights that do not fit the
config (a class head of another size) are refused from the safetensors header alone.

A checkpoint is a Hub id (optionally pinned to a revision), a local directory, or an fsspec URL
of a directory written by ``save_pretrained`` (whose revision is its files' fingerprint). A
private checkpoint's token comes from Hugging Face's own environment/config (``HF_TOKEN``,
``huggingface-cli login``); seglabel never reads or records it. Loading the weights is
:mod:`seglabel.engine.load`'s.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..core.config import TASKS
from ..core.errors import CheckpointError, ConfigError, Unreadable, first_line
from ..core.labels import LABEL_ID, name_problem
from ..core.redaction import get_logger

log = get_logger(__name__)

_TASK_IN_NAME = re.compile(r"(?:^|[-_./])(instance|semantic|panoptic)(?:$|[-_./])")


# The model types seglabel runs, by family name as users know it.
FAMILIES = {"mask2former": "Mask2Former", "eomt": "EoMT", "eomt_dinov3": "EoMT on DINOv3"}


def family_of(model_type: Any, model: str) -> str:
    """The checkpoint's family (its ``model_type``), or one line naming the supported ones."""
    if isinstance(model_type, str) and model_type in FAMILIES:
        return model_type
    supported = ", ".join(f"{name} ({kind})" for kind, name in FAMILIES.items())
    known = isinstance(model_type, str) and model_type
    what = f"a {model_type!r} model" if known else "not a model seglabel knows"
    raise CheckpointError(f"checkpoint {model} is {what}; seglabel runs {supported} checkpoints")


def check_family_settings(
    family: str, resolution: Any, task: str | None = None, split: bool = False, model: str = ""
) -> None:
    """Refuse settings a checkpoint cannot take: an EoMT model's position embeddings fix its
    input size, so it runs at its preprocessor's size only; images cut into crops are merged
    back for semantic segmentation only."""
    if family.startswith("eomt") and resolution is not None:
        raise ConfigError(
            "--resolution applies to Mask2Former checkpoints only: an EoMT model takes the one "
            "input size its preprocessor config gives"
        )
    if split and task is not None and task != "semantic":
        raise ConfigError(
            f"{model} cuts images into crops (do_split_image), which only semantic segmentation "
            f"merges back; it cannot run as {task}"
        )


def eomt_input(processor: Mapping[str, Any], image_size: Any, model: str) -> bool:
    """Check an EoMT preprocessor config against its model; True when it cuts images into crops.

    The model's position embeddings fix one square input (``image_size``): the processor must
    resize every image and then pad it to that square, or cut it into crops of it. What does not
    give that square for every image is refused here, before any image is read, rather than
    turning a corpus into error rows: ``EomtImageProcessor``'s own defaults (neither pads nor
    cuts), no resizing, padding with no bound on the long side (``longest_edge`` null), crops
    after a resize bounded on the long side (an elongated image's short side ends below the
    crop's; Hugging Face then pads each crop, seglabel refuses), and sizes that are not whole
    numbers. Padding on as well as crops is run as Hugging Face runs it: the crops are already
    the square, so padding them changes nothing.
    """
    size = processor.get("size") if isinstance(processor.get("size"), Mapping) else {}
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    side = image_size[0] if isinstance(image_size, (list, tuple)) and image_size else image_size
    split, pad = processor.get("do_split_image") is True, processor.get("do_pad") is True

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {model}: its preprocessor config {why}")

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not whole(side) or side < 1:
        raise refuse(f"goes with a model whose image_size {image_size!r} is not a positive whole number")
    if not whole(shortest) or shortest != side:
        raise refuse(f"size {dict(size)!r} does not give the model's {side}x{side} input "
                     f"(shortest_edge {side})")
    if longest is not None and not whole(longest):
        raise refuse(f"has longest_edge {longest!r}, not a whole number of pixels")
    if longest not in (None, 0) and longest < shortest:
        raise refuse(f"has longest_edge {longest!r} below its shortest_edge {shortest}")
    if processor.get("do_resize", True) is not True:
        raise refuse(f"does not resize images (do_resize {processor.get('do_resize')!r}): only images "
                     f"that already fit the model's {side}x{side} input would run")
    if not (pad or split):
        raise refuse("neither pads images to the model's square (do_pad) nor cuts them into crops "
                     "(do_split_image)")
    if split and longest not in (None, 0):
        raise refuse(f"cuts images into crops but bounds their long side (longest_edge {longest}): an "
                     f"image longer than {longest}/{shortest} would get crops narrower than {side}; "
                     "crops need longest_edge null")
    if pad and not split and longest != shortest:
        if longest in (None, 0):
            raise refuse(f"pads images to the model's square with no bound on their long side "
                         f"(longest_edge {longest!r}): a non-square image would not fit {side}x{side}; "
                         f"set longest_edge {side}")
        raise refuse(f"pads to {shortest}x{longest}, not to the model's {side}x{side} square")
    return split


@dataclass(frozen=True)
class CheckpointInfo:
    """What the driver learns of a checkpoint from its configs alone (no weights)."""

    id2label: dict[int, str]
    revision: str | None
    family: str
    # EoMT: whether its preprocessor cuts images into crops (checked against the model).
    split: bool = False


def detect_task(model_id: str, task: str | None = None) -> str:
    """The task: ``task`` when given, else the one the checkpoint's name ends with.

    The Hub names Mask2Former checkpoints ``…-instance``, ``…-semantic``, ``…-panoptic``.
    """
    if task is not None:
        if task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        return task
    found = _TASK_IN_NAME.findall(str(model_id).rstrip("/").lower())
    if found:
        return found[-1]
    raise ConfigError(
        f"cannot tell the task of {model_id!r} from its name; pass --task instance, semantic or panoptic"
    )


def is_remote_url(model: str) -> bool:
    """Whether ``model`` is a URL of storage other than the local disk (an ``s3://`` folder)."""
    return "://" in model and not model.startswith("file://")


# The files a checkpoint directory may give the local copy, by plain name: the config, the
# preprocessor's config and safetensors weights (one file, or shards with their index). Nothing
# else is copied: no pickled weights (loading them runs code), no code, no file from a folder
# below (a name with a separator, or "..", could land anywhere on the node).
CHECKPOINT_FILES = re.compile(
    r"config\.json|preprocessor_config\.json|model\.safetensors(\.index\.json)?"
    r"|model-\d{5}-of-\d{5}\.safetensors"
)


def listed_files(url: str) -> tuple[Any, dict[str, dict]]:
    """A URL checkpoint's filesystem and the listing entries of the files a copy takes (by plain
    name, ``CHECKPOINT_FILES``); what else the directory holds is logged and left out."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    prefix = path.rstrip("/") + "/"
    fs.invalidate_cache(path.rstrip("/"))  # a cached listing would hide weights replaced since
    try:
        entries = fs.ls(path.rstrip("/"), detail=True)  # this directory's entries: nothing below it
    except FileNotFoundError:
        entries = []
    files: dict[str, dict] = {}
    for entry in entries:
        name = entry["name"][len(prefix):] if entry["name"].startswith(prefix) else ""
        if entry["type"] == "file" and CHECKPOINT_FILES.fullmatch(name):
            files[name] = entry
        elif entry["type"] == "file" or name:
            log.debug("checkpoint %s: not copying %r (not a config or safetensors file)", url, entry["name"])
    if "config.json" not in files:
        raise CheckpointError(f"no checkpoint at {url} (expected a directory with config.json)")
    if not any(name.endswith(".safetensors") for name in files):
        raise CheckpointError(
            f"no safetensors weights at {url}: checkpoints from a URL load only from safetensors files "
            "(pickled weights run code when loaded)"
        )
    return fs, files


def fingerprint_of(files: dict[str, dict]) -> str:
    """What identifies a URL checkpoint's contents, from its listing alone: each file's name,
    size and the store's content tag (S3 and GCS: the ETag / MD5 the store computed from the
    bytes; elsewhere the modification time). Weights replaced at the same URL change it."""
    digest = hashlib.sha256()
    for name, entry in sorted(files.items()):
        tag = next((entry[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified")
                    if entry.get(k) is not None), "")
        digest.update(f"{name}\0{entry.get('size')}\0{tag}\n".encode())
    return "files-" + digest.hexdigest()[:16]


def checkpoint_fingerprint(url: str) -> str:
    """The fingerprint (:func:`fingerprint_of`) of the checkpoint at ``url`` as it is now: one
    listing, no download. The job records it as the checkpoint's revision."""
    return fingerprint_of(listed_files(url)[1])


def is_hub_id(model: str) -> bool:
    """Whether ``model`` names a Hub repository: not a URL, not a folder here (a folder wins
    over a Hub id spelled the same), and spelled as the Hub spells ids."""
    return not (is_remote_url(model) or model.startswith("file://") or os.path.isdir(model)) and (
        looks_like_hub_id(model)
    )


def checkpoint_file(model: str, name: str) -> str:
    """The path or URL of the file ``name`` in a local or URL checkpoint folder."""
    base = model[len("file://"):] if model.startswith("file://") else model
    return f"{base.rstrip('/')}/{name}"


def looks_like_hub_id(model: str) -> bool:
    """Whether ``model`` is spelled as the Hub spells ids: "org/name" or "name". Anything else
    (a leading slash or dot, more than one slash) is a local path that does not exist, reported
    as such rather than as a failed download."""
    return bool(re.fullmatch(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", model))


# A checkpoint's JSON configs are a few kB; nothing larger is read.
MAX_CONFIG_BYTES = 16 << 20


def inspect_checkpoint(model: str, revision: str | None = None) -> CheckpointInfo:
    """A checkpoint's labels, resolved revision and family, reading only its configs.

    The driver uses this to fail fast on a bad model (a missing one, another architecture, an
    EoMT preprocessor that does not fit its model) and to describe the job, without loading
    weights (those are loaded once per Segmenter actor).
    """
    model = os.fspath(model)
    hub = is_hub_id(model)
    config, commit = _config_file(model, "config.json", revision, hub, required=True)
    if config is None:
        raise CheckpointError(f"no checkpoint at {model} (expected a directory with config.json)")
    family = family_of(config.get("model_type"), model)
    labels = _labels(config.get("id2label"), model)
    if not labels:
        raise CheckpointError(f"checkpoint {model}: its config names no labels (id2label)")
    if "num_labels" in config and config["num_labels"] != len(labels):
        # transformers makes num_labels win: LABEL_0.. names, a head of another size.
        raise CheckpointError(f"checkpoint {model}: its config's num_labels {config['num_labels']!r} is not "
                              f"the {len(labels)} labels its id2label names")
    if not hub:
        _check_class_head(model, labels, config)
    split = False
    if family.startswith("eomt"):
        processor, _ = _config_file(model, "preprocessor_config.json", revision, hub)
        if processor is None:
            raise CheckpointError(
                f"checkpoint {model} has no preprocessor_config.json (an EoMT model needs one)"
            )
        split = eomt_input(processor, config.get("image_size"), model)
    if hub:
        return CheckpointInfo(labels, commit or revision, family, split)
    if is_remote_url(model):
        # Actors on other nodes copy it later: the job pins what it was now.
        current = checkpoint_fingerprint(model)
        if revision is not None and revision != current:
            raise CheckpointError(f"the checkpoint at {model} is {current}, not revision {revision}")
        return CheckpointInfo(labels, current, family, split)
    return CheckpointInfo(labels, revision, family, split)


# The class head, by the name both families' checkpoints give it: one row per label, and one
# for "no object".
CLASS_HEAD = "class_predictor.weight"
# A real header is a few hundred kB; 100 MiB is safetensors' own limit, so nothing it would
# load is refused here.
MAX_HEADER_BYTES = 100 << 20
# The files a weights index may name for a tensor: safetensors shards, nothing else.
_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


# The safetensors dtypes of floating-point tensors. A class head stored as integers or booleans
# is cast to float by transformers and labels images: never trained weights.
_FLOAT_DTYPES = frozenset(
    {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"}
)
INDEX_FILE = "model.safetensors.index.json"


def _check_class_head(model: str, labels: dict[int, str], config: Mapping[str, Any]) -> None:
    """Refuse, from the weights' headers alone (no tensor is read), a checkpoint whose class
    head is missing, not floating point, or has another number of rows than its config has
    labels (+1 for "no object"), reading the files transformers will load: ``model.safetensors``,
    or every shard its index names (a head also present in a shard the index does not assign it
    to could be the one loaded). A folder with both, or a config naming its own weights file
    (``transformers_weights``), is refused: which weights run would not be the ones checked.
    Checkpoints with no safetensors file (pickled weights in a local folder) are left to the
    Segmenter's load, which checks every tensor."""
    if config.get("transformers_weights") is not None:
        raise CheckpointError(
            f"checkpoint {model}: its config names its own weights file (transformers_weights "
            f"{config['transformers_weights']!r}); seglabel loads only model.safetensors or {INDEX_FILE}"
        )
    index, _ = _config_file(model, INDEX_FILE, None, False)
    single = _weights_header(model, "model.safetensors", required=False)
    if index is None:
        if single is None:
            return
        _check_head_entry(model, "model.safetensors", single, labels)
        return
    if single is not None:
        raise CheckpointError(
            f"checkpoint {model} holds both model.safetensors and {INDEX_FILE}: transformers loads "
            "the first, which may be stale; remove the one that is not the model"
        )
    weight_map = index.get("weight_map")
    shard = weight_map.get(CLASS_HEAD) if isinstance(weight_map, dict) else None
    if not isinstance(shard, str) or not _SHARD.fullmatch(shard):
        raise CheckpointError(f"checkpoint {model}: its weights have no class head ({CLASS_HEAD})")
    stray = [name for name in weight_map.values() if not isinstance(name, str) or not _SHARD.fullmatch(name)]
    if stray:
        raise CheckpointError(
            f"checkpoint {model}: its {INDEX_FILE} names {str(stray[0])[:100]!r}, not a shard "
            "(model-00001-of-00002.safetensors)"
        )
    shards = set(weight_map.values())
    holding = []
    for name in sorted(shards):
        header = _weights_header(model, name, required=True)
        if CLASS_HEAD in header:
            holding.append(name)
            _check_head_entry(model, name, header, labels)
    if holding != [shard]:
        where = " and ".join(holding) if holding else "no shard"
        raise CheckpointError(
            f"checkpoint {model}: its class head ({CLASS_HEAD}) is in {where}, but its index "
            f"assigns it to {shard} alone: which one transformers loads is not the one checked"
        )


def _weights_header(model: str, name: str, required: bool) -> dict | None:
    """The safetensors header of a checkpoint's weights file ``name``; None where there is no
    such file and it is not ``required`` (a dangling link is missing, not absent)."""
    url = checkpoint_file(model, name)
    try:
        return _safetensors_header(url)
    except FileNotFoundError:
        if required or os.path.lexists(url):
            raise CheckpointError(f"checkpoint {model}: its weights file {name} is missing") from None
        return None
    except (OSError, ValueError, RecursionError, Unreadable) as exc:
        raise CheckpointError(f"cannot read the weights of checkpoint {model}: {first_line(exc)}") from exc


def _check_head_entry(model: str, name: str, header: Mapping[str, Any], labels: dict[int, str]) -> None:
    """The class head as ``name``'s header describes it: floating point, one row a label and one
    for "no object"."""
    entry = header.get(CLASS_HEAD)
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not shape or type(shape[0]) is not int or shape[0] < 1:
        raise CheckpointError(f"checkpoint {model}: its weights have no class head ({CLASS_HEAD})")
    dtype = entry.get("dtype")
    if dtype not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"checkpoint {model}: its class head ({CLASS_HEAD} in {name}) is stored as {dtype!r}, "
            "not floating point: not trained weights"
        )
    if shape[0] != len(labels) + 1:
        raise CheckpointError(
            f"checkpoint {model}: its config names {len(labels)} labels but its class head has "
            f"{shape[0] - 1} (+1 for no object): labels and weights do not belong together"
        )


def _safetensors_header(url: str) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes): its first 8 bytes
    give the header's length, little-endian. Two bounded ranged reads, local or remote; on a
    local disk only a regular file is read."""
    import json

    from ..storage.read import regular_target

    fs, path, _ = regular_target(url)
    size = int.from_bytes(fs.cat_file(path, start=0, end=8), "little")
    if not 0 < size <= MAX_HEADER_BYTES:
        raise ValueError(f"{url} is not a safetensors file (header of {size} bytes)")
    header = json.loads(fs.cat_file(path, start=8, end=8 + size), object_pairs_hook=_once_each)
    if not isinstance(header, dict):
        raise ValueError(f"{url} is not a safetensors file")
    return header


def _config_file(
    model: str, name: str, revision: str | None, hub: bool, required: bool = False
) -> tuple[dict | None, str | None]:
    """A checkpoint's JSON file as a mapping (None when it has none) and, from the Hub, the
    commit it was read at. Read as any input is (storage.read_bytes): bounded, and only from a
    regular file on a local disk (a FIFO named config.json would block for ever). A
    ``required`` file the Hub cannot give is one line that says how to run offline."""
    import json

    from ..storage.read import read_bytes

    commit = None
    if hub:
        # Only here: transformers imports torch (a quarter of a GB in the driver, for a config).
        from transformers.utils.hub import cached_file, extract_commit_hash

        try:
            path = cached_file(
                model, name, revision=revision, _raise_exceptions_for_missing_entries=required,
                _raise_exceptions_for_connection_errors=required,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"cannot load checkpoint {model!r}: {first_line(exc)} To run without the Hub, give a local "
                "checkpoint folder, or a Hugging Face cache that holds it (HF_HOME) with HF_HUB_OFFLINE=1"
            ) from exc
        if path is None:
            return None, None
        commit = extract_commit_hash(path, None)
    else:
        path = checkpoint_file(model, name)
    try:
        data = read_bytes(path, None, MAX_CONFIG_BYTES)
        value = json.loads(data, object_pairs_hook=_once_each)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, RecursionError, Unreadable) as exc:
        raise CheckpointError(f"cannot read {name} of checkpoint {model}: {first_line(exc)}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"cannot read {name} of checkpoint {model}: not a JSON object")
    return value, commit


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: where a key is written twice, Python's
    reader and transformers keep the last silently, so which value the model runs with is not
    what a reader of the file sees first."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {twice!r} is written twice")
    return value


def _labels(id2label: Any, model: str) -> dict[int, str]:
    """A config's ``id2label`` as ``{id: name}``, or one line saying why it cannot name the class
    head's rows. The ids are row numbers, so they must be exactly 0..N-1, each written once as a
    plain number, and the names ones every format can hold (``name_problem``): ids from 1 would
    shift every name by one (the masks keep the rows, the names in every row and export would be
    wrong), ``"2"`` and ``" 2"`` would both become row 2, and a list would be labelled by its
    text."""

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {model}: its config's id2label {why}")

    if id2label is None:
        return {}
    if not isinstance(id2label, Mapping):
        raise refuse("is not a map of ids to names")
    labels: dict[int, str] = {}
    for key, name in id2label.items():
        if not isinstance(key, str) or not LABEL_ID.fullmatch(key):
            raise refuse(f"has the key {key!r}, not a label id (0, 1, 2, ... written plainly)")
        problem = name_problem(name)
        if problem is not None:
            raise refuse(f"names label {key} with {repr(name)[:80]}: {problem}")
        labels[int(key)] = name
    if labels and sorted(labels) != list(range(len(labels))):
        ids = sorted(labels)
        raise refuse(
            f"numbers its {len(ids)} labels {_span(ids)}, not 0..{len(ids) - 1}: the ids are the "
            "class head's rows, counted from 0"
        )
    return labels


def _span(ids: list[int]) -> str:
    """A short text of sorted ids: ``1..5`` where they run without a gap, else the first few."""
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(map(str, ids[:6])) + (", ..." if len(ids) > 6 else "")
