"""Where a learned model loses energy: renoise held-out data and sample it back.

An ensemble short of energy at some scales says nothing of the noise levels where the
shortfall arises. Noising a held-out field to OU clock u (y = a(u) x_0 + s(u) z) and running
the sampler from there to u_min draws, for an exact model, a field with the data's law again,
so every shell keeps its energy at every u. With a learned model the energy ratio against the
same held-out fields, as a function of the starting level u, shows where it is lost: near 1
from small u and falling from larger u means the loss arises at the noise levels in between
(docs/algorithms.md section 9).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from pipeline.comm import SerialComm
from pipeline.grids import Grid, block_edges
from pipeline.jsontext import json_text
from pipeline.noise import Noise
from pipeline.processes import replace_text
from pipeline.samplers import SAMPLERS, Options

# starting levels tried below the grid's u_max (which is tried too): sigma 0.17 .. 4.4
LEVELS = (0.03, 0.1, 0.3, 1.0, 3.0)
DRAWS_PER_FIELD = 4  # a downscaler's renoised draws of each held-out field


def from_level(grid: Grid, u_start: float) -> Grid:
    """The part of ``grid`` below ``u_start``, started at ``u_start`` (one block): the same
    step density as the full sampler's."""
    if not u_start > float(grid.u[-1]):
        raise ValueError(f"the starting level u = {u_start:g} must lie above the grid's end "
                         f"{float(grid.u[-1]):g}")
    rest = grid.u[grid.u < u_start]
    u = torch.cat([torch.tensor([u_start], dtype=grid.u.dtype), rest])
    return Grid(u=u, edges=block_edges(u.numel() - 1, u.numel() - 1))


def octave_bands(kmax: int) -> list[tuple[int, int]]:
    """Shell ranges (lo, hi) inclusive: 1..2, 3..4, 5..8, 9..16, .. up to ``kmax``."""
    bands, lo = [], 1
    while lo <= kmax:
        hi = min(kmax, 2 if lo == 1 else 2 * (lo - 1))
        bands.append((lo, hi))
        lo = hi + 1
    return bands


def renoised(model, x0: torch.Tensor, grid: Grid, u_start: float, noise: Noise, method: str,
             options: Options = Options()) -> torch.Tensor:
    """Fields x0 (B, *S) noised to ``u_start`` with ``noise``'s prior draw and sampled back
    to the end of ``grid`` by ``method``: (B, *S)."""
    a, s = math.exp(-u_start / 2), math.sqrt(-math.expm1(-u_start))
    y0 = a * x0.to(noise.dtype) + s * noise.prior()
    y, _ = SAMPLERS[method](model, y0, from_level(grid, u_start), noise,
                            comm=SerialComm(), options=options)
    return y


def band_ratios(ens: np.ndarray, truth: np.ndarray, bands: list[tuple[int, int]]) -> np.ndarray:
    """Energy of spectra ens (M, K) over truth (T, K) in each band (shells k = 1 .. K), and
    over all of them last: (len(bands) + 1,)."""
    e, t = ens.mean(0), truth.mean(0)
    parts = [e[lo - 1 : hi].sum() / t[lo - 1 : hi].sum() for lo, hi in bands]
    return np.array([*parts, e.sum() / t.sum()])


def _check_renoise(cfg) -> None:
    """Only a trained U-Net has held-out data to renoise (and a downscaler its coarse fields)."""
    from pipeline.config import ConfigError
    from pipeline.equal_quality import LEARNED_KINDS

    if cfg.model.kind not in LEARNED_KINDS or cfg.model.condition == "mean" or (
            cfg.model.condition == "coarse" and not cfg.train.condition):
        raise ConfigError("bench --renoise renoises the held-out data of a trained U-Net "
                          "(train.data, and train.condition for a downscaler): run it on "
                          "jobs/configs/kolmogorov_uncond.toml or kolmogorov_down.toml",
                          collective=True)


def _units(model, coarse, fields: int, draws: int, comm, device) -> list[tuple]:
    """This rank's share of the work as (rows a..b of x0, item, model, members): a
    downscaler's unit is one field's ``draws``, its model bound to that field's coarse input
    (``coarse``: (fields, *coarse shape)) once; an unconditional one's is up to
    ``QUALITY_BATCH`` fields, one draw each."""
    from pipeline.decomposition import slice_bounds
    from pipeline.equal_quality import QUALITY_BATCH

    lo, hi = slice_bounds(fields, comm.size, comm.rank)
    if coarse is not None:
        return [(i * draws, (i + 1) * draws, i, model.conditioned(coarse[i].to(device)),
                 range(draws)) for i in range(lo, hi)]
    return [(a, min(a + QUALITY_BATCH, hi), 0, model, range(a, min(a + QUALITY_BATCH, hi)))
            for a in range(lo, hi, QUALITY_BATCH)]


def run_renoise(cfg, *, comm, device, json_path: str | None = None) -> list[dict]:
    """``piadm bench --renoise``: for each starting level, held-out fields of a trained
    U-Net's ``train.data`` renoised and sampled back by the sequential reference of
    ``sampler.method`` on the config's grid: ``bench.quality_members`` fields, or for a
    downscaler a quarter as many fields with ``DRAWS_PER_FIELD`` draws each, every one given
    its own coarse field. Prints and returns each level's energy ratio per octave band and
    over the resolved shells."""
    from models import build_model
    from pipeline.config import ConfigError
    from pipeline.console import on_rank0, out0, print0
    from pipeline.run import DTYPES, sampler_grid, sampler_options
    from pipeline.planner import methods_of
    from pipeline.run_items import check_step_lengths
    from pipeline.spectrum_quality import (as_trained, held_out_coarse, held_out_fields,
                                           shell_spectra)

    _check_renoise(cfg)
    coarse_given = cfg.model.condition == "coarse"
    s, shape = cfg.sampler, tuple(cfg.model.shape)
    model = build_model(cfg.model, device)
    split = as_trained(cfg)
    fields, kmax = held_out_fields(split, model.data_mean, model.data_std, shape)
    draws = DRAWS_PER_FIELD if coarse_given else 1
    count = max(1, cfg.bench.quality_members // draws)
    pick = np.unique(np.linspace(0, len(fields) - 1, count).round().astype(int))
    coarse = (torch.as_tensor(held_out_coarse(split, model.data_mean, model.data_std)[pick])
              if coarse_given else None)
    trained = getattr(model, "cond_shape", None)
    if coarse is not None and trained is not None and tuple(coarse.shape[1:]) != trained:
        raise ConfigError(f"bench --renoise: train.condition {split.condition} fields are "
                          f"{list(coarse.shape[1:])} but the model was trained on coarse fields "
                          f"of {list(trained)}: set train.condition to that variable",
                          collective=True)
    x0, variable = torch.as_tensor(fields[pick]).repeat_interleave(draws, 0), split.variable
    truth = shell_spectra(fields[pick], variable, kmax)
    # the sequential sampler first among those a plan weighs: the method's reference, or for
    # a planned method (auto...) its family's sequential sampler
    method, grid, bands = methods_of(cfg)[0], sampler_grid(s, model), octave_bands(kmax)
    on_rank0(comm, check_step_lengths, dataclasses.replace(s, method=method), grid)  # said once
    options = sampler_options(s)
    names = [f"k={lo}..{hi}" for lo, hi in bands] + [f"k<={kmax}"]
    given = f", {draws} draws each given its coarse field" if coarse_given else ""
    print0(comm, f"piadm bench --renoise: {len(pick)} held-out fields of {split.data}"
                 f"{given}, noised to u and sampled back by {method} ({s.grid} grid below u, "
                 f"to u_min {s.u_min:g}); energy over the same fields' (near 1 for an exact "
                 f"model where the steps are fine enough; {s.steps} steps add {method}'s own "
                 "error):")
    out0(comm, f"{'u':>7} {'sigma':>8} {'steps':>6} " + " ".join(f"{n:>9}" for n in names))
    units = _units(model, coarse, len(pick), draws, comm, device)
    rows = []
    # levels at or below the grid's end have no steps to sample back
    for u in (*(level for level in LEVELS if float(grid.u[-1]) < level < s.u_max), s.u_max):
        mine = [np.empty((0, kmax))]
        for a, b, item, bound, members in units:
            noise = Noise.members(s.seed, item, members, shape, DTYPES[s.dtype], device, s.noise)
            y = renoised(bound, x0[a:b].to(device), grid, u, noise, method, options)
            mine.append(shell_spectra(y.detach().cpu().numpy(), variable, kmax))
        ens = np.concatenate(comm.allgather_object(np.concatenate(mine)))
        ratios = band_ratios(ens, truth, bands)
        steps = from_level(grid, u).steps
        rows.append({"u": u, "sigma": math.sqrt(math.expm1(u)), "steps": steps,
                     "ratios": dict(zip(names, map(float, ratios)))})
        out0(comm, f"{u:7.3g} {rows[-1]['sigma']:8.3g} {steps:6d} "
                   + " ".join(f"{r:9.3f}" for r in ratios))
    if json_path:  # on_rank0: a full disk ends every rank together
        on_rank0(comm, replace_text, json_path, json_text(
            {"method": method, "fields": len(pick), "draws": draws, "rows": rows}, indent=1))
    return rows
