"""``piadm status --verify``: whether every member a store marks done reads back, what
killed writes left behind, and (``--repair``) marking damaged members not done so that a
rerun samples them again."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import zarr

import pipeline
from pipeline.done_record import ARRAYS_FIX, read_done_record
from pipeline.errors import is_system_error
from pipeline.signals import finished_before_stopping
from pipeline.status import item_dim, labels_of, open_ensemble, state_of, state_text
from pipeline.store import PER_MEMBER, finalize
from pipeline.store_damage import damaged_arrays
from pipeline.target import check_idle, filling_jobs


def damaged(path: str) -> list[tuple[int, int, str]]:
    """(item index, member, what is wrong) of every member whose record cannot be trusted: a
    member marked done whose field or per-member values (seed, rounds, model_calls, residual)
    cannot be read (a damaged chunk), or whose field, seed, rounds or model_calls are missing
    (not finite, or a seed of 0: a chunk file deleted reads as the fill value; a residual
    history is NaN past a batch's last round by design, so it is only read), and every
    member of a chunk of the ``done`` record itself that cannot be read. piadm never marks
    such a member done, so it was damaged after writing. Reads every done member, items a
    block of 64 MiB at a time (an item larger than that, and a block that fails, a chunk of
    members at a time)."""
    group = open_ensemble(path)
    return _damaged(group, *read_done_record(group["done"]))


def _damaged(group: zarr.Group, done: np.ndarray, bad: list) -> list[tuple[int, int, str]]:
    """``damaged`` of the open store ``group``, given its record as ``read_done_record``
    reads it: the (items, members) ``done`` flags and the ``bad`` chunks' regions."""
    dims = group["done"].metadata.dimension_names
    name = next(key for key, array in group.arrays()
                if key not in PER_MEMBER and key != "residual"
                and array.metadata.dimension_names[:2] == dims)
    found = [(item, member, "its done flag is unreadable (the done array is damaged)")
             for rows, cols in bad
             for item in range(rows.start, rows.stop) for member in range(cols.start, cols.stop)]
    step = group["done"].chunks[1]
    arrays = {key: group[key] for key in (name, "seed", "rounds", "model_calls", "residual")
              if key in group}  # opened once: a lookup costs a fifth of a chunk's read
    # items read a block at a time, many chunks a call (a call a chunk: 11 to 18 s for 2048
    # batches, three times the whole read); a block that fails is read again chunk by chunk,
    # which tells the damaged chunk
    item_bytes = sum(a.dtype.itemsize * math.prod(a.shape[1:]) for a in arrays.values())
    rows = max(1, VERIFY_BLOCK_BYTES // max(1, item_bytes))
    # a block runs from an item with members done to the last such item within its reach:
    # the items around, with none done, have no chunks to read (a store of 100,000 items, 4%
    # done: 53 s of 56 went to looking for the missing chunks of whole blocks' other items)
    with_done = np.flatnonzero(done.any(1))
    k = 0
    while k < with_done.size:
        lo = int(with_done[k])
        k = int(np.searchsorted(with_done, lo + rows))
        hi = int(with_done[k - 1]) + 1
        blocks = None  # an item larger than a block: chunk by chunk, not all at once
        if item_bytes <= VERIFY_BLOCK_BYTES:
            try:
                blocks = {key: array[lo:hi] for key, array in arrays.items()}
            except Exception as err:  # a codec's error on damaged bytes
                if is_system_error(err):
                    raise
        for item in range(lo, hi):
            for start in range(0, done.shape[1], step):
                members = np.flatnonzero(done[item, start:start + step]) + start
                if not members.size:
                    continue
                read = ({key: b[item - lo, start:start + step] for key, b in blocks.items()}
                        if blocks is not None else _read_chunk(arrays, item, start, step))
                found += _damaged_members(read, name, item, start, members)
    return found


VERIFY_BLOCK_BYTES = 64 * 2**20  # what --verify reads a call


def _read_chunk(arrays: dict, item: int, start: int, step: int) -> dict:
    """One chunk of members (``start`` .. ``start + step``) of ``item`` of each of ``arrays``
    (by name): its values, or the exception reading it raised."""
    read = {}
    for key, array in arrays.items():
        try:
            read[key] = array[item, start:start + step]
        except Exception as err:  # a codec's error on damaged bytes
            if is_system_error(err):
                raise
            read[key] = err
    return read


def _damaged_members(read: dict, field: str, item: int, start: int, members) -> list:
    """``damaged``'s findings in one chunk of members from ``start`` of ``item``: the done
    ``members`` whose values in ``read`` (by name, each the chunk's values or the exception
    reading it raised; ``field`` the sampled field's) are unreadable or missing."""
    wrong = {}
    for key, block in read.items():
        if isinstance(block, Exception):
            what = f"unreadable ({type(block).__name__})"
            for m in members:
                wrong.setdefault(int(m), what if key == field else f"{key} {what}")
            continue
        flat = block.reshape(block.shape[0], -1)
        if key == "seed":  # a member's seed is hashed from its key: never the fill value 0
            missing = (flat == 0).any(1)
        elif key == "residual":  # rounds past a batch's last are NaN by design
            continue
        else:
            missing = ~np.isfinite(flat).all(1)
        for m in members:
            if missing[m - start]:
                what = ("not finite (missing or damaged data)" if key == field
                        else f"{key} missing (a damaged or deleted chunk)")
                wrong.setdefault(int(m), what)
    return [(item, m, wrong[m]) for m in sorted(wrong)]


def _broken_text(path: str, group: zarr.Group, broken: list[str], as_json: bool) -> str:
    """``verify``'s answer for a store whose arrays are damaged (``store_damage.damaged_arrays``):
    what is wrong, and that only a copy or a new store mends it."""
    if as_json:
        return json.dumps({**state_of(path, group, None), "store": path, "sound": False,
                           "repaired": False, "damaged": [], "damaged_arrays": broken},
                          indent=1)
    return "\n".join([f"{path}: the store's arrays are damaged:", *(f"  {b}" for b in broken),
                      f"--repair mends members' records only: {ARRAYS_FIX}"])


def _repair(path: str, group, flags: np.ndarray, record, found: list) -> None:
    """Mark the damaged members ``found`` not done (``flags`` too) and say so in the store's
    history; ``record``: the done array's damaged chunks, rewritten whole as not done."""
    done = zarr.open_group(path, mode="r+")["done"]
    for region in record:  # whole chunks: written without reading the damaged bytes
        done[region] = 0
    for item, member, _ in found:
        if flags[item, member]:  # a member of a sound chunk (a damaged one's are False)
            done[item, member] = 0
            flags[item, member] = False
    # in the store's history, as its writes are: the members a rerun samples again
    dim = item_dim(group)
    labels = labels_of(group[dim])
    finalize(path, f"piadm {pipeline.__version__}: status --verify --repair marked {len(found)} "
                   "damaged member(s) not done: "
                   + ", ".join(f"{dim} {labels[i]} member {m}" for i, m, _ in found[:20])
                   + (", ..." if len(found) > 20 else ""))


# zarr writes each file through NAME.<32 hex digits>.partial beside it and renames it into
# place: a write killed part way leaves it there for good
PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def leftover_writes(path: str) -> list[Path]:
    """zarr's temp files (``PARTIAL``) in the store at ``path`` while no live job fills it:
    what writes killed part way left (harmless to readers)."""
    if filling_jobs(path):  # a live job's writes in flight are no leftovers
        return []
    return sorted(p for p in Path(path).rglob("*.partial") if PARTIAL.search(p.name))


def verify(path: str, repair: bool, as_json: bool = False) -> tuple[str, bool]:
    """The text of ``status --verify``: the store's progress (``report``), whether every
    member marked done reads back (``damaged``) and the temp files killed writes left
    (``leftover_writes``; ``as_json``: one JSON object of all, each damaged member and
    whether they were marked not done); and whether the store is complete and sound. With
    ``repair`` the damaged members are marked not done (a damaged chunk of the done record
    rewritten whole, as not done), so that a rerun samples them again, and the temp files
    are removed."""
    group = open_ensemble(path)  # a store, before its files are searched (a mistyped "/" is walked)
    left = leftover_writes(path)
    if left and repair:
        check_idle(path, "removes temp files")
        for temp in left:
            temp.unlink(missing_ok=True)
    text, ok = _verify(path, group, repair, as_json)
    names = [str(temp.relative_to(path)) for temp in left]
    if as_json:
        return json.dumps({**json.loads(text), "leftover_writes": names,
                           "leftover_writes_removed": bool(left and repair)}, indent=1), ok
    if left:
        text += (f"\nremoved {len(left)} temp file(s) that writes killed part way left "
                 "(zarr's *.partial)" if repair else
                 f"\n{len(left)} temp file(s) that writes killed part way left (zarr's "
                 f"*.partial, e.g. {names[0]}): harmless to readers; --repair removes them")
    return text, ok


def _verify(path: str, group: zarr.Group, repair: bool, as_json: bool) -> tuple[str, bool]:
    """``verify`` of the open store ``group`` but for the temp files."""
    broken = damaged_arrays(path)
    if broken:  # read through the consolidated metadata, the members would pass as sound
        return _broken_text(path, group, broken, as_json), False
    flags, record = read_done_record(group["done"])
    found = _damaged(group, flags, record)
    if found and repair:
        # a live job's writes and ours would race on the done flags
        check_idle(path, "marks damaged members not done")
        with finished_before_stopping():  # a stop part way left members marked, unrecorded
            _repair(path, group, flags, record, found)
    # after the repair; where the record is damaged and kept, no count can be read
    state = state_of(path, group, flags if repair or not record else None)
    ok = state["complete"] and not found
    if as_json:
        labels = labels_of(group[item_dim(group)])
        return json.dumps({**state, "store": path,  # its key before the counts joined it
                           "sound": not found, "repaired": bool(found and repair),
                           "damaged": [{"item": item, "label": labels[item], "member": member,
                                        "problem": what}
                                       for item, member, what in found]}, indent=1), ok
    if not found:
        return f"{state_text(path, state)}\nevery member marked done reads back finite", ok
    head = (state_text(path, state) if state["members"] is not None else
            f"{path}: members done unknown: the done array cannot be read")
    if state["complete"]:  # "complete" then a list of damage read as two verdicts
        head = head.rsplit("\n", 1)[0] + "\nevery member is marked done, but some are damaged"
    marked = "" if record else " marked done"  # a damaged record's members may not have been
    lines = [head, f"{len(found)} member(s){marked} are damaged:"]
    dim = item_dim(group)
    labels = labels_of(group[dim])  # as plain status names the items
    lines += [f"  {dim} {labels[item]} (item {item}), member {member}: {what}"
              for item, member, what in found[:10]]
    if len(found) > 10:
        lines.append(f"  ... and {len(found) - 10} more")
    if not repair:
        lines.append("mark them not done with `piadm status --verify --repair STORE`, then rerun "
                     "the sample command to sample them again")
        return "\n".join(lines), False
    lines.append(f"marked {len(found)} member(s) not done: rerun the sample command to sample "
                 "them again")
    return "\n".join(lines), False
