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
        return bool(re.search(r"(^|-)nc(-|$)", self.id)) or self.id in NONCOMMERCIAL

    def record(self) -> dict[str, Any]:
        """As job.json records it."""
        return {"license": self.id, "source": self.source, "card": self.card}

    def __str__(self) -> str:
        return f"{self.id} ({self.source})"


# Licence families whose ids end in a version written with ".0" (``cc-by-4.0``, ``apache-2.0``):
# only these get a missing ".0" added (``mit-0`` and ``bsd-2-clause`` are ids as they are).
_VERSIONED = ("cc-", "cc0-", "apache-", "gpl-", "lgpl-", "agpl-", "mpl-", "epl-", "cdla-", "openrail")
# Names people write for ids.
_ALIASES = {"apache-license-2.0": "apache-2.0", "the-mit-license": "mit", "mit-license": "mit"}
# Licences that forbid commercial use besides Creative Commons' NC family.
NONCOMMERCIAL = frozenset({"fair-noncommercial-research-license"})


def spdx_id(name: str) -> str:
    """A licence name as the lower-case SPDX-style id Hub cards write (``cc-by-nc-sa-4.0``):
    ``CC BY-NC-SA 4.0``, ``CC_BY_NC_4.0`` and ``Apache-2`` are how people write the same ids.
    A version's missing ``.0`` is added (``cc-by-4`` → ``cc-by-4.0``)."""
    dashed = re.sub(r"[\u2010-\u2015\u2212]", "-", name.strip().lower())  # typographic dashes
    text = "-".join(w for w in re.split(r"[\s_]+", dashed) if w)
    if text.startswith(_VERSIONED):
        text = re.sub(r"-(\d+)$", r"-\1.0", text)
    return _ALIASES.get(text, text)


def check_allowed(license: License, allowed: tuple[str, ...] | None, model: str) -> None:
    """Refuse a checkpoint whose licence is not among ``allowed`` (``unknown`` never is), both
    compared as SPDX-style ids."""
    if allowed is None or (license.id != UNKNOWN and spdx_id(license.id) in {spdx_id(a) for a in allowed}):
        return
    raise ConfigError(
        f"checkpoint {model} is licensed {license.id} ({license.source}); "
        f"--require-license allows only {','.join(allowed)}"
    )
