"""The earlier ``piadm bench --json`` tables a bench joins (``--compare``): read, checked to
hold a bench's rows and to have been benched with the same model, sampler and members."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.samplers import REGISTRY
from pipeline.settings import Config


def revisions(cfg: Config) -> dict[str, int]:
    """The revision of each sampler the bench runs: a table of another's rows is not these."""
    return {method: REGISTRY[method].revision for method in cfg.bench.methods}


def read_tables(paths: tuple[str, ...], cfg: Config | None = None) -> list[dict]:
    """The rows of the earlier ``--json`` tables ``paths`` (``--compare``), each checked to
    hold what the plot reads and, against ``cfg``, to be benched with the same model, sampler
    and members (the plot joins them as other rank counts of one bench); a ConfigError
    naming the file otherwise (every rank reads them)."""
    return [row for path in paths for row in _table_rows(path, cfg)]


# what a --compare table must share with the bench it joins: the rest is layout or sizes
COMPARED = ("model", "sampler")
COMPARED_KEYS = ("bench.members", "bench.seeds")
# a bench runs bench.methods whatever sampler.method says, and window_split is a layout
NOT_COMPARED = ("sampler.method", "sampler.window_split")


def _differences(cfg: Config, text: str) -> list[str]:
    """The settings that decide a bench's rows in which the config TOML ``text`` (a table's
    ``config``) differs from ``cfg``, as "key: theirs -> ours"; empty where ``text`` is no
    config of this version (an older table: not checked)."""
    import tomllib

    from pipeline.config import config_from_dict

    try:
        tree = tomllib.loads(text)
        theirs = config_from_dict(tree)
    except (ValueError, TypeError, KeyError):  # ConfigError and TOMLDecodeError among them
        return []
    if not tree:  # no config recorded: its defaults would be named as the table's settings
        return []
    ignored = NOT_COMPARED + (("model.shape",) if cfg.bench.sizes else ())  # sizes decide
    keys = [f"{name}.{f.name}" for name in COMPARED
            for f in dataclasses.fields(getattr(cfg, name))
            if f"{name}.{f.name}" not in ignored] + list(COMPARED_KEYS)
    value = lambda c, key: getattr(getattr(c, key.split(".")[0]), key.split(".")[1])  # noqa: E731
    return [f"{key}: {value(theirs, key)!r} -> {value(cfg, key)!r}" for key in keys
            if value(theirs, key) != value(cfg, key)]


def _table_rows(path: str, cfg: Config | None = None) -> list[dict]:
    """One ``--compare`` table's rows, or a ConfigError saying what is wrong with the file."""
    from pipeline.bench_figures import BENCH_ROW_KEYS, one_per_point

    fix = "give JSON tables written by piadm bench --json"
    if Path(path).is_dir():
        raise ConfigError(f"--compare {path} is a directory: {fix}", collective=True)
    if not Path(path).is_file():
        raise ConfigError(f"--compare {path}: no such file; {fix}", collective=True)
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"--compare {path}: cannot read it ({err.strerror or err}): check its "
                          "permissions", collective=True) from err
    except ValueError as err:  # not UTF-8, or not JSON
        raise ConfigError(f"--compare {path} is not JSON: {fix}", collective=True) from err
    rows = doc.get("rows") if isinstance(doc, dict) else None
    problem = _rows_problem(rows, BENCH_ROW_KEYS)
    if problem:
        raise ConfigError(f"--compare {path} is not a bench table ({problem}): {fix}",
                          collective=True)
    differ = _differences(cfg, str(doc.get("config", ""))) if cfg is not None else []
    theirs = doc.get("revisions") if isinstance(doc.get("revisions"), dict) else {}
    ours = revisions(cfg) if cfg is not None else {}
    differ += [f"{m} revision {theirs[m]!r} -> {ours[m]}" for m in ours
               if m in theirs and theirs[m] != ours[m]]
    if differ:
        raise ConfigError(f"--compare {path} was benched with other settings ("
                          f"{'; '.join(differ[:4])}{'; ...' if len(differ) > 4 else ''}): "
                          "compare tables of these settings on other rank counts",
                          collective=True)
    return one_per_point(rows)


def _rows_problem(rows, keys: tuple[str, ...]) -> str | None:
    """What keeps ``rows`` from being a bench table's: a list of objects with a method name
    ``keys[0]`` and the numbers ``keys[1:]``; None when nothing does."""
    if not isinstance(rows, list):
        return 'it has no "rows" list'
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"row {i} is not an object"
        missing = [key for key in keys if key not in row]
        if missing:
            return f"row {i} has no {', '.join(missing)}"
        wrong = [key for key in keys[1:] if isinstance(row[key], bool)
                 or not isinstance(row[key], (int, float))
                 or not (math.isfinite(row[key]) and row[key] > 0)]
        if not isinstance(row[keys[0]], str) or wrong:
            return (f"row {i}'s {', '.join(wrong)} is not a number > 0" if wrong
                    else f"row {i}'s {keys[0]} is not a name")
    return None
