"""User errors: what a user's input or files cause, printed as one line with no traceback.

A leaf module (it imports nothing), so that every layer, models included, raises the same
errors. ``collective`` says that every rank raised the error together: the command line then
prints it once and exits 2 on all ranks, where an error on one rank alone aborts the job.
"""
from __future__ import annotations


class PiadmError(Exception):
    """A user error; ``collective``: every rank raised it together."""

    def __init__(self, message: str = "", *, collective: bool = False):
        super().__init__(message)
        self.collective = collective


class ConfigError(PiadmError, ValueError):
    """A bad configuration: the message names the key and how to fix it."""


class EvaluationError(ValueError):
    """The store or the truth cannot be evaluated as asked; the message says how to fix it."""
