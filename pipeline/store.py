"""The ensemble store: a chunked Zarr (format 3) group that xarray opens, safe to resume.

Layout: one variable per field with dims (item, member, *field dims), chunked (1, m members,
*whole field) with m a divisor of the member batch (``member_chunk``), so every writer owns
whole chunks; per-(item, member) ``seed``, ``rounds``, ``model_calls`` and ``done`` (1 once
that member's data is written; chunked like the fields), and ``residual`` (item, member,
sweep): the Picard residual of the member's batch after each parallel round in the units of
the tolerance, NaN-padded. The field dims carry the coordinates and attributes the run knows
(``StoreSpec.coords``), under CF conventions. Provenance and the store's configuration digest
are attributes. The interface is small and explicit: create (or open), grow, finalize here;
see what is done and write a batch in ``pipeline.done_record``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from pipeline.choices import FIELD_DIMS
from pipeline.errors import PiadmError
from pipeline.processes import left_by_dead, own_name
from pipeline.signals import settle_zarr_io
from pipeline.warned import catching


if TYPE_CHECKING:
    import xarray as xr

PER_MEMBER = {"seed": "int64", "rounds": "float64", "model_calls": "float64", "done": "int8"}
PER_MEMBER_BYTES = sum(np.dtype(t).itemsize for t in PER_MEMBER.values())


class StoreExists(PiadmError, FileExistsError):
    """The output path holds data this run may not use, and overwriting was not asked for."""


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds: ``items`` labels along ``item_dim``, ``members`` per item, one
    ``variable`` of ``shape`` and ``dtype``; ``member_chunk`` members per chunk; ``digest``
    identifies the configuration that fills it; ``attrs`` the provenance."""

    path: str
    item_dim: str
    items: np.ndarray
    members: int
    member_chunk: int
    variable: str
    shape: tuple[int, ...]
    dtype: str
    digest: str
    attrs: dict
    sweeps: int = 0  # length of the residual history kept per member (0: none)
    coords: dict = dataclasses.field(default_factory=dict)  # dim -> (values, attrs) to carry
    item_encoding: dict = dataclasses.field(default_factory=dict)  # the input's CF time units
    field_attrs: dict = dataclasses.field(default_factory=dict)  # units, long_name, ...


CHUNK_BYTES = 64 * 2**20  # the most a chunk holds, when the member batch allows
RESIDUAL_DTYPE = "float32"  # a residual history's entries, one a round
RESIDUAL_BYTES = np.dtype(RESIDUAL_DTYPE).itemsize
MEMBER_LABELS_CHUNK = 2**20  # member labels a chunk of the ``member`` coordinate holds
INPUT_FINGERPRINT = "input_fingerprint"  # the input fields a store was conditioned on
FIELD_SCALE = "piadm_field_scale"  # [mean, std]: its fields are mean + std * the model's units
# The attribute of the ensemble.batch_size an "auto" run's config asked when its plan was made
# (``pipeline.planner``): a resume whose config asks another samples at that size instead of
# the plan's (after running out of memory, say); one that asks the same keeps the plan's.
ASKED = "plan_batch_size_asked"
CREATING = "creating-"  # a store is made as .NAME.creating-HOST-PID-ID, then renamed into place


def member_chunk(batch_size: int, field_bytes: int, sweeps: int = 0) -> int:
    """Members per chunk: the largest divisor of the batch size whose chunk of the array
    that holds the most bytes a member (its field of ``field_bytes``, or a tiny field's
    residual history of ``sweeps`` rounds) stays within ``CHUNK_BYTES`` (at least one
    member), so every writer still owns whole chunks."""
    member_bytes = max(field_bytes, RESIDUAL_BYTES * sweeps)
    most = min(batch_size, CHUNK_BYTES // max(member_bytes, 1))  # a huge batch: few to try
    return next((k for k in range(most, 1, -1) if batch_size % k == 0), 1)


def _dataset(spec: StoreSpec) -> xr.Dataset:
    # xarray and dask only where a dataset is made or opened: `piadm status` reads `done`
    # with zarr alone, in a fraction of a second rather than seconds of imports
    import dask.array as da
    import xarray as xr

    dims = (spec.item_dim, "member", *FIELD_DIMS[len(spec.shape)])
    n = len(spec.items)
    # one dask chunk each: only the metadata is written (``create``), and a graph of a task
    # per store chunk made creating a store of many members take seconds
    field = da.zeros((n, spec.members, *spec.shape), dtype=spec.dtype, chunks=-1)
    per_member = {
        name: ((spec.item_dim, "member"), da.zeros((n, spec.members), dtype=dtype, chunks=-1))
        for name, dtype in PER_MEMBER.items()
    }
    if spec.sweeps:
        per_member["residual"] = (
            (spec.item_dim, "member", "sweep"),
            da.full((n, spec.members, spec.sweeps), np.nan, dtype=RESIDUAL_DTYPE, chunks=-1))
    coords = {spec.item_dim: spec.items, "member": np.arange(spec.members)}
    coords.update({d: np.arange(k) for d, k in zip(dims[2:], spec.shape)})
    if spec.sweeps:
        coords["sweep"] = np.arange(1, spec.sweeps + 1)
    for d, (values, _) in spec.coords.items():
        if d in coords and len(values) == len(coords[d]):
            coords[d] = values
    ds = xr.Dataset({spec.variable: (dims, field), **per_member}, coords=coords)
    _describe(ds, spec, dims)
    for name, var in ds.data_vars.items():  # the store's chunks: whole fields, m members
        var.encoding["chunks"] = (1, spec.member_chunk, *var.shape[2:])
    # one chunk for the member labels however far the store grows (``grow``), not a file
    # for every store's worth of members
    ds["member"].encoding["chunks"] = (MEMBER_LABELS_CHUNK,)
    ds[spec.item_dim].encoding.update(spec.item_encoding)
    return ds


def _describe(ds: xr.Dataset, spec: StoreSpec, dims: tuple[str, ...]) -> None:
    """The attributes of the new store ``ds`` (its own and its variables', CF where CF has a
    word for them), so that an analyst's xarray, cf_xarray or ncdump says what each holds."""
    created = f"{_now()} piadm {spec.attrs.get('piadm_version', '')}: store created".strip()
    ds.attrs.update(_recordable(spec.attrs), piadm_store_digest=spec.digest,
                    Conventions="CF-1.10", history=created, piadm_history=json.dumps([created]))
    for d in dims[2:]:  # CF's axis, so that cf_xarray and plotting tools find X and Y
        ds[d].attrs.update(long_name=f"grid index along {d}", units="1", axis=d.upper())
    for d, (values, attrs) in spec.coords.items():
        if d in ds.coords and len(values) == ds.sizes[d]:
            ds[d].attrs = dict(attrs)
    if spec.item_dim not in spec.coords:
        ds[spec.item_dim].attrs.setdefault(
            "long_name", "work item (an unconditional ensemble has one, 0)")
    ds[spec.variable].attrs.update(spec.field_attrs)
    ds[spec.variable].attrs.setdefault("long_name", f"ensemble of {spec.variable}")
    ds["member"].attrs.update(standard_name="realization", units="1", long_name="ensemble member")
    ds["done"].attrs.update(long_name="1 once the member's fields are completely written",
                            flag_values=[0, 1], flag_meanings="not_written written")
    ds["seed"].attrs.update(long_name="noise key of the member: seed, item and member index",
                            units="1")
    # a sampler call runs a batch of members: these are the call's, so they move with
    # ensemble.batch_size where the member's field does not
    ds["rounds"].attrs.update(long_name="sequential model-call rounds of the sampler call "
                              "that made the member (its batch's)", units="1")
    ds["model_calls"].attrs.update(long_name="model evaluations per member of the sampler call "
                                   "that made the member (its batch's mean)", units="1")
    if spec.sweeps:
        ds["sweep"].attrs.update(long_name="parallel round (Picard sweep or window advance)",
                                 units="1")
        ds["residual"].attrs.update(
            long_name="Picard residual after each parallel round: the root mean square change "
                      "over the step's noise scale, max over the members of the member's "
                      "sampler call; in the units of sampler.tol",
            units="1")


def _recordable(attrs: dict) -> dict:
    """``attrs`` without the values None: a store attribute holding null failed every
    NetCDF export of the store (``ds.to_netcdf``); an attribute not there reads as None."""
    return {key: value for key, value in attrs.items() if value is not None}


def field_variable(ds: xr.Dataset) -> str:
    """The ensemble variable of a piadm store: the one that is not per-member bookkeeping."""
    names = [v for v in ds.data_vars if v not in PER_MEMBER and v != "residual"]
    if len(names) != 1:
        raise ValueError(f"expected one field variable in the store, found {names}")
    return names[0]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def enclosing_store(path: str | Path) -> Path | None:
    """The Zarr store that ``path`` would lie inside, or None: a file or store written there
    would be taken for part of that store, and lost when it is replaced. The outermost: an
    array's folder holds a zarr.json too, and a path beside it is still inside the store."""
    folder = Path(os.path.abspath(path)).parent  # "a.zarr/../b.json" lies outside a.zarr
    nodes = [p for p in (folder, *folder.parents)
             if (p / "zarr.json").is_file() or (p / ".zgroup").is_file()
             or (p / ".zarray").is_file()]
    return nodes[-1] if nodes else None


def nearest_existing(path: str | Path) -> Path:
    """The nearest folder above ``path`` that exists: where making it starts."""
    folder = Path(path).parent.absolute()
    return next(p for p in (folder, *folder.parents) if p.exists())


def try_new_entry(folder: Path) -> None:
    """Raise the OSError of making a new entry in ``folder`` (an empty folder, made and
    removed at once): whether piadm may write there, asked before the work whose result it
    writes."""
    os.rmdir(tempfile.mkdtemp(prefix=".piadm-check-", dir=folder))


def create(spec: StoreSpec) -> bool:
    """Create the store at ``spec.path`` (metadata only), built aside and renamed into place,
    so the path is either absent or complete. Returns False when another run created it
    first: whether that store is this run's to use is the caller's to decide
    (``pipeline.target``)."""
    path = Path(spec.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for left in left_by_dead(path.parent, f".{path.name}.{CREATING}", tail=1):
        shutil.rmtree(left, ignore_errors=True)  # a creation killed on this host
    aside = path.with_name(own_name(f".{path.name}.{CREATING}", uuid.uuid4().hex[:8]))
    try:
        # safe_chunks off: the one dask chunk spans many store chunks, nothing is computed
        _dataset(spec).to_zarr(aside, mode="w", compute=False, consolidated=False,
                               zarr_format=3, safe_chunks=False)
        # consolidated from the start: a run killed before it ends leaves a store that
        # readers asking for consolidated metadata (xarray's default, a catalogue) still open
        consolidate(aside)
    except BaseException as err:
        settle_zarr_io()  # the draft's other writes, still under way, would recreate it
        shutil.rmtree(aside, ignore_errors=True)
        if isinstance(err, OSError) and err.errno:  # the user knows the path, not the draft
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    try:
        os.rename(aside, path)
    except OSError:
        shutil.rmtree(aside, ignore_errors=True)
        if path.exists():  # another run's store is there
            return False
        if path.is_symlink():  # a link to nowhere: rename would replace the link, not fill it
            raise StoreExists(f"output {path} is a symbolic link {_leads_to(path)}, and piadm "
                              "does not make a store through a link: point output.path at "
                              "the path you meant") from None
        raise  # not a race: the folder refused it (permissions, a full disk)
    return True


def _leads_to(link: Path) -> str:
    """Where the symbolic ``link``, which leads to nothing, leads, as a phrase."""
    try:
        link.resolve(strict=True)
    except RuntimeError:  # Python 3.11's word for a loop
        return "that leads back to itself"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "that leads back to itself"
    # relative to the link's folder, not to the working one
    return f"to {link.parent / os.readlink(link)}, which does not exist"


def members_fit(path: str | Path, members: int) -> bool:
    """Whether every member-indexed array of the store holds ``members`` members (not so
    after a growth cut short)."""
    sizes = set()
    # the arrays, and what readers are told of them (the consolidated metadata, if any yet)
    for consolidated in (False, None):
        group = zarr.open_group(path, mode="r", use_consolidated=consolidated)
        sizes |= {a.shape[a.metadata.dimension_names.index("member")]
                  for _, a in group.arrays() if "member" in (a.metadata.dimension_names or ())}
    return sizes == {members}


def fit_members(path: str | Path, members: int) -> bool:
    """Give every member-indexed array of the store exactly ``members`` members (new ones
    not done: Zarr reads chunks never written, and the edge chunks' padding, as the fill
    value, 0 for ``done``), and the ``member`` coordinate 0 .. members - 1; whether anything
    changed. Only the arrays are touched, not the consolidated metadata: a store's arrays
    differ in size only after a growth cut short, and none of its members past the count
    it records can be done, so cutting those is safe."""
    # the arrays as they are, not as the consolidated metadata last saw them
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    changed = False
    for _, array in group.arrays():
        dims = array.metadata.dimension_names or ()
        if "member" in dims and array.shape[dims.index("member")] != members:
            shape = list(array.shape)
            shape[dims.index("member")] = members
            array.resize(tuple(shape))
            changed = True
    coord = group["member"]
    if changed or not np.array_equal(coord[:], np.arange(members)):
        coord[:] = np.arange(members)
        changed = True
    return changed


def grow(path: str | Path, members: int, note: str, attrs: dict) -> None:
    """Grow the store to ``members`` members (``fit_members``), then set ``attrs`` and append
    ``note`` (``finalize``). The identity in ``attrs`` goes last, after the consolidated
    metadata has the new sizes: a growth cut short leaves the old identity, and the next run
    grows the store again, or, of the smaller configuration, fits it back."""
    fit_members(path, members)
    consolidate(path)  # what readers (and ``finalize``) open: the sizes before the identity
    finalize(path, note, attrs)


def finalize(path: str | Path, note: str, attrs: dict | None = None) -> None:
    """Set ``attrs`` (if any), append ``note`` to the history (CF text, newest last, and the
    same lines as a JSON list in ``piadm_history``) and consolidate the metadata."""
    group = zarr.open_group(path, mode="r+")
    lines = history_lines(dict(group.attrs)) + [f"{_now()} {note}"]
    # in one write of the group's metadata: attrs.update would write it once a key, and a
    # kill between them would leave a store whose config and identity disagree
    group.update_attributes({**_recordable(attrs or {}), "piadm_history": json.dumps(lines),
                             "history": "\n".join(lines)})
    consolidate(path)


def history_lines(attrs: dict) -> list[str]:
    """A store's history, oldest first: ``piadm_history`` (a JSON list as text), else the CF
    ``history``, which a piadm before 2026-11-30 wrote as that JSON list and other tools as
    lines. Either edited by hand (a real list, text that is no JSON list) is read as it
    stands, so that no run fails on it and no line of it is lost."""
    for key in ("piadm_history", "history"):
        value = attrs.get(key)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        if isinstance(value, list):
            return [str(line) for line in value]
        if isinstance(value, str) and value:
            return value.splitlines()
    return []


@contextlib.contextmanager
def _quiet_consolidated():
    """Zarr 3 calls consolidated metadata an extension and warns; xarray reads it, and it
    saves listing the store. A store another tool wrote without it (or an older piadm's,
    stopped before its end) has none: xarray lists it instead, with a warning that says
    nothing to a piadm user."""
    with catching():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated")
        yield


def open_store(path: str | Path, consolidated: bool | None = None,
               dask: bool = True) -> xr.Dataset:
    """The store at ``path`` as a lazy ``xarray.Dataset``; ``consolidated = False`` for a
    store another tool wrote, whose consolidated metadata that tool may have left stale (a
    variable or times added since, hidden from a reader that trusts it). ``dask = False``
    for a reader that takes its selections one at a time: each is read by zarr directly,
    not through a dask graph of a task a chunk (evaluate's 1024 items: 8 s against 2 s)."""
    import xarray as xr

    with _quiet_consolidated():
        return xr.open_zarr(path, consolidated=consolidated, **({} if dask else {"chunks": None}))


def consolidate(path: str | Path) -> None:
    """Write the consolidated metadata, so readers open the store with one request."""
    with _quiet_consolidated():
        zarr.consolidate_metadata(path)
