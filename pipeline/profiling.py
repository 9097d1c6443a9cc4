"""Profiles for ``piadm plan``: what one sampler setting costs on this rank's device.

A profile holds the rounds and model calls of one member at the run's tolerance, the
sampler's own host seconds a round at the full window and at the smallest share a time slice
would hold, and how that host time grows with the members of a batch (and the batch's
rounds with them); the cost curve holds one model call's wall and busy seconds against its
batch size. Profiles are cached beside the calibrations (``$PIADM_CACHE/profiles.json``);
``pipeline.planner`` weighs them into a plan.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections import Counter

import torch

from models.emulate import Emulated
from pipeline.cache import cache_path, positive, read_entry, update_cache
from pipeline.calibrate import CALIBRATION_ITEM, calibration_key
from pipeline.comm import SerialComm
from pipeline.errors import is_out_of_memory
from pipeline.layout import machine_kind
from pipeline.memory import available_bytes, field_bytes, sampler_floor
from pipeline.noise import Noise
from pipeline.plan import CostCurve, Profile
from pipeline.samplers import REFERENCE, REGISTRY, SAMPLERS
from pipeline.settings import Config

# Part of a profile's cache key: a profile of another version has other fields or another
# meaning (2: the calls by batch size; 3: host time measured around the emulated device's
# waits; 4: the window samplers' rounds take less host time; 5: one rank scans its window in
# one pass; 6: the host time's growth with the batch; 7: and a batch's rounds; 8: an emulated
# model's host time timed between its waits on a run cut short; 9: the learned corrector's
# third collective a round; 10: and its fourth), so it is measured again rather than read.
PROFILE_VERSION = 10

# A profile's host time is measured on one member and, for a plan of larger batches, again
# on as many members as its largest batch, at most GROWTH_BATCH and as many as a run of
# GROWTH_SECONDS affords (the one member's run times the members), at least GROWTH_LEAST:
# the host time is taken as linear in the members through the two (docs/planning.md).
GROWTH_BATCH = 64
GROWTH_SECONDS = 10.0
GROWTH_LEAST = 4

# An emulated model's host time is timed between its waits over at least TIMED_SECONDS and
# TIMED_LEAST intervals between calls (or the whole run, where shorter), not over the run.
# Its waits there last as the device's but at most TIMED_WAIT: host work that follows a wait
# is slower than back to back (docs/planning.md), and a wait that long has lost what it loses.
TIMED_SECONDS = 2.0
TIMED_LEAST = 4
TIMED_WAIT = 0.25

class _Timed:
    """A model whose calls are timed (``seconds``), synchronising an accelerator first, and
    counted by batch size (``sizes``)."""

    def __init__(self, model, device):
        self.model, self.device, self.seconds = model, torch.device(device), 0.0
        self.sizes: Counter = Counter()
        self.start = 0.0  # when the sampler was called (``_sample``)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, u):
        _synchronize(self.device)  # the work queued before the call is not the model's
        start = time.perf_counter()
        self.sizes[x.shape[0]] += 1
        out = self.model(x, u)
        _synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return out


def _synchronize(device) -> None:
    """Wait for the work queued on an accelerator ``device`` (none on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile_file():
    return cache_path("profiles.json")


def _run_one(cfg: Config, model, method: str, param: int, tol, device, steps: int,
             members: int = 1):
    """(Stats, host seconds a round, (points, count) of its model calls, wall seconds) of
    ``members`` members sampled together by ``method`` at ``param`` over ``steps`` steps.

    An emulated model (``models.emulate``) runs the path on the model it emulates, without
    its waits, then the host time is timed between the waits of a run cut short
    (``_timed_host``): the waits change no value, and a whole run of them cost the plan
    minutes of sleep (docs/planning.md). The wall seconds are then the path's, without the
    waits: what a run of more members costs."""
    emulated = isinstance(model, Emulated)
    stats, host, sizes, wall, calls = _sample(cfg, model.base if emulated else model, method,
                                              param, tol, device, steps, members)
    if emulated:
        host = _timed_host(cfg, model, method, param, tol, device, steps, members, stats,
                           calls)
    return stats, host, sizes, wall


def _sample(cfg: Config, model, method: str, param: int, tol, device, steps: int, members: int,
            timed=None):
    """(Stats, host seconds a round, call sizes, wall seconds, model calls made) of one run
    (``_run_one``) through ``timed`` (a ``_Timed`` of ``model`` when None)."""
    from pipeline.run import DTYPES, model_data_bound, sampler_grid, sampler_options

    s = cfg.sampler
    s = dataclasses.replace(s, steps=steps, method=method,
                            window=param if REGISTRY[method].windowed else s.window,
                            block_size=param if REGISTRY[method].blocked else s.block_size)
    options = sampler_options(s, tol=tol, data_bound=model_data_bound(model, cfg.model))
    noise = Noise(s.seed, tuple((CALIBRATION_ITEM, m) for m in range(members)),
                  tuple(model.shape), DTYPES[s.dtype], device, s.noise)
    timed = _Timed(model, device) if timed is None else timed
    start = timed.start = time.perf_counter()
    _, stats = SAMPLERS[method](timed, noise.prior(), sampler_grid(s, model), noise,
                                comm=SerialComm(), options=options)
    wall = time.perf_counter() - start
    return (stats, max(0.0, wall - timed.seconds) / stats.rounds,
            tuple(sorted(timed.sizes.items())), wall, sum(timed.sizes.values()))


class _Enough(Exception):
    """Raised by ``_Cut`` to end a run whose host time has been timed long enough."""


class _Cut(_Timed):
    """A ``_Timed`` emulated model that times the sampler's set-up before its first call
    (``setup``) and the host work between its calls (``between``, over ``intervals``), and
    ends the run (``_Enough``) before the call that makes the timing at least
    ``TIMED_SECONDS`` long over at least ``TIMED_LEAST`` intervals. Its calls wait as the
    emulated device's do, but at most ``TIMED_WAIT`` seconds."""

    def __init__(self, model: Emulated, device):
        super().__init__(model.base, device)
        self.emulated, self.first, self.between, self.intervals = model, None, 0.0, 0
        self.setup = 0.0

    def __call__(self, x, u):
        _synchronize(self.device)  # the round's work queued on an accelerator is host work
        now = time.perf_counter()
        if self.first is None:
            self.first, self.setup = now, now - self.start
        else:
            self.intervals += 1
            self.between = now - self.first - self.seconds
            if self.intervals >= TIMED_LEAST and now - self.first >= TIMED_SECONDS:
                raise _Enough
        out = self.model(x, u)
        _synchronize(self.device)
        rest = min(self.emulated.seconds(x.shape[0]), TIMED_WAIT) - (time.perf_counter() - now)
        if rest > 0:
            time.sleep(rest)
        self.seconds += time.perf_counter() - now
        return out


def _timed_host(cfg: Config, model, method: str, param: int, tol, device, steps: int,
                members: int, stats, calls: int) -> float:
    """Host seconds a round of ``method`` through the emulated ``model`` on its path of
    ``stats.rounds`` rounds and ``calls`` model calls: the set-up and the host work between
    calls, timed until ``_Cut`` has enough (or the run ends), as on the whole path."""
    cut = _Cut(model, device)
    try:
        _sample(cfg, model, method, param, tol, device, steps, members, timed=cut)
    except _Enough:
        pass
    between = max(0.0, cut.between) / cut.intervals * (calls - 1) if cut.intervals else 0.0
    return (cut.setup + between) / stats.rounds


def _host_growth(cfg: Config, model, method: str, param: int, tol, device, batch: int,
                 host: float, wall: float) -> tuple[int, float, int]:
    """(members, growth, rounds): how many times a round's host work, ``host`` seconds for one
    member (whose run took ``wall``: an emulated model's without its waits, ``_run_one``),
    grows at ``members`` members sampled together: at most ``batch``, as many as
    ``GROWTH_SECONDS`` afford, and the batch's rounds; (1, 1.0, 0) where fewer than
    ``GROWTH_LEAST`` are (a model that costly leaves the host work a small part) or fit in
    half the device's free memory. Much of it grows with the members: the keyed noise is
    drawn per member and step."""
    from pipeline.run import DTYPES

    members = min(batch, int(GROWTH_SECONDS // max(wall, 1e-9)))
    device = torch.device(device)
    room = available_bytes(device)
    one = sampler_floor(method, state_points(cfg, param), 1,
                        field_bytes(tuple(model.shape), DTYPES[cfg.sampler.dtype]),
                        theta=cfg.sampler.theta)
    if room is not None:  # half of what is free: the model's own calls need room too
        members = min(members, room[0] // (2 * max(1, one)))
    if members < min(batch, GROWTH_LEAST) or members < 2 or host <= 0:
        return 1, 1.0, 0
    try:
        stats, many, _, _ = _run_one(cfg, model, method, param, tol, device, cfg.sampler.steps,
                                     members)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        return 1, 1.0, 0  # the plan's own memory check weighs the layouts (_fitting)
    finally:
        if device.type == "cuda":  # else the cache it leaves reads as used to later checks
            torch.cuda.empty_cache()
    return members, max(1.0, many / host), stats.rounds


def state_points(cfg: Config, param: int) -> int:
    """The points a member's sampler state holds at window or block ``param`` (0: a
    sequential sampler, which holds a block's noise at a time)."""
    return param or min(cfg.sampler.block_size, cfg.sampler.steps)


def profile(cfg: Config, model, method: str, param: int, tol, device, smallest: int,
            model_sha: str, steps: int = 0, batch: int = 1,
            measuring=lambda: None) -> Profile:
    """Measure (or read from the cache) the profile of ``method`` at ``param``; ``smallest``
    is the fewest points a time slice would hold, where the host time is measured again;
    ``steps``: the steps ``cfg`` runs, recorded when they are not the user's (0); ``batch``:
    the most members a batch of the plan holds, up to which (at most ``GROWTH_BATCH``) the
    host time's growth is measured (``_host_growth``, cached per batch in the entry);
    ``measuring`` is called before anything is measured."""
    key = hashlib.sha256(json.dumps([calibration_key(cfg, model_sha, device), method, param, tol,
                                     smallest, str(device), machine_kind(device),
                                     list(cfg.model.emulate_ms),
                                     PROFILE_VERSION, REGISTRY[method].revision]
                                    ).encode()).hexdigest()
    entry = read_entry(_profile_file(), key, _valid_profile)
    measured = entry is None
    if measured:
        measuring()
        stats, host, sizes, wall = _run_one(cfg, model, method, param, tol, device,
                                            cfg.sampler.steps)
        points = math.ceil(stats.model_calls / stats.rounds)
        host_points, hosts = [points], [host]
        if smallest < points:  # the host work of a rank that holds a small share of the window
            _, small, _, _ = _run_one(cfg, model, method, smallest, tol, device,
                                      min(cfg.sampler.steps, 20 * smallest))
            host_points, hosts = [smallest, points], [small, host]
        entry = {"rounds": stats.rounds, "calls": stats.model_calls, "host_points": host_points,
                 "host": hosts, "collectives": 0 if REFERENCE[method] == method else
                 REGISTRY[method].round_collectives(),
                 "calls_by_size": sizes, "wall": wall, "grown": {}}
    batch = min(batch, GROWTH_BATCH)
    if batch > 1 and str(batch) not in entry["grown"]:
        if not measured:
            measuring()
        entry["grown"][str(batch)] = _host_growth(cfg, model, method, param, tol, device, batch,
                                                  entry["host"][-1], entry["wall"])
        measured = True
    if measured:
        update_cache(_profile_file(), key, entry)
    host_batch, growth, rounds = entry["grown"].get(str(batch), (1, 1.0, 0))
    return Profile(method, param, tol, entry["rounds"], entry["calls"],
                   tuple(entry["host_points"]), tuple(entry["host"]), entry["collectives"],
                   steps, tuple(map(tuple, entry["calls_by_size"])), host_batch, growth, rounds)


# what a profile's "collectives" may hold: a sequential sampler's 0, or a round's count
_COLLECTIVES = {0} | {r.round_collectives() for r in REGISTRY.values()}


def _valid_profile(entry: dict) -> bool:
    """Whether a profile cache entry holds what ``profile`` reads, as numbers."""
    grown = entry["grown"]
    # a run takes a round and a call a member at least (calls 1e-9 read as "0 calls a member")
    return (positive(entry["rounds"]) and positive(entry["calls"]) and positive(entry["wall"])
            and entry["rounds"] >= 1 and entry["calls"] >= 1
            and len(entry["host_points"]) == len(entry["host"]) > 0
            and all(positive(v) for v in entry["host_points"])
            and all(positive(v) or v == 0 for v in entry["host"])  # written as max(0, ...)
            and entry["collectives"] in _COLLECTIVES and isinstance(grown, dict)
            and all(len(v) == 3 and all(positive(x) or x == 0 for x in v)
                    for v in grown.values())
            and all(len(pair) == 2 and all(positive(x) for x in pair)
                    for pair in entry["calls_by_size"])
            # interpolated between: a size given twice would divide by zero
            and _increasing(entry["host_points"])
            and _increasing([pair[0] for pair in entry["calls_by_size"]]))


def _increasing(values) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


def cost_curve(model, shape, dtype, device, sizes, threads: int, repeats: int = 3) -> CostCurve:
    """Time one model call at each batch size (the least of ``repeats``), with ``threads``
    torch threads; busy is the CPU time spent, per thread, capped at the wall time. It stops
    at the first size that runs out of memory (its sizes are then fewer than asked). An
    emulated model's calls are its base model's, timed, lengthened to its waits without
    sleeping through them: a call sleeps only to reach ``model.seconds(n)``, so that is the
    least wall time it takes, and the CPU time is the base model's."""
    if isinstance(model, Emulated):
        base = cost_curve(model.base, shape, dtype, device, sizes, threads, repeats)
        walls = [max(wall, model.seconds(n)) for n, wall in zip(base.sizes, base.wall)]
        return CostCurve(base.sizes, tuple(walls), base.busy)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    walls, busies = [], []
    try:
        for n in sizes:
            try:
                x = torch.randn((n, *shape), dtype=dtype, device=device)
                u = torch.full((n,), 1.0, dtype=dtype, device=device)
                model(x, u)  # warm-up: allocation, kernel choice
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                x = u = None
            if x is None:  # emptied here, once the failed call's frames (its tensors) are gone
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
                break  # the curve stops at the largest call that fits (make_plan says so)
            best = (math.inf, math.inf)
            for _ in range(repeats):
                wall0, cpu0 = time.perf_counter(), time.process_time()
                model(x, u)
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize(device)
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                best = min(best, (wall, min(wall, cpu / threads)))
            walls.append(best[0])
            busies.append(best[1])
    finally:
        torch.set_num_threads(before)
    return CostCurve(tuple(sizes[: len(walls)]), tuple(walls), tuple(busies))
