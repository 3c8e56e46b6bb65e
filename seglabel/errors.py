"""seglabel's errors: one base class, and one way to turn any exception into one short line.

Every error a user can cause (a bad setting, an unreachable input, a missing checkpoint, an
unwritable output, an impossible export) is a :class:`SeglabelError` whose message is one
readable line. The command line catches the base class in one place and exits with the
error's ``exit_status``: 2 for a mistake in what was asked, 1 for a job that stopped while
running. This module imports nothing from the package, so that every other module may use it.
"""

from __future__ import annotations


class SeglabelError(Exception):
    """Base of seglabel's errors; ``str(e)`` is one readable line meant for the user."""

    #: The command line's exit status for this error.
    exit_status = 2


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one short line (botocore, pyarrow and Ray messages can span
    several lines and pages); the exception's type name when it has no message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(stage: str, exc: BaseException, limit: int = 160) -> str:
    """An error row's reason for an exception raised in a stage: ``"write: OSError: ..."``."""
    return f"{stage}: {type(exc).__name__}: {one_line(exc, limit)}"


__all__ = ["SeglabelError", "one_line", "reason"]
