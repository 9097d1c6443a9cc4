"""A run's work items and what is built from them: the input selection (or the one item of
an unconditional run), the store they fill (``store_spec``), and the model bound to the first
item's conditioning input, on which calibration and the bench run.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from models import OWN_KINDS
from models.conditioning import CONDITIONS
from pipeline.choices import FIELD_DIMS, MOST_TRAINING_STDS
from pipeline.config import ConfigError
from pipeline.console import say
from pipeline.errors import InputError
from pipeline.inputs import (Items, direction, longitude, open_items, renamed_attrs, rolled,
                             unconditional)
from pipeline.memory import field_bytes
from pipeline.run import DTYPES, provenance, residual_length, sampler_grid
from pipeline.samplers import REFERENCE, REGISTRY
from pipeline.samplers.options import CHURNS, REPLICABLE, Options
from pipeline.settings import Config
from pipeline.store import FIELD_SCALE, INPUT_FINGERPRINT, StoreSpec, member_chunk
from pipeline.store_attrs import MEMBER_BATCH


def load_items(cfg: Config, *, check: bool, model=None) -> Items:
    """The run's work items: the input selection (validated when ``check``, against the
    conditioning shape ``model`` was trained on when it records one), or one item."""
    i = cfg.input
    if not i.path:
        return unconditional()
    return open_items(i.path, variable=i.variable, dim=i.item_dim, items=i.items, span=i.range,
                      shape=tuple(cfg.model.shape), check=check,
                      coarse=cfg.model.condition == "coarse",
                      cond_shape=getattr(model, "cond_shape", None))


def store_variable(cfg: Config, trained_on: str | None) -> str:
    """The name of the ensemble's field in its store: output.variable, else the variable a
    learned model was trained on (``trained_on``), else the input variable (exact models),
    else ``field``."""
    return cfg.output.variable or trained_on or cfg.input.variable or "field"


def field_scale(model, mean: float, std: float) -> tuple[float, float]:
    """The (mean, std) a model's fields are in (data = mean + std x model units): a learned
    model's training normalisation; a user's network's own units, (0, 1) (``own_units``),
    which must not move with the input's selection; else the input's ``mean`` and ``std``
    (an exact model is defined on unit-variance fields)."""
    if getattr(model, "data_mean", None) is not None:
        return float(model.data_mean), float(model.data_std)
    if getattr(model, "own_units", False):
        return 0.0, 1.0
    return float(mean), float(std)


def _grid_coords(grid: dict, names: tuple[str, ...]) -> dict:
    """A learned model's training ``grid`` (``models.grid.grid_of``) as the store's field
    coordinates {dim: (values, attrs)} on its dims ``names``: by position where the training
    data named them otherwise (lat, lon for y, x), that name kept in ``input_dim``."""
    recorded = grid.get("coords", {})
    dims = grid.get("dims") or list(recorded)  # an older sidecar's: the dims with coordinates
    if len(dims) != len(names):
        return {d: (np.asarray(c["values"]), c["attrs"]) for d, c in recorded.items()
                if d in names}
    to_ours = dict(zip(dims, names))
    return {to_ours[d]: (np.asarray(c["values"]), renamed_attrs(d, to_ours[d], dict(c["attrs"])))
            for d, c in recorded.items() if d in to_ours}


def _paired_axes(items: Items, grid: dict, trained) -> list[tuple]:
    """(input dim, training dim, input values, training values) for each field axis of the
    input paired by position with the ``trained`` dims of ``grid``, where both have
    coordinates; none where the axes do not pair one to one."""
    fields = items.fields.dims[1:] if items.fields is not None else ()
    if not grid.get("coords") or len(trained) != len(fields):
        return []
    return [(dim, name, np.asarray(items.fields[dim].values),
             np.asarray(grid["coords"][name]["values"]))
            for dim, name in zip(fields, trained)
            if dim in items.fields.coords and name in grid["coords"]]


def check_orientation(items: Items, grid: dict, path: str) -> None:
    """Refuse a coarse input whose field axis runs the other way than the model's training
    ``grid`` (``models.grid.grid_of``): latitudes 90 .. -90, as archives store them, for a
    model trained on -90 .. 90. By position it would be sampled upside down, and the store's
    coordinates, the training grid's, would label the members so."""
    # an older sidecar lists only the dims that had coordinates: by position only if all did
    for dim, name, theirs, ours in _paired_axes(items, grid, grid.get("dims")
                                                or list(grid.get("coords", {}))):
        if direction(theirs) * direction(ours) < 0:
            way = "descending" if direction(theirs) < 0 else "ascending"
            raise InputError(
                f"input: {items.fields.name} of {path} has {dim} {way} ({theirs[0]:g} .. "
                f"{theirs[-1]:g}), the other way from the model's training grid ({name} "
                f"{ours[0]:g} .. {ours[-1]:g}): by position its members would come out "
                f"flipped; write it the training's way, e.g. "
                f"ds.isel({dim}=slice(None, None, -1)).to_zarr(...)")


def check_not_rolled(items: Items, grid: dict, path: str) -> None:
    """Refuse a coarse input whose coordinates are the training's coarse ``grid``
    (``models.grid.grid_of``, recorded by piadm train) rolled (longitudes from -180 for a
    network trained on longitudes from 0): taken by position, its members would sit rolled
    under the training grid's coordinates. Another grid of the same size (another region)
    is taken as given."""
    for dim, name, theirs, ours in _paired_axes(items, grid, grid.get("dims", ())):
        if theirs.dtype.kind not in "fiu" or ours.dtype.kind not in "fiu":
            continue
        if rolled(theirs, ours, longitude(dim) or longitude(name)):
            raise InputError(
                f"input: {items.fields.name} of {path} has {dim} {theirs[0]:g} .. "
                f"{theirs[-1]:g}, the network's training grid rolled ({name} {ours[0]:g} .. "
                f"{ours[-1]:g}): by position its members would sit rolled; roll it to the "
                f"training's (ds.roll({dim}=..., roll_coords=True))")


def store_spec(cfg: Config, items: Items, shape: tuple[int, ...],
               trained_on: str | None = None, grid: dict | None = None,
               scale: tuple[float, float] | None = None) -> StoreSpec:
    """The store ``cfg`` fills, with the input's statistics in its provenance and the
    ``scale`` (``field_scale``) its fields are in; its field named by ``store_variable``."""
    variable = store_variable(cfg, trained_on)
    attrs = provenance(cfg)
    attrs.update(input_path=cfg.input.path, input_mean=items.mean, input_std=items.std)
    if scale is not None:
        attrs[FIELD_SCALE] = list(scale)
    if items.fingerprint:  # what a resume checks its input against (_check_same_input)
        attrs[INPUT_FINGERPRINT] = list(items.fingerprint)
    attrs[MEMBER_BATCH] = cfg.ensemble.batch_size  # the unit of work of every run that fills it
    # coordinates: the item dim's from the input; the field's from the model's training grid
    # (a learned model), else from an input on the same grid
    coords = items.coords(coarse=cfg.model.condition == "coarse")
    grid = grid or {}
    coords.update(_grid_coords(grid, FIELD_DIMS.get(len(shape), ())))
    field_attrs = {**items.field_attrs(), **grid.get("attrs", {})}
    return StoreSpec(cfg.output.path, items.dim, items.labels, cfg.ensemble.members,
                     member_chunk(cfg.ensemble.batch_size,
                                  field_bytes(shape, DTYPES[cfg.sampler.dtype]),
                                  residual_length(cfg.sampler)),
                     variable, shape,
                     cfg.sampler.dtype, cfg.store_digest, attrs,
                     sweeps=residual_length(cfg.sampler),
                     coords=coords, item_encoding=items.item_encoding(),
                     field_attrs=field_attrs)


def check_only(only: tuple[int, ...], count: int) -> None:
    """Raise ConfigError when ``parallel.items`` (``only``) goes past the ``count`` items."""
    if any(i >= count for i in only):
        raise ConfigError(f"config: parallel.items {list(only)} goes past the {count} items of "
                          f"the input selection: use indices 0 .. {count - 1}")


def checked_items(cfg: Config, model):
    """The run's items after the checks that need the model (the run's and its dry run's):
    the sampler's grid (a scheduler's own may refuse sampler.steps), the input against the
    model, a conditioned network bound to the first item, and parallel.items."""
    grid = sampler_grid(cfg.sampler, model)
    check_step_lengths(cfg.sampler, grid)
    items = load_items(cfg, check=True, model=model)
    check_input_units(cfg, model, items)
    check_scale_fits(cfg, model, items)
    if cfg.model.condition == "coarse":
        check_orientation(items, getattr(model, "grid", {}), cfg.input.path)
        check_not_rolled(items, getattr(model, "cond_grid", {}), cfg.input.path)
    check_bound_network(cfg, model, items)
    check_only(cfg.parallel.items, len(items.labels))
    return items


# The longest step h the SDE's exponential step takes stably: in a direction the noise
# dominates (score -y) it multiplies the state by 2 - e^{h/2}, more than 1 in size past it
LONGEST_SDE_STEP = 2 * math.log(3)


def check_unread_settings(cfg: Config) -> None:
    """Warn of a setting asked of a method that does not read it (a config may carry other
    methods' settings at their defaults, which say nothing): sampler.window_split =
    "replicated" (the time slices split the window as they always do) and sampler.churn (no
    noise is added), sampler.theta other than its default (no corrector reads it),
    sampler.window (no window slides) and time slices of a sequential sampler (each runs the
    whole path)."""
    s = cfg.sampler
    if s.churn > 0 and s.method in REGISTRY and s.method != CHURNS:
        say(f"piadm: warning: sampler.churn = {s.churn:g} is read by {CHURNS} only: "
            f"sampler.method = {s.method!r} adds no churn (a store made with it keeps the "
            "setting as part of its identity; a new store may leave it at 0)")
    if s.window and s.method in REGISTRY and not REGISTRY[s.method].windowed:
        say(f"piadm: warning: sampler.window = {s.window} is read by the sliding windows only "
            f"({', '.join(m for m, e in REGISTRY.items() if e.windowed)}): sampler.method = "
            f"{s.method!r} does not read it")
    if (s.theta != Options.theta and s.method in REGISTRY
            and s.theta not in REGISTRY[s.method].thetas):
        readers = [m for m, e in REGISTRY.items() if len(e.thetas) > 1]
        say(f"piadm: warning: sampler.theta = {s.theta!r} is read by {', '.join(readers)} only: "
            f"sampler.method = {s.method!r} does not read it")
    slices = cfg.parallel.time_slices  # "auto" may give one: said where it is known
    if (s.window_split == "replicated" and s.method in REGISTRY and s.method not in REPLICABLE
            and isinstance(slices, int) and slices > 1):
        say(f"piadm: warning: sampler.window_split = \"replicated\" is read by "
            f"{' and '.join(REPLICABLE)} only: sampler.method = {s.method!r} splits its points "
            "over the time slices as always")
    if (s.method in REGISTRY and not REGISTRY[s.method].sliced and isinstance(slices, int)
            and slices > 1):
        say(f"piadm: warning: sampler.method = {s.method!r} runs the whole path on each of "
            f"the {slices} time slices of a group, which add no speed: set "
            "parallel.time_slices = 1, which makes every rank an ensemble group")


def check_step_lengths(s, grid) -> None:
    """Warn of a grid whose steps are too long for the SDE's exponential step (``s`` the
    ``[sampler]`` settings): its samples grow instead of settling (grf 8x8 at 5 steps:
    17.7 times the data's size) on every sampler of that path."""
    if REFERENCE.get(s.method) != "sequential-sde" or s.form != "exponential":
        return
    h = float((grid.u[:-1] - grid.u[1:]).max())
    if h > LONGEST_SDE_STEP:
        say(f"piadm: warning: sampler.steps = {s.steps} from u_max = {float(grid.u[0]):g} makes "
            f"SDE steps of up to h = {h:.3g}, past 2 ln 3 = {LONGEST_SDE_STEP:.3g}, where the "
            "exponential step grows the noise-dominated directions by |2 - e^(h/2)| > 1 a step "
            "and the samples come out too large: raise sampler.steps, or set sampler.form = "
            "\"eps\" (the DDPM step, which does not grow there)")


def measured_items(cfg: Config, stats: tuple):
    """The run's items, read lazily, with the (mean, std, fingerprint) ``_check_early``
    measured in its one pass over them."""
    return dataclasses.replace(load_items(cfg, check=False), mean=stats[0], std=stats[1],
                               fingerprint=stats[2])


# Past a hundredth of MOST_TRAINING_STDS, or under another name than the training's, the
# run is warned.


def check_input_units(cfg: Config, model, items) -> None:
    """Refuse an input whose values (``items``' mean and std) lie more than
    ``MOST_TRAINING_STDS`` of a learned network's training normalisation away from it: in
    another unit than the network was trained in. Warn where they lie a hundredth of that away
    or spread a tenth of that as little, or where input.variable is not the variable the
    network was conditioned on in training (another quantity of the same grid is taken as
    readily)."""
    if not cfg.input.path or getattr(model, "data_mean", None) is None:
        return  # exact models take the input's own scale; a module its own units
    mean, std = float(model.data_mean), float(model.data_std)
    far = max(abs(items.mean - mean), items.std) / std
    narrow = items.std / std  # a unit a hundred times smaller: fields of almost no spread
    where = (f"input: {cfg.input.variable} of {cfg.input.path} has mean {items.mean:.4g} and "
             f"std {items.std:.4g}, where the network's training fields had mean {mean:.4g} "
             f"and std {std:.4g} (" + (f"{far:.3g} of its standard deviations away"
                                       if far >= 1 else f"{narrow:.3g} of its spread") + ")")
    if far > MOST_TRAINING_STDS:
        raise InputError(f"{where}: the input is in another unit than the network was trained "
                         "in; convert it to that unit (or check input.variable)")
    trained = getattr(model, "condition", "")
    other = bool(trained) and trained != cfg.input.variable
    if other or far > MOST_TRAINING_STDS / 100 or narrow < 100 / MOST_TRAINING_STDS:
        said = (f"the network was conditioned on {trained!r} in training, and " if other
                else "")
        say(f"piadm: warning: {said}{where}: check that the input is the same quantity in "
            "the same unit")


# How far from the data's mean, in its standard deviations, a member's values must still fit
# the store's dtype: a sampled field's lie within ten or so of them
HEADROOM_STDS = 100


def check_scale_fits(cfg: Config, model, items) -> None:
    """Refuse a scale (``field_scale``: a learned network's training normalisation, else the
    input's mean and std) that the members would overflow ``sampler.dtype``, the store's
    dtype, in: a field of std 1e40 in float32 was sampled, then failed at its first write."""
    mean, std = field_scale(model, items.mean, items.std)
    dtype = np.dtype(cfg.sampler.dtype)  # the names are numpy's
    if abs(mean) + HEADROOM_STDS * std <= float(np.finfo(dtype).max):
        return
    whose = ("the network's training fields have" if getattr(model, "data_mean", None) is not None
             else f"input: {cfg.input.variable} of {cfg.input.path} has")
    raise InputError(f"{whose} mean {mean:.4g} and std {std:.4g}: members within "
                     f"{HEADROOM_STDS} of those standard deviations would pass what {dtype.name} "
                     f"(sampler.dtype, the store's) holds: set sampler.dtype = \"float64\", or "
                     "store the data in other units (scaled down)")


def check_bound_network(cfg: Config, model, items) -> None:
    """A conditioned network of one's own (``module``, ``diffusers``), bound to the first
    item's input, called once as ``models.module.check_output`` calls an unconditioned one:
    a network that takes no condition, or fields of another shape, is a one-line error
    before the store is made, not a traceback at its first batch."""
    if cfg.model.kind not in OWN_KINDS or cfg.model.condition == "none":
        return
    from models.module import check_output as call_once

    what = (f"model.target = {cfg.model.target!r}" if cfg.model.kind == "module" else
            f"model.path = {cfg.model.path!r}") + f" given its {cfg.model.condition} input"
    call_once(bind_first_item(cfg, model, items, "cpu"), tuple(cfg.model.shape), what,
              takes="(x, t, cond), the upsampled coarse field as its third argument (a plain "
                    "diffusers UNet2DModel takes none)")


def first_item_model(cfg: Config, model, device):
    """``model`` as the store's first item samples it: bound to that item's conditioning
    input when the model is conditioned (calibration and the bench use it), else itself.
    The store's first, not this job's (``parallel.items``): jobs that fill one store
    calibrate alike, and share the calibration their key names."""
    if not cfg.input.path:
        return model
    return bind_first_item(cfg, model, load_items(cfg, check=True, model=model), device)


def bind_first_item(cfg: Config, model, items, device):
    """``first_item_model`` with the run's ``items`` (``load_items``) already read."""
    if not cfg.input.path:
        return model
    mean, std = field_scale(model, items.mean, items.std)
    return bind_field(model, cfg.model.condition, (items.field(0) - mean) / std, device)


def bind_field(model, condition: str, field: np.ndarray | None, device):
    """``model`` given one item's conditioning ``field`` (model units, the item's shape) by
    ``condition``'s wrapper on ``device``; ``model`` itself where the item has none."""
    if field is None:
        return model
    return CONDITIONS[condition](model, torch.as_tensor(field, device=device))
