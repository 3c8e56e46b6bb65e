"""The checkpoint a job runs, settled once: :class:`ResolvedCheckpoint`.

The driver resolves it from the checkpoint's files before anything is read or written (task,
labels, thing labels, the label filter, the revision every Segmenter loads, the family, the
licence), refusing in one line what cannot run; every Segmenter of the job is handed the same
object and checks that the weights it loaded are that checkpoint's. A Segmenter made on its own
(``Segmenter("path")``) settles it from what it loaded, by the same rules (:func:`settle`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..core.config import EngineConfig
from ..core.errors import ConfigError
from ..core.labels import resolve_labels, thing_ids
from ..core.license import License, check_allowed
from .card import checkpoint_license
from .checkpoint import check_family_settings, detect_task, inspect_checkpoint


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """What a job settled about its checkpoint: ``task``; ``id2label``; ``things``, the thing
    labels (None: unknown, so panoptic fuses no stuff); ``keep``, the label ids ``--labels``
    keeps (None: all); the ``revision`` every Segmenter loads; the ``family``; ``split``, whether
    an EoMT preprocessor cuts images into crops; and the ``license`` (None where not read)."""

    model: str
    task: str
    family: str
    id2label: dict[int, str]
    things: frozenset[int] | None = None
    keep: frozenset[int] | None = None
    revision: str | None = None
    split: bool = False
    license: License | None = None

    @property
    def fused(self) -> frozenset[int]:
        """The labels a panoptic image fuses into one segment each: its stuff labels (none
        where things are unknown, or the task is not panoptic)."""
        if self.task != "panoptic" or self.things is None:
            return frozenset()
        return frozenset(set(self.id2label) - set(self.things))


def settle(engine: EngineConfig, id2label: Mapping[int, str], family: str, revision: str | None,
           split: bool = False, license: License | None = None) -> ResolvedCheckpoint:
    """A checkpoint's labels and family with the engine's settings: the task (given, or from
    the checkpoint's name), settings the family cannot take, and thing or kept labels it does
    not have, each refused in one line."""
    task = detect_task(engine.model, engine.task)
    check_family_settings(family, engine.resolution, task, split, engine.model)
    try:
        things = thing_ids(id2label, engine.thing_labels)
        keep = resolve_labels(id2label, engine.labels) if engine.labels is not None else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return ResolvedCheckpoint(engine.model, task, family, dict(id2label), things, keep, revision, split,
                              license)


def resolve_checkpoint(engine: EngineConfig, require_license: tuple[str, ...] | None = None,
                       read_license: bool = False) -> ResolvedCheckpoint:
    """The engine's checkpoint resolved from its files alone (no weights): a checkpoint that
    cannot be used, a licence not among ``require_license``, settings it cannot take and labels
    it does not have are each a one-line refusal, in that order. ``read_license`` (or
    ``require_license``) reads its licence."""
    detect_task(engine.model, engine.task)  # a missing --task is said before any file is read
    info = inspect_checkpoint(engine.model, engine.revision)
    license = None
    if read_license or require_license is not None:
        license = checkpoint_license(engine.model, info.revision, info.family)
        check_allowed(license, require_license, engine.model)
    return settle(engine, info.id2label, info.family, info.revision, info.split, license)
