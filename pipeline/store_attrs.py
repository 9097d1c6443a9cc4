"""What a store's attributes and its ``done`` array's shape say of it, read without opening
its data: its config's batch size and members, its unit of work, its digest. The store's
contents and writes are ``pipeline.store``'s.
"""
from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import zarr

from pipeline.errors import PiadmError

MEMBER_BATCH = "piadm_member_batch"  # the attribute of the store's unit of work (``member_batch``)

# What zarr raises opening a path that holds no group (none, a plain folder, an array)
NOT_A_GROUP = (FileNotFoundError, ValueError, KeyError, zarr.errors.GroupNotFoundError)


class EditedAttribute(PiadmError):
    """A piadm store's own attribute holds what piadm never writes there (edited by hand)."""


# a piadm store's own attributes that piadm reads back: text, and its unit of work, a count
TEXT_ATTRS = ("config", "piadm_store_digest", "plan_settings", "sampler_method",
              "model_sha256", "store_sha256", "config_sha256", "plan_config_sha256",
              "model_sidecar_sha256", "model_source_sha256", "model_plugin_sha256",
              "host_noise_sha256")


def read_attrs(path: str | Path) -> dict | None:
    """The attributes of the Zarr group at ``path``, read once; None if it is not one. A
    piadm store's own attributes edited to what piadm never writes there (``edited``) read
    as not said, so that no reader fails on them; a run refuses such a store
    (``check_unedited``)."""
    attrs = _group_attributes(path)
    if attrs is None:
        try:
            attrs = dict(zarr.open_group(path, mode="r").attrs)
        except NOT_A_GROUP:
            return None
    wrong = {key for key, _ in edited(attrs)}
    return {key: value for key, value in attrs.items() if key not in wrong}


def _group_attributes(path: str | Path) -> dict | None:
    """The attributes a format 3 group at ``path`` keeps in its zarr.json, read from that
    file (tens of us; zarr's open takes about 2 ms, and a run reads them ten times and more);
    None for anything else (no such file, another format, an array, a file that does not
    parse), which zarr then opens or refuses as it does."""
    try:
        meta = json.loads(Path(path, "zarr.json").read_bytes())
    except (OSError, ValueError):
        return None
    if (not isinstance(meta, dict) or meta.get("zarr_format") != 3
            or meta.get("node_type") != "group"):
        return None
    attrs = meta.get("attributes", {})
    return dict(attrs) if isinstance(attrs, dict) else None


def edited(attrs: dict) -> list[tuple[str, object]]:
    """(name, value) of each of a piadm store's own attributes (``TEXT_ATTRS``,
    ``MEMBER_BATCH``) in ``attrs`` that holds what piadm never writes there; none for a group
    piadm did not make. A null is an older piadm's "not said"."""
    if not any(key.startswith("piadm_") for key in attrs):
        return []
    count = attrs.get(MEMBER_BATCH)
    wrong = [(key, attrs[key]) for key in TEXT_ATTRS
             if attrs.get(key) is not None and not isinstance(attrs[key], str)]
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                              or count < 1):
        wrong.append((MEMBER_BATCH, count))
    return wrong


def check_unedited(path: str | Path, replaceable: bool = True) -> None:
    """Refuse to resume or grow the piadm store at ``path`` when one of its own attributes
    was edited to what piadm never writes there (``edited``): read as not said, a digest or
    a model hash could no longer tell the store apart from another's. ``replaceable``: the
    refusal offers output.overwrite (not where the edited one is the store's own mark, its
    digest, without which piadm deletes no store)."""
    try:
        wrong = edited(dict(zarr.open_group(path, mode="r").attrs))
    except NOT_A_GROUP:
        return
    if wrong:
        key, value = wrong[0]
        raise EditedAttribute(
            f"output {path}: its attribute {key} holds {value!r}, not the "
            f"{'positive whole number' if key == MEMBER_BATCH else 'text'} piadm wrote there "
            "(edited by hand?): put back what piadm wrote, or choose another output.path"
            + (", or set output.overwrite = true to replace it" if replaceable else ""))


def folder_identity(path: str | Path) -> tuple[int, int] | None:
    """The folder at ``path`` as the file system knows it (device, inode; None: none there):
    a store replaced (``output.overwrite``) is another folder renamed into place."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


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
