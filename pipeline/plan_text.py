"""A plan as text: the ranked table of layouts ``piadm plan`` prints, and the line that says
what was chosen and why."""
from __future__ import annotations

from pipeline.plan import Layout, Plan
from pipeline.samplers.options import REPLICABLE


def table(plan: Plan, rows: int) -> str:
    """The ranked plan as text: the fastest ``rows`` and the best sequential layout (with each
    layout's steps when they differ, at equal quality)."""
    seq = plan.sequential
    steps = any(p.profile.steps for p in plan.ranked)
    head = (f"{'#':>3} {'method':<15} {'param':>5} {'groups':>6} {'slices':>6} {'split':>5} "
            f"{'batch':>5} "
            + (f"{'steps':>5} " if steps else "")
            + f"{'rounds':>6} {'calls':>7} {'round_ms':>9} {'predicted_s':>11} {'vs_seq':>6}")
    lines = [head]
    shown = plan.ranked[:rows] + ([] if seq in plan.ranked[:rows] else [seq])
    for p in shown:
        lay = p.layout
        place = plan.ranked.index(p) + 1 if p in plan.ranked else "-"  # not a candidate
        lines.append(f"{place:>3} {lay.method:<15} {lay.param or '-':>5} "
                     f"{lay.groups:>6} {lay.time_slices:>6} {_split(lay):>5} {lay.batch:>5} "
                     + (f"{p.profile.steps:>5} " if steps else "")
                     + f"{p.rounds:>6} {p.profile.calls:>7.0f} {1e3 * p.round_s:>9.2f} "
                     f"{p.seconds:>11.3f} {seq.seconds / p.seconds:>5.2f}x")
    return "\n".join(lines)


def _split(lay: Layout) -> str:
    """The table's word for how a layout's time slices share a window."""
    if lay.time_slices == 1 or lay.method not in REPLICABLE:
        return "-"
    return "repl" if lay.replicated else "slots"


def counted(n: int, what: str) -> str:
    """``n`` ``what``s: "1 group", "2 groups"."""
    return f"{n} {what}{'s' if n != 1 else ''}"


def describe(plan: Plan) -> str:
    """One line: what was chosen and why."""
    b = plan.best
    return (f"plan: {b.layout.method} on {counted(b.layout.groups, 'group')} x "
            f"{counted(b.layout.time_slices, 'time slice')}"
            f"{', each with the whole window' if b.layout.replicated else ''}, "
            f"{b.layout.batch} members a batch: predicted {b.seconds:.2f} s, "
            f"{plan.sequential.seconds / b.seconds:.2f}x the best sequential layout")
