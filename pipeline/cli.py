"""The ``piadm`` command: parse once at the edge, then call the library."""
from __future__ import annotations

import argparse
import sys
import traceback

from pipeline import __version__
from pipeline.comm import SerialComm, launched_by_mpi
from pipeline.config import ConfigError, load_config
from pipeline.console import print0
from pipeline.samplers import PicardDivergence
from pipeline.store import StoreExists

EXAMPLES = {
    "sample": "example: piadm sample jobs/configs/grf.toml --set ensemble.members=16",
    "bench": "example: piadm bench jobs/configs/grf.toml --json out/bench.json",
}


def _setup(args, world):
    """Config and rank grid: the same on every rank, so an error here is raised by all."""
    from pipeline.layout import place_rank, rank_grid

    try:
        cfg = load_config(args.config, args.set)
        ranks = rank_grid(world, cfg.parallel.time_slices)
    except ConfigError as err:
        err.collective = True
        raise
    device = place_rank(world, cfg.parallel.threads)
    return cfg, ranks, device


def _cmd_sample(args, world) -> int:
    from pipeline.run import sample_to_store

    cfg, ranks, device = _setup(args, world)
    print0(world, f"piadm sample: {cfg.sampler.method} on {cfg.model.kind} {list(cfg.model.shape)}, "
                  f"{cfg.ensemble.members} members -> {cfg.output.path}; {world.size} ranks = "
                  f"{ranks.groups} groups x {cfg.parallel.time_slices} time slices, {device}")
    summary = sample_to_store(cfg, ranks=ranks, device=device)
    print0(world, f"done: {summary.members} members, {summary.rounds} parallel rounds, "
                 f"{summary.model_calls:.0f} model calls per member, {summary.seconds:.1f} s; "
                 f"open with xarray.open_zarr({summary.path!r})")
    return 0


def _cmd_bench(args, world) -> int:
    from pipeline.bench import run_bench

    cfg, _, device = _setup(args, world)
    run_bench(cfg, json_path=args.json, comm=world, device=device)
    return 0


COMMANDS = {"sample": _cmd_sample, "bench": _cmd_bench}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="piadm", description="Block-parallel Picard sampling of "
                                "diffusion models for ensembles of physics fields.")
    p.add_argument("--version", action="version", version=f"piadm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"sample": "sample an ensemble into a Zarr store",
             "bench": "compare sequential and parallel samplers"}
    for name, text in helps.items():
        sp = sub.add_parser(name, help=text, description=text, epilog=EXAMPLES[name])
        sp.add_argument("config", help="TOML configuration file")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set sampler.steps=200 (repeatable)")
        if name == "bench":
            sp.add_argument("--json", metavar="PATH", help="also save the table as JSON")
    return p


USER_ERRORS = (ConfigError, StoreExists, PicardDivergence)


def world_comm():
    """MPI.COMM_WORLD when an MPI launcher started us, else the serial communicator."""
    if not launched_by_mpi():
        return SerialComm()
    from pipeline.comm import MPIComm
    from mpi4py import MPI

    return MPIComm(MPI.COMM_WORLD)


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error every rank raised together exits 2 on all of them; any other
    error under MPI aborts the whole job, so no rank waits forever in a collective."""
    args = parser().parse_args(argv)
    world = world_comm()
    try:
        return COMMANDS[args.command](args, world)
    except USER_ERRORS as err:
        if world.size == 1 or getattr(err, "collective", False):
            if world.rank == 0:
                print(f"piadm: error: {err}", file=sys.stderr, flush=True)
            return 2
        print(f"piadm: error on rank {world.rank}: {err}", file=sys.stderr, flush=True)
        world.abort(2)
    except Exception:
        if world.size == 1:
            raise
        print(f"piadm: rank {world.rank} failed, aborting all {world.size} ranks:\n"
              f"{traceback.format_exc()}", file=sys.stderr, flush=True)
        world.abort(1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
