"""Whether a run may write into the store at output.path, and how: a new store's folder must
take it, a replaced one must have no live job filling it, and a store resumed or grown must
have been made by the same network, noise and conditioning input that the run has now.

Each refusal is a ``StoreExists`` (or an OSError, or a ConfigError for the path itself) naming
the problem and the fix, raised before anything is written.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from models import OWN_KINDS
from pipeline.done_record import ARRAYS_FIX, DamagedRecord
from pipeline.stored import differences_of, format_differences, stored_settings
from pipeline.identity import target_fate
from pipeline.inputs import Items, same_fingerprint
from pipeline.labels import label_text
from pipeline.layout import arithmetic_kind
from pipeline.memory import field_bytes
from pipeline.noise import host_fingerprint
from pipeline.run import (DTYPES, HOST_NOISE, MODEL_PLUGIN, MODEL_SIDECAR, MODEL_SIDECAR_SAYS,
                          MODEL_SOURCE, SIDECAR_GRIDS, model_digest, residual_length,
                          sidecar_digest, sidecar_says)
from pipeline.samplers import REGISTRY
from pipeline.settings import FILE_KEYS, Config
from pipeline.store import (FIELD_SCALE, INPUT_FINGERPRINT, PER_MEMBER, PER_MEMBER_BYTES,
                            StoreExists, member_chunk, open_store)
from pipeline.store_attrs import EditedAttribute, check_unedited, members_of, read_attrs
from pipeline.store_damage import damaged_arrays
from pipeline.target import check_idle, check_path_walk, check_room, check_writable


def check_output(cfg: Config, items: Items | None = None, device="cpu") -> str:
    """What the run does with its store at output.path (``target.check_target``'s fate),
    after the checks that fate needs: a new store's folder must take it, a replaced one
    must have no live job filling it, nor an older piadm's store brought up to date
    (``upgrade``) nor one grown to more members (``grow``), and a resumed or grown one must
    find the input ``items`` it was conditioned on: their labels, and the fields by their
    fingerprint (``inputs.fingerprint``; empty: not read). Raises StoreExists or OSError
    naming the problem (ConfigError for a path that steps back out of a missing folder)."""
    check_path_walk(cfg.output.path)
    fate, _ = target_fate(cfg, model_digest(cfg), overwrite=cfg.output.overwrite,
                          differs=lambda text: store_differences(cfg, text))
    if fate in ("resume", "upgrade", "grow"):
        broken = damaged_arrays(cfg.output.path)
        if broken:  # a run would consolidate the store over them, hiding what readers still see
            raise DamagedRecord(f"output {cfg.output.path}: the store's arrays are damaged "
                                f"({'; '.join(broken[:3])}): {ARRAYS_FIX}")
        held = read_attrs(cfg.output.path) or {}
        try:
            _check_made_alike(cfg, items, held)
        except StaleStore:
            if not cfg.output.overwrite:
                raise
            fate = "replace"  # this configuration's, from other files: replaced as another's
        else:  # never replaced: the machine changed, not what decides the members
            _check_same_noise(cfg, held, device)
    if fate == "create":  # found now, not when the store is made after a calibration
        check_writable(cfg.output.path)
    if fate in ("create", "replace", "grow"):  # before a typo's store fills the disk
        _check_room(cfg, 1 if items is None else len(items.labels), fate)
    if fate == "replace":
        check_idle(cfg.output.path)
    if fate == "upgrade":
        check_idle(cfg.output.path, "brings an older piadm's store up to date")
    if fate == "grow":
        check_idle(cfg.output.path, "grows a store")
    return fate


def _check_room(cfg: Config, count: int, fate: str) -> None:
    """``check_room`` of the store of ``count`` items that ``cfg`` makes, replaces or grows
    (``fate``): its fields with their per-member values, in chunk files of the members its
    run would chunk them by (the new ones only, where it grows)."""
    one = field_bytes(tuple(cfg.model.shape), DTYPES[cfg.sampler.dtype])
    # an "auto" run's sampler is the plan's, still to come: the residual it may keep left out
    sweeps = residual_length(cfg.sampler) if cfg.sampler.method in REGISTRY else 0
    kept = members_of(cfg.output.path) if fate == "grow" else 0
    chunk = member_chunk(cfg.ensemble.batch_size, one, sweeps)
    arrays = 1 + len(PER_MEMBER) + (1 if sweeps else 0)
    files = count * arrays * -(-(cfg.ensemble.members - kept) // chunk)
    check_room(cfg.output.path, one + PER_MEMBER_BYTES, count * cfg.ensemble.members,
               held=count * kept, files=files, replaced=fate == "replace")


def store_differences(cfg: Config, text: str) -> list[str]:
    """How the store's config ``text`` differs from ``cfg`` (``stored.differences_of``), and
    a note where a
    file setting the store spells relative names nothing from here: the same file named from
    another folder is another spelling, and the store's own config resumes it only from the
    folder it was made in (its ``made_in`` attribute, where recorded)."""
    import tomllib

    attrs = read_attrs(cfg.output.path) or {}
    read = stored_settings(text, attrs)
    shown = [] if read is None else format_differences(differences_of(cfg, read))
    if shown and read is not None and read.untold:
        shown.append(f"its {', '.join(read.untold)} cannot be told (an older piadm's store "
                     "that recorded no device)")
    elif shown and read is not None and read.lacked:
        lacked = ", ".join(read.lacked[:4]) + (" ..." if len(read.lacked) > 4 else "")
        shown.append(f"it was made by an older piadm, whose config had no {lacked} (read as "
                     "it ran without them): set the settings named to the store's values to "
                     "resume it")
    try:
        theirs = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return shown
    for key in FILE_KEYS:
        section, name = key.split(".")
        then, ours = theirs.get(section, {}).get(name), getattr(getattr(cfg, section), name)
        if (isinstance(then, str) and then and then != ours and not os.path.isabs(then)
                and not os.path.exists(then)):
            folder = attrs.get("made_in", "")
            if folder == os.getcwd():  # made here: the file itself is gone, not the folder
                continue
            shown.append(f"its {key} {then!r} names no file from this folder: rerun its "
                         f"config from the folder it was made in"
                         + (f" ({folder})" if folder else ""))
    return shown


class StaleStore(StoreExists):
    """This configuration's store, made from other network code or input than the run has:
    ``output.overwrite`` replaces it. ``why``: the reason in a few words, for the line that
    says so."""

    def __init__(self, message: str, why: str = ""):
        super().__init__(message)
        self.why = why


def _check_made_alike(cfg: Config, items: Items | None, held: dict) -> None:
    """Raise StaleStore where this configuration's store at output.path (its attributes
    ``held``) was made with other network code or conditioning input than the run has, or
    one of its own attributes was edited (``store_attrs.edited``)."""
    _check_unedited(cfg)
    _check_same_network(cfg, held)
    _check_sampler_revision(cfg, held)
    _check_same_sidecar(cfg, held)
    _check_same_plugin(cfg, held)
    if items is not None and cfg.input.path:
        _check_same_items(cfg, items.labels)
        if items.fingerprint:
            _check_same_input(cfg, held, items.fingerprint)
        _check_same_statistics(cfg, held, items.mean, items.std)


def _check_unedited(cfg: Config) -> None:
    """``store_attrs.check_unedited`` of output.path, as a StaleStore (``output.overwrite``
    replaces it)."""
    try:
        check_unedited(cfg.output.path)
    except EditedAttribute as err:
        raise StaleStore(str(err), why="an attribute of its was edited by hand") from None


def is_stale(cfg: Config, items: Items | None) -> str:
    """Why this configuration's store at output.path must be made anew (``_check_made_alike``;
    ``output.overwrite`` replaces it), in a few words; "" where it need not, or is gone (a job
    of this configuration replaced it meanwhile: the caller's lock decides again)."""
    try:
        _check_made_alike(cfg, items, read_attrs(cfg.output.path) or {})
    except StaleStore as err:
        return err.why
    except (OSError, ValueError, KeyError):  # vanished mid-read (StoreExists is an OSError)
        return ""
    return ""


def _check_sampler_revision(cfg: Config, held: dict) -> None:
    """Refuse to resume or grow, from its attributes ``held``, a store whose members a
    superseded revision of its sampler made (``Registered.superseded``: a fault since mended
    put them apart from the members this piadm would add)."""
    method, revision = held.get("sampler_method"), held.get("sampler_revision", 1)
    entry = REGISTRY.get(method) if isinstance(method, str) else None
    created = str(held.get("created", ""))  # "" (not said): older still
    why = next((why for old, fixed, why in (entry.superseded if entry else ())
                if revision == old and created < fixed), None)
    if why is None:
        return
    raise StaleStore(
        f"output {cfg.output.path} holds members that {method} revision {revision} made, which "
        f"{why}; this piadm's {method} (revision {entry.revision}) would add members apart from "
        "them: read it as it is, sample into another output.path, or set output.overwrite = "
        "true to replace it", why=f"an earlier {method} made its members")


def mixed_revision(held: dict, attrs: dict) -> str:
    """Where the store's members so far (its attributes ``held``) were sampled by another
    revision of the run's sampler than this run's (its ``attrs``), the words that say so,
    for the run's history line and its opening: each revision's members are within
    sampler.tol of the same sequential path, so the store is resumed, but an analyst should
    be able to tell them apart. "" where they agree, or the store says no revision."""
    method, then, now = (attrs.get("sampler_method"), held.get("sampler_revision"),
                         attrs.get("sampler_revision"))
    if then is None or now is None or then == now or held.get("sampler_method") != method:
        return ""
    return f"{method} revision {now} (the store's first members: revision {then})"


def _check_same_sidecar(cfg: Config, held: dict) -> None:
    """Refuse to resume or grow, from its attributes ``held``, a store whose U-Net
    checkpoint's sidecar says otherwise of the network since it was made (its normalisation
    or data bound S, e.g. by ``models.export --data``, with the weights unchanged): the rest
    of its members would be drawn in other units or on another path. Its record of training
    (``run.SIDECAR_RECORD``) may change; a store made before it was recorded is not checked."""
    was = held.get(MODEL_SIDECAR)
    if not was or was in (sidecar_digest(cfg.model), sidecar_digest(cfg.model, whole=True)):
        return
    recorded = held.get(MODEL_SIDECAR_SAYS)
    changed = _sidecar_changes(recorded, sidecar_says(cfg.model))
    what = (f"its {', '.join(changed)} changed since" if changed else
            "what it says has changed since: the store, made before 2026-12-07, recorded the "
            "whole file, its record of training (data, config, step, val_loss) too"
            if recorded is None else
            "what it says of the network, its normalisation, grid or architecture, has "
            "changed since")
    raise StaleStore(
        f"output {cfg.output.path} was made by this configuration with another sidecar of "
        f"{cfg.model.checkpoint} ({what}): put the original back to resume it, choose another "
        "output.path, or set output.overwrite = true to replace it (its members are deleted)",
        why="its checkpoint's sidecar changed since it was made")


def _sidecar_changes(then, now: list | None) -> list[str]:
    """The keys in which the sidecars recorded as ``then`` (``MODEL_SIDECAR_SAYS``'s JSON)
    and ``now`` (``sidecar_says``) differ, the guide's named so; [] where not recorded."""
    try:
        then = json.loads(then) if isinstance(then, str) else None
    except ValueError:
        then = None
    if not isinstance(then, list) or now is None or len(then) != len(now):
        return []
    keys = []
    for whose, (a, b) in zip(("", "guide's "), zip(then, now)):
        a, b = a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {}
        keys += [f"{whose}{k}" for k in sorted({*a, *b} - set(SIDECAR_GRIDS))
                 if a.get(k) != b.get(k)]  # the grids, unrecorded, are said as "what it says"
    return keys


def _check_same_plugin(cfg: Config, held: dict) -> None:
    """Refuse to resume or grow, from its attributes ``held``, a store of a plugin kind whose
    package version, builder code or a file its keys name (weights retrained in place) has
    changed since it was made (a store made before it was recorded is not checked)."""
    was = held.get(MODEL_PLUGIN)
    if not was:
        return
    from models import plugin_digest

    if was != (now := plugin_digest(cfg.model)):
        raise StaleStore(
            f"output {cfg.output.path} was made by this configuration with another model of "
            f"kind {cfg.model.kind!r} ({was[:12]}, now {now[:12] or 'none'}: its package "
            "version, the code of its builder or a file its keys name has changed since): put "
            "the original back to resume it, choose another output.path, or set "
            "output.overwrite = true to replace it", why="its plugin's code or files changed")


def _check_same_network(cfg: Config, held: dict) -> None:
    """Refuse to resume or grow, from its attributes ``held``, a store of a user's network
    that an older piadm sampled with its fields scaled by the input selection's statistics
    (``field_scale``: where they were not 0 and 1), or, a module's, whose code file has
    changed since (a store made before it was recorded is not checked)."""
    if cfg.model.kind not in OWN_KINDS:
        return
    scaled = (float(held.get("input_mean", 0.0)), float(held.get("input_std", 1.0))) != (0, 1)
    if FIELD_SCALE not in held and scaled:
        raise StaleStore(
            f"output {cfg.output.path} was sampled by an older piadm, which scaled the "
            "network's condition and fields by the input selection's mean and std (it now "
            "takes them in the input's own units): its members would not match the rest; set "
            "output.overwrite = true to sample it anew, or choose another output.path",
            why="an older piadm scaled its network's fields")
    if cfg.model.kind != "module" or not held.get(MODEL_SOURCE):
        return
    from models.module import source_digest, source_file

    now = source_digest(cfg.model)
    if now != held[MODEL_SOURCE]:
        raise StaleStore(
            f"output {cfg.output.path} was made by this configuration with other network code "
            f"({source_file(cfg.model) or cfg.model.target} has changed since: "
            f"{held[MODEL_SOURCE][:12]}, now {now[:12] or 'none'}): put the original back to "
            "resume it, choose another output.path, or set output.overwrite = true to "
            "replace it", why="its network code changed since it was made")


def check_noise_of(cfg: Config, device) -> None:
    """``_check_same_noise`` of the store at output.path as it is now: for a store this run
    resumes after another job of its configuration made it meanwhile (on another device,
    maybe), which the checks before it were not made on."""
    _check_same_noise(cfg, read_attrs(cfg.output.path) or {}, device)


def _check_same_noise(cfg: Config, held: dict, device) -> None:
    """Refuse to resume or grow, from its attributes ``held``, a store of device noise
    (``sampler.noise = "device"``: torch's generator, whose numbers depend on the device type,
    on a GPU its model too (how many threads a large draw is spread over), and the torch
    version) made on another of these: its new members' noise would come from other streams
    than its keys promise (what a store did not record is not checked). A store of host noise
    is refused where this installation draws its fixed fingerprint draw differently (a numpy
    whose normal sampler changed)."""
    if held.get("sampler_noise") != "device":
        was = held.get(HOST_NOISE)
        if was and was != host_fingerprint():
            raise StoreExists(
                f"output {cfg.output.path} was sampled with host noise that this installation "
                f"draws differently (numpy {held.get('numpy_version', '?')} then, "
                f"{np.__version__} now): its new members would not match the rest; resume it "
                f"with numpy {held.get('numpy_version', '?')}, or choose another output.path "
                "(output.overwrite does not replace a store for the machine it runs on: "
                "delete it to sample it anew here)")
        return
    was_torch = held.get("torch_version")
    was = _noise_device(str(held.get("made_on", "")))
    now = arithmetic_kind(device)  # what _noise_device reads from a made_on
    if (was_torch and was_torch != torch.__version__) or (was and was != now):
        raise StoreExists(
            f"output {cfg.output.path} was sampled with sampler.noise = 'device' on "
            f"{was or 'a device'} with torch {was_torch}, and this run has {now} with torch "
            f"{torch.__version__}: device noise differs between them, so its members would "
            "not match the rest; resume it where it was made, or choose another output.path "
            "(output.overwrite does not replace a store for the machine it runs on: delete it "
            "to sample it anew here)")


def _noise_device(made_on: str) -> str:
    """What device noise depends on in a ``made_on`` ("cuda: NAME xTHREADS"): the device
    type, and a GPU's model; "" where none was recorded."""
    kind, _, name = made_on.partition(": ")
    return f"{kind}: {name.rsplit(' x', 1)[0]}" if kind == "cuda" else kind


def _check_same_items(cfg: Config, labels: np.ndarray) -> None:
    """Refuse to resume a store whose items are not the input's selection now (times added
    to the input within input.range, say): the arrays have the store's items."""
    dim = cfg.input.item_dim
    held = open_store(cfg.output.path)[dim].values
    if len(held) == len(labels) and (held == labels).all():
        return
    span = lambda v: (f"{len(v)} ({label_text(v[0])} .. {label_text(v[-1])})"  # noqa: E731
                      if len(v) else "0")
    raise StaleStore(
        f"output {cfg.output.path} holds the {dim} items {span(held)} and the selection of "
        f"input {cfg.input.path} is now {span(labels)}: select the store's items with "
        "input.items or input.range, write the new selection to another output.path, or set "
        "output.overwrite = true to replace it", why=f"its {dim} items are not the input's now")


def _check_same_input(cfg: Config, held: dict, now: tuple[float, ...]) -> None:
    """Refuse to resume, from its attributes ``held``, a store whose conditioning input
    changed since it was made (data regenerated or edited in place): its members so far were
    drawn for the old fields, the rest would be for the new ones. A store made before piadm
    recorded this fingerprint is not checked."""
    then = held.get(INPUT_FINGERPRINT)
    if then is None or len(then) != len(now) or same_fingerprint(then, now):
        return
    raise StaleStore(
        f"output {cfg.output.path}: its members were conditioned on the {cfg.input.variable} "
        f"fields of input {cfg.input.path} as they were when it was made (their fingerprint, "
        f"the attribute {INPUT_FINGERPRINT}: {_short(then)}), and they have changed since "
        f"({_short(now)}): restore that input, write the ensemble of the new one to "
        "another output.path, or set output.overwrite = true to replace it",
        why="its input changed since it was made")


def _check_same_statistics(cfg: Config, held: dict, mean: float, std: float) -> None:
    """A store made before piadm recorded its input's fingerprint: refuse it where the
    input's mean and standard deviation over the selected items (``input_mean``,
    ``input_std``, recorded since the first stores) now differ by more than another piadm's
    rounding of the same fields could make them."""
    if held.get(INPUT_FINGERPRINT) is not None:
        return
    try:
        then = (float(held["input_mean"]), float(held["input_std"]))
    except (KeyError, TypeError, ValueError):
        return
    spread = STATISTICS_RTOL * max(then[1], std)  # the std's, and the mean's float32 rounding
    if (abs(then[0] - mean) <= spread + FLOAT32_RTOL * max(abs(then[0]), abs(mean))
            and abs(then[1] - std) <= spread):
        return
    raise StaleStore(
        f"output {cfg.output.path}: its members were conditioned on the {cfg.input.variable} "
        f"fields of input {cfg.input.path} as they were when it was made (mean "
        f"{then[0]:.9g}, standard deviation {then[1]:.9g}: the attributes input_mean and "
        f"input_std), and they have changed since (now {mean:.9g}, {std:.9g}): restore that "
        "input, write the ensemble of the new one to another output.path, or set "
        "output.overwrite = true to replace it", why="its input changed since it was made")


# how far the same fields' statistics may round apart between piadm versions, far below a
# field regenerated or edited: float64 sums in another order (of the std), and a piadm
# before 2026-12-04 reduced float32 fields in float32 (of the mean, whose rounding far from
# zero exceeds the first: 101325 Pa with a std of 100)
STATISTICS_RTOL = 1e-5
FLOAT32_RTOL = 1e-6


def _short(values) -> str:
    return "[" + ", ".join(f"{v:.9g}" for v in values) + "]"
