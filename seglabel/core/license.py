"""A checkpoint's licence as seglabel records and checks it, and a job's rule for which ones it
accepts (``--require-license``). What a checkpoint's card and its authors say is read by
:mod:`seglabel.engine.card`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

UNKNOWN = "unknown"


@dataclass(frozen=True)
class License:
    """A checkpoint's licence: its id (a lower-case SPDX id as Hub cards write them, or
    ``other`` / ``unknown`` / a named licence), where that came from, and what the card said."""

    id: str
    source: str
    card: str | None = None

    @property
    def noncommercial(self) -> bool:
        """Whether the licence forbids commercial use (the Creative Commons NC family)."""
        return bool(re.search(r"(^|-)nc(-|$)", self.id))

    def record(self) -> dict[str, Any]:
        """As job.json records it."""
        return {"license": self.id, "source": self.source, "card": self.card}

    def __str__(self) -> str:
        return f"{self.id} ({self.source})"


def check_allowed(license: License, allowed: tuple[str, ...] | None, model: str) -> None:
    """Refuse a checkpoint whose licence is not among ``allowed`` (``unknown`` never is)."""
    if allowed is None or (license.id != UNKNOWN and license.id in allowed):
        return
    raise ConfigError(
        f"checkpoint {model} is licensed {license.id} ({license.source}); "
        f"--require-license allows only {','.join(allowed)}"
    )
