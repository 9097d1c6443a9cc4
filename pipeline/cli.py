"""The ``piadm`` command: parse once at the edge, then call the library."""
from __future__ import annotations

import argparse
import sys

from pipeline import __version__
from pipeline.comm import SerialComm
from pipeline.config import ConfigError, load_config
from pipeline.console import print0
from pipeline.samplers import PicardDivergence
from pipeline.store import StoreExists

EXAMPLES = {
    "sample": "example: piadm sample jobs/configs/grf.toml --set ensemble.members=16",
    "bench": "example: piadm bench jobs/configs/grf.toml --json out/bench.json",
}


def _cmd_sample(args, comm) -> int:
    from pipeline.run import sample_to_store

    cfg = load_config(args.config, args.set)
    print0(comm, f"piadm sample: {cfg.sampler.method} on {cfg.model.kind} {list(cfg.model.shape)}, "
                 f"{cfg.ensemble.members} members -> {cfg.output.path}")
    summary = sample_to_store(cfg, comm=comm)
    print0(comm, f"done: {summary.members} members, {summary.rounds} parallel rounds, "
                 f"{summary.model_calls:.0f} model calls per member, {summary.seconds:.1f} s; "
                 f"open with xarray.open_zarr({summary.path!r})")
    return 0


def _cmd_bench(args, comm) -> int:
    from pipeline.bench import run_bench

    cfg = load_config(args.config, args.set)
    run_bench(cfg, json_path=args.json, comm=comm)
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    comm = SerialComm()
    try:
        return COMMANDS[args.command](args, comm)
    except (ConfigError, StoreExists, PicardDivergence) as err:
        print(f"piadm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
