"""Filling an ensemble store: work items x member batches over the rank grid, resumable.

The work is every (item, member batch) of the store not yet done. Groups of ranks take
contiguous shares of it; a group's time slices split each batch's Picard blocks and its first
slice hands the result to the writer, which marks the members done after their data. Between
batches each group agrees whether a stop signal arrived; a stopped run exits with
``EXIT_PREEMPTED`` and a rerun of the same config does the rest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models import OWN_KINDS, build_model
from models.conditioning import CONDITIONS
from pipeline.calibrate import Calibration, resolve_tol
from pipeline.choices import FIELD_DIMS
from pipeline.claimed import claimed_calls, stop_agreed
from pipeline.claims import Heartbeat, batch_key, claims_dir, holding, holds, new_job_id
from pipeline.comm import SerialComm
from pipeline.config import ConfigError, store_differences
from pipeline.console import on_every_rank, on_rank0, print0, say
from pipeline.decomposition import share
from pipeline.errors import OutOfMemory, WriteFailed, naming
from pipeline.inputs import (Items, label_text, open_items, renamed_attrs, same_fingerprint,
                             unconditional)
from pipeline.identity import growth, store_digests, target_fate
from pipeline.layout import RankGrid, made_on, rank_grid
from pipeline.memory import field_bytes, gpu_identity, is_out_of_memory, ranks_sharing
from pipeline.memory_check import check_memory, round_points
from pipeline.noise import Noise
from pipeline.progress import Progress
from pipeline.run import (DTYPES, MODEL_SOURCE, member_batches, model_data_bound, model_digest,
                          provenance, residual_length, sample_batch, sampler_grid, sampler_options)
from pipeline.samplers import REFERENCE, REGISTRY
from pipeline.samplers.options import REPLICABLE
from pipeline.settings import Config
from pipeline.signals import StopRequest
from pipeline.store import (ASKED, FIELD_SCALE, INPUT_FINGERPRINT, MEMBER_BATCH, StoreExists,
                            StoreSpec, done_members, finalize, member_batch, member_chunk,
                            open_store, read_attrs, stored_attribute, write_batch)
from pipeline.target import (check_idle, check_room, check_writable, delete_leftovers,
                             open_or_create, upgrade_identity)
from pipeline.validation import check_variable
from pipeline.work import batch_note, call_batch, work_list, write_runs
from pipeline.writer import make_writer


@dataclass(frozen=True)
class Summary:
    """What ``sample_to_store`` did: members written by this run, those found done, parallel
    rounds in all (the slowest group's batches, one after another), the most rounds one batch
    took, model calls per member, wall seconds, seconds the writer spent writing and the
    seconds compute waited for it, whether a signal stopped it, and the Picard blocks that
    diverged and were redone step by step (``Stats.fallbacks``, summed over the batches)."""

    path: str
    members: int
    skipped: int
    rounds: int
    batch_rounds: int
    model_calls: float
    seconds: float
    write_s: float
    write_wait_s: float
    preempted: bool
    fallbacks: int = 0
    began: bool = True  # False: a stop signal came during start-up, and nothing was written


def load_items(cfg: Config, *, check: bool, model=None) -> Items:
    """The run's work items: the input selection (validated when ``check``, against the
    conditioning shape ``model`` was trained on when it records one), or one item."""
    i = cfg.input
    if not i.path:
        return unconditional()
    return open_items(i.path, variable=i.variable, dim=i.item_dim, items=i.items, span=i.range,
                      shape=tuple(cfg.model.shape), check=check,
                      coarse=cfg.model.condition == "coarse",
                      cond_shape=getattr(model, "cond_shape", None))


def store_variable(cfg: Config, trained_on: str | None) -> str:
    """The name of the ensemble's field in its store: output.variable, else the variable a
    learned model was trained on (``trained_on``), else the input variable (exact models),
    else ``field``."""
    return cfg.output.variable or trained_on or cfg.input.variable or "field"


def field_scale(model, mean: float, std: float) -> tuple[float, float]:
    """The (mean, std) a model's fields are in (data = mean + std x model units): a learned
    model's training normalisation; a user's network's own units, (0, 1) (``own_units``),
    which must not move with the input's selection; else the input's ``mean`` and ``std``
    (an exact model is defined on unit-variance fields)."""
    if getattr(model, "data_mean", None) is not None:
        return float(model.data_mean), float(model.data_std)
    if getattr(model, "own_units", False):
        return 0.0, 1.0
    return float(mean), float(std)


def _grid_coords(grid: dict, names: tuple[str, ...]) -> dict:
    """A learned model's training ``grid`` (``models.grid.grid_of``) as the store's field
    coordinates {dim: (values, attrs)} on its dims ``names``: by position where the training
    data named them otherwise (lat, lon for y, x), that name kept in ``input_dim``."""
    recorded = grid.get("coords", {})
    dims = grid.get("dims") or list(recorded)  # an older sidecar's: the dims with coordinates
    if len(dims) != len(names):
        return {d: (np.asarray(c["values"]), c["attrs"]) for d, c in recorded.items()
                if d in names}
    to_ours = dict(zip(dims, names))
    return {to_ours[d]: (np.asarray(c["values"]), renamed_attrs(d, to_ours[d], dict(c["attrs"])))
            for d, c in recorded.items() if d in to_ours}


def store_spec(cfg: Config, items: Items, shape: tuple[int, ...],
               trained_on: str | None = None, grid: dict | None = None,
               scale: tuple[float, float] | None = None) -> StoreSpec:
    """The store ``cfg`` fills, with the input's statistics in its provenance and the
    ``scale`` (``field_scale``) its fields are in; its field named by ``store_variable``."""
    variable = store_variable(cfg, trained_on)
    attrs = provenance(cfg)
    attrs.update(input_path=cfg.input.path, input_mean=items.mean, input_std=items.std)
    if scale is not None:
        attrs[FIELD_SCALE] = list(scale)
    if items.fingerprint:  # what a resume checks its input against (_check_same_input)
        attrs[INPUT_FINGERPRINT] = list(items.fingerprint)
    attrs[MEMBER_BATCH] = cfg.ensemble.batch_size  # the unit of work of every run that fills it
    # coordinates: the item dim's from the input; the field's from the model's training grid
    # (a learned model), else from an input on the same grid
    coords = items.coords(coarse=cfg.model.condition == "coarse")
    grid = grid or {}
    coords.update(_grid_coords(grid, FIELD_DIMS.get(len(shape), ())))
    field_attrs = {**items.field_attrs(), **grid.get("attrs", {})}
    return StoreSpec(cfg.output.path, items.dim, items.labels, cfg.ensemble.members,
                     member_chunk(cfg.ensemble.batch_size,
                                  field_bytes(shape, DTYPES[cfg.sampler.dtype])), variable, shape,
                     cfg.sampler.dtype, cfg.store_digest, attrs,
                     sweeps=residual_length(cfg.sampler),
                     coords=coords, field_attrs=field_attrs)


def check_only(only: tuple[int, ...], count: int) -> None:
    """Raise ConfigError when ``parallel.items`` (``only``) goes past the ``count`` items."""
    if any(i >= count for i in only):
        raise ConfigError(f"config: parallel.items {list(only)} goes past the {count} items of "
                          f"the input selection: use indices 0 .. {count - 1}")


def checked_items(cfg: Config, model):
    """The run's items after the checks that need the model (the run's and its dry run's):
    the sampler's grid (a scheduler's own may refuse sampler.steps), the input against the
    model, a conditioned network bound to the first item, and parallel.items."""
    sampler_grid(cfg.sampler, model)
    items = load_items(cfg, check=True, model=model)
    check_bound_network(cfg, model, items)
    check_only(cfg.parallel.items, len(items.labels))
    return items


def _check_same_network(cfg: Config, held: dict) -> None:
    """Refuse to resume or grow, from its attributes ``held``, a store of a user's network
    that an older piadm sampled with its fields scaled by the input selection's statistics
    (``field_scale``: where they were not 0 and 1), or, a module's, whose code file has
    changed since (a store made before it was recorded is not checked)."""
    if cfg.model.kind not in OWN_KINDS:
        return
    scaled = (float(held.get("input_mean", 0.0)), float(held.get("input_std", 1.0))) != (0, 1)
    if FIELD_SCALE not in held and scaled:
        raise StoreExists(
            f"output {cfg.output.path} was sampled by an older piadm, which scaled the "
            "network's condition and fields by the input selection's mean and std (it now "
            "takes them in the input's own units): its members would not match the rest; set "
            "output.overwrite = true to sample it anew, or choose another output.path")
    if cfg.model.kind != "module" or not held.get(MODEL_SOURCE):
        return
    from models.module import source_digest, source_file

    now = source_digest(cfg.model)
    if now != held[MODEL_SOURCE]:
        raise StoreExists(
            f"output {cfg.output.path} was made by this configuration with other network code "
            f"({source_file(cfg.model) or cfg.model.target} has changed since: "
            f"{held[MODEL_SOURCE][:12]}, now {now[:12] or 'none'}): put the original back to "
            "resume it, choose another output.path, or set output.overwrite = true to "
            "replace it")


def _check_same_noise(cfg: Config, held: dict, device) -> None:
    """Refuse to resume or grow, from its attributes ``held``, a store of device noise
    (``sampler.noise = "device"``: torch's generator, whose numbers depend on the device type,
    on a GPU its model too (how many threads a large draw is spread over), and the torch
    version) made on another of these: its new members' noise would come from other streams
    than its keys promise (what a store did not record is not checked)."""
    if held.get("sampler_noise") != "device":
        return
    was_torch = held.get("torch_version")
    was = _noise_device(str(held.get("made_on", "")))
    now = _noise_device(made_on(device))
    if (was_torch and was_torch != torch.__version__) or (was and was != now):
        raise StoreExists(
            f"output {cfg.output.path} was sampled with sampler.noise = 'device' on "
            f"{was or 'a device'} with torch {was_torch}, and this run has {now} with torch "
            f"{torch.__version__}: device noise differs between them, so its members would "
            "not match the rest; resume it where it was made, choose another output.path, or "
            "set output.overwrite = true to replace it")


def _noise_device(made_on: str) -> str:
    """What device noise depends on in a ``made_on`` ("cuda: NAME xTHREADS"): the device
    type, and a GPU's model; "" where none was recorded."""
    kind, _, name = made_on.partition(": ")
    return f"{kind}: {name.rsplit(' x', 1)[0]}" if kind == "cuda" else kind


def _check_early(cfg: Config, model, device) -> tuple[float, float, tuple[float, ...]]:
    """Rank 0: the input (its layout, selection and one pass over its values) and the output
    target, before the start-up's costly work; returns the input's (mean, std, fingerprint)."""
    items = checked_items(cfg, model)
    if not cfg.output.variable:  # a name from the model or the input: checked once known
        trained_on = getattr(model, "variable", None)
        check_variable(store_variable(cfg, trained_on), items.dim, len(cfg.model.shape),
                       "the model's variable" if trained_on else "input.variable")
    fate = check_output(cfg, items, device)
    held = (read_attrs(cfg.output.path) or {}) if fate in ("resume", "upgrade", "grow") else {}
    if cfg.input.path and {"input_mean", "input_std"} <= held.keys():
        # the scale its members so far were drawn with: another piadm may round the same
        # statistics of the same fields otherwise, and the rest must match them bit for bit
        return float(held["input_mean"]), float(held["input_std"]), items.fingerprint
    return items.mean, items.std, items.fingerprint


def memory_sharing(world, device) -> int:
    """Every rank (collective): how many ranks share this rank's memory, the node's host
    memory or, on GPUs, one GPU's: counted by the GPU each rank holds, since a job that gives
    each task its own GPU (``--gpus-per-task=1``) shows every rank one device, which a count
    of the node's devices took for one GPU shared by all its ranks."""
    device = torch.device(device)
    if device.type != "cuda":
        return ranks_sharing(world.local_layout()[1], device)
    mine = (platform.node(), gpu_identity(device))
    return sum(other == mine for other in world.allgather_object(mine))


def check_output(cfg: Config, items: Items | None = None, device="cpu") -> str:
    """What the run does with its store at output.path (``target.check_target``'s fate),
    after the checks that fate needs: a new store's folder must take it, a replaced one
    must have no live job filling it, nor an older piadm's store brought up to date
    (``upgrade``) nor one grown to more members (``grow``), and a resumed or grown one must
    find the input ``items`` it was conditioned on: their labels, and the fields by their
    fingerprint (``inputs.fingerprint``; empty: not read). Raises StoreExists or OSError
    naming the problem."""
    fate, _ = target_fate(cfg, model_digest(cfg), overwrite=cfg.output.overwrite,
                          differs=lambda text: store_differences(cfg, text))
    if fate in ("resume", "upgrade", "grow"):
        held = read_attrs(cfg.output.path) or {}
        _check_same_network(cfg, held)
        _check_same_noise(cfg, held, device)
    if fate in ("resume", "upgrade", "grow") and items is not None and cfg.input.path:
        _check_same_items(cfg, items.labels)
        if items.fingerprint:
            _check_same_input(cfg, items.fingerprint)
    if fate == "create":  # found now, not when the store is made after a calibration
        check_writable(cfg.output.path)
    if fate in ("create", "replace", "grow"):  # before a typo's store fills the disk
        one = field_bytes(tuple(cfg.model.shape), DTYPES[cfg.sampler.dtype])
        count = 1 if items is None else len(items.labels)
        kept = done_members(cfg.output.path).shape[1] if fate == "grow" else 0
        check_room(cfg.output.path, one, count * cfg.ensemble.members, held=count * kept,
                   replaced=fate == "replace")
    if fate == "replace":
        check_idle(cfg.output.path)
    if fate == "upgrade":
        check_idle(cfg.output.path, "brings an older piadm's store up to date")
    if fate == "grow":
        check_idle(cfg.output.path, "grows a store")
    return fate


def _check_same_items(cfg: Config, labels: np.ndarray) -> None:
    """Refuse to resume a store whose items are not the input's selection now (times added
    to the input within input.range, say): the arrays have the store's items."""
    dim = cfg.input.item_dim
    held = open_store(cfg.output.path)[dim].values
    if len(held) == len(labels) and (held == labels).all():
        return
    span = lambda v: (f"{len(v)} ({label_text(v[0])} .. {label_text(v[-1])})"  # noqa: E731
                      if len(v) else "0")
    raise StoreExists(
        f"output {cfg.output.path} holds the {dim} items {span(held)} and the selection of "
        f"input {cfg.input.path} is now {span(labels)}: select the store's items with "
        "input.items or input.range, or write the new selection to another output.path")


def _check_same_input(cfg: Config, now: tuple[float, ...]) -> None:
    """Refuse to resume a store whose conditioning input changed since it was made (data
    regenerated or edited in place): its members so far were drawn for the old fields, the
    rest would be for the new ones. A store made before piadm recorded this fingerprint is
    not checked."""
    then = (read_attrs(cfg.output.path) or {}).get(INPUT_FINGERPRINT)
    if then is None or len(then) != len(now) or same_fingerprint(then, now):
        return
    raise StoreExists(
        f"output {cfg.output.path}: its members were conditioned on the {cfg.input.variable} "
        f"fields of input {cfg.input.path} as they were when it was made (their fingerprint, "
        f"the attribute {INPUT_FINGERPRINT}: {_short(then)}), and they have changed since "
        f"({_short(now)}): restore that input, or write the ensemble of the new one to "
        "another output.path")


def _short(values) -> str:
    return "[" + ", ".join(f"{v:.9g}" for v in values) + "]"


def _prepare(cfg: Config, stats: tuple, shape, trained_on, tol: Calibration,
             attrs: dict, grid: dict, scale: tuple[float, float]) -> tuple[StoreSpec, str]:
    """Rank 0's creation: open or create the store, with the input's ``stats`` (mean, std,
    fingerprint) that ``_check_early`` measured and the ``scale`` its fields are in."""
    spec = store_spec(cfg, measured_items(cfg, stats), shape, trained_on, grid, scale)
    # a tolerance the planner set (it calibrates each sampler it weighs) is its, not the config's
    planned = "sampler.tol" in json.loads(attrs.get("plan_settings", "{}"))
    source = "plan" if planned and tol.source == "config" else tol.source
    spec.attrs.update(sampler_tol=tol.tol, sampler_tol_source=source, **attrs)
    fate, legacy = target_fate(cfg, spec.attrs.get("model_sha256"),
                               overwrite=cfg.output.overwrite)
    if fate == "upgrade":
        upgrade_identity(spec.path, legacy, cfg.store_digest,
                         plan=spec.attrs.get("plan_config_sha256"), asked=spec.attrs.get(ASKED))
    return spec, open_or_create(spec, overwrite=cfg.output.overwrite,
                                growth=functools.partial(growth, cfg))


def run_tolerance(cfg: Config, model, device, *, force: bool = False, store: bool = True,
                  stats: tuple | None = None,
                  say=say,
                  stopped=lambda: False) -> Calibration:
    """Rank 0: the tolerance of the run. For ``"auto"``: the one its store was made with (a
    resumed run; not with ``store`` False), else the cached or a new calibration (``force``:
    always new; ``stopped`` ends it between rungs, ``calibrate.Stopped``), on the first
    item's input when the model is conditioned (``stats``: the input's, when the run's
    checks measured them, so that the input is not read through again); ``say`` reports it."""
    s = cfg.sampler
    if REFERENCE[s.method] == s.method or (s.tol != "auto" and not force):
        return resolve_tol(cfg, model, device=device)  # the configured tol, or none at all
    stored = None if force or not store else stored_attribute(
        cfg.output.path, store_digests(cfg), "sampler_tol")
    bound = (first_item_model(cfg, model, device) if stats is None else
             bind_first_item(cfg, model, measured_items(cfg, stats), device))
    return resolve_tol(cfg, bound, device=device, stored=stored, force=force, say=say,
                       stopped=stopped)


def measured_items(cfg: Config, stats: tuple):
    """The run's items, read lazily, with the (mean, std, fingerprint) ``_check_early``
    measured in its one pass over them."""
    return dataclasses.replace(load_items(cfg, check=False), mean=stats[0], std=stats[1],
                               fingerprint=stats[2])


def check_bound_network(cfg: Config, model, items) -> None:
    """A conditioned network of one's own (``module``, ``diffusers``), bound to the first
    item's input, called once as ``models.module.check_output`` calls an unconditioned one:
    a network that takes no condition, or fields of another shape, is a one-line error
    before the store is made, not a traceback at its first batch."""
    if cfg.model.kind not in OWN_KINDS or cfg.model.condition == "none":
        return
    from models.module import check_output as call_once

    what = (f"model.target = {cfg.model.target!r}" if cfg.model.kind == "module" else
            f"model.path = {cfg.model.path!r}") + f" given its {cfg.model.condition} input"
    call_once(bind_first_item(cfg, model, items, "cpu"), tuple(cfg.model.shape), what,
              takes="(x, t, cond), the upsampled coarse field as its third argument (a plain "
                    "diffusers UNet2DModel takes none)")


def first_item_model(cfg: Config, model, device):
    """``model`` as the store's first item samples it: bound to that item's conditioning
    input when the model is conditioned (calibration and the bench use it), else itself.
    The store's first, not this job's (``parallel.items``): jobs that fill one store
    calibrate alike, and share the calibration their key names."""
    if not cfg.input.path:
        return model
    return bind_first_item(cfg, model, load_items(cfg, check=True, model=model), device)


def bind_first_item(cfg: Config, model, items, device):
    """``first_item_model`` with the run's ``items`` (``load_items``) already read."""
    if not cfg.input.path:
        return model
    mean, std = field_scale(model, items.mean, items.std)
    return _bind(model, cfg.model.condition, (items.field(0) - mean) / std, device)


def _bind(model, condition: str, field: np.ndarray | None, device):
    if field is None:
        return model
    return CONDITIONS[condition](model, torch.as_tensor(field, device=device))


def not_begun(path: str) -> Summary:
    """The summary of a run stopped before its first batch: nothing written."""
    return Summary(path, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, True, began=False)


def sample_to_store(cfg: Config, *, ranks: RankGrid | None = None, device="cpu",
                    stop: StopRequest | None = None, attrs: dict | None = None) -> Summary:
    """Fill ``cfg``'s ensemble store (creating, resuming or growing it), printing progress on
    rank 0; ``attrs`` are extra store attributes (the planner's choice)."""
    ranks = ranks or rank_grid(SerialComm(), 1)
    stop = stop if stop is not None else StopRequest()
    # the same files on every rank, unless a node's copy differs or is missing
    model = on_every_rank(ranks.world, build_model, cfg.model, device)
    sharing = memory_sharing(ranks.world, device)  # collective: before rank 0 alone checks
    on_rank0(ranks.world, lambda: check_memory(  # at the most members a call holds
        cfg, tuple(model.shape), torch.device(device), sharing=sharing,
        time_slices=ranks.slices.size,
        batch=call_batch(cfg.ensemble.batch_size, cfg.ensemble.members)))
    started = _start_up(cfg, model, ranks.world, stop, device, attrs or {})
    if started is None:
        return not_begun(cfg.output.path)
    spec, state, tol = started
    items, scale, done, mine, unit = _open_work(cfg, model, spec, state, ranks)
    return _fill(cfg, ranks, model, tol, spec, mine, items=items, scale=scale, stop=stop,
                 device=device, skipped=int(done.sum()), unit=unit)


def _start_up(cfg: Config, model, world, stop, device,
              attrs: dict) -> tuple[StoreSpec, str, Calibration] | None:
    """Every rank: rank 0's checks of the input and target, the run's tolerance, then the
    store it creates or opens; returns (spec, state, tol), or None when a stop signal came
    first (nothing written)."""
    from pipeline.calibrate import Stopped

    stats = on_rank0(world, _check_early, cfg, model, device)  # refused now, not after calibrating
    # stopped during start-up (before, during or after a calibration): exit before writing
    if stop_agreed(world, stop):
        return None
    try:
        tol = on_rank0(world, run_tolerance, cfg, model, device, stats=stats,
                       say=lambda text: print0(world, text), stopped=lambda: bool(stop))
    except Stopped:
        return None
    if stop_agreed(world, stop):
        return None
    with naming(cfg.output.path):  # a full disk met making it names no file
        spec, state = on_rank0(world, _prepare, cfg, stats, tuple(model.shape),
                               getattr(model, "variable", None), tol,
                               {**attrs, "made_on": made_on(device)},
                               getattr(model, "grid", {}), field_scale(model, *stats[:2]))
    return spec, state, tol


def _open_work(cfg: Config, model, spec: StoreSpec, state: str, ranks: RankGrid):
    """Every rank, once the store exists: the input items, the (mean, std) the model's fields
    are in, the store's done flags (items, members), this group's share of the (item,
    members) batches left and the store's batch size; rank 0 says what the store holds."""
    items = load_items(cfg, check=False)
    scale = field_scale(model, spec.attrs["input_mean"], spec.attrs["input_std"])
    # rank 0 reads, every rank gets the same: another job writing meanwhile must not give two
    # ranks of a group different work lists (they would wait in different collectives)
    done, unit = on_rank0(ranks.world, lambda: (done_members(spec.path),
                                                member_batch(spec.path)))
    size = cfg.ensemble.batch_size
    todo = [(i, b, tuple(m for m in b if not done[i, m]))
            for i, b in work_list(done, member_batches(cfg.ensemble.members, unit),
                                  cfg.parallel.items)]
    mine = share(todo, ranks.groups, ranks.group)
    print0(ranks.world, f"store {spec.path} {state}: {int(done.sum())} of {done.size} members "
                        f"done, {sum(len(left) for _, _, left in todo)} to sample"
           + (f" in its batches of {unit}{batch_note(unit, size)}" if unit != size else ""))
    return items, scale, done, mine, unit


class _ProgressHook:
    """The samplers' ``on_sweep`` for a call of ``members`` members (``functools.partial``),
    told to the progress bar: what the call in flight is doing, and how far along its steps
    it is (for the ETA before the first call ends)."""

    def __init__(self, bar: Progress, method: str, steps: int):
        self.bar, self.steps = bar, steps
        self.what = ("sequential" if REGISTRY[method].reference == method else
                     "block" if REGISTRY[method].blocked else "window")

    def __call__(self, members: int, step: int, sweep: int, residual: float) -> None:
        part = members * step / self.steps
        if self.what == "sequential":
            self.bar.note(f"step {step}/{self.steps}", part)
        else:
            self.bar.note(f"{self.what} from step {step}/{self.steps}: round {sweep}, "
                          f"residual {math.sqrt(residual):.1e}", part)


def _fill(cfg: Config, ranks: RankGrid, model, tol: Calibration, spec: StoreSpec, mine, *,
          items: Items, scale, stop, device, skipped: int, unit: int) -> Summary:
    """Every rank: sample the group's share ``mine`` of the store's (item, members) batches
    of ``unit``, the model's fields being the data less ``scale``'s mean over its std, the
    group's lead rank writing them; then agree what the run did (``_finish``)."""
    world, slices, s = ranks.world, ranks.slices, cfg.sampler
    mean, std = scale
    writer = make_writer(cfg.output.background) if slices.rank == 0 else None
    grid = sampler_grid(s, model)
    options = sampler_options(s, tol=tol.tol, data_bound=model_data_bound(model, cfg.model))
    tally = _Tally(time.perf_counter())
    bar = Progress(world, sum(len(left) for _, _, left in mine),
                   f"group {ranks.group + 1}/{ranks.groups} members", speak=slices.rank == 0)
    hook = _ProgressHook(bar, s.method, grid.steps)
    bound, bound_item = model, None
    halt = _Halt(stop)
    folder = claims_dir(spec.path)
    job = on_rank0(world, new_job_id, folder)
    beat = Heartbeat(folder, job).start() if world.rank == 0 else None
    try:  # the heartbeat lasts until every group is done: their claims stay alive till then
        for item, members in claimed_calls(mine, cfg.ensemble.batch_size, slices, halt, tally,
                                           bar, items, spec.path, job):
            if item != bound_item:  # the work is ordered by item: read each input once
                raw = items.field(item)
                bound = _bind(model, cfg.model.condition,
                              None if raw is None else (raw - mean) / std, device)
                bound_item = item
            noise = Noise.members(s.seed, item, members, model.shape, DTYPES[s.dtype], device,
                                  s.noise)
            told = dataclasses.replace(options, on_sweep=functools.partial(hook, len(members)))
            try:
                batch = sample_batch(bound, noise, method=s.method, grid=grid, options=told,
                                     comm=slices)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                plan = json.loads(spec.attrs.get("plan_settings", "{}"))
                raise OutOfMemory(_out_of_memory(
                    cfg, world.rank, device, len(members), spec.attrs.get(ASKED),
                    plan.get("ensemble.batch_size"))) from None
            for lo, hi in write_runs(members, unit) if writer is not None else ():
                start = members[lo] - members[lo] % unit  # the store batch's claim
                owned = functools.partial(holds, folder, batch_key(item, start), job)
                halt.attempt(_submit, writer, spec, item, members[lo:hi], batch, slice(lo, hi),
                             scale, owned)
            tally.add(len(members), batch.stats)
            label = label_text(items.labels[item])
            bar.advance(len(members), f"{items.dim} {label}: {batch.stats.rounds} rounds")
        bar.close()
        if writer is not None:  # every member this rank sampled is written and marked done
            halt.attempt(writer.close, after_error=True)
        return _finish(cfg, spec, ranks, writer, tally, skipped=skipped, job=job,
                       failed=halt.error)
    except BaseException as err:
        if writer is not None and isinstance(err, Exception):
            # the members sampled before the failure are written first
            with contextlib.suppress(Exception):
                writer.close()
        elif writer is not None:  # a stop that does not wait (a second Ctrl-C)
            writer.abandon()
        raise
    finally:
        if beat is not None:
            beat.stop()


def _out_of_memory(cfg: Config, rank: int, device, members: int, asked=None,
                   plan_batch=None) -> str:
    """The one line of a call of ``members`` that ran out of memory; ``asked``: the batch
    size the config asked when an ``"auto"`` run's plan was made, ``plan_batch`` the plan's
    (a resume keeps the plan's unless another is asked)."""
    s = cfg.sampler
    key, n = round_points(s)
    now = cfg.ensemble.batch_size
    lower = "lower "
    if members > 1:
        lower += f"ensemble.batch_size below {members}"
        if asked is not None and now == plan_batch != asked:  # only another asked replaces it
            lower += (f" (now {now}, the plan's; any size but the {asked} the plan was made "
                      "for replaces it)")
        elif now != members:
            lower += f" (now {now})"
        lower += ", "
    return (f"sample: rank {rank} ran out of memory ({device}) sampling {members} members at "
            f"once with {s.method} ({n} points of sampler.{key}): {lower}sampler.{key}, or "
            "add time slices; the members written so far are kept, and the same command "
            "resumes after them")


def _submit(writer, spec: StoreSpec, item: int, members, batch, rows: slice, scale,
            owned) -> None:
    """Hand the ``rows`` of ``batch`` (fields (call members, *shape), normalised), the
    consecutive ``members`` of one of the store's batches, to ``writer``, back in the data's
    units ``scale`` (mean, std) and the store's dtype; ``owned``: whether this job still holds
    the claim on that store batch (``store.write_batch``)."""
    mean, std = scale
    field = batch.fields[rows].cpu().numpy() * std + mean
    writer.submit(write_batch, spec.path, variable=spec.variable, item=item,
                  start=members[0], field=field.astype(spec.dtype),
                  seed=np.array(batch.seeds[rows]), rounds=batch.stats.rounds,
                  model_calls=batch.stats.model_calls, residuals=batch.stats.residuals,
                  digest=spec.digest, model=spec.attrs.get("model_sha256"), owned=owned)


class _Halt:
    """What stops a group's loop: a stop signal, or a write that failed on this rank (its
    lead's). A failed write stops the group as a signal would (``stop_agreed``), so that
    every rank reaches ``_finish`` and raises there, none waiting in a collective."""

    def __init__(self, stop):
        self.stop, self.error = stop, None

    def __bool__(self) -> bool:
        return bool(self.stop) or self.error is not None

    def attempt(self, fn, *args, after_error: bool = False) -> None:
        """Run a write step unless one failed already (``after_error``: even then, e.g. to
        join the writer); keep the first error."""
        if self.error is None or after_error:
            try:
                fn(*args)
            except Exception as err:  # raised again in _finish, on this rank
                self.error = self.error or err


@dataclass
class _Tally:
    """What this group has sampled so far: members, rounds of each batch, model calls."""

    start: float
    rounds: list = field(default_factory=list)
    calls: float = 0.0
    count: int = 0
    stopped: bool = False
    fallbacks: int = 0

    def add(self, members: int, stats) -> None:
        self.count += members
        self.rounds.append(stats.rounds)
        self.calls += stats.model_calls * members
        self.fallbacks += stats.fallbacks


def _finalize_alone(path, note: str, job: str) -> None:
    """``finalize`` under the store's lock: two jobs finishing together would each read the
    history, append their line and write it back, and one line would be lost."""
    with holding(claims_dir(path), "finalize", job), naming(path):
        finalize(path, note)
    # a replacement killed just before this run began looked alive then: its copy of the
    # old store goes now, not at the next run, which may never come
    delete_leftovers(path)


def _finish(cfg, spec, ranks, writer, tally: "_Tally", *, skipped: int, job: str,
            failed: Exception | None = None):
    world, slices = ranks.world, ranks.slices
    world.barrier(idle=True)  # groups done early sleep: others on the node may need its cores
    lead = slices.rank == 0  # a group's counts once, from its lead
    local = _packed(stopped=tally.stopped, rounds=sum(tally.rounds),
                    calls=tally.calls if lead else 0, written=tally.count if lead else 0,
                    batch_rounds=max(tally.rounds, default=0), failed=failed is not None,
                    fallbacks=tally.fallbacks if lead else 0)
    peak, total = _unpacked(world.allreduce_max(local)), _unpacked(world.allreduce_sum(local))
    if failed is not None:  # the members written before it stay done: a rerun finishes
        if isinstance(failed, OSError) and not isinstance(failed, StoreExists):
            # a full disk or a lost mount says neither which store nor what is kept
            where = f" ({failed.filename})" if failed.filename else ""
            said = WriteFailed(f"writing members to {spec.path} failed: "
                               f"{failed.strerror or failed}{where}; the members written before "
                               "it are kept: fix the cause (free space, the mount) and rerun "
                               "the same command to finish")
            said.errno = failed.errno
            raise said from failed
        raise failed
    if peak["failed"] > 0:
        raise WriteFailed("a write failed on another rank of this run (its error is printed "
                          "there); the members written before it are kept: fix the cause and "
                          "rerun to finish", collective=True)
    preempted = bool(peak["stopped"] > 0)
    written = int(total["written"])
    note = (f"piadm stopped by a signal after {written} members" if preempted
            else f"piadm wrote {written} members")
    if skipped:  # a rerun says what it found, so a line of 0 is not read as a lost run
        note += f" ({skipped} already written)"
    if world.size > 1:  # members agree across layouts to rounding only: say which wrote them
        note += (f" on {world.size} ranks = {ranks.groups} group{'s' if ranks.groups > 1 else ''}"
                 f" x {slices.size} time slice{'s' if slices.size > 1 else ''}")
        if slices.size > 1 and cfg.sampler.method in REPLICABLE:
            note += f", window split {cfg.sampler.window_split}"
    on_rank0(world, _finalize_alone, spec.path, note, job)
    write_s = writer.busy if writer is not None else 0.0
    wait_s = writer.waited if writer is not None else 0.0
    return Summary(spec.path, written, skipped, int(peak["rounds"]), int(peak["batch_rounds"]),
                   total["calls"] / max(written, 1),
                   time.perf_counter() - tally.start, write_s, wait_s, preempted,
                   int(total["fallbacks"]))


# What the ranks agree on as a run ends, reduced in one tensor by max and by sum: whether
# any stopped, rounds (a rank's batches' sum, and its largest batch's), model calls, members
# written, a failure, fallbacks to sequential steps
_AGREED = ("stopped", "rounds", "calls", "written", "batch_rounds", "failed", "fallbacks")


def _packed(**values) -> torch.Tensor:
    """``values`` (every name of ``_AGREED``) as one float64 tensor, in that order."""
    return torch.tensor([float(values[name]) for name in _AGREED], dtype=torch.float64)


def _unpacked(reduced: torch.Tensor) -> dict[str, float]:
    """A reduced ``_packed`` tensor by name."""
    return dict(zip(_AGREED, reduced.tolist()))
