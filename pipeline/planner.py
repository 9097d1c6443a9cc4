"""``piadm plan`` and ``sampler.method = "auto"``: rank every layout by the cost model of
``pipeline.plan`` and pick the fastest.

What the cost model needs is measured on this rank's device by ``pipeline.profiling``: the
model's cost curve, and a profile of every candidate sampler setting at the run's tolerance
(calibrated and cached for ``"auto"``). The sequential sampler with ensemble groups is always
a candidate, so the plan never picks a layout it predicts to be slower. A store made by a
plan keeps its choice, and a resumed run takes it again (``pipeline.plan_store``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time

import torch

from pipeline.cache import cache_path, read_entry, update_cache
from pipeline.calibrate import CANNOT_CALIBRATE, calibration_key, resolve_tol
from pipeline.config import ConfigError, stored_as, with_settings
from pipeline.layout import cpu_threads
from pipeline.memory_check import check_memory
from pipeline.host_memory import format_bytes
from pipeline.memory import (available_bytes, field_bytes, gpus_held, ranks_sharing,
                             sampler_floor)
from pipeline.plan import (Machine, Plan, Prediction, Profile, call_items, layouts, predict,
                           rank)
from pipeline.profiling import cost_curve, profile, state_points
from pipeline.samplers import REFERENCE, REGISTRY
from pipeline.samplers.options import REPLICABLE
from pipeline.plan_store import (PLAN_KEY_ANEW, check_unplannable_store, resumed_batch_size,
                                 resumed_time_slices, stored_plan)
from pipeline.plan_text import counted, describe, table
from pipeline.settings import AUTO_METHODS, EQUAL_QUALITY, Config
from pipeline.validation import STEPS_MAX
from pipeline.store import ASKED

FAMILIES = {"auto": ("sequential-sde", "piadm-sde", "window", "pc-window"),
            "auto-ode": ("sequential-ode", "piadm-ode", "window-ode", "pc-window-ode"),
            # the sequential samplers of both orders and the work-efficient windows, at the
            # quality sequential-ode reaches in sampler.steps, each at the fewest steps of its
            # own that reach it (pipeline.equal_quality)
            "auto-quality": ("sequential-ode", "dpmpp-2m", "edm-heun", "sequential-sde",
                             "dpmpp-2m-sde", "pc-window-ode", "pc-window", "dpmpp-2m-window")}
QUALITY_REFERENCE = "sequential-ode"  # auto-quality: its quality at sampler.steps is the target

# One collective stage when the plan cannot time one (a single process): measured with MPICH
# on one node (an 8-float Allreduce over 8 ranks took 0.1 ms, three stages).
DEFAULT_LATENCY = 3e-5

# A run whose parallel.time_slices rule out a layout predicted this many times faster says so
FASTER_ELSEWHERE = 1.1


def methods_of(cfg: Config) -> tuple[str, ...]:
    """The samplers a plan weighs: the family of ``"auto"``, else the configured method and
    its sequential reference."""
    m = cfg.sampler.method
    return FAMILIES[m] if m in FAMILIES else tuple(dict.fromkeys((REFERENCE[m], m)))


def params_of(cfg: Config, method: str) -> tuple[int, ...]:
    """Window (or block) sizes to weigh: the configured one, half and twice it."""
    s = cfg.sampler
    if REFERENCE[method] == method:
        return (0,)
    entry = REGISTRY[method]
    if entry.whole_path:  # its rounds span the path: time slices cut the steps
        return (s.steps,)
    base = _configured(cfg, method)
    return tuple(sorted({_width(cfg, v) for v in (base // 2, base, 2 * base)}))


def _width(cfg: Config, points: int) -> int:
    """A window or block of ``points`` as the path can hold it: 2 .. sampler.steps."""
    return min(max(2, points), cfg.sampler.steps)


def _configured(cfg: Config, method: str) -> int:
    """The window (or block) ``cfg`` gives a windowed (or blocked) ``method``, as set."""
    s, entry = cfg.sampler, REGISTRY[method]
    return (s.window or entry.default_window) if entry.windowed else s.block_size


def _param_setting(method: str, param: int) -> dict:
    """The config key that sets a layout's window or block of ``param`` points for
    ``method`` (none for a sequential sampler or one whose rounds span the path)."""
    entry = REGISTRY[method]
    if not param or entry.whole_path:
        return {}
    if entry.windowed:
        return {"sampler.window": param}
    return {"sampler.block_size": param} if entry.blocked else {}


def _most_slices(cfg: Config, prof: Profile) -> int:
    """The most time slices ``prof``'s sampler at its window or block (and its steps, an
    equal-quality plan's own) runs on: each setting that gives a round points (a Picard
    ODE's corrector steps too) must give every slice one."""
    at = {key.removeprefix("sampler."): value
          for key, value in _param_setting(prof.method, prof.param).items()}
    s = dataclasses.replace(cfg.sampler, method=prof.method,
                            steps=prof.steps or cfg.sampler.steps, **at)
    return max(1, min(REGISTRY[prof.method].points(s).values()))


def settings(pred: Prediction) -> dict:
    """The config keys that run ``pred``'s layout."""
    lay, prof = pred.layout, pred.profile
    out = {"sampler.method": lay.method, "parallel.time_slices": lay.time_slices,
           "ensemble.batch_size": lay.batch}
    out.update(_param_setting(lay.method, lay.param))
    if lay.method in REPLICABLE:
        out["sampler.window_split"] = "replicated" if lay.replicated else "slots"
    if prof.steps:
        out["sampler.steps"] = prof.steps
    if prof.tol is not None:
        out["sampler.tol"] = prof.tol
    return out


# raised when the search for the fewest steps changes, so that its cached answers are found
# again: 2, one step tried first (a target as loose as one step's error took two)
QUALITY_SEARCH = 2


def quality_steps(cfg: Config, model, device, model_sha: str, say,
                  stopped=lambda: False) -> dict[str, int | None]:
    """``auto-quality``: for each sequential sampler of the family, the fewest steps at which
    it reaches the quality ``QUALITY_REFERENCE`` has at ``sampler.steps`` (exact W2 on a grf,
    the spectrum error on a trained U-Net: ``pipeline.equal_quality``), None when out of reach.
    Cached beside the calibrations: the search samples the model many times. ``stopped``,
    asked between samplers, ends the search (``signals.Stopped``; nothing cached)."""
    from pipeline.signals import Stopped
    from pipeline.comm import SerialComm
    from pipeline.equal_quality import fewest_steps, measure_for

    key = hashlib.sha256(json.dumps([calibration_key(cfg, model_sha, device),
                                     f"quality-steps-{QUALITY_SEARCH}",
                                     cfg.bench.quality_members]).encode()).hexdigest()
    path = cache_path("quality_steps.json")
    steps_or_none = lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
                                            and 0 < v <= STEPS_MAX)
    searched = {QUALITY_REFERENCE, *(REFERENCE[m] for m in FAMILIES[EQUAL_QUALITY])}
    # every sampler searched, or one left out would read as out of reach, and unsaid; the
    # reference at the config's steps, as the search set it (an edited file's figures would
    # be refused as the config's sampler.steps)
    cached = read_entry(path, key, lambda e: searched <= e.keys()
                        and all(map(steps_or_none, e.values()))
                        and e[QUALITY_REFERENCE] == cfg.sampler.steps)
    if cached is not None:
        say(f"  equal quality: each sampler's steps from {path}: {cached}")
        return cached
    measure = measure_for(cfg, model, tuple(model.shape), comm=SerialComm(), device=device)
    target = measure.error(QUALITY_REFERENCE, cfg.sampler.steps)
    say(f"  equal quality: {QUALITY_REFERENCE} at {cfg.sampler.steps} steps has "
        f"{measure.name} {target:.3e}; each sampler's fewest steps to reach it:")
    found: dict[str, int | None] = {QUALITY_REFERENCE: cfg.sampler.steps}
    for ref in dict.fromkeys(REFERENCE[m] for m in FAMILIES[EQUAL_QUALITY]):
        if stopped():
            raise Stopped
        if ref not in found:
            found[ref], _ = fewest_steps(lambda n, ref=ref: measure.error(ref, n), target,
                                         affordable=lambda n, ref=ref: measure.affordable(ref, n),
                                         most=measure.most, plateau=measure.plateau)
        say(f"    {ref}: {found[ref] or 'out of reach'}")
    update_cache(path, key, found)
    return found


def machine_for(ranks: int, gpus_per_node: int, device, threads: int = 0,
                latency: float = DEFAULT_LATENCY, field_points: int = 0) -> Machine:
    """The machine a plan is for: ``ranks`` on nodes of ``gpus_per_node`` GPUs (one rank per
    GPU), or all on this node's cores when 0; each rank with the torch threads the run gives
    it (``layout.cpu_threads``: a small field of ``field_points`` gets fewer)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_node = min(ranks, gpus_per_node) if gpus_per_node else ranks
    return Machine(ranks, per_node, cores or 1, cpu_threads(per_node, threads, field_points),
                   latency)


def _extremes(calls: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    return min(size for size, _ in calls), max(size for size, _ in calls)


def _batch_sizes(cfg: Config) -> tuple[int, ...]:
    members = cfg.ensemble.members
    powers = [2**k for k in range(0, members.bit_length()) if 2**k <= members]
    return tuple(sorted({*powers, min(cfg.ensemble.batch_size, members)}))


def make_plan(cfg: Config, model, device, *, ranks: int, gpus_per_node: int = 0,
              latency: float = DEFAULT_LATENCY, say=print, stopped=lambda: False,
              items: int | None = None) -> Plan:
    """Measure and rank every layout of ``cfg``'s ensemble on ``ranks`` ranks (module doc).
    ``items``: the items the run fills where the caller has counted them (``planned_items``).
    ``stopped``: a stop request, looked at between calibration rungs, equal-quality searches
    and profiles (``signals.Stopped`` is raised; the measurements finished before it stay
    cached, the one it cut short is not)."""
    from pipeline.signals import Stopped
    from pipeline.run import DTYPES, model_digest

    machine = machine_for(ranks, gpus_per_node, device, cfg.parallel.threads, latency,
                          math.prod(cfg.model.shape))  # as place_rank gives the run
    # Tolerances and steps depend on the path alone: found without the emulated waits. The
    # profiles run the model as configured, so that their host time is that of a rank whose
    # host work follows each wait for its device (docs/planning.md).
    base = getattr(model, "base", model)
    sha = model_digest(cfg)
    steps = (quality_steps(cfg, base, device, sha, say, stopped)
             if cfg.sampler.method == EQUAL_QUALITY else {})
    profiles = _profiles(cfg, model, device, ranks=ranks, sha=sha, steps=steps, say=say,
                         stopped=stopped)
    if stopped():  # before the model's cost curve is timed
        raise Stopped
    items = planned_items(cfg) if items is None else items
    runnable = [(lay, prof) for lay, prof in layouts(profiles, ranks, cfg.ensemble.members,
                                                     _batch_sizes(cfg), REPLICABLE, items)
                if lay.time_slices <= _most_slices(cfg, prof)]
    pairs = _fitting(cfg, runnable, device, machine, gpus_per_node, tuple(model.shape), say)
    # every layout's mean call, and its widest and narrowest: the curve is linear in between
    calls = lambda lay, p: [call_items(lay, n)  # noqa: E731
                            for n in (p.points, *_extremes(p.call_sizes()))]
    sizes = sorted({n for lay, p in pairs for n in calls(lay, p)})
    say(f"  timing the model at {len(sizes)} batch sizes up to {sizes[-1]}, "
        f"{machine.threads} threads")
    curve = cost_curve(model, tuple(model.shape), DTYPES[cfg.sampler.dtype], device, sizes,
                       machine.threads)
    if len(curve.sizes) < len(sizes):  # a call ran out of memory: larger ones cannot run
        if not curve.sizes:
            raise ConfigError(f"plan: one model call of {sizes[0]} items does not fit in this "
                              "device's memory: lower ensemble.batch_size or the field")
        say(f"  calls of more than {curve.sizes[-1]} items ran out of memory: the layouts that "
            "make them are left out")
        pairs = [(lay, p) for lay, p in pairs if max(calls(lay, p)) <= curve.sizes[-1]]
    one = field_bytes(tuple(model.shape), DTYPES[cfg.sampler.dtype])
    ranked = rank([predict(lay, prof, curve, machine, cfg.ensemble.members, one, items)
                   for lay, prof in pairs])
    sequential = next((p for p in ranked if REFERENCE[p.layout.method] == p.layout.method), None)
    if sequential is None:  # every layout is weighed against it (the table's vs_seq)
        raise ConfigError(f"plan: the sequential sampler, which every layout is compared with, "
                          f"has no layout whose calls fit this device's memory (calls of up to "
                          f"{curve.sizes[-1]} items ran): lower ensemble.batch_size or the field")
    return Plan(ranked, sequential, machine)


def planned_items(cfg: Config) -> int:
    """The items a run of ``cfg`` fills: its job's parallel.items, else the input selection's
    (one where it has no input); ConfigError where parallel.items goes past the selection, as
    the run refuses it (the plan had counted items that would never run)."""
    from pipeline.run_items import check_only, load_items

    count = len(load_items(cfg, check=False).labels) if cfg.input.path else 1
    if cfg.parallel.items:
        check_only(cfg.parallel.items, count)
        return len(cfg.parallel.items)
    return count


def _profiles(cfg: Config, model, device, *, ranks: int, sha: str, steps: dict, say,
              stopped) -> list[Profile]:
    """Every sampler and window or block width of the plan, each at its own tolerance
    (calibrated or cached; a sampler no tolerance serves is left out, and said), profiled on
    ``model``; ``steps``: each sequential reference's steps for equal quality, where searched."""
    from pipeline.signals import Stopped

    if cfg.parallel.time_slices != "auto":
        # a profile is the path's rounds and calls, the same on every layout: taken on one
        # slice, so that a width (or an equal-quality plan's steps) too narrow for the named
        # slices is profiled and then left out of the layouts (``_most_slices``), not
        # refused as though the user had set it
        cfg = with_settings(cfg, {"parallel.time_slices": 1})
    base = getattr(model, "base", model)
    profiles, largest = [], max(_batch_sizes(cfg))
    # a named sampler first: what refuses its own width (memory, a tolerance out of reach)
    # ends the plan before its sequential reference is profiled (116 s at 2048 x 2048)
    for method in sorted(methods_of(cfg), key=lambda m: m != cfg.sampler.method):
        mine = cfg
        if cfg.sampler.method == EQUAL_QUALITY:
            if steps.get(REFERENCE[method]) is None:
                continue  # out of reach (said when searched)
            mine = with_settings(cfg, {"sampler.steps": steps[REFERENCE[method]]})
        named = with_settings(mine, {"sampler.method": method})
        configured = _width(named, _configured(named, method))
        # the configured width first: a named sampler's plan ends at once where it has no tol
        for param in sorted(params_of(mine, method), key=lambda p: p != configured):
            # each window or block at its own tolerance: a narrower one needs a tighter tol
            own = param == configured
            # the configured width as the run keys it
            at = named if own else with_settings(named, _param_setting(method, param))
            if stopped():
                raise Stopped
            try:
                # one member's state must fit, to be profiled, before its tolerance is sought
                check_memory(at, tuple(model.shape), torch.device(device), batch=1)
                tol = resolve_tol(at, base, device=device, say=say, stopped=stopped).tol
            except CANNOT_CALIBRATE as err:
                if cfg.sampler.method not in AUTO_METHODS and own:  # the named sampler's own
                    raise
                # e.g. a device whose rounding is too coarse
                say(f"  left out {method}{f' p={param}' if param else ''}: {err}")
                continue
            smallest = max(1, math.ceil(param / min(ranks, max(1, param)))) if param else 1
            measured = []
            prof = profile(at, model, method, param, tol, device, smallest, sha,
                           mine.sampler.steps if mine is not cfg else 0, largest,
                           measuring=lambda: measured.append(True))
            say(f"  {'profiled' if measured else 'cached  '} {method:<15} "
                f"{'p=' + str(param) if param else '':<6} tol "
                f"{'-' if tol is None else format(tol, '.1e')}: {mine.sampler.steps} steps, "
                f"{prof.rounds} rounds, {prof.calls:.0f} calls a member")
            profiles.append(prof)
    return profiles


def _fitting(cfg: Config, pairs, device, machine: Machine, gpus_per_node: int, shape, say):
    """The (layout, profile) pairs whose sampler state fits in a rank's memory
    (``memory.sampler_floor`` against ``memory.available_bytes``), said when some do not; all
    of them where this device says nothing of the ranks' (a GPU plan made on a CPU)."""
    from pipeline.run import DTYPES

    device = torch.device(device)
    if gpus_per_node and device.type != "cuda":
        return pairs
    sharing = 1 if gpus_per_node else ranks_sharing(machine.ranks_per_node, device)
    room = available_bytes(device, sharing)
    if room is None:
        return pairs
    s = cfg.sampler
    one = field_bytes(shape, DTYPES[s.dtype])
    fits = [(lay, p) for lay, p in pairs if sampler_floor(
        lay.method, state_points(cfg, lay.param), lay.batch, one,
        1 if lay.replicated else lay.time_slices, s.theta) <= room[0]]
    where = f"{format_bytes(room[0])} {room[1]} per rank"
    fewer = f"run fewer than {sharing} ranks a node, or " if sharing > 1 else ""
    if not fits:
        raise ConfigError(f"plan: no layout's sampler state fits in the {where}: {fewer}lower "
                          "the field or the window")
    if not any(REFERENCE[lay.method] == lay.method for lay, _ in fits):
        # every layout is measured against it (the table's vs_seq): no plan without it
        raise ConfigError(f"plan: the sequential sampler's state, which every layout is "
                          f"compared with, does not fit in the {where} (its "
                          f"{min(s.block_size, s.steps)} points of sampler.block_size): "
                          f"{fewer}lower the field or sampler.block_size")
    if len(fits) < len(pairs):
        say(f"  left out {len(pairs) - len(fits)} layouts whose sampler state alone needs more "
            f"than the {where}")
    return fits


def planned_config(cfg: Config, model, device, *, ranks: int, gpus_per_node: int, latency: float,
                   stored: tuple[dict, int | None] | None, say=print,
                   stopped=lambda: False) -> tuple[Config, dict]:
    """Rank 0: the concrete config of an ``"auto"`` run and the store attributes that record
    the choice. A resumed store's own choice (``stored``) wins, so its members stay alike."""
    if stored is not None:
        chosen, asked = dict(stored[0]), stored[1]
        say(f"plan: the store's own choice, {chosen}")
        batch = resumed_batch_size(cfg, stored)
        if batch != chosen["ensemble.batch_size"]:  # not the store's identity: a resume may
            chosen["ensemble.batch_size"] = batch   # lower it (after running out of memory)
            say(f"plan: at ensemble.batch_size = {batch}, the config's ("
                + (f"it asked {asked} when the plan was made)" if asked is not None else
                   "the size it asked when the plan was made is not recorded)"))
        slices = resumed_time_slices(cfg, chosen, ranks)
        if slices != chosen["parallel.time_slices"]:  # nor are the time slices: any ranks
            say(f"plan: on {slices} time slice(s) of the {ranks} ranks ("
                + ("the config's" if cfg.parallel.time_slices != "auto" else
                   f"the plan's {chosen['parallel.time_slices']} do not divide them") + ")")
            chosen["parallel.time_slices"] = slices
    else:
        if cfg.parallel.time_slices != "auto":
            t = cfg.parallel.time_slices
            if ranks % t:
                raise ConfigError(f"config: parallel.time_slices = {t} does not divide the "
                                  f"{counted(ranks, 'rank')}: launch a multiple of {t}, or "
                                  "set it \"auto\"")
        plan = make_plan(cfg, model, device, ranks=ranks, gpus_per_node=gpus_per_node,
                         latency=latency, say=say, stopped=stopped)
        # only what the config leaves open: a named method stays, numbered slices stay
        ranked = [p for p in plan.ranked
                  if (cfg.parallel.time_slices == "auto"
                      or p.layout.time_slices == cfg.parallel.time_slices)
                  and (cfg.sampler.method in AUTO_METHODS
                       or p.layout.method == cfg.sampler.method)]
        if not ranked:
            raise ConfigError(f"config: no layout of {cfg.sampler.method} fits "
                              f"parallel.time_slices = {cfg.parallel.time_slices}: set it "
                              "\"auto\"")
        freer = next((p for p in plan.ranked if cfg.sampler.method in AUTO_METHODS
                      or p.layout.method == cfg.sampler.method), None)
        plan = dataclasses.replace(plan, ranked=ranked)
        say(table(plan, rows=6))
        say(describe(plan))
        if freer is not None and plan.best.seconds > FASTER_ELSEWHERE * freer.seconds:
            # `piadm plan` weighs every time-slice count, a run only the ones it is given
            say(f"plan: parallel.time_slices = \"auto\" would allow "
                f"{counted(freer.layout.groups, 'group')} x "
                f"{counted(freer.layout.time_slices, 'time slice')}, predicted "
                f"{freer.seconds:.2f} s ({plan.best.seconds / freer.seconds:.2f}x faster)")
        chosen = settings(plan.best)
    attrs = {"plan_settings": json.dumps(chosen), "plan_config_sha256": cfg.store_digest,
             ASKED: stored[1] if stored else cfg.ensemble.batch_size}
    if cfg.stored_as:  # the key a store replaced by this run records (``PLAN_KEY_ANEW``)
        attrs[PLAN_KEY_ANEW] = stored_as(cfg, ()).store_digest
    return with_settings(cfg, chosen), attrs


def collective_latency(comm, repeats: int = 20) -> float:
    """Seconds of one collective stage among ``comm``'s ranks (a median 8-float Allreduce over
    ceil(log2 ranks) stages); ``DEFAULT_LATENCY`` on one rank. Every rank calls it."""
    if comm.size == 1:
        return DEFAULT_LATENCY
    x, times = torch.zeros(8, dtype=torch.float64), []
    for _ in range(repeats):
        start = time.perf_counter()
        comm.allreduce_sum(x)
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    return float(comm.allreduce_max(torch.tensor([median]))[0]) / math.ceil(math.log2(comm.size))


def gpus_on_node(world, device) -> int:
    """Every rank (collective): the GPUs the ranks on rank 0's node hold (0 on a CPU),
    counted by their identity: a job that gives each task its own GPU (``--gpus-per-task=1``)
    shows each rank one device, which ``torch.cuda.device_count()`` took for the node's."""
    held = gpus_held(world, device)
    return len({gpu for node, gpu in held if node == held[0][0] and gpu is not None})


def resolve_plan(cfg: Config, world, device, stopped=lambda: False) -> tuple[Config, dict]:
    """Every rank: the concrete config of an ``"auto"`` run, planned on rank 0 for the world's
    ranks (the other ranks sleep meanwhile, leaving it the cores), and the store attributes
    that record the choice. ``stopped`` (rank 0's stop request) ends the planning between
    its measurements with ``signals.Stopped`` on every rank."""
    from models import build_model
    from pipeline.console import on_rank0, say, tag
    from pipeline.run_items import first_item_model

    latency = collective_latency(world)
    gpus = gpus_on_node(world, device)

    def plan_here():
        stored = stored_plan(cfg)  # a store this config made is resumed: its plan is kept
        if stored is None:
            check_unplannable_store(cfg)
        model = first_item_model(cfg, build_model(cfg.model, device), device)
        if stored is None:  # minutes of measuring before the run's own first line
            say(f"{tag(world)}piadm sample: planning the run (sampler.method = "
                f"{cfg.sampler.method!r}, parallel.time_slices = {cfg.parallel.time_slices!r}) "
                f"for {world.size} rank{'s' if world.size > 1 else ''}: piadm plan's "
                "measurements first; the choice is kept in the store")
        return planned_config(cfg, model, device, ranks=world.size, gpus_per_node=gpus,
                              latency=latency, stored=stored, stopped=stopped,
                              say=lambda text: say(tag(world) + text))

    return on_rank0(world, plan_here, idle=True)
