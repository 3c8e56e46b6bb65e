"""What a run tells people: its summary, and the CPU seconds each stage spent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.license import License
from ..core.redaction import get_logger

log = get_logger(__name__)


@dataclass
class Summary:
    """What a run did, and the state of the output afterwards."""

    output: str
    task: str
    model: str
    found: int = 0
    already_done: int = 0
    held_back: int = 0  # to do, but left for a later run by --limit
    processed: int = 0
    ok: int = 0
    error: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    actors: dict[str, int] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    # CPU seconds by stage over the run (Ray Data's per-operator CPU; the driver's own).
    stage_cpu_s: dict[str, float] = field(default_factory=dict)
    # The checkpoint's licence, as read before the run (None: the summary of another tool).
    license: License | None = None

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        """A one-screen summary for people."""
        if self.dry_run:
            return (
                f"dry run: {self.found} images found, {self.already_done} already labeled, "
                f"{self.found - self.already_done} to do; output {self.output}"
            )
        if self.found == 0:
            return f"no images found; wrote an empty result to {self.output}"
        lines = self._work_lines()
        if self.totals:
            lines.append(
                f"output now holds {self.totals.get('total', 0)} rows: {self.totals.get('ok', 0)} ok, "
                f"{self.totals.get('error', 0)} errors"
            )
            for reason, count in self.totals.get("errors_by_reason", {}).items():
                lines.append(f"  {count:>8}  {reason}")
        lines.append(
            f"masks: {self.output.rstrip('/')}/masks/  metadata: {self.output.rstrip('/')}/metadata/"
        )
        if self.license is not None:
            lines.append(f"checkpoint licence: {self.license}")
        return "\n".join(lines)

    def _work_lines(self) -> list[str]:
        """What this run labeled, skipped and left."""
        lines = []
        if self.processed == 0 and self.held_back:
            lines.append(f"labeled nothing (--limit); {self.already_done} images already have rows")
        elif self.processed == 0:
            lines.append(f"nothing to do: all {self.already_done} images already have rows in {self.output}")
        else:
            lines.append(
                f"labeled {self.processed} images ({self.ok} ok, {self.error} failed) "
                f"in {self.seconds:.1f} s, "
                f"{self.images_per_second:.1f} images/s"
            )
            if self.already_done:
                lines.append(f"skipped {self.already_done} images already labeled")
        if self.held_back:
            lines.append(f"left {self.held_back} images for a later run (--limit): the output is incomplete")
        return lines


def stage_cpu(ds: Any, names: dict[str, str]) -> dict[str, float]:
    """Each stage's CPU seconds over the run, from Ray Data's per-operator statistics (a
    developer API: nothing, with a debug line, should it change). ``names``: a part of Ray
    Data's operator name (``MapBatches(DecodeStage)``) → the stage's name in the report."""
    try:
        pending, out = [ds.get_stats_summary()], {}
        while pending:
            stats = pending.pop()
            pending.extend(stats.parents)
            for op in stats.operators_stats:
                if op.cpu_time is not None:
                    name = next((n for k, n in names.items() if k in op.operator_name), op.operator_name)
                    out[name] = out.get(name, 0.0) + float(op.cpu_time.sum)
        return out
    except Exception as exc:  # the statistics are a report, never a reason to fail the job
        log.debug("no per-stage CPU times: %s", exc)
        return {}
