"""Whether a store is this configuration's, and in what batches it is filled.

A store is a configuration's when its digest is ``Config.store_digest``, or the digest an
older piadm gave the same settings: one that counted ensemble.batch_size, or one made before
keys added since, which its config lacks (read as that piadm ran without them): that store
is resumed, at any batch size, and brought up to date (``target.upgrade_identity``). A store's
unit of work is its own batch (``store_attrs.member_batch``); a run resuming it samples its
batches ensemble.batch_size members a call (``work.cut_calls``). A store of the same settings
with fewer members is the configuration's too: it is grown to ensemble.members.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib

from pipeline.config import stored_as, with_settings
from pipeline.settings import FILE_KEYS, Config
from pipeline.store import StoreExists
from pipeline.store_attrs import config_batch, config_members, read_attrs, stored_digest
from pipeline.stored import Stored, differences_of, stored_settings, untold_message
from pipeline.target import Growth, check_target, stored_config


def _legacy_batches(cfg: Config) -> tuple[int, ...]:
    """The batch sizes an older piadm's store of ``cfg`` may have counted: the one the store
    at output.path was made with, and the config's."""
    made = config_batch(stored_config(cfg.output.path))
    return tuple(dict.fromkeys(b for b in (made, cfg.ensemble.batch_size) if b is not None))


def _legacy_digests(cfg: Config) -> tuple[str, ...]:
    """An older piadm's digests of ``cfg`` (``Config.legacy_store_digest``), at the batch
    sizes its store may have counted."""
    return tuple(cfg.legacy_store_digest(b) for b in _legacy_batches(cfg))


def exact_model(cfg: Config) -> bool:
    """Whether ``cfg``'s model is an exact one (``grf``, ``gmm``), which its [model] section
    defines whole: its digest is that section's, and a key added to it changes the digest."""
    from models import exact_kind

    return exact_kind(cfg.model.kind)


def stored_of(cfg: Config) -> Stored | None:
    """The config of the store at output.path as this piadm reads it (``stored_settings``)."""
    attrs = read_attrs(cfg.output.path) or {}
    return stored_settings(str(attrs.get("config", "")), attrs)


def older_of_ours(cfg: Config, found: str | None) -> tuple[str, int] | None:
    """Where the store at output.path, whose digest ``found`` is none this piadm gives
    ``cfg``, was made from ``cfg``'s settings by an older piadm whose config lacked keys added
    since (read as it ran without them, ``stored.stored_settings``): (``found``, the members
    it was made with); else None."""
    if found is None or found in _own_digests(cfg):
        return None
    read = stored_of(cfg)
    if read is None or not read.lacked or read.untold:  # this version's keys: another's
        return None
    then = read.config
    made = then.ensemble.members
    asked = dataclasses.replace(then, ensemble=dataclasses.replace(
        then.ensemble, members=cfg.ensemble.members))
    return (found, made) if asked.store_digest == cfg.store_digest else None


def growth(cfg: Config) -> Growth | None:
    """When the store at output.path was made by a config with another ensemble.members:
    the digest ``cfg``'s settings have at that count, the count, and ``cfg``'s; else None. A
    store of ``cfg``'s settings with fewer members is grown (``target.check_target``): the
    members it holds are those of ``cfg``'s, each keyed by its index."""
    made = config_members(stored_config(cfg.output.path))
    if made is None or made == cfg.ensemble.members:
        return None
    return Growth(cfg.members_digest(made), made, cfg.ensemble.members)


def smaller_digest(cfg: Config) -> str | None:
    """``cfg``'s digest at the members of the store at output.path when it holds fewer (it
    is then ``cfg``'s, to grow); else None."""
    grown = growth(cfg)
    return grown.digest if grown is not None and grown.made < grown.asked else None


def _own_digests(cfg: Config) -> tuple[str, ...]:
    """``store_digests`` but the older store's own: what this version computes from ``cfg``."""
    smaller = smaller_digest(cfg)
    return (cfg.store_digest, *_legacy_digests(cfg), *((smaller,) if smaller else ()))


def store_digests(cfg: Config) -> tuple[str, ...]:
    """The digests under which the store at output.path is ``cfg``'s: ``store_digest`` first,
    then an older piadm's (``Config.legacy_store_digest``) at the batch sizes it may have
    counted, ``cfg``'s at the store's fewer members (``growth``), and the store's own where
    an older piadm made it from ``cfg``'s settings before keys added since
    (``older_of_ours``)."""
    own = _own_digests(cfg)
    found = stored_digest(cfg.output.path)
    older = older_of_ours(cfg, found) if found not in own else None
    return own + ((older[0],) if older else ())


def _check_older_and_smaller(cfg: Config, found: str | None) -> None:
    """Refuse to grow a store an older piadm made with fewer members: its identity must be
    brought up to date first, by a run at its own count."""
    grown = growth(cfg)
    if found is None or grown is None or grown.made >= grown.asked:
        return
    then = dataclasses.replace(cfg, ensemble=dataclasses.replace(cfg.ensemble,
                                                                 members=grown.made))
    if found in _legacy_digests(then) or older_of_ours(cfg, found):
        raise StoreExists(
            f"output {cfg.output.path} holds {grown.made} members of this configuration, "
            f"made by an older piadm: run it once with ensemble.members = {grown.made} to "
            f"bring its identity up to date, then with {grown.asked} to grow it")


def check_untold(cfg: Config, read: Stored | None) -> None:
    """Refuse, saying why, a store an older piadm made (its config ``read``,
    ``stored_of``) whose settings are ``cfg``'s as far as they can be told, but one it
    lacked (``stored.UNTOLD``) cannot be: another configuration's store is refused as such,
    naming what differs (``output.overwrite`` replaces either)."""
    if read is not None and read.untold and not differences_of(cfg, read):
        raise StoreExists(untold_message(cfg.output.path, read.untold))


def target_fate(cfg: Config, model: str | None, **kwargs) -> tuple[str, str | None]:
    """``target.check_target``'s fate of output.path, an older piadm's store of ``cfg`` being
    ``upgrade`` and one with fewer members ``grow``; with the older digest it matched (None:
    none)."""
    for last in (False, True):
        grown = growth(cfg)  # read before the digest: another job may grow it in between,
        found = stored_digest(cfg.output.path)  # which then reads as another config's
        _check_older_and_smaller(cfg, found)
        legacy = next((d for d in _legacy_digests(cfg) if d == found), None)
        # neither this version's digest of cfg nor an older one's: made before keys added since?
        strange = found is not None and found not in _own_digests(cfg)
        if strange and not cfg.output.overwrite:
            check_untold(cfg, stored_of(cfg))
        if strange and legacy is None and (older := older_of_ours(cfg, found)) is not None:
            if older[1] > cfg.ensemble.members:
                raise StoreExists(
                    f"output {cfg.output.path} holds {older[1]} members of this configuration, "
                    f"made by an older piadm, and this run asks ensemble.members = "
                    f"{cfg.ensemble.members}: run it with {older[1]} to bring its identity up "
                    f"to date, or read its first {cfg.ensemble.members} with xarray "
                    f"(ds.isel(member=slice({cfg.ensemble.members})))")
            legacy = older[0]
        if legacy is not None and legacy == found and exact_model(cfg):
            model = None  # its digest is its [model] section, which the settings compared
        try:
            return check_target(cfg.output.path, cfg.store_digest, model=model, legacy=legacy,
                                grown=grown, **kwargs), legacy
        except StoreExists:
            if last or growth(cfg) == grown:  # refused as it stands, not mid-growth
                raise


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # either missing: nothing to tell them apart by
        return False


def _same_model(cfg: Config) -> bool:
    """Whether the store at output.path records the digest of ``cfg``'s model files (their
    bytes, not their paths): the same network, wherever its files are now."""
    from pipeline.run import model_digest

    made_with = (read_attrs(cfg.output.path) or {}).get("model_sha256")
    try:
        return made_with is not None and made_with == model_digest(cfg)
    except OSError:  # a file gone or unreadable: loading the model says which
        return False


def as_stored(cfg: Config) -> Config:
    """``cfg`` with each file it names spelled as the config of the store at output.path
    spells the same file (``./x`` or ``x/`` for ``x``, a path made absolute or relative),
    and its model's files (checkpoint, guide, weights, folder), where their paths differ but
    their bytes are the store's model's (a virtual environment made anew, with the shipped
    networks in it; a checkpoint copied to another file system), as the store's in its
    identity alone (``Config.stored_as``),
    and its input selection as the store spells the same items, and output.variable unset
    where the store made without it holds a field of that name: a spelling is not a setting,
    and would otherwise make the store another configuration's. What the files hold is
    checked apart (the model digest, the input fingerprint)."""
    try:
        theirs = tomllib.loads(stored_config(cfg.output.path))
    except tomllib.TOMLDecodeError:
        return cfg
    respelled, moved = {}, {}
    for key in FILE_KEYS:
        section, name = key.split(".")
        ours, then = getattr(getattr(cfg, section), name), theirs.get(section, {}).get(name)
        if isinstance(ours, str) and isinstance(then, str) and ours and then and ours != then:
            (respelled if _same_file(ours, then) else moved)[key] = then
    named = cfg.output.variable
    if named and not theirs.get("output", {}).get("variable") and named == _store_field(cfg):
        respelled["output.variable"] = ""  # the name the store took unasked, now written out
    cfg = with_settings(cfg, respelled) if respelled else cfg
    selection = _same_selection(cfg, theirs.get("input", {}))
    cfg = with_settings(cfg, selection) if selection else cfg
    model_files = tuple((k, v) for k, v in moved.items() if k.startswith("model."))
    if model_files and _same_model(cfg):  # the store's model, found elsewhere: loaded there,
        # named as the store names it in the identity and in the config a growth records
        # (a store that other settings make another's, replaced, names them anew: run_start)
        return stored_as(cfg, model_files)
    return cfg


def _store_field(cfg: Config) -> str | None:
    """The name of the field the store at output.path holds (None where it cannot be read)."""
    from pipeline.store import field_variable, open_store

    try:
        return field_variable(open_store(cfg.output.path))
    except (OSError, ValueError, KeyError):
        return None


def _same_selection(cfg: Config, theirs: dict) -> dict:
    """input.items and input.range as the store's config ``theirs`` ([input]) spells them,
    where they name another way the same items of the same input (``"25"`` for ``"25.0"``,
    a range reaching past the last item): {} where they are spelled alike, select other items,
    or cannot be read."""
    from pipeline.errors import InputError
    from pipeline.inputs import select_items
    from pipeline.store import open_store

    i = cfg.input
    then = (tuple(map(str, theirs.get("items", ()))), tuple(map(str, theirs.get("range", ()))))
    if not i.path or (i.items, i.range) == then or any(
            theirs.get(k) != getattr(i, k) for k in ("path", "variable", "item_dim")):
        return {}
    try:
        var = open_store(i.path, consolidated=False)[i.variable]
        ours = select_items(var, i.item_dim, i.items, i.range)[i.item_dim].values
        old = select_items(var, i.item_dim, *then)[i.item_dim].values
    except (InputError, OSError, KeyError, ValueError):  # the run's own checks say what
        return {}
    if len(ours) != len(old) or not (ours == old).all():
        return {}
    return {"input.items": list(then[0]), "input.range": list(then[1])}
