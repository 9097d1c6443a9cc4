"""What a store's attributes and its ``done`` array's shape say of it, read without opening
its data: its config's batch size and members, its unit of work, its digest. The store's
contents and writes are ``pipeline.store``'s.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import zarr

from pipeline.errors import PiadmError

MEMBER_BATCH = "piadm_member_batch"  # the attribute of the store's unit of work (``member_batch``)

# What zarr raises opening a path that holds no group (none, a plain folder, an array)
NOT_A_GROUP = (FileNotFoundError, ValueError, KeyError, zarr.errors.GroupNotFoundError)


class EditedAttribute(PiadmError):
    """A piadm store's own attribute holds what piadm never writes there (edited by hand)."""


def read_attrs(path: str | Path) -> dict | None:
    """The attributes of the Zarr group at ``path``, read once; None if it is not one. A
    piadm store's own attributes that piadm reads (``_check_own``) are checked to hold what
    it wrote: EditedAttribute otherwise, in one line, not a traceback where one is used."""
    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except NOT_A_GROUP:
        return None
    _check_own(path, attrs)
    return attrs


def _check_own(path, attrs: dict) -> None:
    if not any(key.startswith("piadm_") for key in attrs):  # no piadm store: not its own
        return
    for key, value in attrs.items():
        if value is None:  # an older piadm recorded some unknowns as null: read as not said
            continue
        text = key in TEXT_ATTRS or key.endswith("_sha256")
        if text and not isinstance(value, str) or key == MEMBER_BATCH and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise EditedAttribute(
                f"{path}: its attribute {key} holds {value!r}, not the "
                f"{'text' if text else 'positive whole number'} piadm wrote there (edited "
                "by hand?): put back what piadm wrote, or move the store away and sample it "
                "anew")


# a piadm store's attributes of text that piadm reads back (those named *_sha256 too)
TEXT_ATTRS = ("config", "piadm_store_digest", "plan_settings", "sampler_method")


def _ensemble_count(text: str, key: str) -> int | None:
    """ensemble.``key`` in a store's ``config`` attribute (TOML); None without one."""
    try:
        value = tomllib.loads(text).get("ensemble", {}).get(key)
    except tomllib.TOMLDecodeError:
        return None
    return value if isinstance(value, int) and value >= 1 else None


def config_batch(text: str) -> int | None:
    """The ensemble.batch_size in a store's ``config`` attribute (TOML); None without one."""
    return _ensemble_count(text, "batch_size")


def config_members(text: str) -> int | None:
    """The ensemble.members in a store's ``config`` attribute (TOML); None without one."""
    return _ensemble_count(text, "members")


def member_batch(path: str | Path) -> int:
    """The store's unit of work: members a run claims, samples and writes together (whole
    chunks, so writers never share one). A store an older piadm made does not record it:
    there it is the batch size of the config it was made with."""
    group = zarr.open_group(path, mode="r")
    attrs = group.attrs
    return int(attrs.get(MEMBER_BATCH) or config_batch(str(attrs.get("config", "")))
               or group["done"].chunks[1])


def members_of(path: str | Path) -> int:
    """The members per item of the store at ``path`` (its done array's width; nothing
    decoded)."""
    return zarr.open_group(path, mode="r")["done"].shape[1]


def member_chunk_of(path: str | Path) -> int:
    """The members per chunk of the store at ``path``."""
    return zarr.open_group(path, mode="r")["done"].chunks[1]


def stored_digest(path: str | Path) -> str | None:
    """The configuration digest of the piadm store at ``path``; None if it is not one."""
    return (read_attrs(path) or {}).get("piadm_store_digest")


def stored_attribute(path: str | Path, digests: tuple[str, ...], name: str):
    """Attribute ``name`` of the piadm store at ``path`` when that store was made by a
    configuration with one of ``digests`` (a run that will resume it:
    ``identity.store_digests``); else None."""
    attrs = read_attrs(path) or {}
    return attrs.get(name) if attrs.get("piadm_store_digest") in digests else None
