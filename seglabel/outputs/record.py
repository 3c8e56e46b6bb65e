"""``job.json``, the job record: written by a run, read by every later run and every reader.

One home for what a record holds and how it is read, so that the job, its resume checks,
``export``, ``preview`` and ``inspect`` agree on it:

* a run writes the settings it was given and the ones it settled on (the checkpoint's task,
  the Hub commit, the model family, the dtype), each once, with versions and the checkpoint's
  licence; no storage options (they may hold credentials);
* a resume is refused when the input or a setting that changes masks differs from the record;
* seglabel 0.1.0's records kept the mask settings as given in a ``"settings"`` mapping; they
  are read here, and only here, in both layouts.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Mapping

from ..core.config import TASKS, EngineConfig, JobConfig
from ..core.errors import ConfigError, OutputError
from ..core.labels import LABEL_ID, name_problem, thing_ids
from ..core.license import License
from ..core.redaction import get_logger, redact_url, url_identity
from ..core.version import __version__
from ..storage.filesystem import absolute_local, absolute_model
from .contract import JOB_FILE
from .store import OutputStore

log = get_logger(__name__)

# The family of an output recorded before families were: Mask2Former was the only one.
DEFAULT_FAMILY = "mask2former"


class JobRecord:
    """One output's ``job.json``: its values as recorded, read in both layouts.

    Values are read through the properties; a record that lacks what a reader needs (a task, a
    label set) is an :class:`~seglabel.core.errors.OutputError` naming the file, raised where the
    value is first asked for.
    """

    def __init__(self, values: Mapping[str, Any], where: str = JOB_FILE):
        self.values = dict(values)
        self.where = where
        # seglabel 0.1.0's layout: the mask settings as given (task and revision as asked, not
        # as resolved; a local checkpoint's path as typed), in one mapping.
        legacy = self.values.get("settings")
        self.legacy: dict[str, Any] | None = dict(legacy) if isinstance(legacy, dict) else None

    # -- making, reading and writing -------------------------------------------------------

    @classmethod
    def new(cls, config: JobConfig, task: str, revision: str | None, id2label: Mapping[int, str],
            family: str, license: License) -> JobRecord:
        """The record of a new run: ``task``, ``revision`` and ``family`` are the ones it settled
        on (the checkpoint's task, the Hub commit, its model type); the other mask settings as
        given (``dtype`` null until the device is known: the job's lifecycle records it then)."""
        return cls({
            # A presigned manifest URL's signature or a URL's password is not recorded.
            "input": redact_url(config.input) if config.input else None,
            "manifest": redact_url(config.manifest) if config.manifest else None,
            "output": redact_url(config.output),
            **mask_settings(config.engine, task, revision, family),
            "model_license": license.record(),
            "id2label": {str(k): v for k, v in sorted(id2label.items())},
            "versions": {
                "seglabel": __version__,
                **{name: _version(name) for name in ("transformers", "torch", "ray")},
            },
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })

    @classmethod
    def read(cls, store: OutputStore) -> JobRecord | None:
        """The output's record; None where it has none. A record that is not a JSON object (or
        not a regular file) is an OutputError naming the file (``OutputStore.read_json``)."""
        values = store.read_json(JOB_FILE)
        if values is None:
            return None
        return cls(values, f"{redact_url(store.url).rstrip('/')}/{JOB_FILE}")

    def write(self, store: OutputStore) -> None:
        """Write (or replace) the output's ``job.json``, whole."""
        store.write_json(JOB_FILE, self.values)

    def replace(self, **values: Any) -> JobRecord:
        """A copy with some values changed."""
        return JobRecord({**self.values, **values}, self.where)

    # -- what a reader needs ---------------------------------------------------------------

    @property
    def task(self) -> str:
        task = self.values.get("task")
        if task not in TASKS:
            raise OutputError(f"{self.where} names an unknown task {task!r}")
        return task

    @cached_property
    def id2label(self) -> dict[int, str]:
        """The labels the run recorded, each a name every format can hold (a record is input
        to every reader: a damaged one must not reach a file half written)."""
        recorded = self.values.get("id2label") or {}
        if not isinstance(recorded, dict) or not all(
                isinstance(k, str) and LABEL_ID.fullmatch(k) for k in recorded):
            raise OutputError(f"{self.where} is not a seglabel job record (its id2label keys are not "
                              "label ids)")
        labels = {int(k): v for k, v in recorded.items()}
        for label_id, name in labels.items():
            problem = name_problem(name)
            if problem is not None:
                raise OutputError(f"{self.where} names label {label_id} with {repr(name)[:80]}: {problem}")
        return labels

    @cached_property
    def things(self) -> frozenset[int] | None:
        """The thing labels of a panoptic output, by the rule the run used (explicit
        ``thing_labels``, else the known label set's flags); None where they are unknown or the
        task is not panoptic."""
        if self.task != "panoptic":
            return None
        try:
            return thing_ids(self.id2label, self._setting("thing_labels"))
        except (ValueError, TypeError):  # a record's thing_labels that are no labels: unknown
            return None

    @property
    def model(self) -> str:
        return str(self._setting("model") or "")

    @property
    def revision(self) -> str | None:
        return self.values.get("revision")

    @property
    def model_version(self) -> str:
        """The checkpoint and its revision, as annotation tools show a prediction's source."""
        return f"{self.model}@{self.revision}" if self.revision else self.model

    @property
    def family(self) -> str:
        return self.values.get("family") or DEFAULT_FAMILY

    def summary(self) -> dict[str, Any]:
        """What ``inspect`` shows of the record."""
        return {k: self._setting(k) for k in ("input", "manifest", "model", "revision", "task", "started")}

    def _setting(self, name: str) -> Any:
        if name in self.values or self.legacy is None:
            return self.values.get(name)
        return self.legacy.get(name)

    # -- the resume checks -----------------------------------------------------------------

    def check_resume(self, config: JobConfig, task: str, revision: str | None, family: str) -> None:
        """Refuse to resume with another input, or with settings that change masks."""
        self.check_input(config)
        self.check_settings(config.engine, task, revision, config.output, family)

    def check_input(self, config: JobConfig) -> None:
        """Refuse to resume an output labeled from another input: keys are relative to their
        input root (or manifest URIs), so two inputs' keys mixed in one output mean nothing."""
        def same_form(url: Any) -> str | None:
            # As recorded, and without signing parameters: a presigned manifest signed anew is the same.
            if not isinstance(url, str):  # a record holding no URL here, or not a string: differs
                return None if url is None else repr(url)
            return url_identity(absolute_local(url)).rstrip("/") if url else None

        before = [same_form(self.values.get(n)) for n in ("input", "manifest")]
        if before != [same_form(config.input), same_form(config.manifest)]:
            was, now = before[0] or before[1], redact_url(config.input or config.manifest)
            raise ConfigError(
                f"{config.output} was labeled from {was!r}, not {now!r}; use the same input to resume, "
                "or --overwrite to start again"
            )

    def check_settings(self, engine: EngineConfig, task: str, revision: str | None, output: str,
                       family: str = DEFAULT_FAMILY) -> None:
        """Refuse to resume an output labeled with settings that change masks (a checkpoint of
        another family at the same place included)."""
        if self.legacy is not None:
            before, now = dict(self.legacy), engine.mask_settings()
            if isinstance(before.get("model"), str):
                before["model"] = absolute_model(before["model"])
        else:
            before, now = dict(self.values), mask_settings(engine, task, revision, family)
        before["family"] = self.family
        now.setdefault("family", family)
        # A dtype not given is the device's default, checked once the device is known (check_dtype).
        changed = [
            k for k in now if k in before and before[k] != now[k] and not _settled_later(k, before[k], now[k])
        ]
        if now.get("stand_in") is not None and "stand_in" not in before:
            changed.append("stand_in")  # an output made before stand-ins existed: a real model's
            before["stand_in"] = None
        if changed:
            diff = "; ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
            raise ConfigError(
                f"{output} was labeled with other mask settings ({diff}); use the same settings to resume, "
                "or --overwrite to start again"
            )

    def check_dtype(self, dtype: str, output: str) -> None:
        """Refuse to resume with another dtype than the one recorded (fp32 on a CPU, then bf16
        on a GPU, would mix two models); a record without one (written before the device was
        known) takes any."""
        recorded = self.values.get("dtype")
        if recorded not in (None, dtype):
            raise ConfigError(
                f"{output} was labeled with dtype {recorded}, and this run would use "
                f"{dtype} (the default on this device); pass --dtype {recorded} to resume, "
                "or --overwrite to start again"
            )


def mask_settings(engine: EngineConfig, task: str, revision: str | None,
                  family: str = DEFAULT_FAMILY) -> dict[str, Any]:
    """The settings that change masks, as a record holds them: the engine's as given, with the
    task, revision and family the run settled on."""
    settings = engine.mask_settings()
    if isinstance(settings.get("model"), str):
        settings["model"] = redact_url(settings["model"])  # a presigned checkpoint URL's signature
    return {**settings, "task": task, "revision": revision, "family": family}


def _settled_later(name: str, before: Any, now: Any) -> bool:
    """Differences the early settings check lets pass: a dtype not given (the device's default,
    checked by ``check_dtype`` once the device is known), and a URL checkpoint recorded without a
    revision by seglabel before its fingerprint was (it is recorded now)."""
    if name == "dtype":
        return now is None
    return name == "revision" and before is None and isinstance(now, str) and now.startswith("files-")


def _version(package: str) -> str:
    """An installed package's version, from its metadata: importing torch and transformers only to
    read theirs took the driver 2 s of a CPU machine's start (nothing else in the driver needs
    them for a local checkpoint); the module's own, where the package has no metadata."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return importlib.import_module(package).__version__
