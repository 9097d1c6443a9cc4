"""Tolerance calibration: ``piadm calibrate`` and ``sampler.tol = "auto"``.

A parallel sampler's tolerance trades rounds for distance to the sequential path, and the
distance at a given tolerance depends on the model, the grid and the field size (for
pc-window it varies several-fold between seeds). Calibration runs a few members with the
sequential reference and with the parallel sampler on a ladder of tolerances, loosest first,
with the same keyed noise, and takes the loosest tolerance whose worst member distance is at
most half of ``sampler.distance``. The choice is cached (keyed by the model's hash, the
method, grid, steps, dtype, shape, the other settings that change it and the kind of device)
in ``$PIADM_CACHE/calibration.json`` (default ``~/.cache/piadm``), so later runs reuse it; so
is a ladder that fell short (``Unreachable``), until ``piadm calibrate`` measures again or a
setting in the key changes (a longer ladder, say).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models import MODELS, plugin_digest
from pipeline.cache import cache_path, not_kept, positive, read_entry, update_cache
from pipeline.comm import SerialComm
from pipeline.config import ConfigError
from pipeline.layout import arithmetic_kind
from pipeline.memory_check import TooLarge, check_memory
from pipeline.noise import Noise
from pipeline.samplers import REFERENCE, REGISTRY, SAMPLERS, Options, run_notes
from pipeline.settings import Config
from pipeline.signals import Stopped
from pipeline.watched import heard

# Calibration members are keyed apart from any ensemble's members (an item index no input
# reaches), so the choice is not tuned on the very trajectories it will produce.
CALIBRATION_ITEM = 2**40


@dataclass(frozen=True)
class Rung:
    """One tolerance tried: rounds, model calls over the sequential sampler's, worst member
    distance (relative, to the sequential path with the same noise)."""

    tol: float
    rounds: int
    calls_ratio: float
    worst: float


@dataclass(frozen=True)
class Calibration:
    """The chosen ``tol``, the ladder measured (empty when read from the cache) and where the
    choice came from: ``config``, ``calibrated``, ``cache``, ``store``, or ``unused`` (None:
    a sequential sampler); a store records ``plan`` for one the planner set."""

    tol: float | None
    rungs: tuple[Rung, ...]
    source: str


class Unreachable(ConfigError):
    """No tolerance of ``calibrate.ladder`` keeps the method within ``sampler.distance`` / 2
    of the sequential path: on this model and device the method cannot be used at that
    distance (an ``"auto"`` plan leaves it out). ``rungs``: the ladder measured, where it
    was (not when the shortfall is read from the cache)."""

    def __init__(self, message: str = "", *, rungs: tuple = (), collective: bool = False):
        super().__init__(message, collective=collective)
        self.rungs = rungs


# What leaves a sampler out of a plan or a bench rather than stopping it: no tolerance of the
# ladder was close enough, or the calibration's batch cannot fit in memory.
CANNOT_CALIBRATE = (Unreachable, TooLarge)


def cache_file() -> Path:
    """Where calibrations are kept: $PIADM_CACHE/calibration.json, else ~/.cache/piadm/."""
    return cache_path("calibration.json")


def calibration_key(cfg: Config, model_sha256: str, device) -> str:
    """What decides the calibrated tolerance: the model and every sampler setting that changes
    the path or the distance, the members tried and the ladder (not how time slices share a
    window: calibration runs on one rank), and the kind of ``device`` that computes it (a
    GPU's kernels round otherwise than a CPU's, and a learned network's distance with them)."""
    s = cfg.sampler
    if cfg.model.emulate_ms:  # its waits change no value: one calibration serves every timing
        from pipeline.run import model_digest  # (an exact model's digest holds its section)

        model_sha256 = model_digest(dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, emulate_ms=())))
    # a block's size and its sweeps' cap shape a blocked sampler's path; no other sampler's
    blocked = s.method in REGISTRY and REGISTRY[s.method].blocked
    unused = ("tol", "on_divergence", "window_split",
              *(() if blocked else ("max_sweeps", "block_size")))
    sampler = {k: v for k, v in dataclasses.asdict(s).items() if k not in unused}
    if s.method in REGISTRY and REGISTRY[s.method].windowed:  # the points it runs: 0 is 65
        sampler["window"] = REGISTRY[s.method].window_points(s.window, s.steps)
    kept = {"model_sha256": model_sha256, "shape": list(cfg.model.shape),
            "data_bound": cfg.model.data_bound, "condition": cfg.model.condition,
            # the store the path names (relative paths start at the working folder)
            "input": os.path.realpath(cfg.input.path) if cfg.input.path else "",
            "calibrate": _calibrate_key(cfg),
            "sampler": sampler}
    if cfg.model.kind not in MODELS:  # a plugin's code and files are not in its digest
        kept["plugin"] = plugin_digest(cfg.model)
    if cfg.model.kind == "module":  # its schedule and code are not in its digest (models.module)
        from models.module import SCHEDULE_KEYS, source_digest

        kept["schedule"] = {k: getattr(cfg.model, k) for k in SCHEDULE_KEYS}
        kept["source"] = source_digest(cfg.model)
    if cfg.input.path:  # calibrated on the selection's first field: which one it is
        kept["input_selection"] = [cfg.input.variable, cfg.input.item_dim,
                                   list(cfg.input.items), list(cfg.input.range)]
    if cfg.model.tf32:  # absent when off, so that earlier calibrations stay valid
        kept["tf32"] = True
    # on a CPU too: entries made before devices were keyed, a GPU's among them, have none
    kept["arithmetic"] = arithmetic_kind(device)
    recorded = _recorded_bound(cfg)
    if recorded is not None:  # S moves pc-window's corrector; the digest holds the weights alone
        kept["checkpoint_data_bound"] = recorded
    revision = REGISTRY[s.method].revision if s.method in REGISTRY else 1
    if revision > 1:  # absent at 1, so that calibrations made before revisions stay valid
        kept["revision"] = revision
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _calibrate_key(cfg: Config) -> dict:
    """The ``[calibrate]`` section as it keys a calibration: ``refine`` absent at 0, so that
    calibrations made before it existed (the ladder's rungs alone) stay valid."""
    section = dataclasses.asdict(cfg.calibrate)
    if not section["refine"]:
        del section["refine"]
    return section


def _recorded_bound(cfg: Config) -> float | None:
    """The S a checkpoint's sidecar records, where the run takes it (no ``model.data_bound``):
    ``models.export --data`` may change it in place, the checkpoint's bytes staying the same."""
    if not cfg.model.checkpoint or cfg.model.data_bound or cfg.model.kind != "unet":
        return None
    try:
        from models.checkpoint import sidecar

        bound = json.loads(sidecar(Path(cfg.model.checkpoint)).read_text()).get("data_bound")
    except (OSError, ValueError, AttributeError):  # no readable sidecar: loading the model says so
        return None
    return float(bound) if isinstance(bound, (int, float)) else None


def _valid(entry: dict) -> bool:
    """Whether a calibration cache entry holds a tolerance > 0 that its own ladder measured (a
    tolerance edited by hand alone is none of its rungs), or why the ladder fell short."""
    tol, short = entry.get("tol"), entry.get("unreachable")
    if tol is None:
        return isinstance(short, str) and bool(short)
    rungs = entry.get("ladder")
    return positive(tol) and isinstance(rungs, list) and any(
        isinstance(r, dict) and r.get("tol") == tol
        and (positive(r.get("worst")) or r.get("worst") == 0) for r in rungs)


def read_cached(key: str) -> float | None:
    """The cached tolerance for ``key``, or None (none cached or valid, or the ladder fell
    short)."""
    entry = read_entry(cache_file(), key, _valid)
    return None if entry is None or entry.get("tol") is None else float(entry["tol"])


def read_unreachable(key: str) -> str | None:
    """Why the ladder fell short for ``key`` when it was last measured, or None."""
    entry = read_entry(cache_file(), key, _valid)
    return None if entry is None or entry.get("tol") is not None else entry["unreachable"]


def write_cached(key: str, calibration: Calibration, note: str) -> bool:
    """Record a calibration; whether the cache kept it."""
    return _record(key, calibration.tol, calibration.rungs, note)


def write_unreachable(key: str, reason: str, rungs: tuple[Rung, ...], note: str) -> None:
    """Record that the ladder fell short, so that later runs need not measure it again."""
    _record(key, None, rungs, note, unreachable=reason)


def _record(key: str, tol: float | None, rungs: tuple[Rung, ...], note: str, **extra) -> bool:
    return update_cache(cache_file(), key, {
        "tol": tol, **extra, "note": note,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ladder": [dataclasses.asdict(r) for r in rungs]})


def worst_distance(y: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest relative distance of a member of y (B, *S) to its row of ref."""
    diff = (y - ref).flatten(1).double().norm(dim=1)
    return float((diff / ref.flatten(1).double().norm(dim=1)).max())


def _unreachable_fix(method: str, rungs: list[Rung]) -> str:
    """What to do when no rung came close enough. Smaller tolerances help unless the distance
    stopped falling: over tolerances 100 times apart the rounds rose, yet the later half's
    best is not half the earlier half's (a method with another fixed point, or a rounding
    floor: the dtype, TF32)."""
    early, late = rungs[: len(rungs) // 2], rungs[len(rungs) // 2:]
    best = min(early, key=lambda r: r.worst, default=None)
    flat = (best is not None and rungs[0].tol >= 100 * rungs[-1].tol
            and rungs[-1].rounds > rungs[0].rounds
            and min(r.worst for r in late) > best.worst / 2)
    if not flat:
        return "add smaller tolerances to calibrate.ladder, or raise sampler.distance"
    why = ("its corrector changes the path" if REGISTRY[method].corrector else
           "another fixed point, or a rounding floor: sampler.dtype, model.tf32")
    return (f"its distance stopped falling near {best.worst:.1e} (tol {best.tol:g}) while its "
            f"rounds rose, so smaller tolerances would not help ({why}); compare {method} with "
            f"{REFERENCE[method]} by quality (piadm bench's stat_err and w2), or raise "
            "sampler.distance")


def setting_text(s) -> str:
    """`` (window N)`` or `` (blocks of N)``: the width a calibration of the ``[sampler]``
    section ``s`` is for ("" for a sampler with neither)."""
    entry = REGISTRY[s.method]
    if entry.windowed:
        return f" (window {entry.window_points(s.window, s.steps)})"
    return f" (blocks of {min(s.block_size, s.steps)})" if entry.blocked else ""


def between(loose: float, tight: float) -> float:
    """The tolerance halfway between two rungs on a log scale, to two significant digits
    (1e-3 and 5e-4 give 7.1e-4): a number a user can read back and type."""
    return float(f"{math.sqrt(loose * tight):.1e}")


def loosest_passing(ladder, passes, refine: int, stopped=lambda: False) -> float | None:
    """The loosest tolerance that ``passes(tol, refined)``: the rungs of ``ladder`` (loosest
    first) until one passes, then ``refine`` times the tolerance halfway (``between``) to the
    looser rung that failed (``refined`` true), keeping the loosest that passes; None where no
    rung passes. A stop (``stopped``) with a tolerance between the rungs still to measure
    raises ``Stopped``: the rung that passed is not the loosest, and must not be kept."""
    for i, tol in enumerate(ladder):
        if not passes(float(tol), False):
            continue
        chosen, loose = float(tol), (float(ladder[i - 1]) if i else None)
        # the ladder's steps are a factor 2 to 2.5: a rung between the passing one and the
        # looser that failed saves a few percent of rounds and calls (grf 512x512: 1.4e-2
        # took 20 rounds at 1.25x where the rung 1e-2 took 21 at 1.31x)
        for _ in range(refine if loose is not None else 0):
            mid = between(loose, chosen)
            if not chosen < mid < loose:  # rounded onto a rung, nothing is left between
                break
            if stopped():
                raise Stopped("calibrate: stopped by a signal before the tolerances between "
                              "the rungs were measured")
            if passes(mid, True):
                chosen = mid
            else:
                loose = mid
        return chosen
    return None


def run_ladder(model, *, method: str, grid, options: Options, seed: int, dtype, device,
               noise_source: str, members: int, distance: float, ladder, refine: int,
               say=print, stopped=lambda: False, setting: str = "") -> Calibration:
    """Measure ``ladder`` (loosest first) until a tolerance keeps every member within
    ``distance / 2`` of the sequential path, then ``refine`` times the tolerance halfway
    (``between``) to the looser rung that failed, keeping the loosest that passes; ``say``
    reports each rung. ``stopped`` is asked before each rung: true raises ``Stopped`` (a rung
    takes as long as a few members' run). ``setting`` names the window or block calibrated
    (``setting_text``)."""
    noise = Noise(seed, tuple((CALIBRATION_ITEM, m) for m in range(members)), tuple(model.shape),
                  dtype, device, noise_source)
    y0 = noise.prior()
    # said before the sequential path is run: on a network that is minutes
    say(f"calibrating {method}{setting}: {members} members, {grid.steps} steps, aiming at a "
        f"worst distance <= {distance / 2:.1e} (half of sampler.distance); "
        f"{REFERENCE[method]} first")
    ref, ref_stats = SAMPLERS[REFERENCE[method]](heard(model, say, REFERENCE[method]), y0,
                                                 grid, noise, comm=SerialComm(), options=options)
    rungs = []
    say(f"{'tol':>9} {'rounds':>7} {'calls_ratio':>12} {'worst_dist':>11}")

    def measure(tol: float, note: str = ""):
        if stopped():
            raise Stopped(f"calibrate: stopped by a signal before tol {tol:g}")
        y, stats = SAMPLERS[method](heard(model, say, f"tol {tol:g}"), y0, grid, noise,
                                    comm=SerialComm(),
                                    options=dataclasses.replace(options, tol=float(tol)))
        rung = Rung(float(tol), stats.rounds, stats.model_calls / ref_stats.model_calls,
                    worst_distance(y, ref))
        rungs.append(rung)
        notes = [note] * bool(note) + run_notes(stats.fallbacks, stats.unsettled,
                                                options.max_sweeps)
        say(f"{rung.tol:>9.1e} {rung.rounds:>7} {rung.calls_ratio:>12.2f} {rung.worst:>11.2e}"
            + (f"  ({'; '.join(notes)})" if notes else ""))
        return rung, stats

    def passes(tol: float, refined: bool) -> bool:
        rung, stats = measure(tol, "between rungs" if refined else "")
        if not refined and stats.fallbacks and rung.rounds >= ref_stats.rounds:
            # redone step by step, its distance is the sequential sampler's own, at more
            # calls; the sweeps diverge before any tolerance is looked at, so would tighter
            window = "pc-window" + ("-ode" if REFERENCE[method] == "sequential-ode" else "")
            raise Unreachable(
                f"calibrate: {method}'s Picard blocks diverged at tol {rung.tol:g} and were "
                f"redone step by step: {rung.rounds} rounds, the sequential sampler's "
                f"{ref_stats.rounds}, for {rung.calls_ratio:.2f}x its calls, at any tolerance: "
                f"lower sampler.block_size, or use {window}", rungs=tuple(rungs))
        return rung.worst <= distance / 2

    chosen = loosest_passing(ladder, passes, refine, stopped)
    if chosen is not None:
        return Calibration(chosen, tuple(rungs), "calibrated")
    raise Unreachable(
        f"calibrate: no tolerance in calibrate.ladder keeps {method} within {distance / 2:.1e} "
        f"of the sequential path (tightest {ladder[-1]:g} gave {rungs[-1].worst:.1e}): "
        + _unreachable_fix(method, rungs), rungs=tuple(rungs))


def check_stored_tol(cfg: Config, stored) -> None:
    """Refuse the tolerance ``stored`` in the store at ``cfg.output.path`` (its sampler_tol
    attribute) where it is no tolerance: edited or damaged, and its members were made with
    another."""
    if not positive(stored):
        raise ConfigError(f"store {cfg.output.path}: its sampler_tol attribute is {stored!r}, "
                          "no tolerance (> 0) its members could have been made with: set it "
                          "back to the one they were made with, or write another output.path")


def resolve_tol(cfg: Config, model, *, device, stored: float | None = None, force: bool = False,
                say=print, stopped=lambda: False) -> Calibration:
    """The tolerance a run uses: the configured number; for ``"auto"`` the one its store was
    made with (``stored``), else the cached calibration, else a new one (cached). ``force``
    calibrates anew whatever the config and cache say; ``model`` is the score model to
    calibrate on (bound to a conditioning input when the model needs one); ``stopped``, asked
    between the calibration's rungs, stops it (``Stopped``)."""
    from pipeline.run import DTYPES, model_data_bound, model_digest, sampler_grid, sampler_options

    s = cfg.sampler
    if REFERENCE[s.method] == s.method:  # a sequential sampler has no tolerance
        return Calibration(None, (), "unused")
    if s.tol != "auto" and not force:
        return Calibration(s.tol, (), "config")
    if stored is not None and not force:
        check_stored_tol(cfg, stored)
        return Calibration(stored, (), "store")
    key = calibration_key(cfg, model_digest(cfg), device)
    cached = None if force else read_cached(key)
    if cached is not None:
        say(f"sampler.tol = auto: {cached:g} for {s.method}{setting_text(s)}, calibrated "
            f"earlier ({cache_file()})")
        return Calibration(cached, (), "cache")
    short = None if force else read_unreachable(key)
    if short is not None:  # the same ladder would fall short again: say so at once
        raise Unreachable(f"{short} (measured earlier, {cache_file()}; piadm calibrate "
                          "--force measures again)")
    check_memory(cfg, tuple(model.shape), torch.device(device), calibration=True)
    options = sampler_options(s, tol=0.0, data_bound=model_data_bound(model, cfg.model))
    note = f"{s.method} on {cfg.model.kind} {list(cfg.model.shape)}, {s.steps} steps"
    try:
        result = run_ladder(model, method=s.method, grid=sampler_grid(s, model),
                            options=options, seed=s.seed, dtype=DTYPES[s.dtype], device=device,
                            noise_source=s.noise, members=cfg.calibrate.members,
                            distance=s.distance, ladder=cfg.calibrate.ladder,
                            refine=cfg.calibrate.refine, say=say,
                            stopped=stopped, setting=setting_text(s))
    except Unreachable as err:
        write_unreachable(key, str(err), err.rungs, note)
        raise
    kept = write_cached(key, result, note)
    say(f"chose tol = {result.tol:g}; " + (f"cached in {cache_file()}" if kept else
                                           f"not cached ({not_kept(cache_file())})"))
    return result
