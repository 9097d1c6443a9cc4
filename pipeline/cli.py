"""The ``piadm`` command: parse once at the edge, then call the library."""
from __future__ import annotations

import os
import sys
import tempfile

from pipeline.signals import (defer_early, ignore_stop_signals, interrupted_by_stop_signals,
                              settle_zarr_io, stopped_by)

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "piadm":
    defer_early()  # before the heavy imports below: a stop signal now must not kill the job

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

# Only light modules here: parsing (and --help) must not wait for torch, xarray or zarr;
# each command imports what it needs.
from pipeline import __version__  # noqa: E402
from pipeline.config import (ConfigError, check_same_config, load_config,  # noqa: E402
                             read_toml, with_settings)
from pipeline.console import on_every_rank, on_rank0, print0, say, tag  # noqa: E402
from pipeline.environment import environment_settings, from_environment  # noqa: E402
from pipeline.errors import raised_by_every_rank  # noqa: E402
from pipeline.settings import AUTO_METHODS, PEERS  # noqa: E402

EXAMPLES = {
    "sample": "example: piadm sample jobs/configs/grf.toml --set ensemble.members=16",
    "bench": "example: piadm bench jobs/configs/grf.toml --json out/bench.json",
    "calibrate": "example: piadm calibrate jobs/configs/kolmogorov_uncond.toml",
    "plan": "example: piadm plan jobs/configs/grf.toml --ranks 8 --set ensemble.members=64",
    "config": "example: piadm config jobs/configs/grf.toml --set sampler.steps=200",
    "status": "example: piadm status out/grf.zarr   (exit 0 when complete, 1 when not)",
    "generate-data": "example: piadm generate-data jobs/configs/kolmogorov.toml --set data.snapshots=100",
    "train": "example: mpiexec -n 2 piadm train jobs/configs/kolmogorov.toml --set train.steps=500",
    "evaluate": "example: piadm evaluate out/kolmogorov_down_ensemble.zarr --truth "
                "out/kolmogorov_1600.zarr   (writes out/kolmogorov_down_ensemble_eval/)",
}


SET_EXAMPLES = {"sample": "ensemble.members=16", "bench": "sampler.steps=200",
                "calibrate": "calibrate.members=8", "plan": "ensemble.members=64",
                "config": "sampler.steps=200", "generate-data": "data.snapshots=100",
                "train": "train.steps=500"}


def overrides(args) -> list[str]:
    """The ``--set`` overrides of a command: ``PIADM_SET``'s items first, then the command
    line's."""
    return [*environment_settings(), *args.set]


SAMPLING = ("model", "sampler", "ensemble", "output", "input", "parallel")
READS = {"sample": SAMPLING, "plan": SAMPLING, "bench": (*SAMPLING, "bench"),
         "calibrate": (*SAMPLING, "calibrate"), "generate-data": ("data",),
         "train": ("train", "data")}  # the sections a command's config is for


def _load(args):
    """The config of ``args``, refusing a file that has sections but none of those its
    command reads (a generate-data config given to sample would run on defaults alone)."""
    if args.config is not None:
        tree = read_toml(args.config)
        held = [name for name, table in tree.items() if isinstance(table, dict)]
        wanted = READS.get(args.command, ())
        # a key outside every section: load_config names it and the section that has it
        if held and wanted and not set(held) & set(wanted) and len(held) == len(tree):
            raise ConfigError(
                f"config file {args.config} has [{'], ['.join(held)}] and none of the sections "
                f"piadm {args.command} reads ([{'], ['.join(wanted)}]): give a config for "
                f"{args.command}, e.g. one of jobs/configs/")
    return load_config(args.config, overrides(args))


def _setup(args, world, plan: bool = False, layout: bool = True, stop=None):
    """Config, rank grid and device: the same on every rank, so an error here is raised by
    all. ``plan``: resolve ``"auto"`` sampler and time slices (``pipeline.planner``) and
    return the store attributes recording the choice too; other commands run ``"auto"``
    time slices as one group of every rank. Without ``layout`` (a command that does not
    sample on this launch's ranks) the rank grid is None and the time slices are not
    checked against the launch: a job's config then works on a login node too. ``stop``: a
    stop request that ends the planning between its measurements (``calibrate.Stopped``)."""
    from pipeline.layout import place_rank, rank_grid
    from pipeline.planner import resolve_plan
    from pipeline.settings import needs_plan

    # a config may fail its checks on some ranks only (a PIADM_SET that differs between
    # nodes): every rank must then stop, not wait for it in check_same_config
    cfg = on_every_rank(world, lambda: _load(args))
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("config", "set")}
    check_same_config(world, cfg, f"piadm {args.command}", mode=repr(options))
    if args.command == "sample":  # the store's own spelling of the files it was made from
        from pipeline.identity import as_stored

        cfg = on_rank0(world, as_stored, cfg)
    device = place_rank(world, cfg.parallel.threads, math.prod(cfg.model.shape),
                        cfg.parallel.keep_freed, cfg.parallel.wait, cfg.model.tf32)
    attrs = {}
    if plan and needs_plan(cfg):
        cfg, attrs = resolve_plan(cfg, world, device, stopped=lambda: bool(stop))
    slices = world.size if cfg.parallel.time_slices == "auto" else cfg.parallel.time_slices
    with raised_by_every_rank():
        ranks = rank_grid(world, slices) if layout else None
    return (cfg, ranks, device, attrs) if plan else (cfg, ranks, device)


def _stopped_before_sampling(world) -> int:
    from pipeline.signals import EXIT_PREEMPTED

    print0(world, "piadm: stopped by a signal before sampling began: nothing was written; "
                  f"rerun the same command to start (exit {EXIT_PREEMPTED})")
    return EXIT_PREEMPTED


def _cmd_sample(args, world) -> int:
    from pipeline.ensemble import sample_to_store
    from pipeline.samplers import redone
    from pipeline.signals import EXIT_PREEMPTED, StopRequest

    stop = StopRequest(tag(world)).install()
    if args.dry_run:
        from pipeline.dry_run import dry_run

        from pipeline.ensemble import memory_sharing

        cfg, ranks, device = _setup(args, world)
        text, runs = on_rank0(world, dry_run, cfg, ranks, device, memory_sharing(world, device))
        print0(world, text)
        return 0 if runs else 2  # a script's pre-check: the run itself would be refused
    from pipeline.calibrate import Stopped

    try:
        cfg, ranks, device, attrs = _setup(args, world, plan=True, stop=stop)
    except Stopped:
        return _stopped_before_sampling(world)
    guided = (f" (autoguided by {cfg.model.guide}, weight {cfg.model.guidance:g})"
              if cfg.model.guide else "")
    print0(world, f"piadm sample: {cfg.sampler.method} on {cfg.model.kind} {list(cfg.model.shape)}"
                  f"{guided}, "
                  f"{cfg.ensemble.members} members -> {cfg.output.path}; {world.size} "
                  f"rank{'s' if world.size > 1 else ''} = "
                  f"{ranks.groups} group{'s' if ranks.groups > 1 else ''} x "
                  f"{cfg.parallel.time_slices} time slice{'s' if ranks.slices.size > 1 else ''}, "
                  f"{device}")
    summary = sample_to_store(cfg, ranks=ranks, device=device, stop=stop, attrs=attrs)
    if not summary.began:
        return _stopped_before_sampling(world)
    share = summary.write_wait_s / summary.seconds if summary.seconds else 0.0
    where = "" if summary.preempted else f"\n  open with        xarray.open_zarr({summary.path!r})"
    print0(world, f"{'stopped' if summary.preempted else 'done'}: {summary.members} members "
                  f"written to {summary.path} ({summary.skipped} were already done)\n"
                  f"  parallel rounds  {summary.rounds} in all, at most {summary.batch_rounds} a "
                  "batch (the slowest group's batches, one after another)\n"
                  f"  model calls      {summary.model_calls:.0f} per member\n"
                  f"{_against_sequential(cfg, summary)}"
                  f"  wall time        {summary.seconds:.2f} s; writing {summary.write_s:.1f} s, "
                  f"of which {summary.write_wait_s:.1f} s ({100 * share:.1f}%) held up sampling{where}")
    if summary.fallbacks:
        print0(world, f"note: {redone(summary.fallbacks)}")
    if summary.preempted:
        print0(world, f"piadm: stopped by a signal; rerun the same command to resume "
                      f"(exit {EXIT_PREEMPTED})")
        return EXIT_PREEMPTED
    return 0


def _against_sequential(cfg, summary) -> str:
    """What the parallel sampler bought over the sequential one for the same members: the
    sequential path takes one round and one model call per step."""
    from pipeline.samplers import REFERENCE

    s = cfg.sampler
    if REFERENCE[s.method] == s.method or not summary.members:
        return ""
    steps = s.steps + int(s.denoise_final)
    return (f"  vs sequential    {REFERENCE[s.method]} would take {steps} rounds and {steps} "
            f"model calls per batch and member; {s.method} took at most {summary.batch_rounds} "
            f"rounds ({_times(summary.batch_rounds, steps)}) for "
            f"{summary.model_calls / steps:.1f}x the calls\n")


def _times(ours: float, theirs: float) -> str:
    """``ours`` against ``theirs`` as "2.0x fewer", "1.1x more" or "as many"."""
    if ours == theirs:
        return "as many"
    if ours < theirs:
        return f"{theirs / max(ours, 1):.1f}x fewer"
    return f"{ours / theirs:.1f}x more"


def _cmd_bench(args, world) -> int:
    _check_bench_flags(args)  # the arguments first: refused before torch loads or a bench runs
    _output_file("--json", args.json)
    _figure_file("--png", args.png)
    cfg, _, device = _setup(args, world)
    if args.quality is not None:
        from pipeline.equal_quality import parse_quality, run_quality

        run_quality(cfg, parse_quality(args.quality), comm=world, device=device, json_path=args.json,
                    png_path=args.png)
        return 0
    if args.renoise:
        from pipeline.renoise import run_renoise

        run_renoise(cfg, comm=world, device=device, json_path=args.json)
        return 0
    if args.peer:
        from pipeline.bench import run_peer

        run_peer(cfg, args.peer, comm=world, device=device)
        return 0
    from pipeline.bench import run_bench

    run_bench(cfg, json_path=args.json, png_path=args.png, compare=tuple(args.compare),
              comm=world, device=device)
    return 0


# The files each kind of bench writes: any other output flag would be silently ignored.
BENCH_OUTPUTS = {"bench": ("--json", "--png", "--compare"), "bench --quality": ("--json", "--png"),
                 "bench --renoise": ("--json",), "bench --peer": ()}


def _check_bench_flags(args) -> None:
    """Refuse two benches at once, and an output flag the bench asked for does not write."""
    given = [flag for flag, on in (("--quality", args.quality is not None),
                                   ("--renoise", args.renoise), ("--peer", args.peer)) if on]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} are different benches: give one",
                          collective=True)
    mode = " ".join(["bench", *given])
    takes = BENCH_OUTPUTS[mode]
    for flag, value in (("--json", args.json), ("--png", args.png), ("--compare", args.compare)):
        if value and flag not in takes:
            kept = f"takes only {' and '.join(takes)}" if takes else "writes no file"
            raise ConfigError(f"{flag}: {mode} {kept}: drop {flag}", collective=True)
    if args.compare and not args.png:
        raise ConfigError("--compare adds earlier tables to the --png plot: give --png PATH too",
                          collective=True)


def _output_file(flag: str, path: str | None, name: str = "bench.json") -> None:
    """Refuse an output file that cannot be written, before the work whose result it holds
    (``name``: the file the error suggests in a directory given instead)."""
    if path is None:
        return
    from pipeline.store import enclosing_store

    if not path.strip():  # Path("") is the working folder, "a directory"
        raise ConfigError(f"{flag} is empty: give a file path, e.g. {name}", collective=True)
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory: give a file path, e.g. {p / name}",
                          collective=True)
    store = enclosing_store(p)
    if store is not None:  # written there, it would replace or join the store's own files
        raise ConfigError(f"{flag} {path} is inside the Zarr store {store}: give a path "
                          "outside it", collective=True)
    folder = next(f for f in (p.parent, *p.parent.parents) if f.exists())  # mkdir starts here
    if not folder.is_dir():
        raise ConfigError(f"{flag} {path}: {folder} is a file, so no folder can be made there: "
                          "give another path", collective=True)
    try:  # tried, not asked of os.access: root passes that check where no file can be made
        if p.exists():
            with open(p, "a"):
                pass
        else:
            fd, probe = tempfile.mkstemp(prefix=".piadm-check-", dir=folder)
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot write there ({err.strerror}): give another "
                          "path", collective=True) from None


def _figure_file(flag: str, path: str | None) -> None:
    """``_output_file``, and a suffix matplotlib saves a figure as."""
    _output_file(flag, path, "bench.png")
    if path is None:
        return
    from pipeline.figures import save_formats

    formats = save_formats()
    suffix = Path(path).suffix.lower().removeprefix(".")
    if suffix not in formats:
        why = f"'.{suffix}' is not a figure format" if suffix else "it has no suffix"
        raise ConfigError(f"{flag} {path}: {why}: end it in .png (or any of "
                          f"{', '.join(sorted(formats - {'png'}))})", collective=True)


def _cmd_calibrate(args, world) -> int:
    from models import build_model
    from pipeline.calibrate import cache_file
    from pipeline.ensemble import run_tolerance
    from pipeline.samplers import REFERENCE

    cfg, _, device = _setup(args, world, layout=False)
    if cfg.sampler.method in AUTO_METHODS:
        raise ConfigError(f"calibrate: sampler.method = {cfg.sampler.method!r} leaves the "
                          "sampler to the planner, which calibrates each one it weighs: run "
                          "piadm plan, or name a parallel sampler, e.g. pc-window",
                          collective=True)
    if REFERENCE[cfg.sampler.method] == cfg.sampler.method:
        raise ConfigError(f"calibrate: sampler.method = {cfg.sampler.method!r} has no tolerance "
                          "to calibrate: use a parallel sampler, e.g. pc-window",
                          collective=True)
    # whatever number the config's sampler.tol holds, the command calibrates (or reads the
    # cache): that choice is what runs with sampler.tol = "auto" take
    cfg = with_settings(cfg, {"sampler.tol": "auto"})
    model = build_model(cfg.model, device)
    result = on_rank0(world, run_tolerance, cfg, model, device, force=args.force, store=False,
                      say=lambda text: print0(world, text))
    where = "measured now" if result.rungs else f"calibrated earlier, {cache_file()}"
    print0(world, f"sampler.tol = {result.tol:g} for {cfg.sampler.method} ({where}); "
                  "runs with sampler.tol = \"auto\" and these [sampler], [calibrate] and model "
                  "settings use it")
    return 0


def _cmd_plan(args, world) -> int:
    from models import build_model
    from pipeline.run_items import first_item_model
    from pipeline.planner import make_plan, settings, table, describe

    _output_file("--json", args.json, "plan.json")
    for flag, value, least in (("--ranks", args.ranks, 1), ("--gpus-per-node",
                                args.gpus_per_node, 0), ("--rows", args.rows, 1)):
        if value < least:
            raise ConfigError(f"plan: {flag} {value} must be >= {least}", collective=True)
    cfg, _, device = _setup(args, world, layout=False)

    def plan_here():
        model = first_item_model(cfg, build_model(cfg.model, device), device)
        say(f"piadm plan: {cfg.ensemble.members} members of {cfg.model.kind} "
            f"{list(cfg.model.shape)}, {cfg.sampler.steps} steps, on {args.ranks} "
            f"rank{'s' if args.ranks != 1 else ''}"
            + (f" ({args.gpus_per_node} GPUs a node)" if args.gpus_per_node else
               f" of this node ({'its CPU' if device.type == 'cpu' else device})"))
        if args.gpus_per_node and device.type != "cuda":  # measured here, planned for there
            say("plan: this machine has no GPU: the cost of a model call is measured on its "
                "CPU, not on a GPU; run piadm plan on a node of the job's GPUs to plan for them")
        return make_plan(cfg, model, device, ranks=args.ranks, gpus_per_node=args.gpus_per_node,
                         say=say)

    plan = on_rank0(world, plan_here, idle=True)
    chosen = settings(plan.best)
    print0(world, table(plan, rows=args.rows))
    print0(world, describe(plan))
    print0(world, "use: " + " ".join(f"--set {k}={v!r}" if isinstance(v, str) else
                                     f"--set {k}={v}" for k, v in chosen.items()))
    if args.json and world.rank == 0:
        rows = [{**dataclasses.asdict(p.layout), "steps": p.profile.steps or cfg.sampler.steps,
                 "rounds": p.rounds,
                 "calls": p.profile.calls, "tol": p.profile.tol, "round_s": p.round_s,
                 "batches": p.batches, "predicted_s": p.seconds} for p in plan.ranked]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": dataclasses.asdict(plan.machine),
                                               "settings": chosen, "layouts": rows}, indent=1))
    return 0


def _cmd_generate(args, world) -> int:
    from pipeline.console import on_rank0
    from pipeline.generate import generate

    cfg, _, device = _setup(args, world, layout=False)
    d = cfg.data
    print0(world, f"piadm generate-data: Kolmogorov flow {d.resolution}x{d.resolution}, "
                  f"nu {d.viscosity}, {d.snapshots} snapshots every {d.interval} after "
                  f"{d.spinup} of spin-up -> {d.path}")
    path = on_rank0(world, generate, d, config_text=cfg.text, device=device,
                    progress=lambda text: print0(world, text))
    print0(world, f"done: open with xarray.open_zarr({path!r})")
    return 0


def _cmd_train(args, world) -> int:
    from pipeline.train import loss_text, train

    cfg, _, device = _setup(args, world, layout=False)
    t = cfg.train
    mix = f" + global mixing of k <= {t.global_modes}" if t.global_modes else ""
    print0(world, f"piadm train: U-Net {list(t.channels)}{mix} on {t.data}:{t.variable}"
                  f"{' | ' + t.condition if t.condition else ''}"
                  f"{f' (+ {len(t.extra)} more stores)' if t.extra else ''}, {t.steps} steps of "
                  f"{t.batch_size} over {world.size} ranks -> {t.checkpoint}")
    result = train(t, comm=world, device=device, config_text=cfg.text)
    print0(world, f"done: step {result.step}, last batch's loss {result.train_loss:.4f}, "
                  f"validation loss {loss_text(result.val_loss)}, {result.seconds:.0f} s; "
                  f"checkpoint {t.checkpoint}")
    return 0


def _cmd_evaluate(args, world) -> int:
    from pipeline.console import on_rank0
    from pipeline.scoring import evaluate, table

    metrics, files = on_rank0(world, evaluate, args.store, args.truth,
                              truth_variable=args.truth_variable,
                              truth_range=tuple(args.truth_range) if args.truth_range else None,
                              kmax=args.kmax, cut=args.cut, out=args.out)
    if world.rank == 0:  # --json: the document evaluate saved as metrics.json
        print(files[0].read_text() if args.json else table(metrics), flush=True)
    print0(world, "wrote " + ", ".join(str(f) for f in files))
    return 0


def _cmd_config(args, world) -> int:
    cfg = on_every_rank(world, lambda: load_config(args.config, overrides(args)))
    if world.rank == 0:
        print(cfg.text, end="", flush=True)
    return 0


def _cmd_status(args, world) -> int:
    from pipeline.status import progress, report, verify

    if args.repair and not args.verify:
        raise ConfigError("status --repair works with --verify: add --verify")
    if args.verify:
        text, complete = verify(args.store, args.repair, args.json)
    elif args.json:
        state = progress(args.store)
        text, complete = json.dumps(state, indent=1), state["complete"]
    else:
        text, complete = report(args.store)
    if world.rank == 0:
        print(text, flush=True)
    return 0 if complete else 1


COMMANDS = {"sample": _cmd_sample, "bench": _cmd_bench, "calibrate": _cmd_calibrate,
            "plan": _cmd_plan, "config": _cmd_config, "status": _cmd_status,
            "generate-data": _cmd_generate, "train": _cmd_train, "evaluate": _cmd_evaluate}


def _status_arguments(sp) -> None:
    sp.add_argument("store", help="path of the ensemble store")
    sp.add_argument("--json", action="store_true",
                    help="print one JSON document (members done per item, complete)")
    sp.add_argument("--verify", action="store_true",
                    help="also read every member marked done and report those that are "
                         "unreadable or not finite (damaged after writing); exit 0 "
                         "only when the store is complete and sound")
    sp.add_argument("--repair", action="store_true",
                    help="with --verify: mark the damaged members not done, so that "
                         "rerunning the sample command samples them again")


def _calibrate_arguments(sp) -> None:
    sp.add_argument("--force", action="store_true",
                    help="measure anew even when a calibration is cached")


def _sample_arguments(sp) -> None:
    sp.add_argument("--dry-run", action="store_true",
                    help="print the items, members, batches, store, rank layout and "
                         "sampler settings the run would use, and write nothing (exit "
                         "2 when the run would refuse its model, its store or its batch)")


def _plan_arguments(sp) -> None:
    sp.add_argument("--ranks", type=int, required=True, help="ranks the job will run")
    sp.add_argument("--gpus-per-node", type=int, default=0, metavar="G",
                    help="one rank per GPU on nodes of G GPUs (default: every rank on "
                         "this node's CPU cores)")
    sp.add_argument("--rows", type=int, default=12, help="layouts to show (default 12)")
    sp.add_argument("--json", metavar="PATH", help="also save every layout as JSON")


def _bench_arguments(sp) -> None:
    sp.add_argument("--peer", choices=PEERS, help="run the peer library's parallel "
                    "sampler beside piadm's on DDPM-1000 (needs piadm[bench])")
    sp.add_argument("--quality", metavar="Q",
                    help="bench each method at the fewest steps whose error is <= Q "
                         "(a number, or METHOD@STEPS: the error that sequential "
                         "sampler reaches in STEPS steps): "
                         "the exact W2 to the target on a grf, the log-spectral "
                         "distance to held-out data on a trained U-Net "
                         "(sampler.steps is searched, not taken)")
    sp.add_argument("--renoise", action="store_true",
                    help="where a trained U-Net loses energy: noise held-out fields to "
                         "a ladder of levels, sample them back, and print the energy "
                         "kept per octave band at each level")
    sp.add_argument("--json", metavar="PATH", help="also save the table as JSON")
    sp.add_argument("--png", metavar="PATH", help="also plot rounds and wall time "
                    "against d (and against ranks, with --compare) as a PNG (or PDF, "
                    "SVG, ...: by the suffix)")
    sp.add_argument("--compare", nargs="+", default=[], metavar="JSON",
                    help="earlier --json tables (e.g. at other rank counts) to plot too, "
                         "with --png")


def parser() -> argparse.ArgumentParser:
    """The ``piadm`` command line: one subcommand per ``COMMANDS`` entry, each with its own
    arguments (``_ARGUMENTS``) and an example in its help."""
    # allow_abbrev=False: "--dry" taken for --dry-run would change meaning when a flag is added
    p = argparse.ArgumentParser(
        prog="piadm", allow_abbrev=False, description="Block-parallel Picard sampling of "
        "diffusion models for ensembles of physics fields.",
        epilog="PIADM_SET holds more KEY=VALUE overrides, separated by ';' or new lines, "
        "that every command taking a config applies before its own --set. Exit codes: 0 "
        "done, 1 an unexpected failure (or status: incomplete), 2 an error told in one line: "
        "a bad input refused before anything was written, or a failure part way (a full "
        "disk, memory) that keeps the members written, 75 sample stopped by a signal (rerun "
        "to resume), 130 stopped at once by Ctrl-C, 143 or 138 any other command stopped by "
        "SIGTERM or SIGUSR1.")
    p.add_argument("--version", action="version", version=f"piadm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"sample": "sample an ensemble into a Zarr store (resumes an unfinished one, grows "
                       "one of fewer members)",
             "bench": "compare sequential and parallel samplers",
             "calibrate": "choose sampler.tol: the loosest that keeps a few members within "
                          "half of sampler.distance of the sequential path (cached)",
             "plan": "predict the time of every layout (sampler, groups x time slices, window, "
                     "batch) from measured model costs and rounds, and rank them",
             "config": "print the resolved configuration (file, overrides and defaults) as TOML",
             "status": "members done / total in an ensemble store",
             "generate-data": "simulate Kolmogorov-flow vorticity snapshots into Zarr",
             "train": "train a U-Net score model on a Zarr dataset (data-parallel)",
             "evaluate": "score an ensemble store against the truth: table, JSON, NetCDF, PNGs"}
    for name, text in helps.items():
        # the example as written, one line: wrapped, a pasted --set could lose its value
        sp = sub.add_parser(name, help=text, description=text, epilog=EXAMPLES[name],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
        if name not in ("status", "evaluate"):  # the commands that take a config
            sp.add_argument("config", help="TOML configuration file")
            sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help=f"override a config key, e.g. --set {SET_EXAMPLES[name]} "
                                 "(repeatable; after PIADM_SET's)")
        if name in _ARGUMENTS:
            _ARGUMENTS[name](sp)
    return p


def _evaluate_arguments(sp) -> None:
    sp.add_argument("store", help="the ensemble store (output.path of piadm sample)")
    sp.add_argument("--truth", required=True, metavar="PATH",
                    help="Zarr store of the true fields: paired item by item when it has the "
                         "ensemble's item dimension (e.g. time), else compared as a climatology")
    sp.add_argument("--truth-variable", metavar="NAME",
                    help="the truth's variable (default: the ensemble's variable name)")
    sp.add_argument("--truth-range", nargs=2, metavar=("START", "STOP"),
                    help="labels along the truth's first dimension to compare with "
                         "(climatology only), e.g. --truth-range 670.5 830")
    sp.add_argument("--kmax", type=int, metavar="K",
                    help="largest wavenumber in the spectrum score (default: n / 8)")
    sp.add_argument("--cut", type=int, metavar="K",
                    help="finest wavenumber the truth resolves: the spectral bands end there "
                         "(default: the truth's resolved_wavenumber attribute, else n / 2)")
    sp.add_argument("--json", action="store_true",
                    help="print the metrics as one JSON document (as saved in metrics.json) "
                         "instead of the table")
    sp.add_argument("--out", metavar="DIR",
                    help="the folder for metrics.json, metrics.nc and the figures (the table "
                         "is printed; default: STORE without .zarr + _eval)")


# each command's own arguments, after the config and --set of those that take one
_ARGUMENTS = {"status": _status_arguments, "evaluate": _evaluate_arguments,
              "calibrate": _calibrate_arguments, "sample": _sample_arguments,
              "plan": _plan_arguments, "bench": _bench_arguments}


def user_errors() -> tuple:
    """The errors a user's input causes: one line each, no traceback. Only light modules
    (no torch, xarray or dask), so that the error of a light command prints at once."""
    from pipeline.errors import BlowUp, EvaluationError, OutOfMemory, WriteFailed
    from pipeline.samplers.options import PicardDivergence
    from pipeline.status import NotAStore
    from pipeline.store import StoreExists

    return (ConfigError, StoreExists, PicardDivergence, NotAStore, EvaluationError, WriteFailed,
            OutOfMemory, OSError, BlowUp)


def _as_user_error(err: Exception, command: str) -> Exception:
    """An allocation that failed outside a sampled batch (which says its own settings) as
    one line naming what to lower; any other error as it is."""
    if "torch" not in sys.modules:  # nothing could have allocated through it
        return err
    from pipeline.errors import OutOfMemory
    from pipeline.memory import is_out_of_memory

    if isinstance(err, OutOfMemory) or not is_out_of_memory(err):
        return err
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return OutOfMemory(f"{command}: out of memory ({first}): lower what runs at once "
                       "(ensemble.batch_size, calibrate.members, bench.members, sampler.window "
                       "or sampler.block_size) or the field (model.shape), or add time slices")


def explain(err: Exception, sets: Sequence[str] = ()) -> str:
    """The one line a user error prints: an I/O failure names its file and what to check; a
    setting that came from PIADM_SET (not overridden by ``sets``, the --set items) says so."""
    if not isinstance(err, OSError) or type(err).__module__.startswith("pipeline"):
        return f"{err}{from_environment(str(err), sets)}"
    if type(err).__module__.startswith("zarr"):  # nothing found to read; the message names where
        return f"cannot read a Zarr store: {err}: check that the path is the store it should be"
    where = f" {err.filename}" if err.filename else ""
    return (f"cannot use{where}: {err.strerror or err}: check that the path exists, that you "
            "may write there and that its disk has space")


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error every rank raised together exits 2 on all of them; any other
    error under MPI aborts the whole job, so no rank waits forever in a collective."""
    args = parser().parse_args(argv)
    from pipeline.comm import world_comm

    world = world_comm()
    try:
        try:
            if args.command == "sample":  # it stops gracefully (pipeline.signals.StopRequest)
                return COMMANDS[args.command](args, world)
            with interrupted_by_stop_signals():  # the others say what they kept, as on Ctrl-C
                return COMMANDS[args.command](args, world)
        except Exception as err:
            mended = _as_user_error(err, args.command)
            if mended is err:
                raise
            raise mended from None
    except KeyboardInterrupt as err:  # Ctrl-C: what the command kept, not where it stood
        # a stop that landed in a Zarr call before it scheduled its coroutine leaves that
        # coroutine unawaited, held by ``err``'s frames: Python would warn of it once this
        # block lets go of them, after the stop's line, as if something else had failed
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                                category=RuntimeWarning)
        where = "" if world.size == 1 else f" on rank {world.rank}"
        what, code = stopped_by(err)
        # on a terminal a progress bar (or the ^C echo) may hold the line: start a new one
        fresh = "\n" if sys.stderr.isatty() else ""
        say(f"{fresh}piadm: {what}{where}{': ' if str(err) else ''}{err}")
        if world.size == 1:
            return code
        # each rank stopped wherever it stood: another may wait in a collective for it
        world.abort(code)
    except user_errors() as err:
        line = explain(err, getattr(args, "set", None) or ())
        if world.size == 1 or getattr(err, "collective", False):
            if world.rank == 0:
                say(f"piadm: error: {line}")
            return 2
        say(f"piadm: error on rank {world.rank}: {line}")
        world.abort(2)
    except Exception:
        if world.size == 1:
            raise
        say(f"piadm: rank {world.rank} failed, aborting all {world.size} ranks:\n"
              f"{traceback.format_exc()}")
        world.abort(1)
    return 1


def entry() -> None:
    """The ``piadm`` command: ``main``, then exit with its status, which a stop signal
    landing during the interpreter's shutdown no longer changes (``ignore_stop_signals``),
    nor a reader that closed its output early (``survive_closed_pipes``); both only here,
    not in ``main``, which tests and scripts call in a process that goes on."""
    from pipeline.console import survive_closed_pipes

    survive_closed_pipes()
    try:
        code = main()
    finally:
        ignore_stop_signals()
    if code >= 128:  # stopped by a signal: a read or write it cut short is still under way
        settle_zarr_io()
        # one that outlived the wait would be logged at exit (or warned of, as a coroutine
        # never awaited), after the stop's line, as if something else failed
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                                category=RuntimeWarning)
    sys.exit(code)


if __name__ == "__main__":
    entry()
