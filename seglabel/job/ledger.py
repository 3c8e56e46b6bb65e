"""The attempt ledger: how a stage tells a retry after its worker died from a first run, so
that an image that kills its worker (an OOM kill, a segfault) gets an error row after
MAX_ATTEMPTS deaths instead of Ray retrying its task forever (``stages.bounded``).

A module of its own, apart from the pipeline: the ledger runs as an actor in a process of its
own, started with every job, which then imports only this, not the pipeline with Pillow and
pycocotools (its start: 0.64 -> 0.53 CPU s on the 2-core bench machine, where it competes with
the Segmenter actor's for the cores; Ray's own serialization loads numpy and pyarrow in any
worker all the same).
"""

from __future__ import annotations

from collections import Counter

# Executions of one image that may end with its worker's death (an OOM kill, a segfault)
# before the image gets an error row instead: Ray retries a dead worker's task forever.
MAX_ATTEMPTS = 3


class AttemptLedger:
    """A Ray actor that counts the executions of batches and images that have started and not
    ended, so that a stage can tell a retry after its worker died from a first run.

    Only work in flight is held (a finished batch's entries are dropped): a few thousand
    integers, whatever the corpus.
    """

    def __init__(self) -> None:
        self._started: Counter[tuple[str, int]] = Counter()
        self._refusal: Exception | None = None

    def begin(self, stage: str, indices: list[int]) -> list[int]:
        """Count an execution of each todo row; returns how many had started before."""
        before = [self._started[(stage, i)] for i in indices]
        self._started.update((stage, i) for i in indices)
        return before

    def end(self, stage: str, indices: list[int]) -> None:
        for i in indices:
            self._started.pop((stage, i), None)

    def in_flight(self) -> int:
        """How many (stage, row) executions have begun and not ended."""
        return len(self._started)

    def refuse(self, error: Exception) -> None:
        """A Segmenter's refusal to run its checkpoint (the first one is kept): the driver ends
        the job with it, since Ray Data hands the driver only its text, mixed with its own."""
        self._refusal = self._refusal or error

    def refusal(self) -> Exception | None:
        """The refusal a Segmenter sent, if any."""
        return self._refusal
