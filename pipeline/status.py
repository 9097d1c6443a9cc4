"""``piadm status``: how much of an ensemble store is done, read from its ``done`` array."""
from __future__ import annotations

from pathlib import Path

import zarr

from pipeline.store import done_members, stored_digest


class NotAStore(FileNotFoundError):
    """The path is not a piadm ensemble store."""


def progress(path: str) -> dict:
    """``{"path", "item_dim", "done", "members", "complete", "items": [{"label", "done",
    "members"}]}`` of the store at ``path``: members done per item and in all."""
    if not Path(path).exists():
        raise NotAStore(f"{path} does not exist: pass the output.path of a run (a run that has "
                        "not started has no store yet)")
    if stored_digest(path) is None:
        raise NotAStore(f"{path} is not a piadm ensemble store: pass the output.path of a run")
    group = zarr.open_group(path, mode="r")
    done = done_members(path)
    dim = next(d for d in group["done"].metadata.dimension_names if d != "member")
    items = [{"label": str(label), "done": int(row.sum()), "members": int(row.size)}
             for label, row in zip(group[dim][:], done)]
    return {"path": str(path), "item_dim": dim, "done": int(done.sum()),
            "members": int(done.size), "complete": bool(done.all()), "items": items}


def report(path: str) -> tuple[str, bool]:
    """A short text of members done per item and in all; and whether every member is done."""
    state = progress(path)
    lines = [f"{path}: {state['done']}/{state['members']} members done"]
    if len(state["items"]) > 1:
        lines += [f"  {state['item_dim']} {i['label']}: {i['done']}/{i['members']}"
                  for i in state["items"]]
    lines.append("complete" if state["complete"] else "incomplete: " + _to_finish(state["items"]))
    return "\n".join(lines), state["complete"]


def _to_finish(items: list[dict]) -> str:
    """How to finish the store: a job of parallel.items fills only its items, so where some
    items are complete, name the indices still to do."""
    left = [n for n, item in enumerate(items) if item["done"] < item["members"]]
    if len(left) == len(items):
        return "rerun the same config to finish"
    return (f"rerun the same config to finish (items still to do: {left}; a job with "
            "parallel.items fills only its own)")
