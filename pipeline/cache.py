"""The measurement caches beside each other in ``$PIADM_CACHE`` (default ``~/.cache/piadm``):
calibrated tolerances, planner profiles and equal-quality steps, each a JSON object keyed by
a hash of what decides the entry. Writes are atomic (temp file, then rename), so concurrent
runs never leave a half-written file, and each read-modify-write holds a lock file beside
the cache (``fcntl.flock``), so that runs writing other keys at once lose none of them; the
last writer of one key wins.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
from pathlib import Path

from pipeline.console import say
from pipeline.processes import replace_file


def cache_path(name: str) -> Path:
    """The cache file ``name`` (e.g. ``calibration.json``) under $PIADM_CACHE, else
    ~/.cache/piadm/. A "~" that the shell left (quoted) is the home folder: it made a folder
    named "~" in the working folder."""
    root = os.environ.get("PIADM_CACHE") or Path.home() / ".cache" / "piadm"
    return Path(os.path.expanduser(root)) / name


def read_cache(path: Path) -> dict:
    """The entries of the JSON cache file ``path``, {} when it is missing, unreadable or not
    a JSON object (a file another tool wrote there)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def read_entry(path: Path, key: str, valid) -> dict | None:
    """The entry ``key`` of the JSON cache file ``path`` where it is an object that ``valid``
    accepts (a function of the entry, which may raise), else None: an entry edited or
    damaged by hand is measured again, as a missing one is, rather than read into a
    traceback or a tolerance that is no number."""
    entry = read_cache(path).get(key)
    try:
        return entry if isinstance(entry, dict) and valid(entry) else None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return None


def positive(value) -> bool:
    """Whether ``value`` (read from JSON) is a finite number > 0, not a bool."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


_WARNED: set = set()  # the cache folders update_cache warned of in this process


def update_cache(path: Path, key: str, entry) -> bool:
    """Set ``key`` to ``entry`` in the JSON cache file ``path``; whether it was kept. A cache
    that cannot be written (a read-only $PIADM_CACHE, a file in its place) costs the next run
    a new measurement, not this one what it measured: a warning says so, and the run goes
    on."""
    try:
        _update(path, key, entry)
        return True
    except OSError as err:
        if path.parent in _WARNED:  # one warning a folder: a plan measures many entries
            return False
        _WARNED.add(path.parent)
        why = err.strerror or err
        say(f"piadm: warning: cannot keep this measurement in {path.parent} ({why}): the "
            "next run measures it again; set PIADM_CACHE to a folder you may write")
        return False


def _update(path: Path, key: str, entry) -> None:
    if not os.environ.get("PIADM_CACHE"):  # (Path.home() raises where no home is known)
        home = Path.home()
        if path.is_relative_to(home) and not home.is_dir():
            # a service account's HOME (/nonexistent) is not made for it, as root could
            raise FileNotFoundError(errno.ENOENT, f"the home folder {home} does not exist")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except OSError:  # a file system without flock (Lustre mounted without it): unlocked,
            pass  # as before the lock, rather than lose what was measured
        entries = read_cache(path)
        entries[key] = entry
        # its own temp file per process (one name per host and process: hosts share home
        # folders), removed if the write fails (a full disk) or by a later write if killed
        replace_file(path, lambda tmp: tmp.write_text(json.dumps(entries, indent=1)))
