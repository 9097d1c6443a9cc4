"""The ``piadm`` command: parse once at the edge, then call the library."""
from __future__ import annotations

import os
import shlex
import sys
import time

from pipeline.signals import (allow_interrupts, defer_early, ignore_stop_signals,
                              interrupted_by_stop_signals, settle_zarr_io, stopped_by)

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "piadm":
    defer_early()  # before the heavy imports below: a stop signal now must not kill the job

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

# Only light modules here: parsing (and --help) must not wait for torch, xarray or zarr;
# each command imports what it needs.
from pipeline.arguments import (check_bench_flags, check_figure_file,  # noqa: E402
                                check_not_read, check_output_file, check_plan_flags,
                                check_status_flags, launched_rank, model_files, parser)
from pipeline.config import (SAMPLING_PATHS, TRAINING_PATHS, ConfigError,  # noqa: E402
                             load_config, read_toml, with_settings)
from pipeline.console import (fresh_line, on_every_rank, on_rank0, out, out0, print0,  # noqa: E402
                              say, tag)
from pipeline.environment import environment_settings  # noqa: E402
from pipeline.errors import (FailedElsewhere, PiadmError, StoppedTogether,  # noqa: E402
                             WriteFailed, as_user_error)
from pipeline.failures import explain, in_users_code, user_errors  # noqa: E402
from pipeline.settings import AUTO_METHODS  # noqa: E402


def _load_settings(args, tree: dict | None = None):
    """The config of ``args`` with ``PIADM_SET``'s items applied first, then its ``--set``
    items; ``tree``: the config file as read already."""
    return load_config(args.config if tree is None else tree, args.set,
                       environment=environment_settings())


SAMPLING = ("model", "sampler", "ensemble", "output", "input", "parallel")
READS = {"sample": SAMPLING, "plan": SAMPLING, "bench": (*SAMPLING, "bench"),
         "calibrate": (*SAMPLING, "calibrate"), "generate-data": ("data",),
         "train": ("train", "data")}  # the sections a command's config is for


def _load(args):
    """The config of ``args``, refusing a file that has sections but none of those its
    command reads (a generate-data config given to sample would run on defaults alone), and
    whether the file set no key at all."""
    tree = None
    if args.config is not None:
        tree = read_toml(args.config)  # read once: a file edited meanwhile is not read twice
        held = [name for name, table in tree.items() if isinstance(table, dict)]
        wanted = READS.get(args.command, ())
        # a key outside every section: load_config names it and the section that has it
        if held and wanted and not set(held) & set(wanted) and len(held) == len(tree):
            raise ConfigError(
                f"config file {args.config} has [{'], ['.join(held)}] and none of the sections "
                f"piadm {args.command} reads ([{'], ['.join(wanted)}]): give a config for "
                f"{args.command}, e.g. one of jobs/configs/")
    return _load_settings(args, tree), tree == {}


def _setup(args, world, plan: bool = False, layout: bool = True, stop=None):
    """Config, rank grid and device: the same on every rank, so an error here is raised by
    all (``pipeline.startup.start``, which the Python API's ``sample`` shares). ``plan``:
    resolve ``"auto"`` sampler and time slices and return the store attributes recording the
    choice too; without ``layout`` the rank grid is None (a command that does not sample on
    this launch's ranks: a job's config then works on a login node too); ``stop``: a stop
    request that ends the planning between its measurements."""
    from pipeline.startup import start

    # a config may fail its checks on some ranks only (a PIADM_SET that differs between
    # nodes): every rank must then stop, not wait for it in check_same_config
    cfg, empty = on_every_rank(world, lambda: _load(args))
    if empty:  # a file emptied or cut short by mistake runs on the defaults alone
        print0(world, f"piadm: warning: config file {args.config} sets no key: every setting "
                      "not given by --set or PIADM_SET takes its default (piadm config "
                      f"{args.config} prints them)")
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("config", "set")}
    paths = {"train": TRAINING_PATHS,
             "generate-data": ("data.path",)}.get(args.command, SAMPLING_PATHS)
    cfg, ranks, device, attrs = start(world, cfg, f"piadm {args.command}", mode=repr(options),
                                      paths=paths, stored=args.command == "sample", plan=plan,
                                      layout=layout, stop=stop)
    return (cfg, ranks, device, attrs) if plan else (cfg, ranks, device)


def _stopped_before_sampling(world) -> int:
    from pipeline.signals import EXIT_PREEMPTED

    print0(world, "piadm: stopped by a signal before sampling began: nothing was written; "
                  f"rerun the same command to start (exit {EXIT_PREEMPTED})")
    return EXIT_PREEMPTED


def _cmd_sample(args, world) -> int:
    from pipeline.plan_store import on_the_stores_plan
    from pipeline.signals import StopRequest

    stop = StopRequest(tag(world)).install()
    if args.dry_run:
        cfg, ranks, device = _setup(args, world)
        from pipeline.dry_run import dry_run
        from pipeline.memory import memory_sharing

        text, runs = on_rank0(world, dry_run, cfg, ranks, device, memory_sharing(world, device))
        print0(world, text)
        return 0 if runs else 2  # a script's pre-check: the run itself would be refused
    return on_the_stores_plan(lambda: _sample(args, world, stop),
                              lambda text: print0(world, f"piadm sample: {text}"))


def _sample(args, world, stop) -> int:
    """``piadm sample`` but its dry run, from the config to the closing lines."""
    from pipeline.signals import EXIT_PREEMPTED, Stopped

    began = time.perf_counter()
    try:
        cfg, ranks, device, attrs = _setup(args, world, plan=True, stop=stop)
    except Stopped:
        return _stopped_before_sampling(world)
    from pipeline.ensemble import sample_to_store
    from pipeline.sample_report import closing, fixed_sweeps_note, opening
    from pipeline.samplers import run_notes

    print0(world, opening(cfg, world.size, ranks, device))
    note = fixed_sweeps_note(cfg)  # the bare defaults' trap: no speed-up, many times the calls
    if note:
        print0(world, note)
    summary = sample_to_store(cfg, ranks=ranks, device=device, stop=stop, attrs=attrs)
    if not summary.began:
        return _stopped_before_sampling(world)
    print0(world, closing(cfg, summary, start_up=time.perf_counter() - began - summary.seconds))
    for line in run_notes(summary.fallbacks, summary.unsettled, cfg.sampler.max_sweeps):
        print0(world, line)
    if summary.preempted:
        print0(world, f"piadm: stopped by a signal; rerun the same command to resume "
                      f"(exit {EXIT_PREEMPTED})")
        return EXIT_PREEMPTED
    return 0


def _cmd_bench(args, world) -> int:
    check_bench_flags(args)  # the arguments first: refused before torch loads or a bench runs
    read = {"the config": args.config,
            **{f"a --compare table ({c})": c for c in args.compare or ()}}
    check_output_file("--json", args.json, read=read)
    check_figure_file("--png", args.png, {**read, "the --json file": args.json})
    # every rank is a time slice of the bench (README): the config's own slices are not its
    cfg, _, device = _setup(args, world, layout=False)
    read = model_files(cfg)  # known once the config is: the rest was checked above
    check_not_read("--json", args.json, "bench.json", read)
    check_not_read("--png", args.png, "bench.png", read)
    if args.quality is not None:
        from pipeline.equal_quality import parse_quality, run_quality

        run_quality(cfg, parse_quality(args.quality), comm=world, device=device,
                    json_path=args.json, png_path=args.png)
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


def _cached_calibration(cfg, model, device, force: bool, say):
    """Rank 0: ``run_tolerance`` of ``cfg`` (``sampler.tol = "auto"``), or WriteFailed where a
    tolerance measured now could not be cached: keeping it is the command's whole purpose,
    and runs with "auto" would measure it again."""
    from pipeline.cache import not_kept
    from pipeline.calibrate import cache_file
    from pipeline.run_start import run_tolerance

    result = run_tolerance(cfg, model, device, force=force, store=False, say=say)
    why = not_kept(cache_file()) if result.rungs else ""
    if why:  # the result still goes where results go, before the error that it was not kept
        out(f"sampler.tol = {result.tol:g} for {cfg.sampler.method} (measured now; not cached)")
        raise WriteFailed(f"calibrate: sampler.tol = {result.tol:g} for {cfg.sampler.method} "
                          f"could not be cached ({why}): set sampler.tol = {result.tol:g} in "
                          "the config, or give PIADM_CACHE a folder piadm can write")
    return result


def _cmd_calibrate(args, world) -> int:
    from models import build_model
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
    result = on_rank0(world, _cached_calibration, cfg, model, device, args.force,
                      lambda text: print0(world, text))
    uses = ("runs with sampler.tol = \"auto\" and these [sampler], [calibrate] and model "
            "settings use it")
    if result.rungs:
        out0(world, f"sampler.tol = {result.tol:g} for {cfg.sampler.method} (measured now); "
                    f"{uses}")
    else:  # the line before named the tolerance and the cache it came from
        out0(world, f"sampler.tol = {result.tol:g} for {cfg.sampler.method} (from the cache); "
                    f"{uses}; piadm calibrate --force measures it again")
    return 0


def _cmd_plan(args, world) -> int:
    from models import build_model
    from pipeline.plan_text import describe, table
    from pipeline.planner import collective_latency, make_plan, planned_items, settings
    from pipeline.run_items import first_item_model

    check_plan_flags(args)
    cfg, _, device = _setup(args, world, layout=False)
    check_not_read("--json", args.json, "plan.json", model_files(cfg))
    latency = collective_latency(world)  # among the launched ranks; a figure on one

    def plan_here():
        model = first_item_model(cfg, build_model(cfg.model, device), device)
        items = planned_items(cfg)
        say(f"piadm plan: {f'{items} items x ' if items > 1 else ''}"
            f"{cfg.ensemble.members} members of {cfg.model.kind} "
            f"{list(cfg.model.shape)}, {cfg.sampler.steps} steps, on {args.ranks} "
            f"rank{'s' if args.ranks != 1 else ''}"
            + (f" ({args.gpus_per_node} GPUs a node)" if args.gpus_per_node else
               f" of this node ({'its CPU' if device.type == 'cpu' else device})"))
        if world.size > 1 and world.size != args.ranks:  # the latency is these ranks'
            say(f"plan: the collectives' latency is timed among the {world.size} ranks of this "
                f"launch, for a plan of {args.ranks}: launch as many as --ranks to time theirs")
        if args.gpus_per_node and device.type != "cuda":  # measured here, planned for there
            say("plan: this machine has no GPU: the cost of a model call is measured on its "
                "CPU, not on a GPU; run piadm plan on a node of the job's GPUs to plan for them")
        return make_plan(cfg, model, device, ranks=args.ranks, gpus_per_node=args.gpus_per_node,
                         latency=latency, say=say, items=items)

    plan = on_rank0(world, plan_here, idle=True)
    chosen = settings(plan.best)
    if plan.best.layout.time_slices == 1:  # one slice holds the whole window either way
        chosen.pop("sampler.window_split", None)
    out0(world, table(plan, rows=args.rows))
    out0(world, describe(plan))
    out0(world, "use: " + " ".join(f"--set {k}={v!r}" if isinstance(v, str) else
                                   f"--set {k}={v}" for k, v in chosen.items()))
    if args.json:
        rows = [{**dataclasses.asdict(p.layout), "steps": p.profile.steps or cfg.sampler.steps,
                 "rounds": p.rounds,
                 "calls": p.profile.calls, "tol": p.profile.tol, "round_s": p.round_s,
                 "batches": p.batches, "predicted_s": p.seconds} for p in plan.ranked]
        from pipeline.jsontext import json_text
        from pipeline.processes import replace_text

        # on_rank0: a full disk ends every rank together (one line), not rank 0 alone
        on_rank0(world, replace_text, args.json, json_text(
            {"machine": dataclasses.asdict(plan.machine), "settings": chosen, "layouts": rows},
            indent=1))
    return 0


def _cmd_generate(args, world) -> int:
    from pipeline.console import on_rank0
    from pipeline.generate import generate

    cfg, _, device = _setup(args, world, layout=False)
    d = cfg.data
    banner = (f"piadm generate-data: Kolmogorov flow {d.resolution}x{d.resolution}, "
              f"nu {d.viscosity}, {d.snapshots} snapshots every {d.interval} after "
              f"{d.spinup} of spin-up -> {d.path}")
    path = on_rank0(world, generate, d, config_text=cfg.text, device=device,
                    progress=lambda text: print0(world, text), banner=banner)
    print0(world, f"done: open with xarray.open_zarr({path!r})")
    return 0


def _cmd_train(args, world) -> int:
    from pipeline.progress import clock, stamp
    from pipeline.signals import StopRequest
    from pipeline.train import loss_text, train

    cfg, _, device = _setup(args, world, layout=False)
    t = cfg.train
    mix = f" + global mixing of k <= {t.global_modes}" if t.global_modes else ""
    banner = (f"piadm train: U-Net {list(t.channels)}{mix} on {t.data}:{t.variable}"
              f"{' | ' + t.condition if t.condition else ''}"
              f"{f' (+ {len(t.extra)} more stores)' if t.extra else ''}, {t.steps} steps of "
              f"{t.batch_size} over {world.size} rank{'s' if world.size > 1 else ''} -> "
              f"{t.checkpoint}")
    stop = StopRequest(tag(world), "the step").install()  # one every rank ends on: no abort
    try:
        result = train(t, comm=world, device=device, config_text=cfg.text, stop=stop,
                       banner=banner)
    finally:
        stop.uninstall()
    use = shlex.quote(f'model.checkpoint="{t.checkpoint}"')  # to paste: a path may hold spaces
    print0(world, f"done: step {result.step}, last batch's loss {result.train_loss:.4f}, "
                  f"validation loss {loss_text(result.val_loss)}, {clock(result.seconds)}; "
                  f"checkpoint {t.checkpoint}; ended {stamp()}; to sample with it: piadm "
                  f"sample {shlex.quote(args.config)} --set {use} and an "
                  "output.path of its own")
    return 0


def _cmd_evaluate(args, world) -> int:
    from pipeline.console import on_rank0
    from pipeline.scoring import evaluate, table

    metrics, files = on_rank0(world, evaluate, args.store, args.truth,
                              truth_variable=args.truth_variable,
                              truth_range=tuple(args.truth_range) if args.truth_range else None,
                              kmax=args.kmax, cut=args.cut, out=args.out,
                              figures=not args.no_figures, progress=_scoring_progress())
    if world.rank == 0:  # rank 0 scored, and wrote the files (on its disk)
        # --json: the document evaluate saved as metrics.json
        out(files[0].read_text() if args.json else table(metrics))
    print0(world, "wrote " + ", ".join(str(f) for f in files))
    return 0


def _scoring_progress():
    """A progress bar for evaluate's pass over the items (on rank 0, which scores): a store of
    many items takes minutes to read."""
    from pipeline.comm import SerialComm
    from pipeline.progress import Progress

    bar = []

    def progress(done: int, total: int) -> None:
        if not bar:  # at the scoring's start (done 0), whose clock the pace is taken by
            bar.append(Progress(SerialComm(), total, "items scored"))
        if done > bar[0].done:
            bar[0].advance(done - bar[0].done)
        if done >= total:
            bar[0].close()

    return progress


def _cmd_config(args, world) -> int:
    cfg, empty = on_every_rank(world, lambda: _load(args))
    if empty:  # the check a script makes before it submits: said here as a run says it
        print0(world, f"piadm: warning: config file {args.config} sets no key: every setting "
                      "not given by --set or PIADM_SET takes its default")
    out0(world, cfg.text, end="")
    return 0


def _cmd_status(args, world) -> int:
    check_status_flags(args)
    # once, on rank 0: under mpiexec each rank said the same error, and --repair wrote twice
    text, complete = on_rank0(world, _status, args)
    out0(world, text)
    return 0 if complete else 1


def _status(args) -> tuple[str, bool]:
    """What ``piadm status`` prints, and whether the store is complete."""
    from pipeline.status import progress, read_through, report
    from pipeline.verify import verify

    with read_through(args.store):
        if args.verify:
            return verify(args.store, args.repair, args.json)
        if args.json:
            state = progress(args.store)
            return json.dumps(state, indent=1), state["complete"]
        return report(args.store)


COMMANDS = {"sample": _cmd_sample, "bench": _cmd_bench, "calibrate": _cmd_calibrate,
            "plan": _cmd_plan, "config": _cmd_config, "status": _cmd_status,
            "generate-data": _cmd_generate, "train": _cmd_train, "evaluate": _cmd_evaluate}


# The warnings of a brought network that every rank would print alike (models.module)
NETWORK_WARNINGS = (r"model\.target = .* is defined in no file", r"the network answers in ",
                    r"model\.weights = .* holds float64 values for the factory",
                    r"model\.path = .*: its scheduler's .* not applied")


# the commands that load torch (status, config and evaluate do not: they stay quick)
TORCH_COMMANDS = ("bench", "calibrate", "plan", "generate-data")


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error every rank raised together exits 2 on all of them; any other
    error under MPI aborts the whole job, so no rank waits forever in a collective."""
    args = parser().parse_args(argv)
    try:
        os.getcwd()
    except FileNotFoundError:  # torch's libraries then fail to load, naming neither
        print("piadm: error: the working folder no longer exists (deleted or moved since this "
              "shell entered it): cd to an existing folder and rerun", file=sys.stderr)
        return 2
    from pipeline.comm import world_comm

    try:
        world = world_comm()
    except PiadmError as err:  # PIADM_MPI set to what it does not take, no mpi4py: no world
        if launched_rank() == 0:  # to stop yet, and every rank alike: said once
            print(f"piadm: error: {err}", file=sys.stderr)
        return 2
    if world.rank > 0:  # every rank loads the same network: its warnings are rank 0's to say
        for said in NETWORK_WARNINGS:
            warnings.filterwarnings("ignore", message=said, category=UserWarning)
    allow_interrupts()  # Ctrl-C: said below with what the command kept
    try:
        try:
            if args.command in ("sample", "train"):  # they stop gracefully (StopRequest)
                return COMMANDS[args.command](args, world)
            if args.command in TORCH_COMMANDS:  # loaded while a stop is still held: raised
                # inside torch's C++ start-up, the stop aborted the process (exit 6)
                importlib.import_module("torch")
            with interrupted_by_stop_signals():  # the others say what they kept, as on Ctrl-C
                return COMMANDS[args.command](args, world)
        except Exception as err:
            mended = in_users_code(err, args.command) or as_user_error(err, args.command)
            if mended is err:
                raise
            raise mended from None
    except KeyboardInterrupt as err:  # Ctrl-C: what the command kept, not where it stood
        # a stop that landed in a Zarr call before it scheduled its coroutine leaves that
        # coroutine unawaited, held by ``err``'s frames: Python would warn of it once this
        # block lets go of them, after the stop's line, as if something else had failed
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                                category=RuntimeWarning)
        together = isinstance(err, StoppedTogether)  # every rank at one point: said once
        where = "" if world.size == 1 or together else f" on rank {world.rank}"
        what, code = stopped_by(err)
        if world.rank == 0 or not together:
            say(f"{fresh_line()}piadm: {what}{where}{': ' if str(err) else ''}{err}")
        if world.size == 1 or together:
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
    except Exception as err:
        if world.size == 1:
            raise
        if isinstance(err, FailedElsewhere):  # its traceback is rank 0's to print
            say(f"piadm: {err} (its traceback is printed there): aborting all {world.size} "
                "ranks")
        else:
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
