"""The bench's settings: one frozen, validated object, built like the job's ``JobConfig``.

The engine's settings (checkpoint revision, task, batch size, dtype, device, resolution and
thresholds) are an :class:`~seglabel.core.config.EngineConfig` with its own defaults and checks;
the bench adds what it measures and where. Flags and a YAML spec (``--config``) both build it
through :meth:`BenchConfig.from_mapping`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ..core.config import EngineConfig
from ..core.errors import ConfigError
from ..storage.spec import load_spec

ARCHS = ("tiny", "swin-s", "swin-l", "eomt-tiny", "eomt-s", "eomt-l")
# The engine settings a bench takes by name (its checkpoint is ``model`` or one built here).
ENGINE_KEYS = (
    "revision", "task", "batch_size", "dtype", "device", "resolution",
    "score_threshold", "mask_threshold", "overlap_threshold", "compile",
)


def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """``384`` -> (384, 384); ``800x1088`` -> (800, 1088) (height x width); ``native`` -> None."""
    spec = str(text if text is not None else "native").strip().lower()
    if spec in ("native", "orig", "original"):
        return None
    parts = spec.split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"--size {text!r}: expected S (square), HxW (e.g. 800x1088) or native")
    return values[0], values[1]


def _positive(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        kind = "a whole number >= 0" if allow_zero else "a positive whole number"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class BenchConfig:
    """What ``seglabel bench`` measures, on what, and where.

    ``model`` is a Hub id or checkpoint directory; without one, a random-weight checkpoint of
    ``arch`` (default tiny) is built and calibrated to carry about ``target_segments`` segments
    per image, masks covering about ``mask_coverage`` of the image each. ``engine.model`` is
    not read: each phase runs the checkpoint the bench settled on.
    """

    engine: EngineConfig = EngineConfig()
    model: str | None = None
    arch: str | None = None
    images: int = 64
    size: str = "384"
    photos: str | None = None
    target_segments: float = 20
    mask_coverage: float = 0.04
    hf_images: int | None = None
    pipeline_repeat: int = 1
    # (c) and the plumbing bench: an untimed job of this many images first, in the same Ray.
    pipeline_warm_up: int = 0
    warmup: int = 1
    threads: int | None = None
    skip_hf: bool = False
    skip_pipeline: bool = False
    num_gpus: int | None = 1
    address: str | None = None
    workdir: str | None = None
    keep: bool = False
    json: str | None = None
    memory: bool = False
    memory_entries: int = 1_200_000
    # The plumbing bench: the model replaced by this stand-in (seglabel.engine.standin's spec).
    stand_in: str | None = None

    def __post_init__(self) -> None:
        if self.model and self.arch:
            raise ConfigError("give --model or --arch, not both")
        if self.model is None and self.arch is None:
            object.__setattr__(self, "arch", "tiny")
        if self.arch is not None and self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        object.__setattr__(self, "size", str(self.size))
        parse_size(self.size)
        _positive("images", self.images)
        _positive("hf_images", self.hf_images, allow_none=True)
        _positive("pipeline_repeat", self.pipeline_repeat)
        _positive("threads", self.threads, allow_none=True)
        _positive("memory_entries", self.memory_entries)
        _positive("warmup", self.warmup, allow_zero=True)
        _positive("pipeline_warm_up", self.pipeline_warm_up, allow_zero=True)
        if self.num_gpus is not None and (not isinstance(self.num_gpus, int) or self.num_gpus < 0):
            raise ConfigError(f"num_gpus must be a whole number >= 0, got {self.num_gpus!r}")
        if self.target_segments < 0:
            raise ConfigError(f"target_segments must be >= 0, got {self.target_segments}")
        if not 0 <= self.mask_coverage < 1:
            raise ConfigError(f"mask_coverage must be between 0 and 1, got {self.mask_coverage}")
        if self.stand_in is not None:
            self.engine.replace(stand_in=self.stand_in)  # its spec checked as the job checks it

    @property
    def image_size(self) -> tuple[int, int] | None:
        """The images' (height, width), or None for the photos' own sizes."""
        return parse_size(self.size)

    @property
    def task(self) -> str:
        """The task: ``--task``, else the one ``--model``'s name ends with, else instance."""
        from ..engine.checkpoint import detect_task

        if self.model:
            return detect_task(self.model, self.engine.task)
        return self.engine.task or "instance"

    def replace(self, **changes: Any) -> "BenchConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "BenchConfig":
        """Build from flat settings by name (dashes or underscores), rejecting unknown ones."""
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        own = {f.name for f in dataclasses.fields(cls)} - {"engine"}
        unknown = sorted(set(values) - own - set(ENGINE_KEYS))
        if unknown:
            known = ", ".join(sorted(own | set(ENGINE_KEYS)))
            raise ConfigError(f"unknown bench setting(s) {', '.join(unknown)}; known: {known}")
        engine_values = {k: v for k, v in values.items() if k in ENGINE_KEYS and v is not None}
        engine = EngineConfig(**engine_values)
        return cls(engine=engine, **{k: v for k, v in values.items() if k in own})

    @classmethod
    def from_spec(cls, path: str | None, overrides: Mapping[str, Any]) -> "BenchConfig":
        """A YAML spec's settings (when ``path`` is given), overridden by ``overrides``."""
        values = dict(load_spec(path)) if path else {}
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        values.update(overrides)
        try:
            return cls.from_mapping(values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}" if path else str(exc)) from exc


__all__ = ["ARCHS", "ENGINE_KEYS", "BenchConfig", "parse_size"]
