"""``piadm bench --peer diffusers``: diffusers' own ParaDiGMS step beside piadm's samplers.

The common problem is DDPM-1000 as diffusers defines it (``DDPMParallelScheduler``, linear
betas 1e-4 .. 0.02, 1000 timesteps, posterior variance): the bench's exact model answers as
an epsilon network eps(x, t) = -s(u_t) score(x, u_t) on the scheduler's clock, every sampler
gets the same keyed noise xi_j for step j, and piadm samples on the scheduler's own timesteps
with the DDPM update (``sampler.form = "eps"``), which is the same map. diffusers' side is its
ParaDiGMS loop: a window of ``p`` timesteps, one batched network call per round, the window's
states rebuilt by a cumulative sum of the scheduler's batched step (``batch_step_no_noise``)
plus the pre-drawn noise, and the window slid past every state whose change is below
tol^2 times the scheduler's noise variance. Each method's distance is to its own sequential
path with the same noise; the two sequential paths are compared too.
"""
from __future__ import annotations

import dataclasses
import importlib
import math

import torch

from pipeline.calibrate import loosest_passing, worst_distance
from pipeline.clock import DiscreteVP, noise_std
from pipeline.comm import SerialComm
from pipeline.errors import ConfigError
from pipeline.grids import Grid
from pipeline.noise import Noise
from pipeline.samplers import REGISTRY, SAMPLERS, Options
from pipeline.samplers.options import WINDOW_POINTS


def parallel_scheduler():
    """diffusers' ``DDPMParallelScheduler`` class; ConfigError, naming the install, where
    diffusers cannot be imported or is too old to have it."""
    try:
        return importlib.import_module("diffusers").DDPMParallelScheduler
    except (ImportError, AttributeError):
        raise ConfigError("piadm bench --peer diffusers needs the diffusers package with its "
                          "DDPMParallelScheduler: pip install 'piadm[bench]' (or pip install "
                          "'diffusers>=0.30')") from None


def require_diffusers() -> None:
    """``parallel_scheduler``'s check alone (nothing returned: a class sent to other ranks
    would be imported there)."""
    parallel_scheduler()


def _scheduler():
    return parallel_scheduler()(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                 beta_schedule="linear", clip_sample=False)


def ddpm_grid(steps: int = 1000) -> Grid:
    """The OU clock at diffusers' DDPM timesteps 999 .. 0, then the clean end (u = 0)."""
    table = DiscreteVP(num_steps=steps).table()
    u = torch.cat([table.flip(0), torch.zeros(1, dtype=torch.float64)])
    return Grid(u=u, edges=(0, steps))


def eps_network(model):
    """The score model as diffusers' epsilon network eps(x (B, *S), t (B,) long)."""
    table = DiscreteVP().table()

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u = table[t.cpu()].to(x.device, x.dtype)
        return -noise_std(u.double()).to(x.dtype).reshape(-1, *(1,) * (x.dim() - 1)) * model(x, u)

    return eps


def _ddpm_step(scheduler, eps, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """diffusers' batched DDPM step without noise for states x (K, *S) at timesteps t (K,)."""
    return scheduler.batch_step_no_noise(eps(x, t), t, x).to(x.dtype)


def paradigms(scheduler, eps, x_t: torch.Tensor, xi: torch.Tensor, *, window: int, tol: float):
    """diffusers' ParaDiGMS on DDPM from x_t (B, *S) with noise xi (B, N, *S): returns
    (samples (B, *S), rounds, network calls per sample)."""
    ts = scheduler.timesteps
    n, batch = len(ts), x_t.shape[0]
    # on the states' device: diffusers' own step moves its tables to where it last ran
    var = torch.stack([torch.as_tensor(scheduler._get_variance(int(t))).to(x_t.device)
                       for t in ts]).to(x_t.dtype)
    added = var.sqrt().reshape(1, n, *(1,) * (x_t.dim() - 1)) * xi
    scale = 1.0 / torch.cat([var, var.new_zeros(1)])  # the last has none: inf
    states = x_t[:, None].repeat(1, n + 1, *(1,) * (x_t.dim() - 1))
    begin, end, rounds, calls = 0, min(window, n), 0, 0
    while begin < n:
        width = end - begin
        block = states[:, begin:end]
        t = ts[begin:end].repeat(batch)
        moved = _ddpm_step(scheduler, eps, block.flatten(0, 1), t).reshape(block.shape) - block
        new = states[:, begin : begin + 1] + torch.cumsum(moved + added[:, begin:end], 1)
        change = ((new - states[:, begin + 1 : end + 1]) ** 2).flatten(2).mean(-1)
        over = (change * scale[begin + 1 : end + 1]).amax(0) > tol**2  # any member
        first = int(over.int().argmax()) if bool(over.any()) else width
        states[:, begin + 1 : end + 1] = new
        new_begin = begin + min(first + 1, window)
        new_end = min(new_begin + window, n)
        states[:, end : new_end + 1] = states[:, end : end + 1]
        rounds, calls = rounds + 1, calls + width
        begin, end = new_begin, new_end
    return states[:, n], rounds, calls


def sequential(scheduler, eps, x_t: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """diffusers' DDPM loop: the scheduler's step at every timestep, with noise xi: x_t
    (B, *S), xi (B, steps, *S); returns (B, *S)."""
    x = x_t
    for j, t in enumerate(scheduler.timesteps):
        var = scheduler._get_variance(int(t)).to(x.dtype)
        x = _ddpm_step(scheduler, eps, x, t.repeat(x.shape[0])) + var.sqrt() * xi[:, j]
    return x


def compare_diffusers(model, *, members: int, seed: int, dtype, device, noise_source: str,
                      data_bound: float, ladder, refine: int, pc_window: int, theta: str,
                      window: int = WINDOW_POINTS, tol: float = 0.1, say=print):
    """diffusers' ParaDiGMS against piadm's window and pc-window on DDPM-1000; returns rows
    (method, settings, rounds, calls_ratio, distance). ``window`` and ``tol`` are ParaDiGMS'
    (for both ParaDiGMS samplers); pc-window runs with ``pc_window`` points (0: its own
    default) and corrector ``theta`` at the loosest tolerance whose worst distance on these
    members is no larger than diffusers': the rungs of ``ladder``, then ``refine`` times
    halfway to the looser rung, as ``piadm calibrate`` searches (the tightest rung, if none
    is)."""
    scheduler = _scheduler()
    scheduler.set_timesteps(1000)
    grid = ddpm_grid()
    n = grid.steps
    noise = Noise.members(seed, 0, range(members), model.shape, dtype, device, noise_source)
    y0, xi = noise.prior(), noise.path(0, n)
    eps = eps_network(model)
    with torch.no_grad():
        theirs_seq = sequential(scheduler, eps, y0, xi)
        theirs, rounds, calls = paradigms(scheduler, eps, y0, xi, window=window, tol=tol)
    options = Options(form="eps", window=window, tol=tol, data_bound=data_bound)
    ours_seq, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise,
                                             comm=SerialComm(), options=options)
    say(f"DDPM-1000 on {list(model.shape)}, {members} members: diffusers' sequential DDPM and "
        f"piadm's differ by {worst_distance(theirs_seq, ours_seq):.1e} (the same map, float rounding)")
    rows = [("diffusers ParaDiGMS", f"p={window} tol={tol:g}", rounds, calls / n,
             worst_distance(theirs, theirs_seq))]
    y, stats = SAMPLERS["window"](model, y0, grid, noise, comm=SerialComm(), options=options)
    rows.append(("piadm window", f"p={window} tol={tol:g}", stats.rounds, stats.model_calls / n,
                 worst_distance(y, ours_seq)))
    runs = {}  # tol: (rounds, calls ratio, distance), on the same noise

    def passes(tol: float, refined: bool) -> bool:
        pc = dataclasses.replace(options, window=pc_window, tol=tol, theta=theta)
        y, stats = SAMPLERS["pc-window"](model, y0, grid, noise, comm=SerialComm(), options=pc)
        runs[tol] = (stats.rounds, stats.model_calls / n, worst_distance(y, ours_seq))
        return runs[tol][2] <= rows[0][4]

    tol = loosest_passing(ladder, passes, refine)
    tol = float(ladder[-1]) if tol is None else tol
    p = REGISTRY["pc-window"].window_points(pc_window, n)
    rows.append(("piadm pc-window", f"p={p} tol={tol:g}", *runs[tol]))
    return rows


def format_rows(rows) -> str:
    """The peer table: one line per (method, settings, rounds, calls ratio, distance) row,
    diffusers' first, then each other row's ratios to it."""
    lines = [f"{'method':<22} {'settings':<18} {'rounds':>7} {'calls_ratio':>12} {'rel_dist':>9}"]
    for method, settings, rounds, ratio, dist in rows:
        lines.append(f"{method:<22} {settings:<18} {rounds:>7} {ratio:>12.2f} {dist:>9.2e}")
    base = rows[0]
    for method, _, rounds, ratio, dist in rows[1:]:
        lines.append(f"{method} / diffusers: rounds {rounds / base[2]:.2f}x, calls "
                     f"{ratio / base[3]:.2f}x, distance {dist / base[4]:.2f}x"
                     if base[4] > 0 and not math.isnan(base[4]) else f"{method}: -")
    return "\n".join(lines)
