"""The attempt ledger: how a stage tells a retry after its worker died from a first run, so
that an image that kills its worker (an OOM kill, a segfault) gets an error row after
MAX_ATTEMPTS deaths instead of Ray retrying its task forever (``stages.bounded``).

A module of its own, apart from the pipeline: the ledger runs as an actor in a process of its
own, which then imports only this, not the pipeline with Pillow and pycocotools (its start:
0.64 -> 0.53 CPU s on the 2-core bench machine, where it competes with the Segmenter actor's for
the cores; Ray's own serialization loads numpy and pyarrow in any worker all the same). One
actor serves every job a driver process runs (a notebook or a service labeling one output after
another), each job's counts kept under its run id: a process started for each job cost about
1 CPU second a job (measured over the test suite: 110 ledger processes, 120 CPU s).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

# Executions of one image that may end with its worker's death (an OOM kill, a segfault)
# before the image gets an error row instead: Ray retries a dead worker's task forever.
MAX_ATTEMPTS = 3


class AttemptLedger:
    """A Ray actor that counts the executions of batches and images that have started and not
    ended, so that a stage can tell a retry after its worker died from a first run; by run, so
    that several jobs of one driver share it.

    Only work in flight is held (a finished batch's entries are dropped, and a run's leftovers
    when it ends): a few thousand integers, whatever the corpus.
    """

    def __init__(self) -> None:
        self._started: Counter[tuple[str, str, int]] = Counter()
        self._refusals: dict[str, Exception] = {}

    def begin(self, run: str, stage: str, indices: list[int]) -> list[int]:
        """Count an execution of each todo row; returns how many had started before."""
        before = [self._started[(run, stage, i)] for i in indices]
        self._started.update((run, stage, i) for i in indices)
        return before

    def end(self, run: str, stage: str, indices: list[int]) -> None:
        for i in indices:
            self._started.pop((run, stage, i), None)

    def in_flight(self, run: str) -> int:
        """How many (stage, row) executions of ``run`` have begun and not ended."""
        return sum(1 for key in self._started if key[0] == run)

    def refuse(self, run: str, error: Exception) -> None:
        """A Segmenter's refusal to run its checkpoint (the first one is kept): the driver ends
        the job with it, since Ray Data hands the driver only its text, mixed with its own."""
        self._refusals.setdefault(run, error)

    def refusal(self, run: str) -> Exception | None:
        """The refusal a Segmenter of ``run`` sent, if any."""
        return self._refusals.get(run)

    def forget(self, run: str) -> None:
        """Drop what is left of an ended run (the batches in flight when it failed)."""
        self._refusals.pop(run, None)
        for key in [key for key in self._started if key[0] == run]:
            del self._started[key]


@dataclass(frozen=True)
class RunLedger:
    """One run's side of the ledger actor, as the stages hold it: each call is the actor's
    method for this run, and returns its ``ObjectRef``."""

    actor: Any
    run: str

    def begin(self, stage: str, indices: list[int]) -> Any:
        return self.actor.begin.remote(self.run, stage, indices)

    def end(self, stage: str, indices: list[int]) -> Any:
        return self.actor.end.remote(self.run, stage, indices)

    def refuse(self, error: Exception) -> Any:
        return self.actor.refuse.remote(self.run, error)

    def refusal(self) -> Any:
        return self.actor.refusal.remote(self.run)

    def in_flight(self) -> Any:
        return self.actor.in_flight.remote(self.run)

    def forget(self) -> Any:
        return self.actor.forget.remote(self.run)
