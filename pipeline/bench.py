"""``piadm bench``: sequential against parallel samplers on the same model, noise and steps.

Under ``mpiexec -n N`` every rank is a time slice of one group (the latency of one batch):
rounds, wall seconds (slowest rank), the share of that time spent in collectives (largest over
ranks) and the peak memory of the run on the rank that needs most."""
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
from pipeline.memory import peak_since, start_peak
from pipeline.noise import Noise
from pipeline.run import DTYPES, sampler_grid, sampler_options
from pipeline.samplers import REFERENCE, SAMPLERS

COLUMNS = ("method", "ranks", "steps", "d", "rounds", "model_calls", "rel_dist", "stat_err",
           "wall_s", "comm_share", "peak_mib")


def _row(method, ranks, steps, d, stats, dist, err, timing) -> dict:
    wall, comm_s, peak = timing
    return {"method": method, "ranks": ranks, "steps": steps, "d": d, "rounds": stats.rounds,
            "model_calls": round(stats.model_calls, 1), "rel_dist": dist, "stat_err": err,
            "wall_s": round(wall, 3), "comm_share": round(comm_s / wall, 4) if wall else 0.0,
            "peak_mib": round(peak / 2**20, 1)}


def _format(row: dict) -> str:
    dist = "-" if row["rel_dist"] is None else f"{row['rel_dist']:.2e}"
    err = "-" if row["stat_err"] is None else f"{row['stat_err']:.3e}"
    return (f"{row['method']:<15} {row['ranks']:>5} {row['steps']:>6} {row['d']:>9} "
            f"{row['rounds']:>7} {row['model_calls']:>12.1f} {dist:>9} {err:>9} "
            f"{row['wall_s']:>8.2f} {row['comm_share']:>10.3f} {row['peak_mib']:>9.1f}")


def header() -> str:
    return (f"{'method':<15} {'ranks':>5} {'steps':>6} {'d':>9} {'rounds':>7} {'model_calls':>12} "
            f"{'rel_dist':>9} {'stat_err':>9} {'wall_s':>8} {'comm_share':>10} {'peak_mib':>9}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading a clock
        torch.cuda.synchronize(device)


def _timed_run(sampler, model, y0, grid, noise, *, comm, options, device):
    """Run one sampler; returns (y, stats, (wall s, comm s, peak bytes)), each the largest
    over ranks. On a GPU an untimed first run pays for kernel loading and FFT plans."""
    if device.type == "cuda":
        sampler(model, y0, grid, noise, comm=comm, options=options)
    comm.barrier()
    comm_before, baseline = comm.seconds, start_peak(device)
    start = time.perf_counter()
    y, stats = sampler(model, y0, grid, noise, comm=comm, options=options)
    _sync(device)
    wall = time.perf_counter() - start
    local = torch.tensor([wall, comm.seconds - comm_before, peak_since(device, baseline)],
                         dtype=torch.float64)
    return y, stats, tuple(float(v) for v in comm.allreduce_max(local))


def bench_shape(cfg: Config, shape: tuple[int, ...], *, comm=SerialComm(),
                device: torch.device = torch.device("cpu")) -> list[dict]:
    """Run every bench method on one field shape, its blocks split over ``comm``'s ranks;
    returns one row per method."""
    model = build_model(dataclasses.replace(cfg.model, shape=tuple(shape)), device)
    s = cfg.sampler
    grid, options = sampler_grid(s), sampler_options(s)
    dtype = DTYPES[s.dtype]
    noise = Noise(s.seed, tuple((0, m) for m in range(cfg.bench.members)), tuple(shape), dtype,
                  device, s.noise)
    y0 = noise.prior()
    stat_error = STAT_ERRORS.get(cfg.model.kind)  # exact models only: a learned one has none
    references: dict[str, torch.Tensor] = {}
    rows = []
    methods = sorted(cfg.bench.methods, key=lambda m: m not in REFERENCE.values())
    for method in methods:
        y, stats, timing = _timed_run(SAMPLERS[method], model, y0, grid, noise, comm=comm,
                                      options=options, device=device)
        ref_name = REFERENCE[method]
        if method == ref_name:
            references[method] = y
        ref = references.get(ref_name)
        if ref is None and method != ref_name:
            ref, _ = SAMPLERS[ref_name](model, y0, grid, noise, comm=comm, options=options)
            references[ref_name] = ref
        dist = None if method == ref_name else float((y - ref).norm() / ref.norm())
        err = (None if stat_error is None
               else stat_error(model, y.to(torch.float64), s.u_min, s.denoise_final))
        rows.append(_row(method, comm.size, s.steps, math.prod(shape), stats, dist, err, timing))
        print0(comm, _format(rows[-1]))
    return rows


def run_bench(cfg: Config, *, json_path: str | None = None, png_path: str | None = None,
              compare: tuple[str, ...] = (), comm=SerialComm(),
              device: torch.device = torch.device("cpu")) -> list[dict]:
    """Bench every shape in ``bench.sizes`` (or the model's shape); optionally save JSON, and a
    PNG plot of these rows with those of earlier JSON tables ``compare`` (e.g. other rank
    counts)."""
    shapes = cfg.bench.sizes or (cfg.model.shape,)
    print0(comm, f"piadm bench: model {cfg.model.kind}, {cfg.sampler.steps} steps, "
                 f"block {cfg.sampler.block_size}, tol {cfg.sampler.tol}, "
                 f"{cfg.bench.members} members, {cfg.sampler.dtype}, {cfg.sampler.noise} noise, "
                 f"{comm.size} ranks "
                 f"(time slices), {device}")
    print0(comm, header())
    rows = [row for shape in shapes for row in bench_shape(cfg, tuple(shape), comm=comm,
                                                           device=device)]
    if json_path and comm.rank == 0:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"config": cfg.text, "rows": rows}, indent=2))
    if png_path and comm.rank == 0:
        from pipeline.figures import bench_figure

        earlier = [row for p in compare for row in json.loads(Path(p).read_text())["rows"]]
        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        print0(comm, f"plot: {bench_figure(earlier + rows, Path(png_path))}")
    return rows
