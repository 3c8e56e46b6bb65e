"""Frozen, validated configuration.

One object per concern, each immutable and checked when built, so that a bad value is one
readable error before any model is loaded or any GPU work starts. The CLI flags and the YAML job
specs both build these objects; nothing else reads flags.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import SeglabelError

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


class ConfigError(SeglabelError, ValueError):
    """A configuration value is invalid; the message is one readable line."""


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


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be between 0 and 1, got {value}")


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
    # The model replaced by a stand-in (seglabel.standin): to measure the pipeline, or test it.
    stand_in: StandIn | None = None

    MASK_FIELDS = (
        "model", "revision", "task", "dtype", "resolution", "score_threshold", "mask_threshold",
        "overlap_threshold", "compat", "thing_labels", "labels", "min_area", "max_instances", "stand_in",
    )

    def __post_init__(self) -> None:
        if not self.model or not str(self.model).strip():
            raise ConfigError("model must be a Hub id, a local directory or a checkpoint URL")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.resolution, (str, int)):
            object.__setattr__(self, "resolution", Resolution.parse(self.resolution))
        if isinstance(self.stand_in, str):
            object.__setattr__(self, "stand_in", StandIn.parse(self.stand_in))
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        _check_unit("score_threshold", self.score_threshold)
        _check_unit("mask_threshold", self.mask_threshold)
        _check_unit("overlap_threshold", self.overlap_threshold)
        if self.min_area < 0:
            raise ConfigError(f"min_area must be >= 0, got {self.min_area}")
        if self.max_instances is not None and self.max_instances < 1:
            raise ConfigError(f"max_instances must be >= 1, got {self.max_instances}")
        for name in ("thing_labels", "labels"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            elif value is not None:
                value = tuple(str(v) for v in value)
            object.__setattr__(self, name, value)

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
        if not self.output or not str(self.output).strip():
            raise ConfigError("an output URL is required (--output)")
        if bool(self.input) == bool(self.manifest):
            raise ConfigError(
                "give exactly one of --input (a folder or prefix) or --manifest (a list of URIs)"
            )
        if isinstance(self.extensions, str):
            object.__setattr__(self, "extensions", tuple(e for e in self.extensions.split(",") if e))
        exts = tuple(sorted({str(e).lower().lstrip(".") for e in self.extensions}))
        if not exts:
            raise ConfigError("extensions must name at least one file extension")
        object.__setattr__(self, "extensions", exts)
        for name in ("input_storage_options", "output_storage_options"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a mapping of fsspec options, got {type(value).__name__}")
            object.__setattr__(self, name, dict(value or {}))
        if self.num_gpus is not None and (not isinstance(self.num_gpus, int) or self.num_gpus < 0):
            raise ConfigError(f"num_gpus must be a non-negative integer, got {self.num_gpus!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 0):
            raise ConfigError(f"limit must be a non-negative integer, got {self.limit!r}")
        if not isinstance(self.rows_per_part, int) or self.rows_per_part < 1:
            raise ConfigError(f"rows_per_part must be a positive integer, got {self.rows_per_part!r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.max_bytes is not None and (not isinstance(self.max_bytes, int) or self.max_bytes < 1):
            raise ConfigError(f"max_bytes must be a positive whole number, got {self.max_bytes!r}")
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


def load_spec(path: str) -> dict[str, Any]:
    """Read a YAML job spec (a mapping of settings) from a local path, an fsspec URL, or
    ``env:NAME`` (an environment variable holding the YAML, as ``seglabel submit`` ships it)."""
    import os

    import fsspec
    import yaml

    try:
        if path.startswith("env:"):
            if path[4:] not in os.environ:
                raise FileNotFoundError(path)
            values = yaml.safe_load(os.environ[path[4:]])
        else:
            with fsspec.open(path, "r") as f:
                values = yaml.safe_load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"job spec {path} not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"job spec {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"job spec {path} must be a mapping of settings, got {type(values).__name__}")
    return values
