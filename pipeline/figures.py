"""PNG figures of an evaluation (matplotlib, no display needed); the figure maker and the
whole-or-nothing save the bench's figures (``pipeline.bench_figures``) share."""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.evaluation import spread_variance
from pipeline.labels import label_text
from pipeline.processes import replace_file
from pipeline.store import field_variable


class _Figures:
    """pyplot's ``subplots`` and ``close`` on figures of their own: no display is needed (batch
    nodes have none) and none is switched (pyplot's backend is the process's, and a script or
    notebook that calls the API goes on showing its own figures)."""

    @staticmethod
    def subplots(*args, figsize=None, **kwargs):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)

    @staticmethod
    def close(fig) -> None:
        fig.clear()


def canvas() -> _Figures:
    """pyplot's ``subplots`` and ``close``, on figures of their own (``_Figures``)."""
    return _Figures()


def save_formats() -> set[str]:
    """The file suffixes (no dot, lower case) the figures here can be saved as: matplotlib's."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def fields_figure(ens: xr.Dataset, truth: xr.DataArray, paired: bool, path: Path,
                  items: int = 3, members: int = 3, inputs: xr.DataArray | None = None) -> Path:
    """Rows of items: the (upsampled) input when given, truth, a few members, ensemble mean
    and spread, on shared colour scales; 1-D fields as curves, a field of channels by its
    first channel."""
    plt = canvas()
    name = field_variable(ens)
    field = ens[name]
    rows = min(items, field.shape[0]) if paired else 1
    shown = min(members, field.shape[1])
    flat = field.ndim == 3  # (item, member, x)
    cols = 1 if flat else (inputs is not None) + 1 + shown + 2
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * max(cols, 3), 2.3 * rows + 0.4),
                             squeeze=False)
    for r in range(rows):
        e = field.isel({field.dims[0]: r}).values
        # a climatology may have several dims before the field's (e.g. time and member)
        t = truth.isel({truth.dims[0]: r}).values if paired else truth.isel(
            {d: 0 for d in truth.dims[:truth.ndim - e.ndim + 1]}).values
        shown_in = None if inputs is None else inputs.isel({inputs.dims[0]: r}).values
        if flat:
            _curves(axes[r, 0], t, e, shown, paired, shown_in)
        else:
            _images(fig, axes[r], _first_channel(t), _first_channel(e, 1), shown, paired,
                    None if shown_in is None else _first_channel(shown_in),
                    _descending(ens, field.dims[-2]))
        axes[r, 0].set_ylabel(f"{field.dims[0]} {label_text(field[field.dims[0]].values[r])}"
                              if paired else "", fontsize=9)
    channel = " (channel 0)" if field.ndim > 4 else ""
    fig.suptitle(f"{name}{channel}: truth, members, ensemble mean and spread", fontsize=10)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return path


def _first_channel(img: np.ndarray, lead: int = 0) -> np.ndarray:
    """``img`` with its axes between the first ``lead`` and the last two taken at 0."""
    return img[(slice(None),) * lead + (0,) * (img.ndim - lead - 2)]


def _descending(ens: xr.Dataset, dim: str) -> bool:
    """Whether the store's coordinate ``dim`` runs downwards (latitudes north to south, as
    ERA5 stores them): its first row is then drawn at the top, north up."""
    values = ens[dim].values if dim in ens.coords else np.arange(2)
    return (values.dtype.kind in "iuf" and values.size > 1
            and bool(np.all(np.diff(values.astype(float)) < 0)))


def _colours(panels: list[np.ndarray]) -> tuple[str, float, float]:
    """(colour map, lowest, highest) the field panels share: about 0 on a diverging map for a
    field that changes sign (vorticity, an anomaly), else its range on a sequential one (a
    temperature in K on -290 .. 290 drew every panel one colour)."""
    lo = float(min(np.nanmin(p) for p in panels))
    hi = float(max(np.nanmax(p) for p in panels))
    if lo < 0 < hi:
        lim = max(-lo, hi)
        return "RdBu_r", -lim, lim
    return "viridis", lo, hi


def _images(fig, axes, t: np.ndarray, e: np.ndarray, shown: int, paired: bool, inputs,
            descending: bool = False) -> None:
    """One row of 2-D panels: input, truth ``t``, the first ``shown`` members of ``e``, their
    mean and spread; ``descending``: the first row at the top."""
    origin = "upper" if descending else "lower"
    panels = [] if inputs is None else [("coarse input", inputs)]
    panels += [("truth" if paired else "a truth sample", t)]
    panels += [(f"member {m}", e[m]) for m in range(shown)]
    panels += [("ensemble mean", e.mean(0))]
    cmap, lo, hi = _colours([img for _, img in panels])
    for c, (title, img) in enumerate(panels):
        im = axes[c].imshow(img, cmap=cmap, vmin=lo, vmax=hi, origin=origin)
        axes[c].set_title(title, fontsize=9)
    spread = np.sqrt(spread_variance(e)) if len(e) > 1 else np.zeros_like(t)
    sp = axes[-1].imshow(spread, cmap="magma", vmin=0, origin=origin)
    axes[-1].set_title("ensemble spread" if len(e) > 1 else "spread: n/a (1 member)", fontsize=9)
    fig.colorbar(sp, ax=axes[-1], fraction=0.046, pad=0.04)
    fig.colorbar(im, ax=axes[-2], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])


def _curves(ax, t: np.ndarray, e: np.ndarray, shown: int, paired: bool, inputs) -> None:
    """One panel of 1-D fields: input, truth ``t``, the first ``shown`` members of ``e``, and
    their mean with a band of one spread."""
    x = np.arange(t.shape[-1])
    if inputs is not None:
        ax.plot(x, inputs, color="0.6", lw=1, label="input")
    for m in range(shown):
        ax.plot(x, e[m], lw=0.8, alpha=0.6, label=f"member {m}")
    mean = e.mean(0)
    if len(e) > 1:  # the spread the metrics define (one member has none)
        spread = np.sqrt(spread_variance(e))
        ax.fill_between(x, mean - spread, mean + spread, color="C0", alpha=0.15,
                        label="mean +- spread")
    ax.plot(x, mean, color="C0", lw=1.5, label="ensemble mean")
    ax.plot(x, t, color="k", lw=1.5, label="truth" if paired else "a truth sample")
    ax.legend(fontsize=7, ncol=2)


BAND_SHADES = {"input": "0.93", "resolved": "0.93", "added": "#fdebd0", "beyond": "0.82"}


def _headline(a: dict) -> str:
    name = a["headline_band"]
    b = lambda key: a[f"band_{name}_{key}"]  # noqa: E731
    bounds = (f" [{100 * b('max_deviation_lo'):.0f}, {100 * b('max_deviation_hi'):.0f}]"
              if np.isfinite(b("max_deviation_lo")) or not np.isfinite(b("max_deviation"))
              else " (no interval)")
    return (f"{name} band k={b('k')}: max deviation {100 * b('max_deviation'):.0f}%{bounds}, "
            f"energy ratio {b('energy_ratio'):.2f}")


def spectrum_figure(metrics: xr.Dataset, path: Path) -> Path:
    """Ensemble and truth spectra (log-log) with their ratio and its bootstrap interval below,
    the bands shaded; the title is the headline band's figures."""
    plt = canvas()
    a = metrics.attrs
    k = metrics["k"].values
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5.8), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.5]})
    for name in a["bands"].split(","):
        lo, hi = (int(v) for v in a[f"band_{name}_k"].split(".."))
        for ax in (top, bottom):
            ax.axvspan(lo - 0.5, hi + 0.5, color=BAND_SHADES.get(name, "0.9"), lw=0, zorder=0)
        top.text(np.sqrt(max(lo - 0.5, 0.7) * (hi + 0.5)), 0.02, name, ha="center",
                 transform=top.get_xaxis_transform(), fontsize=8, color="0.3")
    top.loglog(k, metrics["spectrum_truth"].values, "k-", lw=2, label="truth")
    top.loglog(k, metrics["spectrum_ensemble"].values, "C3--", lw=1.5, label="ensemble members")
    # A dealiased truth drops to round-off past its cut; keep the axis on the resolved range.
    resolved = np.concatenate([metrics["spectrum_ensemble"].values, metrics["spectrum_truth"].values])
    resolved = resolved[resolved > resolved.max() * 1e-12]
    top.set_ylim(resolved.min() / 3, resolved.max() * 3)
    top.set_ylabel(f"{a['spectrum']} spectrum")
    top.legend()
    if np.isfinite(metrics["spectrum_ratio_lo"].values).any():  # none for one member or item
        bottom.fill_between(k, metrics["spectrum_ratio_lo"].values,
                            metrics["spectrum_ratio_hi"].values, color="C3", alpha=0.25, lw=0,
                            label="90% bootstrap interval")
    bottom.semilogx(k, metrics["spectrum_ratio"].values, "C3.-")
    bottom.axhline(1, color="k", lw=0.8)
    for level in (0.8, 1.2):
        bottom.axhline(level, color="0.5", lw=0.6, ls="--")
    # up to the largest ratio shown (within reason): a band far off is the headline
    shown = metrics["spectrum_ratio"].values
    shown = shown[np.isfinite(shown)]
    bottom.set_ylim(0, min(max(2.0, 1.1 * shown.max()) if shown.size else 2.0, 10.0))
    bottom.set_xlabel("wavenumber k")
    bottom.set_ylabel("ensemble / truth")
    if k.max() < 30:  # a short decade: whole wavenumbers, not overlapping minor labels
        from matplotlib.ticker import NullFormatter

        ticks = _whole_ticks(int(k.max()))
        bottom.set_xticks(ticks, [str(t) for t in ticks])
        bottom.xaxis.set_minor_formatter(NullFormatter())
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(fontsize=8, loc="upper left")
    top.set_title(_headline(a), fontsize=9.5)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return path


def save(fig, path: Path) -> None:
    """``fig`` written to ``path`` whole or not at all (``replace_file``): a stop mid-write
    left a 0-byte PNG where an earlier plot was (evaluate's drafts go through it too)."""
    replace_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format=Path(path).suffix[1:]
                                               or "png"))


def _whole_ticks(kmax: int) -> list[int]:
    """Wavenumbers to label on a log axis up to ``kmax`` (< 30), about evenly spaced there."""
    return [t for t in (1, 2, 3, 4, 6, 8, 12, 16, 24) if t <= kmax]


def spread_skill_text(ratio: float, members: int, form: str) -> str:
    """The spread/skill ``ratio`` in ``form``, or why there is none (the table's and the
    rank histogram's words)."""
    if np.isfinite(ratio):
        return form.format(ratio)
    return "n/a (needs 2 members)" if members < 2 else "n/a (the ensemble mean is the truth)"


def rank_figure(metrics: xr.Dataset, path: Path) -> Path:
    """The rank histogram as shares of the points, against the flat line of a reliable
    ensemble."""
    plt = canvas()
    h = metrics["rank_histogram"].values.astype(float)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.bar(np.arange(h.size), h / h.sum(), color="C0")
    ax.axhline(1 / h.size, color="k", ls="--", lw=1, label="reliable ensemble")
    ax.set_xlabel("rank of the truth among the members")
    ax.set_ylabel("share of points")
    said = spread_skill_text(metrics.attrs["spread_skill"], metrics.attrs["members"], "{:.2f}")
    ax.set_title(f"rank histogram, spread/skill {said}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return path


def call_starts(res: np.ndarray) -> list[int]:
    """The first member of each sampler call, from the residual histories ``res`` (member,
    sweep): the members of a call share its history, so a call starts where it changes (not
    every ensemble.batch_size members: a resumed store may have been sampled in smaller calls
    than it was made with)."""
    return [m for m in range(res.shape[0])
            if m == 0 or not np.array_equal(res[m], res[m - 1], equal_nan=True)]


def residual_figure(ens: xr.Dataset, path: Path, batches: int = 4) -> Path | None:
    """The Picard residual after every parallel round for the first few sampler calls (of
    the first item), with the tolerance; None when the store has no residuals (sequential
    samplers)."""
    if "residual" not in ens:
        return None
    plt = canvas()
    cfg = tomllib.loads(ens.attrs.get("config", ""))
    sampler = cfg.get("sampler", {})
    res = ens["residual"].isel({ens["residual"].dims[0]: 0}).values  # (member, sweep)
    starts = call_starts(res)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    blocked = sampler.get("method") == "piadm-sde" and sampler.get("tol")
    zeros = False
    for n, row in enumerate(starts[:batches]):
        r = res[row][np.isfinite(res[row])]
        x = np.arange(1, r.size + 1, dtype=float)
        # a residual of 0 (a window's accepted points certified exact) has no place on a log
        # axis: left out, and said, rather than drawn at an invented floor
        y = np.where(r > 0, r, np.nan)
        zeros = zeros or bool((r <= 0).any())
        if blocked:  # a block ends at the round its residual reaches tol: break the line there
            ends = np.flatnonzero(r[:-1] <= sampler["tol"]) + 1
            x, y = np.insert(x, ends, np.nan), np.insert(y, ends, np.nan)
            if n == 0:
                for end in ends:
                    ax.axvline(end + 0.5, color="0.8", lw=0.6, zorder=0)
        ax.semilogy(x, y, ".-", ms=3, lw=0.8, label=f"call from member {row}")
    if sampler.get("tol"):
        ax.axhline(sampler["tol"], color="k", ls="--", lw=1, label=f"tol {sampler['tol']}")
    ax.set_xlabel("parallel round (sweep)")
    ax.set_ylabel("relative Picard residual")
    ax.set_title(f"{sampler.get('method', '')}: residual per round"
                 + (f", blocks of {sampler.get('block_size', '?')} steps (grey: block starts)"
                    if blocked else "") + ("; rounds of residual 0 not drawn" if zeros else ""),
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return path
