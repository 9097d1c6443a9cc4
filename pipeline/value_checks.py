"""The checks every configuration value passes whatever its key: numbers finite, seeds
in range, texts free of what a shell would have expanded, of control characters and of
bytes that are not UTF-8, paths on a local file system and, where a command uses them, not
stepping back (``..``) out of a symbolic link; and ``check``, the one-line ``ConfigError``
that every check of ``pipeline.validation`` raises.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.settings import Config

INT64_MAX = 2**63 - 1  # the largest count numpy and dask take for the store's member axis


def _integers(value):
    """The integers in a setting's value, lists of lists included (booleans are not)."""
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _integers(v)
    elif isinstance(value, int) and not isinstance(value, bool):
        yield value


def check(ok: bool, key: str, problem: str) -> None:
    """Raise ``ConfigError("config: KEY PROBLEM")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config: {key} {problem}")


def check_values(cfg: Config) -> None:
    """Every number of every section finite (an infinite spin-up runs forever, a NaN forcing
    blows up with a misleading hint), every seed one numpy and torch both take, and every
    text written out: no "~" or "$VAR" that a shell would have expanded, no control
    character, UTF-8 text throughout; every path a file system's, not a URL."""
    for section in dataclasses.fields(cfg):
        table = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(table):
            continue
        for f in dataclasses.fields(table):
            value, key = getattr(table, f.name), f"{section.name}.{f.name}"
            numbers = value if isinstance(value, (list, tuple)) else (value,)
            check(all(math.isfinite(v) for v in numbers if isinstance(v, float)), key,
                  f"= {value!r} must be finite")
            if f.name == "seed":
                check(0 <= value <= INT64_MAX, key, f"= {value} must be in [0, {INT64_MAX}]")
            # a count past int64 is no array's size or loop's: numpy and torch overflowed
            # in C (a traceback) where a shape, a resolution or a batch size was 2**70
            check(all(abs(v) <= INT64_MAX for v in _integers(value)), key,
                  f"= {value!r} is past the largest integer piadm takes ({INT64_MAX})")
            # a path's "~": zarr expands it (to $HOME) and the rest of piadm does not, so a
            # store was drafted in $HOME and then looked for in a folder named "~"
            tilde = [v for v in numbers
                     if isinstance(v, str) and (v == "~" or v.startswith(("~/", "~\\")))]
            check(not tilde, key,
                  f"= {value!r} starts with '~', which piadm does not expand (a TOML file is "
                  "not a shell): write the path out, e.g. "
                  f"{os.path.expanduser('~')}{tilde[0][1:] if tilde else ''}")
            # "$HOME/x.zarr" made a folder named "$HOME" in the working folder
            shell = [v for v in numbers if isinstance(v, str) and re.search(r"\$[{\w]", v)]
            check(not shell, key,
                  f"= {value!r} names a variable, which piadm does not expand (a TOML file is "
                  "not a shell): write the path out"
                  + (f", e.g. {os.path.expandvars(shell[0])}" if shell and
                      os.path.expandvars(shell[0]) != shell[0] else ""))
            # a newline at a path's end made a folder whose name ends in one
            control = [v for v in numbers
                       if isinstance(v, str) and re.search(r"[\x00-\x1f\x7f]", v)]
            check(not control, key,
                  f"= {value!r} holds a control character (a new line or tab): remove it")
            # a shell's Latin-1 byte arrives as a lone surrogate, which the store's config
            # text (UTF-8) cannot hold: it failed at the config's digest, a traceback
            check(all(_utf8(v) for v in _texts(value)), key,
                  f"= {value!r} holds a byte that is not UTF-8 text (a name typed in another "
                  "encoding): write it in UTF-8")
            if f.name in PATH_FIELDS:
                _check_local(key, value)


# The fields that name files or folders (model.weights where it is a text)
PATH_FIELDS = ("path", "checkpoint", "guide", "weights", "data", "init", "extra")


def _check_local(key: str, value) -> None:
    """Refuse a path that zarr would open through fsspec ("s3://...", "simplecache::..."):
    piadm's locks, drafts and renames are a file system's, and such a path failed on a
    missing package, or made a local folder named "memory:"."""
    for text in _texts(value):
        if re.match(r"[A-Za-z][\w+.-]*://", text):
            check(False, key, f"= {value!r} is a URL: piadm works on the files of a local or "
                  "mounted file system only; give a path there")
        check("://" not in text and "::" not in text, key,
              f"= {value!r} holds '://' or '::', which zarr reads as a URL: rename the path")
        # " out/x.zarr" made a folder named " out"
        check(text == text.strip(), key, f"= {value!r} starts or ends with a space: remove it")


def check_path_links(cfg: Config, keys) -> None:
    """Refuse a path among the settings ``keys`` ("output.path", ...) that steps back (``..``)
    out of a symbolic link to a folder: xarray takes the ``..`` as written, the file system
    from the link's target, so a store was checked in one place and written in another, or
    another input read. On the node that runs the command (the files are its), not where a
    config is only read."""
    for key in keys:
        section, name = key.split(".")
        for text in _texts(getattr(getattr(cfg, section), name)):
            through = _link_then_back(text)
            check(through is None, key,
                  f"= {text!r} steps back (..) out of {through!r}, a link to another folder: "
                  "xarray takes the '..' as written and the file system from the link's "
                  "target, so the two read and write different places: write the path "
                  "without '..'")


def _link_then_back(path: str) -> str | None:
    """The link in ``path`` out of which a ``..`` leads elsewhere than as written
    (``link/..`` is the link's folder as text, the target's parent on disk)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part == ".." and i:
            walked = os.path.join(*parts[:i + 1])
            if os.path.realpath(walked) != os.path.realpath(os.path.normpath(walked)):
                links = [os.path.join(*parts[:j]) for j in range(i, 0, -1)
                         if os.path.islink(os.path.join(*parts[:j]))]
                return links[0] if links else os.path.join(*parts[:i])
    return None


def _texts(value):
    """The strings in ``value``: itself, or those in its lists and tables."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _texts(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _texts(k)
            yield from _texts(v)


def _utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogate from undecodable bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
