"""User errors: what a user's input or files cause, printed as one line with no traceback.

A leaf module (it imports nothing), so that every layer, models included, raises the same
errors. ``collective`` says that every rank raised the error together: the command line then
prints it once and exits 2 on all ranks, where an error on one rank alone aborts the job.
"""
from __future__ import annotations

import difflib
import signal
from contextlib import contextmanager


class PiadmError(Exception):
    """A user error; ``collective``: every rank raised it together."""

    def __init__(self, message: str = "", *, collective: bool = False):
        super().__init__(message)
        self.collective = collective


class ConfigError(PiadmError, ValueError):
    """A bad configuration: the message names the key and how to fix it."""


def did_you_mean(name: str, options) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``options`` to a misspelt ``name``, or
    "" when none is close."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@contextmanager
def raised_by_every_rank():
    """Re-raise a ``PiadmError`` from the block as collective: for work whose inputs (the
    config, the rank count) are the same on every rank, so that every rank raises it."""
    try:
        yield
    except PiadmError as err:
        if err.collective:
            raise
        raise type(err)(str(err), collective=True) from err


class OutOfMemory(PiadmError):
    """A rank ran out of memory; the message names the settings that would make the run fit."""


class BlowUp(PiadmError):
    """generate-data's simulation left the finite numbers: the message names the settings."""


class WriteFailed(PiadmError, OSError):
    """A write of members failed: on this rank, naming the store and the cause (its
    ``errno``, the OSError's), or on another rank of the run, which names them. An OSError,
    so that a caller's ``except OSError`` for a full disk still takes it."""


@contextmanager
def naming(path):
    """Give an OSError that names no file the ``path`` it concerns: Zarr's writes meeting a
    full disk raise one without, and its one line would say "cannot use: No space left"."""
    try:
        yield
    except OSError as err:
        if err.filename is None and not isinstance(err, PiadmError):
            err.filename = str(path)
        raise


class EvaluationError(PiadmError, ValueError):
    """The store or the truth cannot be evaluated as asked; the message says how to fix it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or, for a command that does not stop gracefully, a stop signal: ``signum``)
    stopped a command part way; the message says what it kept and how to go on."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum
