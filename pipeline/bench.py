"""``piadm bench``: sequential against parallel samplers on the same model, noise and steps.

Under ``mpiexec -n N`` every rank is a time slice of one group (the latency of one batch).
Columns: the method's tolerance (after calibration for ``sampler.tol = "auto"``), parallel
rounds, model calls per member and their ratio to the sequential sampler's, the relative
distance to the sequential path with the same noise (``rel_dist``), the error of the
ensemble's statistics against an exact model's target (``stat_err``: spectrum error for grf,
mode-weight error for gmm), wall seconds (slowest rank; min and median over
``bench.repeats``), the share of that time in collectives, the share that is the
collectives' own (the rest is waiting for slower ranks) and the peak memory. Under MPI the
JSON rows also split that waiting: ``model_wait_share`` is the part spent waiting while the
last rank to arrive was in more model calls than this one (a path's last rounds leave some
ranks without window points), the rest waits for other ranks' host work. With
``bench.seeds`` > 1 every method runs on each noise seed, and a ``worst`` row per method
gives the largest rounds, calls and distance over the seeds."""
from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

import torch

from models import CHANNEL_KINDS, STAT_ERRORS, build_model
from pipeline.bench_tables import read_tables, revisions
from pipeline.bench_timing import timed_run
from pipeline.console import on_rank0, out0, print0
from pipeline.errors import ConfigError
from pipeline.jsontext import json_text
from pipeline.memory_check import check_memory
from pipeline.noise import Noise
from pipeline.processes import replace_text
from pipeline.run import (DTYPES, model_data_bound, sampler_grid, sampler_options,
                          unbounded_note)
from pipeline.quality import DETERMINISTIC, STOCHASTIC, draws_noise, grf_w2
from pipeline.samplers import REFERENCE, REGISTRY, SAMPLERS, run_notes
from pipeline.samplers.options import REPLICABLE
from pipeline.settings import Config

# An SDE sampler's exact W2 takes one run per step (pipeline.quality): steps^2 * d point-steps,
# kept under about a minute of CPU (1000 steps at 64 x 64).
W2_SDE_BUDGET = 1000**2 * 64 * 64


def _w2_affordable(method: str, steps: int, shape, options) -> bool:
    """Whether bench reports ``method``'s exact W2 on ``steps`` steps of a grf of ``shape``."""
    if not draws_noise(method, options):
        return True
    return method in STOCHASTIC + DETERMINISTIC and steps**2 * math.prod(shape) <= W2_SDE_BUDGET


def _row(method, seed, tol, ranks, steps, d, stats, ref_calls, dist, err, timing, *,
         w2=None) -> dict:
    walls, comm_s, own_s, model_wait_s, peak = timing
    wall = min(walls)
    return {"method": method, "seed": seed, "tol": tol, "ranks": ranks, "steps": steps, "d": d,
            "rounds": stats.rounds, "model_calls": round(stats.model_calls, 1),
            "calls_ratio": round(stats.model_calls / ref_calls, 3), "rel_dist": dist,
            "stat_err": err, "w2": w2, "wall_s": round(wall, 3),
            "wall_med_s": round(statistics.median(walls), 3), "repeats": len(walls),
            "comm_share": round(comm_s / wall, 4) if wall else 0.0,
            "own_share": round(own_s / wall, 4) if wall else 0.0,
            "model_wait_share": (None if model_wait_s is None else
                                 round(model_wait_s / wall, 4) if wall else 0.0),
            "peak_mib": round(peak / 2**20, 1), "fallbacks": stats.fallbacks,
            "unsettled": stats.unsettled}


def worst_row(rows: list[dict]) -> dict:
    """The worst over seeds of one method's rows: largest rounds, calls and distance."""
    out = dict(rows[-1], seed="worst", collectives={})
    for key in ("rounds", "model_calls", "calls_ratio", "rel_dist", "stat_err", "w2", "wall_s",
                "wall_med_s", "comm_share", "own_share", "model_wait_share", "peak_mib"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = max(values) if values else None
    return out


def _format(row: dict) -> str:
    dist = "-" if row["rel_dist"] is None else f"{row['rel_dist']:.2e}"
    err = "-" if row["stat_err"] is None else f"{row['stat_err']:.3e}"
    w2 = "-" if row.get("w2") is None else f"{row['w2']:.3e}"
    tol = "-" if row["tol"] is None else f"{row['tol']:.1e}"
    return (f"{row['method']:<15} {row['seed']!s:>5} {tol:>7} {row['ranks']:>5} {row['steps']:>6} "
            f"{row['d']:>9} {row['rounds']:>7} {row['model_calls']:>12.1f} "
            f"{row['calls_ratio']:>11.2f} {dist:>9} {err:>9} {w2:>9} {row['wall_s']:>8.2f} "
            f"{row['wall_med_s']:>10.2f} {row['comm_share']:>10.3f} {row['own_share']:>9.3f} "
            f"{row['peak_mib']:>9.1f}")


# What each column of the table means, a line each under "columns:"
LEGEND = "\n".join(["columns:", *(f"  {name:<12} {meaning}" for name, meaning in (
    ("rounds", "sequential batched model calls (the parallel depth)"),
    ("calls_ratio", "model calls over those of the sequential sampler whose path it follows "
                    "(a sequential solver's own: 1, Heun's two calls a step included)"),
    ("rel_dist", "|y - y_seq| / |y_seq| against that path with the same noise"),
    ("stat_err", "the ensemble statistics' error against the exact model's target (grf: "
                 "spectrum, gmm: mode weights)"),
    ("w2", "the exact Wasserstein-2 distance of a sequential sampler's law to the grf "
           "target, relative (docs/algorithms.md section 7)"),
    ("wall_s", "wall time, the fastest of bench.repeats"),
    ("wall_med_s", "wall time, the median of bench.repeats"),
    ("comm_share", "time in collectives over wall time in the fastest repeat (the rank that "
                   "spent most)"),
    ("own_share", "the collectives' own time over wall time: per call the least any rank "
                  "spent in it, as the last rank to arrive waits for no other (the rest is "
                  "waiting for slower ranks)"),
    ("peak_mib", "memory added above the run's start, on the rank that added most"))
)])


def header() -> str:
    """The column names of ``format_row``'s lines, aligned with them."""
    return (f"{'method':<15} {'seed':>5} {'tol':>7} {'ranks':>5} {'steps':>6} {'d':>9} "
            f"{'rounds':>7} {'model_calls':>12} {'calls_ratio':>11} {'rel_dist':>9} "
            f"{'stat_err':>9} {'w2':>9} {'wall_s':>8} {'wall_med_s':>10} {'comm_share':>10} "
            f"{'own_share':>9} {'peak_mib':>9}")


def method_tolerances(cfg: Config, model, *, comm, device) -> dict[str, float | None]:
    """The tolerance each bench method runs with: the configured one, or for "auto" each
    parallel method's own calibration (rank 0 calibrates, every rank gets the result). A
    method whose ``bench.members`` or calibration cannot fit in memory, or whose calibration
    falls short of ``sampler.distance``, is said and left out."""
    from pipeline.calibrate import CANNOT_CALIBRATE, resolve_tol

    from pipeline.memory import memory_sharing

    sharing = memory_sharing(comm, device)  # collective: before rank 0 alone checks
    out = {}
    for method in cfg.bench.methods:
        mine = dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, method=method))
        key, points = min(REGISTRY[method].points(mine.sampler).items(), key=lambda kv: kv[1])
        # a rank of no points would call the model on nothing (a sequential sampler runs
        # whole on every rank)
        if REGISTRY[method].sliced and points < comm.size:
            more = "sampler.steps" if points == cfg.sampler.steps else f"sampler.{key}"
            plural = "s" if points != 1 else ""
            print0(comm, f"left out {method}: its rounds have {points} point{plural} "
                         f"(sampler.{key}), fewer than the {comm.size} ranks, each a time "
                         f"slice: launch at most {points} rank{plural}, or raise {more}")
            continue
        try:
            on_rank0(comm, check_memory, mine, tuple(model.shape), device, sharing=sharing,
                     time_slices=comm.size, batch=cfg.bench.members, setting="bench.members")
            out[method] = on_rank0(comm, resolve_tol, mine, model, device=device,
                                   say=lambda text: print0(comm, text)).tol
        except CANNOT_CALIBRATE as err:  # the other methods are still worth their rows
            print0(comm, f"left out {method}: {err}")
    return out


def model_shape(model, size: tuple[int, ...]) -> tuple[int, ...]:
    """The ``model.shape`` that bench size ``size`` stands for: a network's leading (channel)
    axes are kept, so that ``bench.sizes`` name a field's sizes alone, [[32, 32]] for a
    model of shape [1, 16, 16]."""
    extra = len(model.shape) - len(size)
    if model.kind in CHANNEL_KINDS and extra > 0:
        return tuple(model.shape[:extra]) + tuple(size)
    return tuple(size)


def shaped_model(cfg: Config, size: tuple[int, ...], device) -> tuple[Config, object]:
    """``cfg`` at bench size ``size`` (``model_shape``) and its model, built."""
    shape = model_shape(cfg.model, size)
    shaped = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, shape=shape))
    return shaped, build_model(shaped.model, device)


def bench_shape(cfg: Config, shape: tuple[int, ...], *, comm,
                device: torch.device = torch.device("cpu"), name_bound: bool = True,
                built: tuple[Config, object] | None = None,
                none_left: bool = False) -> list[dict]:
    """Run every bench method on one field shape for each of ``bench.seeds`` noise seeds, its
    blocks split over ``comm``'s ranks; returns one row per method and seed (and a worst row
    per method over several seeds). ``name_bound``: first print the field's S, when it has one
    (off for callers that bench one shape method by method); ``built``: ``shaped_model``'s
    answer for the shape, when the caller has it; ``none_left``: no rows, rather than an error,
    when every method is left out (a caller benching one method at a time goes on)."""
    from pipeline.run_items import first_item_model

    shaped, model = built or shaped_model(cfg, shape, device)
    shape = shaped.model.shape
    model = first_item_model(shaped, model, device)
    s = cfg.sampler
    tolerances = method_tolerances(shaped, model, comm=comm, device=device)
    if not tolerances and none_left:
        return []
    if not tolerances:
        raise ConfigError(f"bench: every method of bench.methods was left out on the "
                          f"{'x'.join(map(str, shape))} field (said above): nothing to bench",
                          collective=True)
    grid = sampler_grid(s, model)
    bound = model_data_bound(model, cfg.model)
    if name_bound:
        _say_bound(comm, shape, bound, tolerances)
    stat_error = STAT_ERRORS.get(cfg.model.kind)  # exact models only: a learned one has none
    methods = sorted(tolerances, key=lambda m: m not in REFERENCE.values())
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    w2s: dict[str, float | None] = {}
    exact_law = cfg.model.kind == "grf" and cfg.model.condition == "none"
    for seed in range(s.seed, s.seed + cfg.bench.seeds):
        noise = Noise(seed, tuple((0, m) for m in range(cfg.bench.members)), tuple(shape),
                      DTYPES[s.dtype], device, s.noise)
        y0 = noise.prior()
        references: dict[str, tuple] = {}
        for method in methods:
            options = sampler_options(s, tol=tolerances[method], data_bound=bound)
            y, stats, timing, collectives = timed_run(
                SAMPLERS[method], model, y0, grid, noise, comm=comm, options=options,
                device=device, repeats=cfg.bench.repeats)
            ref_name = REFERENCE[method]
            if method == ref_name:
                references[method] = (y, stats)
            if ref_name not in references:
                references[ref_name] = SAMPLERS[ref_name](model, y0, grid, noise, comm=comm,
                                                          options=options)
            ref, ref_stats = references[ref_name]
            dist = None if method == ref_name else float((y - ref).norm() / ref.norm())
            err = (None if stat_error is None
                   else stat_error(model, y.to(torch.float64), s.u_min, s.denoise_final))
            if method not in w2s:  # the law's, so once for every seed
                affordable = exact_law and _w2_affordable(method, s.steps, shape, options)
                w2s[method] = grf_w2(model, method, grid, options) if affordable else None
            row = _row(method, seed, tolerances[method], comm.size, s.steps, math.prod(shape),
                       stats, ref_stats.model_calls, dist, err, timing, w2=w2s[method])
            row["collectives"] = collectives
            row["shape"] = list(shape)  # d alone is 16x32's and 32x16's alike
            # how its time slices shared the window (on one: alike); null for the others, so
            # that every row has the same keys for a table reader
            row["window_split"] = s.window_split if method in REPLICABLE else None
            rows[method].append(row)
            _say_row(comm, row, stats, s.max_sweeps)
    out = [row for m in methods for row in rows[m]]
    if cfg.bench.seeds > 1:
        for m in methods:
            out.append(worst_row(rows[m]))
            out0(comm, _format(out[-1]))
    return out


def _say_bound(comm, shape, bound: float, methods) -> None:
    """Say the field's S, what sets pc-window's rounds (docs/benchmarks.md), or where a
    pc-window of ``methods`` runs without one, that it has none."""
    if math.isfinite(bound):
        print0(comm, f"field {'x'.join(map(str, shape))}: S = {bound:.4g}, the data's largest "
                     "mode variance (pc-window's rounds grow with log S)")
    elif any(m.startswith("pc-window") for m in methods):
        print0(comm, unbounded_note(shape))


def _say_row(comm, row: dict, stats, max_sweeps: int) -> None:
    """Print a bench row on rank 0, with a note where blocks were redone step by step or
    stopped at ``max_sweeps`` above the tolerance, and the per-collective report where the
    run had any."""
    out0(comm, _format(row))
    for line in run_notes(stats.fallbacks, stats.unsettled, max_sweeps):  # its distance: why
        print0(comm, f"    {line}")  # a warning: on stderr, under its row on a terminal
    if row["collectives"]:
        out0(comm, "    collectives: " + ", ".join(
            f"{kind} {count} x ({seconds:.3f} s, of which {own:.3f} s its own, "
            f"{count / stats.rounds:.1f} a round)"
            for kind, (count, seconds, own) in sorted(row["collectives"].items()))
            + ("" if row["model_wait_share"] is None else
               f"; {row['model_wait_share']:.1%} of the wall waiting for other "
               "ranks' model calls"))


def run_bench(cfg: Config, *, json_path: str | None = None, png_path: str | None = None,
              compare: tuple[str, ...] = (), comm,
              device: torch.device = torch.device("cpu")) -> list[dict]:
    """Bench every shape in ``bench.sizes`` (or the model's shape); optionally save JSON, and a
    PNG plot of these rows with those of earlier JSON tables ``compare`` (e.g. other rank
    counts)."""
    earlier = read_tables(compare, cfg)  # before any bench work: a bad table fails now
    shapes = [tuple(shape) for shape in cfg.bench.sizes or (cfg.model.shape,)]
    built = [_built(cfg, shape, device) for shape in shapes]  # a size it does not take: now
    print0(comm, f"piadm bench: model {cfg.model.kind}, {cfg.sampler.steps} steps, "
                 f"block {cfg.sampler.block_size}, tol {cfg.sampler.tol}, "
                 f"{cfg.bench.members} members, {cfg.bench.seeds} seed(s), "
                 f"{cfg.bench.repeats} repeat(s), {cfg.sampler.dtype}, {cfg.sampler.noise} "
                 f"noise, {comm.size} ranks (time slices"
                 + (f", pc-window's window split: {cfg.sampler.window_split}"
                    if comm.size > 1 and set(cfg.bench.methods) & set(REPLICABLE) else "")
                 + f"), {device}")
    if comm.poll_s is not None:
        why = ": this node's ranks need more threads than it has cores" * (
            cfg.parallel.wait == "auto")
        print0(comm, f"ranks wait in collectives by polling every {comm.poll_s * 1e6:g} us, "
                     f"sleeping in between (parallel.wait = {cfg.parallel.wait!r}{why})")
    if cfg.model.emulate_ms:
        latency, per_item = cfg.model.emulate_ms
        print0(comm, f"emulating an accelerator: every model call of n items takes at least "
                     f"{latency:g} + n x {per_item:g} ms (model.emulate_ms)")
    out0(comm, LEGEND)
    out0(comm, header())
    rows = [row for shape, made in zip(shapes, built)
            for row in bench_shape(cfg, shape, comm=comm, device=device, built=made)]
    # a full disk ends every rank together (one line), not rank 0 alone (MPI's abort)
    on_rank0(comm, _write_outputs, cfg, rows, earlier, json_path, png_path, comm)
    return rows


def _write_outputs(cfg: Config, rows: list[dict], earlier: list[dict], json_path, png_path,
                   comm) -> None:
    """Rank 0: the bench's JSON (with its config) and figure, where asked: the figure, the
    slow one, first, so that a stop while it is drawn leaves both as they were."""
    if png_path:
        from pipeline.bench_figures import bench_figure, one_per_point

        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        print0(comm, f"plot: {bench_figure(earlier + one_per_point(rows), Path(png_path))}")
    if json_path:
        replace_text(json_path, json_text({"config": cfg.text, "revisions": revisions(cfg),
                                           "rows": rows}, indent=2))
        print0(comm, f"table: {json_path}")


def _built(cfg: Config, size: tuple[int, ...], device) -> tuple[Config, object]:
    """``shaped_model`` at bench size ``size``; a ConfigError naming bench.sizes when the
    model does not take a field of that size (a network trained on another grid)."""
    try:
        return shaped_model(cfg, size, device)
    except ConfigError as err:
        if model_shape(cfg.model, size) == tuple(cfg.model.shape):
            raise
        raise ConfigError(
            f"config: bench.sizes = {[list(s) for s in cfg.bench.sizes]} asks for a "
            f"{'x'.join(map(str, size))} field, which the model does not take "
            f"({str(err).removeprefix('config: ')}): list only sizes it takes, or leave "
            "bench.sizes empty to bench model.shape", collective=True) from None


def run_peer(cfg: Config, peer: str, *, comm,
             device: torch.device = torch.device("cpu")) -> list[tuple]:
    """``--peer diffusers``: the peer's parallel sampler beside piadm's on DDPM-1000 with the
    bench's model (``pipeline.peer``); rank 0 runs it, the table is printed there."""
    from pipeline.peer import compare_diffusers, format_rows, require_diffusers

    on_rank0(comm, require_diffusers)  # where it runs, before the model is built: one line
    model = build_model(cfg.model, device)
    if cfg.bench.sizes:  # the peer problem is one field: the model's own
        print0(comm, f"bench --peer runs on model.shape {list(cfg.model.shape)}, not on "
                     "bench.sizes")
    if comm.size > 1:
        print0(comm, f"bench --peer runs on rank 0 alone (the peer's loop has no time slices): "
                     f"the other {comm.size - 1} rank(s) wait")

    def run():
        for method in ("window", "pc-window"):  # the peer's ParaDiGMS window, and ours
            check_memory(dataclasses.replace(cfg, sampler=dataclasses.replace(
                cfg.sampler, method=method)), tuple(model.shape), device,
                batch=cfg.bench.members, setting="bench.members")
        rows = compare_diffusers(
            model, members=cfg.bench.members, seed=cfg.sampler.seed,
            dtype=DTYPES[cfg.sampler.dtype], device=device, noise_source=cfg.sampler.noise,
            data_bound=model_data_bound(model, cfg.model), ladder=cfg.calibrate.ladder,
            refine=cfg.calibrate.refine, pc_window=cfg.sampler.window, theta=cfg.sampler.theta,
            say=lambda text: print0(comm, text))
        out0(comm, f"peer {peer}: DDPM-1000 (linear betas 1e-4..0.02, posterior variance), "
                   f"{cfg.model.kind} {list(cfg.model.shape)}, {cfg.bench.members} members, "
                   f"{cfg.sampler.dtype}; pc-window's tol is the loosest of calibrate.ladder "
                   "(and calibrate.refine's between its rungs) at no larger a distance than "
                   "the peer's\n" + format_rows(rows))
        return rows

    return on_rank0(comm, run)
