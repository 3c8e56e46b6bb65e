"""Frozen, validated configuration.

One object per concern, each immutable and checked when built, so that a bad value is one
readable error before any model is loaded or any GPU work starts. The CLI flags and the YAML job
specs both build these objects; nothing else reads flags.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

DEFAULT_MODEL = "facebook/mask2former-swin-small-coco-instance"
# What a listing takes as images (case-insensitive), unless --extensions says otherwise.
DEFAULT_EXTENSIONS = ("bmp", "gif", "jpeg", "jpg", "png", "tif", "tiff", "webp")
# Pillow's own error threshold (twice its MAX_IMAGE_PIXELS), so the default refuses exactly
# what a stock Pillow would refuse to open.
DEFAULT_MAX_PIXELS = 178_956_970
# No image file is read past this many bytes (a file that lies about its size, a device).
DEFAULT_MAX_BYTES = 256 << 20
TASKS = ("instance", "semantic", "panoptic")
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Resolution:
    """How images are resized for the model, overriding the checkpoint's preprocessor config.

    ``fixed`` resizes every image to ``height × width`` (the Hub checkpoints' 384×384);
    ``shortest`` resizes the shortest edge to ``shortest`` with the longest edge capped at
    ``longest`` (detectron2's test-time resize; 800 is the paper's test size).
    """

    mode: str
    height: int = 0
    width: int = 0
    shortest: int = 0
    longest: int = 0

    @classmethod
    def parse(cls, text: str | int) -> "Resolution":
        """Parse ``HxW`` (fixed), ``S`` (shortest edge S) or ``S:L`` (shortest S, longest L)."""
        spec = str(text).strip().lower()
        if m := re.fullmatch(r"(\d+)x(\d+)", spec):
            res = cls("fixed", height=int(m[1]), width=int(m[2]))
        elif m := re.fullmatch(r"(\d+)(?::(\d+))?", spec):
            shortest = int(m[1])
            # detectron2 caps the longest edge at 1333 for an 800 shortest edge; keep that ratio.
            longest = int(m[2]) if m[2] else max(shortest, round(shortest * 1333 / 800))
            res = cls("shortest", shortest=shortest, longest=longest)
        else:
            raise ConfigError(
                f"resolution {text!r}: expected HxW (e.g. 384x384), S (e.g. 800) or S:L (e.g. 800:1333)"
            )
        sizes = (res.height, res.width) if res.mode == "fixed" else (res.shortest, res.longest)
        if min(sizes) < 1:
            raise ConfigError(f"resolution {text!r}: sizes must be positive")
        if res.mode == "shortest" and res.longest < res.shortest:
            raise ConfigError(f"resolution {text!r}: longest edge must be >= shortest edge")
        return res

    def __str__(self) -> str:
        if self.mode == "fixed":
            return f"{self.height}x{self.width}"
        return f"{self.shortest}:{self.longest}"


# Every setting's type is checked where a config is built: YAML templating writes
# ``overwrite: "false"``, a string, which Python takes as true; ``max_pixels: 1e6`` is a string
# to PyYAML; ``batch_size: true`` is a number to Python. Sane ranges bound the numbers.
MAX_BATCH_SIZE = 1 << 16
MAX_ROWS_PER_PART = 1_000_000_000
MAX_COUNT = 2**62  # limit, min_area, max_pixels, max_bytes: far past any real value, and an int64


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _paths_as_text(config: Any, names: tuple[str, ...]) -> None:
    """``pathlib.Path`` values (from Python callers) as the strings the settings are."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, os.PathLike):
            object.__setattr__(config, name, os.fspath(value))


def check_flag(name: str, value: Any) -> None:
    """A setting that must be a boolean (``true``/``false``, not a string or a number)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def set_whole(config: Any, name: str, low: int, high: int = MAX_COUNT, optional: bool = False) -> None:
    """A setting of a frozen ``config`` that must be a whole number (not a boolean) in
    ``low..high``; a float with no fraction (YAML's ``1.0e+8``) is one, and is set as an int."""
    value = getattr(config, name)
    if value is None and optional:
        return
    if not _is_whole(value) and not (isinstance(value, float) and value.is_integer()):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    object.__setattr__(config, name, int(value))


def check_real(name: str, value: Any, low: float, high: float, optional: bool = False) -> None:
    """A setting that must be a number (not a boolean) in ``low..high``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:  # NaN fails too
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {value}")


def check_text(name: str, value: Any, optional: bool = True) -> None:
    """A setting that must be a string (a URL, a path, a name)."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")


def label_names(text: str) -> tuple[str, ...]:
    """Comma-separated label names or ids, a name with a comma in double quotes
    (``'"gown, evening",person'``), as in a CSV line."""
    import csv

    try:
        fields = next(csv.reader([text], skipinitialspace=True), [])
    except csv.Error as exc:
        raise ConfigError(f"cannot read the labels {text!r}: {exc}") from None
    return tuple(f.strip() for f in fields if f.strip())


def _names(name: str, value: Any) -> tuple[str, ...] | None:
    """Label names or ids: a list (of names or ids), a comma-separated string, or one id."""
    if value is None:
        return None
    if isinstance(value, str):
        return label_names(value)
    if _is_whole(value):
        return (str(value),)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) or _is_whole(v) for v in value):
        return tuple(str(v) for v in value)
    raise ConfigError(f"{name} must be a list of label names or ids, or a comma-separated string, "
                      f"got {value!r}")


@dataclass(frozen=True)
class StandIn:
    """What the stand-in returns: ``segments`` per image, each ``coverage`` of the image, and
    the image size (width, height) on which it kills its process, if any."""

    segments: int = 20
    coverage: float = 0.05
    kill: tuple[int, int] | None = None

    @classmethod
    def parse(cls, text: str) -> "StandIn":
        """``"segments=20,coverage=0.05,kill=13x7"``; every part optional ("default": none)."""
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            if part == "default":
                continue
            name, eq, value = part.partition("=")
            try:
                if name == "segments" and eq:
                    values["segments"] = int(value)
                elif name == "coverage" and eq:
                    values["coverage"] = float(value)
                elif name == "kill" and eq:
                    width, height = value.lower().split("x")
                    values["kill"] = (int(width), int(height))
                else:
                    raise ValueError
            except ValueError:
                raise ConfigError(
                    f"stand_in: cannot read {part!r}; expected segments=N, coverage=F (0..1], kill=WxH"
                ) from None
        spec = cls(**values)
        if spec.segments < 0 or not 0 < spec.coverage <= 1:
            raise ConfigError(f"stand_in: segments must be >= 0 and coverage in (0, 1], got {text!r}")
        return spec

    def __str__(self) -> str:
        kill = f",kill={self.kill[0]}x{self.kill[1]}" if self.kill else ""
        return f"segments={self.segments},coverage={self.coverage:g}{kill}"


def default_dtype(device_type: str) -> str:
    """The dtype a Segmenter uses when none is given: bf16 on a GPU ("cuda"), fp32 elsewhere."""
    return "bf16" if device_type == "cuda" else "fp32"


@dataclass(frozen=True)
class EngineConfig:
    """Everything the segmentation engine needs: which checkpoint, how to run it, how to
    turn its outputs into segments. Fields that change masks are listed in ``MASK_FIELDS``."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    task: str | None = None
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 8
    resolution: Resolution | None = None
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    overlap_threshold: float = 0.8
    # Reproduce Hugging Face's post-processing exactly (its fixed 384×384 canvas included).
    compat: bool = False
    thing_labels: tuple[str, ...] | None = None
    # Run-time filters: keep only these labels (names or ids), drop small segments, cap instances.
    labels: tuple[str, ...] | None = None
    min_area: int = 0
    max_instances: int | None = None
    cache_dir: str | None = None
    # torch.compile the model (a persistent cache under the seglabel cache dir; shapes repeat:
    # a short last batch is padded). Not a mask setting: compiled outputs equal eager ones
    # within floating-point tolerance (tested), as another batch size's do.
    compile: bool = False
    # The model replaced by a stand-in (seglabel.engine.standin): to measure the pipeline, or test it.
    stand_in: StandIn | None = None

    MASK_FIELDS = (
        "model", "revision", "task", "dtype", "resolution", "score_threshold", "mask_threshold",
        "overlap_threshold", "compat", "thing_labels", "labels", "min_area", "max_instances", "stand_in",
    )

    def __post_init__(self) -> None:
        _paths_as_text(self, ("model", "cache_dir"))
        if type(self.device).__name__ == "device":  # a torch.device, from a Python caller
            object.__setattr__(self, "device", str(self.device))
        if _is_whole(self.revision):  # a short commit hash of digits, which YAML reads as a number
            object.__setattr__(self, "revision", str(self.revision))
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("model must be a Hub id, a local directory or a checkpoint URL")
        for name in ("revision", "task", "device", "dtype", "cache_dir"):
            check_text(name, getattr(self, name))
        check_flag("compat", self.compat)
        check_flag("compile", self.compile)
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.resolution, str) or _is_whole(self.resolution):
            object.__setattr__(self, "resolution", Resolution.parse(self.resolution))
        elif not isinstance(self.resolution, (Resolution, type(None))):
            raise ConfigError(f"resolution must be HxW, S or S:L (e.g. 384x384), got {self.resolution!r}")
        if isinstance(self.stand_in, str):
            object.__setattr__(self, "stand_in", StandIn.parse(self.stand_in))
        elif not isinstance(self.stand_in, (StandIn, type(None))):
            raise ConfigError(f"stand_in must be a string such as 'segments=20', got {self.stand_in!r}")
        set_whole(self, "batch_size", 1, MAX_BATCH_SIZE)
        for name in ("score_threshold", "mask_threshold", "overlap_threshold"):
            check_real(name, getattr(self, name), 0.0, 1.0)
        set_whole(self, "min_area", 0)
        set_whole(self, "max_instances", 1, optional=True)
        for name in ("thing_labels", "labels"):
            object.__setattr__(self, name, _names(name, getattr(self, name)))

    def replace(self, **changes: Any) -> "EngineConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def mask_settings(self) -> dict[str, Any]:
        """The settings that change masks, as plain JSON values (for job.json and resume checks)."""
        out = {}
        for name in self.MASK_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (Resolution, StandIn)):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "EngineConfig":
        """Build from a mapping, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown engine setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(values))


@dataclass(frozen=True)
class JobConfig:
    """A labeling job: where images come from, where outputs go, how the engine runs.

    Built the same way from CLI flags and YAML job specs (:meth:`from_mapping`), whose keys are
    the field names here plus those of :class:`EngineConfig` (``model``, ``task``, …).
    """

    output: str
    input: str | None = None
    manifest: str | None = None
    engine: EngineConfig = EngineConfig()
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    input_storage_options: Mapping[str, Any] | None = None
    output_storage_options: Mapping[str, Any] | None = None
    num_gpus: int | None = None
    address: str | None = None
    limit: int | None = None
    dry_run: bool = False
    rows_per_part: int = 10_000
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_bytes: int | None = DEFAULT_MAX_BYTES
    overwrite: bool = False
    retry_errors: bool = False
    max_errors: float | None = None
    # Licence ids (lower-case SPDX, as Hub cards write them) a checkpoint must declare to run.
    require_license: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "require_license", license_ids(self.require_license))
        _paths_as_text(self, ("output", "input", "manifest"))
        if not self.output or not isinstance(self.output, str) or not self.output.strip():
            raise ConfigError("an output URL is required (--output)")
        for name in ("input", "manifest", "address"):
            check_text(name, getattr(self, name))
        for name in ("dry_run", "overwrite", "retry_errors"):
            check_flag(name, getattr(self, name))
        if bool(self.input) == bool(self.manifest):
            raise ConfigError(
                "give exactly one of --input (a folder or prefix) or --manifest (a list of URIs)"
            )
        if isinstance(self.extensions, str):
            object.__setattr__(self, "extensions", tuple(e for e in self.extensions.split(",") if e))
        exts = self.extensions
        if not isinstance(exts, (list, tuple)) or not all(isinstance(e, str) for e in exts):
            raise ConfigError(f"extensions must be file extensions (e.g. jpg,png), got {self.extensions!r}")
        exts = tuple(sorted({str(e).lower().lstrip(".") for e in self.extensions}))
        if not exts:
            raise ConfigError("extensions must name at least one file extension")
        object.__setattr__(self, "extensions", exts)
        for name in ("input_storage_options", "output_storage_options"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a mapping of fsspec options, got {type(value).__name__}")
            object.__setattr__(self, name, dict(value or {}))
        set_whole(self, "num_gpus", 0, MAX_BATCH_SIZE, optional=True)
        set_whole(self, "limit", 0, optional=True)
        set_whole(self, "rows_per_part", 1, MAX_ROWS_PER_PART)
        set_whole(self, "max_pixels", 1, optional=True)
        set_whole(self, "max_bytes", 1, optional=True)
        check_real("max_errors", self.max_errors, 0, MAX_COUNT, optional=True)
        if self.max_errors is not None and not (
            0 < self.max_errors < 1 or (self.max_errors >= 0 and float(self.max_errors).is_integer())
        ):
            raise ConfigError(
                f"max_errors must be a count (N >= 0) or a fraction (0 < F < 1), got {self.max_errors}"
            )
        if _same_place(self.input, self.output):
            raise ConfigError("the output must not be the input folder itself")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "JobConfig":
        """Build from flat settings (a YAML spec, CLI flags): job fields and engine fields."""
        job_fields = {f.name for f in dataclasses.fields(cls)} - {"engine"}
        engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(values) - job_fields - engine_fields)
        if unknown:
            known = ", ".join(sorted(job_fields | engine_fields))
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known settings: {known}")
        engine = EngineConfig(**{k: v for k, v in values.items() if k in engine_fields})
        if "output" not in values:
            raise ConfigError("an output URL is required (--output)")
        return cls(engine=engine, **{k: v for k, v in values.items() if k in job_fields})

    def replace(self, **changes: Any) -> "JobConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def license_ids(value: Any) -> tuple[str, ...] | None:
    """``require_license`` as given (``"mit,apache-2.0"`` or a list) as lower-case ids."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"require_license must be licence ids (e.g. mit,apache-2.0), got {value!r}")
    allowed = tuple(dict.fromkeys(v.strip().lower() for v in items if v.strip()))
    if not allowed:
        raise ConfigError("require_license must name at least one licence id (e.g. mit,apache-2.0)")
    if "unknown" in allowed:
        raise ConfigError("require_license cannot allow 'unknown': a checkpoint whose licence is not "
                          "declared is always refused")
    return allowed


def _same_place(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    return a.rstrip("/").removeprefix("file://") == b.rstrip("/").removeprefix("file://")


# Values a spec (or an option) may expand to through its aliases: far past any real spec.
MAX_SPEC_VALUES = 100_000


def check_expansion(value: Any, what: str) -> None:
    """Refuse a YAML value whose aliases expand past ``MAX_SPEC_VALUES`` values: walked with a
    budget, so that a bomb is refused after that many steps, not after billions."""
    budget, stack = MAX_SPEC_VALUES, [value]
    while stack:
        budget -= 1
        if budget < 0:
            raise ConfigError(f"{what} expands to more than {MAX_SPEC_VALUES} values (nested YAML aliases?): "
                              "not a job spec")
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
