"""Processes of this host, and the files they leave behind (``replace_file`` writes a file
whole or not at all): a leaf module (the standard library and ``pipeline.errors`` only), so
that ``models/`` may use it too."""
from __future__ import annotations

import fcntl
import glob
import os
import socket
import uuid
from pathlib import Path

from pipeline.errors import naming


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return not _ended(pid)


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has ended and only waits to be reaped (a zombie: a rank that
    MPI_Abort killed, whose launcher has not collected it yet), where Linux's /proc tells."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (another system), or gone this instant
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] in (["Z"], ["X"])


def own_name(prefix: str, *tail: str) -> str:
    """``PREFIX`` + ``HOST-PID`` of this process, then ``-TAIL`` each: a name no other
    process uses, which ``left_by_dead`` recognises once the process is gone."""
    return "-".join([f"{prefix}{socket.gethostname()}", str(os.getpid()), *tail])


def left_by_dead(folder: Path, prefix: str, tail: int = 0, suffix: str = "") -> list[Path]:
    """The entries of ``folder`` named by ``own_name(prefix, ...)`` with ``tail`` parts and
    ``suffix``, of processes of this host that are gone (another host's are left alone).
    Parsed from the right: host "node" must not take host "node-12"'s for its own."""
    mine = f"{prefix}{socket.gethostname()}"
    found = []
    for left in folder.glob(f"{glob.escape(mine)}-*{glob.escape(suffix)}"):
        head, pid, *_ = left.name.removesuffix(suffix).rsplit("-", 1 + tail)
        if head == mine and pid.isdigit() and not process_alive(int(pid)):
            found.append(left)
    return found


class Held(Exception):
    """The lock another live process holds; ``holder`` names it (host and pid)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def hold_lock(path: Path):
    """The open lock file beside ``path`` (``.NAME.lock``), holding its exclusive lock until
    it is closed or the process ends, killed or not; None where the file system has no locks.
    Raises ``Held`` naming the process that holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    real = Path(os.path.realpath(path))  # a link locks what it names
    lock = open(real.with_name(f".{real.name}.lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise Held(holder) from None
    except OSError:  # a file system without flock: unlocked
        lock.close()
        return None
    lock.seek(0)
    lock.truncate()
    lock.write(f"host {socket.gethostname()}, pid {os.getpid()}")
    lock.flush()
    return lock


def _temp(path: Path) -> Path:
    """A temp name beside ``path`` that no other writer uses: two processes saving one path
    at once would otherwise truncate each other's half-written file and rename it in."""
    return path.with_name(own_name(f".{path.name}.", uuid.uuid4().hex[:8]) + ".tmp")


def replace_file(path: str | Path, write) -> None:
    """``write(temp)`` to a temp file beside ``path``, then rename it over ``path``: a write
    that fails (a full disk) or is killed leaves the old file as it was, never a cut one. The
    temp file is removed if the write fails; those of dead processes (a kill mid-write) are
    removed by the next write."""
    path = Path(path)
    if path.is_symlink():  # the link stays: what it names is written (a rename replaced it)
        path = Path(os.path.realpath(path))
    for left in left_by_dead(path.parent, f".{path.name}.", tail=1, suffix=".tmp"):
        left.unlink(missing_ok=True)
    tmp = _temp(path)
    try:
        with naming(path):  # a write's own error names no file
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (``replace_file``), making its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, lambda tmp: tmp.write_text(text))
