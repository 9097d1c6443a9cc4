"""Where ``piadm evaluate`` writes and how: the output folder (refused where it is a file, a
Zarr store, inside one, or holds files of our names that no evaluation wrote), the metrics as
JSON, and the files drafted aside and moved into place together, so that a failure leaves
the folder as it was (a killed evaluation's drafts are removed by a later one), and a kill
while they move leaves no metrics.json, which a complete evaluation writes last.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import pipeline
from pipeline.errors import EvaluationError
from pipeline.jsontext import finite_or_null
from pipeline.labels import label_text
from pipeline.processes import process_alive

if TYPE_CHECKING:
    import xarray as xr

# every file evaluate writes into its folder (the figures but fields.png only where they apply)
OUTPUTS = ("metrics.json", "metrics.nc", "fields.png", "spectrum.png", "rank_histogram.png",
           "residuals.png")
# an empty file that marks a folder evaluate writes into, from before its first file moves
# in: an evaluation killed while moving them in left metrics.nc without metrics.json, and
# every rerun refused the folder as someone else's
MARK = ".piadm-evaluate"


def _check_ours(folder: Path) -> None:
    """Refuse a folder holding files of the names evaluate writes that no evaluation wrote
    (its ``MARK``, or a metrics.json naming a store and a truth, tells one): they would be
    replaced or removed."""
    there = [name for name in OUTPUTS if (folder / name).exists()]
    if not there or (folder / MARK).is_file():
        return
    try:
        earlier = json.loads((folder / "metrics.json").read_text())
        ours = isinstance(earlier, dict) and {"store", "truth"} <= earlier.keys()
    except FileNotFoundError:
        ours = False
    except (OSError, ValueError):
        raise EvaluationError(f"--out {folder} holds a metrics.json that cannot be read: "
                              "delete it if it is an evaluation's, or give another folder"
                              ) from None
    if not ours:
        raise EvaluationError(f"--out {folder} holds {', '.join(there)}, not written by piadm "
                              "evaluate, which would replace them: give a new or empty folder")


def as_json(metrics: xr.Dataset) -> dict:
    """The overall figures at the top level; per-item scores, spectra and ranks below."""
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.attrs.items()}
    per_item = [v for v in metrics.data_vars if metrics[v].dims == metrics["crps"].dims] \
        if "crps" in metrics else []
    if per_item:
        dim = metrics["crps"].dims[0]
        labels = metrics[dim].values
        # dates as ISO 8601 text (tolist gives a datetime64[ns]'s nanoseconds; cftime alike)
        out["per_item"] = {dim: ([_iso(v) for v in labels] if labels.dtype.kind in "mMO"
                                 else labels.tolist()),
                           **{v: metrics[v].values.tolist() for v in per_item}}
    if "k" in metrics.coords:
        out["spectrum_k"] = {"k": metrics["k"].values.tolist(),
                             **{v.removeprefix("spectrum_"): metrics[v].values.tolist()
                                for v in ("spectrum_ensemble", "spectrum_truth",
                                          "spectrum_ratio", "spectrum_ratio_lo",
                                          "spectrum_ratio_hi")}}
    if "rank_histogram" in metrics:
        out["rank_histogram"] = metrics["rank_histogram"].values.tolist()
    return finite_or_null(out)


def _iso(label) -> str:
    """A date label as ISO 8601 (2020-01-01T06:00:00, midnight too), a cftime date's on its
    own calendar; a lead time or other label as ``label_text`` writes it."""
    if np.asarray(label).dtype.kind == "M":
        return str(np.datetime_as_string(np.datetime64(label, "s")))
    if hasattr(label, "calendar") and hasattr(label, "isoformat"):
        return label.isoformat()
    return label_text(label)


def output_folder(store, out) -> Path:
    """The folder the evaluation writes (``out``, else ``<store>_eval``), refused where it is a
    file, a Zarr store, or a folder whose files of the names it writes no evaluation wrote."""
    from pipeline.store import enclosing_store

    named = os.path.normpath(str(store))  # "." in the store's folder: its own name, not "."
    if os.path.basename(named) in (".", ".."):
        named = os.path.abspath(named)
    folder = Path(out) if out else Path(named.removesuffix(".zarr") + "_eval")
    if folder.is_file() or any((folder / name).exists()
                               for name in ("zarr.json", ".zgroup", ".zarray")):
        kind = "a file" if folder.is_file() else "a Zarr store"
        raise EvaluationError(f"--out {folder} is {kind}: give a folder for the table and "
                              "figures (default: the store's name + _eval)")
    inside = enclosing_store(folder)
    if inside is not None:  # its files would sit among the store's own
        raise EvaluationError(f"--out {folder} is inside the Zarr store {inside}: give a "
                              "folder outside it (default: the store's name + _eval)")
    _check_ours(folder)
    if not out:
        _check_same_store(folder, named)
    _check_writable(folder)
    return folder


def _check_writable(folder: Path) -> None:
    """Refuse, before the scoring (minutes on a large store), a folder that cannot be written:
    the nearest existing folder at or above it must take a new entry."""
    from pipeline.store import nearest_existing, try_new_entry

    existing = nearest_existing(folder / "metrics.json")
    try:
        try_new_entry(existing)
    except OSError as err:  # /proc: a folder that exists says "no such file" to a new one
        raise EvaluationError(f"--out {folder} cannot be written ({err.strerror} on making a "
                              f"folder in {existing}): give --out a folder you can write"
                              ) from None


def _check_same_store(folder: Path, store: str) -> None:
    """Refuse the default folder where it holds the evaluation of another store that still
    stands: ``a.zarr`` and ``a`` both evaluate into ``a_eval``, and the second replaced the
    first's results. (A store moved with its folder is evaluated there again.)"""
    try:
        earlier = json.loads((folder / "metrics.json").read_text()).get("store_path")
    except (OSError, ValueError, AttributeError):
        return
    if (isinstance(earlier, str) and os.path.exists(earlier)
            and os.path.realpath(earlier) != os.path.realpath(store)):
        raise EvaluationError(f"{folder} (the default --out: the store's name + _eval) holds "
                              f"the evaluation of another store, {earlier}: give --out a "
                              "folder of this store's own")


DRAFT_AGE_S = 600  # a draft older than this whose process is gone here was left by a kill


def _host_key() -> str:
    """This host, as a draft's name carries it: a short hash (a host name may hold dots)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _draft_owner() -> str:
    """What a draft's name says of the evaluation writing it: ``PID-HOSTKEY``."""
    return f"{os.getpid()}-{_host_key()}"


def _remove_dead_drafts(folder: Path) -> None:
    """Delete the drafts (``.PID-HOSTKEY.NAME``, and the temp file a figure's is written
    through) that an evaluation killed mid-write left in ``folder`` (kill -9 runs no
    cleanup): this host's, once their process is gone; another host's (or a draft of an
    older piadm's ``.PID.NAME``), once also written long enough ago that they are no
    evaluation at work there."""
    now = time.time()
    for path in folder.glob(".*.*"):
        # a draft, or the temp file a figure's draft is written through (..OWNER.NAME.*.tmp)
        owner, _, name = path.name.lstrip(".").partition(".")
        pid, _, host = owner.partition("-")
        ours = name in OUTPUTS or (name.endswith(".tmp") and any(
            name.startswith(f"{output}.") for output in OUTPUTS))
        if not (pid.isdigit() and ours) or owner == _draft_owner():
            continue
        with contextlib.suppress(OSError, OverflowError):  # gone meanwhile; not a pid
            old = host == _host_key() or now - path.stat().st_mtime > DRAFT_AGE_S
            if old and not process_alive(int(pid)):
                path.unlink()


def save(metrics: xr.Dataset, folder: Path, ens, truth, paired: bool, baseline,
         figures: bool, check=lambda: None) -> list[Path]:
    """Write metrics.json, metrics.nc and, with ``figures``, the figures into ``folder``
    (marked as ours, ``MARK``), removing an earlier evaluation's files this one does not
    make; the files written. Each is drafted aside first and moved into place once all are
    made, so that a failure leaves the folder as it was, not a mix of two evaluations' files;
    metrics.json, which says an evaluation is complete, goes first and comes back last, so
    that a kill while they move leaves none (rerun the evaluation). ``check``, called once
    all are drafted, raises where they should not be kept (the figures read ``ens`` lazily:
    a store replaced meanwhile)."""
    from pipeline.figures import fields_figure, rank_figure, residual_figure, spectrum_figure

    folder.mkdir(parents=True, exist_ok=True)
    _remove_dead_drafts(folder)

    def draft(name: str) -> Path:  # the suffix kept: matplotlib takes the format from it
        return folder / f".{_draft_owner()}.{name}"

    try:
        draft("metrics.json").write_text(json.dumps(as_json(metrics), indent=2, default=str,
                                                    allow_nan=False))
        # scipy: NetCDF 3, no extra library; as a CF file, with the line that made it
        made = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for dim in set(metrics.dims) & set(ens.coords):  # the store's raw times, as it has
            held = ens[dim].encoding
            if "units" in held:
                metrics[dim].encoding.update({k: held[k] for k in ("units", "calendar")
                                              if k in held})
        metrics.assign_attrs(Conventions="CF-1.10", history=(
            f"{made} piadm {pipeline.__version__}: evaluate {metrics.attrs.get('store_path', '')} "
            f"against {metrics.attrs.get('truth_path', '')}")).to_netcdf(
            str(draft("metrics.nc")), engine="scipy")
        # a figure's None or False: nothing to draw
        drawn = [fields_figure(ens, truth, paired, draft("fields.png"), inputs=baseline),
                 "spectrum_ratio" in metrics and spectrum_figure(metrics, draft("spectrum.png")),
                 "rank_histogram" in metrics and rank_figure(metrics,
                                                             draft("rank_histogram.png")),
                 residual_figure(ens, draft("residuals.png"))] if figures else []
        check()
    except BaseException:
        for name in OUTPUTS:  # what was drafted, a figure that failed part way's too
            draft(name).unlink(missing_ok=True)
        raise
    files = [folder / name for name in ("metrics.json", "metrics.nc")]
    files += [folder / path.name.split(".", 2)[2] for path in drawn if path]
    (folder / MARK).touch()  # ours from here on, whatever part of it moves in
    (folder / "metrics.json").unlink(missing_ok=True)  # an earlier evaluation's: not complete
    for final in files[1:]:
        os.replace(draft(final.name), final)
    for name in set(OUTPUTS) - {f.name for f in files}:  # an earlier evaluation's
        (folder / name).unlink(missing_ok=True)
    os.replace(draft("metrics.json"), files[0])
    return files
