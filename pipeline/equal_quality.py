"""``piadm bench --quality Q``: every method at the fewest steps that reach quality Q.

Quality is the exact W2 of a sequential sampler's law to the ``grf`` target
(``pipeline.quality``), which falls as its steps grow. For each method the fewest steps N at
which its sequential reference (``pipeline.samplers.REFERENCE``) reaches W2 <= Q are found by
doubling and then bisection; a parallel method runs on those N steps, where it reproduces its
reference's path to its tolerance (its ``rel_dist``). Each method is then benched there like
``piadm bench`` does: rounds, model calls, distance, wall time. The figure plots W2 against
rounds and against model calls for every W2 the search computed, all methods on one figure.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from pipeline.config import Config, ConfigError
from pipeline.console import print0
from pipeline.quality import DETERMINISTIC, STOCHASTIC, draws_noise, grf_w2
from pipeline.run import sampler_grid, sampler_options
from pipeline.samplers import REFERENCE

MOST_STEPS = 8192  # the search gives up past this many steps
# an SDE reference's W2 costs steps^2 x d point-steps (pipeline.quality): the search stops
# doubling beyond this budget and says so (about 10 minutes of one CPU core)
SDE_SEARCH_BUDGET = 10 * 1000**2 * 64 * 64


def check_quality_bench(cfg: Config, quality: float) -> None:
    """Raise ConfigError unless ``--quality`` can run on ``cfg`` (exact W2: an unconditioned
    grf, and sequential references whose W2 is exact)."""
    if not quality > 0:
        raise ConfigError(f"--quality {quality}: give the W2 to reach, a number > 0 (e.g. 1e-2)",
                          collective=True)
    if cfg.model.kind != "grf" or cfg.model.condition != "none":
        raise ConfigError("bench --quality needs the exact W2 of model.kind = \"grf\" with no "
                          "conditioning: run it on jobs/configs/grf.toml", collective=True)
    for method in cfg.bench.methods:
        if REFERENCE[method] not in DETERMINISTIC + STOCHASTIC:
            raise ConfigError(f"bench --quality: {method}'s reference {REFERENCE[method]} has no "
                              "exact W2: drop it from bench.methods", collective=True)


def _at_steps(cfg: Config, steps: int) -> Config:
    """``cfg`` with ``steps`` sampler steps (blocks no longer than the steps)."""
    return dataclasses.replace(cfg, sampler=dataclasses.replace(
        cfg.sampler, steps=steps, block_size=min(cfg.sampler.block_size, steps)))


def _affordable(method: str, steps: int, d: int, options) -> bool:
    return not draws_noise(method, options) or steps**2 * d <= SDE_SEARCH_BUDGET


def fewest_steps(w2_at, quality: float, *, affordable=lambda n: True,
                 most: int = MOST_STEPS) -> tuple[int | None, dict[int, float]]:
    """The fewest steps N with ``w2_at(N) <= quality`` (W2 falling with N): doubling from 2,
    then bisection. Returns (N or None when out of reach or of budget, every {N: W2} computed)."""
    seen: dict[int, float] = {}

    def w2(n: int) -> float:
        if n not in seen:
            seen[n] = w2_at(n)
        return seen[n]

    lo, hi = 1, 2
    while w2(hi) > quality:
        if hi * 2 > most or not affordable(hi * 2):
            return None, seen
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # w2(lo) > quality >= w2(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if w2(mid) <= quality else (mid, hi)
    return hi, seen


def run_quality(cfg: Config, quality: float, *, comm, device, json_path: str | None = None,
                png_path: str | None = None) -> list[dict]:
    """Bench every method of ``cfg.bench.methods`` at the fewest steps reaching W2 <= quality
    on ``cfg.model.shape`` (the first of ``bench.sizes`` when given); prints the table and the
    methods with the fewest rounds and calls; returns the rows."""
    import json

    from models import build_model
    from pipeline.bench import LEGEND, bench_shape, header

    check_quality_bench(cfg, quality)
    shape = tuple(cfg.bench.sizes[0]) if cfg.bench.sizes else tuple(cfg.model.shape)
    model = build_model(dataclasses.replace(cfg.model, shape=shape), device)
    d = math.prod(shape)
    print0(comm, f"piadm bench --quality {quality:g}: grf {list(shape)}, exact W2 of each "
                 f"reference, {cfg.sampler.grid} grid, u_min {cfg.sampler.u_min:g}")
    found: dict[str, tuple[int | None, dict[int, float]]] = {}
    options = sampler_options(cfg.sampler)
    for ref in dict.fromkeys(REFERENCE[m] for m in cfg.bench.methods):
        found[ref] = fewest_steps(
            lambda n, ref=ref: grf_w2(model, ref, sampler_grid(_at_steps(cfg, n).sampler, model),
                                      options), quality,
            affordable=lambda n, ref=ref: _affordable(ref, n, d, options))
        steps = found[ref][0]
        print0(comm, f"  {ref}: " + (f"{steps} steps (W2 {found[ref][1][steps]:.3e})"
                                     if steps else "not reached within the search's budget"))
    print0(comm, LEGEND)
    print0(comm, header())
    rows = []
    for method in cfg.bench.methods:
        steps = found[REFERENCE[method]][0]
        if steps is None:
            continue
        at = dataclasses.replace(_at_steps(cfg, steps),
                                 bench=dataclasses.replace(cfg.bench, methods=(method,), seeds=1))
        row = [r for r in bench_shape(at, shape, comm=comm, device=device)
               if r["method"] == method][0]
        row.update(quality=quality, steps=steps, w2=found[REFERENCE[method]][1][steps])
        rows.append(row)
    print0(comm, summary(rows, quality))
    curves = {ref: [[n, n * calls_per_step(ref), w2] for n, w2 in sorted(seen.items())]
              for ref, (_, seen) in found.items()}  # [steps, sequential calls, W2]
    if json_path and comm.rank == 0:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"config": cfg.text, "quality": quality,
                                               "rows": rows, "curves": curves}, indent=2))
    if png_path and comm.rank == 0:
        from pipeline.figures import quality_figure

        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        print0(comm, f"plot: {quality_figure(rows, curves, quality, Path(png_path))}")
    return rows


def summary(rows: list[dict], quality: float) -> str:
    """The equal-quality table and the methods with the fewest rounds and model calls."""
    lines = [f"at W2 <= {quality:g}:",
             f"{'method':<18} {'steps':>6} {'rounds':>7} {'calls':>8} {'rel_dist':>9} {'wall_s':>8}"]
    for r in rows:
        dist = "-" if r["rel_dist"] is None else f"{r['rel_dist']:.1e}"
        lines.append(f"{r['method']:<18} {r['steps']:>6} {r['rounds']:>7.1f} "
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
    return 2 if method == "edm-heun" else 1

