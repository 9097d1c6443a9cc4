"""``piadm sample --dry-run``: what a run would do, as text, touching nothing."""
from __future__ import annotations

import numpy as np
import torch

from models import build_model
from pipeline.config import ConfigError, with_settings
from pipeline.done_record import done_members
from pipeline.run_items import checked_items
from pipeline.store_match import check_output
from pipeline.equal_quality import check_measurable
from pipeline.identity import growth, store_digests
from pipeline.labels import label_text
from pipeline.layout import RankGrid
from pipeline.memory_check import check_memory
from pipeline.plan_store import resumed_batch_size, resumed_time_slices, stored_plan
from pipeline.run import member_batches, model_digest
from pipeline.samplers import REFERENCE, REGISTRY
from pipeline.settings import AUTO_METHODS, EQUAL_QUALITY, Config, needs_plan
from pipeline.store import StoreExists
from pipeline.store_attrs import member_batch, stored_attribute
from pipeline.work import batch_note, call_batch, work_list


def dry_run(cfg: Config, ranks: RankGrid, device="cpu", sharing: int = 1) -> tuple[str, bool]:
    """What ``sample_to_store`` would do, as text, touching nothing: the items, members and
    batches, what the store at output.path holds, the rank layout, the sampler settings and
    the memory its state needs on ``device`` (``sharing`` ranks sharing it); and whether the
    run would go ahead (False: it would refuse the store or the batch)."""
    e = cfg.ensemble
    # the model as the run loads it (writing nothing): its checks of model.shape, the
    # conditioning, the guide, a folder's scheduler and sampler.steps on its own grid
    items = checked_items(cfg, build_model(cfg.model, device))
    planned = needs_plan(cfg)
    stored = stored_plan(cfg) if planned else None
    if stored is None and cfg.sampler.method == EQUAL_QUALITY:  # as the run's plan would
        check_measurable(cfg)
    size = e.batch_size if stored is None else resumed_batch_size(cfg, stored)
    groups, slices, shown = ranks.groups, ranks.slices.size, cfg
    if stored is not None:  # the layout and sampler the resume takes from the store's plan
        slices = resumed_time_slices(cfg, stored[0], ranks.world.size)
        groups = ranks.world.size // slices
        shown = with_settings(cfg, {**stored[0], "ensemble.batch_size": size,
                                    "parallel.time_slices": slices})
    fate, runs, unit = _store_fate(shown, items, device)
    batches = member_batches(e.members, unit or size)
    done = np.zeros((len(items.labels), e.members), dtype=bool)
    if unit:  # a store to grow holds fewer members: the rest are to sample
        found = done_members(cfg.output.path)
        done[:, : found.shape[1]] = found[:, : e.members]
    todo = len(work_list(done, batches, cfg.parallel.items))
    unit = unit or size
    lines = [
        f"items      {len(items.labels)} along {items.dim}"
        + (f" ({label_text(items.labels[0])} .. {label_text(items.labels[-1])})"
           if len(items.labels) > 1 else "")
        + (f"; this job fills {list(cfg.parallel.items)}" if cfg.parallel.items else ""),
        f"members    {e.members} per item in {len(batches)} batches of up to {unit}"
        + batch_note(unit, size)
        + (f"; {todo} (item, batch) pairs to sample" if runs else
           "; none would be sampled: the store is refused")
        + ("; with \"auto\" the planner may pick another batch size"
           if planned and stored is None else ""),
        f"store      {cfg.output.path} {fate}",
        f"ranks      {ranks.world.size} = {groups} group(s) x {slices} time "
        f"slice(s); each group takes about {-(-todo // groups)} pairs"
        + ("; \"auto\" time slices: the planner picks them"
           if planned and stored is None and cfg.parallel.time_slices == "auto"
           else "; from the store's plan" if stored is not None else ""),
        _sampler_line(shown, planned and stored is None, device,
                      resumed=fate.startswith(("would be resumed", "would be grown")))
        + ("; from the store's plan" if stored is not None else ""),
        f"model      {cfg.model.kind} {list(cfg.model.shape)}"
        + (f" from {cfg.model.checkpoint}" if cfg.model.checkpoint else "")
        + (f", autoguided by {cfg.model.guide} (weight {cfg.model.guidance:g})"
           if cfg.model.guide else ""),
    ]
    if not planned:  # else the planner leaves out the layouts that do not fit
        text, fits = _memory_line(cfg, ranks, device, sharing, size, fate)
        lines.append(text)
        runs = runs and fits
    # a calibration that measured no tolerance close enough stops the run (exit 2): so here
    runs = runs and not (not (planned and shown.sampler.method in AUTO_METHODS)
                         and _calibration_short(shown, device))
    lines.append("nothing was written (--dry-run)")
    return "\n".join(lines), runs


def _memory_line(cfg: Config, ranks: RankGrid, device, sharing: int, size: int,
                 fate: str) -> tuple[str, bool]:
    """The dry run's memory line for batches of ``size`` (and the calibration the run would
    make first), and whether they fit."""
    try:
        text = check_memory(cfg, tuple(cfg.model.shape), torch.device(device), sharing=sharing,
                            time_slices=ranks.slices.size,
                            batch=call_batch(size, cfg.ensemble.members))
        kept = fate.startswith(("would be resumed", "would be grown"))
        if _would_calibrate(cfg, device, resumed=kept):
            check_memory(cfg, tuple(cfg.model.shape), torch.device(device), calibration=True)
    except ConfigError as err:
        return f"memory     the run would stop: {err}", False
    return "memory     " + text, True


def _store_fate(cfg: Config, items, device="cpu") -> tuple[str, bool, int | None]:
    """What a run of ``cfg`` (for a resumed ``"auto"`` store, the config its plan makes)
    would do with the store at output.path, by the run's own start-up checks
    (``pipeline.store_match.check_output``), whether it would go ahead, and the store's batches
    when it would resume it (None: it would make them). ``items``: the input's selection
    (``inputs.Items``), which a resumed store must have been made with."""
    path = cfg.output.path
    try:
        fate = check_output(cfg, items, device)
    except StoreExists as err:
        return f"would be refused: {err}", False, None
    except OSError as err:  # check_writable: the folder named
        return (f"would be refused: cannot make a store in {err.filename}: {err.strerror}",
                False, None)
    if fate in ("resume", "upgrade", "grow"):
        kept = stored_attribute(path, store_digests(cfg), "sampler_tol")
        if (kept is not None and cfg.sampler.tol == "auto"  # the run's own check
                and REFERENCE[cfg.sampler.method] != cfg.sampler.method):
            from pipeline.calibrate import check_stored_tol

            try:
                check_stored_tol(cfg, kept)
            except ConfigError as err:
                return f"would be refused: {err}", False, None
        done = done_members(path)  # none past the store's count, whatever its arrays hold
        total = done.shape[0] * cfg.ensemble.members
        grown = (f"grown from {growth(cfg).made} to {cfg.ensemble.members} members"
                 if fate == "grow" else "resumed")
        return (f"would be {grown}: {int(done.sum())} of {total} members done"
                + ("; an older piadm made it, and its identity would be brought up to date"
                   if fate == "upgrade" else ""), True,
                member_batch(path))
    return {"create": "would be created",
            "replace": ("was made by another configuration, or from other model files, "
                        "noise or input: output.overwrite = true would replace it")}[fate], True, None


def _would_calibrate(cfg: Config, device, resumed: bool) -> bool:
    """Whether the run would measure its tolerance first: ``"auto"``, with none kept by the
    store it resumes nor cached (an unreachable ladder stops it before it measures)."""
    from pipeline.calibrate import calibration_key, read_cached, read_unreachable

    s = cfg.sampler
    if s.tol != "auto" or REFERENCE[s.method] == s.method:
        return False
    kept = stored_attribute(cfg.output.path, store_digests(cfg), "sampler_tol")
    if resumed and kept is not None:
        return False
    key = calibration_key(cfg, model_digest(cfg), device)
    return read_cached(key) is None and read_unreachable(key) is None


def _window(s) -> str:
    """The window a run slides: sampler.window (its sampler's default when 0), at most the
    steps."""
    points = REGISTRY[s.method].window_points(s.window, s.steps)
    asked = s.window or REGISTRY[s.method].default_window
    given = f"sampler.window {asked}" if s.window else f"the default window {asked}"
    return (f", window {points}" + ("" if s.window else " (its default)") if points == asked
            else f", window {points} ({given} is cut to the {s.steps} steps)")


def _calibration_short(cfg: Config, device) -> bool:
    """Whether ``cfg``'s ``tol = "auto"`` finds in the cache that no tolerance of its ladder
    was close enough (the run would stop, as ``piadm calibrate`` did)."""
    from pipeline.calibrate import calibration_key, read_unreachable

    s = cfg.sampler
    if s.tol != "auto" or REFERENCE[s.method] == s.method:
        return False
    return read_unreachable(calibration_key(cfg, model_digest(cfg), device)) is not None


def _sampler_line(cfg: Config, planned: bool, device, resumed: bool = False) -> str:
    """The sampler settings a run would use; for an ``"auto"`` one, who picks them."""
    from pipeline.calibrate import cache_file, calibration_key, read_cached, read_unreachable

    s = cfg.sampler
    if planned and s.method in AUTO_METHODS:
        picks = (", its window and the time slices" if cfg.parallel.time_slices == "auto" else
                 f" and its window (on the {cfg.parallel.time_slices} time slice(s) set)")
        return (f"sampler    {s.method}: the planner picks the method{picks} "
                f"at start-up (`piadm plan CONFIG --ranks N` prints its table), "
                f"{s.steps} steps on the {s.grid} grid, {s.dtype}, seed {s.seed}")
    tol = s.tol if REFERENCE[s.method] != s.method else "none (a sequential sampler)"
    kept = (stored_attribute(cfg.output.path, store_digests(cfg), "sampler_tol")
            if tol == "auto" and resumed else None)
    if kept is not None:  # as run_tolerance: a resumed store keeps its own
        tol = f"auto: {kept:g}, the store's (it keeps the tolerance it was made with)"
    elif tol == "auto":
        key = calibration_key(cfg, model_digest(cfg), device)
        cached, short = read_cached(key), read_unreachable(key)
        tol = (f"auto: {cached:g}, calibrated earlier ({cache_file()})" if cached is not None
               else f"auto: no tolerance of calibrate.ladder was close enough when measured "
                    f"({cache_file()}): the run would stop" if short is not None
               else "auto: would be calibrated first (piadm calibrate)")
    return (f"sampler    {s.method}, {s.steps} steps on the {s.grid} grid (u {s.u_min:g} .. "
            f"{s.u_max:g}), {s.dtype}, {s.noise} noise, seed {s.seed}, tol {tol}"
            + (_window(s) if REGISTRY[s.method].windowed else "")
            + (f", blocks of {s.block_size}" if REGISTRY[s.method].blocked else ""))
