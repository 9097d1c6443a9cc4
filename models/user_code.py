"""The user's own code behind ``model.target``: importing the factory it names (anew where
its file changed since, so that the code run is the file a store records), and telling, in
one line, where an error in that code was raised.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import sys
import sysconfig
import traceback
from pathlib import Path

from models.digest import files_digest
from pipeline.errors import ConfigError, did_you_mean


def import_target(target: str, key: str = "model.target"):
    """The object ``package.module:name`` names; a one-line ConfigError when it cannot. A
    module whose code may not be its file's (``_stale``) is imported anew, with the module
    defining the object first and then the one that re-exports it, so that the code run is
    the file a store records."""
    module, _, name = target.partition(":")
    if "/" in module or module.endswith(".py"):  # a file's path, which Python cannot import
        stem = module.rsplit("/", 1)[-1].removesuffix(".py")
        folder = module.rsplit("/", 1)[0] if "/" in module else "."
        raise ConfigError(f"config: {key} = {target!r} names a file; it takes a module's name "
                          f"and a factory in it, e.g. {stem}:{name or 'make'}, with the module's "
                          f"folder ({folder}) on PYTHONPATH (export PYTHONPATH={folder})")
    try:
        loaded = set(sys.modules)  # what this process had imported before this call
        mod = importlib.import_module(module)
        obj = _attribute(mod, target, name, key)
        defining = inspect.getmodule(inspect.unwrap(obj))
        mods = [m for m in dict.fromkeys((defining, mod)) if m is not None]
        if any([_stale(m, m.__name__ in loaded) for m in mods]):  # every one recorded
            for m in mods:
                _reload(m)
            obj = _attribute(mod, target, name, key)
    except ConfigError:
        raise
    except Exception as err:  # not found, or the module itself failing on import
        missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
        if missing and (module == missing or module.startswith(f"{missing}.")):
            fix = "install it, or put its folder on PYTHONPATH"
        elif missing:  # found, but a module it imports is not
            fix = f"it imports {missing!r}, which is not installed: install that"
        else:  # found, and failing as it runs: the user's code, not the path
            fix = "fix the module (or what it imports) so that it imports"
        raise ConfigError(f"config: {key} = {target!r}: cannot import {module!r} "
                          f"({one_line(err)}): "
                          f"{fix}") from None
    if not callable(obj):
        raise ConfigError(f"config: {key} = {target!r} is not callable: name a function or "
                          "class that returns a torch.nn.Module")
    return obj


def _attribute(mod, target: str, name: str, key: str):
    """The object ``name`` (dotted) of module ``mod``; a ConfigError naming it where it lacks
    one."""
    obj = mod
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"config: {key} = {target!r}: {mod.__name__!r} has no {name!r}"
                              f"{did_you_mean(part, dir(obj))}")
        obj = getattr(obj, part)
    return obj


# The digest of each module file import_target took a target from, as it was then: Python
# keeps a module once imported, so a file edited afterwards (between two api.sample calls in
# a notebook) would run its old code while the store records the new file's hash
_IMPORTED: dict[str, str] = {}


def _source(mod) -> str | None:
    """The file ``mod`` was imported from, where it may be imported anew: none for a script's
    own ``__main__`` or a module without a file."""
    path = getattr(mod, "__file__", None)
    if mod.__name__ == "__main__" or not path or not Path(path).is_file():
        return None
    return path


def _stale(mod, loaded_before: bool) -> bool:
    """Whether ``mod``'s code may not be its file's: the file changed since import_target last
    saw it, or, first seen, the module was imported before (a notebook's own ``import``, the
    file edited since, perhaps) from a file of one's own rather than an installed package."""
    path = _source(mod)
    if path is None:
        return False
    now, seen = files_digest([path]), _IMPORTED.get(mod.__name__)
    _IMPORTED[mod.__name__] = now
    if seen is None:
        return loaded_before and not _installed(path)
    return seen != now


def _installed(path: str) -> bool:
    """Whether the file at ``path`` is Python's own library or an installed package's (any
    environment's site-packages), not a file of the user's."""
    paths = sysconfig.get_paths()
    stdlib = tuple(f"{Path(d).resolve()}/" for d in {paths["stdlib"], paths["platstdlib"]})
    return bool({"site-packages", "dist-packages"} & set(Path(path).parts)) or str(
        Path(path).resolve()).startswith(stdlib)


def _reload(mod) -> None:
    """Import ``mod`` anew from its file (where it has one)."""
    path = _source(mod)
    if path is None:
        return
    # its bytecode cache is keyed by the file's mtime in seconds and its size, which an edit
    # within the second that keeps the size (0.1 to 5.0) leaves the same
    with contextlib.suppress(OSError, TypeError):
        Path(mod.__cached__).unlink()
    importlib.reload(mod)
    _IMPORTED[mod.__name__] = files_digest([path])


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name where it has none), at most 160
    characters."""
    return ((str(err).strip().splitlines() or [type(err).__name__])[0])[:160]


def raised_at(err: BaseException) -> str:
    """Where in the user's own code ``err`` was raised, as ", at FILE:LINE in NAME": the
    deepest frame of its traceback outside piadm, Python's library and installed packages
    (torch's layers among them), so that a bug in a network's forward names its line (this
    error is told in one line, without the traceback); "" where no frame is the user's."""
    here = Path(__file__).resolve().parent  # piadm's own, installed editable or not
    own = tuple(f"{d}/" for d in (here, here.parent / "pipeline"))
    found = ""
    for frame, line in traceback.walk_tb(err.__traceback__):
        name = frame.f_code.co_filename
        if not (name.startswith("<") or str(Path(name).resolve()).startswith(own)
                or _installed(name)):
            found = f", at {name}:{line} in {frame.f_code.co_name}"
    return found


def one_line(err: BaseException, where: str | None = None) -> str:
    """``err`` in the words of a one-line error, "Type: first line, at FILE:LINE in NAME"
    (``where``, where the caller has found it already, else ``raised_at(err)``)."""
    where = raised_at(err) if where is None else where
    return f"{type(err).__name__}: {first_line(err)}{where}"


def details(err: BaseException, limit: int = 300) -> str:
    """The first lines of ``err`` on one line, without terminal colours: load_state_dict puts
    the key or size that does not fit on its second line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return re.sub(r"\x1b\[[0-9;]*m", "", " ".join(lines[:2]) or type(err).__name__)[:limit]
