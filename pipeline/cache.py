"""The measurement caches beside each other in ``$PIADM_CACHE`` (default ``~/.cache/piadm``):
calibrated tolerances, planner profiles, equal-quality steps and input statistics, each a
JSON object keyed by a hash of what decides the entry. Writes are atomic (temp file, then
rename), so concurrent runs never leave a half-written file, and each read-modify-write
holds a lock file beside the cache (``fcntl.flock``), so that runs writing other keys at
once lose none of them; the last writer of one key wins.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import stat
import time
from pathlib import Path

from pipeline.console import say
from pipeline.processes import replace_file


# The folder of the default cache where no home folder is known (no HOME, a uid without a
# passwd entry): nothing is found there, and a write says to set PIADM_CACHE.
NO_HOME = Path("(no home folder: set PIADM_CACHE)")


def cache_path(name: str) -> Path:
    """The cache file ``name`` (e.g. ``calibration.json``) under $PIADM_CACHE, else
    ~/.cache/piadm/ (``NO_HOME`` where no home is known). A "~" that the shell left (quoted)
    is the home folder: it made a folder named "~" in the working folder."""
    root = os.environ.get("PIADM_CACHE")
    if not root:
        try:
            root = Path.home() / ".cache" / "piadm"
        except RuntimeError:
            return NO_HOME / name
    return Path(os.path.expanduser(root)) / name


class Damaged(ValueError):
    """A cache file that holds no JSON object of entries."""


def _load(path: Path) -> dict:
    """The entries of the JSON cache file ``path``; raises ``FileNotFoundError`` where there
    is none, another ``OSError`` where it cannot be read and ``Damaged`` where it holds no
    JSON object."""
    try:
        entries = json.loads(path.read_text())
    except ValueError as err:  # a cut or garbled file (UnicodeDecodeError is one too)
        raise Damaged(f"{err}") from None
    if not isinstance(entries, dict):
        raise Damaged(f"a JSON {type(entries).__name__}, not an object of entries")
    return entries


_READ_WARNED: set = set()  # the cache files read_cache warned of in this process


def read_cache(path: Path, quiet: bool = False) -> dict:
    """The entries of the JSON cache file ``path``, {} when it is missing, unreadable or no
    JSON object (a file cut short, or another tool's); said once a file where it is there but
    cannot be read (not where ``quiet``): its entries are measured again."""
    try:
        return _load(path)
    except FileNotFoundError:
        return {}
    except (OSError, Damaged) as err:
        if not quiet and path not in _READ_WARNED:
            _READ_WARNED.add(path)
            say(f"piadm: warning: cannot read the cache {path} ({_why(err)}): what it holds is "
                "measured again")
        return {}


def _why(err: Exception) -> str:
    """An error's own words, without its errno and file name."""
    return (err.strerror or str(err)) if isinstance(err, OSError) else str(err)


def read_entry(path: Path, key: str, valid, quiet: bool = False) -> dict | None:
    """The entry ``key`` of the JSON cache file ``path`` where it is an object that ``valid``
    accepts (a function of the entry, which may raise), else None: an entry edited or
    damaged by hand is measured again, as a missing one is, rather than read into a
    traceback or a tolerance that is no number (said, but where ``quiet``)."""
    entry = read_cache(path, quiet).get(key)
    try:
        if isinstance(entry, dict) and valid(entry):
            return entry
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        pass
    if entry is not None and not quiet and (path, key) not in _UNUSABLE:  # said once
        _UNUSABLE.add((path, key))
        say(f"piadm: warning: the cache {path} holds this measurement's entry in a form piadm "
            "cannot use (edited or damaged): measuring it again, and the new one replaces it")
    return None


_UNUSABLE: set = set()  # (cache file, key) of entries already said to be unusable


def positive(value) -> bool:
    """Whether ``value`` (read from JSON) is a finite number > 0, not a bool."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


_WARNED: dict = {}  # cache file: why update_cache last could not write it, in this process
_SAID: set = set()  # (cache folder, why) said already: two files' causes alternated, each said


def update_cache(path: Path, key: str, entry, quiet: bool = False) -> bool:
    """Set ``key`` to ``entry`` in the JSON cache file ``path``; whether it was kept. A cache
    that cannot be written (a read-only $PIADM_CACHE or file, a file in its place, one that
    cannot be read, so that writing would lose its other entries) costs the next run a new
    measurement, not this one what it measured: a warning says so (not where ``quiet``: a
    saving the run does without), and the run goes on. A file holding no JSON object is moved
    aside (said), not written over."""
    try:
        _update(path, key, entry)
        _WARNED.pop(path, None)
        return True
    except OSError as err:
        why = _cannot(path, err)
        if not quiet and (path.parent, why) not in _SAID:  # once a folder and cause: a plan
            _SAID.add((path.parent, why))  # measures many
            where = Path(os.path.realpath(path)).parent  # a link's target's
            say(f"piadm: warning: cannot keep this measurement in {where} ({why}): the next "
                "run measures it again; set PIADM_CACHE to a folder you may write")
        _WARNED[path] = why
        return False


def not_kept(path: Path) -> str:
    """Why the last write to the cache file ``path`` failed in this process ("" if none, or
    if a later one succeeded)."""
    return _WARNED.get(path, "")


def _cannot(path: Path, err: OSError) -> str:
    """Why ``path`` cannot be written, in the words of what is in the way (asked of the file
    system with os.path, which answers False where it cannot look rather than raise)."""
    folder = path.parent
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    for held in (path, path.with_name(f"{path.name}.lock")):
        if os.path.isdir(held):
            return f"{held} is a folder, not a file"
    return _why(err)


def _open_lock(path: Path) -> int:
    """A descriptor of the lock file ``path``, made if missing: open for writing, as NFS
    needs for an exclusive lock (its clients emulate flock with fcntl locks), else read-only
    where it is another user's (their umask's mode), which a local flock takes."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _wait_for(lock: int, path: Path) -> None:
    """The exclusive lock on descriptor ``lock`` of cache ``path``; a wait for another
    process holding it (a long one: a job stopped by a debugger, a hung NFS client) is said,
    not silent after a measurement's output."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say(f"piadm: waiting for another process's lock on the cache {path} (its .lock file) "
            "to keep this measurement")
        fcntl.flock(lock, fcntl.LOCK_EX)


def _update(path: Path, key: str, entry) -> None:
    if path.parent == NO_HOME:
        raise FileNotFoundError(errno.ENOENT, "no home folder is known")
    if not os.environ.get("PIADM_CACHE"):
        home = Path.home()
        if path.is_relative_to(home) and not home.is_dir():
            # a service account's HOME (/nonexistent) is not made for it, as root could
            raise FileNotFoundError(errno.ENOENT, f"the home folder {home} does not exist")
    path.parent.mkdir(parents=True, exist_ok=True)
    path = Path(os.path.realpath(path))  # a link to a shared file: that file is written
    lock = _open_lock(path.with_name(f"{path.name}.lock"))
    try:
        try:
            _wait_for(lock, path)  # released when the file closes
        except OSError:  # a file system without flock (Lustre mounted without it): unlocked,
            pass  # as before the lock, rather than lose what was measured
        held = None
        try:
            held = path.stat()
            # made read-only to keep it as it is (root could write it), or another's
            if not held.st_mode & 0o222 or not os.access(path, os.W_OK):
                raise PermissionError(errno.EACCES, f"{path} is read-only")
            entries = _load(path)
        except FileNotFoundError:
            entries = {}
        except Damaged as err:  # kept for whoever wants to see what it held
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(path, aside)
            say(f"piadm: warning: the cache {path} held no JSON object of entries ({err}): "
                f"moved to {aside.name}, and a new one begun")
            entries = {}
        entries[key] = entry

        def write(tmp: Path) -> None:
            tmp.write_text(json.dumps(entries, indent=1))
            if held is not None:  # a group's shared cache stays the group's
                os.chmod(tmp, stat.S_IMODE(held.st_mode))
                with contextlib.suppress(PermissionError):  # a group this user is not in
                    os.chown(tmp, -1, held.st_gid)

        # its own temp file per process (one name per host and process: hosts share home
        # folders), removed if the write fails (a full disk) or by a later write if killed
        replace_file(path, write)
    finally:
        os.close(lock)
