"""A team's own labels over a model's (``--label-map``), without touching the job's outputs.

A team never labels with COCO's 80 or 133 classes as they are: "vehicle" for car, truck and
bus; nothing for "frisbee". A label map is a YAML or JSON mapping ``{model_label: team_label}``
(many to one; ``null`` drops a label). Labels it does not name are dropped (``unmapped="drop"``,
the default: a team's project holds only its own labels) or kept under their own names
(``"keep"``). The job's PNGs and Parquet keep the model's labels: exports, the preview and
``seglabel eval`` read them through a :class:`LabelSpace`, so a team can change its mapping
without running the model again.

What a mapping does to a row's segments (:meth:`LabelSpace.apply`):

* each segment takes its team label (id = the team label's place: the map's order of first
  appearance, then kept labels in the model's order), or is dropped;
* segments that are regions rather than objects are fused, one per team label and image:
  all of a semantic output's, and a panoptic output's stuff (a team label is a thing when any
  model label mapped to it is one). The fused segment keeps the first one's id, its mask is
  the union (pycocotools' merge), its score the best; the id map's other ids become it (see
  ``remap``), so that a panoptic PNG and its segments_info agree;
* instance segments are never fused; a semantic segment's id is its (team) label's id, as its
  pixels are.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import yaml
from pycocotools import mask as mask_utils

from ..core.config import check_expansion
from ..core.errors import ConfigError, LabelMapError, one_line
from ..core.labels import name_problem
from ..core.redaction import get_logger, redact_url
from ..storage.filesystem import full_uri, open_url, options_for
from ..storage.read import read_bytes
from ..storage.spec import UniqueKeyLoader
from .record import JobRecord

log = get_logger(__name__)

UNMAPPED = ("drop", "keep")
# The one line for a choice of what the map leaves out, made with no map: it would do nothing.
UNMAPPED_WITHOUT_MAP = "--unmapped applies only with --label-map"
MAX_LABEL_MAP_BYTES = 1 << 20


def read_label_map(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str | None]:
    """``{model_label: team_label or None}`` from a YAML or JSON file (at most 1 MiB; what its
    aliases expand to is bounded, as for job specs). Names may hold commas, quotes and any
    Unicode: they are YAML or JSON strings; not control characters (XML, and so Label Studio's
    config, cannot hold them), nor spaces at either end, and at most 1,000 characters."""
    try:
        fs, path = open_url(url, storage_options)
        data = read_bytes(full_uri(fs, path), storage_options, MAX_LABEL_MAP_BYTES)
    except FileNotFoundError:
        raise LabelMapError(f"the label map {url} does not exist") from None
    except Exception as exc:  # storage: permissions, an endpoint, credentials, a FIFO
        reason = f"{type(exc).__name__}: {one_line(exc)}"
        raise LabelMapError(f"cannot read the label map {url}: {reason}") from exc
    try:
        value = yaml.load(data, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, RecursionError) as exc:
        raise LabelMapError(f"the label map {url} is neither YAML nor JSON: {one_line(exc)}") from None
    try:
        check_expansion(value, f"the label map {url}")
    except ConfigError as exc:
        raise LabelMapError(str(exc)) from None
    if not isinstance(value, dict) or not value:
        raise LabelMapError(f"the label map {url} must map model labels to team labels "
                            "({car: vehicle, frisbee: null})")
    for model, team in value.items():
        problem = name_problem(model) or (None if team is None else name_problem(team))
        if problem is None and team is not None and team != team.strip():
            problem = "spaces at an end"
        if problem is not None:
            raise LabelMapError(f"the label map {url}: {_short(model)}: {_short(team)} is not a model label "
                                f"mapped to a team label's name or null ({problem})")
    return dict(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class LabelSpace:
    """The labels a reader of an output works in: the model's own, or a team's
    (:meth:`of_output`, :meth:`mapped`). ``names``: label id -> name; ``things``: the thing ids of a
    panoptic output (None where unknown or not panoptic); ``record``: the mapping as written
    beside an export (None without one)."""

    task: str
    names: dict[int, str]
    things: frozenset[int] | None
    # The model's own labels, and model label id -> label id here (None: the identity).
    model: dict[int, str] = field(default_factory=dict)
    from_model: dict[int, int] | None = None
    record: dict[str, Any] | None = None

    @classmethod
    def of_output(cls, job: JobRecord, label_map: str | None = None, unmapped: str = "drop",
                  output: tuple[str, Mapping[str, Any] | None] | None = None) -> LabelSpace:
        """An output's labels: the model's, or through the label map at ``label_map``, read with
        the ``output``'s (URL, storage options) where it lies on the output's storage (a map
        kept in the job's bucket), as images are read with the input's."""
        if label_map is None:
            return cls(job.task, dict(job.id2label), job.things, dict(job.id2label))
        url, options = output or ("", None)
        mapping = read_label_map(label_map, options_for(label_map, url, options or {}) if url else None)
        return cls.mapped(job.task, job.id2label, job.things, mapping, unmapped, source=label_map)

    @classmethod
    def mapped(cls, task: str, id2label: Mapping[int, str], things: frozenset[int] | None,
               mapping: Mapping[str, str | None], unmapped: str = "drop",
               source: str | None = None) -> LabelSpace:
        """The team's labels: ``mapping`` names model labels (every one must be the model's)."""
        if unmapped not in UNMAPPED:
            raise LabelMapError(f"--unmapped must be one of {', '.join(UNMAPPED)}, got {unmapped!r}")
        model_names = set(id2label.values())
        unknown = [name for name in mapping if name not in model_names]
        if unknown:
            raise LabelMapError(f"the label map names {_short(unknown[0])}, which is not one of the model's "
                                "labels")
        team_ids: dict[str, int] = {}
        for team in mapping.values():
            if team is not None:
                team_ids.setdefault(team, len(team_ids))
        _warn_lookalikes(team_ids)
        from_model: dict[int, int] = {}
        for label_id, name in sorted(id2label.items()):
            if name in mapping:
                team = mapping[name]
            else:
                team = name if unmapped == "keep" else None
            if team is not None:
                from_model[label_id] = team_ids.setdefault(team, len(team_ids))
        if not from_model:
            raise LabelMapError("the label map keeps none of the model's labels: each is null or unmapped")
        team_things = None
        if things is not None:
            team_things = frozenset(from_model[i] for i in things if i in from_model)
        record = {"label_map": dict(mapping), "unmapped": unmapped, "source": source and redact_url(source),
                  "labels": list(team_ids)}
        return cls(task, {i: n for n, i in team_ids.items()}, team_things, dict(id2label), from_model, record)

    def label_of(self, model_label_id: int) -> int | None:
        """The label id here of a model label; None where the mapping drops it."""
        return model_label_id if self.from_model is None else self.from_model.get(model_label_id)

    def _fused(self, label_id: int) -> bool:
        if self.task == "semantic":
            return True
        return self.task == "panoptic" and self.things is not None and label_id not in self.things

    def apply(self, row: Mapping[str, Any]) -> tuple[list[dict], dict[int, int]]:
        """A row's segments in these labels, and ``remap``: each of the row's segment ids ->
        the id it becomes (0: dropped), for the row's id map (:func:`remap_ids`)."""
        segments = row["segments"] or []
        if self.from_model is None:
            return list(segments), {int(s["id"]): int(s["id"]) for s in segments}
        out: list[dict] = []
        remap: dict[int, int] = {}
        groups: dict[int, list[dict]] = {}
        for seg in segments:
            label_id = self.label_of(seg["label_id"])
            if label_id is None:
                remap[int(seg["id"])] = 0
                continue
            mapped = {**seg, "label_id": label_id, "label": self.names[label_id]}
            if self.task == "semantic":  # a semantic segment's id is its label's (its pixels')
                mapped["id"] = label_id
            if self.task == "panoptic" and self.things is not None:
                mapped["is_thing"] = label_id in self.things
            if self._fused(label_id) and label_id in groups:
                groups[label_id].append(mapped)
            else:
                out.append(mapped)
                if self._fused(label_id):
                    groups[label_id] = [mapped]
            remap[int(seg["id"])] = int(groups[label_id][0]["id"]) if label_id in groups else int(seg["id"])
        size = [row["height"], row["width"]]
        return [_merge(groups[s["label_id"]], size) if s["label_id"] in groups else s for s in out], remap


def _warn_lookalikes(names: Iterable[str]) -> None:
    """Two team labels that differ only in case or Unicode form look alike in every tool."""
    seen: dict[str, str] = {}
    for name in names:
        folded = unicodedata.normalize("NFC", name).casefold()
        if folded in seen:
            log.warning("the label map names two team labels that look alike: %r and %r", seen[folded], name)
        seen.setdefault(folded, name)


def _merge(segments: Sequence[dict], size: list[int]) -> dict:
    """One segment of several of one label (disjoint regions): the first's id, their union."""
    first = segments[0]
    if len(segments) == 1:
        return first
    rles = [{"size": size, "counts": s["rle"].encode("ascii")} for s in segments]
    union = mask_utils.merge(rles, intersect=False)
    scores = [s["score"] for s in segments if s["score"] is not None]
    return {**first, "rle": union["counts"].decode("ascii"), "area": int(mask_utils.area(union)),
            "bbox": [float(v) for v in mask_utils.toBbox(union)], "score": max(scores) if scores else None}


def remap_ids(id_map: np.ndarray, remap: Mapping[int, int]) -> np.ndarray:
    """``id_map`` with each id replaced by ``remap``'s (ids it does not name become 0)."""
    ids, inverse = np.unique(id_map, return_inverse=True)
    new = np.array([remap.get(int(i), 0) for i in ids], dtype=id_map.dtype)
    return new[inverse].reshape(id_map.shape)
