"""PNG figures of a benchmark: rounds and wall time against the field's dimension and the
ranks (``piadm bench --png``), and the error against steps at equal quality (``--quality``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.figures import canvas, save


def _timed(ax, x, rows: list[dict], **style) -> None:
    """Wall time per row: the min of the repeats, with a bar up to their median, so that one
    slow repeat under load does not read as a result."""
    low = np.array([r["wall_s"] for r in rows])
    med = np.array([r.get("wall_med_s", r["wall_s"]) for r in rows])
    ax.errorbar(x, low, yerr=[np.zeros_like(low), np.maximum(med - low, 0)], fmt="o-",
                capsize=3, **style)


def _log_limits(ax, x, rows: list[dict]) -> None:
    """Log axes around all of x and the rows' wall times with a margin: one point (a bench
    of one size) would leave matplotlib a range of zero width and an empty panel."""
    y = [v for r in rows for v in (r["wall_s"], r.get("wall_med_s", r["wall_s"]))]
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ax.set_xlim(x.min() / 1.5, x.max() * 1.5)
    ax.set_ylim(y.min() / 1.5, y.max() * 1.5)


# What bench_figure reads of every row: the method's name, then numbers (and wall_med_s and
# repeats where a row has them).
BENCH_ROW_KEYS = ("method", "ranks", "d", "rounds", "wall_s")


def one_per_point(rows: list[dict]) -> list[dict]:
    """One table's rows, one per (method, ranks, d): a seed sweep's worst row, else the last
    given; a line through every seed's zig-zagged."""
    kept = {}
    for row in rows:
        key = (row["method"], row["ranks"], row["d"])
        if kept.get(key, {}).get("seed") != "worst":
            kept[key] = row
    return list(kept.values())


def bench_figure(rows: list[dict], path: Path) -> Path:
    """Rounds and wall time against the field dimension d per method (at the largest rank
    count), and wall time against ranks per method at the d measured on the most rank counts
    (the largest such), when one has several."""
    plt = canvas()
    # tables each of one row a point (one_per_point), the later one's where they meet
    rows = list({(r["method"], r["ranks"], r["d"]): r for r in rows}.values())
    methods = sorted({r["method"] for r in rows})
    counts = sorted({r["ranks"] for r in rows})
    # the against-ranks panel's field: the one measured on the most rank counts (tables of
    # other sizes compared), the largest of those
    spans = {d: len({r["ranks"] for r in rows if r["d"] == d}) for d in {r["d"] for r in rows}}
    d_ranks = max(spans, key=lambda d: (spans[d], d))
    panels = 3 if spans[d_ranks] > 1 else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.9))
    top = [r for r in rows if r["ranks"] == counts[-1]]
    for i, method in enumerate(methods):
        mine = sorted((r for r in top if r["method"] == method), key=lambda r: r["d"])
        d = [r["d"] for r in mine]
        axes[0].semilogx(d, [r["rounds"] for r in mine], "o-", color=f"C{i}", label=method)
        _timed(axes[1], d, mine, color=f"C{i}", label=method)
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
    axes[0].set_ylim(bottom=0)
    axes[0].set_xlabel("field dimension d")
    axes[0].set_ylabel("parallel rounds (sequential model calls)")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("field dimension d")
    axes[1].set_ylabel("wall time per batch (s)")
    repeats = min(r.get("repeats", 1) for r in rows)
    _log_limits(axes[1], [r["d"] for r in top], top)
    axes[1].set_title(f"{counts[-1]} rank(s); dot: min, bar: to the median"
                      + ("" if repeats > 1 else "\n(1 timing: raise bench.repeats)"), fontsize=9)
    if panels == 3:  # the largest such field, where splitting a block over ranks matters most
        d = d_ranks
        for i, method in enumerate(methods):
            mine = sorted((r for r in rows if r["method"] == method and r["d"] == d),
                          key=lambda r: r["ranks"])
            _timed(axes[2], [r["ranks"] for r in mine], mine, color=f"C{i}", label=method)
        axes[2].set_xscale("log", base=2)
        axes[2].set_yscale("log")
        _log_limits(axes[2], counts, [r for r in rows if r["d"] == d])
        axes[2].set_xticks(counts, [str(c) for c in counts])
        axes[2].set_xlabel("MPI ranks (time slices)")
        axes[2].set_ylabel("wall time per batch (s)")
        axes[2].set_title(f"d = {d}", fontsize=10)
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return path


def quality_figure(rows: list[dict], curves: dict[str, list], quality: float, path: Path,
                   ylabel: str = "exact W2 to the grf target (relative)") -> Path:
    """An error (``ylabel``: exact W2, spectrum error) against rounds and against model calls:
    each sequential reference's curve over the steps its search computed (``curves``
    {method: [(steps, calls, error)]}), and every benched method (``rows``) where it reaches
    ``quality``."""
    from matplotlib.ticker import NullFormatter

    plt = canvas()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    names = list(dict.fromkeys([r["method"] for r in rows] + sorted(curves)))
    color = {name: f"C{i % 10}" for i, name in enumerate(names)}  # a reference's line and mark alike
    shown = {r["method"] for r in rows}
    for ref, points in sorted(curves.items()):
        steps = [calls for _, calls, _ in points]  # a sequential sampler's rounds are its calls
        errors = [w for _, _, w in points]
        for k, ax in enumerate(axes):
            ax.loglog(steps, errors, "-", color=color[ref], lw=1, alpha=0.6,
                      label=None if k or ref in shown else f"{ref} (reference)")
    markers = "osD^v<>p*hXPd"  # a mark apiece for up to 13 methods (colours repeat after 10)
    for j, r in enumerate(rows):
        style = dict(marker=markers[j % len(markers)], ms=8, ls="none", mfc="none", mew=1.6,
                     color=color[r["method"]], label=f"{r['method']} ({r['steps']} steps)")
        axes[0].loglog(r["rounds"], r["error"], **style)
        style.pop("label")
        axes[1].loglog(r["model_calls"], r["error"], **style)
    for ax, label in zip(axes, ("parallel rounds (sequential model calls)",
                                "model calls per member")):
        ax.axhline(quality, color="k", ls="--", lw=0.8)
        ax.set_xlabel(label)
        ax.xaxis.set_minor_formatter(NullFormatter())  # a short decade: labels would overlap
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"lines: sequential references; marks: each method at error <= {quality:g}",
                      fontsize=9)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return path
