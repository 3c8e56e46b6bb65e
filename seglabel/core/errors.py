"""seglabel's errors: every error class, in one hierarchy, and one way to turn any exception
into one short line.

Every error a user can cause (a bad setting, an unreachable input, a missing checkpoint, an
unwritable output, an impossible export) is a :class:`SeglabelError` whose message is one
readable line, with any URL in it redacted (:mod:`seglabel.core.redaction`). The command line
catches the base class in one place and exits with the error's ``exit_status``: 2 for a mistake
in what was asked, 1 for a job that stopped while running.

The classes follow the data's way through the package: settings, inputs, the checkpoint, the
output, the job, then the readers of an output (label maps, exports, eval). Some are also the
built-in exception that code outside seglabel catches (``ValueError`` for a bad setting,
``OSError`` for a failed write).
"""

from __future__ import annotations

from .redaction import redact


class SeglabelError(Exception):
    """Base of seglabel's errors; ``str(e)`` is one readable line meant for the user, with any
    URL in it redacted."""

    #: The command line's exit status for this error.
    exit_status = 2

    def __init__(self, *args: object):
        # One line whatever a message quotes (a file name or an id from a user's file could
        # otherwise forge a second line on stderr).
        super().__init__(*(_one_line_text(redact(a)) if isinstance(a, str) else a for a in args))


def _one_line_text(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


# -- what was asked -----------------------------------------------------------------------------


class ConfigError(SeglabelError, ValueError):
    """A configuration value is invalid; the message is one readable line."""


# -- inputs -------------------------------------------------------------------------------------


class SourceError(SeglabelError):
    """The input cannot be enumerated (missing, unreachable, not a folder, bad manifest).

    Its message is one readable line, meant to be shown to the user as is.
    """


class DecodeError(SeglabelError):
    """Bytes that cannot be decoded into an image; ``str(e)`` is a short human reason."""


class Unreadable(Exception):
    """An object that is not read on purpose (not a regular file, over its size limit);
    ``str(e)`` is the reason for its error row. Not a :class:`SeglabelError`: the bounded
    reader (:func:`seglabel.storage.read_bytes`) raises it for each caller to say what the
    object was (an image, a mask, a model card, a truth file)."""


# -- the checkpoint -----------------------------------------------------------------------------


class CheckpointError(SeglabelError, RuntimeError):
    """The checkpoint cannot be found or loaded; the message is one readable line."""


# -- the output ---------------------------------------------------------------------------------


class OutputError(SeglabelError, RuntimeError):
    """The output cannot be read or written; the message is one readable line."""


class WriteFailed(OutputError, OSError):
    """A file of the output could not be written (a full disk, a permission, a folder in its
    place): one line naming the file, and still the OSError that storage code catches."""


class OutputBusy(OutputError):
    """Another run holds the output's lease."""


# -- the job ------------------------------------------------------------------------------------


class ClusterError(SeglabelError):
    """The Ray cluster named cannot be joined; the message is one readable line."""


class JobError(SeglabelError, RuntimeError):
    """The job stopped on purpose (e.g. too many errors); the message is one readable line."""

    exit_status = 1


# -- the readers of an output -------------------------------------------------------------------


class LabelMapError(SeglabelError):
    """A label map that cannot be read or does not fit the model; one readable line."""


class ExportError(SeglabelError):
    """An export that cannot be done as asked; ``str(e)`` is one readable line."""


class EvalError(SeglabelError):
    """An evaluation that cannot be done as asked; ``str(e)`` is one readable line."""


# -- one line -----------------------------------------------------------------------------------


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one short line (botocore, pyarrow and Ray messages can span
    several lines and pages); the exception's type name when it has no message."""
    text = redact(" ".join(str(exc).split())) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(stage: str, exc: BaseException, limit: int = 160) -> str:
    """An error row's reason for an exception raised in a stage: ``"write: OSError: ..."``."""
    return f"{stage}: {type(exc).__name__}: {one_line(exc, limit)}"


def first_line(exc: BaseException) -> str:
    """An exception's first line (transformers' and huggingface_hub's messages go on with advice
    for another context); the exception's type name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
