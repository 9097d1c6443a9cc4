"""How a sampling run starts on its store, every rank together (``start_up``): rank 0 checks
the input and the output path before the costly work (``_check_early``), settles the run's
tolerance (``run_tolerance``: a calibrated one is the store's where it has one, also where
another job of the config made the store meanwhile), and makes, opens or grows the store
(``_prepare``). A store another job of an ``"auto"`` config made meanwhile on another plan is
refused as ``PlannedElsewhere``, which the sample command meets by starting again. The run
itself is ``pipeline.ensemble``'s; how it ends, ``pipeline.run_end``'s.
"""
from __future__ import annotations

import contextlib
import functools
import json

from pipeline.calibrate import Calibration, resolve_tol
from pipeline.claimed import stop_agreed
from pipeline.console import on_rank0, print0, say
from pipeline.config import stored_as
from pipeline.errors import naming
from pipeline.identity import exact_model, growth, store_digests, stored_of, target_fate
from pipeline.layout import made_on
from pipeline.plan_store import PLAN_KEY_ANEW, PlannedElsewhere, planned_apart
from pipeline.run_items import (bind_first_item, checked_items, field_scale, first_item_model,
                                measured_items, store_spec, store_variable)
from pipeline.samplers import REFERENCE
from pipeline.settings import Config
from pipeline.store import ASKED, StoreExists, StoreSpec
from pipeline.store_attrs import read_attrs, stored_attribute
from pipeline.store_match import check_noise_of, check_output, is_stale, store_differences
from pipeline.target import open_or_create, upgrade_identity
from pipeline.validation import check_variable


def _check_early(cfg: Config, model, device) -> tuple[float, float, tuple[float, ...]]:
    """Rank 0: the input (its layout, selection and one pass over its values) and the output
    target, before the start-up's costly work; returns the input's (mean, std, fingerprint)."""
    items = checked_items(cfg, model)
    if not cfg.output.variable:  # a name from the model or the input: checked once known
        trained_on = getattr(model, "variable", None)
        check_variable(store_variable(cfg, trained_on), items.dim, len(cfg.model.shape),
                       "the model's variable" if trained_on else "input.variable")
    fate = check_output(cfg, items, device)
    held = (read_attrs(cfg.output.path) or {}) if fate in ("resume", "upgrade", "grow") else {}
    if cfg.input.path and {"input_mean", "input_std"} <= held.keys():
        # the scale its members so far were drawn with: another piadm may round the same
        # statistics of the same fields otherwise, and the rest must match them bit for bit
        return float(held["input_mean"]), float(held["input_std"]), items.fingerprint
    return items.mean, items.std, items.fingerprint


@contextlib.contextmanager
def _planned_elsewhere(world, path: str, attrs: dict):
    """Every rank: a refusal of the store at ``path`` (collective) that another job of this
    ``"auto"`` configuration made meanwhile on another plan is raised as PlannedElsewhere,
    which the sample command meets by starting again on the store's plan."""
    try:
        yield
    except StoreExists as err:
        if not err.collective or not on_rank0(world, planned_apart, path, attrs):
            raise
        raise PlannedElsewhere(path) from err


def _prepare(cfg: Config, stats: tuple, shape, trained_on, tol: Calibration,
             attrs: dict, grid: dict, scale: tuple[float, float],
             device) -> tuple[StoreSpec, str, Calibration]:
    """Rank 0's creation: open or create the store, with the input's ``stats`` (mean, std,
    fingerprint) that ``_check_early`` measured and the ``scale`` its fields are in; a store
    it resumes or grows has its noise checked as it is now (``check_noise_of``) and gives
    its calibrated tolerance (``_stored_tol``). Returns (spec, state, the run's tol)."""
    anew = attrs.get(PLAN_KEY_ANEW)
    attrs = {key: value for key, value in attrs.items() if key != PLAN_KEY_ANEW}
    items = measured_items(cfg, stats)
    spec = store_spec(cfg, items, shape, trained_on, grid, scale)
    # a tolerance the planner set (it calibrates each sampler it weighs) is its, not the config's
    planned = "sampler.tol" in json.loads(attrs.get("plan_settings", "{}"))
    source = "plan" if planned and tol.source == "config" else tol.source
    spec.attrs.update(sampler_tol=tol.tol, sampler_tol_source=source, **attrs)
    differs = functools.partial(store_differences, cfg)  # a store made meanwhile: named
    fate, legacy = target_fate(cfg, spec.attrs.get("model_sha256"),
                               overwrite=cfg.output.overwrite, differs=differs)
    if fate == "replace" and cfg.stored_as:  # a new store names the files where they are,
        # its plan's key too
        plan = {"plan_config_sha256": anew} if anew else {}
        return _prepare(stored_as(cfg, ()), stats, shape, trained_on, tol, {**attrs, **plan},
                        grid, scale, device)
    if fate == "upgrade":
        older = stored_of(cfg)
        lacked = tuple(older.lacked) if older is not None else ()
        upgrade_identity(spec.path, legacy, cfg.store_digest,
                         plan=spec.attrs.get("plan_config_sha256"), asked=spec.attrs.get(ASKED),
                         model=spec.attrs["model_sha256"] if exact_model(cfg) else None,
                         completed=older.config if lacked else None, lacked=lacked)
    state = open_or_create(spec, overwrite=cfg.output.overwrite,
                           growth=functools.partial(growth, cfg),
                           stale=functools.partial(is_stale, cfg, items),
                           differs=differs)
    if state.startswith(("resumed", "grown")):  # another job may have made it meanwhile
        check_noise_of(cfg, device)
        tol = _stored_tol(spec, tol)
    return spec, state, tol


def _stored_tol(spec: StoreSpec, tol: Calibration) -> Calibration:
    """The tolerance a resumed store's members are sampled at: a calibrated one (``"auto"``)
    is the store's, where another job of this configuration calibrated on its own and made
    the store first (the two jobs began together); the rest would have been drawn at this
    run's, on another path, unsaid."""
    held = (read_attrs(spec.path) or {}).get("sampler_tol")
    if tol.source not in ("calibrated", "cache") or not isinstance(held, (int, float)) \
            or held == tol.tol:
        return tol
    say(f"sampler.tol: the store's {held:g}, which the job that made it meanwhile calibrated "
        f"(not this run's {tol.tol:g}), so that its members share one")
    spec.attrs.update(sampler_tol=held, sampler_tol_source="store")
    return Calibration(held, (), "store")


def run_tolerance(cfg: Config, model, device, *, force: bool = False, store: bool = True,
                  stats: tuple | None = None,
                  say=say,
                  stopped=lambda: False) -> Calibration:
    """Rank 0: the tolerance of the run. For ``"auto"``: the one its store was made with (a
    resumed run; not with ``store`` False), else the cached or a new calibration (``force``:
    always new; ``stopped`` ends it between rungs, ``signals.Stopped``), on the first
    item's input when the model is conditioned (``stats``: the input's, when the run's
    checks measured them, so that the input is not read through again); ``say`` reports it."""
    s = cfg.sampler
    if REFERENCE[s.method] == s.method or (s.tol != "auto" and not force):
        return resolve_tol(cfg, model, device=device)  # the configured tol, or none at all
    stored = None if force or not store else stored_attribute(
        cfg.output.path, store_digests(cfg), "sampler_tol")
    bound = (first_item_model(cfg, model, device) if stats is None else
             bind_first_item(cfg, model, measured_items(cfg, stats), device))
    return resolve_tol(cfg, bound, device=device, stored=stored, force=force, say=say,
                       stopped=stopped)


def start_up(cfg: Config, model, world, stop, device,
             attrs: dict) -> tuple[StoreSpec, str, Calibration] | None:
    """Every rank: rank 0's checks of the input and target, the run's tolerance, then the
    store it creates or opens; returns (spec, state, tol), or None when a stop signal came
    first (nothing written)."""
    from pipeline.signals import Stopped

    with _planned_elsewhere(world, cfg.output.path, attrs):
        stats = on_rank0(world, _check_early, cfg, model, device)  # refused before calibrating
    # stopped during start-up (before, during or after a calibration): exit before writing
    if stop_agreed(world, stop):
        return None
    try:
        tol = on_rank0(world, run_tolerance, cfg, model, device, stats=stats,
                       say=lambda text: print0(world, text), stopped=lambda: bool(stop))
    except Stopped:
        return None
    if stop_agreed(world, stop):
        return None
    # a full disk met making it names no file
    with naming(cfg.output.path), _planned_elsewhere(world, cfg.output.path, attrs):
        spec, state, tol = on_rank0(world, _prepare, cfg, stats, tuple(model.shape),
                                    getattr(model, "variable", None), tol,
                                    {**attrs, "made_on": made_on(device)},
                                    getattr(model, "grid", {}), field_scale(model, *stats[:2]),
                                    device)
    return spec, state, tol
