"""The run configuration: TOML parsed once, at the edge, into typed and validated values.

``load_config(path, overrides)`` reads a TOML file, applies ``key=value`` overrides (values
in TOML syntax; bare words are strings), rejects unknown keys and bad values with a one-line
``ConfigError`` that names the key and the fix, and returns a frozen ``Config``.
"""
from __future__ import annotations

import dataclasses
import codecs
import copy
import datetime
import hashlib
import json
import os
import re
import tomllib
import types
import typing
from pathlib import Path

from pipeline.errors import ConfigError, did_you_mean  # noqa: F401  (ConfigError: raised here)
from pipeline.settings import FILE_KEYS, SECTION_TYPES, Config, open_kind
from pipeline.validation import unquoted, validate

MODEL_KEYS = frozenset(typing.get_type_hints(SECTION_TYPES["model"]))  # piadm's own [model] keys


LABEL_KEYS = ("input.items[", "input.range[")  # labels: text, however the TOML wrote them


def _spelling(value, hint) -> str:
    """How TOML spells the value a string ``value`` was likely meant as, if so."""
    if not isinstance(value, str):
        return ""
    if hint is bool and value.lower() in ("true", "false"):
        return f": write {value.lower()} (TOML's booleans are lower case)"
    if hint is float and re.fullmatch(r"[+-]?\.\d+", value.strip()):
        number = value.strip().replace(".", "0.", 1)
        return f": write {number} (a TOML number has a digit before its point)"
    return ""


def _kind_hint(key: str, value, hint) -> str:
    """How to write ``value`` as the ``hint`` type it was likely meant as: a whole number
    without its point, a number without quotes, a text quoted."""
    spelled = _spelling(value, hint)  # TOML's own spelling first: ".001" is 0.001
    if spelled:
        return spelled
    if hint is int and isinstance(value, float) and value.is_integer():
        return f": write {int(value)} (a whole number, no point)"
    if hint in (int, float):
        return unquoted(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f": quote it (\"{value}\"; in the shell: '{key}=\"{value}\"')"
    return ""


def _elsewhere(section: str, key: str) -> str:
    """A hint naming the other section that holds ``key`` ("" when none does)."""
    homes = [name for name, cls in SECTION_TYPES.items()
             if name != section and key in typing.get_type_hints(cls)]
    return f" (did you mean {homes[0]}.{key}?)" if homes else ""


def _coerce(key: str, value, hint):
    """Check ``value`` against the annotation ``hint``; return it in the field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        for kind in kinds:
            try:
                return _coerce(key, value, kind)
            except ConfigError:
                pass
        names = " or ".join("list" if typing.get_origin(k) is tuple else k.__name__
                            for k in kinds)  # every kind it may take, not only the last one tried
        hint = next((h for h in (_kind_hint(key, value, k) for k in kinds
                                 if k in (int, float)) if h), "")
        raise ConfigError(f"config: {key} must be {names}, got {type(value).__name__} {value!r}"
                          + hint)
    if origin is tuple:
        if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 1:
            value = value.tolist()  # a numpy array from a workflow script: its list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: {key} must be a list, got {value!r}")
        inner = args[0]
        return tuple(_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be a table, got {value!r}")
        return dict(value)
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        value = value.item()  # a numpy scalar from a workflow script: its Python value
    if hint is str and isinstance(value, os.PathLike):  # a pathlib.Path from a script
        return os.fspath(value)
    if (hint is str and key.startswith(LABEL_KEYS) and not isinstance(value, bool)
            and isinstance(value, (int, float, datetime.date, datetime.time))):
        # labels written unquoted (range = [2020-01-01, 2020-01-31]): TOML's dates and
        # numbers, as the text a label is
        return value.isoformat() if hasattr(value, "isoformat") else repr(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"config: {key} = {str(value)[:20]}... is too large for a "
                              "number") from None
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(
            f"config: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}"
            + _kind_hint(key, value, hint))
    return value


def _section(name: str, table: dict):
    if not isinstance(table, dict):
        raise ConfigError(f"config: [{name}] must be a table of keys, got "
                          f"{type(table).__name__} {table!r}: in a file, a line [{name}] and "
                          f"its keys below it (e.g. steps = 200); in a dict, "
                          f"{{\"{name}\": {{\"steps\": 200}}}}")
    cls = SECTION_TYPES[name]
    hints = typing.get_type_hints(cls)
    values = {}
    if name == "model" and open_kind(table.get("kind", cls.kind)):
        extra = {k: v for k, v in table.items() if k not in hints}
        table = {k: v for k, v in table.items() if k in hints}
        given = table.get("args", {})
        twice = sorted(set(extra) & set(given)) if isinstance(given, dict) else []
        if twice:  # which of the two would the factory get?
            raise ConfigError(f"config: model.{twice[0]} is given at the top of [model] and "
                              "under [model.args]: give it once")
        if extra:
            table["args"] = {**given, **extra}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(
                f"config: unknown key {name}.{key}"
                f"{_elsewhere(name, key) or did_you_mean(key, hints)}"
                f"; valid keys: {', '.join(hints)}"
            )
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**values)


def _set(tree: dict, dotted: str, raw: str, source: str = "--set") -> None:
    """Put ``dotted=raw`` into ``tree``; ``source`` names where the item came from in an
    error (``--set`` or ``PIADM_SET:``)."""
    dotted, raw = dotted.strip(), raw.strip()  # "sampler.steps = 7" reads as sampler.steps=7
    keys = setting_keys(dotted)
    if keys is None:
        raise ConfigError(f"{source} {dotted}={raw}: the key must look like section.key, e.g. "
                          "sampler.steps (or model.args.NAME for a factory's argument)")
    place_setting(tree, keys, _value(dotted, raw, source))


def setting_keys(dotted: str) -> list[str] | None:
    """The keys of a setting's name: [section, key], or [model, args, NAME] for an argument
    of a brought network's factory; None for a name of neither form."""
    keys = [key.strip() for key in dotted.split(".")]
    factory = len(keys) == 3 and keys[:2] == ["model", "args"] and bool(keys[2])
    return keys if factory or (len(keys) == 2 and all(keys)) else None


def place_setting(tree: dict, keys: list[str], value) -> None:
    """Put ``value`` into the config ``tree`` at ``keys`` (section, key; or model, args, NAME
    for a factory's argument), where the config gives that setting."""
    factory = len(keys) == 3 and keys[:2] == ["model", "args"]
    if factory and keys[-1] in MODEL_KEYS and isinstance(tree.get("model", {}), dict):
        # a factory argument named like a piadm key (seed, std) lives in [model.args] alone
        model = tree.setdefault("model", {})
        args = model.get("args")
        model["args"] = {**(args if isinstance(args, dict) else {}), keys[-1]: value}
    elif keys[0] == "model" and keys[-1] not in MODEL_KEYS and isinstance(tree.get("model", {}),
                                                                          dict):
        _set_argument(tree.setdefault("model", {}), keys[-1], value, under_args=factory)
    else:
        tree.setdefault(keys[0], {})[keys[1]] = value


def _set_argument(model: dict, name: str, value, *, under_args: bool) -> None:
    """A factory's argument ``name`` set in ``model`` ([model]) in the form the config gives
    it, at the top of [model] or in [model.args], so that the two forms never both hold it;
    a new one in the form asked (``under_args``: model.args.NAME)."""
    args = model.get("args")
    if name in model or not (under_args or (isinstance(args, dict) and name in args)):
        model[name] = value
    else:
        model["args"] = {**(args if isinstance(args, dict) else {}), name: value}


def _value(dotted: str, raw: str, source: str):
    """The value of ``dotted=raw`` (TOML, or a bare word as a string)."""
    # said on one line: a value holding a new line (a shell's $'...') is shown escaped
    shown = raw.encode("unicode_escape").decode() if re.search(r"[\x00-\x1f\x7f]", raw) else raw
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as err:
        if raw[:1] in ("'", '"'):  # no bare word: a quoted string left open, or quoted twice
            raise ConfigError(f"{source} {dotted}={shown}: the value starts a quoted string that "
                              "is not one: close its quote (and quote it once)") from None
        if raw[:1] in ("[", "{"):
            reason = str(err).split(" (at ")[0]
            # words left once numbers (1e-3 too) and TOML's own words are taken out
            bare = re.sub(r"[-+]?(\d[\d_]*(\.\d*)?([eE][-+]?\d+)?|inf|nan|true|false)", "", raw)
            fix = ("quote its words, e.g. [\"pc-window\", \"window\"] (in the shell: '"
                   + dotted + "=[\"...\"]')" if re.search(r"[A-Za-z_]", bare)
                   else "check its brackets and commas, e.g. [16, 16]")
            raise ConfigError(f"{source} {dotted}={shown}: not a TOML list or table "
                              f"({reason}): {fix}") from None
        # a bare word: a string. " #" in it is a comment or a path's own ("run #1.zarr"): the
        # value was cut there, and a run wrote elsewhere than named
        value = raw.rstrip()
        if re.search(r"\s#", value):
            raise ConfigError(f"{source} {dotted}={shown}: an unquoted value holding ' #' (a "
                              "comment, or part of a path?): quote the value, in TOML's single "
                              f"quotes, which keep a backslash (in the shell: \"{dotted}='...'\"), "
                              "and leave any comment out") from None
        if re.search(r"[,;\s]\s*\w+\.\w+\s*=", value):
            raise ConfigError(f"{source} {dotted}={shown}: this holds another setting: separate "
                              "PIADM_SET items with ';' or new lines, and give each --set "
                              "its own") from None
    except ValueError:  # an integer of more digits than Python converts
        raise ConfigError(f"{source} {dotted}: the value {shown[:20]}... is too large") from None
    if isinstance(value, str) and re.search(r"[\x00-\x1f\x7f]", value):
        raise ConfigError(f"{source} {dotted}={shown}: the value holds a control character (a "
                          "new line or tab, or a backslash escape in a double-quoted string, "
                          "such as \\n): take it out; write paths with / or in single quotes"
                          ) from None
    return value


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):  # JSON's escapes are TOML's, control characters included
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _key(key: str) -> str:
    """``key`` as TOML writes it: bare where it may be, else quoted ("odd key")."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml(key)


def _text(cfg: Config) -> str:
    """The effective configuration as TOML (keys left at None are omitted); a module
    model's own arguments in a [model.args] table, where one named like a [model] key
    (seed, std) stays apart from it."""
    lines = []
    for name in SECTION_TYPES:
        lines.append(f"[{name}]")
        section = dataclasses.asdict(getattr(cfg, name))
        args = section.pop("args", None) if name == "model" else None
        lines.extend(f"{key} = {_toml(value)}" for key, value in section.items()
                     if value is not None)
        if args:
            lines.append("[model.args]")
            lines.extend(f"{_key(k)} = {_toml(v)}" for k, v in args.items())
    return "\n".join(lines) + "\n"


def _odd_key(tree: dict):
    """The first key of ``tree``, or of a table inside it at any depth ([model.args] and its
    values), that is not a string; None where every one is."""
    for key, value in tree.items():
        if not isinstance(key, str):
            return key
        if isinstance(value, dict) and (odd := _odd_key(value)) is not None:
            return odd
    return None


def config_from_dict(tree: dict) -> Config:
    """Validate a nested dict {section: {key: value}} into a ``Config``."""
    if (odd := _odd_key(tree)) is not None:
        raise ConfigError(f"config: the key {odd!r} ({type(odd).__name__}) is not a name: "
                          "sections and keys are strings, e.g. {\"sampler\": {\"steps\": 200}}")
    for name, table in tree.items():
        if name not in SECTION_TYPES and not isinstance(table, dict):  # `steps = 3` at the top
            owners = [s for s, cls in SECTION_TYPES.items() if name in typing.get_type_hints(cls)]
            where = ("under " + " or ".join(f"[{o}]" for o in owners) if owners
                     else "under its [section]")
            raise ConfigError(f"config: key {name!r} is outside every section: put it {where}"
                              f" (valid sections: {', '.join(SECTION_TYPES)})")
        if name not in SECTION_TYPES:
            raise ConfigError(
                f"config: unknown section [{name}]{did_you_mean(name, SECTION_TYPES)}; "
                f"valid sections: {', '.join(SECTION_TYPES)}"
            )
    cfg = Config(**{n: _section(n, tree.get(n, {})) for n in SECTION_TYPES})
    validate(cfg)
    return dataclasses.replace(cfg, text=_text(cfg))


def with_settings(cfg: Config, settings: dict) -> Config:
    """``cfg`` with ``{"section.key": value}`` replaced, validated again; the files it names
    as its store does (``stored_as``) still so named, but those ``settings`` replace."""
    kept = tuple((key, path) for key, path in cfg.stored_as if key not in settings)
    return stored_as(_replaced(cfg, settings.items()), kept)


def stored_as(cfg: Config, files: tuple[tuple[str, str], ...]) -> Config:
    """``cfg`` loading its files where it names them, but naming them as ``files`` ((key,
    path) pairs: the store's spelling of model files found elsewhere) in its identity and
    its text, the config a store records (``Config.stored_as``)."""
    if not files:  # its own spelling again, in its text too
        return dataclasses.replace(cfg, stored_as=(), text=_text(cfg)) if cfg.stored_as else cfg
    return dataclasses.replace(cfg, stored_as=files, text=_text(_replaced(cfg, files)))


def _replaced(cfg: Config, pairs) -> Config:
    """A new config of ``cfg``'s sections with each ("section.key", value) of ``pairs`` set,
    validated again (no ``stored_as``)."""
    tree = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTION_TYPES}
    for dotted, value in pairs:
        section, key = dotted.split(".")
        tree[section][key] = value
    return config_from_dict(tree)


def read_toml(path: str | Path) -> dict:
    """The nested dict of the TOML file at ``path``."""
    if not str(path).strip():  # Path("") is the working folder, "a directory"
        raise ConfigError("the config file's path is empty: give a TOML file, e.g. "
                          "jobs/configs/grf.toml")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory: a config must be a TOML file, "
                          "e.g. jobs/configs/grf.toml")
    if not path.exists():
        shipped = path.parts[:2] == ("jobs", "configs") and not Path("jobs", "configs").is_dir()
        raise ConfigError(f"config file {path} not found: pass an existing TOML file" + (
            "; jobs/configs/ comes with piadm's repository (and its source distribution), not "
            "with an installed copy: run from the repository's folder, or write a config of "
            "your own (docs/configuration.md)" if shipped else ""))
    try:  # a pipe (a shell's <(...)) reads as a file does
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror}): pass a "
                          "readable TOML file") from None
    data = raw.removeprefix(codecs.BOM_UTF8)  # some editors write one first: not TOML's
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:  # TOML is UTF-8: an editor's Latin-1 comment is not
        at = err.start + len(raw) - len(data)  # counted in the file, its mark included
        line = raw.count(b"\n", 0, at) + 1
        raise ConfigError(f"config file {path} is not UTF-8: byte {at} (line {line}) is "
                          f"0x{raw[at]:02x}: save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise ConfigError(f"config file {path} holds a number too large: {err}") from None


def load_config(source: str | Path | dict | None, overrides: typing.Sequence[str] = (),
                environment: typing.Sequence[str] = ()) -> Config:
    """Read the TOML file at ``source`` (a dict: such a file as ``read_toml`` read it
    already; None: defaults only), apply ``section.key=value`` items: ``environment``'s
    (``PIADM_SET``'s) first, then ``overrides`` (the command line's), each named by where it
    came from in an error."""
    tree = (read_toml(source) if isinstance(source, (str, Path))
            else copy.deepcopy(source or {}))  # the caller's dict is left as it was
    for source, items in (("PIADM_SET:", environment), ("--set", overrides)):
        for item in items:
            if "=" not in item:
                raise ConfigError(f"{source} {item}: use the form section.key=value")
            _set(tree, *item.split("=", 1), source=source)
    return config_from_dict(tree)


# The settings that name files a sampling run reads or writes; ``TRAINING_PATHS`` a training's
SAMPLING_PATHS = ("output.path", *FILE_KEYS)
TRAINING_PATHS = ("train.data", "train.extra", "train.checkpoint", "train.init")


def _relative_paths(cfg: Config, keys: tuple[str, ...]) -> list[str]:
    """The settings among ``keys`` that ``cfg`` gives relative to the working folder (any of
    a list's paths)."""
    out = []
    for key in keys:
        value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if any(isinstance(v, str) and v and not os.path.isabs(v)
               for v in (value if isinstance(value, tuple) else (value,))):
            out.append(key)
    return out


def check_same_config(comm, cfg: Config, who: str, mode: str = "",
                      paths: tuple[str, ...] = SAMPLING_PATHS) -> None:
    """Raise ConfigError on every rank of ``comm`` when its ranks hold different configs, or
    different ``mode`` (the command's other options, e.g. ``--dry-run``; ``who``: the command
    or function, for the message), or were started in different working folders while the
    config names relative paths among the settings ``paths`` the command reads: they would
    disagree on the store (or the data) and wait for each other forever."""
    mine = hashlib.sha256(f"{cfg.digest}\n{mode}".encode()).hexdigest()
    relative = _relative_paths(cfg, paths)
    # a folder by its name and its inode: one shared folder mounted at other paths on
    # other nodes (/gpfs/home and /home) is the same folder
    here = (os.getcwd(), os.stat(".").st_ino) if relative else ("", 0)
    theirs = comm.allgather_object((mine, here))
    odd = [rank for rank, (digest, _) in enumerate(theirs) if digest != theirs[0][0]]
    if odd:
        raise ConfigError(
            f"{who}: rank(s) {', '.join(map(str, odd))} of {comm.size} were given another "
            f"config{' or options' if mode else ''} than rank 0: every rank must have the same "
            "(an output.path or setting made from the time, the rank or the host, or a "
            "PIADM_SET or config file that differs between nodes)", collective=True)
    first = theirs[0][1]
    elsewhere = [rank for rank, (_, (name, inode)) in enumerate(theirs)
                 if name != first[0] and inode != first[1]]
    if elsewhere:
        raise ConfigError(
            f"{who}: rank(s) {', '.join(map(str, elsewhere))} of {comm.size} were started in "
            f"another working folder ({theirs[elsewhere[0]][1][0]}) than rank 0 "
            f"({first[0]}), where the config's relative paths ({', '.join(relative)}) "
            "name other files: start every rank in one folder (mpiexec -wdir, srun --chdir), "
            "or give absolute paths", collective=True)
