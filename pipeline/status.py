"""``piadm status``: how much of an ensemble store is done, read from its ``done`` array."""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import numpy as np
import zarr

from pipeline import __version__
from pipeline.errors import PiadmError, is_system_error
from pipeline.labels import label_text
from pipeline.signals import finished_before_stopping
from pipeline.store import (ARRAYS_FIX, PER_MEMBER, DamagedRecord, done_members, finalize,
                            read_done_record)
from pipeline.store_attrs import NOT_A_GROUP, folder_identity
from pipeline.store_damage import damaged_arrays
from pipeline.target import check_idle, filling_jobs, replacing_jobs


class NotAStore(PiadmError, FileNotFoundError):
    """The path is not a piadm ensemble store."""


class StoreChanged(PiadmError):
    """The store changed under the reads: another job replaced, grew or removed it."""


@contextlib.contextmanager
def read_through(path: str):
    """Where the store at ``path`` changes while ``status`` reads it (a job that replaces it
    moves it aside and renames a new one in), say so in one line: its arrays vanished
    mid-read were a traceback, and an exit of 1, which a polling script takes for
    "incomplete". An array missing from a store that did not change is damage, said as
    such."""
    before = folder_identity(path)
    try:
        yield
    except NotAStore:
        raise
    except (KeyError, FileNotFoundError) as err:
        what = f"{type(err).__name__}: {err}"
        if folder_identity(path) != before or replacing_jobs(path):
            raise StoreChanged(f"{path} changed while it was read (a job replacing or removing "
                               "it): run piadm status again once that job is done "
                               f"({what})") from err
        raise StoreChanged(f"{path}: part of the store cannot be found ({what}): it is damaged, "
                           "or a job changed it as it was read; piadm status --verify says "
                           "which") from err


def _open(path: str) -> zarr.Group:
    """The piadm ensemble store at ``path``, opened to read; NotAStore where it is none."""
    if not str(path).strip():  # Path("") is the working folder
        raise NotAStore("the store's path is empty: pass the output.path of a run")
    if not Path(path).exists():
        raise NotAStore(f"{path} does not exist: pass the output.path of a run (a run that has "
                        "not started has no store yet)")
    group = None
    with contextlib.suppress(*NOT_A_GROUP):
        # the arrays as they are, not the consolidated metadata: a growth killed part way
        # has resized them, and --verify said "24/24, complete" where status said 24/32
        group = zarr.open_group(path, mode="r", use_consolidated=False)
    if group is None or "piadm_store_digest" not in group.attrs:
        raise NotAStore(f"{path} is not a piadm ensemble store: pass the output.path of a run")
    return group


def _item_dim(group: zarr.Group) -> str:
    """The store's item dimension: its ``done`` array's other than ``member``."""
    return next(d for d in group["done"].metadata.dimension_names if d != "member")


# The units xarray writes a timedelta coordinate in, in seconds
TIMEDELTA_UNITS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


def item_labels(path: str) -> tuple[str, list[str]]:
    """The item dimension of the store at ``path`` and its labels, as status prints them."""
    group = _open(path)
    dim = _item_dim(group)
    return dim, _labels(group[dim])


def _labels(coord) -> list[str]:
    """The item labels as a person writes them: dates stored as CF numbers ("days since
    2020-01-01", on their calendar) decoded with cftime, which reads them without xarray, and
    lead times (a count of hours, say, of a timedelta coordinate) as "0 days 06:00:00", as
    the rest of piadm writes them."""
    try:
        values = coord[:]
    except Exception as err:  # a codec's error on damaged bytes: status exited 1, "rerun"
        if is_system_error(err):
            raise
        where = str(coord.store_path.store.root) if hasattr(coord.store_path.store, "root") \
            else "the store"
        raise DamagedRecord(f"store {where}: its {coord.basename} coordinate cannot be read "
                            f"({type(err).__name__}): the store is damaged; {ARRAYS_FIX}") from None
    units, calendar = coord.attrs.get("units", ""), coord.attrs.get("calendar", "standard")
    if not isinstance(units, str) or values.dtype.kind not in "iuf":
        return [str(v) for v in values]
    if " since " in units:
        try:
            import cftime

            dates = cftime.num2date(values, units, calendar, only_use_cftime_datetimes=True)
            return [label_text(d) for d in np.atleast_1d(dates)]
        except Exception:  # no cftime, or units or values it cannot read: the numbers, then
            pass
    if units in TIMEDELTA_UNITS and str(coord.attrs.get("dtype", "")).startswith("timedelta"):
        return [_lead_text(float(v) * TIMEDELTA_UNITS[units]) for v in values]
    return [label_text(v) for v in values]


def _lead_text(seconds: float) -> str:
    """A lead time of ``seconds`` as pandas writes a Timedelta ("1 days 06:00:00")."""
    days, rest = divmod(int(round(seconds)), 86400)
    return f"{days} days {rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def progress(path: str) -> dict:
    """``{"path", "item_dim", "done", "members", "complete", "filling", "items": [{"label",
    "done", "members"}]}`` of the store at ``path``: members done per item and in all, and
    the live jobs filling it."""
    return _progress(path, _open(path), done_members(path))


def _progress(path: str, group: zarr.Group, done: np.ndarray | None) -> dict:
    """``progress`` of the open store ``group`` with its (items, members) ``done`` flags; with
    ``done`` None (a damaged record, kept) the same keys with nothing counted in them."""
    if done is None:
        return {"path": str(path), "item_dim": None, "done": None, "members": None,
                "complete": False, "filling": filling_jobs(path),
                "replacing": replacing_jobs(path), "items": []}
    dim = _item_dim(group)
    items = [{"label": label, "done": int(row.sum()), "members": int(row.size)}
             for label, row in zip(_labels(group[dim]), done)]
    return {"path": str(path), "item_dim": dim, "done": int(done.sum()),
            "members": int(done.size), "complete": bool(done.all()),
            "filling": filling_jobs(path), "replacing": replacing_jobs(path), "items": items}


def report(path: str) -> tuple[str, bool]:
    """A short text of members done per item and in all; and whether every member is done."""
    state = progress(path)
    return _text(path, state), state["complete"]


# Items (and item indices) a status text lists one by one; past it, a count and the first
# ones of those still to do (`piadm status --json` lists every item)
SHOWN = 20


def _text(path: str, state: dict) -> str:
    lines = [f"{path}: {state['done']}/{state['members']} members done"]
    items = [dict(item, index=n) for n, item in enumerate(state["items"])]
    dim = state["item_dim"]
    if 1 < len(items) <= SHOWN:
        lines += [_run_line(dim, run) for run in _alike(items)]
    elif len(items) > SHOWN:  # a store of thousands of dates: not a line each
        partial = _alike([i for i in items if i["done"] < i["members"]])
        shown = ("" if not partial else "; not yet:" if len(partial) <= SHOWN
                 else f"; not yet (the first {SHOWN} runs of items):")
        complete = sum(i["done"] >= i["members"] for i in items)
        lines.append(f"  {complete} of {len(items)} items complete{shown}")
        lines += [_run_line(dim, run) for run in partial[:SHOWN]]
        if len(partial) > SHOWN:
            lines.append(f"  ... and {len(partial) - SHOWN} runs more (piadm status --json "
                         "lists every item)")
    lines.append("complete" if state["complete"] else "incomplete: " + _to_finish(state))
    return "\n".join(lines)


def _alike(items: list[dict]) -> list[list[dict]]:
    """``items`` cut into runs of three or more neighbours (consecutive indices) with the same
    members done of as many, the rest one by one: a line for each run, not for each of 20
    items alike (two alike take two lines, no longer than one of a run)."""
    runs: list[list[dict]] = []
    for item in items:
        last = runs[-1][-1] if runs else None
        if (last is not None and item["index"] == last["index"] + 1
                and (item["done"], item["members"]) == (last["done"], last["members"])):
            runs[-1].append(item)
        else:
            runs.append([item])
    return [part for run in runs for part in ([run] if len(run) > 2 else [[i] for i in run])]


def _run_line(dim: str, run: list[dict]) -> str:
    """``  time 5.9: 0/8`` for one item; ``  time 5.9 .. 7.8 (20 items): 0/8 each`` for a run."""
    first, last = run[0], run[-1]
    if len(run) == 1:
        return f"  {dim} {first['label']}: {first['done']}/{first['members']}"
    return (f"  {dim} {first['label']} .. {last['label']} ({len(run)} items): "
            f"{first['done']}/{first['members']} each")


def _indices(left: list[int]) -> str:
    """Item indices as a list to paste into parallel.items, or past ``SHOWN`` their count and
    at most ``SHOWN`` runs of consecutive ones (e.g. "558 items: 2, 5-7, 1442-1999"), to
    read (``piadm status --json`` gives every item)."""
    if len(left) <= SHOWN:
        return str(left)
    runs, first = [], left[0]
    for prev, now in zip(left, [*left[1:], None]):
        if now != prev + 1:
            runs.append(str(first) if first == prev else f"{first}-{prev}")
            first = now
    more = (f", ... ({len(runs) - SHOWN} runs more: piadm status --json lists every item)"
            if len(runs) > SHOWN else "")
    return f"{len(left)} items: {', '.join(runs[:SHOWN])}{more}"


def _to_finish(state: dict) -> str:
    """How to finish the store: wait for the live jobs filling it; otherwise rerun, and as a
    job of parallel.items fills only its items, where some items are complete, name the
    indices still to do."""
    items = state["items"]
    left = [n for n, item in enumerate(items) if item["done"] < item["members"]]
    if state["filling"]:
        # a job of parallel.items fills only its own: which those are, its heartbeat keeps
        # not, so the items left are named for the user who split them so
        some = (f"; if they fill only some items (parallel.items), the rest need a job of "
                f"their own (items not yet complete, those the live jobs fill among them: "
                f"{_indices(left)})" if len(items) > 1 and left else "")
        return (f"being filled by live job(s) {', '.join(state['filling'])}: wait for them "
                f"(a rerun now would only share their batches){some}")
    if state.get("replacing"):  # its start-up: no member written, no batch claimed yet
        return (f"being replaced or grown by live job(s) {', '.join(state['replacing'])}: wait "
                "for them")
    if len(left) == len(items):
        return "rerun the same config to finish"
    return (f"rerun the same config to finish (items still to do: {_indices(left)}; a job with "
            "parallel.items fills only its own)")


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
    group = _open(path)
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
    for lo in range(0, done.shape[0], rows):
        hi = min(lo + rows, done.shape[0])
        if not done[lo:hi].any():
            continue
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
        return json.dumps({**_progress(path, group, None), "store": path, "sound": False,
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
    dim = _item_dim(group)
    labels = _labels(group[dim])
    finalize(path, f"piadm {__version__}: status --verify --repair marked {len(found)} "
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
    group = _open(path)  # a store, before its files are searched (a mistyped "/" is walked)
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
    # after the repair; where the record is damaged and kept, no count can be read
    state = _progress(path, group, flags if repair or not record else None)
    ok = state["complete"] and not found
    if as_json:
        labels = _labels(group[_item_dim(group)])
        return json.dumps({**state, "store": path,  # its key before the counts joined it
                           "sound": not found, "repaired": bool(found and repair),
                           "damaged": [{"item": item, "label": labels[item], "member": member,
                                        "problem": what}
                                       for item, member, what in found]}, indent=1), ok
    if not found:
        return f"{_text(path, state)}\nevery member marked done reads back finite", ok
    head = (_text(path, state) if state["members"] is not None else
            f"{path}: members done unknown: the done array cannot be read")
    if state["complete"]:  # "complete" then a list of damage read as two verdicts
        head = head.rsplit("\n", 1)[0] + "\nevery member is marked done, but some are damaged"
    marked = "" if record else " marked done"  # a damaged record's members may not have been
    lines = [head, f"{len(found)} member(s){marked} are damaged:"]
    dim = _item_dim(group)
    labels = _labels(group[dim])  # as plain status names the items
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
