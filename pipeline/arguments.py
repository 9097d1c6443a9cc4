"""The ``piadm`` command line's arguments: each command's flags and its example, and the
checks of output files and flag combinations made before any costly work.

Light on purpose (no torch, xarray or dask), so that ``--help`` and a refused flag answer at
once.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.errors import did_you_mean
from pipeline.settings import PEERS


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


# The files each kind of bench writes: any other output flag would be silently ignored.
BENCH_OUTPUTS = {"bench": ("--json", "--png", "--compare"), "bench --quality": ("--json", "--png"),
                 "bench --renoise": ("--json",), "bench --peer": ()}


def check_bench_flags(args) -> None:
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


# The most ranks `piadm plan` weighs the layouts of (131072 took 2 s; 1e9 ran on for minutes)
MOST_PLANNED_RANKS = 1 << 17


def check_plan_flags(args) -> None:
    """Refuse ``plan``'s counts out of range (every layout of --ranks is weighed: too many
    would not end) and a --json file that cannot be written."""
    check_output_file("--json", args.json, "plan.json", {"the config": args.config})
    for flag, value, least in (("--ranks", args.ranks, 1), ("--gpus-per-node",
                                args.gpus_per_node, 0), ("--rows", args.rows, 1)):
        if value < least:
            raise ConfigError(f"plan: {flag} {value} must be >= {least}", collective=True)
    if args.ranks > MOST_PLANNED_RANKS:
        raise ConfigError(f"plan: --ranks {args.ranks} is more than the {MOST_PLANNED_RANKS} "
                          "ranks a plan weighs: plan for fewer", collective=True)


def check_status_flags(args) -> None:
    """Refuse ``status --repair`` without the --verify that finds what it repairs."""
    if args.repair and not args.verify:
        raise ConfigError("status --repair works with --verify: add --verify", collective=True)


def check_output_file(flag: str, path: str | None, name: str = "bench.json",
                      read: dict | None = None) -> None:
    """Refuse an output file that cannot be written, before the work whose result it holds
    (``name``: the file the error suggests in a directory given instead), or that is one of
    the files the command reads (``read``: {what it is: path}), which it would replace."""
    if path is None:
        return
    from pipeline.store import enclosing_store

    if not path.strip():  # Path("") is the working folder, "a directory"
        raise ConfigError(f"{flag} is empty: give a file path, e.g. {name}", collective=True)
    if path == "-":  # not standard output: a file named "-" was written
        raise ConfigError(f"{flag} takes a file path, not '-' (standard output): give a file, "
                          f"e.g. {name}, and read it from there", collective=True)
    p = Path(path)
    check_not_read(flag, path, name, read or {})
    store = enclosing_store(p / "file")  # ``p`` itself, or a store it lies inside
    if store is not None:  # written there, it would replace or join the store's own files
        where = ("is a Zarr store" if store == Path(os.path.abspath(p))
                 else f"is inside the Zarr store {store}")
        raise ConfigError(f"{flag} {path} {where}: give a path outside it, e.g. "
                          f"{Path(os.path.abspath(store)).parent / name}", collective=True)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory: give a file path, e.g. {p / name}",
                          collective=True)
    if p.exists() and not p.is_file():  # written aside and renamed in: it would be replaced
        raise ConfigError(f"{flag} {path} is no regular file (a pipe or a device, which a "
                          f"file written in its place would replace): give a file path, e.g. "
                          f"{name}", collective=True)
    from pipeline.cache import cache_path

    cache = cache_path(name).parent
    if _same_file(p.parent, cache) or any(_same_file(f, cache) for f in p.parent.parents):
        raise ConfigError(f"{flag} {path} is in piadm's cache folder {cache} (PIADM_CACHE), "
                          "whose measurements it would replace: give a path outside it, e.g. "
                          f"{name}", collective=True)
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


def check_not_read(flag: str, path: str | None, name: str, read: dict) -> None:
    """Refuse an output ``path`` that is one of the files the command reads (``read``: {what
    it is: path}) or lies inside one of its folders, which it would replace or join (alone,
    for files known only once the config is loaded: ``model_files``)."""
    if path is None:
        return
    p = Path(path)
    for what, other in read.items():
        if other and _same_file(p, Path(other)):  # the config was replaced by the results
            raise ConfigError(f"{flag} {path} is {what}, which it would replace: give another "
                              f"path, e.g. {p.parent / name}", collective=True)
        if other and Path(other).is_dir() and _inside(p, Path(other)):  # a network's folder
            raise ConfigError(f"{flag} {path} is inside {what}, whose files it would join or "
                              f"replace: give a path outside it, e.g. {name}", collective=True)


def model_files(cfg) -> dict:
    """The files a config's model is read from ({what it is: path}, for ``check_output_file``):
    a --json written over a checkpoint replaced the trained weights with the bench's table."""
    from models.checkpoint import sidecar

    read = {}
    for key in ("checkpoint", "guide", "weights", "path"):
        value = getattr(cfg.model, key, "")
        if value and isinstance(value, str):  # gmm's weights are the mixture's, no file
            read[f"model.{key} ({value})"] = value
            if key in ("checkpoint", "guide"):
                read[f"model.{key}'s sidecar"] = str(sidecar(Path(value)))
    return read


def _inside(a: Path, folder: Path) -> bool:
    """Whether ``a`` lies inside ``folder`` (through links, other spellings)."""
    return Path(os.path.realpath(folder)) in Path(os.path.realpath(a)).parents


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (through links, other spellings)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return os.path.realpath(a) == os.path.realpath(b)  # one not written yet
    except OSError:
        return False


def check_figure_file(flag: str, path: str | None, read: dict | None = None) -> None:
    """``check_output_file``, and a suffix matplotlib saves a figure as."""
    check_output_file(flag, path, "bench.png", read)
    if path is None:
        return
    from pipeline.figures import save_formats

    formats = save_formats()
    suffix = Path(path).suffix.lower().removeprefix(".")
    if suffix not in formats:
        why = f"'.{suffix}' is not a figure format" if suffix else "it has no suffix"
        raise ConfigError(f"{flag} {path}: {why}: end it in .png (or any of "
                          f"{', '.join(sorted(formats - {'png'}))})", collective=True)


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
                         "2 when the run would refuse its model, its store or its batch, "
                         "or stop on a calibration that fell short)")


def _plan_arguments(sp) -> None:
    sp.add_argument("--ranks", type=int, required=True, help="ranks the job will run")
    sp.add_argument("--gpus-per-node", type=int, default=0, metavar="G",
                    help="one rank per GPU on nodes of G GPUs (0, the default: every "
                         "rank on this node's CPU cores)")
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
    sp.add_argument("--no-figures", action="store_true",
                    help="write the scores alone (metrics.json, metrics.nc), not the PNGs: "
                         "drawing them takes most of a small store's evaluation")


# each command's own arguments, after the config and --set of those that take one
_ARGUMENTS = {"status": _status_arguments, "evaluate": _evaluate_arguments,
              "calibrate": _calibrate_arguments, "sample": _sample_arguments,
              "plan": _plan_arguments, "bench": _bench_arguments}


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors point at the likely fix: a misspelt command or flag gets
    the nearest one, and a flag the command lacks gets that command's usage, not piadm's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}  # piadm's: name -> its parser

    def parse_args(self, args=None, namespace=None):
        known, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(known, "command", None), self)
            flags = [flag for action in command._actions for flag in action.option_strings]
            first = next((e for e in extras if e.startswith("-")), "").split("=")[0]
            hint = (f" (a flag of piadm {known.command}: put it after the command)"
                    if first in flags else did_you_mean(first, flags) if first else "")
            command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        _check_tildes(self.commands.get(getattr(known, "command", None), self), known)
        return known

    def _print_message(self, message: str, file=None) -> None:
        # parsed before MPI starts, on every rank alike: a mistyped command line (or --help)
        # is said by the launcher's rank 0 alone, not once per rank
        if launched_rank() == 0:
            super()._print_message(message, file)

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)'", message)
        if choice and self.commands:  # a misspelt command
            message += did_you_mean(choice.group(1), self.commands)
        super().error(message)


# The arguments that name files: a shell expands "~" only at a word's start, so
# --out=~/ev reached piadm as written; xarray expands it and the rest of piadm does not, and
# an evaluation was left half in "./~/ev", half in $HOME/ev
_PATHS = {"config": "the config", "store": "the store", "out": "--out", "json": "--json",
          "png": "--png", "compare": "--compare", "truth": "--truth"}


def _check_tildes(command: argparse.ArgumentParser, known: argparse.Namespace) -> None:
    """A usage error for a path argument that starts with an unexpanded ``~``."""
    for name, flag in _PATHS.items():
        values = getattr(known, name, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and (value == "~" or value.startswith(("~/", "~\\"))):
                command.error(f"{flag} {value!r} starts with '~', which piadm does not expand "
                              "(the shell expands it only at a word's start and unquoted: not "
                              f"in --out=~/ev or '~/ev'): write the path out, e.g. "
                              f"{os.path.expanduser('~')}{value[1:]}")


class _Version(argparse.Action):
    """``--version``: the version asked only when it is printed (where piadm runs from a
    checkout, finding it runs git)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import pipeline

        parser._print_message(f"piadm {pipeline.__version__}\n", sys.stdout)  # as argparse's
        parser.exit()


def launched_rank() -> int:
    """This process's rank as its MPI launcher numbered it (Hydra, PMIx, Open MPI); 0 where
    none did."""
    for name in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``piadm`` command line: one subcommand per ``COMMANDS`` entry, each with its own
    arguments (``_ARGUMENTS``) and an example in its help."""
    # allow_abbrev=False: "--dry" taken for --dry-run would change meaning when a flag is added
    p = _Parser(
        prog="piadm", allow_abbrev=False, description="Block-parallel Picard sampling of "
        "diffusion models for ensembles of physics fields.",
        epilog="PIADM_SET holds more KEY=VALUE overrides, separated by ';' or new lines, "
        "that every command taking a config applies before its own --set. Exit codes: 0 "
        "done, 1 an unexpected failure (or status: incomplete), 2 an error told in one line: "
        "a bad input refused before anything was written, or a failure part way (a full "
        "disk, memory) that keeps the members written, 75 sample stopped by a signal (rerun "
        "to resume), 130 stopped at once by Ctrl-C, 143 or 138 any other command stopped by "
        "SIGTERM or SIGUSR1.")
    p.add_argument("-V", "--version", action=_Version, nargs=0,
                   help="show the version of the code that runs and exit")
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
        p.commands[name] = sp
    return p
