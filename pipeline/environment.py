"""``PIADM_SET``: ``--set`` overrides held in the environment, for a whole batch script or
session (``section.key=value`` items separated by ``;`` or new lines)."""
from __future__ import annotations

import os
import re
from collections.abc import Sequence

from pipeline.config import ConfigError


def split_items(text: str) -> list[str]:
    """``text`` cut at each new line, and at each ``;`` outside a quoted value, so that a value
    such as ``"runs;1.zarr"`` stays whole; a line starting with ``#`` is a comment. A quote opens a value only where a value starts
    (after ``=``, ``[``, ``,``, ``{`` or a space), so an apostrophe inside a path is text."""
    items = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):  # a comment line, as in a config file
            continue
        start, quote, escaped = 0, "", False
        for i, char in enumerate(line):
            if quote:  # in a basic string a backslash escapes the next character, itself too
                if escaped:
                    escaped = False
                elif quote == '"' and char == "\\":
                    escaped = True
                elif char == quote:
                    quote = ""
            elif char in "'\"" and (i == 0 or line[i - 1] in "=[,{ \t"):
                quote = char
            elif char == ";":
                items.append(line[start:i])
                start = i + 1
        if quote:
            raise ConfigError(f"PIADM_SET: the quote in {line[start:].strip()!r} is never "
                              "closed: close it (items are separated by ';' or new lines)")
        items.append(line[start:])
    return items


def _environment_items() -> list[str]:
    """The non-empty items of ``PIADM_SET``, stripped."""
    return [item.strip() for item in split_items(os.environ.get("PIADM_SET", ""))
            if item.strip()]


def environment_settings() -> list[str]:
    """``PIADM_SET``'s items, each as ``--set`` takes it; raises ConfigError for an item that
    is not ``section.key=value``."""
    items = _environment_items()
    for item in items:
        if "=" not in item:
            raise ConfigError(f"PIADM_SET: {item!r} is not section.key=value (separate the "
                              "items with ';' or new lines)")
    return items


def _key(item: str) -> str:
    """The ``section.key`` of a ``section.key=value`` item, spaced as ``--set`` reads it."""
    return ".".join(part.strip() for part in item.split("=")[0].split("."))


def from_environment(text: str, command_line: Sequence[str] = ()) -> str:
    """`` (from PIADM_SET: item)`` for each PIADM_SET item whose key ``text`` names and whose
    value the run took, not a later item's or a ``--set`` of ``command_line``'s: a setting
    exported long ago is easy to forget, and one the command line overrode is not to blame."""
    try:
        items = _environment_items()
    except ConfigError:
        return ""
    overridden = {_key(item) for item in command_line if "=" in item}
    taken = {_key(item): item for item in items if "=" in item}  # the last item of a key wins
    # named by its key, or by its section where that section is unknown
    named = [item for key, item in taken.items() if key not in overridden
             and (re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", text)
                  or f"unknown section [{key.split('.')[0]}]" in text)]
    return "".join(f" (from PIADM_SET: {item})" for item in named)
