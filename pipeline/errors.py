"""User errors: what a user's input or files cause, printed as one line with no traceback.

A leaf module (it imports nothing), so that every layer, models included, raises the same
errors. ``collective`` says that every rank raised the error together: the command line then
prints it once and exits 2 on all ranks, where an error on one rank alone aborts the job.
"""
from __future__ import annotations

import copy
import difflib
import signal
import sys
from contextlib import contextmanager
from functools import cache


class PiadmError(Exception):
    """A user error; ``collective``: every rank raised it together."""

    def __init__(self, message: str = "", *, collective: bool = False):
        super().__init__(message)
        self._collective = collective

    @property
    def collective(self) -> bool:
        """Whether every rank raised this error together: fixed when it is made, or by
        ``everywhere``."""
        return self._collective

    def everywhere(self, message: str | None = None) -> PiadmError:
        """This error as raised by every rank together, with ``message`` where given: a copy,
        so that what a subclass carries (``Unreachable.rungs``, ``WriteFailed.errno``) goes
        with it."""
        if self.collective and message is None:
            return self
        shared = copy.copy(self)
        if message is not None:
            shared.args = (message,)
        shared._collective = True
        return shared


class ConfigError(PiadmError, ValueError):
    """A bad configuration: the message names the key and how to fix it."""


def did_you_mean(name: str, options) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``options`` to a misspelt ``name``, or
    "" when none is close."""
    by_case = {str(o).lower(): o for o in options}
    # SAMPLER for sampler: no close match of its letters (a flag's case is its meaning)
    if str(name).lower() in by_case and not str(name).startswith("-"):
        return f" (did you mean {by_case[str(name).lower()]!r}?)"
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
        # one traceback, through where it was raised, not the same message twice
        raise err.everywhere().with_traceback(err.__traceback__) from None


def raised_together(err: Exception) -> Exception:
    """``err``, which every rank is about to raise (rank 0 met it in work done for all), as a
    collective error: a ``PiadmError`` by ``everywhere``, an ``OSError`` as a copy of the same
    class with ``collective`` true for its class (so that ``except FileExistsError`` still
    takes it and it prints as before); any other error, a fault, as it is."""
    if isinstance(err, PiadmError):
        return err.everywhere()
    if not isinstance(err, OSError):
        return err
    try:
        shared = _shared_class(type(err))(*err.args)
    except TypeError:  # a class that its args do not rebuild: each rank reports it, then aborts
        return err
    for name in ("filename", "filename2"):  # not among its args; set, even None shows
        if getattr(err, name) is not None:
            setattr(shared, name, getattr(err, name))
    shared.__dict__.update(err.__dict__)
    return shared.with_traceback(err.__traceback__)


@cache
def _shared_class(kind: type) -> type:
    """``kind`` with ``collective = True``, under ``kind``'s own name and module; pickled as
    a plain ``kind`` (pickle finds classes by name, and the name is ``kind``'s)."""
    def reduce(self):
        return (kind, *kind.__reduce__(self)[1:])

    return type(kind.__name__, (kind,), {"collective": True, "__module__": kind.__module__,
                                         "__qualname__": kind.__qualname__,
                                         "__reduce__": reduce})


class InputError(ConfigError):
    """An input store, variable or selection that cannot be used: the message says which."""


class OutOfMemory(PiadmError):
    """A rank ran out of memory; the message names the settings that would make the run fit."""


class NetworkFailed(PiadmError):
    """A user's own network raised while sampling: the message names its line."""


def from_here(path) -> str:
    """For a message about a file not found: where a relative ``path`` was looked for (the
    current folder, which a job script or a notebook may not have set where the user thinks),
    "" for an absolute one."""
    import os

    return "" if os.path.isabs(path) else f" (a relative path, read from {os.getcwd()})"


def is_system_error(err: BaseException) -> bool:
    """Whether ``err`` failed in the system rather than in what was read: the file system's (an
    OSError with an errno: EIO, ESTALE on NFS, EACCES) or memory. Such an error says nothing
    of a store's bytes, so it is told as itself, never as a store damaged or not a store. A
    file or folder missing is not one: it says the path holds no store."""
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return False
    return isinstance(err, MemoryError) or (isinstance(err, OSError) and err.errno is not None)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed: torch's on a GPU (its OutOfMemoryError,
    known by name: this module imports nothing), the C allocator's on the host (a RuntimeError
    naming it), or Python's own."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err)
    # cuBLAS, cuFFT and cuDNN report a failed allocation as a RuntimeError of their own
    return isinstance(err, RuntimeError) and any(
        what in text for what in ("can't allocate memory", "not enough memory", "out of memory",
                                  "ALLOC_FAILED", "NOT_ENOUGH_WORKSPACE"))


def thread_failed(what: str, err: RuntimeError, fix: str = "raise it") -> OutOfMemory:
    """The one-line error of ``what`` (a thread) that could not start: Python's RuntimeError
    "can't start new thread", which does not say which limit it met."""
    return OutOfMemory(f"{what} could not start ({err}): a limit on the address space "
                       "(ulimit -v: no room for its stack) or on processes and threads "
                       f"(ulimit -u, a container's or job's pids limit) was met; {fix}")


class BlowUp(PiadmError):
    """generate-data's simulation left the finite numbers: the message names the settings."""


class UnitsOverflow(PiadmError, ArithmeticError):
    """Members finite as sampled leave the finite numbers in the data's units or the store's
    dtype: the message names the normalisation."""


class WriteFailed(PiadmError, OSError):
    """A write of members failed: on this rank, naming the store and the cause (its
    ``errno``, the OSError's), or on another rank of the run, which names them. An OSError,
    so that a caller's ``except OSError`` for a full disk still takes it."""

    def __init__(self, message: str = "", *, errno: int | None = None,
                 collective: bool = False):
        super().__init__(message, collective=collective)
        self.errno = errno

    def __reduce__(self):
        # its errno is an OSError slot that neither its message nor its __dict__ holds: a
        # copy (``everywhere``) or a pickle (to another rank) would lose it
        return type(self), (str(self),), {**self.__dict__, "errno": self.errno}

    @classmethod
    def of(cls, err: OSError, doing: str) -> WriteFailed:
        """``err`` (a full disk, a lost mount) met while ``doing`` (e.g. "writing members to
        PATH"), said with what is kept and what to do."""
        where = f" ({err.filename})" if err.filename else ""
        return cls(f"{doing} failed: {err.strerror or err}{where}; the members written before "
                   "it are kept: fix the cause (free space, the mount) and rerun the same "
                   "command to finish", errno=err.errno)


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


class FailedElsewhere(RuntimeError):
    """A fault rank 0 met in work done for every rank (``console.on_rank0``), as the other
    ranks raise it: its traceback is printed there, once."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or, for a command that does not stop gracefully, a stop signal: ``signum``)
    stopped a command part way; the message says what it kept and how to go on."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


class StoppedTogether(Interrupted):
    """A stop every rank agreed on at the same point of the work (``piadm train``'s step), so
    that no rank waits for another in a collective: the ranks end as one, without an abort."""


# What to lower when a command runs out of memory outside a sampled batch (which names its own)
SAMPLING_FIT = ("lower what runs at once (ensemble.batch_size, calibrate.members, bench.members, "
                "sampler.window or sampler.block_size) or the field (model.shape), or add time "
                "slices")
LOWER_TO_FIT = {
    "generate-data": "lower data.resolution or data.chunk (the snapshots held before a write)",
    "train": "lower train.batch_size, train.channels or the fields' size (train.data), or "
             "add ranks (each takes a slice of the batch)",
    "plan": "the plan runs each sampler of its families on one member at each width, and "
            "calibrates it on calibrate.members: lower the field (model.shape), "
            "calibrate.members, sampler.window or sampler.block_size",
    "bench": "the bench runs bench.members at once (calibrate.members where sampler.tol = "
             "'auto'): lower them, sampler.window or sampler.block_size, or the fields "
             "(bench.sizes, model.shape)",
    "calibrate": "calibrate runs calibrate.members at once: lower it, sampler.window or "
                 "sampler.block_size, or the field (model.shape)",
    "evaluate": "evaluate holds the truth's fields it scores, and one item's members at a "
                "time: score fewer truth times (--truth-range), or run it where more memory is "
                "free",
}


def as_user_error(err: Exception, command: str) -> Exception:
    """An allocation that failed outside a sampled batch (which says its own settings) as
    one line naming what to lower, a thread that could not start (zarr's, torch's) as one
    line naming the limits; any other error as it is."""
    if isinstance(err, FailedElsewhere):  # another rank's fault: that rank says what it was
        return err
    if type(err) is RuntimeError and "can't start new thread" in str(err):
        return thread_failed(f"{command}: a thread", err)  # zarr's or torch's, say
    if "torch" not in sys.modules and not isinstance(err, MemoryError):
        return err  # nothing could have allocated through torch: numpy's and Python's are these
    if isinstance(err, OutOfMemory) or not is_out_of_memory(err):
        return err
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    fix = LOWER_TO_FIT.get(command, SAMPLING_FIT)
    return OutOfMemory(f"{command}: out of memory ({first}): {fix}")
