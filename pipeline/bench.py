"""``piadm bench``: sequential against parallel samplers on the same model, noise and steps."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from models import STAT_ERRORS, build_model
from pipeline.comm import SerialComm
from pipeline.config import Config
from pipeline.console import print0
from pipeline.noise import Noise
from pipeline.run import DTYPES, sampler_grid, sampler_options
from pipeline.samplers import REFERENCE, SAMPLERS

COLUMNS = ("method", "steps", "d", "rounds", "model_calls", "rel_dist", "stat_err", "wall_s")


def _row(method, steps, d, stats, dist, err, wall) -> dict:
    return {"method": method, "steps": steps, "d": d, "rounds": stats.rounds,
            "model_calls": round(stats.model_calls, 1), "rel_dist": dist, "stat_err": err,
            "wall_s": round(wall, 3)}


def _format(row: dict) -> str:
    dist = "-" if row["rel_dist"] is None else f"{row['rel_dist']:.2e}"
    return (f"{row['method']:<15} {row['steps']:>6} {row['d']:>9} {row['rounds']:>7} "
            f"{row['model_calls']:>12.1f} {dist:>9} {row['stat_err']:>9.3e} {row['wall_s']:>8.2f}")


def header() -> str:
    return (f"{'method':<15} {'steps':>6} {'d':>9} {'rounds':>7} {'model_calls':>12} "
            f"{'rel_dist':>9} {'stat_err':>9} {'wall_s':>8}")


def bench_shape(cfg: Config, shape: tuple[int, ...], *, comm=SerialComm()) -> list[dict]:
    """Run every bench method on one field shape; returns one row per method."""
    model = build_model(dataclasses.replace(cfg.model, shape=tuple(shape)))
    s = cfg.sampler
    grid, options = sampler_grid(s), sampler_options(s)
    dtype = DTYPES[s.dtype]
    noise = Noise(s.seed, tuple((0, m) for m in range(cfg.bench.members)), tuple(shape), dtype)
    y0 = noise.prior()
    stat_error = STAT_ERRORS[cfg.model.kind]
    references: dict[str, torch.Tensor] = {}
    rows = []
    methods = sorted(cfg.bench.methods, key=lambda m: m not in REFERENCE.values())
    for method in methods:
        start = time.perf_counter()
        y, stats = SAMPLERS[method](model, y0, grid, noise, comm=comm, options=options)
        wall = time.perf_counter() - start
        ref_name = REFERENCE[method]
        if method == ref_name:
            references[method] = y
        ref = references.get(ref_name)
        if ref is None and method != ref_name:
            ref, _ = SAMPLERS[ref_name](model, y0, grid, noise, comm=comm, options=options)
            references[ref_name] = ref
        dist = None if method == ref_name else float((y - ref).norm() / ref.norm())
        err = stat_error(model, y.to(torch.float64), s.u_min, s.denoise_final)
        rows.append(_row(method, s.steps, math.prod(shape), stats, dist, err, wall))
        print0(comm, _format(rows[-1]))
    return rows


def run_bench(cfg: Config, *, json_path: str | None = None, comm=SerialComm()) -> list[dict]:
    """Bench every shape in ``bench.sizes`` (or the model's shape); optionally save JSON."""
    shapes = cfg.bench.sizes or (cfg.model.shape,)
    print0(comm, f"piadm bench: model {cfg.model.kind}, {cfg.sampler.steps} steps, "
                 f"block {cfg.sampler.block_size}, tol {cfg.sampler.tol}, "
                 f"{cfg.bench.members} members, {cfg.sampler.dtype}")
    print0(comm, header())
    rows = [row for shape in shapes for row in bench_shape(cfg, tuple(shape), comm=comm)]
    if json_path and comm.rank == 0:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"config": cfg.text, "rows": rows}, indent=2))
    return rows
