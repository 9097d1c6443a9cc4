"""From a validated Config to samples: the pieces the CLI and the Python API share."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from models import build_model
from pipeline import __version__
from pipeline.comm import SerialComm
from pipeline.config import Config, SamplerConfig
from pipeline.console import on_rank0, print0
from pipeline.decomposition import share
from pipeline.grids import Grid, make_grid
from pipeline.layout import RankGrid, rank_grid
from pipeline.noise import Noise
from pipeline.samplers import SAMPLERS, Options, Stats
from pipeline.store import check_target, create_store, finalize, write_members

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def sampler_options(s: SamplerConfig) -> Options:
    """The sampler's typed options from the sampler section."""
    return Options(
        form=s.form, max_sweeps=s.max_sweeps, tol=s.tol, window=s.window,
        on_divergence=s.on_divergence, corrector_steps=s.corrector_steps,
        corrector_length=s.corrector_length, corrector_gamma=s.corrector_gamma,
        corrector_sweeps=s.corrector_sweeps, denoise_final=s.denoise_final,
    )


def sampler_grid(s: SamplerConfig) -> Grid:
    """The blocked OU-clock grid of the sampler section."""
    return make_grid(s.grid, s.steps, u_min=s.u_min, u_max=s.u_max, block_size=s.block_size,
                     knee=s.knee)


def member_batches(members: int, batch_size: int) -> list[tuple[int, ...]]:
    """Consecutive member batches [(0..b-1), (b..2b-1), ...]; the last may be short."""
    return [tuple(range(a, min(a + batch_size, members))) for a in range(0, members, batch_size)]


@dataclass(frozen=True)
class Batch:
    """One sampled batch: member ids, fields (B, *shape) and the sampler's stats."""

    members: tuple[int, ...]
    fields: torch.Tensor
    stats: Stats


def sample_batches(model, *, method: str, grid: Grid, options: Options, seed: int,
                   batches: list[tuple[int, ...]], dtype: torch.dtype, comm=SerialComm(),
                   item: int = 0, device: str | torch.device = "cpu") -> Iterator[Batch]:
    """Sample each member batch with keyed noise (seed, item, member, step); ``comm`` holds the
    time slices that share each batch's Picard blocks."""
    sampler = SAMPLERS[method]
    for members in batches:
        noise = Noise(seed, tuple((item, m) for m in members), tuple(model.shape), dtype, device)
        y, stats = sampler(model, noise.prior(), grid, noise, comm=comm, options=options)
        yield Batch(members, y, stats)


def provenance(cfg: Config) -> dict:
    """Store attributes that say how the ensemble was made."""
    s = cfg.sampler
    return {
        "title": "piadm ensemble",
        "piadm_version": __version__,
        "config": cfg.text,
        "config_sha256": cfg.digest,
        "sampler_method": s.method,
        "sampler_steps": s.steps,
        "sampler_block_size": s.block_size,
        "sampler_seed": s.seed,
        "model_kind": cfg.model.kind,
        "u_min": s.u_min,
        "denoised": int(s.denoise_final),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dataclass(frozen=True)
class Summary:
    """What ``sample_to_store`` did."""

    path: str
    members: int
    rounds: int
    model_calls: float
    seconds: float


def _create(cfg: Config, model) -> None:
    create_store(cfg.output.path, shape=tuple(model.shape), members=cfg.ensemble.members,
                 member_chunk=cfg.ensemble.batch_size, dtype=cfg.sampler.dtype,
                 attrs=provenance(cfg), overwrite=cfg.output.overwrite)


def sample_to_store(cfg: Config, *, ranks: RankGrid | None = None,
                    device: str | torch.device = "cpu") -> Summary:
    """Sample ``cfg``'s ensemble into its Zarr store, printing progress on rank 0.

    Each group of ``ranks`` samples a contiguous share of the member batches, its time slices
    splitting every block; the group's first slice writes the batch (one whole chunk)."""
    ranks = ranks or rank_grid(SerialComm(), 1)
    world, slices = ranks.world, ranks.slices
    model = build_model(cfg.model)
    grid, options = sampler_grid(cfg.sampler), sampler_options(cfg.sampler)
    batches = member_batches(cfg.ensemble.members, cfg.ensemble.batch_size)
    mine = share(batches, ranks.groups, ranks.group)
    on_rank0(world, _create, cfg, model)  # checks the target before anything is written
    world.barrier()
    start, rounds, calls, done = time.perf_counter(), 0, 0.0, 0
    total = sum(len(b) for b in mine)
    for batch in sample_batches(model, method=cfg.sampler.method, grid=grid, options=options,
                                seed=cfg.sampler.seed, batches=mine,
                                dtype=DTYPES[cfg.sampler.dtype], comm=slices, device=device):
        if slices.rank == 0:
            write_members(cfg.output.path, batch.members[0], batch.fields.cpu().numpy(),
                          batch.stats.rounds, batch.stats.model_calls)
        done += len(batch.members)
        rounds, calls = rounds + batch.stats.rounds, calls + batch.stats.model_calls * len(batch.members)
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (total - done)
        print0(world, f"group {ranks.group + 1}/{ranks.groups}: members {done}/{total}  "
                      f"rounds {batch.stats.rounds}  "
                      f"model calls/member {batch.stats.model_calls:.0f}  "
                      f"elapsed {elapsed:.1f}s  eta {eta:.1f}s")
    world.barrier()
    on_rank0(world, finalize, cfg.output.path)
    # Each group's time slices count the same calls once each: count one slice per group.
    head = torch.tensor([calls if slices.rank == 0 else 0.0, float(rounds)], dtype=torch.float64)
    calls_all = float(world.allreduce_sum(head)[0])
    rounds_max = int(world.allreduce_max(head)[1])
    return Summary(cfg.output.path, cfg.ensemble.members, rounds_max,
                   calls_all / cfg.ensemble.members, time.perf_counter() - start)
