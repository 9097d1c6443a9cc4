"""What a store's arrays show of damage as they are on disk: metadata (a zarr.json) lost or
unreadable, an array every store holds missing, and coordinates that read as a deleted
chunk's fill values. ``piadm status --verify`` and a run about to resume a store ask here;
the ``done`` record's own damage is read with it (``done_record.read_done_record``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import is_system_error
from pipeline.store import PER_MEMBER
from pipeline.store_attrs import config_members


def damaged_arrays(path: str | Path) -> list[str]:
    """What is wrong with the arrays of the store at ``path`` as they are on disk, one text
    each (empty for a sound store): an array whose metadata (its zarr.json) does not read,
    and a missing one among those every store holds (``PER_MEMBER``, one sampled field) and
    those its consolidated metadata lists. Readers trust the consolidated metadata, so an
    array lost on disk still reads until a run consolidates the store again: it must be
    found before then."""
    try:
        listed = zarr.open_group(path, mode="r").metadata.consolidated_metadata
    except Exception:  # the group's own zarr.json: status and sample read it first
        listed = None
    listed = {} if listed is None else {
        name: getattr(meta, "dimension_names", None) for name, meta in listed.metadata.items()}
    found, wrong = {}, []
    # a hidden folder (an editor's, a notebook's) is nobody's array; a folder without
    # metadata is an array that lost it where piadm's arrays are named so, or chunks are in it
    for child in sorted(p for p in Path(path).iterdir()
                        if p.is_dir() and not p.name.startswith(".")):
        meta = child / "zarr.json"
        if not meta.exists():
            if child.name in PER_MEMBER or child.name in listed or (child / "c").is_dir():
                wrong.append(f"{child.name}: its metadata (zarr.json) is missing")
            continue
        try:
            if json.loads(meta.read_text()).get("node_type") == "group":
                continue  # a group a user added beside the arrays: not piadm's to judge
            found[child.name] = zarr.open_array(child, mode="r").metadata.dimension_names
        except Exception as err:  # zarr's errors for unreadable metadata are many
            wrong.append(f"{child.name}: its metadata (zarr.json) cannot be read "
                         f"({type(err).__name__})")
    told = {text.split(":")[0] for text in wrong}
    wrong += [f"{name}: missing"
              for name in sorted((set(PER_MEMBER) | set(listed)) - set(found) - told)]
    if not _fields(found) and not _fields(listed):  # nothing names it: said as it is
        wrong.append("the sampled field: no array of it is left")
    return wrong + _damaged_coordinates(path, found)


def _damaged_coordinates(path: str | Path, arrays: dict) -> list[str]:
    """What is wrong with the coordinates among ``arrays`` {name: dimension names} (those
    named as their one dimension) as they read: values that do not decode, a member or sweep
    axis not counted from 0 or 1, labels that repeat or are NaN. A chunk file deleted reads
    as the fill value: every item at one date, a y axis of NaN, members all 0."""
    wrong = []
    for name, dims in arrays.items():
        if tuple(dims or ()) != (name,):
            continue
        try:
            values = zarr.open_array(Path(path) / name, mode="r")[:]
        except Exception as err:  # a codec's error on damaged bytes
            if is_system_error(err):
                raise
            wrong.append(f"{name}: its values cannot be read ({type(err).__name__})")
            continue
        first = {"member": 0, "sweep": 1}.get(name)
        if name == "member":  # a growth cut short left new labels unwritten: the next run's
            values = values[:_recorded_members(path, values.size)]  # fit_members writes them
        if first is not None and not np.array_equal(values, np.arange(values.size) + first):
            wrong.append(f"{name}: its labels are not {first} .. {first + values.size - 1} (a "
                         "chunk deleted reads as the fill value)")
        elif values.dtype.kind in "fc" and not np.isfinite(values).all():
            wrong.append(f"{name}: it holds NaN labels (a chunk deleted reads as them)")
        elif first is None and np.unique(values).size < values.size:
            wrong.append(f"{name}: its labels repeat (a chunk deleted reads as the fill value)")
    return wrong


def _recorded_members(path: str | Path, most: int) -> int:
    """The members per item the store's recorded config holds (at most ``most``): its
    ``member`` labels past them may be a growth's, cut short before it wrote them."""
    try:
        made = config_members(str(zarr.open_group(path, mode="r").attrs.get("config", "")))
    except Exception:  # a group that does not open: every label is judged
        return most
    return most if made is None else min(made, most)  # no config: every label is judged


def _fields(arrays: dict) -> list[str]:
    """The sampled fields among ``arrays`` {name: dimension names}: (item, member, ...)."""
    return [name for name, dims in arrays.items() if name not in PER_MEMBER
            and name != "residual" and tuple(dims or ())[1:2] == ("member",)]
