"""``piadm status``: how much of an ensemble store is done, read from its ``done`` array."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import zarr

from pipeline.done_record import ARRAYS_FIX, DamagedRecord, done_members
from pipeline.errors import PiadmError, is_system_error
from pipeline.labels import label_text
from pipeline.store_attrs import NOT_A_GROUP, folder_identity
from pipeline.target import filling_jobs, replacing_jobs


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


def open_ensemble(path: str) -> zarr.Group:
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


def item_dim(group: zarr.Group) -> str:
    """The store's item dimension: its ``done`` array's other than ``member``."""
    return next(d for d in group["done"].metadata.dimension_names if d != "member")


# The units xarray writes a timedelta coordinate in, in seconds
TIMEDELTA_UNITS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


def item_labels(path: str) -> tuple[str, list[str]]:
    """The item dimension of the store at ``path`` and its labels, as status prints them."""
    group = open_ensemble(path)
    dim = item_dim(group)
    return dim, labels_of(group[dim])


def labels_of(coord) -> list[str]:
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
    return state_of(path, open_ensemble(path), done_members(path))


def state_of(path: str, group: zarr.Group, done: np.ndarray | None) -> dict:
    """``progress`` of the open store ``group`` with its (items, members) ``done`` flags; with
    ``done`` None (a damaged record, kept) the same keys with nothing counted in them."""
    if done is None:
        return {"path": str(path), "item_dim": None, "done": None, "members": None,
                "complete": False, "filling": filling_jobs(path),
                "replacing": replacing_jobs(path), "items": []}
    dim = item_dim(group)
    items = [{"label": label, "done": int(row.sum()), "members": int(row.size)}
             for label, row in zip(labels_of(group[dim]), done)]
    return {"path": str(path), "item_dim": dim, "done": int(done.sum()),
            "members": int(done.size), "complete": bool(done.all()),
            "filling": filling_jobs(path), "replacing": replacing_jobs(path), "items": items}


def report(path: str) -> tuple[str, bool]:
    """A short text of members done per item and in all; and whether every member is done."""
    state = progress(path)
    return state_text(path, state), state["complete"]


# Items (and item indices) a status text lists one by one; past it, a count and the first
# ones of those still to do (`piadm status --json` lists every item)
SHOWN = 20


def state_text(path: str, state: dict) -> str:
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
