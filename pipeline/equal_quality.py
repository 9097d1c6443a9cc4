"""``piadm bench --quality Q``: every method at the fewest steps that reach quality Q.

Quality is an error that falls as a sequential sampler's steps grow: on an unconditioned
``grf`` the exact W2 of its law to the target (``pipeline.quality``), on a trained U-Net the
log-spectral distance of ``bench.quality_members`` samples to the held-out data
(``pipeline.spectrum_quality``, with a bootstrap interval). For each method the fewest steps N
at which its sequential reference (``pipeline.samplers.REFERENCE``) reaches error <= Q are found
by doubling and then bisection; a parallel method runs on those N steps, where it reproduces
its reference's path to its tolerance (its ``rel_dist``). Each method is then benched there
like ``piadm bench`` does: rounds, model calls, distance, wall time. The figure plots the error
against rounds and against model calls for every error the search computed, all methods on one
figure.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.comm import SerialComm
from pipeline.config import ConfigError
from pipeline.console import on_rank0, out0, print0
from pipeline.jsontext import json_text
from pipeline.processes import replace_text
from pipeline.quality import DETERMINISTIC, STOCHASTIC, draws_noise, grf_w2
from pipeline.run import sampler_grid, sampler_options
from pipeline.samplers import REFERENCE, REGISTRY
from pipeline.settings import Config

MOST_STEPS = 8192  # the search gives up past this many steps
# an SDE reference's W2 costs steps^2 x d point-steps (pipeline.quality): the search stops
# doubling beyond this budget and says so (about 10 minutes of one CPU core)
SDE_SEARCH_BUDGET = 10 * 1000**2 * 64 * 64
LEARNED_KINDS = ("unet",)  # trained on data the config names (train.data): held-out spectra
QUALITY_BATCH = 64  # members sampled at once for a learned model's error
# a learned model's error converges to its network's own (nonzero) error: once doubling the
# steps moves it by under 0.2%, more steps will not reach a quality below it
LEARNED_PLATEAU = 2e-3
# and each try samples bench.quality_members members: the search stops past this many steps
LEARNED_MOST_STEPS = 1024


def check_quality_bench(cfg: Config, quality: float) -> None:
    """Raise ConfigError unless ``--quality`` can run on ``cfg``: a quality > 0, a model with
    a quality measure (``check_measurable``) and, on a grf, sequential references whose W2 is
    exact."""
    if not quality > 0:
        raise ConfigError(f"--quality {quality}: give the error to reach, a number > 0 (e.g. "
                          "1e-2)", collective=True)
    check_measurable(cfg)
    if cfg.model.kind != "grf":
        return
    for method in cfg.bench.methods:
        if REFERENCE[method] not in DETERMINISTIC + STOCHASTIC:
            raise ConfigError(f"bench --quality: {method}'s reference {REFERENCE[method]} has no "
                              "exact W2: drop it from bench.methods", collective=True)


def check_measurable(cfg: Config) -> None:
    """Raise ConfigError unless ``cfg``'s model has a quality measure: an unconditioned grf
    (exact W2) or an unconditioned trained U-Net (spectrum error)."""
    if cfg.model.kind not in ("grf", *LEARNED_KINDS) or cfg.model.condition != "none":
        raise ConfigError("equal quality (bench --quality, sampler.method = \"auto-quality\") "
                          "needs the exact W2 of an unconditioned grf or the held-out spectra "
                          "of an unconditioned trained U-Net: run it on jobs/configs/grf.toml "
                          "or jobs/configs/kolmogorov_uncond.toml", collective=True)


@dataclass
class Measure:
    """The quality searched: its name, its axis label, the error of a sequential reference at
    n steps, whether that error is affordable to compute, and each sampled error's bootstrap
    interval {(reference, n): (lo, hi)}."""

    name: str
    label: str
    error: Callable[[str, int], float]
    affordable: Callable[[str, int], bool] = lambda ref, n: True
    most: int = MOST_STEPS  # see fewest_steps
    plateau: float = 0.0  # see fewest_steps: a sampled error stops the search once converged
    intervals: dict = field(default_factory=dict)


def grf_measure(cfg: Config, model, shape: tuple[int, ...]) -> Measure:
    """The exact W2 of each reference's law to the grf target."""
    options = sampler_options(cfg.sampler)
    d = math.prod(shape)
    return Measure(
        "W2", "exact W2 to the grf target (relative)",
        lambda ref, n: grf_w2(model, ref, sampler_grid(_at_steps(cfg, n).sampler, model),
                              options),
        lambda ref, n: _affordable(ref, n, d, options))


def learned_measure(cfg: Config, model, shape: tuple[int, ...], *, comm, device) -> Measure:
    """The log-spectral distance of ``bench.quality_members`` samples of each reference to the
    held-out data, the members split over ``comm``'s ranks."""
    import numpy as np

    from pipeline.decomposition import slice_bounds
    from pipeline.noise import Noise
    from pipeline.run import DTYPES
    from pipeline.samplers import SAMPLERS
    from pipeline.spectrum_quality import as_trained, held_out, sampling_floor, spectrum_error

    s, members = cfg.sampler, cfg.bench.quality_members
    held = held_out(as_trained(cfg), model.data_mean, model.data_std, shape)
    options = sampler_options(s)
    lo, hi = slice_bounds(members, comm.size, comm.rank)
    intervals: dict = {}

    def error(ref: str, n: int) -> float:
        grid = sampler_grid(_at_steps(cfg, n).sampler, model)
        # a try can take many minutes (64 members x 1000 steps of a U-Net on a CPU): say so first
        print0(comm, f"    {ref} at {n} steps: sampling {members} members ...")
        mine = [np.empty((0, held.kmax))]
        for a in range(lo, hi, QUALITY_BATCH):
            noise = Noise.members(s.seed, 0, range(a, min(a + QUALITY_BATCH, hi)), shape,
                                  DTYPES[s.dtype], device, s.noise)
            y, _ = SAMPLERS[ref](model, noise.prior(), grid, noise,
                                 comm=SerialComm(), options=options)
            mine.append(held.spectra_of(y.detach().cpu().numpy()))
        ens = np.concatenate(comm.allgather_object(np.concatenate(mine)))
        value, *interval = spectrum_error(ens, held)
        intervals[ref, n] = tuple(interval)
        print0(comm, f"    {ref} at {n} steps: spectrum error {value:.4f} "
                     f"[{interval[0]:.4f}, {interval[1]:.4f}] ({members} members; the data's "
                     f"own law would score about {sampling_floor(ens, held):.4f})")
        return value

    return Measure("spectrum error", f"log-spectral distance to held-out data, k <= {held.kmax}",
                   error, most=LEARNED_MOST_STEPS, plateau=LEARNED_PLATEAU, intervals=intervals)


def measure_for(cfg: Config, model, shape: tuple[int, ...], *, comm, device) -> Measure:
    """The quality measure of ``cfg``'s model: exact W2 on an unconditioned grf, the spectrum
    error on an unconditioned trained U-Net (ConfigError otherwise)."""
    check_measurable(cfg)
    if cfg.model.kind == "grf":
        return grf_measure(cfg, model, shape)
    return learned_measure(cfg, model, shape, comm=comm, device=device)


def _at_steps(cfg: Config, steps: int) -> Config:
    """``cfg`` with ``steps`` sampler steps (blocks no longer than the steps)."""
    return dataclasses.replace(cfg, sampler=dataclasses.replace(
        cfg.sampler, steps=steps, block_size=min(cfg.sampler.block_size, steps)))


def _affordable(method: str, steps: int, d: int, options) -> bool:
    return not draws_noise(method, options) or steps**2 * d <= SDE_SEARCH_BUDGET


def fewest_steps(error_at, quality: float, *, affordable=lambda n: True,
                 most: int = MOST_STEPS, plateau: float = 0.0) -> tuple[int | None, dict[int, float]]:
    """The fewest steps N with ``error_at(N) <= quality`` (the error falling with N): one
    step, then doubling from 2, then bisection. Doubling stops when the error moves by less
    than ``plateau`` (relative) from one step count to twice it: converged above the quality.
    Returns (N or None when out of reach or of budget, every {N: error} computed)."""
    seen: dict[int, float] = {}

    def w2(n: int) -> float:
        if n not in seen:
            seen[n] = error_at(n)
        return seen[n]

    if w2(1) <= quality:  # a target as loose as one step's own error
        return 1, seen
    lo, hi = 1, 2
    while w2(hi) > quality:
        if hi * 2 > most or not affordable(hi * 2):
            return None, seen
        if lo > 1 and abs(w2(hi) - w2(lo)) <= plateau * w2(hi):
            return None, seen
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # w2(lo) > quality >= w2(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if w2(mid) <= quality else (mid, hi)
    return hi, seen


def parse_quality(text: str) -> float | tuple[str, int]:
    """``--quality``'s value: an error (a number > 0), or ``METHOD@STEPS``, the error a
    sequential sampler reaches in that many steps. Raises ConfigError otherwise."""
    method, at, steps = text.partition("@")
    if at:
        if REFERENCE.get(method) != method or not steps.isdigit() or int(steps) < 1:
            raise ConfigError(f"--quality {text}: give METHOD@STEPS with a sequential sampler "
                              f"({', '.join(m for m, r in REFERENCE.items() if m == r)}) and "
                              "steps >= 1, e.g. sequential-ode@1000", collective=True)
        return method, int(steps)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"--quality {text}: give the error to reach, a finite number > 0 (e.g. "
                          "1e-2), or METHOD@STEPS (e.g. sequential-ode@1000)", collective=True)
    return value


def run_quality(cfg: Config, quality: float | tuple[str, int], *, comm, device,
                json_path: str | None = None, png_path: str | None = None) -> list[dict]:
    """Bench every method of ``cfg.bench.methods`` at the fewest steps whose error (exact W2
    on a grf, spectrum error on a trained U-Net) is <= quality (or, given (method, steps),
    the error that sequential method reaches in those steps), on ``cfg.model.shape`` (the
    first of ``bench.sizes`` when given); prints the table and the methods with the fewest
    rounds and calls; returns the rows."""
    from models import build_model
    from pipeline.bench import LEGEND, header

    check_quality_bench(cfg, 1.0 if isinstance(quality, tuple) else quality)
    shape = tuple(cfg.bench.sizes[0]) if cfg.bench.sizes else tuple(cfg.model.shape)
    if len(cfg.bench.sizes) > 1:  # its searches are per size: one is what a run affords
        print0(comm, f"bench --quality runs on the first of bench.sizes, {list(shape)}, alone")
    model = build_model(dataclasses.replace(cfg.model, shape=shape), device)
    measure = measure_for(cfg, model, shape, comm=comm, device=device)
    if isinstance(quality, tuple):
        method, steps = quality
        quality = measure.error(method, steps)
        print0(comm, f"  the quality: {method} at {steps} steps has {measure.name} "
                     f"{quality:.4e}")
    print0(comm, f"piadm bench --quality {quality:g}: {cfg.model.kind} {list(shape)}, "
                 f"{measure.label} of each reference, {cfg.sampler.grid} grid, u_min "
                 f"{cfg.sampler.u_min:g}")
    found = _references(cfg, measure, quality, comm)
    out0(comm, LEGEND)
    out0(comm, header())
    rows = _rows_at_steps(cfg, shape, found, measure, quality, comm=comm, device=device)
    if not rows and any(steps is not None for steps, _ in found.values()):
        raise ConfigError("bench --quality: every method of bench.methods was left out at the "
                          "steps found (said above): nothing to bench", collective=True)
    out0(comm, summary(rows, quality, measure.name))
    # a full disk ends every rank together (one line), not rank 0 alone (MPI's abort)
    on_rank0(comm, _save, cfg, rows, found, measure, quality, json_path, png_path, comm)
    return rows


def _references(cfg: Config, measure, quality: float, comm) -> dict:
    """{reference method: (its fewest steps within ``quality`` or None, {steps: error} seen)}
    for the sequential references of ``bench.methods``, each printed as found."""
    found: dict[str, tuple[int | None, dict[int, float]]] = {}
    for ref in dict.fromkeys(REFERENCE[m] for m in cfg.bench.methods):
        found[ref] = fewest_steps(lambda n, ref=ref: measure.error(ref, n), quality,
                                  affordable=lambda n, ref=ref: measure.affordable(ref, n),
                                  most=measure.most, plateau=measure.plateau)
        steps, seen = found[ref]
        most = max(seen)
        print0(comm, f"  {ref}: " + (f"{steps} steps ({measure.name} {seen[steps]:.3e})" if steps
                                     else f"not reached (the search stopped at {most} steps, "
                                          f"{measure.name} {seen[most]:.3e})"))
    return found


def _rows_at_steps(cfg: Config, shape, found: dict, measure, quality: float, *, comm,
                   device) -> list[dict]:
    """One bench row per method whose reference reached ``quality``, at that reference's steps."""
    from pipeline.bench import bench_shape

    rows = []
    for method in cfg.bench.methods:
        ref = REFERENCE[method]
        steps = found[ref][0]
        if steps is None:
            continue
        at = dataclasses.replace(_at_steps(cfg, steps),
                                 bench=dataclasses.replace(cfg.bench, methods=(method,), seeds=1))
        row = next((r for r in bench_shape(at, shape, comm=comm, device=device,
                                           name_bound=False, none_left=True)
                    if r["method"] == method), None)
        if row is None:  # left out: its calibration fell short, its blocks diverged (said)
            continue
        row.update(quality=quality, steps=steps, error=found[ref][1][steps])
        if (ref, steps) in measure.intervals:
            row["error_lo"], row["error_hi"] = measure.intervals[ref, steps]
        rows.append(row)
    return rows


def _save(cfg: Config, rows, found: dict, measure, quality: float, json_path, png_path,
          comm) -> None:
    """Rank 0: the table and every reference's error curve as JSON, and the figure."""
    curves = {ref: [[n, n * calls_per_step(ref), error] for n, error in sorted(seen.items())]
              for ref, (_, seen) in found.items()}  # [steps, sequential calls, error]
    intervals = {ref: [[n, *measure.intervals[ref, n]] for n in sorted(seen)
                       if (ref, n) in measure.intervals] for ref, (_, seen) in found.items()}
    if json_path:
        replace_text(json_path, json_text(
            {"config": cfg.text, "quality": quality, "measure": measure.name, "rows": rows,
             "curves": curves, "intervals": intervals}, indent=2))
    if png_path:
        from pipeline.bench_figures import quality_figure

        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        print0(comm, f"plot: {quality_figure(rows, curves, quality, Path(png_path), measure.label)}")

def summary(rows: list[dict], quality: float, name: str = "W2") -> str:
    """The equal-quality table and the methods with the fewest rounds and model calls."""
    lines = [f"at {name} <= {quality:g}:",
             f"{'method':<18} {'steps':>6} {'error':>9} {'rounds':>7} {'calls':>8} "
             f"{'rel_dist':>9} {'wall_s':>8}"]
    for r in rows:
        dist = "-" if r["rel_dist"] is None else f"{r['rel_dist']:.1e}"
        lines.append(f"{r['method']:<18} {r['steps']:>6} {r['error']:>9.3e} {r['rounds']:>7.1f} "
                     f"{r['model_calls']:>8.1f} {dist:>9} {r['wall_s']:>8.2f}")
    if rows:
        fewest_rounds = min(rows, key=lambda r: (r["rounds"], r["model_calls"]))
        fewest_calls = min(rows, key=lambda r: (r["model_calls"], r["rounds"]))
        lines.append(f"fewest rounds: {fewest_rounds['method']} ({fewest_rounds['rounds']:.1f}); "
                     f"fewest model calls: {fewest_calls['method']} "
                     f"({fewest_calls['model_calls']:.1f})")
    return "\n".join(lines)


def calls_per_step(method: str) -> int:
    """Model calls a sequential reference makes per step (Heun: two)."""
    return REGISTRY[method].calls_per_step

